"""Ordinary least squares, voxelwise: pure numpy, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GlmFit:
    """OLS estimates for every voxel.

    Attributes
    ----------
    beta : ndarray of shape (n_params, n_voxels), float64
    residual_variance : ndarray of shape (n_voxels,), float64
        RSS / dof (the unbiased sigma^2).
    dof : int
        n_maps - rank(X).
    xtx_inv : ndarray of shape (n_params, n_params)
        (X'X)^-1 (pseudo-inverse for safety; the design is full rank by construction).
    """

    beta: np.ndarray
    residual_variance: np.ndarray
    dof: int
    xtx_inv: np.ndarray


def fit_ols(data: np.ndarray, design: np.ndarray) -> GlmFit:
    """Fit Y = X beta + e for ``data`` (n_maps, n_voxels) and ``design`` (n_maps, n_params)."""
    raise NotImplementedError
