"""TFCE permutations on Dask workers: one worker vs two, against the in-process run, one process.

Data: the shipped MNI152 brain mask on its 2 mm grid (235,804 voxels) and 20 maps of smooth noise
plus a blob (deterministic). For each setting, the same ``permutation_test`` (one-sample sign
flips, voxel + TFCE, ``--n-perm`` relabellings, one seed):

* in process, 1 numba thread;
* a local Dask cluster (``distributed.LocalCluster``, worker processes, no nanny) of 1 worker and
  of 2 workers, 1 thread each and ``NUMBA_NUM_THREADS=1`` in the workers;

and prints wall time, relabellings per second, the speed-up of two workers over one, and whether
the null distributions are bit-identical to the in-process run (they must be).

Run: ``python benchmarks/bench_dask.py [--n-perm 400] [--maps 20]``. On a 2-core machine the
two-worker run can reach at most 2x; other load on the machine lowers it.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # before numba is imported: workers inherit it


def _data(n_maps: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage

    from bids_group.templates import load_template

    mask = load_template().mask
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n_maps):
        noise = ndimage.gaussian_filter(rng.standard_normal(mask.shape), 1.5)
        rows.append((noise[mask] / noise[mask].std() + 0.15).astype(np.float32))
    return np.stack(rows), mask


def _run(y, mask, n_perm, executor):
    from bids_group.inference.permutation import permutation_test
    from bids_group.inference.tfce import TfceParams

    t0 = time.perf_counter()
    res = permutation_test(y, np.ones((y.shape[0], 1)), np.ones(1), n_perm=n_perm, seed=1,
                           mask=mask, tfce=True, tfce_params=TfceParams(), n_jobs=1,
                           executor=executor)  # fmt: skip
    return time.perf_counter() - t0, res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-perm", type=int, default=400)
    parser.add_argument("--maps", type=int, default=20)
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    from bids_group.executor import DaskExecutor

    y, mask = _data(args.maps)
    print(f"{args.maps} maps x {y.shape[1]:,} voxels; {args.n_perm} sign flips, voxel + TFCE")
    _run(y, mask, 8, None)  # compile and warm the caches
    base, ref = _run(y, mask, args.n_perm, None)
    print(f"in process, 1 thread: {base:6.1f} s ({args.n_perm / base:5.1f} relabellings/s)")
    times = {}
    for n_workers in (1, 2):
        cluster = LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        with cluster, Client(cluster) as client:
            executor = DaskExecutor(client)
            _run(y, mask, 8, executor)  # workers compile (or load the cache)
            wall, res = _run(y, mask, args.n_perm, executor)
        same = np.array_equal(res.tfce.null_max, ref.tfce.null_max) and np.array_equal(
            res.null_max_stat, ref.null_max_stat
        )
        times[n_workers] = wall
        rate = args.n_perm / wall
        print(f"Dask, {n_workers} worker(s): {wall:6.1f} s ({rate:5.1f} relabellings/s); null "
              f"distributions bit-identical to in-process: {same}")  # fmt: skip
    print(f"two workers / one worker: {times[1] / times[2]:.2f}x")


if __name__ == "__main__":
    main()
