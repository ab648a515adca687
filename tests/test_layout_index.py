"""pybids configured for speed: entities in bulk, and the index saved in the work folder.

The oracle is pybids itself: ``BIDSFile.get_entities()`` file by file, and a fresh in-memory
index of the same dataset.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from clicheck import input_snapshot, run_ok
from conftest import make_bids_derivatives, map_name, write_map

from bids_group import inputs
from bids_group.inputs import collect_inputs


def _dataset(root: Path) -> Path:
    """Sessions, two contrasts, two stats, and maps with a (zero-padded) run and a desc."""
    ds = make_bids_derivatives(
        root, n_subjects=3, contrasts=("faces", "words"), stats=("effect", "t"), sessions=("1", "2")
    )
    for sub in ("01", "02"):
        name = map_name(sub, contrast="faces", desc="smooth").replace("_statmap", "_run-01_statmap")
        write_map(ds / f"sub-{sub}" / "func" / name, [[[1.0]]])
    return ds


def _selection(result: inputs.InputSet) -> list[tuple[Path, list]]:
    """Paths and entities, in order, with the values' types (run is a padded int in pybids)."""
    return [
        (m.path, [(k, v, type(v).__name__) for k, v in m.entities.items()]) for m in result.maps
    ]


def test_bulk_entities_equal_get_entities_file_by_file(tmp_path, monkeypatch):
    ds = _dataset(tmp_path / "ds")
    layout = inputs._index(ds)
    files = layout.get(return_type="object", extension=[".nii", ".nii.gz"])
    assert len(files) > 20
    monkeypatch.setattr(inputs, "_PATHS_PER_QUERY", 7)  # several queries, a partial last one
    bulk = inputs._entities(files)
    assert list(bulk) == [f.path for f in files]
    for f in files:
        expected = f.get_entities()
        assert list(bulk[f.path].items()) == list(expected.items()), f.path
        assert [type(v) for v in bulk[f.path].values()] == [type(v) for v in expected.values()]
    assert any("run" in e for e in bulk.values())


@pytest.mark.parametrize(
    "filters", [None, {"desc": ["smooth", None], "stat": "effect"}, {"stat": "t", "session": "2"}]
)
def test_saved_index_selects_what_a_fresh_index_selects(tmp_path, caplog, filters):
    ds = _dataset(tmp_path / "ds")
    cache = tmp_path / "work" / "bids-group-pybids"
    before = input_snapshot([ds])
    fresh = collect_inputs(ds, bids_filters=filters)
    with caplog.at_level(logging.INFO, logger="bids_group.inputs"):
        saving = collect_inputs(ds, bids_filters=filters, index_cache=cache)
        assert "Saved the pybids index" in caplog.text
        caplog.clear()
        reusing = collect_inputs(ds, bids_filters=filters, index_cache=cache)
        assert "Reused the pybids index" in caplog.text
    assert _selection(saving) == _selection(fresh) == _selection(reusing)
    assert len(fresh.maps) >= 3
    assert input_snapshot([ds]) == before  # nothing written into the dataset


def test_a_changed_dataset_is_indexed_again_and_the_old_index_removed(tmp_path, caplog):
    ds = _dataset(tmp_path / "ds")
    cache = tmp_path / "work"
    first = collect_inputs(ds, index_cache=cache)
    (saved,) = cache.glob("pybids-*")
    write_map(ds / "sub-04" / "ses-1" / "func" / map_name("04", session="1"), [[[2.0]]])
    with caplog.at_level(logging.INFO, logger="bids_group.inputs"):
        second = collect_inputs(ds, index_cache=cache)
    assert "Saved the pybids index" in caplog.text and "Reused" not in caplog.text
    assert len(second.maps) == len(first.maps) + 1
    assert _selection(second) == _selection(collect_inputs(ds))
    (now,) = cache.glob("pybids-*")
    assert now != saved
    # editing a file's content (not its name) changes the state too
    description = ds / "dataset_description.json"
    assert inputs._saved_index(ds, cache) == now
    description.write_text(description.read_text() + " ")
    assert inputs._saved_index(ds, cache) != now


def test_a_damaged_saved_index_is_rebuilt(tmp_path, caplog):
    ds = _dataset(tmp_path / "ds")
    cache = tmp_path / "work"
    expected = _selection(collect_inputs(ds, index_cache=cache))
    (saved,) = cache.glob("pybids-*")
    (saved / "layout_index.sqlite").write_bytes(b"not a database")
    with caplog.at_level(logging.INFO, logger="bids_group.inputs"):
        assert _selection(collect_inputs(ds, index_cache=cache)) == expected
    assert "Cannot reuse the pybids index" in caplog.text


def test_an_unwritable_cache_only_warns(tmp_path, caplog):
    ds = _dataset(tmp_path / "ds")
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would go")
    with caplog.at_level(logging.WARNING, logger="bids_group.inputs"):
        result = collect_inputs(ds, index_cache=blocked / "sub")
    assert "Cannot save the pybids index" in caplog.text
    assert _selection(result) == _selection(collect_inputs(ds))


def test_cli_reuses_the_index_kept_in_the_work_folder(tmp_path):
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=4)
    work = tmp_path / "work"
    args = ("-w", str(work), "--no-report", "-v")
    first, err1 = run_ok(ds, tmp_path / "out1", *args)
    second, err2 = run_ok(ds, tmp_path / "out2", *args)
    assert "Saved the pybids index" in err1 and "Reused the pybids index" in err2
    assert len(list((work / "bids-group-pybids").glob("pybids-*"))) == 1
    z1 = sorted((tmp_path / "out1").rglob("*stat-z_statmap.nii.gz"))
    z2 = sorted((tmp_path / "out2").rglob("*stat-z_statmap.nii.gz"))
    assert z1 and [p.read_bytes() for p in z1] == [p.read_bytes() for p in z2]


def test_index_of_a_dataset_without_generated_by_is_reused(tmp_path):
    """README's own recipe writes a dataset_description.json without GeneratedBy (pybids'
    derivatives validation wants one): the saved index must be reused all the same, not
    rejected with a warning and rebuilt in every run."""
    import json

    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=4)
    description = {"Name": "my study", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}
    (ds / "dataset_description.json").write_text(json.dumps(description))
    args = ("-w", str(tmp_path / "work"), "--no-report", "-v")
    _, err1 = run_ok(ds, tmp_path / "out1", *args)
    _, err2 = run_ok(ds, tmp_path / "out2", *args)
    assert "Saved the pybids index" in err1
    assert "Reused the pybids index" in err2 and "Cannot reuse" not in err2
