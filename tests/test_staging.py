"""Atomic output: results appear only on success; OUT_DIR is untouched on any failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bids_group.errors import OutputError
from bids_group.outputs import staging
from bids_group.outputs.staging import check_writable, staged_output


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (relative) -> file bytes, or None for folders."""
    tree: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        tree[str(path.relative_to(root))] = None if path.is_dir() else path.read_bytes()
    return tree


def write_results(stage: Path, tag: str = "new") -> None:
    (stage / "dataset_description.json").write_text(f'{{"Name": "{tag}"}}')
    (stage / "node-group").mkdir()
    (stage / "node-group" / "contrast-a_stat-t_statmap.nii.gz").write_text(tag)


@pytest.fixture
def existing(tmp_path: Path) -> Path:
    """An OUT_DIR holding an earlier run plus a file of the user's."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "dataset_description.json").write_text('{"Name": "old"}')
    (out / "node-group").mkdir()
    (out / "node-group" / "contrast-stale_stat-t_statmap.nii.gz").write_text("old")
    return out


def test_fresh_out_dir_appears_only_at_the_end(tmp_path):
    out = tmp_path / "out"
    with staged_output(out, overwrite=False) as stage:
        assert not out.exists()
        assert stage.parent == tmp_path and stage.name.startswith(".out.bids-group-tmp-")
        write_results(stage)
    assert snapshot(out) == {
        "dataset_description.json": b'{"Name": "new"}',
        "node-group": None,
        "node-group/contrast-a_stat-t_statmap.nii.gz": b"new",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(3)])
def test_fresh_out_dir_never_created_on_error(tmp_path, error):
    out = tmp_path / "out"
    with pytest.raises(type(error)):
        with staged_output(out, overwrite=False) as stage:
            write_results(stage)
            raise error
    assert list(tmp_path.iterdir()) == []


def test_existing_out_dir_gets_new_entries_and_keeps_user_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with staged_output(out, overwrite=False) as stage:
        assert stage.parent == out and stage.name.startswith(".bids-group-tmp-")
        write_results(stage)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "node-group" / "contrast-a_stat-t_statmap.nii.gz").read_text() == "new"
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset_description.json",
        "node-group",
        "notes.txt",
    ]


def test_refuses_existing_entries_without_overwrite(existing):
    before = snapshot(existing)
    planned = ["dataset_description.json", "model-x_smdl.json", "node-group"]
    with pytest.raises(OutputError, match="dataset_description.json, node-group") as info:
        check_writable(existing, overwrite=False, entries=planned)
    assert info.value.exit_code == 73
    assert "--overwrite" in str(info.value)
    check_writable(existing, overwrite=True, entries=planned)
    check_writable(existing, overwrite=False, entries=["model-x_smdl.json"])
    # the commit checks again (entries may have appeared during the analysis)
    with pytest.raises(OutputError, match="already contains"):
        with staged_output(existing, overwrite=False) as stage:
            write_results(stage)
    assert snapshot(existing) == before


def test_entries_none_means_any_visible_content(tmp_path, existing):
    with pytest.raises(OutputError, match="notes.txt"):
        check_writable(existing, overwrite=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_writable(empty, overwrite=False)


def test_overwrite_replaces_results_of_the_same_names_and_nothing_else(existing):
    (existing / "node-group" / "contrast-stale_stat-t_statmap.nii.gz").unlink()
    (existing / "node-group" / "contrast-a_stat-t_statmap.nii.gz").write_text("old")
    with staged_output(existing, overwrite=True) as stage:
        write_results(stage)
    assert snapshot(existing) == {
        "dataset_description.json": b'{"Name": "new"}',
        "node-group": None,
        "node-group/contrast-a_stat-t_statmap.nii.gz": b"new",
        "notes.txt": b"mine",
    }


def test_overwrite_never_deletes_a_file_the_run_does_not_write(existing):
    """A node folder holding other files (a user's, another model's, a contrast no longer in
    the model) is not replaced: that would delete them. OUT_DIR stays exactly as it was."""
    before = snapshot(existing)
    with pytest.raises(OutputError, match="would delete 1 file.*contrast-stale_stat-t"):
        with staged_output(existing, overwrite=True) as stage:
            write_results(stage)
    assert snapshot(existing) == before
    assert not [p for p in existing.iterdir() if p.name.startswith(".")]  # no stage left


@pytest.mark.parametrize("error", [ValueError("bad"), KeyboardInterrupt(), SystemExit(1)])
def test_existing_out_dir_exactly_as_before_on_error(existing, error):
    before = snapshot(existing)
    with pytest.raises(type(error)):
        with staged_output(existing, overwrite=True) as stage:
            write_results(stage)
            raise error
    assert snapshot(existing) == before


def test_failure_while_moving_into_place_is_rolled_back(existing, monkeypatch):
    (existing / "node-group" / "contrast-stale_stat-t_statmap.nii.gz").unlink()  # not lost
    before = snapshot(existing)
    real_rename = os.rename
    calls = []

    def flaky_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 4:  # after the first entry was swapped in, during the second
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(staging.os, "rename", flaky_rename)
    with pytest.raises(OutputError, match="no space left on device; free space"):
        with staged_output(existing, overwrite=True) as stage:
            write_results(stage)
    monkeypatch.undo()
    assert snapshot(existing) == before


def test_out_dir_created_during_the_run_is_merged(tmp_path):
    out = tmp_path / "out"
    with staged_output(out, overwrite=False) as stage:
        write_results(stage)
        out.mkdir()
        (out / "other.txt").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset_description.json",
        "node-group",
        "other.txt",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_written_lists_final_top_level_paths(tmp_path):
    out = tmp_path / "out"
    staged = staged_output(out, overwrite=False)
    with staged as stage:
        write_results(stage)
    assert staged.written == (out / "dataset_description.json", out / "node-group")


def test_missing_parent(tmp_path):
    with pytest.raises(OutputError, match="parent .* does not exist") as info:
        check_writable(tmp_path / "no" / "out", overwrite=False)
    assert info.value.exit_code == 73


def test_out_dir_under_a_file(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(OutputError, match="is not a folder"):
        check_writable(a_file / "out", overwrite=False)


def test_out_dir_is_a_file(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(OutputError, match="not a folder"):
        check_writable(a_file, overwrite=True)


def test_dangling_symlink_is_not_a_folder(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="not a folder"):
        check_writable(tmp_path / "link", overwrite=True)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_unwritable_parent_even_for_root():
    # /proc refuses new folders even to root, unlike chmod which root ignores.
    with pytest.raises(OutputError, match="cannot write in /proc"):
        check_writable(Path("/proc/bids-group-out"), overwrite=False)
    with pytest.raises(OutputError):
        with staged_output(Path("/proc/bids-group-out"), overwrite=False):
            pass  # pragma: no cover


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_parent(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="cannot write"):
            check_writable(parent / "out", overwrite=False)
    finally:
        parent.chmod(0o755)
