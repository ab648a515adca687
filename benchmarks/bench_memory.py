"""Peak memory with and without the voxel-tiled store (``--mem-budget``), one fresh process each.

Builds (or reuses) 40 distinct maps on the 2 mm MNI grid (``bench_parametric.build_dataset``:
235,375 in-mask voxels), then a dataset of N subjects whose maps are symbolic links to that
pool (subject ``s`` uses map ``s % 40``; labelled as such: the values repeat, the sizes and
the work do not), with a two-group + age design. Runs the whole parametric pipeline
(``--height-control fdr --no-report``) under ``/usr/bin/time -v`` with the default budget and
with each ``--budget`` given, and prints wall time, peak RSS and whether the store was used.

Run: ``python benchmarks/bench_memory.py --subjects 500 --budget 200MB [--permutation voxel]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_parametric import DATA_ROOT, build_dataset  # noqa: E402

SPACE = "MNI152NLin2009cAsym"
MODEL = """\
Name: groups age
BIDSModelVersion: "1.0.0"
Nodes:
  - Level: Dataset
    Name: groups
    GroupBy: [contrast]
    Transformations:
      Transformer: pybids-transforms-v1
      Instructions:
        - Name: Factor
          Input: [group]
        - Name: Demean
          Input: [age]
    Model:
      Type: glm
      X: [group.control, group.patient, age]
    Contrasts:
      - Name: patientGtControl
        ConditionList: [group.patient, group.control]
        Weights: [1, -1]
        Test: t
"""


def linked_dataset(n_subjects: int, pool: Path) -> Path:
    """N subjects whose maps link to the pool's 40 maps (distinct subject ids)."""
    ds = DATA_ROOT / f"mni2mm-links{n_subjects}-pool{pool.name}"
    if (ds / "participants.tsv").exists():
        return ds
    maps = sorted(pool.rglob("*_statmap.nii.gz"))
    shutil.rmtree(ds, ignore_errors=True)
    ds.mkdir(parents=True)
    shutil.copy(pool / "dataset_description.json", ds / "dataset_description.json")
    rows = ["participant_id\tage\tgroup"]
    for s in range(n_subjects):
        sub = f"sub-{s + 1:05d}"
        folder = ds / sub / "func"
        folder.mkdir(parents=True)
        name = f"{sub}_task-bench_space-{SPACE}_contrast-task_stat-effect_statmap.nii.gz"
        os.symlink(maps[s % len(maps)], folder / name)
        rows.append(f"{sub}\t{20 + s % 47}\t{'patient' if s % 2 else 'control'}")
    (ds / "participants.tsv").write_text("\n".join(rows) + "\n")
    return ds


def measure(ds: Path, model: Path, budget: str | None, extra: list[str]) -> dict[str, str]:
    with tempfile.TemporaryDirectory(dir=DATA_ROOT) as tmp:
        command = [
            "/usr/bin/time", "-v", sys.executable, "-m", "bids_group", str(ds),
            str(Path(tmp) / "out"), "group", "--model", str(model), "--height-control", "fdr",
            "--no-report", "-w", str(Path(tmp) / "work"), *extra,
        ]  # fmt: skip
        if budget:
            command += ["--mem-budget", budget]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr)
    chosen = re.search(r"memory budget: ([^\n]*)", proc.stderr)
    return {
        "budget": chosen.group(1) if chosen else "?",
        "store": "yes" if "voxel-tiled store" in proc.stderr else "no",
        "wall": wall.group(1) if wall else "?",
        "peak_rss_mb": f"{int(rss.group(1)) / 1024:.0f}" if rss else "?",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=500)
    parser.add_argument("--budget", action="append", default=[], help="e.g. 200MB (repeat)")
    parser.add_argument("--permutation", nargs="*", default=[], help="methods, e.g. voxel")
    parser.add_argument("--n-perm", type=int, default=100)
    args = parser.parse_args()
    pool = build_dataset(40, DATA_ROOT)
    ds = linked_dataset(args.subjects, pool)
    model = DATA_ROOT / "bench_memory_model.yaml"
    model.write_text(MODEL)
    extra = ["--permutation", *args.permutation, "--n-perm", str(args.n_perm)] if (
        args.permutation
    ) else []  # fmt: skip
    print(f"{args.subjects} maps (links to 40 distinct maps), 235,375 voxels, {extra or 'FDR'}")
    print("| budget | tiled store | wall (h:mm:ss) | peak RSS (MB) |")
    print("|---|---|---|---|")
    for budget in [None, *args.budget]:
        row = measure(ds, model, budget, extra)
        print(f"| {row['budget']} | {row['store']} | {row['wall']} | {row['peak_rss_mb']} |")


if __name__ == "__main__":
    main()
