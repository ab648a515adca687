"""Benjamini-Hochberg threshold against a brute-force implementation and nilearn."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st

from bids_group.errors import UsageError
from bids_group.inference.fdr import fdr_threshold


def _bh_reject_bruteforce(p: np.ndarray, alpha: float) -> np.ndarray:
    """Reject set of BH (1995) by direct enumeration of the step-up condition."""
    m = p.size
    best_k = 0
    for k in range(1, m + 1):
        # reject if at least k p-values are <= k alpha / m (equivalent step-up formulation)
        if np.sum(p <= k * alpha / m) >= k:
            best_k = k
    return p <= best_k * alpha / m if best_k else np.zeros(m, bool)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("two_sided", [False, True])
def test_matches_bruteforce_and_scipy(seed, two_sided):
    rng = np.random.default_rng(seed)
    z = np.concatenate([rng.normal(size=300), rng.normal(3.2, 1, size=40), -rng.normal(3.2, 1, 20)])
    alpha = 0.05
    p = 2 * st.norm.sf(np.abs(z)) if two_sided else st.norm.sf(z)
    thr = fdr_threshold(z, alpha=alpha, two_sided=two_sided)
    ours = (np.abs(z) if two_sided else z) >= thr
    np.testing.assert_array_equal(ours, _bh_reject_bruteforce(p, alpha))
    np.testing.assert_array_equal(ours, st.false_discovery_control(p) <= alpha)


@pytest.mark.parametrize("two_sided", [False, True])
def test_matches_nilearn_threshold_stats_rule(two_sided):
    """nilearn: fdr_threshold(|z| if two-sided, alpha/2 if two-sided); same survivors."""
    from nilearn.glm import fdr_threshold as nl_fdr

    rng = np.random.default_rng(11)
    z = np.concatenate([rng.normal(size=2000), rng.normal(3.5, 1, size=150), -rng.normal(3, 1, 80)])
    alpha = 0.05
    theirs = nl_fdr(np.abs(z) if two_sided else z, alpha / 2 if two_sided else alpha)
    ours = fdr_threshold(z, alpha=alpha, two_sided=two_sided)
    assert ours == pytest.approx(theirs, abs=1e-11)
    stat = np.abs(z) if two_sided else z
    assert np.sum(stat >= ours) == np.sum(stat >= theirs)


def test_two_sided_is_not_alpha_doubled():
    """Two-sided BH at alpha equals one-sided BH on |z| at alpha/2, not at alpha."""
    rng = np.random.default_rng(5)
    z = np.concatenate([rng.normal(size=1000), rng.normal(2.8, 1, size=100)])
    two = fdr_threshold(z, alpha=0.05, two_sided=True)
    assert two == fdr_threshold(np.abs(z), alpha=0.025, two_sided=False)
    assert two > fdr_threshold(np.abs(z), alpha=0.05, two_sided=False)


def test_nothing_survives_and_extremes():
    assert fdr_threshold(np.zeros(100), alpha=0.05) == np.inf
    assert fdr_threshold(np.array([]), alpha=0.05) == np.inf
    # Far-tail z (p underflows in float) still sorts and passes.
    assert fdr_threshold(np.array([60.0, 50.0, 0.0]), alpha=0.05) == 50.0


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 2])
def test_bad_alpha(alpha):
    with pytest.raises(UsageError, match="alpha"):
        fdr_threshold(np.ones(3), alpha=alpha)
