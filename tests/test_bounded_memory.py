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
from bids_group.images import open_volumes, stack_volumes
from bids_group.memory import SCAN_BYTES, iter_tiles, scan_voxels

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
