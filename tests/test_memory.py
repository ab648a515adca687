"""The memory budget: sizes, the default, the option, the model-file key and the log line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from clicheck import check_failure, run_ok

from bids_group import memory
from bids_group.errors import SpecError
from bids_group.spec import load_spec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GB", 4_000_000_000),
        ("4gb", 4_000_000_000),
        ("2GiB", 2 * 2**30),
        ("1.5 GiB", 3 * 2**29),
        ("512MB", 512_000_000),
        ("512 MiB", 512 * 2**20),
        ("1000", 1000),
        ("3e6", 3_000_000),
        ("64k", 64_000),
        (2_000_000, 2_000_000),
    ],
)
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "4 parsecs", "-1GB", "4 G B", True])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        memory.parse_size(text)


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no MemAvailable in /proc/meminfo")


def test_default_budget_is_half_the_available_memory_at_most_4gb():
    if not Path("/proc/meminfo").exists():
        pytest.skip("needs Linux /proc/meminfo")
    budget, why = memory.default_budget()
    expected = min(_meminfo_available() // 2, 4 * 10**9)
    # MemAvailable moves between the two reads: a 5% band (and the cgroup can only lower it)
    assert budget <= 4 * 10**9
    assert budget <= expected * 1.05
    assert "half the available memory" in why or "cap" in why


def test_tile_voxels_fits_the_work_share_and_is_aligned():
    for n_maps, budget in [(10, 10**6), (300, 10**8), (5000, 4 * 10**9), (40_000, 4 * 10**9)]:
        width = memory.tile_voxels(n_maps, budget)
        assert width % memory.TILE_ALIGN == 0
        assert width <= memory.MAX_TILE_VOXELS
        if width > memory.TILE_ALIGN:
            cells = n_maps * width * memory.FIT_BYTES_PER_CELL
            assert cells <= memory.WORK_FRACTION * budget


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("lots", "not a size"),
        ("4 parsecs", "unknown unit"),
        ("10kB", "must be an integer >= 1000000"),
    ],
)
def test_bad_mem_budget_is_refused(capsys, bids_derivatives, tmp_path, value, needle):
    bids = bids_derivatives(n_subjects=3)
    argv = [bids, tmp_path / "out", "group", "--mem-budget", value]
    check_failure(capsys, argv, tmp_path / "out", 64, "--mem-budget", needle)


def test_keep_store_needs_a_work_folder(capsys, bids_derivatives, tmp_path):
    bids = bids_derivatives(n_subjects=3)
    argv = [bids, tmp_path / "out", "group", "--keep-store"]
    check_failure(capsys, argv, tmp_path / "out", 64, "--keep-store", "-w")


def _model(tmp_path: Path, budget) -> Path:
    model = {
        "Name": "m",
        "BIDSModelVersion": "1.0.0",
        "Nodes": [
            {
                "Level": "Dataset",
                "Name": "d",
                "GroupBy": ["contrast"],
                "Model": {"Type": "glm", "X": [1], "Software": {"bids-group": {}}},
                "DummyContrasts": {"Test": "t"},
            }
        ],
    }
    if budget is not None:
        model["Nodes"][0]["Model"]["Software"]["bids-group"]["MemoryBudget"] = budget
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    return path


def test_model_file_key(tmp_path):
    assert load_spec(_model(tmp_path, "3GiB")).memory_budget == 3 * 2**30
    assert load_spec(_model(tmp_path, None)).memory_budget is None
    with pytest.raises(SpecError, match=r"Software\.bids-group\.MemoryBudget.*unknown unit"):
        load_spec(_model(tmp_path, "3 bananas"))
    with pytest.raises(SpecError, match=r"MemoryBudget == 5, must be an integer >= 1000000"):
        load_spec(_model(tmp_path, 5))


def _logged_budget(stderr: str) -> str:
    found = re.search(r"memory budget: ([^\n]*)", stderr)
    assert found, stderr
    return found.group(1)


def test_budget_is_logged_from_option_model_or_default(bids_derivatives, tmp_path):
    bids = bids_derivatives(n_subjects=3)
    _, stderr = run_ok(bids, tmp_path / "o1", "-v", "--mem-budget", "2GB")
    assert _logged_budget(stderr) == "2 GB (--mem-budget)"
    model = _model(tmp_path, "300MB")
    _, stderr = run_ok(bids, tmp_path / "o2", "-v", "--model", str(model))
    assert _logged_budget(stderr) == "300 MB (model file MemoryBudget)"
    _, stderr = run_ok(bids, tmp_path / "o3", "-v", "--model", str(model), "--mem-budget", "1GiB")
    assert _logged_budget(stderr) == "1.07 GB (--mem-budget)"
    _, stderr = run_ok(bids, tmp_path / "o4", "-v")
    assert "(default: " in _logged_budget(stderr)


def test_threads_default_to_the_cpus_this_process_may_use(bids_derivatives, tmp_path):
    """--n-jobs defaults to the process's CPU affinity (a SLURM job's cores): under taskset
    with one core the run uses one thread, unrestricted as many as the affinity allows."""
    import os
    import shutil
    import subprocess
    import sys

    from bids_group.memory import available_cpus

    assert available_cpus() == min(len(os.sched_getaffinity(0)), available_cpus())
    if shutil.which("taskset") is None:
        pytest.skip("taskset is not installed")
    code = "from bids_group.memory import available_cpus; print(available_cpus())"
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code],
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert pinned.stdout.strip() == "1"
    bids = bids_derivatives(n_subjects=3)
    _, stderr = run_ok(bids, tmp_path / "o1", "-v")
    assert f"threads: {available_cpus()} (--n-jobs" in stderr
    _, stderr = run_ok(bids, tmp_path / "o2", "-v", "--n-jobs", "1")
    assert "threads: 1 (--n-jobs" in stderr


_FAULTS = """
import gzip, resource, sys, zlib
from pathlib import Path
import numpy as np
from bids_group.memory import keep_heap_warm
print(keep_heap_warm() if sys.argv[1] == "tuned" else "default")
path = Path(sys.argv[2])
volume = np.zeros(900_000, dtype=np.float32)  # a 2 mm map: a quarter of it brain
volume[::4] = np.random.default_rng(0).standard_normal(225_000)
path.write_bytes(gzip.compress(volume.tobytes(), compresslevel=1))
def decode():  # what images._nifti_gz_array allocates for a map
    return len(zlib.decompress(path.read_bytes(), 31))
decode()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    decode()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_heap_warm_stops_faulting_in_every_decoded_map(tmp_path):
    """A decoded map (3.6 MB) used to be mapped afresh and faulted in page by page (~900 page
    faults at least); with the heap kept warm, its memory is reused."""
    faults = {}
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode, str(tmp_path / "map.gz")],
                             capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
        if mode == "tuned" and out[0] != "True":
            pytest.skip("not glibc")
        faults[mode] = float(out[1])
    assert faults["default"] > 500
    assert faults["tuned"] < 50
