"""Mixed-effects models through the real CLI, on real first-level maps.

Data: ``../shared/data/real/nimare-pain-crop`` (21 pain studies, beta / varcope / se / t maps of
10 x 10 x 10 voxels; skipped when absent), laid out as a BIDS derivatives dataset. Oracle:
PyMARE (the meta-analysis estimators NiMARE uses) called voxel by voxel on the same values.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from clicheck import check_failure, run_cli
from conftest import make_bids_derivatives, write_description, write_participants
from scipy import special

from bids_group.distributions import t_sf_and_z

PAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "nimare-pain-crop"

META = """
Name: painMeta
BIDSModelVersion: 1.0.0
Nodes:
  - Level: Dataset
    Name: meta
    GroupBy: [contrast]
    Model:
      Type: meta
      X: [1]
      Software:
        bids-group: {{Estimator: {estimator}, VarianceFrom: {source}}}
    DummyContrasts: {{Test: t}}
"""


def _run(bids: Path, out: Path, *args: str) -> tuple[int, dict | None, str]:
    code, stdout, stderr = run_cli(bids, out, *args)
    return code, json.loads(stdout) if code == 0 else None, stderr


@pytest.fixture(scope="module")
def pain(tmp_path_factory) -> Path:
    """The 21 studies as sub-NN_contrast-pain_stat-{effect,variance,se,t}_statmap links."""
    if not PAIN.is_dir():
        pytest.skip(f"{PAIN} is absent")
    root = tmp_path_factory.mktemp("pain") / "ds"
    write_description(root)
    kinds = {"beta": "effect", "varcope": "variance", "se": "se", "t": "t"}
    for n in range(1, 22):
        folder = root / f"sub-{n:02d}" / "func"
        folder.mkdir(parents=True)
        for theirs, stat in kinds.items():
            link = folder / f"sub-{n:02d}_contrast-pain_stat-{stat}_statmap.nii.gz"
            link.symlink_to(PAIN / f"pain_{n:02d}_{theirs}.nii.gz")
    write_participants(
        root / "participants.tsv", {"participant_id": [f"sub-{n:02d}" for n in range(1, 22)]}
    )
    return root


def _arrays(pain: Path, mask: Path, stat: str) -> np.ndarray:
    inside = np.asarray(nib.load(mask).dataobj) > 0
    rows = []
    for n in range(1, 22):
        path = (
            pain / f"sub-{n:02d}" / "func" / f"sub-{n:02d}_contrast-pain_stat-{stat}_statmap.nii.gz"
        )
        rows.append(
            np.asarray(nib.load(path).dataobj, dtype=np.float64).reshape(inside.shape)[inside]
        )
    return np.stack(rows)


def _one(summary: dict, ending: str) -> Path:
    found = [Path(p) for p in summary["files"] if p.endswith(ending)]
    assert len(found) == 1, (ending, found)
    return found[0]


def _ours(summary: dict, stat: str) -> np.ndarray:
    mask = _one(summary, "_mask.nii.gz")
    inside = np.asarray(nib.load(mask).dataobj) > 0
    return np.asarray(nib.load(_one(summary, f"_stat-{stat}_statmap.nii.gz")).dataobj)[inside]


@pytest.mark.parametrize("estimator", ["fe", "dl", "hedges"])
def test_closed_form_estimators_equal_pymare(pain, tmp_path, estimator):
    pymare = pytest.importorskip("pymare")
    model = tmp_path / "model.yaml"
    model.write_text(META.format(estimator=estimator, source="variance"))
    code, summary, err = _run(pain, tmp_path / "out", "--model", str(model), "--no-report")
    assert code == 0, err
    mask = _one(summary, "_mask.nii.gz")
    y, v = _arrays(pain, mask, "effect"), _arrays(pain, mask, "variance")
    ok = np.all(v > 0, axis=0)
    theirs_cls = {
        "fe": pymare.estimators.WeightedLeastSquares,
        "dl": pymare.estimators.DerSimonianLaird,
        "hedges": pymare.estimators.Hedges,
    }[estimator]
    x = np.ones((y.shape[0], 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = theirs_cls(small_sample_correction="wald")
        est.fit(y=y[:, ok], v=v[:, ok], X=x)
        stats = est.summary().get_fe_stats()
        beta = np.ravel(stats["est"])
        se = np.ravel(stats["se"])
        tau2 = np.ravel(est.params_["tau2"]) * np.ones(ok.sum())
    t_theirs = beta / se
    _, z_theirs = t_sf_and_z(t_theirs, 20.0)  # FLAME1's dof: n - p
    z = _ours(summary, "z")[ok]
    effect = _ours(summary, "effect")[ok]
    np.testing.assert_allclose(effect, beta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(z, z_theirs, atol=1e-5)
    np.testing.assert_allclose(_ours(summary, "tau2")[ok], tau2, rtol=1e-5, atol=1e-9)
    sidecar = json.loads(_one(summary, "contrast-pain_stat-z_statmap.json").read_text())
    assert sidecar["Estimator"].startswith(
        {"fe": "fixed", "dl": "mixed", "hedges": "mixed"}[estimator]
    )
    assert sidecar["DegreesOfFreedom"] == [20.0]


def test_se_and_t_siblings_give_the_same_variances(pain, tmp_path):
    results = {}
    for source in ("variance", "se", "t"):
        model = tmp_path / f"{source}.yaml"
        model.write_text(META.format(estimator="dl", source=source))
        code, summary, err = _run(
            pain, tmp_path / f"out-{source}", "--model", str(model), "--no-report"
        )
        assert code == 0, err
        results[source] = _ours(summary, "z")
    # NIDM's se and t maps are stored in float32 and rounded: agree to float32 precision
    np.testing.assert_allclose(results["se"], results["variance"], atol=2e-3)
    np.testing.assert_allclose(results["t"], results["variance"], atol=2e-3)


def test_reml_from_the_command_line_and_the_model_written_out(pain, tmp_path):
    code, summary, err = _run(pain, tmp_path / "out", "--estimator", "reml")
    assert code == 0, err
    tau2 = _ours(summary, "tau2")
    assert np.all(tau2 >= 0) and np.any(tau2 == 0) and np.any(tau2 > 0)
    written = json.loads(
        Path(next(p for p in summary["files"] if p.endswith("_smdl.json"))).read_text()
    )
    model = written["Nodes"][0]["Model"]
    assert model["Type"] == "meta"
    assert model["Software"]["bids-group"]["Estimator"] == "reml"
    assert summary["analyses"][0]["estimator"] == "reml"
    # the report states the estimator and shows the tau² map
    page = Path(summary["report"]).read_text(encoding="utf-8")
    assert "restricted maximum-likelihood" in page and "tau² (median" in page
    assert "contrast-pain_stat-tau2_slices.png" in page
    assert _one(summary, "_stat-tau2_glassbrain.png").is_file()
    # two-sided p from z at each voxel
    p = _ours(summary, "p")
    np.testing.assert_allclose(p, 2 * special.ndtr(-np.abs(_ours(summary, "z"))), rtol=1e-5)


def test_missing_variance_map_names_the_subject(capsys, tmp_path):
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=5, stats=("effect", "variance"))
    next(ds.glob("sub-03/func/*stat-variance*")).unlink()
    argv = [ds, tmp_path / "out", "group", "--estimator", "dl"]
    check_failure(capsys, argv, tmp_path / "out", 65, "sub-03", "stat-variance")


def test_row_permutation_with_mixed_effects_is_refused_before_reading(capsys, tmp_path):
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=5, stats=("effect", "variance"))
    argv = [ds, tmp_path / "out", "group", "--estimator", "reml", "--permutation", "voxel",
            "--perm-scheme", "permute"]  # fmt: skip
    check_failure(capsys, argv, tmp_path / "out", 64, "--perm-scheme permute", "reml",
                  "not exchangeable")  # fmt: skip


@pytest.mark.parametrize("estimator", ["dl", "reml"])
def test_permutation_on_mixed_effects_through_the_cli(pain, tmp_path, estimator):
    """voxel, cluster and TFCE FWER on the mixed-effects z of the 21 real studies: the files are
    those of a direct call of the engine on the values the run read (same seed), the unpermuted
    statistic is the run's parametric z, and the null files say z."""
    from bids_group.inference.mixed_permutation import mixed_permutation_test
    from bids_group.inference.tfce import TfceParams

    model = tmp_path / "meta.yaml"
    model.write_text(META.format(estimator=estimator, source="variance"))
    code, summary, err = _run(pain, tmp_path / "out", "--model", model, "--permutation",
                              "voxel", "cluster", "tfce", "--n-perm", "99", "--seed", "7",
                              "--cluster-forming-p", "0.01")  # fmt: skip
    assert code == 0, err
    mask = _one(summary, "_mask.nii.gz")
    inside = np.asarray(nib.load(mask).dataobj) > 0
    y, v = _arrays(pain, mask, "effect"), _arrays(pain, mask, "variance")
    direct = mixed_permutation_test(
        y.astype(np.float32), v.astype(np.float32), np.ones((21, 1)), np.ones(1),
        method=estimator, n_perm=99, two_sided=True, mask=inside, cluster_forming_p=0.01,
        tfce=True, tfce_params=TfceParams(), seed=7,
    )  # fmt: skip
    np.testing.assert_allclose(direct.stat, _ours(summary, "z"), rtol=1e-5, atol=1e-5)
    logp = {
        "permVoxel": direct.p_fwe,
        "permUncorrected": direct.p_uncorrected,
        "permTfce": direct.tfce.p_fwe,
        "permClusterSize": direct.clusters.p_fwe_size_map(),
    }
    for desc, p in logp.items():
        path = _one(summary, f"_stat-logp_desc-{desc}_statmap.nii.gz")
        ours = np.asarray(nib.load(path).dataobj, dtype=np.float64)[inside]
        np.testing.assert_allclose(ours, -np.log10(p), rtol=1e-5, atol=1e-6, err_msg=desc)
    null = _one(summary, "_stat-z_nulldist.tsv")
    sidecar = json.loads(null.with_suffix(".json").read_text())
    assert "tau^2 re-estimated" in json.dumps(sidecar)
    assert sidecar["Scheme"] == "sign flipping" and sidecar["Statistic"].startswith("z")
    # the column descriptions must not call the z statistic t (they said "of |t|")
    assert "|t|" not in sidecar["max_stat"]["Description"]
    clusters = _one(summary, "_stat-z_desc-permCluster_clusters.tsv").with_suffix(".json")
    assert "z" in json.loads(clusters.read_text())["peak_stat"]["Description"]
    assert direct.n_relabellings == 100 and direct.null_max_stat[0] == pytest.approx(
        np.abs(direct.stat).max(), rel=1e-6
    )


def test_variance_options_need_a_mixed_estimator(capsys, tmp_path):
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=5)
    argv = [ds, tmp_path / "out", "group", "--variance-from", "se"]
    check_failure(capsys, argv, tmp_path / "out", 64, "--variance-from", "--estimator reml")


def test_reml_on_synthetic_maps_with_excluded_values(tmp_path):
    """Without the shared data: a REML run end to end; a zero and a negative variance are left
    out at their voxels only (counted, a stat-dof map written), a negative standard error too."""
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=6, stats=("effect", "variance"))
    variance = next(ds.glob("sub-02/func/*stat-variance*"))
    values = np.asarray(nib.load(variance).dataobj, dtype=np.float32)
    values[0, 0, :2] = [0.0, -1.0]
    nib.Nifti1Image(values, nib.load(variance).affine).to_filename(variance)
    code, summary, err = _run(ds, tmp_path / "out", "--estimator", "reml", "--no-report")
    assert code == 0, err
    assert "2 first-level value(s) at 2 voxel(s)" in err
    dof = _ours(summary, "dof")
    assert sorted(set(dof.tolist())) == [4.0, 5.0] and np.count_nonzero(dof == 4) == 2
    assert np.all(np.isfinite(_ours(summary, "z")))
    sidecar = json.loads(_one(summary, "contrast-faces_stat-z_statmap.json").read_text())
    assert "stat-dof" in sidecar["DegreesOfFreedomPerVoxel"]


def test_a_variance_map_unusable_everywhere_is_named(tmp_path):
    """A variance map that is zero everywhere leaves its subject out at every voxel: a warning
    names the subject and the file (the per-value count alone did not say which map); the other
    maps are fitted, and a partly broken map is not named."""
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=7, stats=("effect", "variance"))
    broken = next(ds.glob("sub-03/func/*stat-variance*"))
    image = nib.load(broken)
    nib.Nifti1Image(np.zeros(image.shape, np.float32), image.affine).to_filename(broken)
    partly = next(ds.glob("sub-05/func/*stat-variance*"))
    values = np.asarray(nib.load(partly).dataobj, dtype=np.float32)
    values[0] = 0.0
    nib.Nifti1Image(values, image.affine).to_filename(partly)
    code, summary, err = _run(ds, tmp_path / "out", "--estimator", "dl", "--no-report")
    assert code == 0, err
    assert "sub-03 has no usable value in the mask" in err and str(broken) in err
    assert "sub-05 has no" not in err
    assert set(_ours(summary, "dof").tolist()) <= {4.0, 5.0}  # 7 maps less sub-03 (less sub-05)


def test_negative_standard_error_is_excluded():
    from bids_group.variance_maps import to_variance

    out = to_variance(np.array([[-2.0, 3.0]]), np.zeros((1, 2)), "se")
    assert np.isnan(out[0, 0]) and out[0, 1] == 9.0


def test_two_variance_siblings_for_one_map_are_refused(capsys, tmp_path):
    """sub-02 has its variance as .nii.gz and as .nii (e.g. left by `gzip -k`): which one is
    meant is unknown, as for two effect maps of one subject, so the run stops naming both
    (it used the .nii.gz silently)."""
    bids = make_bids_derivatives(tmp_path / "ds", n_subjects=5, stats=("effect", "variance"))
    (gz,) = bids.glob("sub-02/func/*_stat-variance_statmap.nii.gz")
    image = nib.load(gz)
    plain = gz.with_name(gz.name.removesuffix(".gz"))
    nib.Nifti1Image(np.asarray(image.dataobj) * 2, image.affine).to_filename(plain)
    argv = [bids, tmp_path / "out", "group", "--estimator", "reml"]
    check_failure(capsys, argv, tmp_path / "out", 65, "sub-02", gz.name, plain.name)


def test_write_residuals_with_a_mixed_estimator_is_refused(capsys, tmp_path):
    """--write-residuals wrote nothing with a mixed estimator (and said nothing): refused
    before any image is read, as with --min-coverage."""
    bids = make_bids_derivatives(tmp_path / "ds", n_subjects=5, stats=("effect", "variance"))
    argv = [bids, tmp_path / "out", "group", "--estimator", "dl", "--write-residuals"]
    check_failure(capsys, argv, tmp_path / "out", 64, "--write-residuals", "dl estimator")
