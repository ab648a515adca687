"""Nothing is dropped or distorted silently: each case is a WARNING on stderr that names the
subjects (or counts the voxels), and the same line in the report's warnings.

Every case runs the real CLI on a real tiny BIDS dataset and the run still succeeds.
"""

from __future__ import annotations

import html
from pathlib import Path

import nibabel as nib
import numpy as np
from clicheck import run_ok
from conftest import make_bids_derivatives, write_map, write_participants


def _run(bids: Path, out: Path, *args: str) -> tuple[dict, str, str]:
    """Run the CLI; return the --json summary, stderr and the report's text."""
    summary, stderr = run_ok(bids, out, *args)
    page = html.unescape(Path(summary["report"]).read_text(encoding="utf-8"))
    return summary, stderr, page


def _warnings_block(page: str) -> str:
    parts = page.split('id="run-warnings"', 1)
    return parts[1].split("</section>", 1)[0] if len(parts) == 2 else ""


def _assert_warned(stderr: str, page: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if "WARNING" in line]
    assert any(all(n in line for n in needles) for line in lines), (needles, stderr)
    warnings = _warnings_block(page)
    assert all(n in warnings for n in needles), (needles, warnings)


def test_subject_without_a_map_for_one_contrast_is_named(tmp_path):
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=6, contrasts=("faces", "houses"))
    next(ds.glob("sub-04/func/*contrast-houses*.nii.gz")).unlink()
    summary, stderr, page = _run(ds, tmp_path / "out")
    _assert_warned(stderr, page, "contrast houses", "sub-04", "5 of 6 subjects")
    models = {a["group"]["contrast"]: a["subjects"] for a in summary["analyses"]}
    assert "04" not in models["houses"] and "04" in models["faces"]


def test_participants_row_without_a_map_is_named(tmp_path):
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=6)
    ids = [f"sub-0{i}" for i in range(1, 7)] + ["sub-07", "sub-08"]
    write_participants(ds / "participants.tsv", {"participant_id": ids, "age": list(range(8))})
    _, stderr, page = _run(ds, tmp_path / "out")
    _assert_warned(stderr, page, "2 participant(s)", "sub-07, sub-08", "not analysed")


def test_rows_of_participants_left_out_by_participant_label_are_not_reported(tmp_path):
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=6)
    _, stderr, _ = _run(ds, tmp_path / "out", "--participant-label", "01", "02", "03", "04")
    assert "not analysed" not in stderr


def test_map_without_a_participants_row_is_named(tmp_path):
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=6)
    ids = [f"sub-0{i}" for i in range(1, 5)]
    write_participants(ds / "participants.tsv", {"participant_id": ids, "age": [1, 2, 3, 4]})
    _, stderr, page = _run(ds, tmp_path / "out")
    _assert_warned(stderr, page, "participants.tsv has no row", "sub-05, sub-06", "2 of the 6")


def _mask(tmp_path: Path, shape=(6, 7, 8)) -> Path:
    path = tmp_path / "mask.nii.gz"
    nib.Nifti1Image(np.ones(shape, np.uint8), np.diag([2.0, 2, 2, 1])).to_filename(path)
    return path


def _edit_maps(ds: Path, edit) -> None:
    for path in sorted(ds.glob("sub-*/func/*.nii.gz")):
        data = nib.load(path).get_fdata()
        edit(data, path)
        write_map(path, data)


def test_user_mask_voxels_zero_in_every_map_are_counted(tmp_path):
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=6)
    _edit_maps(ds, lambda d, p: d.__setitem__((slice(5, 6),), 0.0))  # one slab of 7 x 8
    _, stderr, page = _run(ds, tmp_path / "out", "--mask", str(_mask(tmp_path)))
    _assert_warned(stderr, page, "56 of 336 mask voxels are zero in every map")


def test_voxels_without_variance_between_maps_are_counted(tmp_path):
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=6)
    _edit_maps(ds, lambda d, p: d.__setitem__((0, 0), 2.5))  # 8 voxels, same value everywhere
    _, stderr, page = _run(ds, tmp_path / "out")
    _assert_warned(stderr, page, "8 of 336 mask voxels have the same value in every map")


def test_outlier_map_is_named_and_float32_overflow_is_counted(tmp_path):
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=6)

    def plant(data: np.ndarray, path: Path) -> None:
        if path.name.startswith("sub-03"):
            data[:2] = 1e30  # 112 voxels

    _edit_maps(ds, plant)
    _, stderr, page = _run(ds, tmp_path / "out")
    _assert_warned(stderr, page, "sub-03", "values up to 1e+30")
    _assert_warned(stderr, page, "stat-variance_statmap.nii.gz", "112 value(s)", "float32")


def test_report_lists_the_participants_of_every_model(tmp_path):
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=5, contrasts=("faces", "houses"))
    next(ds.glob("sub-02/func/*contrast-houses*.nii.gz")).unlink()
    _, _, page = _run(ds, tmp_path / "out")
    assert "Participants (5): sub-01, sub-02, sub-03, sub-04, sub-05." in page
    assert "Participants (4): sub-01, sub-03, sub-04, sub-05." in page


def test_a_clean_run_warns_about_nothing(tmp_path):
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=6)
    _, stderr, page = _run(ds, tmp_path / "out")
    assert "WARNING" not in stderr and _warnings_block(page) == ""


def test_automatic_mask_names_the_map_that_covers_least(tmp_path):
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=6)

    def crop(data: np.ndarray, path: Path) -> None:
        if path.name.startswith("sub-05"):
            data[:, :, 6:] = np.nan  # a cropped field of view: 2 of 8 slices missing

    _edit_maps(ds, crop)
    _, stderr, page = _run(ds, tmp_path / "out")
    _assert_warned(stderr, page, "84 more voxels excluded", "sub-05_task-faces", "(75.0%)")


def test_a_factor_level_missing_from_x_is_named(tmp_path):
    """Cell-means coding (no intercept): a group written NA is a level of its own, not in X, so
    that subject's group columns are all zero; the run says so (found by a new-user trial)."""
    ds = make_bids_derivatives(
        tmp_path / "ds",
        n_subjects=6,
        participants={"group": ["patient", "control", "patient", "NA", "control", "patient"]},
    )
    model = tmp_path / "model.yaml"
    model.write_text(
        """
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
    Model: {Type: glm, X: [group.patient, group.control]}
    Contrasts:
      - Name: patientGtControl
        ConditionList: [group.patient, group.control]
        Weights: [1, -1]
        Test: t
"""
    )
    _, stderr, page = _run(ds, tmp_path / "out", "--model", str(model))
    _assert_warned(stderr, page, "sub-04 have no group.* column of X set")
