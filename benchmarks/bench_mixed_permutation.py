"""Mixed-effects permutation inference on pain21's whole brain, and what a relabelling costs.

No other tool permutes mixed-effects statistics, so the reference is what a user would write
today: one PyMARE fit of the estimator per relabelling (its Knapp-Hartung z; WLS: Wald). For each
estimator, on the voxels where all 21 variances are positive (PyMARE cannot exclude a map at a
voxel), in one process:

* ours: :func:`bids_group.inference.mixed_permutation.mixed_permutation_test` (voxel-level FWER,
  ``--n-perm`` sign flips, tau^2 re-estimated in each), seconds per relabelling;
* PyMARE: one fit + ``get_fe_stats`` on sign-flipped data, seconds (= per relabelling);
* the ratio, and for scale our OLS sign-flip engine's seconds per relabelling on the same data.

Peak resident memory of the process is printed at the end (``ru_maxrss``).

Run: ``python benchmarks/bench_mixed_permutation.py [--methods fe dl hedges ml reml]
[--n-perm 50] [--threads N]``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_mixed import DEFAULT_DATA, METHODS, load_pain21, pymare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--n-perm", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import numba

    from bids_group.inference.mixed_permutation import mixed_permutation_test
    from bids_group.inference.permutation import permutation_test

    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    y_all, v_all = load_pain21(args.data)
    positive = (v_all > 0).all(axis=0)
    y = y_all[:, positive].astype(np.float64)
    v = v_all[:, positive].astype(np.float64)
    x, c = np.ones((21, 1)), np.ones(1)
    print(f"pain21: {y.shape[1]:,} voxels with 21 positive variances; {args.n_perm} sign flips; "
          f"{threads} threads")  # fmt: skip
    mixed_permutation_test(y[:, :300], v[:, :300], x, c, n_perm=2, seed=0)  # compile
    permutation_test(y[:, :300], x, c, n_perm=2, seed=0)
    t0 = time.perf_counter()
    permutation_test(y, x, c, n_perm=args.n_perm, seed=0, n_jobs=threads)
    ols = (time.perf_counter() - t0) / (args.n_perm + 1)
    flips = np.where(np.random.default_rng(1).random(21) < 0.5, -1.0, 1.0)[:, None]
    print(f"{'estimator':<9} {'ours s/relabelling':>19} {'PyMARE s/fit':>13} {'ratio':>7}   "
          "(CPU s: ours, PyMARE, ratio)")  # fmt: skip
    for method in args.methods:
        adjustment = "none" if method == "fe" else "knapp-hartung"
        t0, c0 = time.perf_counter(), time.process_time()
        mixed_permutation_test(y, v, x, c, method=method, adjustment=adjustment,
                               n_perm=args.n_perm, seed=0, n_jobs=threads)  # fmt: skip
        ours = (time.perf_counter() - t0) / (args.n_perm + 1)
        ours_cpu = (time.process_time() - c0) / (args.n_perm + 1)
        t0, c0 = time.perf_counter(), time.process_time()
        pymare(method, flips * y, v, x)
        theirs, theirs_cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"{method:<9} {ours:>19.3f} {theirs:>13.3f} {theirs / ours:>6.1f}x   "
              f"({ours_cpu:.3f}, {theirs_cpu:.3f}, {theirs_cpu / ours_cpu:.1f}x)")  # fmt: skip
    print(f"OLS sign flips (same voxels, for scale): {ols * 1e3:.2f} ms per relabelling")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak:.0f} MB")


if __name__ == "__main__":
    main()
