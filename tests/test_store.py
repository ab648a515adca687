"""The voxel-tiled store: a tiny memory budget forces it, and every output equals the
in-memory run's bit for bit; the store is removed, kept, reused and invalidated as documented."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from clicheck import check_failure, run_ok
from conftest import make_bids_derivatives

from bids_group import memory
from bids_group.glm import fit_ols
from bids_group.images import load_masked_data
from bids_group.store import STORE_FOLDER, load_data, release

SHAPE = (20, 20, 20)  # 8,000 voxels: 24 maps are 768 kB of float32, over half of 1 MB
N_SUBJECTS = 24
TINY = "1MB"  # the smallest budget accepted: tiles of 320 voxels for 24 maps

MODEL = """\
Name: two sample age
BIDSModelVersion: "1.0.0"
Nodes:
  - Level: Dataset
    Name: groups
    GroupBy: [contrast]
    Transformations:
      Transformer: pybids-transforms-v1
      Instructions:
        - Name: Factor
          Input: [group]
        - Name: Demean
          Input: [age]
    Model:
      Type: glm
      X: [group.control, group.patient, age]
    Contrasts:
      - Name: patientGtControl
        ConditionList: [group.patient, group.control]
        Weights: [1, -1]
        Test: t
      - Name: anyGroup
        ConditionList: [group.patient, group.control]
        Weights: [[1, 0], [0, 1]]
        Test: F
    DummyContrasts:
      Test: t
      Contrasts: [age]
"""


def _dataset(root: Path, *, holes: bool = True) -> Path:
    """24 subjects; with ``holes``, two maps are zero or NaN on parts of the grid (so the
    automatic mask narrows as maps arrive) and one has an effect blob (clusters survive)."""
    bids = make_bids_derivatives(root, n_subjects=N_SUBJECTS, shape=SHAPE, seed=3)
    paths = sorted(bids.rglob("*_statmap.nii.gz"))
    for i, path in enumerate(paths):
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
        data[5:12, 5:12, 5:12] += 2.0 * (i % 2)  # a group effect: clusters and ARI find it
        if holes and i == 3:
            data[:, :, :2] = 0.0
        if holes and i == 10:
            data[:3, :, :] = np.nan
        nib.Nifti1Image(data, image.affine).to_filename(path)
    return bids


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _dataset(tmp_path_factory.mktemp("store") / "ds")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.yaml"
    path.write_text(MODEL)
    return path


def _maps(out: Path) -> dict[str, np.ndarray]:
    return {
        str(p.relative_to(out)): np.asarray(nib.load(p).dataobj)
        for p in sorted(out.rglob("*.nii.gz"))
    }


def _assert_same_outputs(a: Path, b: Path, *, at_least: int = 8) -> None:
    maps_a, maps_b = _maps(a), _maps(b)
    assert maps_a.keys() == maps_b.keys()
    assert len(maps_a) >= at_least
    for name in maps_a:
        assert maps_a[name].dtype == maps_b[name].dtype, name
        assert np.array_equal(maps_a[name], maps_b[name], equal_nan=True), name
    tables_a = sorted(p.relative_to(a) for p in a.rglob("*.tsv"))
    assert tables_a == sorted(p.relative_to(b) for p in b.rglob("*.tsv"))
    for name in tables_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


INFERENCE = ["--height-control", "fdr", "--cluster-threshold", "5", "--ari", "--two-sided"]


def test_tiny_budget_gives_the_same_files_bit_for_bit(dataset, model, tmp_path):
    """With --keep-store (else a plain OLS run is streamed, tests/test_streamed_fit.py)."""
    common = [*INFERENCE, "--model", str(model), "--no-report", "-v"]
    _, in_memory = run_ok(dataset, tmp_path / "memory", *common, "--mem-budget", "1GB")
    assert "voxel-tiled store" not in in_memory
    work = tmp_path / "work"
    tiny = ["--mem-budget", TINY, "-w", str(work), "--n-jobs", "2"]  # threads decode into it
    _, tiled = run_ok(dataset, tmp_path / "tiled", *common, *tiny, "--keep-store")
    assert "voxel-tiled store" in tiled and "tiles of 320 voxels" in tiled
    assert "Automatic mask" in tiled and "least coverage" in tiled  # the mask did narrow
    _assert_same_outputs(tmp_path / "memory", tmp_path / "tiled", at_least=20)
    # every statistic and correction is there, each compared above
    names = " ".join(_maps(tmp_path / "tiled"))
    for stat in ("stat-z", "stat-p", "stat-effect", "stat-variance", "stat-t", "stat-F",
                 "stat-rsquared", "stat-residualvariance", "desc-fdr", "tdp"):  # fmt: skip
        assert stat in names, stat
    assert "streamed" not in tiled and list((work / STORE_FOLDER).glob("*")), "kept"


def _slab_mask(dataset: Path, mask_path: Path) -> Path:
    """A user mask of 7,200 voxels (over half the tiny budget) that crosses the NaN slab of one
    map of ``dataset``, written to ``mask_path``: some of its voxels are dropped."""
    reference = nib.load(next(dataset.rglob("*_statmap.nii.gz")))
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[:, 1:19, :] = 1
    nib.Nifti1Image(mask, reference.affine).to_filename(mask_path)
    return mask_path


def test_user_mask_with_non_finite_voxels(dataset, tmp_path):
    mask_path = _slab_mask(dataset, tmp_path / "mask.nii.gz")
    common = ["--mask", str(mask_path), "--no-report", "-v"]
    run_ok(dataset, tmp_path / "memory", *common)
    _, tiled = run_ok(dataset, tmp_path / "tiled", *common, "--mem-budget", TINY,
                      "-w", str(tmp_path / "work"), "--keep-store")  # fmt: skip
    assert "voxel-tiled store" in tiled and "Dropped" in tiled
    _assert_same_outputs(tmp_path / "memory", tmp_path / "tiled")


def test_store_equals_the_in_memory_matrix(dataset, tmp_path):
    """The store's tiles, put side by side, are the in-memory matrix; the fit equals it."""
    paths = sorted(dataset.rglob("*_statmap.nii.gz"))
    expected = load_masked_data(paths)
    data = load_data(paths, budget=10**6, work_dir=tmp_path)
    try:
        assert not isinstance(data.data, np.ndarray)
        assert data.data.shape == expected.data.shape
        assert np.array_equal(data.mask, expected.mask) and data.n_dropped == expected.n_dropped
        assert np.array_equal(data.affine, expected.affine)
        widths = []
        stacked = np.empty(expected.data.shape, dtype=np.float32)
        for block, tile in memory.iter_tiles(data.data):
            stacked[:, block] = tile
            widths.append(block.stop - block.start)
        assert np.array_equal(stacked, expected.data)
        assert len(set(widths[:-1])) == 1 and widths[0] % memory.TILE_ALIGN == 0
        design = np.column_stack([np.ones(len(paths)), np.arange(len(paths)) % 2])
        tiled, whole = fit_ols(data.data, design), fit_ols(expected.data, design)
        for name in ("beta", "residual_variance", "r_squared"):
            assert np.array_equal(getattr(tiled, name), getattr(whole, name)), name
        # an independent oracle of the fit itself: numpy's least squares in float64
        beta = np.linalg.lstsq(design, expected.data.astype(np.float64), rcond=None)[0]
        np.testing.assert_allclose(tiled.beta, beta, rtol=1e-9, atol=1e-12)
    finally:
        release(data)
    assert not data.data.folder.exists()


def _store_folders(work: Path) -> list[Path]:
    return sorted((work / STORE_FOLDER).glob("*")) if (work / STORE_FOLDER).exists() else []


def test_keep_reuse_and_invalidate(tmp_path):
    bids = _dataset(tmp_path / "ds", holes=False)
    work = tmp_path / "work"
    args = ["--no-report", "-v", "--mem-budget", TINY, "-w", str(work)]
    _, first = run_ok(bids, tmp_path / "o1", *args, "--keep-store")
    assert "voxel-tiled store" in first and "kept the tiled store" in first
    (folder,) = _store_folders(work)
    assert {p.name for p in folder.iterdir()} == {"tiles.f32", "mask.npy", "manifest.json"}
    tiles_mtime = (folder / "tiles.f32").stat().st_mtime_ns

    _, second = run_ok(bids, tmp_path / "o2", *args, "--keep-store")
    assert "reusing the tiled store" in second and "voxel-tiled store" not in second
    assert (folder / "tiles.f32").stat().st_mtime_ns == tiles_mtime  # not written again
    _assert_same_outputs(tmp_path / "o1", tmp_path / "o2")

    # one map's modification time changes: the store is built again, results unchanged
    victim = sorted(bids.rglob("*_statmap.nii.gz"))[5]
    stat = victim.stat()
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _, third = run_ok(bids, tmp_path / "o3", *args, "--keep-store")
    assert "not reusing the tiled store" in third and "modification time changed" in third
    assert "voxel-tiled store" in third
    _assert_same_outputs(tmp_path / "o1", tmp_path / "o3")

    # one map's content (and size) changes: built again, and the results follow the new map
    image = nib.load(victim)
    data = np.asarray(image.dataobj, dtype=np.float32) + 5.0
    nib.Nifti1Image(data, image.affine).to_filename(victim)
    _, fourth = run_ok(bids, tmp_path / "o4", *args)  # without --keep-store: removed, and
    assert "not reusing the tiled store" in fourth  # this OLS run is streamed instead
    assert "streamed" in fourth and _store_folders(work) == []
    run_ok(bids, tmp_path / "o5", "--no-report")  # in memory, on the new map
    from test_streamed_fit import _assert_close_outputs

    _assert_close_outputs(tmp_path / "o4", tmp_path / "o5")


def test_without_work_folder_the_temporary_store_is_removed(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read again
    # with the report; permutations need the store (plain OLS is streamed, with no store)
    _, stderr = run_ok(dataset, tmp_path / "out", "-v", "--mem-budget", TINY,
                       "--permutation", "voxel", "--n-perm", "9")  # fmt: skip
    assert "voxel-tiled store" in stderr
    assert not [p for p in (tmp_path / "tmp").iterdir() if "store" in p.name]


@pytest.mark.parametrize(
    ("args", "needle", "fits"),
    [
        (["--write-residuals"], "--write-residuals", "1.61 MB"),
        # a mixed-effects fit also holds the variances and the valid flags: 10 bytes a value
        (["--estimator", "reml"], "a mixed-effects estimator", "4.03 MB"),
        # variances computed from standard errors are float64: 4 bytes more
        (
            ["--estimator", "reml", "--variance-from", "se"],
            "a mixed-effects estimator",
            "5.64 MB",
        ),  # fmt: skip
        (["--min-coverage", "0.9"], "--min-coverage", "1.61 MB"),
    ],
)
def test_what_the_store_cannot_do_is_refused_before_decoding(capsys, tmp_path, args, needle,
                                                             fits):  # fmt: skip
    bids = make_bids_derivatives(
        tmp_path / "ds", n_subjects=N_SUBJECTS, shape=SHAPE, stats=("effect", "variance", "se")
    )
    argv = [bids, tmp_path / "out", "group", "--mem-budget", TINY, "-w", tmp_path / "w", *args]
    check_failure(capsys, argv, tmp_path / "out", 64, needle, f"--mem-budget {fits}", "tile by")
    assert not (tmp_path / "w" / STORE_FOLDER).exists()  # refused before any store was built
    # and with a budget the data fit in, the same run works
    run_ok(bids, tmp_path / "ok", "--no-report", "--mem-budget", fits.replace(" ", ""), *args)
    # a kept store of the same inputs is not used for what it cannot do
    run_ok(bids, tmp_path / "o1", "--no-report", "--mem-budget", TINY, "-w", str(tmp_path / "w"),
           "--keep-store")  # fmt: skip
    check_failure(capsys, argv, tmp_path / "out", 64, needle, "tile by")


@pytest.mark.parametrize("n_voxels", [70_003, 1_001])
def test_fit_is_the_same_bits_for_any_tile_width(n_voxels):
    """Tiles padded to a multiple of TILE_ALIGN make the BLAS results independent of the tile
    width (unpadded, a tail of 51 or 33 voxels gives other last bits)."""
    rng = np.random.default_rng(7)
    design = np.column_stack([np.ones(50), rng.standard_normal((50, 3))])
    data = rng.standard_normal((50, n_voxels)).astype(np.float32)
    whole = fit_ols(data, design)
    widths = []
    for budget in (600_000, 1_500_000, 2_000_000, 30_000_000):
        width = memory.tile_voxels(50, budget)
        if width >= n_voxels:
            continue
        widths.append(width)
        assert n_voxels % width  # a partial last tile
        tiled = fit_ols(data, design, budget=budget)
        for name in ("beta", "residual_variance", "r_squared"):
            assert np.array_equal(getattr(tiled, name), getattr(whole, name)), (budget, name)
    assert len(widths) >= 3


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_fit_is_the_same_bits_with_a_thousand_maps(n_jobs):
    """From ~1,000 maps on, OpenBLAS' small-matrix kernels (products with M x N x K <= 10^6)
    give other last bits than its blocked kernels: every product of the fit is 64 voxels per
    call, so 64-voxel tiles (a tiny budget) still give the in-memory bits, with threads or
    not."""
    rng = np.random.default_rng(3)
    n_maps = 1_200
    design = np.column_stack([np.ones(n_maps), rng.standard_normal((n_maps, 2))])
    data = rng.standard_normal((n_maps, 3_001)).astype(np.float32)
    whole = fit_ols(data, design)
    widths = {memory.tile_voxels(n_maps, b) for b in (1_000_000, 30_000_000, 100_000_000)}
    assert min(widths) == memory.TILE_ALIGN and len(widths) == 3
    for budget in (1_000_000, 30_000_000, 100_000_000):
        tiled = fit_ols(data, design, budget=budget, n_jobs=n_jobs)
        for name in ("beta", "residual_variance", "r_squared"):
            assert np.array_equal(getattr(tiled, name), getattr(whole, name)), (budget, name)


PERMUTATIONS = ["--permutation", "voxel", "cluster", "tfce", "--n-perm", "40", "--seed", "11"]


@pytest.mark.parametrize("two_sample", [False, True], ids=["sign-flips", "row-permutations"])
def test_permutations_from_the_store_equal_the_in_memory_ones(dataset, model, tmp_path, two_sample):
    """Same seed, same p maps, null distributions and tables, bit for bit, from the store."""
    common = [*PERMUTATIONS, "--no-report", "-v", "--cluster-forming-p", "0.01"]
    if two_sample:
        common += ["--model", str(model)]
    run_ok(dataset, tmp_path / "memory", *common, "--mem-budget", "1GB")
    work = tmp_path / "work"
    _, tiled = run_ok(dataset, tmp_path / "tiled", *common, "--mem-budget", TINY, "-w", str(work))
    assert "voxel-tiled store" in tiled
    _assert_same_outputs(tmp_path / "memory", tmp_path / "tiled", at_least=20)
    names = " ".join(_maps(tmp_path / "tiled"))
    for desc in ("perm", "tfce", "cluster"):
        assert desc in names.lower(), desc
    assert not list((work / STORE_FOLDER).glob("*")), "store and residual scratch removed"


def test_permutations_count_their_residuals_in_the_budget(dataset, tmp_path):
    """24 maps x 8,000 voxels: the data (768 kB) fit in half of 2 MB, but with permutations the
    float64 residuals and their product copy (20 bytes per map and voxel in all) do not."""
    args = ["--no-report", "-v", "--mem-budget", "2MB"]
    _, plain = run_ok(dataset, tmp_path / "plain", *args)
    assert "voxel-tiled store" not in plain
    _, permuted = run_ok(
        dataset, tmp_path / "perm", *args, "--permutation", "voxel", "--n-perm", "9"
    )
    assert "voxel-tiled store" in permuted


HOLD_LOCK = """
import sys, time
from pathlib import Path
from bids_group.store import _lock_store, _unlock
lock = _lock_store(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
_unlock(lock)
"""


def test_a_second_run_waits_for_the_one_using_the_same_store(dataset, tmp_path, caplog):
    """Two runs with one work folder and the same inputs share a store folder: while another
    process holds it, load_data waits (and says so), then builds its own, which equals the
    in-memory matrix; the lock file is gone once both are done."""
    import subprocess
    import sys
    import time

    from bids_group.store import _folder

    paths = sorted(dataset.rglob("*_statmap.nii.gz"))
    settings = {"mask": None, "resample": False, "smoothing_fwhm": None, "target_voxel_size": None}
    folder = _folder(paths, settings, tmp_path)
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder), "3"],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert other.stdout.readline().strip() == "locked"
    start = time.perf_counter()
    with caplog.at_level("WARNING", logger="bids_group"):
        data = load_data(paths, budget=10**6, work_dir=tmp_path)
    waited = time.perf_counter() - start
    other.wait(timeout=30)
    try:
        assert data.data.folder == folder  # the same store folder, used after the other run
        assert waited > 1.5, waited
        assert any("waiting for another bids-group run" in r.message for r in caplog.records)
        stacked = np.concatenate([tile for _, tile in memory.iter_tiles(data.data)], axis=1)
        assert np.array_equal(stacked, load_masked_data(paths).data)
    finally:
        release(data)
    assert list(tmp_path.glob("*.lock")) == []


def test_keep_store_in_memory_and_a_budget_beyond_the_machine_are_said(dataset, tmp_path):
    """--keep-store when the data fit in memory keeps nothing: a warning says so (it was silent);
    a --mem-budget above the memory available now is warned about, naming what is."""
    _, stderr = run_ok(dataset, tmp_path / "out", "--no-report", "--keep-store", "-w",
                       str(tmp_path / "w"), "--mem-budget", "1GB")  # fmt: skip
    assert "no store was built and none is kept" in stderr
    assert not (tmp_path / "w" / STORE_FOLDER).exists()
    _, stderr = run_ok(dataset, tmp_path / "big", "--no-report", "--mem-budget", "100TB")
    assert "is more than the memory available now" in stderr and "give at most" in stderr
