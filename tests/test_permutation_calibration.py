"""Calibration under the null: empirical FWER at alpha = 0.05 over many simulated null data sets
of smooth Gaussian noise must fall in the binomial 95% interval, for voxel, cluster and TFCE.

The CI version uses 500 data sets on a small grid. A larger version runs by hand::

    BIDS_GROUP_CALIBRATION_SETS=5000 python -m pytest tests/test_permutation_calibration.py
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy import ndimage, stats

from bids_group.inference.permutation import permutation_test

N_SETS = int(os.environ.get("BIDS_GROUP_CALIBRATION_SETS", "500"))
ALPHA = 0.05
N_PERM = 99  # N = 100 relabellings: P(p <= 0.05) = 5/100 exactly for a continuous max


def _null_sets(seed, n_sets, n_sub, shape):
    rng = np.random.default_rng(seed)
    mask = np.ones(shape, bool)
    for _ in range(n_sets):
        noise = ndimage.gaussian_filter(rng.standard_normal((n_sub, *shape)), (0, 1.0, 1.0, 1.0))
        yield noise[:, mask].astype(np.float32), mask


@pytest.mark.slow
@pytest.mark.parametrize(
    ("design", "two_sided"),
    [("one-sample", False), ("two-sample", True)],
)
def test_fwer_calibrated_under_null(design, two_sided):
    n_sub, shape = 10, (8, 8, 6)
    if design == "one-sample":
        x, c = np.ones((n_sub, 1)), [1.0]
    else:
        g = np.r_[np.ones(5), np.zeros(5)]
        x, c = np.c_[g, 1 - g], [1.0, -1.0]
    hits = {"voxel": 0, "size": 0, "mass": 0, "tfce": 0}
    for k, (y, mask) in enumerate(_null_sets(100 + two_sided, N_SETS, n_sub, shape)):
        res = permutation_test(
            y,
            x,
            c,
            n_perm=N_PERM,
            two_sided=two_sided,
            mask=mask,
            cluster_forming_p=0.05,
            tfce=True,
            seed=k,
        )
        hits["voxel"] += res.p_fwe.min() <= ALPHA
        hits["size"] += res.clusters.p_fwe_size.min(initial=1.0) <= ALPHA
        hits["mass"] += res.clusters.p_fwe_mass.min(initial=1.0) <= ALPHA
        hits["tfce"] += res.tfce.p_fwe.min() <= ALPHA
    lo, hi = stats.binom.interval(0.95, N_SETS, ALPHA)
    for name in ("voxel", "mass", "tfce"):
        assert lo <= hits[name] <= hi, (name, hits[name], (lo, hi), hits)
    # cluster sizes are integers: ties with the observed maximum make the test conservative
    assert hits["size"] <= hi, hits
