"""What the steps that read every map hold besides the data, measured with tracemalloc.

Each test states the bound in bytes and checks the values against an independent numpy
computation on the whole matrix, so a smaller temporary cannot change a result.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_group.data_checks import check_masked_data
from bids_group.glm import fit_ols
from bids_group.images import open_volumes, stack_volumes
from bids_group.inference import exchangeability as exch
from bids_group.inference.permutation import (
    BATCH_VOXEL,
    ROW_BYTES,
    parametric_stat,
    partition_design,
    permutation_test,
)
from bids_group.memory import SCAN_BYTES, iter_tiles, scan_voxels
from bids_group.store import VoxelStore, load_data, release

SHAPE = (64, 64, 64)


def _peak(call):
    """(result, peak bytes traced during ``call()`` above what was traced before it)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = call()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    return result, peak


@pytest.fixture(scope="module")
def holey_maps(tmp_path_factory) -> tuple[list[Path], np.ndarray]:
    """60 uncompressed NIfTI maps of a 64^3 grid, each with data (non-zero) in a ball and
    missing (0 or NaN) in a slab of its own: coverage differs from voxel to voxel; five maps
    also have data in a corner."""
    root = tmp_path_factory.mktemp("holey")
    rng = np.random.default_rng(7)
    ii, jj, kk = np.indices(SHAPE)
    ball = (ii - 32) ** 2 + (jj - 32) ** 2 + (kk - 32) ** 2 < 31**2
    paths, volumes = [], []
    for i in range(60):
        vol = np.where(ball, rng.standard_normal(SHAPE) + 3.0, 0.0).astype(np.float32)
        start = (i * 7) % 50
        vol[start : start + 6] = np.nan if i % 3 == 0 else 0.0
        if i < 5:  # a corner only five maps cover: below any coverage asked here
            vol[:4, :4, :4] = 1.0
        path = root / f"map-{i:02d}.nii"
        nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0])).to_filename(path)
        paths.append(path)
        volumes.append(vol)
    return paths, np.stack(volumes)


def test_coverage_stacking_holds_about_the_data_not_three_times_it(holey_maps):
    paths, volumes = holey_maps
    min_maps = 45
    data, peak = _peak(lambda: stack_volumes(open_volumes(paths), min_maps=min_maps))
    # oracle: numpy on the whole stack
    valid = np.isfinite(volumes) & (volumes != 0)
    mask = valid.sum(axis=0) >= min_maps
    expected = np.where(valid[:, mask], volumes[:, mask], np.nan).astype(np.float32)
    assert np.array_equal(data.mask, mask)
    assert np.array_equal(data.data, expected, equal_nan=True)
    assert np.isnan(data.data).any() and data.n_dropped > 0  # the test covers missing values
    # the matrix, the values kept until the mask is known (about its size), a chunk of them
    # not yet filled, the packed supports and one map's temporaries; per-map int64 indices
    # and values made it ~4x the matrix (98 MB here)
    chunk_slack = 16 * 1024**2
    assert peak <= 2.3 * data.data.nbytes + chunk_slack, (peak, data.data.nbytes)


def test_scans_hold_a_bounded_tile_whatever_the_number_of_maps():
    n_maps = 3000
    rng = np.random.default_rng(1)
    data = rng.standard_normal((n_maps, 20_000)).astype(np.float32)
    data[5, 100] = 1e30  # an outlier map
    data[:, 7] = 2.5  # a constant voxel
    found, peak = _peak(lambda: check_masked_data(data))
    assert found.outliers == ((5, float(np.float32(1e30))),)
    assert found.constant_voxels == 1
    largest = np.abs(data).max(axis=1).astype(np.float64)
    assert found.median_max == float(np.median(largest))
    # |tile| (float32) and three boolean masks of one scan tile, plus per-voxel results; a
    # 65,536-voxel tile (the whole matrix here, 240 MB) made about twice the data
    assert peak <= 2 * SCAN_BYTES + 20_000 * 8, peak
    widths = {b.stop - b.start for b, _ in iter_tiles(data)}
    assert max(widths) == scan_voxels(n_maps) and 4 * n_maps * max(widths) <= SCAN_BYTES


def _ols_max_t(y: np.ndarray, x: np.ndarray, c: np.ndarray) -> float:
    """Largest OLS t of contrast ``c`` over the columns of ``y`` (numpy lstsq: the oracle)."""
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    res = y - x @ beta
    s2 = (res**2).sum(axis=0) / (x.shape[0] - np.linalg.matrix_rank(x))
    scale = c @ np.linalg.pinv(x.T @ x) @ c
    return float(np.max((c @ beta) / np.sqrt(s2 * scale)))


def test_row_permutations_at_large_n_narrow_batches_and_tiles(tmp_path):
    """5,000 maps: the projection of a batch and the residual tiles stay within ROW_BYTES;
    the tiled store gives the in-memory results bit for bit, and both a brute-force refit."""
    n_maps, shape = 5000, (13, 13, 12)
    rng = np.random.default_rng(11)
    group = np.arange(n_maps) % 2
    age = rng.normal(40, 10, n_maps)
    paths = []
    for i in range(n_maps):
        vol = rng.standard_normal(shape).astype(np.float32) + 3.0 + 0.1 * group[i]
        paths.append(tmp_path / "maps" / f"map-{i:04d}.nii")
        paths[-1].parent.mkdir(exist_ok=True)
        nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0])).to_filename(paths[-1])
    x = np.column_stack([group, 1 - group, age - age.mean()])
    c = np.array([1.0, -1.0, 0.0])
    in_memory = load_data(paths, budget=10**9, work_dir=None)
    tiled = load_data(paths, budget=10**6, work_dir=tmp_path / "work")
    assert isinstance(in_memory.data, np.ndarray) and isinstance(tiled.data, VoxelStore)
    results = []
    for data in (in_memory.data, tiled.data):
        done: list[int] = []
        progress = lambda d, _total, done=done: done.append(d)  # noqa: E731
        res = permutation_test(data, x, c, n_perm=150, seed=4, progress=progress)
        results.append((res, done))
    release(tiled)
    (mem, done), (store, _) = results
    batch = done[0] - 1  # relabellings of the first batch (the identity is counted apart)
    assert batch == ROW_BYTES // (3 * n_maps * 16) < BATCH_VOXEL
    assert len(done) == 2  # 150 relabellings: two batches
    for name in ("null_max_stat", "p_uncorrected", "p_fwe", "stat"):
        assert np.array_equal(getattr(mem, name), getattr(store, name)), name
    # oracle: the same relabellings (same seed) refitted by numpy, across the batch boundary
    part = partition_design(x, c[None, :])
    ex = exch.make_exchangeability(x, part.basis[:, : part.n_interest])
    rel = exch.random_relabellings(ex, np.random.default_rng(4), 150)
    y = in_memory.data.astype(np.float64)
    hz = part.nuisance @ np.linalg.pinv(part.nuisance)
    resid_z, fitted_z = y - hz @ y, hz @ y
    for k in (0, batch - 1, batch, 149):
        ystar = rel.signs[k][:, None] * resid_z[rel.perm[k]] + fitted_z
        assert mem.null_max_stat[k + 1] == pytest.approx(_ols_max_t(ystar, x, c), rel=1e-4)


def test_fit_and_statistic_are_the_same_bits_for_any_tile_width_at_600_maps():
    """OpenBLAS picks its kernel from a product's shape: from ~500 maps, one call over a wide
    tile gave some voxels other bits than a narrow one. Products of a fixed width do not."""
    rng = np.random.default_rng(2)
    n_maps, n_voxels = 600, 3000
    data = (rng.standard_normal((n_maps, n_voxels)) + 2.0).astype(np.float32)
    group = np.arange(n_maps) % 2
    x = np.column_stack([group, 1 - group, rng.standard_normal(n_maps)])
    whole = fit_ols(data, x)  # tiles of 65,536 voxels: the whole matrix in one
    for budget in (10**6, 10**7, 10**8):  # tiles of 64, 128 and 1,472 voxels
        tiled = fit_ols(data, x, budget=budget)
        for name in ("beta", "residual_variance", "r_squared"):
            assert np.array_equal(getattr(tiled, name), getattr(whole, name)), (budget, name)
    oracle = np.linalg.lstsq(x, data.astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(whole.beta, oracle, rtol=1e-9, atol=1e-12)
    # the permutation engine's statistic, from the in-memory matrix (tiles of 4,096 voxels)
    # and from tiles of 64 voxels read one at a time, as from the store
    part = partition_design(x, np.array([[1.0, -1.0, 0.0]]))
    wide = parametric_stat(data, part, "t")
    narrow = parametric_stat(_Tiles(data, 64), part, "t")
    assert np.array_equal(wide, narrow)


class _Tiles:
    """An in-memory matrix read one tile of ``width`` voxels at a time, as the store is."""

    def __init__(self, data: np.ndarray, width: int) -> None:
        self.data, self.tile_voxels = data, width

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape

    def tiles(self):
        yield from iter_tiles(self.data, self.tile_voxels)


def test_600_subjects_tiled_or_in_memory_give_the_same_files_bit_for_bit(tmp_path):
    """The real CLI on 600 subjects (16^3 grid): in memory (one tile of 4,096 voxels) and from
    the store (tiles of 64 voxels, 1 MB budget), every map and table is the same bytes. (The
    float32 maps round most last-bit float64 differences away: the float64 bits are checked
    by the test above.)"""
    from clicheck import run_ok
    from conftest import make_bids_derivatives
    from test_store import MODEL

    bids = make_bids_derivatives(tmp_path / "ds", n_subjects=600, shape=(16, 16, 16), seed=5)
    model = tmp_path / "model.yaml"
    model.write_text(MODEL)
    common = ["--model", str(model), "--no-report", "-v", "--height-control", "fdr",
              "--cluster-threshold", "3", "--ari", "--two-sided"]  # fmt: skip
    _, in_memory = run_ok(bids, tmp_path / "memory", *common, "--mem-budget", "1GB")
    _, tiled = run_ok(bids, tmp_path / "tiled", *common, "--mem-budget", "1MB",
                      "-w", str(tmp_path / "work"), "--keep-store")  # fmt: skip
    assert "voxel-tiled store" not in in_memory and "tiles of 64 voxels" in tiled
    files = sorted(p.relative_to(tmp_path / "memory") for p in (tmp_path / "memory").rglob("*"))
    files = [f for f in files if f.suffix in (".gz", ".tsv")]
    assert len(files) >= 20
    for name in files:
        a, b = tmp_path / "memory" / name, tmp_path / "tiled" / name
        if name.suffix == ".gz":  # the image, not the gzip stream (which holds a time)
            assert np.array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj),
                                  equal_nan=True), name  # fmt: skip
        else:
            assert a.read_bytes() == b.read_bytes(), name


def test_mixed_fit_holds_a_bounded_block_and_float32_variances_give_the_same_bits():
    """The mixed-effects fit of 1,200 maps holds the valid flags, one boolean temporary and one
    block of float64 copies within ``_BLOCK_BYTES`` (65,536-voxel blocks were 17 bytes x maps
    x voxels: 408 MB here); float32 variances as read give the bits of their float64 copy."""
    from bids_group.mixed_effects import _BLOCK_BYTES, fit_mixed

    n_maps, n_vox = 1200, 20_000
    rng = np.random.default_rng(3)
    effects = rng.normal(0.2, 1.0, (n_maps, n_vox)).astype(np.float32)
    variances = rng.uniform(0.5, 2.0, (n_maps, n_vox)).astype(np.float32)
    variances[:7, 11] = 0.0  # a voxel with maps left out
    design = np.ones((n_maps, 1))
    fit, peak = _peak(lambda: fit_mixed(effects, variances, design, "dl"))
    flags = 2 * n_maps * n_vox  # the valid flags and one temporary
    results = 64 * n_vox  # beta, cov, tau^2, rwr, counts, dof, estimable
    assert peak <= flags + _BLOCK_BYTES + results + 4 * 1024**2, peak
    reference = fit_mixed(effects, variances.astype(np.float64), design, "dl")
    for name in ("beta", "cov_beta", "tau2", "rwr", "dof"):
        np.testing.assert_array_equal(getattr(fit, name), getattr(reference, name), name)
    assert fit.n_used[11] == n_maps - 7 and fit.n_excluded_values == 7
