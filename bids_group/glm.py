"""Ordinary least squares, voxelwise: pure numpy, no I/O."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from bids_group.errors import DataError
from bids_group.memory import (
    MAX_TILE_VOXELS,
    TiledMaps,
    aligned,
    aligned_matmul,
    iter_tiles,
    tile_voxels,
)

log = logging.getLogger(__name__)

#: Voxels per block of :func:`fitted_values`.
_BLOCK_VOXELS = MAX_TILE_VOXELS


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
    xtx_inv : ndarray of shape (n_params, n_params), float64
        (X'X)^-1, computed as a pseudo-inverse; equal to the inverse when X has full column rank.
    design : ndarray of shape (n_maps, n_params), float64
        The design matrix that was fitted (used to check that contrasts are estimable).
    rank : int
        Numerical rank of the design (``n_params`` when it has full column rank).
    r_squared : ndarray of shape (n_voxels,), float64
        Coefficient of determination ``1 - RSS / TSS``. When the design spans the constant
        (an intercept, or group columns that add up to one), TSS is centred on the voxel's
        mean, and R^2 equals nilearn's ``var(predicted) / var(Y)``; otherwise TSS is the
        uncentred ``sum(Y^2)`` (statsmodels' convention for models without a constant, since a
        centred R^2 could then be negative). 0 where TSS is 0 (nothing to explain).
    """

    beta: np.ndarray
    residual_variance: np.ndarray
    dof: int
    xtx_inv: np.ndarray
    design: np.ndarray | None = None
    rank: int | None = None
    #: R^2 = 1 - RSS / TSS per voxel (see :func:`fit_ols`); None when not computed.
    r_squared: np.ndarray | None = None
    #: Whether the design spans the constant (TSS of R^2 centred on the mean, else not).
    centred_r_squared: bool = True


def _check_inputs(data: np.ndarray | TiledMaps, design: np.ndarray) -> None:
    """Shape checks and finite design; the messages name the offending column."""
    if len(data.shape) != 2 or design.ndim != 2:
        raise DataError(
            f"fit_ols needs 2-D data (n_maps, n_voxels) and design (n_maps, n_params); got "
            f"data {data.shape} and design {design.shape}."
        )
    if data.shape[0] != design.shape[0]:
        raise DataError(
            f"The design has {design.shape[0]} rows but {data.shape[0]} maps were loaded: "
            "every input map needs exactly one design row."
        )
    check_finite_design(design)


def rank_and_dof(design: np.ndarray) -> tuple[int, int]:
    """``rank(X)`` and the residual degrees of freedom ``n_maps - rank(X)``.

    Raises DataError when no degree of freedom is left; warns when X is rank-deficient (only
    estimable contrasts can then be tested)."""
    n_maps = design.shape[0]
    rank = int(np.linalg.matrix_rank(design))
    dof = n_maps - rank
    if dof <= 0:
        raise DataError(
            f"The design has rank {rank} with {n_maps} maps: no residual degrees of freedom "
            "are left to estimate the variance. Add maps or remove regressors."
        )
    if rank < design.shape[1]:
        log.warning(
            "design has %d columns but rank %d: only estimable contrasts can be tested",
            design.shape[1],
            rank,
        )
    return rank, dof


def spans_constant(design: np.ndarray, pinv_x: np.ndarray) -> bool:
    """Whether the column space of X holds the constant (then R^2 is centred on the mean)."""
    ones = np.ones(design.shape[0])
    return bool(np.allclose(design @ (pinv_x @ ones), ones, rtol=0, atol=1e-8))


def check_finite_design(design: np.ndarray) -> None:
    """Refuse a design with NaN or inf, naming the columns (a missing covariate value)."""
    bad_cols = np.flatnonzero(~np.isfinite(design).all(axis=0))
    if bad_cols.size:
        raise DataError(
            f"Design column(s) {bad_cols.tolist()} contain NaN or inf: fill or drop the missing "
            "covariate values."
        )


def _check_finite(finite_rows: np.ndarray) -> None:
    """Refuse maps with NaN or inf inside the mask, naming their rows."""
    bad_maps = np.flatnonzero(~finite_rows).tolist()
    if bad_maps:
        raise DataError(
            f"Input map(s) at row(s) {bad_maps} contain NaN or inf inside the mask: "
            "restrict the mask or fix those maps."
        )


def fit_ols(
    data: np.ndarray | TiledMaps,
    design: np.ndarray,
    *,
    budget: int | None = None,
    n_jobs: int = 1,
) -> GlmFit:
    """Fit ``Y = X beta + e`` by ordinary least squares, independently at every voxel.

    Parameters
    ----------
    data : ndarray of shape (n_maps, n_voxels), float32 (or float64), or TiledMaps
        One row per input map (masked voxels), in memory or in the tiled store.
    design : ndarray of shape (n_maps, n_params), float64
        Design matrix X.
    budget : int, optional
        Memory budget in bytes: an in-memory matrix is read in tiles of
        :func:`~bids_group.memory.tile_voxels` voxels (at most 65,536); a store in its own tiles.
    n_jobs : int
        Threads fitting the steps of a tile (numpy and BLAS release the GIL); the result does
        not depend on it.

    Returns
    -------
    GlmFit
        ``beta = pinv(X) Y``, ``sigma^2 = ||Y - X beta||^2 / (n_maps - rank(X))``, computed in
        float64 from explicit residuals (no ``Y'Y - beta'X'Y`` cancellation).

    Raises
    ------
    DataError
        Shapes disagree, NaN/inf in the design or the data, or no residual degrees of freedom.

    Notes
    -----
    A rank-deficient X is accepted (pseudo-inverse, ``dof = n_maps - rank``); whether a
    contrast is estimable is checked in :func:`bids_group.contrasts.compute_contrast`.

    Each tile is fitted in steps of :func:`_step_voxels` voxels, whose float64 working arrays
    stay in the CPU cache (a whole tile's would stream through memory several times). Every
    step is padded with zeros to a multiple of :data:`~bids_group.memory.TILE_ALIGN` voxels
    and its products are computed that many voxels at a time
    (:func:`~bids_group.memory.aligned_matmul`) on one BLAS thread: a voxel's bits then depend
    neither on where tiles or steps cut nor on ``n_jobs``, and the in-memory and the tiled
    fits agree bit for bit.
    """
    if not isinstance(data, TiledMaps):
        data = np.asarray(data)
    design = np.asarray(design, dtype=np.float64)
    _check_inputs(data, design)
    n_maps, n_voxels = data.shape
    rank, dof = rank_and_dof(design)
    pinv_x = np.linalg.pinv(design)  # (n_params, n_maps)
    centred = spans_constant(design, pinv_x)
    out = _OlsOutput(
        beta=np.empty((design.shape[1], n_voxels), dtype=np.float64),
        rss=np.empty(n_voxels, dtype=np.float64),
        tss=np.empty(n_voxels, dtype=np.float64),
    )
    finite_rows = np.ones(n_maps, dtype=bool)
    width = MAX_TILE_VOXELS if budget is None else tile_voxels(n_maps, budget)
    step = _step_voxels(n_maps, design.shape[1])

    def fit_steps(block: slice, tile: np.ndarray, starts: range) -> np.ndarray:
        """Fit some steps of a tile; return which maps were finite there."""
        finite = np.ones(n_maps, dtype=bool)
        for start in starts:
            part = slice(block.start + start, min(block.start + start + step, block.stop))
            finite &= _fit_step(tile[:, start : start + step], part, pinv_x, design, centred, out)
        return finite

    n_threads = max(1, int(n_jobs))
    # The steps' products are small: BLAS threads would only spin (on a loaded machine, 5x
    # the CPU time); the steps themselves run in n_jobs threads.
    with (
        threadpool_limits(1, user_api="blas"),
        ThreadPoolExecutor(n_threads) if n_threads > 1 else nullcontext() as pool,
    ):
        # Tile by tile: a store is read one tile at a time, within the budget.
        for block, tile in iter_tiles(data, width):
            starts = range(0, block.stop - block.start, step)
            if pool is None:
                finite_rows &= fit_steps(block, tile, starts)
            else:  # interleaved steps: each thread writes its own voxels of the output
                runs = [pool.submit(fit_steps, block, tile, starts[i::n_threads])
                        for i in range(n_threads)]  # fmt: skip
                for run in runs:
                    finite_rows &= run.result()
    _check_finite(finite_rows)
    return GlmFit(
        beta=out.beta,
        residual_variance=out.rss / dof,
        dof=dof,
        xtx_inv=np.linalg.pinv(design.T @ design),
        design=design,
        rank=rank,
        r_squared=_r_squared(out.rss, out.tss),
        centred_r_squared=centred,
    )


#: Multiply-adds of a step's product ``pinv(X) @ Y``: its float64 working arrays are then a few
#: MB and stay in the CPU cache. The bits do not depend on it: every product is computed
#: :data:`~bids_group.memory.TILE_ALIGN` voxels per BLAS call (the same shape for every voxel).
_STEP_MULTIPLY_ADDS = 1_000_000


def _step_voxels(n_maps: int, n_params: int) -> int:
    """Voxels per step of :func:`fit_ols`: the narrowest multiple of
    :data:`~bids_group.memory.TILE_ALIGN` whose product ``pinv(X) @ Y`` exceeds
    :data:`_STEP_MULTIPLY_ADDS`, at most :data:`~bids_group.memory.MAX_TILE_VOXELS`.

    >>> _step_voxels(1000, 3), _step_voxels(10**4, 3), _step_voxels(20, 1)
    (384, 64, 50048)
    """
    narrowest = _STEP_MULTIPLY_ADDS // max(n_maps * n_params, 1) + 1
    return min(aligned(narrowest), MAX_TILE_VOXELS)


@dataclass(frozen=True)
class _OlsOutput:
    """Per-voxel results of :func:`fit_ols`, filled step by step (each step its own voxels)."""

    beta: np.ndarray
    rss: np.ndarray
    tss: np.ndarray


def _fit_step(
    values: np.ndarray,
    part: slice,
    pinv_x: np.ndarray,
    design: np.ndarray,
    centred: bool,
    out: _OlsOutput,
) -> np.ndarray | bool:
    """Fit the voxels ``part`` into ``out`` (``values``: all maps there, at most one step of
    :func:`_step_voxels` voxels); return which maps are finite there (True: all of them).

    The float64 copy is padded with zeros to a multiple of
    :data:`~bids_group.memory.TILE_ALIGN` voxels and its products are that many voxels per BLAS
    call: every call has the same shape, so a voxel's bits do not depend on where the tiles or
    the steps cut.
    """
    n_maps, n = values.shape
    y = np.empty((n_maps, aligned(n)), dtype=np.float64)
    y[:, :n] = values
    y[:, n:] = 0.0
    centred_y = y - y.mean(axis=0) if centred else y
    tss = np.einsum("ij,ij->j", centred_y, centred_y)[:n]
    del centred_y
    out.tss[part] = tss
    b = aligned_matmul(pinv_x, y)
    out.beta[:, part] = b[:, :n]
    y -= aligned_matmul(design, b)  # residuals, in place
    out.rss[part] = np.einsum("ij,ij->j", y, y)[:n]
    # A NaN or inf in a voxel's column makes its TSS non-finite, and finite float32 values
    # cannot overflow it: only then look for the maps at fault (a pass over every value).
    if np.isfinite(tss).all():
        return True
    return np.isfinite(values).all(axis=1)


def _r_squared(rss: np.ndarray, tss: np.ndarray) -> np.ndarray:
    """``1 - rss / tss``, and 0 where ``tss`` is 0.

    >>> _r_squared(np.array([1.0, 0.0]), np.array([4.0, 0.0]))
    array([0.75, 0.  ])
    """
    out = np.zeros_like(rss)
    np.divide(rss, tss, out=out, where=tss > 0)
    return np.where(tss > 0, 1.0 - out, 0.0)


def fitted_values(fit: GlmFit, data: np.ndarray) -> np.ndarray:
    """``X @ beta`` per map and voxel, in the data's float type (float32 for loaded maps).

    Parameters
    ----------
    fit : GlmFit
        A fit of ``data`` (its ``design`` is used).
    data : ndarray of shape (n_maps, n_voxels)
        Only its shape and dtype are used; residuals are ``data - fitted_values(fit, data)``.

    Returns
    -------
    ndarray of shape (n_maps, n_voxels)
    """
    if fit.design is None:
        raise ValueError("the fit does not hold its design matrix")
    out = np.empty(data.shape, dtype=np.result_type(data.dtype, np.float32))
    for start in range(0, data.shape[1], _BLOCK_VOXELS):
        block = slice(start, min(start + _BLOCK_VOXELS, data.shape[1]))
        out[:, block] = fit.design @ fit.beta[:, block]
    return out
