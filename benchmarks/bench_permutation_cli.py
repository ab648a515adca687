"""Permutation inference through the whole command line vs nilearn, side by side in one run.

The same 40-subject dataset as ``bench_parametric.py`` (2 mm MNI grid, ~235,000 voxels,
built once in ``benchmarks/_data/``). For each method (voxel, cluster size + mass, TFCE), in
fresh child processes:

* bids-group: ``bids-group DATA OUT group --permutation <method> --n-perm N --n-jobs J
  --no-report -q --one-sided`` (one-sample test: sign flips), end to end: reading, fit, the
  permutations, every map, table and null distribution written;
* nilearn: ``non_parametric_inference(maps, design_matrix=intercept, n_perm=M, n_jobs=J,
  two_sided_test=False, threshold=0.001 | tfce=True)``; M is small where nilearn takes hours.

One-sided, as nilearn's default; ``--two-sided`` runs both tools two-sided.

Throughput (permutations per second) is marginal and measured the same way for both tools:
(N - 1) / (time with N permutations - time with 1 permutation), per method, so that each tool's
fixed cost (reading, fitting, its permutation set-up, writing) is left out and the ratio is that
of the per-permutation costs. The table also gives the end-to-end ratio for 10,000 permutations
(nilearn's extrapolated from its fixed cost and rate).

Run: ``python benchmarks/bench_permutation_cli.py`` (10,000 permutations per method for
bids-group: the absolute targets; ~5 min on 2 cores plus nilearn's share), or ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_parametric import DATA_ROOT, build_dataset, input_maps  # noqa: E402

METHODS = {
    # name: (bids-group options, nilearn keyword arguments)
    "voxel": (["--permutation", "voxel"], {}),
    "cluster": (["--permutation", "cluster", "--cluster-forming-p", "0.001"], {"threshold": 0.001}),
    "tfce": (["--permutation", "tfce"], {"tfce": True}),
}


def child_bids_group(
    ds: Path, n_jobs: int, n_perm: int, method: str | None, two_sided: bool
) -> dict:
    from bids_group.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        argv = [str(ds), str(Path(tmp) / "out"), "group", "--n-jobs", str(n_jobs), "-q"]
        argv += ["--no-report", "--two-sided" if two_sided else "--one-sided"]
        if method is not None:
            argv += [*METHODS[method][0], "--n-perm", str(n_perm)]
        start = time.perf_counter()
        code = main(argv)
        seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"bids-group failed with exit code {code}")
    return {"seconds": seconds}


def child_nilearn(ds: Path, n_jobs: int, n_perm: int, method: str, two_sided: bool) -> dict:
    import pandas as pd
    from nilearn.glm.second_level import non_parametric_inference

    maps = [str(p) for p in input_maps(ds)]
    design = pd.DataFrame({"intercept": np.ones(len(maps))})
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        non_parametric_inference(
            maps,
            design_matrix=design,
            n_perm=n_perm,
            n_jobs=n_jobs,
            two_sided_test=two_sided,
            random_state=0,
            **METHODS[method][1],
        )
    return {"seconds": time.perf_counter() - start}


CHILDREN = {"bids-group": child_bids_group, "nilearn": child_nilearn}


def run_child(
    tool: str, ds: Path, n_jobs: int, n_perm: int, method: str | None, two_sided: bool
) -> float:
    command = [
        sys.executable,
        __file__,
        "--child",
        tool,
        "--dataset",
        str(ds),
        "--n-jobs",
        str(n_jobs),
        "--child-n-perm",
        str(n_perm),
        "--child-method",
        method or "",
        *(["--two-sided"] if two_sided else []),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{tool} child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--n-perm", type=int, default=10_000, help="bids-group, every method")
    parser.add_argument("--nilearn-voxel", type=int, default=1000)
    parser.add_argument("--nilearn-cluster", type=int, default=100)
    parser.add_argument("--nilearn-tfce", type=int, default=5)
    parser.add_argument("--methods", default="voxel,cluster,tfce")
    parser.add_argument("--quick", action="store_true", help="2,000 permutations (500 TFCE)")
    parser.add_argument("--two-sided", action="store_true", help="both tools two-sided")
    parser.add_argument("--child", choices=sorted(CHILDREN))
    parser.add_argument("--dataset", type=Path)
    parser.add_argument("--child-n-perm", type=int)
    parser.add_argument("--child-method", default="")
    args = parser.parse_args()
    if args.child:
        method = args.child_method or None
        result = CHILDREN[args.child](
            args.dataset, args.n_jobs, args.child_n_perm, method, args.two_sided
        )
        print(json.dumps(result))
        return
    ds = build_dataset(args.subjects, DATA_ROOT)
    n_voxels_note = f"{args.subjects} subjects, 2 mm MNI grid, n_jobs={args.n_jobs}"
    print(
        f"dataset {ds} ({n_voxels_note}); "
        f"{'two' if args.two_sided else 'one'}-sided one-sample sign flips",
        flush=True,
    )
    sided = args.two_sided
    nilearn_counts = {
        "voxel": args.nilearn_voxel,
        "cluster": args.nilearn_cluster,
        "tfce": args.nilearn_tfce,
    }
    print(
        "| method | bids-group: fixed cost; permutations, end-to-end time, perm/s | nilearn: fixed "
        "cost; permutations, time, perm/s | throughput ratio | 10,000 end to end: bids-group, "
        "nilearn (extrapolated), ratio |"
    )
    print("|---|---|---|---|---|")
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        n_ours = args.n_perm if not args.quick else (500 if method == "tfce" else 2000)
        run_child("bids-group", ds, args.n_jobs, 1, method, sided)  # warm page and numba caches
        base_ours = run_child("bids-group", ds, args.n_jobs, 1, method, sided)
        t_ours = run_child("bids-group", ds, args.n_jobs, n_ours, method, sided)
        rate_ours = (n_ours - 1) / max(t_ours - base_ours, 1e-9)
        n_nl = nilearn_counts[method]
        base_nl = run_child("nilearn", ds, args.n_jobs, 1, method, sided)
        t_nl = run_child("nilearn", ds, args.n_jobs, n_nl, method, sided)
        rate_nl = (n_nl - 1) / max(t_nl - base_nl, 1e-9)
        ours_10k = base_ours + 9_999 / rate_ours
        nilearn_10k = base_nl + 9_999 / rate_nl
        print(
            f"| {method} | {base_ours:.1f} s; {n_ours:,}, {t_ours:.1f} s, {rate_ours:,.1f}/s | "
            f"{base_nl:.1f} s; {n_nl}, {t_nl:.1f} s, {rate_nl:.3g}/s | "
            f"{rate_ours / rate_nl:,.0f}x | {ours_10k:.1f} s, {nilearn_10k:,.0f} s, "
            f"{nilearn_10k / ours_10k:,.0f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
