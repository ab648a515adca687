"""Per-voxel missing data (``--min-coverage``) through the real CLI.

Oracles: numpy least squares on the maps present at each sampled voxel, with scipy's t and
normal distributions for p and z; nilearn's SecondLevelModel on the voxels every map covers.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from clicheck import check_failure, run_ok
from conftest import make_bids_derivatives
from scipy import stats

from bids_group.coverage import min_maps
from bids_group.errors import UsageError

MODEL = """
Name: cov
BIDSModelVersion: 1.0.0
Nodes:
  - Level: Dataset
    Name: ageEffect
    GroupBy: [contrast]
    Model: {Type: glm, X: [1, age]}
    Contrasts:
      - {Name: age, ConditionList: [age], Weights: [1], Test: t}
      - {Name: mean, ConditionList: [1], Weights: [1], Test: t}
"""


@pytest.fixture(scope="module")
def holes(tmp_path_factory) -> tuple[Path, Path]:
    """10 subjects on a 6 x 7 x 8 grid; sub-01 has no data at x = 0 (zeros), sub-02 none at
    x = 5 (zeros), sub-03 none at y = 0 (NaN), sub-04 none at x = 0 and y = 6 (zeros)."""
    root = tmp_path_factory.mktemp("coverage")
    ds = make_bids_derivatives(root / "ds", n_subjects=10, seed=3)
    holes = {
        "01": (np.s_[0, :, :], 0.0),
        "02": (np.s_[5, :, :], 0.0),
        "03": (np.s_[:, 0, :], np.nan),
        "04": (np.s_[0, 6, :], 0.0),
    }
    age = np.array([20 + 3 * i for i in range(10)], dtype=float)
    for i, path in enumerate(sorted(ds.glob("sub-*/func/*stat-effect*"))):
        img = nib.load(path)
        values = np.asarray(img.dataobj, dtype=np.float32) + 0.05 * (age[i] - age.mean())
        sub = path.name[4:6]
        if sub in holes:
            where, fill = holes[sub]
            values[where] = fill
        nib.Nifti1Image(values, img.affine).to_filename(path)
    model = root / "model.yaml"
    model.write_text(MODEL)
    return ds, model


def _volumes(ds: Path) -> np.ndarray:
    paths = sorted(ds.glob("sub-*/func/*stat-effect*"))
    return np.stack([np.asarray(nib.load(p).dataobj, dtype=np.float64) for p in paths])


def _map(summary: dict, ending: str) -> np.ndarray:
    found = [p for p in summary["files"] if p.endswith(ending)]
    assert len(found) == 1, (ending, found)
    return np.asarray(nib.load(found[0]).dataobj, dtype=np.float64)


def test_voxels_fitted_on_the_maps_present(holes, tmp_path):
    ds, model = holes
    summary, _ = run_ok(ds, tmp_path / "out", "--model", model, "--min-coverage", "0.8",
                          "--height-control", "fdr")  # fmt: skip
    y = _volumes(ds)
    present = np.isfinite(y) & (y != 0)
    count = present.sum(axis=0)
    mask = _map(summary, "_mask.nii.gz") > 0
    np.testing.assert_array_equal(mask, count >= 8)  # 0.8 of 10 maps
    assert (count[mask] < 10).sum() > 20  # the test exercises missing maps
    nmaps = _map(summary, "_stat-nmaps_statmap.nii.gz")
    np.testing.assert_array_equal(nmaps[mask], count[mask])
    dof = _map(summary, "_stat-dof_statmap.nii.gz")
    np.testing.assert_array_equal(dof[mask], count[mask] - 2)
    age = np.array([20 + 3 * i for i in range(10)], dtype=float)
    x = np.column_stack([np.ones(10), age])
    t_map = _map(summary, "contrast-facesAge_stat-t_statmap.nii.gz")
    z_map = _map(summary, "contrast-facesAge_stat-z_statmap.nii.gz")
    effect = _map(summary, "contrast-facesAge_stat-effect_statmap.nii.gz")
    rsq = _map(summary, "_stat-rsquared_statmap.nii.gz")
    for idx in zip(*np.nonzero(mask), strict=True):
        rows = present[(slice(None), *idx)]
        yv, xv = y[(rows, *idx)], x[rows]
        beta, rss = np.linalg.lstsq(xv, yv, rcond=None)[:2]
        k = rows.sum()
        sigma2 = rss[0] / (k - 2)
        se = np.sqrt(sigma2 * np.linalg.inv(xv.T @ xv)[1, 1])
        t = beta[1] / se
        assert effect[idx] == pytest.approx(beta[1], rel=1e-5, abs=1e-6)
        assert t_map[idx] == pytest.approx(t, rel=1e-5, abs=1e-5)
        z = stats.norm.isf(stats.t.sf(t, k - 2))
        assert z_map[idx] == pytest.approx(z, rel=1e-5, abs=1e-5)
        tss = np.sum((yv - yv.mean()) ** 2)
        assert rsq[idx] == pytest.approx(1 - rss[0] / tss, rel=1e-5, abs=1e-6)


def test_full_coverage_voxels_equal_nilearn(holes, tmp_path):
    """Where every map has data the per-voxel fit is plain OLS: nilearn's z (1e-4)."""
    from nilearn.glm.second_level import SecondLevelModel

    ds, model = holes
    summary, _ = run_ok(ds, tmp_path / "out", "--model", model, "--min-coverage", "8",
                        "--no-report")  # fmt: skip
    paths = sorted(ds.glob("sub-*/func/*stat-effect*"))
    y = _volumes(ds)
    full = (np.isfinite(y) & (y != 0)).all(axis=0)
    affine = nib.load(paths[0]).affine
    age = np.array([20 + 3 * i for i in range(10)], dtype=float)
    import pandas as pd

    design = pd.DataFrame({"intercept": np.ones(10), "age": age})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slm = SecondLevelModel(mask_img=nib.Nifti1Image(full.astype(np.uint8), affine))
        slm.fit([str(p) for p in paths], design_matrix=design)
        theirs = np.asarray(slm.compute_contrast("age", output_type="z_score").dataobj)
    ours = _map(summary, "contrast-facesAge_stat-z_statmap.nii.gz")
    np.testing.assert_allclose(ours[full], theirs[full], atol=1e-4)


def test_default_is_the_intersection(holes, tmp_path):
    ds, model = holes
    summary, _ = run_ok(ds, tmp_path / "out", "--model", model, "--no-report")
    y = _volumes(ds)
    full = (np.isfinite(y) & (y != 0)).all(axis=0)
    np.testing.assert_array_equal(_map(summary, "_mask.nii.gz") > 0, full)
    assert not [p for p in summary["files"] if "stat-nmaps" in p]


def test_a_group_absent_at_a_voxel_is_dropped_with_a_warning(tmp_path):
    """Two group means: where every patient map is missing the design is rank deficient."""
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=8, seed=4)
    for path in sorted(ds.glob("sub-*/func/*stat-effect*"))[1::2]:  # the patients
        img = nib.load(path)
        values = np.asarray(img.dataobj, dtype=np.float32)
        values[0, 0, :] = 0.0
        nib.Nifti1Image(values, img.affine).to_filename(path)
    model = tmp_path / "m.yaml"
    model.write_text(MODEL.replace("X: [1, age]", "X: [group.control, group.patient]")
                     .replace("Name: cov", "Name: cov\n").replace(
                         "    Contrasts:\n      - {Name: age, ConditionList: [age], Weights: [1], "
                         "Test: t}\n      - {Name: mean, ConditionList: [1], Weights: [1], Test: "
                         "t}\n",
                         "    Contrasts:\n      - {Name: diff, ConditionList: [group.patient, "
                         "group.control], Weights: [1, -1], Test: t}\n")
                     .replace("    Model:", "    Transformations:\n      Transformer: "
                              "pybids-transforms-v1\n      Instructions:\n        - {Name: "
                              "Factor, Input: [group]}\n    Model:"))  # fmt: skip
    summary, err = run_ok(ds, tmp_path / "out", "--model", model, "--min-coverage", "0.5",
                          "--no-report")  # fmt: skip
    assert "rank deficient" in err
    mask = _map(summary, "_mask.nii.gz") > 0
    assert not mask[0, 0, :].any() and mask.sum() == 6 * 7 * 8 - 8


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--min-coverage", "0.9", "--permutation", "voxel"), "permutation"),
        (("--min-coverage", "0.9", "--smoothing-fwhm", "4"), "--smoothing-fwhm"),
        (("--min-coverage", "2.5"), "whole number"),
        (("--min-coverage", "11"), "has 10"),
        (("--min-coverage", "2"), "at least 3 maps"),
        (("--min-coverage", "0"), "--min-coverage"),
    ],
)
def test_bad_coverage_settings(holes, capsys, tmp_path, args, needle):
    ds, model = holes
    check_failure(capsys, [ds, tmp_path / "out", "group", "--model", model, *args],
                  tmp_path / "out", 64, needle)  # fmt: skip


def test_min_maps_rounding_and_limits():
    assert min_maps(0.75, 10, 1, "m") == 8  # ceil
    assert min_maps(0.7, 10, 1, "m") == 7  # 0.7 * 10 is 7.000000000000001 in floating point
    with pytest.raises(UsageError, match="whole number"):
        min_maps(7.5, 10, 1, "m")
    assert json.dumps(min_maps(10, 10, 1, "m")) == "10"
