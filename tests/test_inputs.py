"""collect_inputs: pybids selection, defaults, participants.tsv and every error it raises."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_bids_derivatives, map_name, write_map, write_participants

from bids_group.errors import (
    BidsDatasetError,
    DataError,
    EmptySelectionError,
    MissingInputError,
    UsageError,
)
from bids_group.inputs import collect_inputs, read_participants


def _names(inputs):
    return [m.path.name for m in inputs.maps]


def test_default_selects_stat_effect_statmaps(bids_derivatives):
    root = bids_derivatives(n_subjects=3, contrasts=("faces", "words"), stats=("effect", "t"))
    inputs = collect_inputs(root)
    assert len(inputs.maps) == 6
    assert all(m.entities["stat"] == "effect" for m in inputs.maps)
    assert [m.entities["subject"] for m in inputs.maps] == ["01", "01", "02", "02", "03", "03"]
    assert [m.entities["contrast"] for m in inputs.maps[:2]] == ["faces", "words"]
    assert inputs.dataset_root == root.resolve()
    assert inputs.participants_path == root.resolve() / "participants.tsv"
    assert list(inputs.participants.index) == ["01", "02", "03"]
    assert inputs.participants.index.name == "participant_id"
    assert pd.api.types.is_numeric_dtype(inputs.participants["age"])
    assert inputs.source_datasets == (root.resolve().as_uri(),)


def test_stat_filter_selects_t_maps(bids_derivatives):
    root = bids_derivatives(n_subjects=2, stats=("effect", "t"))
    inputs = collect_inputs(root, input_filters={"stat": "t"})
    assert [m.entities["stat"] for m in inputs.maps] == ["t", "t"]


def test_raw_dataset_with_derivatives(tmp_path):
    deriv = make_bids_derivatives(tmp_path / "raw", n_subjects=2, raw=True)
    raw = tmp_path / "raw"
    inputs = collect_inputs(raw, derivatives=[deriv])
    assert len(inputs.maps) == 2
    assert inputs.dataset_root == deriv.resolve()
    assert inputs.participants_path == raw.resolve() / "participants.tsv"
    assert inputs.source_datasets == (raw.resolve().as_uri(), deriv.resolve().as_uri())


def test_raw_dataset_without_derivatives_hints_at_them(tmp_path):
    make_bids_derivatives(tmp_path / "raw", n_subjects=2, raw=True, name="fitlins")
    with pytest.raises(EmptySelectionError, match="--derivatives.*fitlins"):
        collect_inputs(tmp_path / "raw")


def test_participants_fall_back_to_derivatives_root(tmp_path):
    deriv = make_bids_derivatives(tmp_path / "raw", n_subjects=2, raw=True)
    (tmp_path / "raw" / "participants.tsv").rename(deriv / "participants.tsv")
    inputs = collect_inputs(tmp_path / "raw", derivatives=[deriv])
    assert inputs.participants_path == deriv.resolve() / "participants.tsv"


def test_read_only_input_is_not_written(tmp_path):
    src = make_bids_derivatives(tmp_path / "src", n_subjects=2)
    ro = tmp_path / "ro"
    shutil.copytree(src, ro)
    # Running as root ignores permissions, so also compare the listing and mtimes.
    before = sorted((p.relative_to(ro), p.stat().st_mtime_ns) for p in [ro, *ro.rglob("*")])
    for path in [ro, *ro.rglob("*")]:
        mode = stat.S_IREAD | (stat.S_IEXEC if path.is_dir() else 0)
        path.chmod(mode)
    try:
        inputs = collect_inputs(ro)
        assert len(inputs.maps) == 2
    finally:
        for path in [ro, *ro.rglob("*")]:
            path.chmod(0o755)
    after = sorted((p.relative_to(ro), p.stat().st_mtime_ns) for p in [ro, *ro.rglob("*")])
    assert after == before


@pytest.mark.parametrize("labels", [["01", "03"], ["sub-01", "sub-03"], ["sub-01", "03"]])
def test_participant_labels_with_or_without_prefix(bids_derivatives, labels):
    inputs = collect_inputs(bids_derivatives(n_subjects=4), participant_labels=labels)
    assert [m.entities["subject"] for m in inputs.maps] == ["01", "03"]


def test_unknown_participant_label_is_named(bids_derivatives):
    root = bids_derivatives(n_subjects=2)
    with pytest.raises(EmptySelectionError, match="07"):
        collect_inputs(root, participant_labels=["01", "07"])
    with pytest.raises(EmptySelectionError, match="subjects present: 01, 02"):
        collect_inputs(root, participant_labels=["07"])


def test_filter_selecting_nothing_lists_present_values(bids_derivatives):
    root = bids_derivatives(n_subjects=2, contrasts=("faces", "words"))
    with pytest.raises(EmptySelectionError, match="contrast values present: faces, words") as err:
        collect_inputs(root, input_filters={"contrast": "houses"})
    assert err.value.exit_code == 18
    with pytest.raises(EmptySelectionError, match="task values present: faces"):
        collect_inputs(root, input_filters={"task": "rest"})


def test_unknown_entity_is_a_usage_error(bids_derivatives):
    with pytest.raises(UsageError, match=r"'colour'.*valid entities:.*contrast") as err:
        collect_inputs(bids_derivatives(), input_filters={"colour": "red"})
    assert err.value.exit_code == 64


def test_nested_filter_is_a_usage_error(bids_derivatives):
    with pytest.raises(UsageError, match="flat mapping"):
        collect_inputs(bids_derivatives(), bids_filters={"bold": {"task": "x"}})


def test_bids_filters_apply_on_top(bids_derivatives):
    root = bids_derivatives(n_subjects=2, contrasts=("a", "b", "c"))
    inputs = collect_inputs(
        root, input_filters={"contrast": ["a", "b"]}, bids_filters={"contrast": ["b", "c"]}
    )
    assert {m.entities["contrast"] for m in inputs.maps} == {"b"}
    with pytest.raises(EmptySelectionError, match="bids-filter-file"):
        collect_inputs(root, input_filters={"contrast": "a"}, bids_filters={"contrast": "c"})
    inputs = collect_inputs(root, bids_filters={"subject": "sub-02", "contrast": "c"})
    assert _names(inputs) == [map_name("02", contrast="c")]


def test_missing_paths_and_bad_descriptions(tmp_path, bids_derivatives):
    with pytest.raises(MissingInputError, match="nowhere") as err:
        collect_inputs(tmp_path / "nowhere")
    assert err.value.exit_code == 66
    root = bids_derivatives()
    with pytest.raises(MissingInputError, match="--derivatives.*gone"):
        collect_inputs(root, derivatives=[tmp_path / "gone"])
    (root / "dataset_description.json").write_text("{not json")
    with pytest.raises(BidsDatasetError, match="dataset_description.json is not valid JSON"):
        collect_inputs(root)
    (root / "dataset_description.json").unlink()
    with pytest.raises(BidsDatasetError, match="no dataset_description.json") as err:
        collect_inputs(root)
    assert err.value.exit_code == 16


def test_duplicate_maps_name_files_and_entity(bids_derivatives):
    root = bids_derivatives(n_subjects=2)
    extra = root / "sub-01" / "func" / map_name("01", desc="smooth")
    write_map(extra, np.ones((6, 7, 8)))
    with pytest.raises(DataError, match=r"subject 01.*desc-smooth.*differ by desc") as err:
        collect_inputs(root)
    assert err.value.exit_code == 65
    assert len(collect_inputs(root, input_filters={"desc": None}).maps) == 2


def test_desc_null_or_value(bids_derivatives):
    root = bids_derivatives(n_subjects=2)
    write_map(root / "sub-01" / "func" / map_name("01", desc="smooth"), np.ones((6, 7, 8)))
    inputs = collect_inputs(root, input_filters={"desc": "smooth"})
    assert _names(inputs) == [map_name("01", desc="smooth")]
    # "absent or smooth" keeps sub-01's two maps: ambiguous again.
    with pytest.raises(DataError, match="differ by desc"):
        collect_inputs(root, input_filters={"desc": [None, "smooth"]})


def test_nii_and_niigz_duplicate_differ_by_extension(bids_derivatives):
    root = bids_derivatives(n_subjects=1)
    write_map(root / "sub-01" / "func" / map_name("01", extension=".nii"), np.ones((6, 7, 8)))
    with pytest.raises(DataError, match="differ by extension"):
        collect_inputs(root)
    assert len(collect_inputs(root, input_filters={"extension": "nii"}).maps) == 1


def test_sessions_are_not_duplicates(bids_derivatives):
    root = bids_derivatives(n_subjects=2, sessions=("1", "2"))
    inputs = collect_inputs(root)
    assert [(m.entities["subject"], m.entities["session"]) for m in inputs.maps] == [
        ("01", "1"),
        ("01", "2"),
        ("02", "1"),
        ("02", "2"),
    ]
    assert len(collect_inputs(root, input_filters={"session": "2"}).maps) == 2


def test_two_tasks_same_contrast_need_a_task_filter(tmp_path):
    root = make_bids_derivatives(tmp_path / "ds", n_subjects=2)
    for sub in ("01", "02"):
        write_map(root / f"sub-{sub}" / "func" / map_name(sub, task="other"), np.ones((6, 7, 8)))
    with pytest.raises(DataError, match="differ by task"):
        collect_inputs(root)
    assert len(collect_inputs(root, input_filters={"task": "other"}).maps) == 2
    # With GroupBy [contrast, task] both tasks are wanted.
    assert len(collect_inputs(root, group_by=("contrast", "task")).maps) == 4


def test_suffix_filter_disables_stat_default(tmp_path):
    root = make_bids_derivatives(tmp_path / "ds", n_subjects=2)
    for sub in ("01", "02"):
        for label in ("GM", "WM"):
            name = f"sub-{sub}_space-MNI152NLin2009cAsym_label-{label}_probseg.nii.gz"
            write_map(root / f"sub-{sub}" / "anat" / name, np.ones((6, 7, 8)))
    inputs = collect_inputs(root, input_filters={"suffix": "probseg", "label": "GM"})
    assert [m.entities["label"] for m in inputs.maps] == ["GM", "GM"]
    assert all("stat" not in m.entities for m in inputs.maps)


def test_no_participants_file_gives_empty_indexed_frame(bids_derivatives):
    inputs = collect_inputs(bids_derivatives(n_subjects=3, participants=None))
    assert inputs.participants_path is None
    assert list(inputs.participants.index) == ["01", "02", "03"]
    assert inputs.participants.shape == (3, 0)


def test_subjects_absent_from_participants_are_kept(bids_derivatives):
    root = bids_derivatives(n_subjects=3, participants=None)
    write_participants(root / "participants.tsv", {"participant_id": ["sub-01"], "age": [30]})
    inputs = collect_inputs(root)
    assert len(inputs.maps) == 3
    assert list(inputs.participants.index) == ["01"]


def test_read_participants_types_and_na(tmp_path):
    path = write_participants(
        tmp_path / "participants.tsv",
        {
            "participant_id": ["sub-01", "sub-02", "03"],
            "age": [21, None, 30.5],
            "sex": ["F", "M", None],
            "code": ["007", "8", "9"],
        },
    )
    table = read_participants(path)
    assert list(table.index) == ["01", "02", "03"]
    assert "participant_id" not in table.columns
    assert table["age"].dtype == np.float64
    assert np.isnan(table.loc["02", "age"])
    assert table["sex"].isna().tolist() == [False, False, True]
    assert not pd.api.types.is_numeric_dtype(table["sex"])
    assert table["code"].tolist() == [7, 8, 9]


def test_read_participants_errors(tmp_path):
    path = write_participants(tmp_path / "p.tsv", {"subject": ["sub-01"], "age": [3]})
    with pytest.raises(DataError, match=r"p\.tsv has no participant_id column"):
        read_participants(path)
    path = write_participants(tmp_path / "p.tsv", {"participant_id": ["sub-01", "01"]})
    with pytest.raises(DataError, match="sub-01 appear"):
        read_participants(path)


def test_layout_keeps_path_type(bids_derivatives):
    inputs = collect_inputs(str(bids_derivatives()))  # type: ignore[arg-type]
    assert isinstance(inputs.maps[0].path, Path)


def test_files_without_subject_are_ignored(bids_derivatives):
    root = bids_derivatives(n_subjects=2)
    name = "task-faces_space-MNI152NLin2009cAsym_contrast-faces_stat-effect_statmap.nii.gz"
    write_map(root / name, np.ones((6, 7, 8)))
    assert [m.entities["subject"] for m in collect_inputs(root).maps] == ["01", "02"]
