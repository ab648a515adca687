"""Benjamini-Hochberg false discovery rate threshold on a z map."""

from __future__ import annotations

import numpy as np
from scipy import special

from bids_group.errors import UsageError


def log_p_from_z(z: np.ndarray, *, two_sided: bool) -> np.ndarray:
    """log p of z: ``log P(Z >= z)`` (one-sided) or ``log 2 P(Z >= |z|)`` (two-sided).

    Parameters
    ----------
    z : ndarray, float
    two_sided : bool

    Returns
    -------
    ndarray, float64
        Precise in the far tails (``log_ndtr``), so no p underflows to 0.
    """
    z = np.asarray(z, dtype=np.float64)
    if two_sided:
        return np.minimum(0.0, np.log(2.0) + special.log_ndtr(-np.abs(z)))
    return special.log_ndtr(-z)


def fdr_threshold(z: np.ndarray, *, alpha: float, two_sided: bool = False) -> float:
    """z threshold that controls the false discovery rate at ``alpha`` (Benjamini-Hochberg).

    Benjamini & Hochberg (1995), J. R. Stat. Soc. B 57:289-300, section 3 ("the procedure"):
    with the m p-values sorted ``p_(1) <= ... <= p_(m)``, let ``k`` be the largest ``i`` with
    ``p_(i) <= i alpha / m``; reject the hypotheses of ``p_(1) .. p_(k)``. The threshold returned
    is the statistic of the k-th most significant voxel, so a voxel survives iff
    ``z >= threshold`` (one-sided) or ``|z| >= threshold`` (two-sided).

    Parameters
    ----------
    z : ndarray of shape (n_tests,), float
        In-mask z values (every voxel of the mask counts as a test).
    alpha : float
        FDR level, in (0, 1).
    two_sided : bool, default=False
        Use two-sided p = 2 P(Z >= |z|). (This equals nilearn's rule of testing |z| one-sided at
        alpha / 2: ``P(Z >= |z|) <= (alpha/2) i/m  <=>  2 P(Z >= |z|) <= alpha i/m``.)

    Returns
    -------
    float
        The z (or |z|) threshold; ``np.inf`` when nothing survives.

    Raises
    ------
    UsageError
        ``alpha`` outside (0, 1).

    Notes
    -----
    nilearn uses ``p_(i) < i alpha / m`` (strict) and returns ``z_(k) - 1e-12``; the paper's
    rule is ``<=``. The two differ only when a p-value equals its bound exactly.

    Examples
    --------
    >>> fdr_threshold(np.array([4.0, 3.5, 2.8, 2.5, 1.9, 1.2]), alpha=0.05)
    1.9
    >>> fdr_threshold(np.array([0.1, -0.3]), alpha=0.05)
    inf
    """
    if not 0.0 < alpha < 1.0:
        raise UsageError(f"FDR alpha must be in (0, 1), got {alpha}.")
    stat = np.abs(z) if two_sided else np.asarray(z, dtype=np.float64)
    n_tests = stat.size
    if n_tests == 0:
        return float(np.inf)
    stat_sorted = np.sort(stat)[::-1]  # most significant first, i.e. p ascending
    log_p = log_p_from_z(stat_sorted, two_sided=False) + (np.log(2.0) if two_sided else 0.0)
    ranks = np.arange(1, n_tests + 1)
    # BH step-up (section 3): largest i with p_(i) <= i alpha / m, compared in logs.
    passed = np.flatnonzero(log_p <= np.log(alpha * ranks / n_tests))
    if passed.size == 0:
        return float(np.inf)
    return float(stat_sorted[passed[-1]])
