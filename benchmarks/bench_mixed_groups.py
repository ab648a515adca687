"""Variance groups on pain21's whole brain: the joint ML/REML search over two tau^2.

Design: intercept, a made-up group difference (alternating studies, also the two variance
groups) and a shared made-up covariate (not separable by group, so the joint search runs). For
ML and REML with groups, and REML with one tau^2 for scale: wall and CPU seconds (CPU counts
every thread: on a machine shared with other jobs it is the better measure of the work), with
``--threads`` numba threads. No other tool fits this model voxelwise (FSL flameo does, one
voxel at a time, and only for designs it can express), so there is no reference run.

Run: ``python benchmarks/bench_mixed_groups.py [--threads 2] [--methods reml ml]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_mixed import DEFAULT_DATA, load_pain21  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--methods", nargs="+", default=["reml", "ml"], choices=["reml", "ml"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import numba

    from bids_group.mixed_effects import fit_mixed

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    y, v = load_pain21(args.data)
    groups = np.arange(21) % 2
    x = np.column_stack([np.ones(21), groups, np.random.default_rng(7).normal(size=21)])
    fit_mixed(y[:, :300], v[:, :300], x, "reml", groups=groups)  # compile or load the cache
    print(
        f"{y.shape[1]:,} voxels, {numba.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}"
    )
    runs = [(m, groups) for m in args.methods] + [("reml", None)]
    for method, labels in runs:
        wall, cpu = time.perf_counter(), time.process_time()
        fit = fit_mixed(y, v, x, method, groups=labels)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        zeros = np.mean(np.atleast_2d(fit.tau2)[:, fit.estimable] == 0, axis=1)
        what = "two tau^2 (joint)" if labels is not None else "one tau^2"
        print(f"{method:5s} {what:18s} wall {wall:6.1f} s  cpu {cpu:6.1f} s  "
              f"tau^2 = 0 at {np.round(zeros, 3).tolist()}")  # fmt: skip


if __name__ == "__main__":
    main()
