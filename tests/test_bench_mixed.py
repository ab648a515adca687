"""The layout and command of ``benchmarks/bench_mixed.py --part end-to-end`` work with the real CLI.

The benchmark's speed figures mean something only if the command it times runs the analysis it
claims. Data: ``../shared/data/real/pain21`` (21 studies, whole brain; skipped when absent). The
benchmark's own layout builder and command line, run in-process through the real CLI (no timing).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from clicheck import run_ok

ROOT = Path(__file__).resolve().parents[1]
PAIN21 = ROOT.parent / "shared" / "data" / "real" / "pain21"
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_mixed  # noqa: E402


def _maps(summary: dict, ending: str) -> np.ndarray:
    found = [Path(p) for p in summary["files"] if p.endswith(ending)]
    assert len(found) == 1, (ending, found)
    return np.asarray(nib.load(found[0]).dataobj, dtype=np.float64)


@pytest.mark.slow
def test_benchmark_layout_runs_the_mixed_model_on_all_21_studies(tmp_path):
    if not PAIN21.is_dir():
        pytest.skip(f"{PAIN21} is absent")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in PAIN21.iterdir())
    ds = bench_mixed.build_layout(PAIN21, tmp_path / "ds")
    out = tmp_path / "out"
    command = bench_mixed.bids_group_command(ds, out, PAIN21, "fe", "none", 1)
    options = command[command.index("group") + 1 :]
    options.remove("-q")  # run_ok adds it
    summary, _ = run_ok(ds, out, *options)

    inside = np.asarray(nib.load(PAIN21 / "mask.nii.gz").dataobj) > 0
    effects, variances = bench_mixed.load_pain21(PAIN21)
    y, v = effects.astype(np.float64), variances.astype(np.float64)
    # Oracle: the inverse-variance weighted mean at voxels where all 21 variances are positive;
    # it needs every study's effect map paired with its own variance map (subject order).
    full = (v > 0).all(axis=0)
    w = 1.0 / v[:, full]
    expected = (w * y[:, full]).sum(axis=0) / w.sum(axis=0)
    effect = _maps(summary, "_stat-effect_statmap.nii.gz")[inside]
    np.testing.assert_allclose(effect[full], expected, rtol=1e-5, atol=1e-6)
    dof = _maps(summary, "_stat-dof_statmap.nii.gz")[inside]
    np.testing.assert_array_equal(dof[full], 20.0)
    assert np.isfinite(_maps(summary, "_stat-z_statmap.nii.gz")[inside]).all()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in PAIN21.iterdir()) == before
