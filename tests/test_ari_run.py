"""ARI wired into the run: options, model-file keys, outputs, and parity with nilearn.

The oracle is nilearn's ``cluster_level_inference`` applied to the z map and mask bids-group
wrote (one-sided, as nilearn is).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_group.cli import main
from bids_group.config import resolve_inference
from bids_group.errors import UsageError
from bids_group.spec import InferenceDefaults, load_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ds-faces"


def _run(out: Path, *args: str, bids: Path = EXAMPLE) -> tuple[int, dict | None, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    logger = logging.getLogger("bids_group")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main([str(bids), str(out), "group", "--json", "-q", *args])
    finally:  # main() configures logging for a process; leave other tests' caplog working
        logger.handlers[:], logger.level, logger.propagate = saved
    summary = json.loads(stdout.getvalue()) if code == 0 else None
    return code, summary, stderr.getvalue()


def _one(summary: dict, ending: str) -> Path:
    found = [Path(p) for p in summary["files"] if p.endswith(ending)]
    assert len(found) == 1, (ending, found)
    return found[0]


@pytest.fixture(scope="module")
def one_sample_ari(tmp_path_factory):
    out = tmp_path_factory.mktemp("ari") / "out"
    code, summary, err = _run(
        out, "--one-sided", "--ari", "--ari-thresholds", "3", "4.5", "--no-report"
    )
    assert code == 0, err
    return summary


def test_ari_matches_nilearn_cluster_level_inference(one_sample_ari):
    from nilearn.glm import cluster_level_inference

    summary = one_sample_ari
    for label in ("faces", "scrambled"):
        z_img = nib.load(_one(summary, f"contrast-{label}_stat-z_statmap.nii.gz"))
        mask_img = nib.load(_one(summary, f"contrast-{label}_mask.nii.gz"))
        mask = mask_img.get_fdata() > 0
        z = np.nan_to_num(z_img.get_fdata())
        expected = cluster_level_inference(
            nib.Nifti1Image(z, z_img.affine), mask_img=mask_img, threshold=[3.0, 4.5], alpha=0.05
        ).get_fdata()
        tdp = nib.load(_one(summary, f"contrast-{label}_stat-tdp_desc-ari05_statmap.nii.gz"))
        ours = tdp.get_fdata()
        assert np.isnan(ours[~mask]).all()
        np.testing.assert_allclose(ours[mask], expected[mask], atol=1e-6)
        if label == "faces":  # the visual response: ARI must find true discoveries
            assert expected.max() > 0.5


def test_ari_table_and_sidecars(one_sample_ari):
    table_path = _one(one_sample_ari, "contrast-faces_stat-z_desc-ari05_clusters.tsv")
    table = pd.read_csv(table_path, sep="\t")
    assert list(table.columns) == [
        "threshold", "cluster_id", "size", "volume_mm3", "true_discoveries", "tdp",
        "peak_stat", "peak_x", "peak_y", "peak_z",
    ]  # fmt: skip
    assert set(table["threshold"]) <= {3.0, 4.5} and len(table) > 0
    assert (table["true_discoveries"] <= table["size"]).all()
    np.testing.assert_allclose(table["tdp"], table["true_discoveries"] / table["size"], rtol=1e-5)
    assert (table["peak_stat"] > 3.0).all()  # one-sided: positive clusters only
    meta = json.loads(table_path.with_suffix(".json").read_text())
    assert meta["Alpha"] == 0.05 and meta["ClusterFormingThresholds"] == [3.0, 4.5]
    assert meta["ThresholdUnits"] == "z" and meta["TwoSided"] is False
    assert meta["tdp"]["Description"].startswith("Lower bound")
    contrast = one_sample_ari["analyses"][0]["contrasts"][0]
    assert contrast["ari"]["clusters"] == int((table["threshold"] > 0).sum())


def test_model_file_keys_turn_ari_on(tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text(
        "Name: ari\nBIDSModelVersion: '1.0.0'\nInput: {task: faces}\nNodes:\n"
        "  - Level: Dataset\n    Name: one\n    GroupBy: [contrast]\n"
        "    Model:\n      Type: glm\n      X: [1]\n      Software:\n        bids-group:\n"
        "          Inference: {ARI: true, ARIThresholds: [3.5, 3.0], ARIAlpha: 0.1}\n"
        "    DummyContrasts: {Test: t}\n"
    )
    spec = load_spec(model)
    assert spec.inference.ari is True
    assert spec.inference.ari_thresholds == (3.0, 3.5)
    assert spec.inference.extra == {"ari_alpha": 0.1}
    code, summary, err = _run(tmp_path / "out", "--model", str(model), "--no-report")
    assert code == 0, err
    assert _one(summary, "contrast-faces_stat-tdp_desc-ari1_statmap.nii.gz").is_file()
    assert summary["inference"]["ari_thresholds"] == [3.0, 3.5]
    # the command line wins over the model file
    code, summary, err = _run(tmp_path / "out2", "--model", str(model), "--no-ari", "--no-report")
    assert code == 0, err
    assert not [p for p in summary["files"] if "desc-ari" in p]


@pytest.mark.parametrize(
    "args",
    [("--ari", "--ari-thresholds", "0"), ("--ari", "--ari-alpha", "1.5")],
)
def test_bad_ari_options_are_usage_errors(tmp_path, args):
    code, _, err = _run(tmp_path / "out", *args)
    assert code == 64
    assert args[1] in err  # the option named, e.g. --ari-alpha == 1.5, must be ...
    assert not (tmp_path / "out").exists()


def test_bad_ari_thresholds_in_model_file(tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text(
        "Name: ari\nBIDSModelVersion: '1.0.0'\nNodes:\n  - Level: Dataset\n    Name: one\n"
        "    GroupBy: []\n"
        "    Model:\n      Type: glm\n      X: [1]\n      Software:\n        bids-group:\n"
        "          Inference: {ARIThresholds: [3.0, -1]}\n"
    )
    code, _, err = _run(tmp_path / "out", "--model", str(model))
    assert code == 64 and "ARIThresholds[1]" in err


def test_ari_alpha_resolution():
    assert resolve_inference({}, None).ari_alpha == 0.05  # fpr's 0.001 is not reused
    fdr = resolve_inference({"height_control": "fdr", "alpha": 0.1}, None)
    assert fdr.ari_alpha == 0.1
    own = resolve_inference({"height_control": "fdr", "ari": True, "ari_alpha": 0.2}, None)
    assert own.ari_alpha == 0.2
    with pytest.raises(UsageError, match="--ari-alpha only applies to All-Resolution"):
        resolve_inference({"ari_alpha": 0.2}, None)  # would silently do nothing
    from_file = resolve_inference({}, InferenceDefaults(ari=True, ari_thresholds=(4.0, 3.0)))
    assert from_file.ari and from_file.ari_thresholds == (3.0, 4.0)
    with pytest.raises(UsageError, match="--ari-thresholds == -1.0, must be"):
        resolve_inference({"ari": True, "ari_thresholds": (-1.0,)}, None)
