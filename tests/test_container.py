"""Run the CLI the way the Docker/Apptainer image runs it.

The first two tests reproduce the container's constraints on the host: an unprivileged user
(uid 65534, as root drops to it with ``setpriv``), a read-only input folder, a HOME that does not
exist / cannot be written, no network (a fresh network namespace from ``unshare -n``), and a clean
environment. The run must succeed and leave the input as it was.

The last two run the image itself: the Dockerfile built with buildah by ``.ci/build-image.sh``
(``.ci/run`` does it in CI). There is no Docker engine in CI and ``podman run`` cannot start a
container in its sandbox (crun: setrlimit RLIMIT_NOFILE / RLIMIT_NPROC: Operation not
permitted), so the image runs with ``buildah run --isolation chroot`` inside ``unshare -n``:
the image's entrypoint as a uid that the image does not know (``docker run --user 12345``), with
the input bound read-only, no network and no HOME. Its outputs must equal a host run's. Without
buildah or the image they skip, except in CI (``CI=true``), where the image must have been built.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
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


# ---------------------------------------------------------------------------------------------
# The image itself (built by .ci/build-image.sh)
# ---------------------------------------------------------------------------------------------

IMAGE = os.environ.get("BIDS_GROUP_IMAGE", "localhost/bids-group:ci")
BUILD_LOG = Path(os.environ.get("BIDS_GROUP_CI_WORK", "/var/tmp/bids-group-ci")) / "build.log"
IN_CI = os.environ.get("CI", "").lower() == "true"
USER = "12345:12345"  # a uid the image does not know, as `docker run --user 12345:12345`
SOURCE_DIGEST = (
    "import hashlib, pathlib, bids_group; root = pathlib.Path(bids_group.__file__).parent; "
    "print(hashlib.sha256(b''.join(str(p.relative_to(root)).encode() + p.read_bytes() "
    "for p in sorted(root.rglob('*')) if p.suffix in ('.py', '.json'))).hexdigest())"
)


def unavailable(reason: str):
    """Skip on a developer machine; in CI, where .ci/run builds the image, fail instead."""
    if IN_CI:
        log = BUILD_LOG.read_text(errors="replace")[-4000:] if BUILD_LOG.is_file() else ""
        pytest.fail(f"{reason}; CI=true, where .ci/build-image.sh builds it. {BUILD_LOG}:\n{log}")
    pytest.skip(reason)


class Image:
    """The built image, run with ``buildah run --isolation chroot`` in a new network namespace."""

    def __init__(self, buildah: str, unshare: str, name: str):
        self.buildah, self.unshare, self.name = buildah, unshare, name
        config = json.loads(self._buildah("inspect", "--type", "image", name))["OCIv1"]["config"]
        self.entrypoint: list[str] = config["Entrypoint"]
        self.default_user: str = config.get("User", "")
        self.env = dict(e.split("=", 1) for e in config.get("Env", []))

    def _buildah(self, *args: str) -> str:
        proc = subprocess.run(
            [self.buildah, *args], capture_output=True, text=True, check=False, timeout=120
        )
        assert proc.returncode == 0, f"buildah {' '.join(args)}: {proc.stderr}"
        return proc.stdout.strip()

    def container(self) -> str:
        """A fresh working container (its own /tmp: no numba cache of an earlier run)."""
        return self._buildah("from", "--pull-never", "--quiet", self.name)

    def remove(self, container: str) -> None:
        subprocess.run([self.buildah, "rm", container], capture_output=True, check=False)

    def mount(self, container: str) -> Path:
        return Path(self._buildah("mount", container))

    def run(self, container, args, binds=(), entrypoint=True, user=USER, timeout=600):
        volumes = [x for host, inside, mode in binds for x in ("-v", f"{host}:{inside}:{mode}")]
        command = [
            self.unshare, "-n",  # no network
            self.buildah, "run", "--isolation", "chroot", "--user", user,
            "-e", "HOME=/nonexistent",  # no home, as `--containall` / a uid without a home
            *volumes, container, "--", *(self.entrypoint if entrypoint else []), *args,
        ]  # fmt: skip
        return subprocess.run(
            command, capture_output=True, text=True, check=False, cwd="/", timeout=timeout
        )


@pytest.fixture(scope="module")
def image() -> Image:
    buildah, unshare = shutil.which("buildah"), shutil.which("unshare")
    if buildah is None or unshare is None:
        unavailable("buildah (or unshare) is not installed: the image cannot be run")
    if os.geteuid() != 0:
        unavailable("running the image with buildah needs root here (as .ci/run runs)")
    probe = subprocess.run(
        [buildah, "inspect", "--type", "image", IMAGE], capture_output=True, check=False
    )
    if probe.returncode != 0:
        unavailable(f"no image {IMAGE}: build it with .ci/build-image.sh")
    img = Image(buildah, unshare, IMAGE)
    c = img.container()
    try:
        proc = img.run(c, ["python3", "-c", SOURCE_DIGEST], entrypoint=False)
        assert proc.returncode == 0, proc.stderr
        here = subprocess.run(
            [sys.executable, "-c", SOURCE_DIGEST], capture_output=True, text=True, check=True
        )
        if proc.stdout.strip() != here.stdout.strip():
            unavailable(f"{IMAGE} was built from other sources: rebuild it (.ci/build-image.sh)")
    finally:
        img.remove(c)
    return img


@pytest.fixture
def dataset(tmp_path) -> Path:
    """The example with README command 1's model inside it, read-only; outputs go to ``out``."""
    data = tmp_path / "data"
    shutil.copytree(EXAMPLE, data)
    shutil.copy(ROOT / "configs" / "two_sample_age.yaml", data / "model.yaml")
    make_read_only(data)
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)  # the container's uid writes here
    yield data
    for p in [tmp_path, *tmp_path.rglob("*")]:
        if p.is_dir():
            p.chmod(0o777)


def host_run(args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from bids_group.cli import console_main; console_main()"]
    proc = subprocess.run(
        [*command, *args], capture_output=True, text=True, check=False, cwd="/", timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def nifti_bytes(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


#: Provenance that legitimately differs between the two runs, besides the paths (the host's
#: folders appear as /data and /out/... in the container): when the report was made, how long the
#: run took, and the Python version (the image's Debian python3 vs the host's).
VOLATILE = [
    (re.compile(r"Generated \d{4}-\d\d-\d\d \d\d:\d\d UTC"), "Generated <time>"),
    (re.compile(r"<dd>[\d.]+ s \(before the report\)</dd>"), "<dd><duration></dd>"),
    (re.compile(r"python <b>[\d.]+</b>"), "python <b><version></b>"),
]


def assert_same_outputs(host: Path, container: Path, paths: dict[str, str]) -> None:
    """Same files; NIfTI (header and data, uncompressed), tables and figures byte-identical;
    JSON, HTML and the README identical once the paths are mapped and VOLATILE is blanked."""
    files = sorted(str(p.relative_to(host)) for p in host.rglob("*") if p.is_file())
    assert files == sorted(
        str(p.relative_to(container)) for p in container.rglob("*") if p.is_file()
    )
    assert any(f.endswith(".nii.gz") for f in files)
    for name in files:
        a, b = host / name, container / name
        if name.endswith((".nii", ".nii.gz")):
            assert nifti_bytes(a) == nifti_bytes(b), f"{name}: the NIfTI files differ"
        elif name.endswith((".json", ".html", ".md")):  # README.md records the command too
            text = a.read_text()
            for here, there in sorted(paths.items(), key=lambda kv: -len(kv[0])):
                text = text.replace(here, there)
            texts = [text, b.read_text()]
            for pattern, blank in VOLATILE:
                texts = [pattern.sub(blank, t) for t in texts]
            if name.endswith(".json"):
                assert json.loads(texts[0]) == json.loads(texts[1]), f"{name} differs"
            else:
                assert texts[0] == texts[1], f"{name} differs beyond paths, time and versions"
        else:  # .tsv tables, .png / .svg figures
            assert a.read_bytes() == b.read_bytes(), f"{name} differs"


@pytest.mark.slow
def test_image_runs_readme_command_1_like_the_host(image, dataset):
    """README command 1 in the image: non-root, read-only input, no network, no HOME."""
    assert image.entrypoint == ["bids-group"] and image.default_user not in ("", "0", "root")
    out = dataset.parent / "out"
    c = image.container()
    try:
        probe = ["python3", "-c", "import socket; print(socket.if_nameindex())"]
        ifaces = image.run(c, probe, entrypoint=False)
        assert ifaces.returncode == 0 and ifaces.stdout.strip() == "[(1, 'lo')]", ifaces
        before = tree_digest(dataset)
        args = ["group", "--model"]
        t0 = time.perf_counter()
        proc = image.run(
            c,
            ["/data", "/out/container", *args, "/data/model.yaml"],
            binds=[(dataset, "/data", "ro"), (out, "/out", "rw")],
        )
        seconds = time.perf_counter() - t0
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        print(f"README command 1 in the image: {seconds:.1f} s")
        assert tree_digest(dataset) == before, "the input folder was modified"
        assert not (image.mount(c) / "nonexistent").exists()
    finally:
        image.remove(c)
    host_run([str(dataset), str(out / "host"), *args, str(dataset / "model.yaml")])
    written = {
        (out / "container").stat().st_uid,
        (out / "container" / "dataset_description.json").stat().st_uid,
    }
    assert written == {12345}
    assert_same_outputs(
        out / "host",
        out / "container",
        {str(dataset): "/data", str(out / "host"): "/out/container"},
    )


@pytest.mark.slow
def test_image_permutation_uses_the_precompiled_kernels(image, dataset):
    """The image ships the permutation kernels compiled at build time (BIDS_GROUP_NUMBA_SEED,
    read-only). The first permutation run of a user with an empty cache starts from a copy of
    them in its private cache folder and compiles nothing: afterwards that folder holds exactly
    the seed's files (numba rewrites a kernel's index when it compiles). Outputs as the host's."""
    seed = image.env["BIDS_GROUP_NUMBA_SEED"]
    out = dataset.parent / "out"
    methods = ["--permutation", "voxel", "cluster", "tfce", "--n-perm", "100"]
    args = ["group", *methods, "--no-report", "-q"]
    c = image.container()
    try:
        t0 = time.perf_counter()
        proc = image.run(
            c,
            ["/data", "/out/container", *args],
            binds=[(dataset, "/data", "ro"), (out, "/out", "rw")],
        )
        seconds = time.perf_counter() - t0
        assert proc.returncode == 0, proc.stderr
        print(f"first permutation run in the image: {seconds:.1f} s")
        root = image.mount(c)
        seeded = {
            p.relative_to(root / seed.lstrip("/")): p
            for p in (root / seed.lstrip("/")).rglob("*.nb?")
        }
        assert seeded, f"no pre-compiled kernels in the image's {seed}"
        (cache,) = (root / "tmp").glob("bids-group-numba-*")
        cached = {p.relative_to(cache): p for p in cache.rglob("*.nb?")}
        assert sorted(cached) == sorted(seeded), "kernels were compiled at run time"
        changed = [str(k) for k, p in cached.items() if p.read_bytes() != seeded[k].read_bytes()]
        assert not changed, f"kernels were compiled at run time: {changed}"
        assert all(p.stat().st_mode & 0o222 == 0 for p in seeded.values())  # read-only seed
    finally:
        image.remove(c)
    host_run([str(dataset), str(out / "host"), *args])
    assert_same_outputs(
        out / "host",
        out / "container",
        {str(dataset): "/data", str(out / "host"): "/out/container"},
    )
