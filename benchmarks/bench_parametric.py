"""Whole parametric pipeline, bids-group vs nilearn, side by side in one run.

Builds (or reuses) a BIDS derivatives dataset of 40 subjects on the 2 mm MNI grid (nilearn's
MNI152 brain mask at 2 mm: ~235,000 in-mask voxels), then times, each in a fresh child process
so that peak memory is its own:

* bids-group: ``bids-group DATA OUT group --height-control fdr --alpha 0.05`` (load, fit, all maps,
  FDR + cluster table, writing, design figure, HTML report), in-process through
  ``bids_group.cli.main``; and the same with ``--no-report``;
* nilearn: ``SecondLevelModel().fit`` + ``compute_contrast(output_type="all")`` +
  ``threshold_stats_img(height_control="fdr")`` + ``get_clusters_table`` + saving every map;
* the floor: gzip decompression of the 40 inputs (1 thread and N threads).

Run: ``python benchmarks/bench_parametric.py [--subjects 40] [--n-jobs 2] [--repeats 1]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA_ROOT = HERE / "_data"


def build_dataset(n_subjects: int, root: Path) -> Path:
    """40 subjects of smooth noise + a true effect on the 2 mm MNI grid, zero outside the brain."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_brain_mask
    from scipy.ndimage import gaussian_filter

    ds = root / f"mni2mm-{n_subjects}subj"
    if (ds / "participants.tsv").exists():
        return ds
    tmp = ds.with_name(ds.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mask_img = load_mni152_brain_mask(resolution=2)
    mask = np.asarray(mask_img.dataobj) > 0
    rng = np.random.default_rng(0)
    ii, jj, kk = np.indices(mask.shape)
    centre = np.array(mask.shape) / 2
    blob = np.exp(
        -(((ii - centre[0] - 12) ** 2 + (jj - centre[1]) ** 2 + (kk - centre[2]) ** 2) / 60.0)
    )
    (tmp / "dataset_description.json").write_text(
        json.dumps(
            {
                "Name": "bench",
                "BIDSVersion": "1.10.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "bench_parametric.py"}],
            }
        )
    )
    rows = ["participant_id\tage\tgroup"]
    for s in range(1, n_subjects + 1):
        noise = gaussian_filter(rng.standard_normal(mask.shape), sigma=1.5)
        noise /= noise[mask].std()
        vol = (0.8 * blob + noise).astype(np.float32) * mask
        sub = f"sub-{s:02d}"
        out = tmp / sub / "func"
        out.mkdir(parents=True)
        name = (
            f"{sub}_task-bench_space-MNI152NLin2009cAsym_contrast-task_stat-effect_statmap.nii.gz"
        )
        nib.Nifti1Image(vol, mask_img.affine).to_filename(out / name)
        rows.append(f"{sub}\t{20 + s % 30}\t{'patient' if s % 2 else 'control'}")
    (tmp / "participants.tsv").write_text("\n".join(rows) + "\n")
    tmp.rename(ds)
    return ds


def input_maps(ds: Path) -> list[Path]:
    return sorted(ds.glob("sub-*/func/*_statmap.nii.gz"))


def child_bids_group(ds: Path, out: Path, n_jobs: int, *extra: str) -> dict:
    from bids_group.cli import main

    start = time.perf_counter()
    argv = [str(ds), str(out), "group", "--height-control", "fdr", "--alpha", "0.05"]
    code = main([*argv, "--n-jobs", str(n_jobs), "-q", *extra])
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"bids-group failed with exit code {code}")
    return {"seconds": seconds}


def child_nilearn(ds: Path, out: Path, n_jobs: int) -> dict:
    import pandas as pd
    from nilearn.glm import threshold_stats_img
    from nilearn.glm.second_level import SecondLevelModel
    from nilearn.reporting import get_clusters_table

    maps = [str(p) for p in input_maps(ds)]
    start = time.perf_counter()
    design = pd.DataFrame({"intercept": np.ones(len(maps))})
    model = SecondLevelModel(n_jobs=n_jobs).fit(maps, design_matrix=design)
    results = model.compute_contrast("intercept", output_type="all")
    thresholded, threshold = threshold_stats_img(
        results["z_score"], alpha=0.05, height_control="fdr", two_sided=True
    )
    table = get_clusters_table(thresholded, stat_threshold=threshold, two_sided=True)
    out.mkdir(parents=True)
    for name, img in results.items():
        img.to_filename(out / f"{name}.nii.gz")
    thresholded.to_filename(out / "z_fdr.nii.gz")
    model.masker_.mask_img_.to_filename(out / "mask.nii.gz")
    table.to_csv(out / "clusters.tsv", sep="\t", index=False)
    return {"seconds": time.perf_counter() - start}


def child_floor(ds: Path, out: Path, n_jobs: int) -> dict:
    paths = input_maps(ds)

    def inflate(path: Path) -> int:
        return len(zlib.decompress(path.read_bytes(), 31))

    start = time.perf_counter()
    for p in paths:
        inflate(p)
    serial = time.perf_counter() - start
    start = time.perf_counter()
    with ThreadPoolExecutor(n_jobs) as pool:
        list(pool.map(inflate, paths))
    return {"seconds": time.perf_counter() - start, "serial_seconds": serial}


def child_bids_group_no_report(ds: Path, out: Path, n_jobs: int) -> dict:
    return child_bids_group(ds, out, n_jobs, "--no-report")


CHILDREN = {
    "bids-group": child_bids_group,
    "bids-group-no-report": child_bids_group_no_report,
    "nilearn": child_nilearn,
    "floor": child_floor,
}


def run_child(kind: str, ds: Path, n_jobs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                kind,
                "--dataset",
                str(ds),
                "--out",
                str(Path(tmp) / "out"),
                "--n-jobs",
                str(n_jobs),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", choices=sorted(CHILDREN))
    parser.add_argument("--dataset", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        result = CHILDREN[args.child](args.dataset, args.out, args.n_jobs)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    ds = build_dataset(args.subjects, DATA_ROOT)
    print(f"dataset: {ds} ({len(input_maps(ds))} maps), n_jobs={args.n_jobs}", flush=True)
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for kind in ("floor", "bids-group", "bids-group-no-report", "nilearn"):
            r = run_child(kind, ds, args.n_jobs)
            if kind not in best or r["seconds"] < best[kind]["seconds"]:
                best[kind] = r
    for kind, r in best.items():
        extra = f" (1 thread: {r['serial_seconds']:.2f} s)" if "serial_seconds" in r else ""
        print(f"{kind:>20}: {r['seconds']:7.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB{extra}")
    bg, nl, fl = best["bids-group"], best["nilearn"], best["floor"]
    print(f"time ratio bids-group / nilearn: {bg['seconds'] / nl['seconds']:.3f} (target <= 0.5)")
    print(
        "memory ratio bids-group / nilearn: "
        f"{bg['peak_rss_mb'] / nl['peak_rss_mb']:.3f} (target <= 1)"
    )
    print(f"bids-group / decompression floor: {bg['seconds'] / fl['seconds']:.2f}x")
    nr = best["bids-group-no-report"]
    print(
        f"without the HTML report: {nr['seconds']:.2f} s, ratio to nilearn "
        f"{nr['seconds'] / nl['seconds']:.3f}, report cost {bg['seconds'] - nr['seconds']:.2f} s"
    )


if __name__ == "__main__":
    main()
