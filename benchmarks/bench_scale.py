"""Cohort scale: bids-group's whole run against the gzip decode floor, N = 200 to 10,000.

For each N of ``--sizes`` it builds (once, in ``benchmarks/_data/``) a BIDS derivatives dataset of
N subjects on the 2 mm MNI grid (nilearn's MNI152 brain mask, 235,375 in-mask voxels; two groups
and an age column), then measures, each in a fresh child process so that peak memory is its own:

* ``index``: pybids indexing and map selection alone (``bids_group.inputs.collect_inputs``);
* ``floor``: reading and inflating every map, 1 thread and ``--n-jobs`` threads, with zlib and,
  when installed, ISA-L (``isal``, the ``fast`` extra bids-group uses when present), then
  ISA-L again with glibc's heap kept warm as bids-group's console script keeps it
  (``bids_group.memory.keep_heap_warm``); the ratio is to the fastest of them;
* ``bids-group``: ``bids-group DS OUT group -m two-groups-plus-age --height-control fdr``,
  what a user runs (HTML report included; ``--no-report`` to leave it out), the real console
  entry point in a subprocess (wall time, CPU, its own peak RSS, the memory budget it chose
  and whether it used the tiled store, from its log);
* ``bids-group + permutations`` (sizes in ``--perm-sizes``, when ``--n-perm`` > 0): the same run
  with ``--permutation <--permutation> --n-perm <--n-perm>`` (row permutations: the contrast
  is a group difference);
* ``nilearn`` (sizes in ``--nilearn-sizes``): ``SecondLevelModel`` on images loaded beforehand
  (fit + ``compute_contrast(output_type="all")`` + FDR threshold); skipped, with the reason,
  when its memory (extrapolated from a smaller N measured in the same run) would not fit.

Only ``--pool`` distinct maps are generated; larger datasets reuse them under new subject ids
through symbolic links (printed as "N (P distinct maps, N-P links)"): decoding cost per file is
the same, and the page cache holds the pool. ``--tiny`` uses distinct 8x8x8 maps instead, to
exercise the per-file costs (indexing, headers, file opening) at N = 10,000 in seconds.

Run: ``python benchmarks/bench_scale.py --sizes 200,1000 [--n-jobs 2] [--pool 200]``
     ``python benchmarks/bench_scale.py --sizes 2000 --skip index,floor,bids-group --n-perm 1000``
     ``python benchmarks/bench_scale.py --sizes 10000 --tiny --skip floor,nilearn``
     ``python benchmarks/bench_scale.py --sizes 10000 --skip nilearn,index --reuse-index``
     (``--reuse-index``: bids-group also runs twice in one work folder, the second reusing the
     pybids index the first saved there, as the issue's "persisted database")
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA_ROOT = HERE / "_data"
TASK = "bench"
MAP_NAME = "{sub}_task-bench_space-MNI152NLin2009cAsym_contrast-task_stat-effect_statmap.nii.gz"
TINY_SHAPE = (8, 8, 8)
#: The model of the issue's measurements: two groups and a demeaned age covariate.
MODEL = {
    "Name": "scale",
    "BIDSModelVersion": "1.0.0",
    "Input": {"task": TASK},
    "Nodes": [
        {
            "Level": "Dataset",
            "Name": "groups",
            "GroupBy": ["contrast"],
            "Transformations": {
                "Transformer": "pybids-transforms-v1",
                "Instructions": [
                    {"Name": "Factor", "Input": ["group"]},
                    {"Name": "Demean", "Input": ["age"]},
                ],
            },
            "Model": {"Type": "glm", "X": ["group.control", "group.patient", "age"]},
            "Contrasts": [
                {
                    "Name": "patientGtControl",
                    "ConditionList": ["group.patient", "group.control"],
                    "Weights": [1, -1],
                    "Test": "t",
                }
            ],
            "DummyContrasts": {"Test": "t", "Contrasts": ["age"]},
        }
    ],
}


# --- Datasets -------------------------------------------------------------------------------------


def _mni_mask() -> tuple[np.ndarray, np.ndarray]:
    from nilearn.datasets import load_mni152_brain_mask

    img = load_mni152_brain_mask(resolution=2)
    return np.asarray(img.dataobj) > 0, np.asarray(img.affine)


def build_pool(n_maps: int, root: Path) -> list[Path]:
    """``n_maps`` distinct maps: smooth noise + a group effect, zero outside the brain."""
    import nibabel as nib
    from scipy.ndimage import gaussian_filter

    pool = root / "scale-pool"
    paths = [pool / f"map-{i:05d}.nii.gz" for i in range(n_maps)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if not missing:
        return paths
    pool.mkdir(parents=True, exist_ok=True)
    mask, affine = _mni_mask()
    ii, jj, kk = np.indices(mask.shape)
    centre = np.array(mask.shape) / 2
    blob = np.exp(
        -((ii - centre[0] - 12) ** 2 + (jj - centre[1]) ** 2 + (kk - centre[2]) ** 2) / 60
    )
    print(f"generating {len(missing)} distinct 2 mm maps in {pool}", flush=True)
    for i in missing:
        rng = np.random.default_rng(i)
        noise = gaussian_filter(rng.standard_normal(mask.shape), sigma=1.5)
        noise /= noise[mask].std()
        effect = 0.5 * blob if i % 2 else 0.0  # odd maps are patients (see _participants)
        vol = (effect + noise).astype(np.float32) * mask
        tmp = paths[i].with_name("tmp-" + paths[i].name)
        nib.Nifti1Image(vol, affine).to_filename(tmp)
        tmp.rename(paths[i])
    return paths


def _participants(n: int) -> str:
    rows = ["participant_id\tage\tgroup"]
    rows += [f"sub-{s:05d}\t{20 + s % 47}\t{'patient' if s % 2 else 'control'}" for s in range(n)]
    return "\n".join(rows) + "\n"


def build_dataset(n: int, pool_size: int, root: Path, *, tiny: bool) -> tuple[Path, str]:
    """The dataset of ``n`` subjects and a label saying how many maps are links."""
    if tiny:
        ds, label = (
            root / f"scale-tiny-{n}",
            f"{n} (distinct tiny {'x'.join(map(str, TINY_SHAPE))})",
        )
    else:
        n_links = max(0, n - pool_size)
        ds = root / f"scale-{n}-pool{pool_size}"
        label = f"{n} ({min(n, pool_size)} distinct maps, {n_links} links)"
    if (ds / "participants.tsv").exists():
        return ds, label
    pool = [] if tiny else build_pool(min(n, pool_size), root)
    tmp = ds.with_name(ds.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    description = {
        "Name": "bench_scale",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "bench_scale.py"}],
    }
    (tmp / "dataset_description.json").write_text(json.dumps(description))
    print(f"building {ds.name}: {label}", flush=True)
    for s in range(n):
        sub = f"sub-{s:05d}"
        folder = tmp / sub / "func"
        folder.mkdir(parents=True)
        target = folder / MAP_NAME.format(sub=sub)
        if tiny:
            _write_tiny(target, s)
        else:
            source = pool[s % len(pool)]  # an even pool keeps s's parity, hence its group
            if s < len(pool):
                os.link(source, target)  # hard link: a distinct file for every reader
            else:
                target.symlink_to(source)
    (tmp / "participants.tsv").write_text(_participants(n))
    tmp.rename(ds)
    return ds, label


def _write_tiny(path: Path, seed: int) -> None:
    import nibabel as nib

    rng = np.random.default_rng(seed)
    vol = (rng.standard_normal(TINY_SHAPE) + 1.0).astype(np.float32)
    nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0])).to_filename(path)


def input_maps(ds: Path) -> list[Path]:
    return sorted(ds.glob("sub-*/func/*_statmap.nii.gz"))


# --- Children (one process each) ------------------------------------------------------------------


def child_index(ds: Path, out: Path, n_jobs: int) -> dict:
    """In memory (what a run without -w does), then saving and reusing the index (with -w)."""
    from bids_group.inputs import collect_inputs

    result = {}
    with tempfile.TemporaryDirectory() as cache:
        for name, where in (("seconds", None), ("saving", Path(cache)), ("reused", Path(cache))):
            start = time.perf_counter()
            inputs = collect_inputs(ds, input_filters={"task": TASK}, index_cache=where)
            result[name] = time.perf_counter() - start
    result["n_maps"] = len(inputs.maps)
    return result


def _floor(
    paths: list[Path], inflate: Callable[[bytes], bytes], n_jobs: int
) -> tuple[float, float]:
    """Wall and CPU seconds (all threads) to read and inflate every map."""

    def one(path: Path) -> int:
        return len(inflate(path.read_bytes()))

    cpu = time.process_time()
    start = time.perf_counter()
    if n_jobs == 1:
        for p in paths:
            one(p)
    else:
        with ThreadPoolExecutor(n_jobs) as pool:
            list(pool.map(one, paths))
    return time.perf_counter() - start, time.process_time() - cpu


def child_floor(ds: Path, out: Path, n_jobs: int) -> dict:
    paths = input_maps(ds)
    inflaters = {"zlib": lambda b: zlib.decompress(b, 31)}
    try:
        from isal import isal_zlib

        inflaters["isal"] = lambda b: isal_zlib.decompress(b, 31)
    except ImportError:
        pass
    wanted = os.environ.get("BENCH_FLOOR_LIBS")  # --floor-libs, passed to this child
    if wanted:
        inflaters = {k: v for k, v in inflaters.items() if k in wanted.split(",")}
    result = {}
    for name, inflate in inflaters.items():
        result[f"{name}_1"], result[f"{name}_cpu"] = _floor(paths, inflate, 1)
        result[f"{name}_{n_jobs}"], _ = _floor(paths, inflate, n_jobs)
    # bids-group's console script keeps glibc's heap warm (no page faults on every inflated
    # map): the floor must have that too, or the run would beat an easier floor
    from bids_group.memory import keep_heap_warm

    if keep_heap_warm():
        name, inflate = list(inflaters.items())[-1]
        name += "+warm heap"
        result[f"{name}_1"], result[f"{name}_cpu"] = _floor(paths, inflate, 1)
        result[f"{name}_{n_jobs}"], _ = _floor(paths, inflate, n_jobs)
    result["seconds"] = min(v for k, v in result.items() if not k.endswith("_cpu"))
    return result


def child_nilearn(ds: Path, out: Path, n_jobs: int) -> dict:
    import nibabel as nib
    import pandas as pd
    from nilearn.glm import threshold_stats_img
    from nilearn.glm.second_level import SecondLevelModel

    paths = input_maps(ds)
    start = time.perf_counter()
    imgs = []
    for path in paths:
        img = nib.load(path)
        imgs.append(nib.Nifti1Image(np.asarray(img.dataobj), img.affine))
    load = time.perf_counter() - start
    subjects = np.array([int(p.name[4:9]) for p in paths])
    age = 20.0 + subjects % 47
    design = pd.DataFrame(
        {
            "control": (subjects % 2 == 0).astype(float),
            "patient": (subjects % 2 == 1).astype(float),
            "age": age - age.mean(),
        }
    )
    start = time.perf_counter()
    model = SecondLevelModel(n_jobs=n_jobs).fit(imgs, design_matrix=design)
    results = model.compute_contrast([-1.0, 1.0, 0.0], output_type="all")
    threshold_stats_img(results["z_score"], alpha=0.05, height_control="fdr", two_sided=True)
    return {"seconds": time.perf_counter() - start, "load_seconds": load}


CHILDREN = {"index": child_index, "floor": child_floor, "nilearn": child_nilearn}


def run_child(kind: str, ds: Path, n_jobs: int) -> dict:
    argv = [sys.executable, __file__, "--child", kind, "--dataset", str(ds)]
    proc = subprocess.run(
        [*argv, "--n-jobs", str(n_jobs)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bids_group(
    ds: Path,
    n_jobs: int,
    *,
    block_isal: bool = False,
    extra: tuple[str, ...] = (),
    mem_budget: str | None = None,
    report: bool = True,
    work: Path | None = None,
) -> dict:
    """The console entry point in a subprocess; its peak RSS from wait4 (that process alone).

    ``block_isal``: make ``import isal`` fail in that process, so maps are inflated by zlib.
    ``extra``: more command-line options (e.g. permutations); ``mem_budget``: ``--mem-budget``
    (None: the default, which the run chooses from the memory available when it starts).
    ``report``: the HTML report and its figures, as a user's run writes them by default.
    ``work``: the work folder (``-w``; default: a new one), e.g. the folder of an earlier run,
    whose saved pybids index the run then reuses.
    """
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        model = Path(tmp) / "model.json"
        model.write_text(json.dumps(MODEL))
        code = "import sys; from bids_group.cli import console_main; console_main()"
        if block_isal:
            code = "import sys; sys.modules['isal'] = None; " + code
        argv = [sys.executable, "-c", code, str(ds), str(Path(tmp) / "out"), "group"]
        argv += ["-m", str(model), "--height-control", "fdr", "--alpha", "0.05"]
        argv += [] if report else ["--no-report"]
        argv += ["--n-jobs", str(n_jobs), "-w", str(work or Path(tmp) / "work"), *extra]
        if mem_budget:
            argv += ["--mem-budget", mem_budget]
        start = time.perf_counter()
        with open(Path(tmp) / "stderr.txt", "w+b") as err:  # a file: the log never blocks
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - start
            err.seek(0)
            stderr = err.read().decode(errors="replace")
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"bids-group failed ({proc.returncode}):\n{stderr[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    budget = re.search(r"memory budget: ([0-9.]+ [kMGT]?B)", stderr)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "budget": budget.group(1) if budget else "?",
        "store": "voxel-tiled store" in stderr,
        "streamed": "fit streamed from the decoded maps" in stderr,
        "index_reused": "Reused the pybids index" in stderr,
        "argv": argv[3:],
    }


# --- Main -----------------------------------------------------------------------------------------


def _available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def measure(n: int, args: argparse.Namespace, nilearn_mb_per_map: list[float]) -> dict:
    ds, label = build_dataset(n, args.pool, DATA_ROOT, tiny=args.tiny)
    row: dict = {"n": n, "label": label}
    if "index" not in args.skip:
        row["index"] = run_child("index", ds, args.n_jobs)
    if "floor" not in args.skip:
        row["floor"] = run_child("floor", ds, args.n_jobs)
    if "bids-group" not in args.skip:
        report = not args.no_report
        row["bids-group"] = run_bids_group(
            ds, args.n_jobs, mem_budget=args.mem_budget, report=report
        )
        if args.reuse_index:  # a second run in the work folder of a first: the saved index
            with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as work:
                run_bids_group(ds, args.n_jobs, mem_budget=args.mem_budget, report=report,
                               work=Path(work))  # fmt: skip
                row["bids-group-reused"] = run_bids_group(
                    ds, args.n_jobs, mem_budget=args.mem_budget, report=report, work=Path(work)
                )
            assert row["bids-group-reused"]["index_reused"], "the saved index was not reused"
        if args.compare_zlib:
            row["bids-group-zlib"] = run_bids_group(
                ds, args.n_jobs, block_isal=True, mem_budget=args.mem_budget, report=report
            )
    if args.n_perm and n in args.perm_sizes:
        extra = ("--permutation", *args.permutation, "--n-perm", str(args.n_perm), "--seed", "1")
        row["perm"] = run_bids_group(ds, args.n_jobs, extra=extra, mem_budget=args.mem_budget,
                                     report=not args.no_report)  # fmt: skip
        row["perm"]["what"] = f"{args.n_perm:,} {'/'.join(args.permutation)} permutations"
    if "nilearn" not in args.skip and n in args.nilearn_sizes:
        need = n * max(nilearn_mb_per_map, default=0.0)
        if need > 0.8 * _available_mb():
            row["nilearn"] = {"skipped": f"needs ~{need / 1024:.0f} GB, not available"}
        else:
            row["nilearn"] = run_child("nilearn", ds, args.n_jobs)
            nilearn_mb_per_map.append(row["nilearn"]["peak_rss_mb"] / n)
    return row


def report(row: dict, n_jobs: int) -> None:
    print(f"\nN = {row['label']}", flush=True)
    if "index" in row:
        r = row["index"]
        print(
            f"  pybids index + selection: {r['seconds']:7.2f} s ({r['n_maps']} maps, with the "
            f"import of pybids); with -w: {r['saving']:.2f} s saving the index, "
            f"{r['reused']:.2f} s reusing it"
        )
    if "floor" in row:
        r = row["floor"]
        for lib in ("zlib", "isal", "isal+warm heap"):
            if f"{lib}_1" in r:
                print(
                    f"  decode floor, {lib:4s}: 1 thread {r[f'{lib}_1']:7.2f} s "
                    f"(CPU {r[f'{lib}_cpu']:.2f} s), {n_jobs} threads {r[f'{lib}_{n_jobs}']:7.2f} s"
                )
    if "bids-group" in row:
        r = row["bids-group"]
        ratio = ""
        if "floor" in row:
            ratio = f", {r['seconds'] / row['floor']['seconds']:.2f}x the fastest floor"
        rss, cpu = r["peak_rss_mb"], r["cpu_seconds"]
        what = "whole run, no report" if "--no-report" in r["argv"] else "whole run + report"
        print(
            f"  bids-group {what}: {r['seconds']:7.2f} s (CPU {cpu:.1f} s), "
            f"peak RSS {rss:6.0f} MB" + ratio + _budget_text(r)
        )
    if "bids-group-reused" in row:
        r = row["bids-group-reused"]
        ratio = ""
        if "floor" in row:
            ratio = f", {r['seconds'] / row['floor']['seconds']:.2f}x the fastest floor"
        print(
            f"  bids-group again with the same -w (pybids index reused): {r['seconds']:7.2f} s "
            f"(CPU {r['cpu_seconds']:.1f} s), peak RSS {r['peak_rss_mb']:6.0f} MB" + ratio
        )
    if "perm" in row:
        r = row["perm"]
        print(
            f"  the same + {r['what']}: {r['seconds']:7.2f} s (CPU {r['cpu_seconds']:.1f} s), "
            f"peak RSS {r['peak_rss_mb']:6.0f} MB" + _budget_text(r)
        )
    if "bids-group-zlib" in row:
        r = row["bids-group-zlib"]
        rss, cpu = r["peak_rss_mb"], r["cpu_seconds"]
        print(
            f"  the same, isal blocked:   {r['seconds']:7.2f} s (CPU {cpu:.1f} s), "
            f"peak RSS {rss:6.0f} MB"
        )
    if "nilearn" in row:
        r = row["nilearn"]
        if "skipped" in r:
            print(f"  nilearn: skipped ({r['skipped']})")
        else:
            print(
                f"  nilearn SecondLevelModel: {r['seconds']:7.2f} s (+ {r['load_seconds']:.1f} s "
                f"loading the images), peak RSS {r['peak_rss_mb']:6.0f} MB"
            )


def _budget_text(r: dict) -> str:
    where = "tiled store" if r["store"] else "data in memory"
    if r.get("streamed"):
        where = "OLS fit streamed from the decoded maps (no store)"
    return f"; budget {r['budget']}, {where}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200,1000,2000,10000")
    parser.add_argument("--nilearn-sizes", default="200,1000")
    parser.add_argument("--pool", type=int, default=200, help="distinct maps (even)")
    parser.add_argument("--n-jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tiny", action="store_true", help="distinct 8x8x8 maps")
    parser.add_argument(
        "--compare-zlib", action="store_true", help="run bids-group again with isal blocked"
    )
    parser.add_argument(
        "--reuse-index",
        action="store_true",
        help="also run bids-group twice with one -w: the second reuses the saved pybids index",
    )
    parser.add_argument("--skip", default="", help="comma list of index,floor,bids-group,nilearn")
    parser.add_argument(
        "--n-perm", type=int, default=0, help="also run with this many permutations (0: no)"
    )
    parser.add_argument(
        "--permutation", default="voxel", help="comma list of voxel,cluster,tfce (with --n-perm)"
    )
    parser.add_argument("--perm-sizes", default="2000", help="sizes of the permutation runs")
    parser.add_argument("--mem-budget", help="--mem-budget of the runs (default: bids-group's)")
    parser.add_argument(
        "--floor-libs", default="zlib,isal", help="inflaters of the decode floor (comma list)"
    )
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="run bids-group without its report (not the default)",
    )
    parser.add_argument("--child", choices=sorted(CHILDREN))
    parser.add_argument("--dataset", type=Path)
    args = parser.parse_args()
    if args.child:
        result = CHILDREN[args.child](args.dataset, Path(), args.n_jobs)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    args.skip = set(filter(None, args.skip.split(",")))
    os.environ["BENCH_FLOOR_LIBS"] = args.floor_libs
    args.nilearn_sizes = {int(s) for s in args.nilearn_sizes.split(",") if s}
    args.perm_sizes = {int(s) for s in args.perm_sizes.split(",") if s}
    args.permutation = [m for m in args.permutation.split(",") if m]
    if args.pool < 2 or args.pool % 2:
        parser.error("--pool must be even (the links keep each map's group)")
    load = os.getloadavg()[0]
    print(f"n_jobs={args.n_jobs}, {os.cpu_count()} CPUs, load average {load:.1f}", flush=True)
    nilearn_mb_per_map: list[float] = []
    for n in sorted(int(s) for s in args.sizes.split(",")):
        report(measure(n, args, nilearn_mb_per_map), args.n_jobs)


if __name__ == "__main__":
    main()
