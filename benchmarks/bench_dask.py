"""TFCE permutations on Dask workers: one worker vs two, against the in-process run, one process.

Data: the shipped MNI152 brain mask on its 2 mm grid (235,804 voxels) and 20 maps of smooth noise
plus a blob (deterministic). For each setting, the same ``permutation_test`` (one-sample sign
flips, voxel + TFCE, ``--n-perm`` relabellings, one seed):

* in process, 1 numba thread, and 2 numba threads (what the same two cores give without Dask);
* a local Dask cluster of 1 worker and of 2 workers, started by ``distributed.LocalCluster``
  (worker processes, each under a nanny, 1 thread and ``NUMBA_NUM_THREADS=1`` each, checked;
  the scheduler runs in this process): like with like, one core per worker.

For each it prints the wall time, the relabellings per second, the CPU seconds of this process
(client and scheduler) and of the workers, the machine's busy CPU seconds (``/proc/stat``: all
processes, so other users' load shows as busy time that is not ours) and the load average, and
for the Dask runs the timeline of the tasks (from the scheduler's task stream): seconds before
the first chunk starts (the client's observed statistics and engine, the shared data sent),
after the last ends (merge, result), and the workers' idle time in between. Then the speed-up of
two workers over one, in wall time and from the workers' CPU seconds (one worker's over half of
two workers': what a machine with a free core per worker would show, serial seconds aside; other
load inflates the wall time much more than the CPU time), the bound set by whole batches (a
chunk is whole batches, so that the results are the same bits), and
whether the null distributions are bit-identical to the in-process run (they must be).

``--store``: the maps are written as NIfTI files and read into the voxel-tiled store
(:func:`bids_group.store.load_data` with a 1 MB budget, in a temporary work folder), so that the
permutations read the store: the client's engine writes the residuals' scratch file once, the
workers read the store and that file.

Run: ``python benchmarks/bench_dask.py [--n-perm 2000] [--maps 20] [--store]``. On a 2-core
machine the two-worker run can reach at most 2x; other load on the machine lowers it (see busy
CPU).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

# before numba is imported: two threads for the in-process reference; the workers get one
os.environ.setdefault("NUMBA_NUM_THREADS", "2")


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


def _stored(y: np.ndarray, mask: np.ndarray, folder) -> object:
    """``y`` read back through the tiled store: NIfTI maps and the mask written in ``folder``,
    then :func:`bids_group.store.load_data` with a budget far below the data (the same values:
    float32 maps, the same mask)."""
    from pathlib import Path

    import nibabel as nib

    from bids_group.store import load_data
    from bids_group.templates import load_template

    folder, affine = Path(folder), load_template().affine
    nib.Nifti1Image(mask.astype(np.uint8), affine).to_filename(folder / "mask.nii.gz")
    paths = []
    for i, row in enumerate(y):
        volume = np.zeros(mask.shape, dtype=np.float32)
        volume[mask] = row
        paths.append(folder / f"map{i:03d}.nii")
        nib.Nifti1Image(volume, affine).to_filename(paths[-1])
    data = load_data(paths, budget=2**20, work_dir=folder / "work",
                     mask_path=folder / "mask.nii.gz", bytes_per_cell=20)  # fmt: skip
    assert not isinstance(data.data, np.ndarray) and np.array_equal(data.mask, mask)
    return data


def _busy_cpu() -> float:
    """Seconds of CPU the whole machine spent busy (every process), from /proc/stat."""
    fields = [float(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _run(y, mask, n_perm, executor, n_jobs=1):
    from bids_group.inference.permutation import permutation_test
    from bids_group.inference.tfce import TfceParams

    t0 = time.perf_counter()
    res = permutation_test(y, np.ones((y.shape[0], 1)), np.ones(1), n_perm=n_perm, seed=1,
                           mask=mask, tfce=True, tfce_params=TfceParams(), n_jobs=n_jobs,
                           executor=executor)  # fmt: skip
    return time.perf_counter() - t0, res


def _measured(run, workers_cpu=None) -> tuple[float, object, dict[str, float]]:
    """Wall seconds, result, and CPU figures of ``run()``."""
    load0, busy0, own0 = os.getloadavg()[0], _busy_cpu(), time.process_time()
    w0 = workers_cpu() if workers_cpu else 0.0
    wall, res = run()
    cpu = {
        "client": time.process_time() - own0,
        "workers": (workers_cpu() - w0) if workers_cpu else 0.0,
        "machine": _busy_cpu() - busy0,
        "load": max(load0, os.getloadavg()[0]),
    }
    return wall, res, cpu


def _cpu_text(cpu: dict[str, float], wall: float) -> str:
    others = cpu["machine"] - cpu["client"] - cpu["workers"]
    return (f"CPU s: client {cpu['client']:5.1f}, workers {cpu['workers']:5.1f}, machine busy "
            f"{cpu['machine']:5.1f} of {2 * wall:5.1f} (not ours {max(others, 0):4.1f}); "
            f"load {cpu['load']:.1f}")  # fmt: skip


def _timeline(stream: list[dict], start: float, end: float) -> str:
    """Seconds before the first chunk, after the last, and workers' idle time in between."""
    spans = [
        (s["start"], s["stop"], t["worker"])
        for t in stream
        if str(t.get("key", "")).startswith("run_chunk")
        for s in t["startstops"]
        if s["action"] == "compute"
    ]
    first, last = min(s[0] for s in spans), max(s[1] for s in spans)
    busy: dict[str, float] = {}
    for a, b, w in spans:
        busy[w] = busy.get(w, 0.0) + b - a
    idle = sum(last - first - b for b in busy.values())
    return (f"{len(spans)} chunks; before the first {first - start:4.2f} s, after the last "
            f"{end - last:4.2f} s, workers idle between {idle:4.2f} s")  # fmt: skip


def _numba_threads() -> int:
    import numba

    return numba.get_num_threads()


def _dask_run(y, mask, n_perm, n_workers, ref):
    from distributed import Client, LocalCluster, get_task_stream

    from bids_group.executor import DaskExecutor

    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, env={"NUMBA_NUM_THREADS": "1"})  # fmt: skip
    with cluster, Client(cluster) as client:
        executor = DaskExecutor(client)
        # every worker compiles (or loads the cache) now, not in its first timed chunk
        client.run(_run, y, mask, 8, None)
        _run(y, mask, 8, executor)
        threads = set(client.run(_numba_threads).values())
        assert threads == {1}, f"numba threads in the workers: {threads}"

        per_worker: list[dict] = []

        def workers_cpu() -> float:
            per_worker.append(client.run(time.process_time))
            return sum(per_worker[-1].values())

        with get_task_stream(client) as stream:
            start = time.time()
            wall, res, cpu = _measured(lambda: _run(y, mask, n_perm, executor), workers_cpu)
            end = time.time()
        timeline = _timeline(stream.data, start, end)
    split = sorted((per_worker[1][w] - per_worker[0][w] for w in per_worker[0]), reverse=True)
    same = np.array_equal(res.tfce.null_max, ref.tfce.null_max) and np.array_equal(
        res.null_max_stat, ref.null_max_stat
    )
    print(f"Dask, {n_workers} worker(s): {wall:6.1f} s ({n_perm / wall:5.1f} relabellings/s); "
          f"{_cpu_text(cpu, wall)}\n    {timeline}; CPU s per worker "
          f"{', '.join(f'{c:.1f}' for c in split)}; null distributions bit-identical to "
          f"in-process: {same}")  # fmt: skip
    return wall, cpu["workers"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-perm", type=int, default=2000)
    parser.add_argument("--maps", type=int, default=20)
    parser.add_argument("--store", action="store_true", help="read the data from the tiled store")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        y, mask = _data(args.maps)
        stored = _stored(y, mask, tmp) if args.store else None
        try:
            _benchmark(args, stored.data if stored else y, mask)
        finally:
            if stored is not None:
                from bids_group.store import release

                release(stored)


def _benchmark(args, y, mask) -> None:
    import numba

    print(f"data: {'the tiled store' if args.store else 'in memory'}")
    print(f"{args.maps} maps x {y.shape[1]:,} voxels; {args.n_perm} sign flips, voxel + TFCE; "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    _run(y, mask, 8, None)  # compile and warm the caches
    base, ref, cpu = _measured(lambda: _run(y, mask, args.n_perm, None))
    print(f"in process, 1 thread: {base:6.1f} s ({args.n_perm / base:5.1f} relabellings/s); "
          f"{_cpu_text(cpu, base)}")  # fmt: skip
    if numba.config.NUMBA_NUM_THREADS >= 2:
        two, _, cpu = _measured(lambda: _run(y, mask, args.n_perm, None, n_jobs=2))
        print(f"in process, 2 threads: {two:6.1f} s; {_cpu_text(cpu, two)}")
    runs = {n: _dask_run(y, mask, args.n_perm, n, ref) for n in (1, 2)}
    from bids_group.inference.permutation import BATCH_SPATIAL, SPATIAL_FLIP_BYTES

    batch = int(np.clip(SPATIAL_FLIP_BYTES // (4 * y.shape[1]), BATCH_SPATIAL, 256))
    loads = [0, 0]  # whole batches on two workers, largest first, each to the less loaded
    for size in sorted((min(batch, args.n_perm - i) for i in range(0, args.n_perm, batch)),
                       reverse=True):  # fmt: skip
        loads[loads.index(min(loads))] += size
    bound = args.n_perm / max(loads)
    wall, cpu = runs[1][0] / runs[2][0], runs[1][1] / (runs[2][1] / 2)
    print(f"two workers / one worker: {wall:.2f}x wall; {cpu:.2f}x from the workers' CPU seconds "
          "(one worker's over half of two workers': the speed-up with a free core per worker, "
          f"serial seconds and the last batch aside); whole batches of {batch} allow at most "
          f"{bound:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
