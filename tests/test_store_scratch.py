"""Permutation inference on data in the tiled store writes the Freedman-Lane residuals to a
scratch file beside the store: a run that fails while writing it (a full disk, a file-size
limit) must not leave the partial file in a store kept with ``--keep-store`` (it is as large
as twice the data, and every failed or interrupted run added one).

The limit is real: the CLI runs in a child process under ``RLIMIT_FSIZE`` (Linux), so the
write of the residuals fails with EFBIG exactly as on a disk that fills up.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys

import pytest
from clicheck import snapshot
from conftest import make_bids_derivatives

from bids_group.store import STORE_FOLDER

#: 24 maps of 8,000 voxels: the store is 768 kB (float32), over half of the 1 MB budget, and
#: the residuals of sign flips are 1.5 MB (float64). A 1 MB file-size limit lets the store be
#: written and stops the residuals.
SHAPE = (20, 20, 20)
FILE_LIMIT = 1_000_000


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE semantics")
def test_failed_residual_write_leaves_no_scratch_file_in_a_kept_store(tmp_path):
    bids = make_bids_derivatives(tmp_path / "ds", n_subjects=24, shape=SHAPE, seed=3)
    work, out = tmp_path / "work", tmp_path / "out"
    before = snapshot(bids)
    argv = [sys.executable, "-m", "bids_group", str(bids), str(out), "group", "--no-report",
            "--mem-budget", "1MB", "-w", str(work), "--keep-store",
            "--permutation", "voxel", "--n-perm", "10"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, preexec_fn=_limit_file_size)
    assert done.returncode == 73, done.stderr
    assert "cannot write the permutation residuals" in done.stderr
    assert "file too large" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == "" and not out.exists()
    assert snapshot(bids) == before
    (store,) = (work / STORE_FOLDER).iterdir()  # the store itself was complete: kept
    assert sorted(p.name for p in store.iterdir()) == ["manifest.json", "mask.npy", "tiles.f32"]
