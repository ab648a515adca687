"""The data checks against a plain numpy oracle, whatever the step and thread count."""

from __future__ import annotations

import numpy as np
import pytest

from bids_group import data_checks
from bids_group.data_checks import OUTLIER_FACTOR, check_masked_data


def _oracle(data: np.ndarray) -> dict:
    """The findings computed the obvious way, on the whole matrix at once."""
    largest = np.where(np.isnan(data), 0.0, np.abs(data.astype(np.float64))).max(axis=1)
    constant = (data == data[0]).all(axis=0)
    all_zero = constant & (data[0] == 0)
    median = float(np.median(largest))
    flagged = np.flatnonzero(largest > OUTLIER_FACTOR * median) if median > 0 else []
    return {
        "outliers": tuple((int(i), float(largest[i])) for i in flagged),
        "median_max": median,
        "zero_maps": tuple(int(i) for i in np.flatnonzero(largest == 0)),
        "all_zero_voxels": int(all_zero.sum()),
        "constant_voxels": int((constant & ~all_zero).sum()),
    }


@pytest.mark.parametrize("n_jobs", [1, 2, 3])
def test_findings_equal_the_oracle(monkeypatch, n_jobs):
    """NaN (coverage), -0.0, zero maps, an outlier, constant and all-zero voxels; steps of a
    few voxels, so that the threads share many steps."""
    monkeypatch.setattr(data_checks, "_STEP_BYTES", 4 * 40 * 7)  # 7 voxels a step
    rng = np.random.default_rng(5)
    data = rng.standard_normal((40, 1_003)).astype(np.float32)
    data[9] *= 1e6
    data[:, 10:20] = 0.0
    data[:, 30:35] = 2.5
    data[rng.random(data.shape) < 0.01] = np.nan
    data[rng.random(data.shape) < 0.01] = -0.0
    found = check_masked_data(data, n_jobs=n_jobs)
    expected = _oracle(data)
    assert {k: getattr(found, k) for k in expected} == expected
    assert found.outliers and found.all_zero_voxels and found.constant_voxels
    data[7] = 0.0
    found = check_masked_data(data, n_jobs=n_jobs)
    assert {k: getattr(found, k) for k in expected} == _oracle(data)
    assert found.zero_maps == (7,)
