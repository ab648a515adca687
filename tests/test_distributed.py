"""Permutations on a real Dask cluster on loopback: same seed, same bits, even when a worker dies.

The cluster is real: a ``dask scheduler`` process and two ``dask worker`` processes (no nanny,
one thread each) started by the test with this interpreter, talking over TCP on 127.0.0.1 and
found through a scheduler file, as on an HPC cluster. Skipped when Dask is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from clicheck import check_failure, run_ok
from conftest import make_bids_derivatives

from bids_group import executor
from bids_group.decoding import map_chunks
from bids_group.executor import InProcessExecutor
from bids_group.images import load_masked_data
from bids_group.inference import mixed_permutation, permutation
from bids_group.inference.mixed_permutation import mixed_permutation_test
from bids_group.inference.permutation import permutation_test
from bids_group.memory import iter_tiles
from bids_group.store import STORE_FOLDER, load_data, release

pytest.importorskip("distributed")

PERM_ARGS = ("--permutation", "voxel", "cluster", "tfce", "--n-perm", "1500", "--seed", "11",
             "--cluster-forming-p", "0.01", "--no-report")  # fmt: skip


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        env={**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"},
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(scheduler file, [worker processes]): a scheduler and two single-thread workers."""
    folder = tmp_path_factory.mktemp("dask")
    sched_file = folder / "scheduler.json"
    procs = [
        _start(["distributed.cli.dask_scheduler", "--scheduler-file", str(sched_file),
                "--host", "127.0.0.1", "--port", "0", "--no-dashboard"], folder / "sched.log")
    ]  # fmt: skip
    deadline = time.monotonic() + 60
    while not sched_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sched_file.exists(), (folder / "sched.log").read_text()
    for i in range(2):
        procs.append(
            _start(
                [
                    "distributed.cli.dask_worker",
                    "--scheduler-file",
                    str(sched_file),
                    "--nthreads",
                    "1",
                    "--no-nanny",
                    "--no-dashboard",
                    "--host",
                    "127.0.0.1",
                    "--name",
                    f"w{i}",
                ],
                folder / f"worker{i}.log",
            )  # fmt: skip
        )
    from distributed import Client

    with Client(scheduler_file=str(sched_file), timeout=60) as client:
        client.wait_for_workers(2, timeout=60)
    yield sched_file, procs[1:]
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed") / "ds"
    return make_bids_derivatives(root, n_subjects=14, shape=(8, 9, 7), seed=5)


def _outputs(summary: dict) -> dict[str, bytes]:
    """Every map's values and every table's text, by file name (sidecars and report aside)."""
    out: dict[str, bytes] = {}
    for name in summary["files"]:
        path = Path(name)
        if name.endswith(".nii.gz"):
            out[path.name] = np.asarray(nib.load(path).dataobj).tobytes()
        elif name.endswith(".tsv"):
            out[path.name] = path.read_bytes()
    return out


@pytest.mark.parametrize("chunk", [64, 1024])
def test_chunks_in_any_process_equal_the_stream(monkeypatch, chunk):
    """The chunked path (each chunk on a fresh engine, merged in order) gives the bits of the
    single stream: sign flips and row permutations, voxel, cluster and TFCE, small chunks (one
    or two batches each) and one chunk."""
    monkeypatch.setattr(permutation, "CHUNK_RELABELLINGS", chunk)
    rng = np.random.default_rng(0)
    mask = np.ones((6, 5, 4), bool)
    y = rng.normal(0.3, 1, (12, mask.sum())).astype(np.float32)
    group = np.repeat([0.0, 1.0], 6)
    for design, contrast in (
        (np.ones((12, 1)), np.ones(1)),
        (np.column_stack([np.ones(12), group]), np.array([0.0, 1.0])),
    ):
        kwargs = {"n_perm": 700, "seed": 3, "mask": mask, "cluster_forming_p": 0.05,
                  "tfce": True, "two_sided": True}  # fmt: skip
        ref = permutation_test(y, design, contrast, **kwargs)
        got = permutation_test(y, design, contrast, executor=InProcessExecutor(), **kwargs)
        np.testing.assert_array_equal(got.null_max_stat, ref.null_max_stat)
        np.testing.assert_array_equal(got.p_uncorrected, ref.p_uncorrected)
        np.testing.assert_array_equal(got.clusters.null_max_mass, ref.clusters.null_max_mass)
        np.testing.assert_array_equal(got.tfce.null_max, ref.tfce.null_max)
        np.testing.assert_array_equal(got.tfce.p_uncorrected, ref.tfce.p_uncorrected)


def test_mixed_effects_chunks_on_reused_engines_equal_the_stream(monkeypatch):
    """Mixed-effects sign flips in chunks of one batch: each chunk after the first runs on the
    engine the previous one left (restarted), and the pooled null is the single stream's."""
    monkeypatch.setattr(permutation, "CHUNK_RELABELLINGS", 32)
    rng = np.random.default_rng(4)
    mask = np.ones((5, 4, 3), bool)
    y = rng.normal(0.4, 1, (10, mask.sum()))
    v = rng.uniform(0.2, 1.0, y.shape)
    kwargs = {"method": "dl", "n_perm": 150, "seed": 9, "mask": mask, "tfce": True,
              "cluster_forming_p": 0.05}  # fmt: skip
    ref = mixed_permutation_test(y, v, np.ones((10, 1)), np.ones(1), **kwargs)
    built = []
    real_init = mixed_permutation._MixedEngine.__init__

    def counting_init(self, *args, **kw):  # counts the engines built, and builds them
        built.append(1)
        real_init(self, *args, **kw)

    monkeypatch.setattr(mixed_permutation._MixedEngine, "__init__", counting_init)
    got = mixed_permutation_test(y, v, np.ones((10, 1)), np.ones(1), executor=InProcessExecutor(),
                                 **kwargs)  # fmt: skip
    assert len(built) == 2  # the client's engine, and one for the five chunks
    np.testing.assert_array_equal(got.null_max_stat, ref.null_max_stat)
    np.testing.assert_array_equal(got.p_uncorrected, ref.p_uncorrected)
    np.testing.assert_array_equal(got.clusters.null_max_mass, ref.clusters.null_max_mass)
    np.testing.assert_array_equal(got.tfce.null_max, ref.tfce.null_max)
    np.testing.assert_array_equal(got.tfce.p_uncorrected, ref.tfce.p_uncorrected)


def test_dask_cluster_gives_the_in_process_files(cluster, dataset, tmp_path):
    sched_file, _ = cluster
    local, _ = run_ok(dataset, tmp_path / "local", *PERM_ARGS)
    remote, err = run_ok(
        dataset, tmp_path / "remote", *PERM_ARGS, "--scheduler-file", sched_file, "-v"
    )
    assert "2 workers, 2 threads" in err
    ours, theirs = _outputs(local), _outputs(remote)
    assert ours.keys() == theirs.keys() and any("nulldist" in k for k in ours)
    for name in ours:
        assert ours[name] == theirs[name], name


@pytest.fixture(scope="module")
def holed(tmp_path_factory) -> Path:
    """24 maps on which the automatic mask narrows (one map zero on two slices, one NaN on a
    slab), with a group blob, and a user mask crossing the NaN slab."""
    bids = make_bids_derivatives(tmp_path_factory.mktemp("holed") / "ds", n_subjects=24,
                                 shape=(20, 20, 20), seed=3)  # fmt: skip
    for i, path in enumerate(sorted(bids.rglob("*_statmap.nii.gz"))):
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
        data[5:12, 5:12, 5:12] += 2.0 * (i % 2)
        if i == 3:
            data[:, :, :2] = 0.0
        if i == 10:
            data[:3, :, :] = np.nan
        nib.Nifti1Image(data, image.affine).to_filename(path)
    mask = np.zeros((20, 20, 20), dtype=np.uint8)
    mask[:, 1:19, :] = 1
    nib.Nifti1Image(mask, image.affine).to_filename(bids.parent / "mask.nii.gz")
    return bids


def _holed_maps(holed: Path) -> list[Path]:
    return sorted(holed.rglob("*_statmap.nii.gz"))


@pytest.mark.parametrize("user_mask", [False, True])
def test_chunks_of_maps_decode_to_the_same_matrix(holed, tmp_path, user_mask):
    """Maps decoded in chunks (the tasks of the workers, here in process) and merged give the
    matrix, mask and dropped count of the single stream, in memory and in the tiled store."""
    paths = _holed_maps(holed)
    mask_path = holed.parent / "mask.nii.gz" if user_mask else None
    ref = load_masked_data(paths, mask_path=mask_path)
    assert ref.n_dropped > 0  # the mask did narrow (automatic) or lose voxels (user mask)
    for budget, work in ((2**30, None), (2**20, tmp_path / "w")):
        got = load_data(paths, budget=budget, work_dir=work, mask_path=mask_path,
                        executor=InProcessExecutor())  # fmt: skip
        try:
            matrix = got.data if work is None else np.hstack([t for _, t in iter_tiles(got.data)])
            assert isinstance(got.data, np.ndarray) == (work is None)
            np.testing.assert_array_equal(got.mask, ref.mask)
            assert got.n_dropped == ref.n_dropped
            assert matrix.dtype == np.float32 and matrix.tobytes() == ref.data.tobytes()
        finally:
            release(got)
    assert map_chunks(24, 8000, 1) == [(i, i + 6) for i in range(0, 24, 6)]


@pytest.mark.parametrize("tiled", [False, True], ids=["in-memory", "tiled"])
def test_maps_decoded_on_the_workers_give_the_in_process_files(cluster, holed, tmp_path, tiled):
    """The workers decode the maps (and write the tiled store into the shared work folder, with a
    tiny --mem-budget): every output equals the run decoded in this process."""
    sched_file, _ = cluster
    args = [*PERM_ARGS, "--n-perm", "300", "-v", "--mask", str(holed.parent / "mask.nii.gz")]
    if tiled:
        args += ["--mem-budget", "1MB", "-w", str(tmp_path / "work")]
    local, local_err = run_ok(holed, tmp_path / "local", *args)
    remote, err = run_ok(holed, tmp_path / "remote", *args, "--scheduler-file", sched_file)
    assert "tasks on the Dask workers" in err and "tasks on the Dask workers" not in local_err
    assert ("voxel-tiled store" in err) == tiled and "Dropped" in err
    # the relabellings run on the workers, from the store too (they read it in -w)
    assert "tasks on the executor's workers" in err and "in this process" not in err
    ours, theirs = _outputs(local), _outputs(remote)
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name in ours:
        assert ours[name] == theirs[name], name
    if tiled:
        assert not list((tmp_path / "work" / STORE_FOLDER).glob("*/*")), "the store is removed"


def test_a_map_that_fails_on_a_worker_names_the_file(cluster, capsys, holed, tmp_path):
    """A truncated map found by a worker stops the run with exit 65 naming it, as in process."""
    sched_file, _ = cluster
    copy = tmp_path / "ds"
    shutil.copytree(holed, copy)
    bad = _holed_maps(copy)[7]
    bad.write_bytes(bad.read_bytes()[:-4000])
    check_failure(capsys, [copy, tmp_path / "out", "group", *PERM_ARGS[:4],
                           "--scheduler-file", sched_file], tmp_path / "out", 65,
                  bad.name, "truncated")  # fmt: skip


def _worker(sched_file: Path, name: str, log: Path) -> subprocess.Popen:
    return _start(["distributed.cli.dask_worker", "--scheduler-file", str(sched_file),
                   "--nthreads", "1", "--no-nanny", "--no-dashboard", "--host", "127.0.0.1",
                   "--name", name], log)  # fmt: skip


def _kill_when_busy(sched_file: Path, victim: subprocess.Popen, name: str, task: str,
                    run: subprocess.Popen) -> None:  # fmt: skip
    """SIGKILL ``victim`` (worker ``name``) as soon as it runs a task whose key starts with
    ``task``, while ``run`` goes on."""
    from distributed import Client

    with Client(scheduler_file=str(sched_file), timeout=30) as client:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None:
            names = {w: info.get("name") for w, info in client.scheduler_info()["workers"].items()}
            busy = [
                w
                for w, keys in client.processing().items()
                if names.get(w) == name and any(str(k).startswith(task) for k in keys)
            ]
            if busy:
                break
            time.sleep(0.01)
        assert run.poll() is None, "the run ended before the worker could be killed"
        assert busy, f"worker {name} never ran a {task} task"
        os.killpg(victim.pid, signal.SIGKILL)


def _run_killing_a_worker(sched_file: Path, tmp_path: Path, name: str, task: str, bids: Path,
                          args: list[str]) -> tuple[dict, str]:  # fmt: skip
    """The CLI on ``bids`` with ``args`` on the cluster, while a third worker ``name`` joins and
    is SIGKILLed as soon as it runs a ``task`` task: (the run's JSON summary, its stderr), the
    run having succeeded."""
    victim = _worker(sched_file, name, tmp_path / f"{name}.log")
    from distributed import Client

    with Client(scheduler_file=str(sched_file), timeout=30) as client:
        client.wait_for_workers(len(client.scheduler_info()["workers"]) + 1, timeout=60)
    argv = [sys.executable, "-m", "bids_group", str(bids), str(tmp_path / "remote"), "group",
            *args, "--scheduler-file", str(sched_file), "--json", "-v"]  # fmt: skip
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _kill_when_busy(sched_file, victim, name, task, run)
        stdout, stderr = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, stderr
    return json.loads(stdout), stderr


def test_a_worker_killed_while_decoding_changes_nothing(cluster, tmp_path):
    """A third worker joins, and is SIGKILLed while it decodes a chunk of maps into the tiled
    store: its chunks are decoded again on the others, and every output equals the in-process
    run's."""
    sched_file, _ = cluster
    bids = make_bids_derivatives(tmp_path / "ds", n_subjects=36, shape=(72, 72, 60), seed=8)
    args = ["--permutation", "voxel", "--n-perm", "20", "--seed", "2", "--no-report",
            "--smoothing-fwhm", "6", "--mem-budget", "32MB",
            "-w", str(tmp_path / "work")]  # fmt: skip
    remote, stderr = _run_killing_a_worker(sched_file, tmp_path, "victim", "decode_task", bids,
                                           args)  # fmt: skip
    assert "voxel-tiled store" in stderr and "tasks on the Dask workers" in stderr
    local, _ = run_ok(bids, tmp_path / "local", *args)
    ours, theirs = _outputs(local), _outputs(remote)
    assert ours.keys() == theirs.keys() and len(ours) > 5
    for name in ours:
        assert ours[name] == theirs[name], name


def test_a_worker_killed_while_permuting_the_store_changes_nothing(cluster, holed, tmp_path):
    """Data in the tiled store (tiny --mem-budget): a third worker, which reads the store in the
    shared work folder and keeps its residuals in a scratch file there, is SIGKILLed while it
    runs a chunk of relabellings; its chunks run again on the others, every output equals the
    in-process run's and no scratch file is left."""
    sched_file, _ = cluster
    args = [*PERM_ARGS, "--n-perm", "3000", "--mask", str(holed.parent / "mask.nii.gz"),
            "--mem-budget", "1MB", "-w", str(tmp_path / "work")]  # fmt: skip
    remote, stderr = _run_killing_a_worker(sched_file, tmp_path, "victim-store", "run_chunk",
                                           holed, args)  # fmt: skip
    assert "voxel-tiled store" in stderr and "tasks on the executor's workers" in stderr
    local, _ = run_ok(holed, tmp_path / "local", *args)
    ours, theirs = _outputs(local), _outputs(remote)
    assert ours.keys() == theirs.keys() and any("nulldist" in k for k in ours)
    for name in ours:
        assert ours[name] == theirs[name], name
    assert not list((tmp_path / "work" / STORE_FOLDER).glob("*/*")), "the store is removed"


@pytest.mark.parametrize("scheme", ["flip", "permute"])
def test_workers_read_the_residuals_the_client_wrote(holed, tmp_path, scheme):
    """With data in the tiled store, the residuals are written once, by the client's engine, in
    the work folder; the engines running the chunks read that file (no copy of their own) and
    leave it to its owner; the pooled null equals the single stream's (sign flips and row
    permutations)."""
    data = load_data(_holed_maps(holed), budget=2**20, work_dir=tmp_path / "work",
                     bytes_per_cell=20)  # fmt: skip
    try:
        assert not isinstance(data.data, np.ndarray)
        scratch = data.data.scratch
        group = np.repeat([1.0, 0.0], 12)
        design, contrast = np.column_stack([np.ones(24), group]), np.array([0.0, 1.0])
        if scheme == "flip":  # one sample: sign flips, residual tiles in the store's tiles
            design, contrast = np.ones((24, 1)), np.ones(1)
        kwargs = {"n_perm": 400, "seed": 4, "mask": data.mask, "tfce": True, "two_sided": True}
        ref = permutation_test(data.data, design, contrast, **kwargs)
        written = []
        real = permutation._DiskTiles.__init__

        def counting(self, *args, **kw):  # counts the residual files written, and writes them
            written.append(1)
            real(self, *args, **kw)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(permutation, "CHUNK_RELABELLINGS", 64)
            patch.setattr(permutation._DiskTiles, "__init__", counting)
            got = permutation_test(data.data, design, contrast, executor=InProcessExecutor(),
                                   **kwargs)  # fmt: skip
        assert written == [1]  # the client's; the chunks' engines borrowed it
        assert not list(scratch.glob("residuals-*")), "the owner removed it"
        np.testing.assert_array_equal(got.null_max_stat, ref.null_max_stat)
        np.testing.assert_array_equal(got.p_uncorrected, ref.p_uncorrected)
        np.testing.assert_array_equal(got.tfce.null_max, ref.tfce.null_max)
    finally:
        release(data)


def test_a_killed_worker_changes_nothing(cluster, dataset, tmp_path):
    """SIGKILL one worker while it runs a chunk: the scheduler reruns its tasks on the other
    worker and every output equals the in-process run."""
    sched_file, workers = cluster
    local, _ = run_ok(dataset, tmp_path / "local", *PERM_ARGS)
    argv = [sys.executable, "-m", "bids_group", str(dataset), str(tmp_path / "remote"), "group",
            *PERM_ARGS, "--n-perm", "6000", "--scheduler-file", str(sched_file),
            "--json"]  # fmt: skip
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from distributed import Client

    victim = workers[0]
    with Client(scheduler_file=str(sched_file), timeout=30) as client:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None:
            busy = {w for w, tasks in client.processing().items() if tasks}
            names = {w: info.get("name") for w, info in client.scheduler_info()["workers"].items()}
            if any(names.get(w) == "w0" for w in busy):
                break
            time.sleep(0.05)
        assert run.poll() is None, "the run ended before a worker could be killed"
        os.killpg(victim.pid, signal.SIGKILL)
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr
    remote = json.loads(stdout)
    n6000 = run_ok(dataset, tmp_path / "local6000", *PERM_ARGS, "--n-perm", "6000")[0]
    ours, theirs = _outputs(n6000), _outputs(remote)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name] == theirs[name], name
    assert local  # the 1,500-relabelling run above is the fixture's warm-up


def test_a_run_without_a_scheduler_imports_no_dask(dataset, tmp_path):
    """The default path (a permutation run) never imports Dask."""
    code = (
        "import sys\n"
        "from bids_group.cli import main\n"
        f"rc = main([{str(dataset)!r}, {str(tmp_path / 'out')!r}, 'group', '-q', '--no-report',"
        f" '--permutation', 'tfce', '--n-perm', '50'])\n"
        "assert rc == 0, rc\n"
        "assert not {'dask', 'distributed'} & set(sys.modules), 'Dask was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_scheduler_options_need_permutations_and_a_scheduler(capsys, dataset, tmp_path,
                                                            monkeypatch):  # fmt: skip
    monkeypatch.setattr(executor, "SCHEDULER_FILE_WAIT", 0.5)  # a file that never comes
    none = tmp_path / "none.json"
    check_failure(capsys, [dataset, tmp_path / "o1", "group", "--scheduler-file", none],
                  tmp_path / "o1", 64, "--permutation")  # fmt: skip
    check_failure(capsys, [dataset, tmp_path / "o2", "group", *PERM_ARGS[:4],
                           "--scheduler-file", tmp_path / "none.json"],
                  tmp_path / "o2", 69, "none.json")  # fmt: skip
    check_failure(capsys, [dataset, tmp_path / "o3", "group", *PERM_ARGS[:4],
                           "--dask-scheduler", "tcp://127.0.0.1:9", "--scheduler-file",
                           tmp_path / "none.json"], tmp_path / "o3", 64, "one of")  # fmt: skip


@pytest.mark.parametrize("content", ["Name: not json\n", '{"type": "Scheduler"}', "[1, 2]"])
def test_a_file_that_is_not_a_scheduler_file_is_refused(capsys, dataset, tmp_path, content,
                                                        monkeypatch):  # fmt: skip
    """A model file or a half-written file given as --scheduler-file: one line naming it, exit
    69 once the wait for the scheduler is over (it was an AssertionError inside Dask after 10
    reads, then a 60 s hang)."""
    monkeypatch.setattr(executor, "SCHEDULER_FILE_WAIT", 0.5)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(content)
    argv = [dataset, tmp_path / "out", "group", *PERM_ARGS[:4], "--scheduler-file", wrong]
    check_failure(capsys, argv, tmp_path / "out", 69, "wrong.json", "no scheduler address")


def test_a_scheduler_file_written_after_the_start_is_waited_for(cluster, dataset, tmp_path):
    """README's SLURM recipe starts the scheduler in the background and bids-group at once: the
    scheduler file appears a moment later. The run waits for it (it stopped with exit 69, no
    such file) and gives the in-process files."""
    sched_file, _ = cluster
    late = tmp_path / "late-scheduler.json"
    timer = threading.Timer(2.0, lambda: late.write_text(Path(sched_file).read_text()))
    timer.start()
    try:
        remote, err = run_ok(dataset, tmp_path / "remote", *PERM_ARGS, "--n-perm", "200",
                             "--scheduler-file", str(late), "-v")  # fmt: skip
    finally:
        timer.cancel()
    assert "waiting up to 30 s for the scheduler to write" in err
    local, _ = run_ok(dataset, tmp_path / "local", *PERM_ARGS, "--n-perm", "200")
    ours, theirs = _outputs(local), _outputs(remote)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name] == theirs[name], name
