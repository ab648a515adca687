"""t and F contrasts on a fitted GLM: effect, variance, statistic, p and z. Pure numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bids_group.spec import StatType


@dataclass(frozen=True)
class ContrastResult:
    """Voxelwise results of one contrast.

    Attributes
    ----------
    stat_type : {"t", "F"}
    effect : ndarray of shape (n_rows, n_voxels)
        c @ beta (one row for t).
    variance : ndarray of shape (n_rows, n_voxels) for t; (n_voxels,) of the mean for F? No:
        for t, (1, n_voxels) = sigma^2 c (X'X)^-1 c'; for F the diagonal of the covariance per row.
    stat : ndarray of shape (n_voxels,)
        t or F.
    p : ndarray of shape (n_voxels,)
        One-sided upper-tail p (t: P(T >= t); F: P(F >= f)). Two-sided p is a method.
    z : ndarray of shape (n_voxels,)
        Signed z with the same upper-tail p, precise in the far tails (never inf for finite stat).
    dof : tuple of float
        (dof,) for t, (df1, df2) for F.
    """

    stat_type: StatType
    effect: np.ndarray
    variance: np.ndarray
    stat: np.ndarray
    p: np.ndarray
    z: np.ndarray
    dof: tuple[float, ...]


def compute_contrast(fit, weights: np.ndarray, test: StatType) -> ContrastResult:
    """Compute one contrast. ``weights`` is (n_rows, n_params)."""
    raise NotImplementedError
