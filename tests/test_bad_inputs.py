"""Malformed inputs: each gets one clear message, a documented exit code, and no partial output.

Every case runs the real CLI entry point on a real (tiny) BIDS dataset and checks
(1) the exit code, (2) that stderr names the culprit, has no traceback and stdout is empty,
(3) that OUT_DIR is exactly as before (absent, or unchanged) and no staging folder is left.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from clicheck import check_failure
from conftest import make_bids_derivatives, map_name, write_map, write_participants

from bids_group.cli import main


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    return make_bids_derivatives(tmp_path / "ds", n_subjects=6)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "results"


def write_model(tmp_path: Path, text: str, name: str = "model.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


TWO_SAMPLE = """
Name: twoSample
BIDSModelVersion: 1.0.0
Nodes:
  - Level: Dataset
    Name: groupDiff
    GroupBy: [contrast]
    Transformations:
      Transformer: pybids-transforms-v1
      Instructions:
        - Name: Factor
          Input: [group]
    Model: {Type: glm, X: [group.patient, group.control]}
    Contrasts:
      - Name: patientGtControl
        ConditionList: [group.patient, group.control]
        Weights: [1, -1]
        Test: t
"""


# ---- paths and levels -------------------------------------------------------------------------


def test_unknown_level(capsys, ds, out):
    check_failure(capsys, [ds, out, "participant"], out, 17, "participant")


def test_missing_bids_dir(capsys, tmp_path, out):
    check_failure(capsys, [tmp_path / "absent", out, "group"], out, 66, "absent")


def test_missing_model_file(capsys, ds, out, tmp_path):
    check_failure(capsys, [ds, out, "group", "--model", tmp_path / "m.yaml"], out, 66, "m.yaml")


def test_missing_mask_file(capsys, ds, out, tmp_path):
    check_failure(capsys, [ds, out, "group", "--mask", tmp_path / "m.nii"], out, 66, "m.nii")


def test_missing_derivatives_folder(capsys, ds, out, tmp_path):
    check_failure(capsys, [ds, out, "group", "--derivatives", tmp_path / "d"], out, 66, "d")


def test_out_dir_inside_bids_dir(capsys, ds):
    # ds is a derivatives dataset (its maps are read): nothing inside it is allowed, not even
    # derivatives/ (allowed in a raw BIDS_DIR: tests/test_bad_inputs_paths.py).
    out = ds / "derivatives" / "bids-group"
    check_failure(
        capsys,
        [ds, out, "group"],
        out,
        64,
        f"OUT_DIR {out} is inside BIDS_DIR {ds}",
        "never writes",
    )


def test_out_dir_parent_is_a_file(capsys, ds, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "results"
    check_failure(capsys, [ds, out, "group"], out, 73, str(blocker))


def test_existing_results_without_overwrite(capsys, ds, out):
    assert main([str(ds), str(out), "group", "-q"]) == 0
    capsys.readouterr()
    check_failure(capsys, [ds, out, "group"], out, 73, "--overwrite")


def test_no_dataset_description(capsys, ds, out):
    (ds / "dataset_description.json").unlink()
    check_failure(capsys, [ds, out, "group"], out, 16, "dataset_description.json")


# ---- the model file -----------------------------------------------------------------------------


def test_yaml_syntax_error_gives_line_and_column(capsys, ds, out, tmp_path):
    model = write_model(tmp_path, "Name: x\nNodes: [\n  - Level: Dataset\n")
    err = check_failure(capsys, [ds, out, "group", "--model", model], out, 64, "model.yaml")
    assert "line" in err


def test_unknown_key_suggests_nearest(capsys, ds, out, tmp_path):
    model = write_model(tmp_path, TWO_SAMPLE.replace("Contrasts:", "Contrast:"))
    check_failure(capsys, [ds, out, "group", "--model", model], out, 64, "Contrast", "Contrasts")


def test_x_names_missing_column(capsys, ds, out, tmp_path):
    model = write_model(
        tmp_path, TWO_SAMPLE.replace("X: [group.patient,", "X: [group.patient, age2,")
    )
    check_failure(capsys, [ds, out, "group", "--model", model], out, 64, "age2")


def test_contrast_names_missing_column(capsys, ds, out, tmp_path):
    text = TWO_SAMPLE.replace(
        "ConditionList: [group.patient, group.control]",
        "ConditionList: [group.patient, group.controls]",
    )
    model = write_model(tmp_path, text)
    check_failure(capsys, [ds, out, "group", "--model", model], out, 64, "group.controls")


def test_t_contrast_with_matrix_weights(capsys, ds, out, tmp_path):
    text = TWO_SAMPLE.replace("Weights: [1, -1]", "Weights: [[1, 0], [0, 1]]")
    model = write_model(tmp_path, text)
    check_failure(capsys, [ds, out, "group", "--model", model], out, 64, "Weights")


def test_rank_deficient_design(capsys, ds, out, tmp_path):
    model = write_model(
        tmp_path,
        TWO_SAMPLE.replace(
            "X: [group.patient, group.control]", "X: [1, group.patient, group.control]"
        ),
    )
    check_failure(capsys, [ds, out, "group", "--model", model], out, 65, "rank")


def test_too_few_maps_for_parameters(capsys, tmp_path, out):
    ds = make_bids_derivatives(tmp_path / "small", n_subjects=2)
    model = write_model(tmp_path, TWO_SAMPLE)
    check_failure(capsys, [ds, out, "group", "--model", model], out, 65, "map")


# ---- participants -------------------------------------------------------------------------------


def test_covariate_missing_for_a_subject_is_named(capsys, tmp_path, out):
    ds = make_bids_derivatives(
        tmp_path / "ds",
        n_subjects=6,
        participants={"age": [20, 30, None, 40, 50, 60], "group": ["a", "b"] * 3},
    )
    model = write_model(
        tmp_path,
        """
Name: ageModel
BIDSModelVersion: 1.0.0
Nodes:
  - Level: Dataset
    Name: age
    GroupBy: [contrast]
    Model: {Type: glm, X: [1, age]}
    DummyContrasts: {Test: t}
""",
    )
    check_failure(capsys, [ds, out, "group", "--model", model], out, 65, "age", "03")


def test_participants_without_participant_id(capsys, tmp_path, out):
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=5)
    write_participants(ds / "participants.tsv", {"subject": ["sub-01"], "age": [3]})
    check_failure(capsys, [ds, out, "group"], out, 65, "participant_id")


def test_unknown_participant_label(capsys, ds, out):
    check_failure(capsys, [ds, out, "group", "--participant-label", "99"], out, 18, "99")


def test_filter_selects_nothing(capsys, ds, out, tmp_path):
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"task": "rest"}))
    check_failure(capsys, [ds, out, "group", "--bids-filter-file", filters], out, 18, "faces")


def test_filter_file_not_json(capsys, ds, out, tmp_path):
    filters = tmp_path / "filters.json"
    filters.write_text("{task: rest")
    check_failure(
        capsys, [ds, out, "group", "--bids-filter-file", filters], out, 64, "filters.json"
    )


# ---- images -------------------------------------------------------------------------------------


def test_maps_on_different_grids_without_resample(capsys, ds, out):
    odd = next(ds.glob("sub-03/func/*.nii.gz"))
    write_map(odd, np.ones((5, 7, 8)))
    check_failure(capsys, [ds, out, "group"], out, 65, "sub-03", "--resample")


def test_corrupt_image(capsys, ds, out):
    broken = next(ds.glob("sub-02/func/*.nii.gz"))
    broken.write_bytes(gzip.compress(b"not a nifti file at all"))
    check_failure(capsys, [ds, out, "group"], out, 65, "sub-02")


def test_four_d_image(capsys, ds, out):
    four_d = next(ds.glob("sub-04/func/*.nii.gz"))
    nib.Nifti1Image(np.ones((6, 7, 8, 3), np.float32), np.eye(4)).to_filename(four_d)
    check_failure(capsys, [ds, out, "group"], out, 65, "sub-04")


def test_empty_user_mask(capsys, ds, out, tmp_path):
    mask = tmp_path / "mask.nii.gz"
    nib.Nifti1Image(np.zeros((6, 7, 8), np.uint8), np.diag([2.0, 2, 2, 1])).to_filename(mask)
    check_failure(capsys, [ds, out, "group", "--mask", mask], out, 65, "mask")


# ---- inference options --------------------------------------------------------------------------


def test_threshold_contradicts_fdr(capsys, ds, out):
    check_failure(
        capsys,
        [ds, out, "group", "--height-control", "fdr", "--threshold", "3"],
        out,
        64,
        "--threshold",
    )


def test_none_needs_threshold(capsys, ds, out):
    check_failure(capsys, [ds, out, "group", "--height-control", "none"], out, 64, "--threshold")


@pytest.mark.parametrize("alpha", ["0", "1.5", "-0.1"])
def test_alpha_out_of_range(capsys, ds, out, alpha):
    check_failure(capsys, [ds, out, "group", "--alpha", alpha], out, 64, "alpha")


def test_bad_inference_value_in_model_file(capsys, ds, out, tmp_path):
    text = TWO_SAMPLE.replace(
        "Model: {Type: glm, X: [group.patient, group.control]}",
        "Model:\n      Type: glm\n      X: [group.patient, group.control]\n"
        "      Software:\n        bids-group:\n          Inference: {Connectivity: 7}",
    )
    model = write_model(tmp_path, text)
    check_failure(capsys, [ds, out, "group", "--model", model], out, 64, "onnectivity")


def test_duplicate_maps_are_ambiguous(capsys, ds, out):
    source = next(ds.glob("sub-01/func/*.nii.gz"))
    twin = source.parent / map_name("01", desc="smoothed")
    twin.write_bytes(source.read_bytes())
    check_failure(capsys, [ds, out, "group"], out, 65, "desc")


ALL_CASES: list[Callable] = [v for k, v in dict(globals()).items() if k.startswith("test_")]


def test_there_are_at_least_twenty_distinct_cases():
    assert len(ALL_CASES) >= 21
