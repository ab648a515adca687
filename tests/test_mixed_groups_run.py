"""Variance groups (one tau^2 per group) through the real CLI, on a small synthetic BIDS
dataset with stat-effect and stat-variance maps: the model file key ``VarianceGroups`` and the
``--variance-groups`` option, the 4-D stat-tau2 map against a direct ``fit_mixed`` call on the
same values, and the refusals (unknown column, a group too small for the design, a moment
estimator with a shared column) before any image is read."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from clicheck import check_failure, run_cli
from conftest import make_bids_derivatives

from bids_group.errors import SpecError
from bids_group.mixed_effects import fit_mixed, mixed_contrast
from bids_group.spec import load_spec

MODEL = """
Name: groups
BIDSModelVersion: 1.0.0
Nodes:
  - Level: Dataset
    Name: meta
    GroupBy: [contrast]
    Model:
      Type: meta
      X: [1, age]
      Software:
        bids-group: {{Estimator: {estimator}, VarianceGroups: {column}}}
    DummyContrasts: {{Test: t}}
"""
N = 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """12 subjects, effect + variance maps; ``site`` (A: 5 subjects, B: 7), ``age`` and
    ``special`` (non-zero for one subject only) in participants.tsv."""
    root = tmp_path_factory.mktemp("vg") / "ds"
    participants = {
        "age": [20 + 3 * i for i in range(N)],
        "site": ["A" if i % 5 == 0 or i < 3 else "B" for i in range(N)],
        "special": [1.0 if i == N - 1 else 0.0 for i in range(N)],
    }
    ds = make_bids_derivatives(
        root, n_subjects=N, stats=("effect", "variance"), participants=participants
    )
    # Different spreads by site, so that the two tau^2 differ
    for i, sub in enumerate(sorted(ds.glob("sub-*"))):
        path = next(sub.glob("func/*stat-effect*"))
        img = nib.load(path)
        scale = 3.0 if participants["site"][i] == "B" else 0.5
        values = np.asarray(img.dataobj, dtype=np.float32) * np.float32(scale)
        nib.Nifti1Image(values, img.affine).to_filename(path)
    return ds


def _run(ds: Path, out: Path, *args: str) -> dict:
    code, stdout, stderr = run_cli(ds, out, *args)
    assert code == 0, stderr
    return json.loads(stdout)


def _one(summary: dict, ending: str) -> Path:
    found = [Path(p) for p in summary["files"] if p.endswith(ending)]
    assert len(found) == 1, (ending, found)
    return found[0]


def _inputs(ds: Path, stat: str, inside: np.ndarray) -> np.ndarray:
    paths = sorted(ds.glob(f"sub-*/func/*stat-{stat}_statmap.nii.gz"))
    return np.stack([np.asarray(nib.load(p).dataobj, np.float64)[inside] for p in paths])


@pytest.mark.parametrize("estimator", ["reml", "ml"])
def test_model_file_variance_groups_equal_fit_mixed(dataset, tmp_path, estimator):
    model = tmp_path / "model.yaml"
    model.write_text(MODEL.format(estimator=estimator, column="site"))
    summary = _run(dataset, tmp_path / "out", "--model", str(model), "--no-report")
    inside = np.asarray(nib.load(_one(summary, "_mask.nii.gz")).dataobj) > 0
    y, v = _inputs(dataset, "effect", inside), _inputs(dataset, "variance", inside)
    design = pd.read_csv(_one(summary, "_design.tsv"), sep="\t")
    design = design.drop(columns=["subject", "path"])
    sites = pd.read_csv(dataset / "participants.tsv", sep="\t")["site"].to_numpy()
    assert list(design.columns) == ["intercept", "age"]
    direct = fit_mixed(y, v, design.to_numpy(float), estimator, groups=sites)
    tau2_path = _one(summary, "_stat-tau2_statmap.nii.gz")
    tau2 = np.asarray(nib.load(tau2_path).dataobj)
    assert tau2.shape == (*inside.shape, 2)
    ours = np.stack([tau2[..., g][inside] for g in range(2)])
    np.testing.assert_allclose(ours, direct.tau2, rtol=1e-6, atol=1e-12)  # float32 on disk
    assert np.median(ours[0]) < np.median(ours[1])  # site B spreads 6x more than site A
    sidecar = json.loads(
        tau2_path.with_name(tau2_path.name[: -len(".nii.gz")] + ".json").read_text()
    )
    assert sidecar["VarianceGroups"] == {"Column": "site", "Levels": ["A", "B"]}
    assert "one volume per group" in sidecar["Statistic"]
    z_sidecar = json.loads(_one(summary, "contrast-facesAge_stat-z_statmap.json").read_text())
    assert z_sidecar["VarianceGroups"]["Levels"] == ["A", "B"]
    age = _one(summary, "contrast-facesAge_stat-effect_statmap.nii.gz")
    np.testing.assert_allclose(
        np.asarray(nib.load(age).dataobj)[inside], direct.beta[1], rtol=1e-5, atol=1e-6
    )
    z = np.asarray(nib.load(_one(summary, "contrast-facesAge_stat-z_statmap.nii.gz")).dataobj)
    np.testing.assert_allclose(z[inside], mixed_contrast(direct, [0.0, 1.0]).z, atol=1e-5)
    assert summary["analyses"][0]["variance_groups"]["Column"] == "site"
    written = json.loads(_one(summary, "_smdl.json").read_text())
    assert written["Nodes"][0]["Model"]["Software"]["bids-group"]["VarianceGroups"] == "site"


def test_cli_option_and_report(dataset, tmp_path):
    """--variance-groups on the default (intercept-only) model: one figure per group."""
    summary = _run(dataset, tmp_path / "out", "--estimator", "reml", "--variance-groups", "site")
    tau2 = np.asarray(nib.load(_one(summary, "_stat-tau2_statmap.nii.gz")).dataobj)
    assert tau2.shape[-1] == 2
    page = Path(summary["report"]).read_text(encoding="utf-8")
    assert "tau² of site A" in page and "tau² of site B" in page
    assert _one(summary, "_stat-tau2_desc-A_glassbrain.png").is_file()
    assert _one(summary, "_stat-tau2_desc-B_glassbrain.png").is_file()


def test_unknown_column_is_refused(dataset, capsys, tmp_path):
    argv = [dataset, tmp_path / "out", "group", "--estimator", "reml", "--variance-groups", "sight"]
    check_failure(capsys, argv, tmp_path / "out", 64, "'sight'", "participants.tsv column")


def test_group_too_small_for_the_design_is_refused(dataset, capsys, tmp_path):
    """``special`` is non-zero for sub-12 only, alone in its group: nothing is left to
    estimate that group's tau^2."""
    model = tmp_path / "model.yaml"
    model.write_text(MODEL.format(estimator="reml", column="special").replace("age", "special"))
    argv = [dataset, tmp_path / "out", "group", "--model", model]
    check_failure(capsys, argv, tmp_path / "out", 65, "Variance group '1.0'", "at least 2")


def test_moment_estimator_with_a_shared_column_is_refused(dataset, capsys, tmp_path):
    argv = [dataset, tmp_path / "out", "group", "--estimator", "dl", "--variance-groups", "site"]
    check_failure(capsys, argv, tmp_path / "out", 64, "separable", "use reml or ml")


@pytest.mark.parametrize("estimator", ["reml", "ml"])
def test_too_many_groups_for_the_joint_search_are_refused(dataset, capsys, tmp_path, estimator):
    """One tau^2 per subject (12 groups) with a shared intercept: the joint search's product
    grid would have 6^12 points per voxel (it crashed in the compiled kernel; 6 groups took
    70 s for 973 voxels). Refused before any image is read, naming the column and the limit."""
    argv = [dataset, tmp_path / "out", "group", "--estimator", estimator,
            "--variance-groups", "subject"]  # fmt: skip
    check_failure(capsys, argv, tmp_path / "out", 64, "'subject'", "12 levels", "at most 5")


def test_fit_mixed_refuses_too_many_joint_groups():
    """The library call is guarded too (the kernel would try a 6^G grid per voxel)."""
    from bids_group.errors import UsageError

    rng = np.random.default_rng(0)
    y, v = rng.normal(size=(12, 3)), np.ones((12, 3))
    with pytest.raises(UsageError, match="6 levels are too many"):
        fit_mixed(y, v, np.ones((12, 1)), method="reml", groups=np.arange(12) % 6)
    fit_mixed(y, v, np.ones((12, 1)), method="fe", groups=np.arange(12) % 6)  # no grid: runs


def test_permutation_with_variance_groups(dataset, tmp_path):
    """Sign flips with one tau^2 per site, re-estimated jointly in every relabelling: the
    voxelwise FWER map is that of a direct call of the engine with the same groups and seed,
    and the unpermuted statistic is the run's parametric z."""
    from bids_group.inference.mixed_permutation import mixed_permutation_test

    model = tmp_path / "m.yaml"
    model.write_text(MODEL.format(estimator="reml", column="site"))
    summary = _run(dataset, tmp_path / "out", "--model", model, "--permutation", "voxel",
                   "--n-perm", "40", "--seed", "3", "--no-report")  # fmt: skip
    inside = np.asarray(nib.load(_one(summary, "_mask.nii.gz")).dataobj) > 0
    y, v = _inputs(dataset, "effect", inside), _inputs(dataset, "variance", inside)
    table = pd.read_csv(dataset / "participants.tsv", sep="\t")
    age = table["age"].to_numpy(float)
    x = np.column_stack([np.ones(N), age])
    site = table["site"].to_numpy()
    direct = mixed_permutation_test(y, v, x, np.array([1.0, 0.0]), method="reml", groups=site,
                                    n_perm=40, seed=3, two_sided=True)  # fmt: skip
    z = np.asarray(nib.load(_one(summary, "contrast-faces_stat-z_statmap.nii.gz")).dataobj)
    np.testing.assert_allclose(direct.stat, z[inside], rtol=1e-5, atol=1e-5)
    logp = _one(summary, "contrast-faces_stat-logp_desc-permVoxel_statmap.nii.gz")
    ours = np.asarray(nib.load(logp).dataobj, dtype=np.float64)[inside]
    np.testing.assert_allclose(ours, -np.log10(direct.p_fwe), rtol=1e-5, atol=1e-6)


def test_variance_groups_need_a_mixed_estimator(dataset, capsys, tmp_path):
    argv = [dataset, tmp_path / "out", "group", "--variance-groups", "site"]
    check_failure(capsys, argv, tmp_path / "out", 64, "--variance-groups", "--estimator reml")


@pytest.mark.parametrize(
    ("model_type", "value", "needle"),
    [
        ("meta", "[site, age]", "is not a column name"),
        ("glm", "site", "only apply to Type meta"),
    ],
)
def test_model_file_key_is_validated(tmp_path, model_type, value, needle):
    text = MODEL.format(estimator="reml", column=value).replace("Type: meta", f"Type: {model_type}")
    if model_type == "glm":
        text = text.replace("Estimator: reml, ", "")
    path = tmp_path / "model.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match="VarianceGroups|only apply") as info:
        load_spec(path)
    assert needle in str(info.value)


def test_model_file_key_is_read(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(MODEL.format(estimator="ml", column="site"))
    assert load_spec(path).estimation.variance_groups == "site"


SITE_DIFFERENCE = """
Name: sites
BIDSModelVersion: 1.0.0
Nodes:
  - Level: Dataset
    Name: meta
    GroupBy: [contrast]
    Transformations:
      Transformer: pybids-transforms-v1
      Instructions:
        - Name: Factor
          Input: [site]
    Model:
      Type: meta
      X: [site.A, site.B]
      Software:
        bids-group: {{Estimator: {estimator}, VarianceGroups: site}}
    Contrasts:
      - Name: AgtB
        ConditionList: [site.A, site.B]
        Weights: [1, -1]
        Test: t
"""


def test_moment_estimator_permutation_with_a_shared_reduced_column_is_refused_before_reading(
    dataset, capsys, tmp_path
):
    """The design (one column per site) is separable, so DL fits it; but Freedman-Lane's reduced
    model of A - B is their sum, the intercept shared by both sites, which DL cannot refit with
    two tau^2. Refused when planned, with the contrast named, not after reading every map."""
    model = tmp_path / "m.yaml"
    model.write_text(SITE_DIFFERENCE.format(estimator="dl"))
    summary = _run(dataset, tmp_path / "ok", "--model", model, "--no-report")  # parametric: fine
    assert _one(summary, "AgtB_stat-z_statmap.nii.gz")
    argv = [dataset, tmp_path / "out", "group", "--model", model, "--permutation", "voxel",
            "--n-perm", "20", "--no-report"]  # fmt: skip
    # "permutation inference:" is the prefix of the refusals raised by the plan (before reading)
    check_failure(capsys, argv, tmp_path / "out", 64, "permutation inference:", "separable",
                  "AgtB", "reml or ml")  # fmt: skip
