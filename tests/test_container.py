"""Run the CLI the way the Docker/Apptainer image runs it.

No Docker engine exists in CI, so this reproduces the container's constraints on the host:
an unprivileged user (uid 65534, as root drops to it with ``setpriv``), a read-only input
folder, a HOME that does not exist / cannot be written, no network (a fresh network namespace
from ``unshare -n``), and a clean environment. The run must succeed and leave the input as it was.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ds-faces"
NOBODY = 65534


def tree_digest(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def make_read_only(folder: Path) -> None:
    for p in [folder, *folder.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def container_prefix() -> list[str]:
    """Wrappers that give the child no network and, when we are root, an unprivileged user."""
    prefix: list[str] = []
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not available to remove the network")
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is not available to drop privileges")
        probe = subprocess.run([unshare, "-n", "true"], capture_output=True, check=False)
        if probe.returncode != 0:
            pytest.skip("cannot create a network namespace here")
        prefix = [
            unshare,
            "-n",
            setpriv,
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
        ]
        importable = subprocess.run(
            [*prefix, sys.executable, "-c", "import bids_group.pipeline"],
            capture_output=True,
            cwd="/",
            check=False,
        )
        if importable.returncode != 0:
            pytest.skip("the unprivileged user cannot read this checkout's Python environment")
    else:
        probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, check=False)
        if probe.returncode != 0:
            pytest.skip("cannot create a user+network namespace here")
        prefix = [unshare, "-rn"]
    return prefix


def test_cli_runs_like_in_a_container():
    prefix = container_prefix()
    scratch = Path(tempfile.mkdtemp(prefix="bids-group-container-"))
    try:
        scratch.chmod(0o777)  # the unprivileged user must be able to create OUT_DIR here
        data = scratch / "data"
        shutil.copytree(EXAMPLE, data)
        make_read_only(data)
        before = tree_digest(data)
        out = scratch / "out"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": "/nonexistent",  # as with `--containall` / a user without a home
            "LANG": "C.UTF-8",
        }
        command = [
            *prefix,
            sys.executable,
            "-c",
            "from bids_group.cli import console_main; console_main()",
            str(data),
            str(out),
            "group",
            "--height-control",
            "fdr",
            "--alpha",
            "0.05",
        ]
        proc = subprocess.run(
            command, capture_output=True, text=True, env=env, cwd="/", check=False, timeout=300
        )
        assert proc.returncode == 0, proc.stderr
        written = proc.stdout.split()
        assert written and all(Path(p).is_file() for p in written)
        assert (out / "dataset_description.json").is_file()
        assert any(p.endswith("_stat-z_statmap.nii.gz") for p in written)
        assert "Traceback" not in proc.stderr
        assert tree_digest(data) == before, "the input folder was modified"
        assert not Path("/nonexistent").exists()
    finally:
        for p in [scratch, *scratch.rglob("*")]:
            if p.is_dir():
                p.chmod(0o777)
        shutil.rmtree(scratch, ignore_errors=True)


def test_permutation_runs_from_a_read_only_install_without_home(tmp_path):
    """The numba kernels from a read-only install with no writable home (an Apptainer image
    run with --containall, a read-only HPC software module). numba refuses to import a module
    whose cache it can write nowhere, so bids-group points it at a private folder under TMPDIR
    (bids_group/inference/_numba_cache.py). The read-only install is a read-only bind mount of
    the package folder in a private mount namespace (``unshare -rm``), which binds even root."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not available")
    probe = subprocess.run(
        [unshare, "-rm", "sh", "-c", f"mount --bind {tmp_path} {tmp_path}"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip("cannot create a user + mount namespace here")
    import bids_group

    package = Path(bids_group.__file__).resolve().parent
    temp = tmp_path / "tmp"
    temp.mkdir()
    out = tmp_path / "out"
    mount_read_only = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift'
    command = [
        unshare, "-rm", "sh", "-c", f'{mount_read_only} && exec "$@"', "sh", str(package),
        sys.executable, "-c", "from bids_group.cli import console_main; console_main()",
        str(EXAMPLE), str(out), "group", "--permutation", "voxel", "--n-perm", "100",
        "--no-report", "-q",
    ]  # fmt: skip
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(package / "no-home"),  # on the read-only mount: cannot be created
        "TMPDIR": str(temp),
        "LANG": "C.UTF-8",
    }
    proc = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd="/", check=False, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert any(p.endswith("_desc-permVoxel_statmap.nii.gz") for p in proc.stdout.split())
    # the child's uid is 0 inside the user namespace, whatever ours is
    (cache,) = temp.glob("bids-group-numba-*")
    assert any(cache.rglob("*.nbi")), "the kernels were not cached in the private folder"
    assert cache.stat().st_mode & 0o077 == 0  # private to the user
    assert not (package / "no-home").exists()
