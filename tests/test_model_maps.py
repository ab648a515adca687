"""Model-level maps (R^2, residual variance) and, on request, residuals and fitted values.

Oracles: nilearn 0.14's SecondLevelModel (``r_square_``, ``residuals_``, ``predicted_``) fitted
on the same files, mask and design; and numpy's least squares for what nilearn does not give
(the residual variance, and the uncentred R^2 of a design without a constant).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from clicheck import run_ok
from conftest import make_bids_derivatives

CELL_MEANS = """
Name: cellMeans
BIDSModelVersion: 1.0.0
Nodes:
  - Level: Dataset
    Name: groups
    GroupBy: [contrast]
    Transformations:
      Transformer: pybids-transforms-v1
      Instructions:
        - Name: Factor
          Input: [group]
    Model: {Type: glm, X: [group.patient, group.control, age]}
    Contrasts:
      - Name: patientGtControl
        ConditionList: [group.patient, group.control]
        Weights: [1, -1]
        Test: t
"""
NO_CONSTANT = CELL_MEANS.replace("X: [group.patient, group.control, age]", "X: [age]").replace(
    "ConditionList: [group.patient, group.control]\n        Weights: [1, -1]",
    "ConditionList: [age]\n        Weights: [1]",
)


def _run(bids: Path, out: Path, *args: str) -> dict:
    return run_ok(bids, out, "--no-report", *args)[0]


def _one(summary: dict, ending: str) -> Path:
    found = [Path(p) for p in summary["files"] if p.endswith(ending)]
    assert len(found) == 1, (ending, found)
    return found[0]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A two-group + age model run with --write-residuals, and what nilearn needs to refit."""
    base = tmp_path_factory.mktemp("model_maps")
    ds = make_bids_derivatives(base / "ds", n_subjects=12, shape=(7, 8, 9), seed=3)
    model = base / "model.yaml"
    model.write_text(CELL_MEANS)
    summary = _run(ds, base / "out", "--model", str(model), "--write-residuals")
    design = pd.read_csv(_one(summary, "_design.tsv"), sep="\t")
    inputs = [ds / p for p in design["path"]]
    inputs = [next(ds.rglob(p.name)) for p in inputs]
    mask = _one(summary, "_mask.nii.gz")
    return summary, design, inputs, mask


def _in_mask(path: Path, mask: Path) -> np.ndarray:
    data = np.asarray(nib.load(path).dataobj, dtype=np.float64)
    inside = np.asarray(nib.load(mask).dataobj) > 0
    return data[inside] if data.ndim == 3 else data[inside].T  # 4-D: (n_maps, n_voxels)


def test_r_squared_residuals_and_predicted_equal_nilearn(fitted):
    from nilearn.glm.second_level import SecondLevelModel

    summary, design, inputs, mask = fitted
    x = design[["group.patient", "group.control", "age"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SecondLevelModel(mask_img=str(mask), minimize_memory=False)
        model.fit([str(p) for p in inputs], design_matrix=x)
        model.compute_contrast([1, -1, 0])  # nilearn keeps its fit results only after this
        r2 = model.masker_.transform(model.r_square_).ravel()
        residuals = model.masker_.transform(model.residuals_)
        predicted = model.masker_.transform(model.predicted_)
    ours_r2 = _in_mask(_one(summary, "_stat-rsquared_statmap.nii.gz"), mask)
    np.testing.assert_allclose(ours_r2, r2, atol=1e-6)
    assert 0 < ours_r2.min() and ours_r2.max() < 1
    ours_res = _in_mask(_one(summary, "_stat-errorts_statmap.nii.gz"), mask)
    ours_pred = _in_mask(_one(summary, "_stat-predicted_statmap.nii.gz"), mask)
    assert ours_res.shape == residuals.shape == (12, ours_r2.size)
    np.testing.assert_allclose(ours_res, residuals, atol=1e-5)
    np.testing.assert_allclose(ours_pred, predicted, atol=1e-5)
    sidecar = json.loads(_one(summary, "_stat-errorts_statmap.json").read_text())
    assert [Path(p).name for p in sidecar["InputMaps"]] == [p.name for p in inputs]


def test_residual_variance_is_rss_over_dof(fitted):
    summary, design, inputs, mask = fitted
    y = np.stack([_in_mask(p, mask) for p in inputs])
    x = design[["group.patient", "group.control", "age"]].to_numpy(float)
    beta, rss, *_ = np.linalg.lstsq(x, y, rcond=None)
    dof = len(inputs) - 3
    ours = _in_mask(_one(summary, "_stat-residualvariance_statmap.nii.gz"), mask)
    np.testing.assert_allclose(ours, rss / dof, rtol=1e-6)
    sidecar = json.loads(_one(summary, "_stat-residualvariance_statmap.json").read_text())
    assert sidecar["DegreesOfFreedom"] == [dof]


def test_without_a_constant_r_squared_is_uncentred(tmp_path):
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=8, shape=(5, 5, 5), seed=4)
    model = tmp_path / "model.yaml"
    model.write_text(NO_CONSTANT)
    summary = _run(ds, tmp_path / "out", "--model", str(model))
    mask = _one(summary, "_mask.nii.gz")
    design = pd.read_csv(_one(summary, "_design.tsv"), sep="\t")
    y = np.stack([_in_mask(next(ds.rglob(p)), mask) for p in design["path"]])
    x = design[["age"]].to_numpy(float)
    _, rss, *_ = np.linalg.lstsq(x, y, rcond=None)
    expected = 1 - rss / np.sum(y**2, axis=0)
    ours = _in_mask(_one(summary, "_stat-rsquared_statmap.nii.gz"), mask)
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    sidecar = json.loads(_one(summary, "_stat-rsquared_statmap.json").read_text())
    assert sidecar["TotalSumOfSquares"].startswith("uncentred")


def test_residuals_are_written_only_on_request(fitted, tmp_path):
    summary = fitted[0]
    assert any("_stat-errorts_" in p for p in summary["files"])
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=5, shape=(4, 4, 4))
    plain = _run(ds, tmp_path / "out")
    names = [Path(p).name for p in plain["files"]]
    assert any("_stat-rsquared_" in n for n in names)
    assert any("_stat-residualvariance_" in n for n in names)
    assert not any("_stat-errorts_" in n or "_stat-predicted_" in n for n in names)


def test_target_grid_equals_nilearn_resample_then_fit(tmp_path):
    """--target-voxel-size: the maps resampled by nilearn's resample_img (continuous) onto our
    grid, then fitted by nilearn in our mask, give our z map."""
    from nilearn.glm.second_level import SecondLevelModel
    from nilearn.image import resample_img

    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=8, shape=(12, 11, 10), seed=5)
    summary = _run(ds, tmp_path / "out", "--target-voxel-size", "3")
    mask = _one(summary, "_mask.nii.gz")
    mask_img = nib.load(mask)
    assert mask_img.shape == (8, 8, 7)  # ceil(12 * 2 / 3), ceil(11 * 2 / 3), ceil(10 * 2 / 3)
    np.testing.assert_allclose(np.diag(mask_img.affine), [3, 3, 3, 1])
    np.testing.assert_allclose(mask_img.affine[:3, 3], np.diag([2.0, 2, 2, 1])[:3, 3])
    inputs = sorted(ds.rglob("*_statmap.nii.gz"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resampled = [
            resample_img(str(p), target_affine=mask_img.affine, target_shape=mask_img.shape,
                         interpolation="continuous", force_resample=True, copy_header=True)
            for p in inputs
        ]  # fmt: skip
        model = SecondLevelModel(mask_img=mask_img).fit(
            resampled, design_matrix=pd.DataFrame({"intercept": np.ones(len(inputs))})
        )
        z = model.masker_.transform(model.compute_contrast("intercept", output_type="z_score"))
    ours = _in_mask(_one(summary, "contrast-faces_stat-z_statmap.nii.gz"), mask)
    assert ours.size > 100
    np.testing.assert_allclose(ours, z.ravel(), atol=1e-4)
