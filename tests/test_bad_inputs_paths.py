"""Paths: inputs are read-only, every disk failure is exit 73, wrong kinds of path are named.

Each case runs the real CLI (in-process through :func:`clicheck.check_failure`, or as a
subprocess in a private mount namespace for real full, read-only or unwritable file systems)
and checks the exit code, the message, that OUT_DIR is as before with no staging folder left,
and that no input changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clicheck import check_failure, input_snapshot, snapshot
from conftest import make_bids_derivatives

from bids_group.cli import main
from bids_group.outputs.staging import TMP_MARKER

MODEL = """
Name: faces
BIDSModelVersion: 1.0.0
Nodes:
  - Level: Dataset
    Name: group
    GroupBy: [contrast]
    Model: {Type: glm, X: [1]}
    Contrasts:
      - {Name: mean, ConditionList: [1], Weights: [1], Test: t}
"""


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """A raw dataset whose maps are in ``raw/derivatives/firstlevel``."""
    make_bids_derivatives(tmp_path / "raw", n_subjects=5, raw=True)
    return tmp_path / "raw"


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    """A derivatives dataset of first-level maps (the usual BIDS_DIR)."""
    return make_bids_derivatives(tmp_path / "ds", n_subjects=5)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "results"


def maps_of(folder: Path) -> dict[str, str]:
    """Relative path -> digest of every result file except the run-specific ones."""
    skip = ("dataset_description.json", "_report.html", ".svg")
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(skip)
    }


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


# ---- 1. inputs are read-only ------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_out_dir_is_a_derivatives_folder(capsys, raw, overwrite):
    deriv = raw / "derivatives" / "firstlevel"
    before = mtimes(deriv)
    argv = [raw, deriv, "group", "--derivatives", deriv, *overwrite]
    err = check_failure(capsys, argv, deriv, 64, f"OUT_DIR {deriv} is --derivatives {deriv}")
    assert "--overwrite" not in err  # never advise an action that destroys an input
    assert mtimes(deriv) == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_out_dir_inside_a_derivatives_folder(capsys, raw, overwrite):
    deriv = raw / "derivatives" / "firstlevel"
    out = deriv / "group"
    argv = [raw, out, "group", "--derivatives", deriv, *overwrite]
    err = check_failure(capsys, argv, out, 64, str(out), f"inside --derivatives {deriv}")
    assert "never writes into its inputs" in err
    assert str(raw / "derivatives" / "bids-group") in err  # the suggestion is a safe place


def test_out_dir_inside_a_derivatives_bids_dir(capsys, ds):
    out = ds / "derivatives" / "bids-group"
    check_failure(capsys, [ds, out, "group"], out, 64, str(out), f"inside BIDS_DIR {ds}")


def test_out_dir_inside_a_raw_bids_dir_outside_derivatives(capsys, raw):
    out = raw / "results"
    argv = [raw, out, "group", "--derivatives", raw / "derivatives" / "firstlevel"]
    err = check_failure(capsys, argv, out, 64, str(out), f"inside BIDS_DIR {raw}")
    assert f"choose e.g. {raw / 'derivatives' / 'bids-group'}" in err


def test_out_dir_contains_the_inputs(capsys, raw, tmp_path):
    argv = [raw, tmp_path, "group", "--derivatives", raw / "derivatives" / "firstlevel"]
    check_failure(capsys, argv, tmp_path, 64, f"OUT_DIR {tmp_path} contains BIDS_DIR {raw}")


def test_out_dir_symlink_into_a_dataset(capsys, ds, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(ds / "sub-01", target_is_directory=True)
    out = link / "group"
    check_failure(capsys, [ds, out, "group"], out, 64, str(ds / "sub-01" / "group"), str(ds))


def test_work_dir_inside_a_dataset(capsys, ds, out):
    work = ds / "work"
    check_failure(capsys, [ds, out, "group", "-w", work], out, 64, f"(-w) {work} is inside")
    assert not work.exists()


def test_work_dir_inside_out_dir(capsys, ds, out):
    work = out / "work"
    check_failure(capsys, [ds, out, "group", "-w", work], out, 64, str(work), f"OUT_DIR {out}")


def test_model_in_out_dir_is_not_replaced(capsys, ds, out, tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text(MODEL)
    assert main([str(ds), str(out), "group", "-q", "--model", str(model), "--no-report"]) == 0
    capsys.readouterr()
    written = out / "model-faces_smdl.json"  # re-running the model as written: a natural thing
    before = written.stat().st_mtime_ns
    argv = [ds, out, "group", "--model", written, "--overwrite", "--no-report"]
    check_failure(capsys, argv, out, 64, f"input file {written}", "model-faces_smdl.json")
    assert written.stat().st_mtime_ns == before


def test_mask_in_a_node_folder_of_out_dir_is_not_replaced(capsys, ds, out):
    assert main([str(ds), str(out), "group", "-q", "--no-report"]) == 0
    capsys.readouterr()
    mask = next((out / "node-dataset").glob("*_mask.nii.gz"))
    argv = [ds, out, "group", "--mask", mask, "--overwrite", "--no-report"]
    check_failure(capsys, argv, out, 64, f"input file {mask}", "node-dataset")


def test_filter_file_in_out_dir_is_not_replaced(capsys, ds, out):
    assert main([str(ds), str(out), "group", "-q", "--no-report"]) == 0
    capsys.readouterr()
    filters = out / "node-dataset" / "filters.json"
    filters.write_text('{"task": "faces"}')
    argv = [ds, out, "group", "--bids-filter-file", filters, "--overwrite", "--no-report"]
    check_failure(capsys, argv, out, 64, f"input file {filters}")


def test_input_file_in_out_dir_that_no_output_replaces_is_fine(capsys, ds, out):
    out.mkdir()
    model = out / "my-model.yaml"
    model.write_text(MODEL)
    assert main([str(ds), str(out), "group", "-q", "--model", str(model), "--no-report"]) == 0
    assert model.read_text() == MODEL


def test_raw_derivatives_bids_group_works_and_a_second_run_selects_the_same_maps(capsys, raw):
    deriv = raw / "derivatives" / "firstlevel"
    out = raw / "derivatives" / "bids-group"
    before = input_snapshot([raw / "participants.tsv", raw / "dataset_description.json", deriv])
    argv = [str(raw), str(out), "group", "--derivatives", str(deriv), "--json"]
    assert main(argv) == 0
    first = maps_of(out)
    assert any(name.endswith("_stat-z_statmap.nii.gz") for name in first)
    assert main([*argv, "--overwrite"]) == 0  # our results now lie in raw/derivatives
    assert maps_of(out) == first
    # BIDS_DIR = the maps' dataset, OUT_DIR its sibling: the same maps again
    sibling = [str(deriv), str(out), "group", "--overwrite"]
    assert main(sibling) == 0
    assert maps_of(out) == first
    capsys.readouterr()
    assert input_snapshot([raw / "participants.tsv", raw / "dataset_description.json", deriv]) == (
        before
    )


def test_results_inside_a_derivatives_bids_dir_are_not_taken_for_inputs(capsys, ds, tmp_path):
    """Results put into the maps' dataset (by hand, or by an older version) are not re-read."""
    first = tmp_path / "first"
    assert main([str(ds), str(first), "group", "-q", "--no-report"]) == 0
    shutil.copytree(first, ds / "group")
    again = tmp_path / "again"
    assert main([str(ds), str(again), "group", "-q", "--no-report"]) == 0
    assert maps_of(again) == maps_of(first)


def test_a_run_writes_nothing_outside_out_dir(ds, tmp_path):
    """Subprocess (fresh matplotlib): its scratch folder is private and removed at exit."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MPLCONFIGDIR"}
    env |= {"TMPDIR": str(scratch), "HOME": str(tmp_path / "home")}
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bids_group", str(ds), str(out), "group", "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert list(scratch.iterdir()) == []
    assert not (tmp_path / "home").exists()


# ---- 5. the wrong kind of path ----------------------------------------------------------------


def test_model_is_a_folder(capsys, ds, out, tmp_path):
    check_failure(
        capsys, [ds, out, "group", "--model", tmp_path], out, 66, "is a folder; expected a model"
    )


def test_mask_is_a_folder(capsys, ds, out, tmp_path):
    check_failure(
        capsys, [ds, out, "group", "--mask", tmp_path], out, 66, "is a folder; expected a NIfTI"
    )


def test_filter_file_is_a_folder(capsys, ds, out, tmp_path):
    argv = [ds, out, "group", "--bids-filter-file", tmp_path]
    check_failure(capsys, argv, out, 66, f"{tmp_path} is a folder; expected a JSON file")


def test_derivatives_is_a_file(capsys, ds, out):
    file = ds / "dataset_description.json"
    argv = [ds, out, "group", "--derivatives", file]
    check_failure(capsys, argv, out, 66, f"{file} is a file; expected a folder")


def test_work_dir_is_a_file(capsys, ds, out, tmp_path):
    file = tmp_path / "work"
    file.write_text("x")
    argv = [ds, out, "group", "-w", file]
    check_failure(capsys, argv, out, 73, f"{file} is a file; expected a folder")


def test_symlink_loop_in_the_dataset_is_named(capsys, ds, out):
    loop = ds / "sub-02" / "func" / "loop"
    loop.symlink_to("..", target_is_directory=True)
    check_failure(capsys, [ds, out, "group"], out, 16, "symbolic link loop", str(loop))


def test_symlink_ring_in_the_dataset_is_named(capsys, ds, out):
    (ds / "sub-02" / "a").symlink_to("b")
    (ds / "sub-02" / "b").symlink_to("a")
    check_failure(capsys, [ds, out, "group"], out, 16, "ring of symbolic links", "sub-02")


def test_log_lines_name_final_paths_never_the_stage(capsys, ds, out):
    assert main([str(ds), str(out), "group", "-vv"]) == 0
    err = capsys.readouterr().err
    assert f"report written to {out / 'model-default_report.html'}" in err
    staged = [line for line in err.splitlines() if TMP_MARKER in line]
    assert all("staging outputs in" in line for line in staged), staged


# ---- 2. every way the disk can fail: exit 73, one message, nothing left -----------------------


def test_out_dir_component_is_a_file(capsys, ds, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "a" / "results"
    check_failure(capsys, [ds, out, "group"], out, 73, f"{blocker} is a file, not a folder")


def test_work_dir_component_is_a_file(capsys, ds, out, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    work = blocker / "work"
    argv = [ds, out, "group", "-w", work]
    check_failure(capsys, argv, out, 73, f"{blocker} is a file, not a folder")


def test_out_dir_name_too_long(capsys, ds, tmp_path):
    out = tmp_path / ("x" * 300)  # check_failure's snapshot cannot stat it: checked here
    before = input_snapshot([ds])
    assert main([str(ds), str(out), "group"]) == 73
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert "xxxxxxxxxx... is too long (300 bytes); choose a shorter OUT_DIR" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert input_snapshot([ds]) == before


def test_out_dir_name_of_250_bytes_works(capsys, ds, tmp_path):
    out = tmp_path / ("x" * 250)  # the hidden staging folder beside it must still fit
    assert main([str(ds), str(out), "group", "-q", "--no-report"]) == 0
    assert (out / "dataset_description.json").is_file()


def _namespace_reason() -> str | None:
    """Why real file-system tests cannot run here (None when they can)."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private mount namespace: {probe.stderr.strip()}"
    return None


NAMESPACE = _namespace_reason()
needs_namespace = pytest.mark.skipif(NAMESPACE is not None, reason=str(NAMESPACE))


def cli_in_namespace(tmp_path: Path, setup: str, argv: list, *, check: str = "") -> tuple:
    """Run ``setup`` then the CLI on ``argv`` in a private mount namespace.

    ``check`` runs afterwards, still inside (mounts vanish with the namespace); its stdout is
    returned. Returns (exit code, stdout, stderr, check output).
    """
    files = tmp_path / "ns"
    files.mkdir(exist_ok=True)
    cli = " ".join(f"'{a}'" for a in [sys.executable, "-m", "bids_group", *map(str, argv)])
    script = (
        f"set -e\n{setup}\nset +e\n{cli} >{files}/out 2>{files}/err\nrc=$?\n"
        f"{{ {check or 'true'}; }} >{files}/check 2>&1\nexit $rc\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MPLCONFIGDIR"}
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    read = [(files / name).read_text() for name in ("out", "err", "check")]
    return (done.returncode, *read)


def assert_clean_failure(result: tuple, *needles: str) -> None:
    code, out, err, _ = result
    assert code == 73, err
    assert out == ""
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


@needs_namespace
@pytest.mark.parametrize("size", ["4k", "64k"])  # nothing fits / part of the results fits
def test_no_space_left_on_device(ds, tmp_path, size):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = input_snapshot([ds])
    result = cli_in_namespace(
        tmp_path,
        f"mount -t tmpfs -o size={size} tmpfs {mnt}",
        [ds, mnt / "out", "group", "-q"],
        check=f"ls -A {mnt}",
    )
    assert_clean_failure(result, f"cannot write in {mnt / 'out'}: no space left on device")
    assert "free space or choose another OUT_DIR" in result[2]
    assert result[3] == ""  # nothing left behind: no OUT_DIR, no staging folder
    assert input_snapshot([ds]) == before


@needs_namespace
def test_no_space_left_keeps_an_existing_result(ds, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = mnt / "out"
    sums = f"cd {out} && find . -type f -exec sha256sum {{}} + | sort && ls -A {mnt} {out}"
    setup = (
        f"mount -t tmpfs -o size=1m tmpfs {mnt}\n"  # one result (~0.4 MB) fits
        f"{sys.executable} -m bids_group {ds} {out} group -q >/dev/null\n"
        f"({sums}) >{tmp_path}/before\n"
        f"dd if=/dev/zero of={mnt}/filler bs=4k count=1000 2>/dev/null || true\n"
        f"rm {mnt}/filler && dd if=/dev/zero of={mnt}/filler bs=4k count=$(( $(stat -f -c %a "
        f"{mnt}) - 8 )) 2>/dev/null"
    )
    argv = [ds, out, "group", "-q", "--overwrite"]
    result = cli_in_namespace(tmp_path, setup, argv, check=f"rm {mnt}/filler && {sums}")
    assert_clean_failure(result, f"cannot write in {out}: no space left on device")
    assert result[3] == (tmp_path / "before").read_text()


@needs_namespace
@pytest.mark.parametrize("exists", [False, True], ids=["new", "existing"])
def test_read_only_file_system(ds, tmp_path, exists):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = mnt / "out"
    make = f"mkdir {out} && echo mine >{out}/notes.txt\n" if exists else ""
    result = cli_in_namespace(
        tmp_path,
        f"mount -t tmpfs tmpfs {mnt}\n{make}mount -o remount,ro {mnt}",
        [ds, out, "group", "--overwrite"],
        check=f"ls -A {mnt}" + (f" && cat {out}/*" if exists else ""),
    )
    folder = out if exists else mnt
    assert_clean_failure(result, f"cannot write in {folder}: read-only file system")
    assert "choose a writable OUT_DIR" in result[2]
    assert result[3].split() == (["out", "mine"] if exists else [])


@needs_namespace
def test_read_only_work_dir(ds, out, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = cli_in_namespace(
        tmp_path,
        f"mount -t tmpfs tmpfs {mnt}\nmount -o remount,ro {mnt}",
        [ds, out, "group", "-w", mnt / "work"],
    )
    assert_clean_failure(result, f"cannot write in {mnt / 'work'}: read-only file system")
    assert "choose a writable work folder (-w)" in result[2]
    assert not out.exists()


def _drop_dac() -> list[str] | None:
    """A command prefix that runs without permission overrides (root's CAP_DAC_*), or None."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        return None
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    return prefix if probe.returncode == 0 else None


@pytest.mark.skipif(_drop_dac() is None, reason="root, and setpriv cannot drop CAP_DAC_OVERRIDE")
@pytest.mark.parametrize("where", ["parent", "out_dir", "work_dir"])
def test_permission_denied(ds, tmp_path, where):
    locked = tmp_path / "locked"
    locked.mkdir()
    out = locked / "out" if where != "work_dir" else tmp_path / "results"
    if where == "out_dir":
        out.mkdir()
    argv = [ds, out, "group", "--overwrite"]
    if where == "work_dir":
        argv += ["-w", locked / "work"]
    locked.chmod(0o555)
    if where == "out_dir":
        out.chmod(0o555)
    try:
        env = {k: v for k, v in os.environ.items() if k != "MPLCONFIGDIR"}
        done = subprocess.run(
            [*_drop_dac(), sys.executable, "-m", "bids_group", *map(str, argv)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        folder = {"parent": locked, "out_dir": out, "work_dir": locked / "work"}[where]
        what = "work folder (-w)" if where == "work_dir" else "OUT_DIR"
        assert_clean_failure(
            (done.returncode, done.stdout, done.stderr, ""),
            f"cannot write in {folder}: permission denied; choose a writable {what}",
        )
        assert sorted(p.name for p in locked.iterdir()) == (["out"] if where == "out_dir" else [])
        assert where != "out_dir" or list(out.iterdir()) == []
    finally:
        locked.chmod(0o755)
        if out.exists():
            out.chmod(0o755)


def test_existing_result_is_untouched_by_a_refused_run(capsys, raw):
    """Not a disk failure, but the same promise: a refused run changes nothing in OUT_DIR."""
    deriv = raw / "derivatives" / "firstlevel"
    out = raw / "derivatives" / "bids-group"
    assert main([str(raw), str(out), "group", "-q", "--derivatives", str(deriv)]) == 0
    capsys.readouterr()
    before = snapshot(out)
    argv = [raw, out, "group", "--derivatives", deriv, "--model", deriv]
    check_failure(capsys, argv, out, 66, "is a folder")
    assert snapshot(out) == before


@needs_namespace
def test_no_space_left_for_the_compiled_kernels(ds, tmp_path):
    """numba saves the compiled permutation kernels in its cache: a full one is named."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = tmp_path / "results"
    argv = [ds, out, "group", "-q", "--no-report", "--permutation", "voxel", "--n-perm", "20"]
    setup = f"mount -t tmpfs -o size=4k tmpfs {mnt}\nexport NUMBA_CACHE_DIR={mnt}"
    result = cli_in_namespace(tmp_path, setup, argv)
    assert_clean_failure(result, f"cannot write in {mnt}: no space left on device")
    assert "choose another NUMBA_CACHE_DIR" in result[2]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@needs_namespace
def test_full_work_dir_costs_only_the_font_cache(ds, tmp_path):
    """matplotlib's font cache is optional: it says it could not save it, the run goes on."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = tmp_path / "results"
    setup = f"mount -t tmpfs -o size=4k tmpfs {mnt}"
    code, stdout, err, _ = cli_in_namespace(tmp_path, setup, [ds, out, "group", "-w", mnt / "w"])
    assert code == 0, err
    assert (out / "model-default_report.html").is_file()
