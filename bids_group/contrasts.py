"""t and F contrasts on a fitted GLM: effect, variance, statistic, p and z. Pure numpy."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from bids_group.distributions import f_sf_and_z, log_sf_t, t_sf_and_z
from bids_group.errors import DataError, UsageError
from bids_group.glm import GlmFit
from bids_group.spec import StatType

log = logging.getLogger(__name__)

#: Floor on the contrast variance before dividing (as nilearn's ``DEF_TINY``): a voxel with
#: zero residual variance gives t = effect / 1e-25 instead of a division by zero.
VARIANCE_FLOOR = 1e-50
#: Relative tolerance for "this contrast row lies in the row space of X" (estimability).
_ESTIMABLE_RTOL = 1e-8


@dataclass(frozen=True)
class ContrastResult:
    """Voxelwise results of one contrast.

    Attributes
    ----------
    stat_type : {"t", "F"}
    effect : ndarray of shape (n_rows, n_voxels), float64
        ``C @ beta``: one row for t, one row per contrast row for F. (nilearn's F
        ``effect_size`` is the whitened ``sqrtm((C (X'X)^-1 C')^-1) C beta`` instead; ours is
        the raw, interpretable contrast estimate.)
    variance : ndarray of shape (n_rows, n_voxels), float64
        Variance of each row of ``effect``: ``sigma^2 * diag(C (X'X)^-1 C')``. For t this is
        the squared standard error of the effect; for F it is the diagonal of the
        (n_rows x n_rows) covariance per voxel (the off-diagonal terms are
        ``sigma^2 * C (X'X)^-1 C'`` and are not stored).
    stat : ndarray of shape (n_voxels,), float64
        t or F.
    p : ndarray of shape (n_voxels,), float64
        One-sided upper-tail p (t: P(T >= t); F: P(F >= f)). May underflow to 0 in the far
        tail; ``z`` does not. :meth:`two_sided_p` gives the two-sided p of a t contrast.
    z : ndarray of shape (n_voxels,), float64
        Signed z with the same upper-tail p, precise in the far tails (never inf for finite stat).
    dof : tuple of float
        (dof,) for t, (df1, df2) for F. df1 is the rank of the contrast.
    p_two_sided : ndarray of shape (n_voxels,) or None
        Set by estimators whose dof differ between voxels (mixed effects with exclusions);
        :meth:`two_sided_p` returns it. None: computed from ``stat`` and ``dof``.
    """

    stat_type: StatType
    effect: np.ndarray
    variance: np.ndarray
    stat: np.ndarray
    p: np.ndarray
    z: np.ndarray
    dof: tuple[float, ...]
    p_two_sided: np.ndarray | None = None

    def two_sided_p(self) -> np.ndarray:
        """Two-sided p of a t contrast; see :func:`two_sided_p`."""
        return two_sided_p(self)


def two_sided_p(result: ContrastResult) -> np.ndarray:
    """Two-sided p ``P(|T| >= |t|) = 2 P(T >= |t|)`` of a t contrast, from the small tail.

    Parameters
    ----------
    result : ContrastResult
        A t contrast.

    Returns
    -------
    ndarray of shape (n_voxels,), float64

    Raises
    ------
    UsageError
        For an F contrast, which is already non-directional (its ``p`` is the answer).
    """
    if result.stat_type != "t":
        raise UsageError(
            "A two-sided p is only defined for t contrasts; an F test is already "
            "non-directional: use its p."
        )
    if result.p_two_sided is not None:
        return result.p_two_sided
    return np.minimum(1.0, 2.0 * np.exp(log_sf_t(np.abs(result.stat), result.dof[0])))


def _check_weights(fit: GlmFit, weights: np.ndarray, test: StatType) -> np.ndarray:
    """Normalise weights to (n_rows, n_params) float64 and reject impossible contrasts."""
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    n_params = fit.beta.shape[0]
    if w.ndim != 2 or w.shape[1] != n_params:
        raise UsageError(
            f"Contrast weights have shape {np.shape(weights)} but the design has {n_params} "
            f"columns: give one weight per design column (shape (n_rows, {n_params}))."
        )
    if test not in ("t", "F"):
        raise UsageError(f"Unknown contrast test {test!r}: use 't' or 'F'.")
    if test == "t" and w.shape[0] != 1:
        raise UsageError(
            f"A t contrast needs exactly one row of weights, got {w.shape[0]}: "
            "use test 'F' for a multi-row contrast."
        )
    if not np.isfinite(w).all() or not np.any(w):
        raise UsageError("Contrast weights must be finite and not all zero.")
    if fit.design is not None:
        # Estimable iff every row of C lies in the row space of X: C pinv(X) X == C.
        x = fit.design
        projected = w @ np.linalg.pinv(x) @ x
        scale = np.abs(w).max(axis=1, keepdims=True)
        if np.any(np.abs(projected - w) > _ESTIMABLE_RTOL * np.maximum(scale, 1.0)):
            raise DataError(
                f"Contrast {w.tolist()} is not estimable with this rank-deficient design "
                f"(rank {fit.rank} < {n_params} columns): test a combination that the design "
                "identifies, or remove the redundant columns."
            )
    return w


def _t_contrast(fit: GlmFit, c: np.ndarray) -> ContrastResult:
    effect = c @ fit.beta  # (1, n_voxels)
    # Var(c b) = sigma^2 c (X'X)^-1 c'
    c_var = float((c @ fit.xtx_inv @ c.T)[0, 0])
    variance = c_var * fit.residual_variance[np.newaxis, :]
    stat = effect[0] / np.sqrt(np.maximum(variance[0], VARIANCE_FLOOR))
    dof = float(fit.dof)
    p, z = t_sf_and_z(stat, dof)
    return ContrastResult(
        stat_type="t",
        effect=effect,
        variance=variance,
        stat=stat,
        p=p,
        z=z,
        dof=(dof,),
    )


def _f_contrast(fit: GlmFit, c: np.ndarray) -> ContrastResult:
    effect = c @ fit.beta  # (q, n_voxels)
    m = c @ fit.xtx_inv @ c.T  # (q, q): Cov(C b) / sigma^2
    # A contrast with linearly dependent rows tests rank(M) independent hypotheses (as SPM).
    q = int(np.linalg.matrix_rank(m))
    if q < c.shape[0]:
        log.info("F contrast has %d rows but rank %d: df1 = %d", c.shape[0], q, q)
    m_inv = np.linalg.pinv(m)
    # F = (C b)' M^-1 (C b) / (q sigma^2), per voxel
    quad = np.einsum("iv,iv->v", effect, m_inv @ effect)
    sigma2 = fit.residual_variance
    stat = quad / q / np.maximum(sigma2, VARIANCE_FLOOR)
    dof = (float(q), float(fit.dof))
    p, z = f_sf_and_z(stat, *dof)
    return ContrastResult(
        stat_type="F",
        effect=effect,
        variance=np.diag(m)[:, np.newaxis] * sigma2[np.newaxis, :],
        stat=stat,
        p=p,
        z=z,
        dof=dof,
    )


def compute_contrast(fit: GlmFit, weights: np.ndarray, test: StatType) -> ContrastResult:
    """Compute one t or F contrast at every voxel.

    Parameters
    ----------
    fit : GlmFit
        Output of :func:`bids_group.glm.fit_ols`.
    weights : ndarray of shape (n_rows, n_params) or (n_params,), float
        Contrast matrix C. A t contrast has one row.
    test : {"t", "F"}
        t: ``t = c b / sqrt(sigma^2 c (X'X)^-1 c')`` with ``n - rank(X)`` dof.
        F: ``F = (C b)' (C (X'X)^-1 C')^-1 (C b) / (q sigma^2)`` with
        ``(q, n - rank(X))`` dof, ``q = rank(C (X'X)^-1 C')``.

    Returns
    -------
    ContrastResult

    Raises
    ------
    UsageError
        Weights of the wrong shape, all zero, or several rows for a t test (no silent t->F).
    DataError
        The contrast is not estimable with a rank-deficient design.
    """
    c = _check_weights(fit, weights, test)
    return _t_contrast(fit, c) if test == "t" else _f_contrast(fit, c)
