"""Voxel-level (height) thresholds on z maps: fpr, fdr, bonferroni or a fixed z."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import special

from bids_group.errors import DataError, UsageError
from bids_group.inference.defaults import DEFAULT_ALPHA
from bids_group.inference.fdr import fdr_threshold, log_p_from_z

log = logging.getLogger(__name__)

HeightMethod = Literal["fpr", "fdr", "bonferroni", "none"]
HEIGHT_METHODS: tuple[str, ...] = ("fpr", "fdr", "bonferroni", "none")


@dataclass(frozen=True)
class HeightThreshold:
    """A voxel-level threshold on a z map and how it was chosen.

    Attributes
    ----------
    method : {"fpr", "fdr", "bonferroni", "none"}
    alpha : float or None
        The error rate asked for (None for ``"none"``).
    z_threshold : float
        A voxel survives iff ``z >= z_threshold`` (one-sided) or ``|z| >= z_threshold``
        (two-sided). ``np.inf`` when nothing can survive (FDR with no discovery).
    two_sided : bool
    n_tests : int
        Number of in-mask voxels (the m of the corrections).
    p_threshold : float or None
        The uncorrected p (two-sided p when ``two_sided``) that ``z_threshold`` corresponds to:
        alpha (fpr), alpha / n_tests (bonferroni), the largest rejected p (fdr; None when
        nothing survives), or the p of the given z (none).
    """

    method: HeightMethod
    alpha: float | None
    z_threshold: float
    two_sided: bool
    n_tests: int
    p_threshold: float | None = None

    def survivors(self, z: np.ndarray) -> np.ndarray:
        """Boolean mask of the voxels of ``z`` that pass this threshold."""
        stat = np.abs(z) if self.two_sided else np.asarray(z)
        return stat >= self.z_threshold


def _z_of_p(p: float, *, two_sided: bool) -> float:
    """z such that the (two-sided when asked) p of z equals p."""
    return float(-special.ndtri(p / 2.0 if two_sided else p))


def _p_of_z(z: float, *, two_sided: bool) -> float:
    return float(np.exp(log_p_from_z(np.float64(z), two_sided=two_sided)))


def _check_args(method: str, alpha: float | None, threshold: float | None) -> float | None:
    """Reject contradictory or out-of-range options; return the alpha to use."""
    if method not in HEIGHT_METHODS:
        raise UsageError(
            f"Unknown height control {method!r}: use one of {', '.join(HEIGHT_METHODS)}."
        )
    if method == "none":
        if alpha is not None:
            raise UsageError(
                "An alpha was given with height control 'none': alpha is only used by "
                "fpr/fdr/bonferroni. Drop alpha, or choose a correction."
            )
        if threshold is None:
            raise UsageError("Height control 'none' needs an explicit z threshold.")
        if not np.isfinite(threshold) or threshold < 0:
            raise UsageError(
                f"The z threshold must be finite and >= 0, got {threshold} "
                "(to look at negative effects, test the negated contrast or use two_sided)."
            )
        return None
    if threshold is not None:
        raise UsageError(
            f"A z threshold ({threshold}) was given with height control {method!r}, which "
            "computes its own threshold from alpha. Give either a threshold with 'none', "
            f"or an alpha with {method!r}."
        )
    alpha = DEFAULT_ALPHA[method] if alpha is None else float(alpha)
    if not 0.0 < alpha < 1.0:
        raise UsageError(f"alpha must be in (0, 1), got {alpha}.")
    return alpha


def height_threshold(
    z: np.ndarray,
    *,
    method: HeightMethod,
    alpha: float | None = None,
    threshold: float | None = None,
    two_sided: bool,
) -> HeightThreshold:
    """Voxel-level z threshold for the in-mask z values.

    Parameters
    ----------
    z : ndarray of shape (n_voxels,), float
        In-mask z values (every in-mask voxel counts as one test).
    method : {"fpr", "fdr", "bonferroni", "none"}
        * fpr: uncorrected, ``p <= alpha``.
        * fdr: Benjamini-Hochberg at ``alpha`` (:func:`bids_group.inference.fdr.fdr_threshold`).
        * bonferroni: ``p <= alpha / n_tests`` (familywise error).
        * none: the given ``threshold`` on the z scale.
    alpha : float, optional
        Error rate for fpr/fdr/bonferroni (defaults: :data:`DEFAULT_ALPHA`). Not allowed with
        ``none``.
    threshold : float, optional
        z threshold, required with ``none`` and not allowed otherwise.
    two_sided : bool
        Test both signs: p is ``2 P(Z >= |z|)`` and survivors are ``|z| >= z_threshold``.
        This is nilearn's ``threshold_stats_img`` rule for all three corrections: it halves
        alpha and tests |z| (for FDR that is exactly BH on two-sided p; see ``fdr_threshold``).

    Returns
    -------
    HeightThreshold

    Raises
    ------
    UsageError
        Unknown method, alpha outside (0, 1), a threshold together with a correction, an
        alpha with ``none``, or ``none`` without a threshold.
    DataError
        ``z`` is empty or contains NaN/inf.
    """
    alpha = _check_args(method, alpha, threshold)
    z = np.asarray(z, dtype=np.float64).ravel()
    if z.size == 0:
        raise DataError("The z map has no in-mask voxel: check the mask.")
    if not np.isfinite(z).all():
        raise DataError(
            f"The z map has {int((~np.isfinite(z)).sum())} non-finite in-mask values: "
            "thresholds are computed on finite z only."
        )
    n_tests = int(z.size)
    if method == "none":
        z_thr = float(threshold)
        p_thr = _p_of_z(z_thr, two_sided=two_sided)
    elif method == "fpr":
        p_thr = alpha
        z_thr = _z_of_p(alpha, two_sided=two_sided)
    elif method == "bonferroni":
        p_thr = alpha / n_tests
        z_thr = _z_of_p(p_thr, two_sided=two_sided)
    else:
        z_thr = fdr_threshold(z, alpha=alpha, two_sided=two_sided)
        p_thr = None if np.isinf(z_thr) else _p_of_z(z_thr, two_sided=two_sided)
    result = HeightThreshold(
        method=method,
        alpha=alpha,
        z_threshold=z_thr,
        two_sided=two_sided,
        n_tests=n_tests,
        p_threshold=p_thr,
    )
    rule = f"{method} alpha={alpha:g}" if alpha is not None else f"{method} (a given z)"
    bound = f"{'|z|' if two_sided else 'z'} >= {z_thr:.4g}" if np.isfinite(z_thr) else (
        "no voxel can pass"
    )  # fmt: skip
    log.info(
        "height threshold %s: %s (%d of %d voxels)",
        rule,
        bound,
        int(result.survivors(z).sum()),
        n_tests,
    )
    return result
