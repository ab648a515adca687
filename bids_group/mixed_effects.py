"""Mixed-effects (random-effects meta-regression) fits with known first-level variances.

Model, independently at every voxel, over the maps ``i`` that are valid there::

    y_i = x_i' beta + u_i + e_i,   Var(e_i) = v_i (the first-level variance, given),
                                   Var(u_i) = tau^2 (between-subject variance, estimated)

Given ``tau^2`` the fixed effects are weighted least squares with ``w_i = 1 / (v_i + tau^2)``:
``beta = (X'WX)^-1 X'Wy``, ``Cov(beta) = (X'WX)^-1``. The estimators differ in ``tau^2``:

``"wls"`` / ``"fe"``
    Fixed effects: ``tau^2 = 0`` (inverse-variance weighting).
``"dl"``
    DerSimonian & Laird (1986), method of moments on Cochran's ``Q = r'Wr`` of the fixed-effects
    fit (``W = V^-1``): ``tau^2 = max(0, (Q - (k - p)) / tr P)``, ``P = W - WX(X'WX)^-1X'W``
    (the meta-regression form of Raudenbush 2009; ``tr P = sum w - tr((X'WX)^-1 X'W^2X)``).
``"hedges"``
    Hedges (1983); Hedges & Olkin (1985): method of moments on the *unweighted* (OLS) residuals,
    ``tau^2 = max(0, (RSS_OLS - sum_i (1 - h_i) v_i) / (k - p))`` with ``h_i`` the OLS leverages.
``"ml"``, ``"reml"``
    Maximum likelihood and restricted maximum likelihood (Viechtbauer 2005, eqs. 8 and 10;
    Harville 1977). With ``beta`` profiled out::

        l(tau^2)   = -1/2 [ sum_i log(v_i + tau^2) + r'Wr ]
        l_R(tau^2) = l(tau^2) - 1/2 log|X'WX|

    REML is the estimate of FSL's FLAME1 (Woolrich et al. 2004; Beckmann et al. 2003), which
    maximises the same marginal likelihood. Both are maximised *globally* over ``tau^2 >= 0``:
    the score at 0 and at ``n_grid - 1`` log-spaced points from ``1e-3 min(v)`` to a bound beyond
    which the score is provably negative; in every grid cell where the score turns from positive
    to non-positive, its root (Newton safeguarded by bisection, to ``1e-13`` relative); the
    candidate (those roots, and 0 when the score there is not positive) with the highest
    likelihood wins (``tau^2`` is exactly 0 when that is the candidate 0). The restricted
    likelihood can have two local maxima (at ~3,000 of pain21's voxels); a local search from one
    starting value can end on the lower one (PyMARE 0.0.13's REML does at 29 of pain21's
    voxels). The grid misses only a maximum/minimum pair inside one grid cell (adjacent points
    ~1.3x apart with the default 48 points on pain21); on pain21 (ML and REML) 32 points already
    give the optimum of a 2,000-point search at every voxel, 24 points miss one voxel. The grid's
    scores are computed for blocks of voxels at once (SIMD across voxels), the roots per voxel.

Input policy (zero, negative or non-finite variances; non-finite effects). A map is *excluded
at that voxel* when its effect is not finite or its variance is not finite or below the
smallest normal double (so that a weight is never infinite). The voxel is then fitted on its
remaining ``k`` maps with its own ``dof = k - p``. A voxel is *not estimable* (all outputs NaN,
``estimable`` False) when ``k - p < 1`` or when X restricted to its valid maps does not have full
column rank. Both counts are returned in :class:`MixedFit` for the caller to report; nothing
becomes NaN silently.

Inference (:func:`mixed_contrast`). ``t = c beta / sqrt(c Cov(beta) c')`` (or the F form) on
``k - p`` degrees of freedom, FLAME1's choice, by default. ``adjustment="knapp-hartung"`` scales
``Cov(beta)`` by ``q = r'Wr / (k - p)`` (Knapp & Hartung 2003; Hartung & Knapp 2001; Sidik &
Jonkman 2002), not floored at 1, as metafor's ``test="knha"`` and PyMARE's default;
``"knapp-hartung-floor"`` uses ``max(q, 1)`` (metafor's ``test="adhoc"``), which only widens.
PyMARE equivalents: its ``small_sample_correction="knapp-hartung"`` gives our
``adjustment="knapp-hartung"`` exactly (t on ``k - p``); its ``"wald"`` gives our statistic with
a normal reference, so FLAME1's z is ``t_to_z(pymare_stat, k - p)``. Where ``r'Wr`` is exactly 0
(the effects lie in the column space of X, e.g. all equal) ``q = 0`` and the Knapp-Hartung t is
undefined (inf or NaN), as in PyMARE; the default (``"none"``) is finite there.

Variance groups (one ``tau^2`` per group, FSL FLAME's variance groups, Woolrich et al. 2004):
``Var(u_i) = tau^2_g(i)``, so ``w_i = 1 / (v_i + tau^2_g(i))`` and, with ``D_g`` the 0/1 diagonal
of group g's maps, ``u = P y = W r``::

    l(tau^2_1..G)   = -1/2 [ sum_i log(v_i + tau^2_g(i)) + r'Wr ]
    l_R             = l - 1/2 log|X'WX|
    dl_R/dtau^2_g   = 1/2 [ u'D_g u - tr(P D_g) ]         (ML: tr(W D_g))
    d2l_R/dg dh     = 1/2 tr(P D_g P D_h) - u'D_g P D_h u  (ML: 1/2 delta_gh tr(W^2 D_g) - ...)

(the one-group formulas with ``D_g``; Harville 1977). When the design is *separable* by group
(every column non-zero in the rows of one group only: group means, group-specific covariates)
``X'WX`` is block diagonal and the likelihood factorises: each group is fitted on its own rows
and columns with the one-``tau^2`` search above (its global optimum is the joint one), ``beta``
and ``Cov(beta)`` (block diagonal) are assembled. Any other design (a shared intercept or
covariate) is fitted jointly by ML/REML over ``tau^2_g >= 0`` (:func:`_fit_joint`): at every
voxel a product grid of 0 and log-spaced values per group (from ``1e-3`` of the group's smallest
variance to 10 times the OLS residual sum of squares; :func:`group_grid_points` values per group,
32 for two groups), evaluated cheaply because each group's ``X'WX``, ``X'Wy``, ``y'Wy`` and
``sum log(v + tau^2)`` are tabulated per grid value and summed (one p x p factorisation per
point); then a projected Newton ascent from each of the grid's best local maxima (up to 4):
groups at 0 whose score is not positive stay at exactly 0 (the KKT condition of the bound), the
others take a Newton step where the Hessian is negative definite, else a Fisher-scoring step
(expected information), projected onto ``tau^2 >= 0`` (a group crossing 0 lands on exactly 0) and
halved until the likelihood rises; the best end point is then checked along each group's axis
(the others fixed): the score of that group at every other grid value, and every cell where it
turns from positive to non-positive away from the current point (or 0 where it is not positive)
starts another refinement (:func:`~bids_group._mixed_kernels._axis_scan`: a sign test resolves a
second maximum whose dip the grid's likelihood values miss); the highest likelihood wins. This
can still miss a maximum that neither the grid nor the scans resolve: on all 259,353 voxels of
pain21 (REML, two groups, intercept + group + covariate) the default (32 values per group) ends
below a 64-value search at 12 voxels (by at most 0.026 in log-likelihood) and above it at 1;
without the axis scans 16 and 2; a brute force (scipy) agrees at sampled voxels to 1e-6. ``fe``
gives ``tau^2 = 0``
for every group. There is no moment estimator of several ``tau^2`` with shared columns here:
``dl`` and ``hedges`` need a separable design (UsageError otherwise). ``dof = k - p`` overall. A
voxel is estimable when, besides ``k > p`` and full rank, every group keeps more valid maps than
the columns only its maps determine (``k_g > p - rank(X without group g's rows)``; ``k_g > p_g``
when separable).

References
----------
Beckmann CF, Jenkinson M, Smith SM (2003) NeuroImage 20:1052-1063.
DerSimonian R, Laird N (1986) Control Clin Trials 7:177-188.
Harville DA (1977) J Am Stat Assoc 72:320-338.
Hedges LV (1983) Psychol Bull 93:388-395; Hedges LV, Olkin I (1985) Statistical Methods for
Meta-Analysis, Academic Press.
Knapp G, Hartung J (2003) Stat Med 22:2693-2710.
Viechtbauer W (2005) J Educ Behav Stat 30:261-293.
Woolrich MW, Behrens TEJ, Beckmann CF, Jenkinson M, Smith SM (2004) NeuroImage 21:1732-1747.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from bids_group import _mixed_kernels as kern
from bids_group.distributions import f_sf_and_z, t_sf_and_z
from bids_group.errors import DataError, UsageError

log = logging.getLogger(__name__)

Method = Literal["wls", "fe", "dl", "hedges", "ml", "reml"]
Adjustment = Literal["none", "knapp-hartung", "knapp-hartung-floor"]

_METHOD_CODES = {
    "wls": kern.FE,
    "fe": kern.FE,
    "dl": kern.DL,
    "hedges": kern.HEDGES,
    "ml": kern.ML,
    "reml": kern.REML,
}
#: Grid points (0 and log-spaced values) of the ML/REML global search.
DEFAULT_N_GRID = 48
#: Voxels per call of the compiled kernel at most (see :func:`_block_voxels`).
_BLOCK_VOXELS = 65536
#: Bytes of a block's float64 transposed copies (effects, variances) and valid flags.
_BLOCK_BYTES = 128 * 1024**2


def _block_voxels(n_maps: int) -> int:
    """Voxels per call of the compiled kernel: its float64 copies of the effects and variances
    and the valid flags within :data:`_BLOCK_BYTES` (65,536 voxels of 1,050 maps were 1.2 GB),
    at most :data:`_BLOCK_VOXELS`. Each voxel's fit is the same bits in any block.

    >>> _block_voxels(21), _block_voxels(1050)
    (65536, 7519)
    """
    return int(min(_BLOCK_VOXELS, max(1, _BLOCK_BYTES // (17 * max(n_maps, 1)))))


#: Smallest usable variance: 1 / v is finite and exact to rounding above it.
_MIN_VARIANCE = np.finfo(np.float64).tiny
#: The same as an array, which every numpy version compares in float64 (see valid_values).
_MIN_VARIANCE_ARRAY = np.array([_MIN_VARIANCE])


@dataclass(frozen=True)
class MixedFit:
    """Mixed-effects estimates at every voxel.

    Attributes
    ----------
    method : str
        The estimator (``"fe"`` for ``"wls"``).
    beta : ndarray of shape (p, n_voxels), float64
        WLS coefficients at the estimated ``tau2``.
    cov_beta : ndarray of shape (p, p, n_voxels), float64
        ``(X'WX)^-1`` (model-based; Knapp-Hartung scaling is applied by the contrast).
    tau2 : ndarray of shape (n_voxels,) or (n_groups, n_voxels), float64
        Between-map variance (exactly 0 at the boundary); one row per variance group when
        ``groups`` was given (in the order of ``group_labels``).
    rwr : ndarray of shape (n_voxels,), float64
        Weighted residual sum of squares ``r'Wr`` at ``tau2`` (Cochran's Q at ``tau2``).
    n_used : ndarray of shape (n_voxels,), int
        Valid maps ``k`` at each voxel (also where not estimable).
    dof : ndarray of shape (n_voxels,), float64
        ``k - p`` (FLAME1's dof); NaN where not estimable.
    estimable : ndarray of shape (n_voxels,), bool
        False where fewer than ``p + 1`` maps are valid or X on them is rank deficient.
    n_excluded_values : int
        Map x voxel values excluded by the input policy (among all voxels).
    n_voxels_with_exclusions : int
        Voxels with at least one excluded map.
    n_not_estimable : int
        Voxels with all outputs NaN.
    group_labels : tuple
        The variance groups (sorted), or () without groups.
    """

    method: str
    beta: np.ndarray
    cov_beta: np.ndarray
    tau2: np.ndarray
    rwr: np.ndarray
    n_used: np.ndarray
    dof: np.ndarray
    estimable: np.ndarray
    n_excluded_values: int
    n_voxels_with_exclusions: int
    n_not_estimable: int
    group_labels: tuple = ()


@dataclass(frozen=True)
class MixedContrast:
    """One t or F contrast of a :class:`MixedFit`.

    Attributes
    ----------
    stat_type : {"t", "F"}
    effect : ndarray of shape (n_rows, n_voxels)
    variance : ndarray of shape (n_rows, n_voxels)
        Diagonal of ``C Cov(beta) C'`` (times ``q`` with Knapp-Hartung).
    stat, p, z : ndarray of shape (n_voxels,)
        t or F; one-sided upper-tail p; z with the same upper-tail p (NaN where not estimable).
    df1 : float
        Rank of the contrast (1 for t).
    dof : ndarray of shape (n_voxels,)
        Denominator degrees of freedom ``k - p`` per voxel.
    adjustment : str
    """

    stat_type: Literal["t", "F"]
    effect: np.ndarray
    variance: np.ndarray
    stat: np.ndarray
    p: np.ndarray
    z: np.ndarray
    df1: float
    dof: np.ndarray
    adjustment: str


def valid_values(effects: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """Which map x voxel values are used (the input policy of this module).

    Parameters
    ----------
    effects, variances : ndarray of shape (n_maps, n_voxels)

    Returns
    -------
    ndarray of shape (n_maps, n_voxels), bool
        Finite effect, finite variance, variance >= the smallest normal double.

    Examples
    --------
    >>> valid_values(np.array([[1.0, 1.0, np.nan]]), np.array([[0.5, 0.0, 1.0]])).tolist()
    [[True, False, False]]
    """
    ok = np.isfinite(effects)  # then in place: one boolean temporary, not three
    ok &= np.isfinite(variances)
    with np.errstate(invalid="ignore"):
        # against a 1-element float64 array, not the scalar: numpy 1.x casts a scalar to the
        # array's float32, where the smallest normal double is 0 and a zero variance passed
        ok &= variances >= _MIN_VARIANCE_ARRAY
    return ok


def estimable_voxels(
    effects: np.ndarray,
    variances: np.ndarray,
    design: np.ndarray,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Voxels :func:`fit_mixed` can estimate: enough valid maps (see :func:`valid_values`) for
    the design, on which it has full column rank (and, with variance ``groups``, enough maps
    of every group for its tau^2). Cheap: no fit."""
    design = np.asarray(design, dtype=np.float64)
    ok = valid_values(effects, variances)
    if groups is None:
        return _estimable(ok, design)
    labels, index = _group_index(np.asarray(groups), design.shape[0])
    return _estimable(ok, design, index, len(labels))


def _estimable(
    ok: np.ndarray, design: np.ndarray, index: np.ndarray | None = None, n_groups: int = 0
) -> np.ndarray:
    """Voxels whose valid maps leave >= 1 dof and a full-rank X (one check per pattern); with
    variance groups (``index``), also every group identifiable (:func:`_groups_identifiable`)."""
    n_maps, p = design.shape
    masks, inverse = _valid_patterns(ok)
    good = masks.sum(axis=1) > p
    candidates = np.flatnonzero(good)
    # the patterns' masked designs, a bounded number at a time (K x n x p float64 at most
    # _RANK_CHECK_BYTES: with thousands of maps, most voxels may have a pattern of their own)
    step = max(1, _RANK_CHECK_BYTES // (8 * n_maps * p))
    for start in range(0, candidates.size, step):
        some = candidates[start : start + step]
        stack = design[np.newaxis] * masks[some][:, :, np.newaxis]
        good[some] = np.linalg.matrix_rank(stack) == p
    if index is not None:
        for m in np.flatnonzero(good):
            good[m] = _groups_identifiable(design[masks[m]], index[masks[m]], n_groups)
    return good[inverse]


#: Bytes of the masked designs whose rank :func:`_estimable` checks at once.
_RANK_CHECK_BYTES = 64 * 1024**2


def _valid_patterns(ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct columns of ``ok`` (n_maps, n_voxels) and each voxel's.

    Returns ``(masks, inverse)``: (K, n_maps) bool, one row per pattern of valid maps, and
    (n_voxels,) int, the row of each voxel (``masks[inverse].T == ok``). Each voxel's pattern is
    packed into bits (8 maps a byte) and compared as one opaque value: ``np.unique`` of the
    bool columns themselves (``axis=0``) took ~90 s for 1,050 maps x 259,353 voxels, the packed
    values ~1 s. Voxels where every map is valid, nearly all of them in practice, are set
    aside first.
    """
    n_maps, n_vox = ok.shape
    complete = ok.all(axis=0)
    partial = np.flatnonzero(~complete)
    inverse = np.zeros(n_vox, dtype=np.intp)
    if not partial.size:
        return np.ones((1, n_maps), dtype=bool), inverse
    packed = np.ascontiguousarray(np.packbits(ok[:, partial], axis=0).T)  # (n_partial, bytes)
    keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, first, which = np.unique(keys, return_index=True, return_inverse=True)
    masks = np.concatenate([np.ones((1, n_maps), dtype=bool), ok[:, partial[first]].T])
    inverse[partial] = 1 + which.ravel()
    return masks, inverse


def _groups_identifiable(design: np.ndarray, index: np.ndarray, n_groups: int) -> bool:
    """Every group leaves residual information on its tau^2: ``k_g > p - rank(X_(-g))``, the
    columns that only its maps determine (``k_g > p_g`` for a separable design; ``k_g >= 2``
    for an intercept plus a group difference)."""
    return all(np.count_nonzero(index == g) > _own_columns(design, index == g)
               for g in range(n_groups))  # fmt: skip


def _own_columns(design: np.ndarray, rows: np.ndarray) -> int:
    """Columns determined by the maps ``rows`` alone: ``p - rank(X without those rows)``."""
    others = design[~rows]
    return design.shape[1] - (int(np.linalg.matrix_rank(others)) if others.shape[0] else 0)


def _check_fit_inputs(effects, variances, design, method) -> None:
    if method not in _METHOD_CODES:
        raise UsageError(f"Unknown estimator {method!r}: use one of {sorted(_METHOD_CODES)}.")
    if effects.ndim != 2 or effects.shape != variances.shape:
        raise DataError(
            f"effects {effects.shape} and variances {variances.shape} must be the same "
            "(n_maps, n_voxels) shape."
        )
    if design.ndim != 2 or design.shape[0] != effects.shape[0]:
        raise DataError(
            f"The design has shape {design.shape} but {effects.shape[0]} maps were given: "
            "one design row per map."
        )
    if not np.isfinite(design).all():
        raise DataError("The design contains NaN or inf.")
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise DataError(
            "The mixed-effects design must have full column rank; remove redundant columns."
        )


def _fit_block(yt, vt, ok, est, design, code, n_grid, out, sl) -> None:
    beta, cov, tau2, rwr = out
    kern.fit_voxels(
        np.ascontiguousarray(yt, dtype=np.float64),
        np.ascontiguousarray(vt, dtype=np.float64),
        np.ascontiguousarray(ok),
        est,
        design,
        code,
        n_grid,
        0.0,
        beta[:, sl],
        cov[:, :, sl],
        tau2[sl],
        rwr[sl],
    )


def fit_mixed(
    effects: np.ndarray,
    variances: np.ndarray,
    design: np.ndarray,
    method: Method = "reml",
    groups: np.ndarray | None = None,
    n_grid: int = DEFAULT_N_GRID,
) -> MixedFit:
    """Fit the mixed-effects model at every voxel (see the module docstring for the formulas).

    Parameters
    ----------
    effects : ndarray of shape (n_maps, n_voxels), float
        First-level effect estimates.
    variances : ndarray of shape (n_maps, n_voxels), float
        Their variances (squared standard errors).
    design : ndarray of shape (n_maps, p), float
        Design matrix, full column rank.
    method : {"wls", "fe", "dl", "hedges", "ml", "reml"}
        Estimator of tau^2 ("wls" and "fe" are the same: tau^2 = 0).
    groups : ndarray of shape (n_maps,), optional
        Variance-group label of each map: one ``tau^2`` per group (sorted labels; see the module
        docstring). Any design with ML/REML/FE; a design separable by group with DL/Hedges.
    n_grid : int
        Grid points of the ML/REML global search (>= 8).

    Returns
    -------
    MixedFit

    Raises
    ------
    UsageError
        Unknown method, n_grid too small, DL/Hedges with a design not separable by the variance
        groups.
    DataError
        Inconsistent shapes, non-finite or rank-deficient design.
    """
    effects = np.asarray(effects)
    variances = np.asarray(variances)
    design = np.ascontiguousarray(design, dtype=np.float64)
    _check_fit_inputs(effects, variances, design, method)
    if n_grid < 8:
        raise UsageError(f"n_grid must be at least 8, got {n_grid}.")
    if groups is not None:
        return _fit_groups(effects, variances, design, method, np.asarray(groups), n_grid)
    n_maps, n_vox = effects.shape
    p = design.shape[1]
    ok = valid_values(effects, variances)
    est = _estimable(ok, design)
    out = (
        np.full((p, n_vox), np.nan),
        np.full((p, p, n_vox), np.nan),
        np.full(n_vox, np.nan),
        np.full(n_vox, np.nan),
    )
    code = _METHOD_CODES[method]
    width = _block_voxels(n_maps)
    for start in range(0, n_vox, width):
        sl = slice(start, min(start + width, n_vox))
        blocks = (effects[:, sl].T, variances[:, sl].T, ok[:, sl].T, est[sl])
        _fit_block(*blocks, design, code, n_grid, out, sl)
    n_used = ok.sum(axis=0)
    dof = np.where(est, n_used - p, np.nan).astype(np.float64)
    n_excluded = int(ok.size - np.count_nonzero(ok))
    fit = MixedFit(
        method="fe" if method == "wls" else method,
        beta=out[0],
        cov_beta=out[1],
        tau2=out[2],
        rwr=out[3],
        n_used=n_used,
        dof=dof,
        estimable=est,
        n_excluded_values=n_excluded,
        n_voxels_with_exclusions=int(np.count_nonzero(~ok.all(axis=0))),
        n_not_estimable=int(n_vox - np.count_nonzero(est)),
    )
    if n_excluded:
        log.info(
            "mixed effects: %d map x voxel values excluded (zero, negative or non-finite "
            "variance, or non-finite effect) at %d voxels; %d voxels not estimable",
            n_excluded,
            fit.n_voxels_with_exclusions,
            fit.n_not_estimable,
        )
    return fit


def preload_kernels() -> None:
    """Load :func:`fit_mixed`'s compiled kernel (numba's on-disk cache; compiled when absent)
    without running it, for both layouts the fit passes (whole arrays, and column blocks of
    wider ones).

    Loading costs ~0.5 s of numba's own set-up, once per process, whatever the data: the
    pipeline calls this in a background thread while the maps are read (their decoding
    releases the GIL), so that the fit finds the kernel ready. Nothing is executed, so no
    parallel region is launched outside the main thread.
    """
    from numba import typeof

    # n_vox 4: columns 0:2 of (2, 4) outputs are not contiguous (blocks of a wider fit with two
    # or more design columns); n_vox 2: whole arrays, contiguous
    for n_vox in (2, 4):
        maps = np.zeros((2, 3))
        out = (np.zeros((2, n_vox)), np.zeros((2, 2, n_vox)), np.zeros(n_vox), np.zeros(n_vox))
        args = (maps, maps, np.zeros((2, 3), dtype=bool), np.zeros(2, dtype=bool),
                np.zeros((3, 2)), int(kern.REML), DEFAULT_N_GRID, 0.0,
                out[0][:, :2], out[1][:, :, :2], out[2][:2], out[3][:2])  # fmt: skip
        kern.fit_voxels.compile(tuple(typeof(a) for a in args))


def _group_index(groups: np.ndarray, n_maps: int) -> tuple[list, np.ndarray]:
    """Sorted labels and the index (0..G-1) of each map's label."""
    if groups.shape != (n_maps,):
        raise UsageError(f"groups must have one label per map ({n_maps}).")
    labels = sorted(set(groups.tolist()))
    position = {g: i for i, g in enumerate(labels)}
    return labels, np.array([position[g] for g in groups.tolist()], dtype=np.int64)


def _separable_columns(design: np.ndarray, index: np.ndarray, n_groups: int):
    """Per group, the design columns non-zero in its rows only; None when a column is
    non-zero in several groups or a group has no column of its own."""
    nonzero = np.stack([(design[index == g] != 0).any(axis=0) for g in range(n_groups)])
    if (nonzero.sum(axis=0) > 1).any():
        return None
    cols = [np.flatnonzero(row) for row in nonzero]
    return None if any(c.size == 0 for c in cols) else cols


def _fit_groups(effects, variances, design, method, groups, n_grid) -> MixedFit:
    """One tau^2 per variance group: group by group when the design is separable, else the
    joint search (ML/REML only)."""
    labels, index = _group_index(groups, design.shape[0])
    cols = _separable_columns(design, index, len(labels))
    if cols is not None:
        return _fit_separable(effects, variances, design, method, labels, index, cols, n_grid)
    if method in ("dl", "hedges"):
        raise UsageError(_MOMENTS_NEED_SEPARABLE.format(method=method))
    _check_joint_groups(len(labels), method)
    return _fit_joint(effects, variances, design, method, labels, index, n_grid)


def _fit_separable(effects, variances, design, method, labels, index, cols, n_grid) -> MixedFit:
    """One fit per variance group (separable design), assembled into one MixedFit."""
    p, n_vox = design.shape[1], effects.shape[1]
    beta = np.full((p, n_vox), np.nan)
    cov = np.zeros((p, p, n_vox))
    fits = []
    for g, c in enumerate(cols):
        rows = index == g
        sub = design[np.ix_(rows, c)]
        fit = fit_mixed(effects[rows], variances[rows], sub, method, None, n_grid)
        beta[c] = fit.beta
        cov[np.ix_(c, c)] = fit.cov_beta
        fits.append(fit)
    est = np.logical_and.reduce([f.estimable for f in fits])
    beta[:, ~est] = np.nan
    cov[:, :, ~est] = np.nan
    n_used = sum(f.n_used for f in fits)
    return MixedFit(
        method=fits[0].method,
        beta=beta,
        cov_beta=cov,
        tau2=np.where(est, np.stack([f.tau2 for f in fits]), np.nan),
        rwr=np.where(est, sum(f.rwr for f in fits), np.nan),
        n_used=n_used,
        dof=np.where(est, n_used - p, np.nan).astype(np.float64),
        estimable=est,
        n_excluded_values=sum(f.n_excluded_values for f in fits),
        n_voxels_with_exclusions=int(np.count_nonzero(~valid_values(effects, variances).all(0))),
        n_not_estimable=int(n_vox - np.count_nonzero(est)),
        group_labels=tuple(labels),
    )


def check_variance_groups(design: np.ndarray, groups: np.ndarray, method: str) -> None:
    """Refuse variance groups this design or estimator cannot fit, before any image is read.

    Raises
    ------
    UsageError
        ``dl``/``hedges`` with a design that is not separable by group (no moment estimator
        of several tau^2 with shared columns is implemented); ``ml``/``reml`` on such a design
        with more than :data:`MAX_JOINT_GROUPS` groups (the joint search's grid).
    DataError
        A group with too few maps for its tau^2 (see :func:`_groups_identifiable`), naming
        the group, its number of maps and the minimum.
    """
    design = np.asarray(design, dtype=np.float64)
    labels, index = _group_index(np.asarray(groups), design.shape[0])
    joint = _separable_columns(design, index, len(labels)) is None
    if method in ("dl", "hedges") and joint:
        raise UsageError(_MOMENTS_NEED_SEPARABLE.format(method=method))
    if joint:
        _check_joint_groups(len(labels), method)
    for g, label in enumerate(labels):
        rows = index == g
        own = _own_columns(design, rows)
        if np.count_nonzero(rows) <= own:
            raise DataError(
                f"Variance group {label!r} has {np.count_nonzero(rows)} map(s) but its tau^2 "
                f"needs at least {own + 1} with this design ({own} column(s) are determined "
                "by its maps alone): merge it with another group or add maps."
            )


def _check_joint_groups(n_groups: int, method: str) -> None:
    """Refuse more groups than the joint ML/REML search can grid (:data:`MAX_JOINT_GROUPS`)."""
    if method in ("ml", "reml") and n_groups > MAX_JOINT_GROUPS:
        raise UsageError(
            f"{n_groups} levels are too many variance groups for the joint {method} search "
            f"(at most {MAX_JOINT_GROUPS}: its grid has {group_grid_points(n_groups)}^G "
            "points per voxel, G the number of groups): use a column with fewer levels, or a "
            "design separable by group (each group then gets its own one-tau^2 search)."
        )


_MOMENTS_NEED_SEPARABLE = (
    "Variance groups with the {method} estimator need a design separable by group (every "
    "column non-zero in one group's maps only); this design has columns shared by several "
    "groups: use reml or ml (joint likelihood over the groups' tau^2)."
)


#: Most variance groups of the joint ML/REML search (design not separable by group): its
#: product grid has at least 6 values per group, 7,776 points per voxel with 5 groups; 6 groups
#: (46,656 points) took 70 s on 973 voxels, and 12 overflowed the kernel's allocations.
MAX_JOINT_GROUPS = 5


def group_grid_points(n_groups: int, n_grid: int = DEFAULT_N_GRID) -> int:
    """Grid values per group of the joint search (0 and log-spaced ones): ``2 n_grid / 3``
    (32 by default), fewer for three groups or more so that the product grid stays below
    ~4,096 points (at least 6 per group)."""
    return max(6, min(2 * n_grid // 3, int(round(4096 ** (1.0 / n_groups)))))


def _fit_joint(effects, variances, design, method, labels, index, n_grid) -> MixedFit:
    """Joint ML/REML (or FE) fit with one tau^2 per group, any design (see the module
    docstring)."""
    n_groups = len(labels)
    n_vox, p = effects.shape[1], design.shape[1]
    ok = valid_values(effects, variances)
    est = _estimable(ok, design, index, n_groups)
    beta = np.full((p, n_vox), np.nan)
    cov = np.full((p, p, n_vox), np.nan)
    tau2 = np.full((n_groups, n_vox), np.nan)
    rwr = np.full(n_vox, np.nan)
    n_pts = group_grid_points(n_groups, n_grid)
    width = _block_voxels(effects.shape[0])
    for start in range(0, n_vox, width):
        sl = slice(start, min(start + width, n_vox))
        data = [np.ascontiguousarray(a[:, sl].T) for a in (effects, variances, ok)]
        yt, vt = (np.asarray(a, dtype=np.float64) for a in data[:2])
        if method in ("fe", "wls"):  # tau^2 = 0 for every group: the plain WLS fit
            kern.fit_voxels(
                yt, vt, data[2], est[sl], design, kern.FE, n_grid, 0.0,
                beta[:, sl], cov[:, :, sl], tau2[0, sl], rwr[sl],
            )  # fmt: skip
            tau2[:, sl] = tau2[0, sl]
            continue
        kern.fit_voxels_groups(
            yt, vt, data[2], est[sl], design, index, method == "reml", n_pts,
            beta[:, sl], cov[:, :, sl], tau2[:, sl], rwr[sl],
        )  # fmt: skip
    n_used = ok.sum(axis=0)
    return MixedFit(
        method="fe" if method == "wls" else method,
        beta=beta,
        cov_beta=cov,
        tau2=tau2,
        rwr=rwr,
        n_used=n_used,
        dof=np.where(est, n_used - p, np.nan).astype(np.float64),
        estimable=est,
        n_excluded_values=int(ok.size - np.count_nonzero(ok)),
        n_voxels_with_exclusions=int(np.count_nonzero(~ok.all(axis=0))),
        n_not_estimable=int(n_vox - np.count_nonzero(est)),
        group_labels=tuple(labels),
    )


def log_likelihood(
    effects: np.ndarray,
    variances: np.ndarray,
    design: np.ndarray,
    tau2: np.ndarray,
    reml: bool = True,
) -> np.ndarray:
    """ML or REML log-likelihood of every voxel at the given ``tau2`` (constants dropped).

    Parameters
    ----------
    effects, variances : ndarray of shape (n_maps, n_voxels)
    design : ndarray of shape (n_maps, p)
    tau2 : ndarray of shape (n_voxels,)
    reml : bool

    Returns
    -------
    ndarray of shape (n_voxels,), float64
        Using the valid maps of each voxel (see :func:`valid_values`).
    """
    effects = np.asarray(effects)
    variances = np.asarray(variances)
    ok = valid_values(effects, variances)
    out = np.empty(effects.shape[1])
    kern.loglik_voxels(
        np.ascontiguousarray(effects.T, dtype=np.float64),
        np.ascontiguousarray(variances.T, dtype=np.float64),
        np.ascontiguousarray(ok.T),
        np.ascontiguousarray(design, dtype=np.float64),
        np.ascontiguousarray(tau2, dtype=np.float64),
        reml,
        out,
    )
    return out


def _scale_factor(fit: MixedFit, adjustment: Adjustment) -> np.ndarray:
    """Knapp-Hartung ``q = r'Wr / (k - p)`` (floored at 1 for "knapp-hartung-floor"), or 1."""
    if adjustment == "none":
        return np.ones_like(fit.rwr)
    if adjustment not in ("knapp-hartung", "knapp-hartung-floor"):
        raise UsageError(
            f"Unknown adjustment {adjustment!r}: use 'none', 'knapp-hartung' or "
            "'knapp-hartung-floor'."
        )
    q = fit.rwr / fit.dof
    return np.maximum(q, 1.0) if adjustment == "knapp-hartung-floor" else q


def _p_and_z(stat: np.ndarray, df1: float, dof: np.ndarray, is_t: bool):
    """p and z with per-voxel dof: one call of distributions.py per distinct dof value."""
    p = np.full(stat.shape, np.nan)
    z = np.full(stat.shape, np.nan)
    finite = np.isfinite(dof) & ~np.isnan(stat)
    for d in np.unique(dof[finite]):
        sel = finite & (dof == d)
        p[sel], z[sel] = t_sf_and_z(stat[sel], d) if is_t else f_sf_and_z(stat[sel], df1, d)
    return p, z


def mixed_contrast(
    fit: MixedFit,
    weights: np.ndarray,
    test: Literal["t", "F"] = "t",
    adjustment: Adjustment = "none",
) -> MixedContrast:
    """t or F contrast of a mixed-effects fit, with p and precise z.

    Parameters
    ----------
    fit : MixedFit
    weights : ndarray of shape (p,) or (n_rows, p)
        Contrast matrix ``C`` (one row for t).
    test : {"t", "F"}
        ``t = c b / sqrt(s c Cov(b) c')`` on ``k - p`` dof;
        ``F = (Cb)' (s C Cov(b) C')^-1 (Cb) / rank(C)`` on ``(rank(C), k - p)`` dof,
        with ``s = 1`` or the Knapp-Hartung factor ``q``.
    adjustment : {"none", "knapp-hartung", "knapp-hartung-floor"}
        See the module docstring.

    Returns
    -------
    MixedContrast
    """
    c = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if c.shape[1] != fit.beta.shape[0] or (test == "t" and c.shape[0] != 1):
        raise UsageError(f"Contrast weights of shape {c.shape} do not fit this design/test.")
    if test not in ("t", "F"):
        raise UsageError(f"Unknown contrast test {test!r}: use 't' or 'F'.")
    scale = _scale_factor(fit, adjustment)
    effect = c @ fit.beta
    ccov = np.einsum("ia,abv,jb->ijv", c, fit.cov_beta, c) * scale  # (rows, rows, V)
    variance = np.einsum("iiv->iv", ccov)
    with np.errstate(invalid="ignore", divide="ignore"):
        if test == "t":
            df1 = 1.0
            stat = effect[0] / np.sqrt(variance[0])
        else:
            df1 = float(np.linalg.matrix_rank(c))
            stat = _f_stat(effect, ccov, df1)
    p, z = _p_and_z(stat, df1, fit.dof, test == "t")
    return MixedContrast(test, effect, variance, stat, p, z, df1, fit.dof, adjustment)


def _f_stat(effect: np.ndarray, ccov: np.ndarray, df1: float) -> np.ndarray:
    """``(Cb)' M^-1 (Cb) / df1`` per voxel, ``M`` the (rows x rows) covariance of ``Cb``."""
    m = np.moveaxis(ccov, -1, 0)  # (V, rows, rows)
    out = np.full(effect.shape[1], np.nan)
    good = np.isfinite(m).all(axis=(1, 2))
    if good.any():
        m_inv = np.linalg.pinv(m[good])
        e = effect[:, good].T
        out[good] = np.einsum("vi,vij,vj->v", e, m_inv, e) / df1
    return out


_ADJUSTMENT_CODES = {
    "none": kern.ADJ_NONE,
    "knapp-hartung": kern.ADJ_KH,
    "knapp-hartung-floor": kern.ADJ_KH_FLOOR,
}


class RelabelledFits:
    """Refits of one mixed-effects model to relabelled data, for permutation inference.

    The data of a relabelling (signs ``s``, row order ``perm``) are ``s * E[perm] + H`` (``E``,
    ``H``: residuals and fitted values of a reduced model, see
    :mod:`bids_group.inference.mixed_permutation`); each is fitted exactly as :func:`fit_mixed`
    does (tau^2 re-estimated) and the contrast's t or F computed as :func:`mixed_contrast` does,
    in one compiled pass over voxel chunks per batch (no full-size temporary per relabelling).

    Parameters
    ----------
    residuals, fitted, variances : ndarray of shape (n_maps, n_voxels)
    ok : ndarray of shape (n_maps, n_voxels), bool
        The valid values (:func:`valid_values` of the original data); every voxel estimable.
    design : ndarray of shape (n_maps, p)
    method, adjustment, n_grid
        As :func:`fit_mixed` and :func:`mixed_contrast`.
    contrast : ndarray of shape (q, p)
        Full row rank (t when q = 1, else F).
    """

    def __init__(self, residuals, fitted, variances, ok, design, method: Method, contrast,
                 adjustment: Adjustment = "none", n_grid: int = DEFAULT_N_GRID):  # fmt: skip
        if method not in _METHOD_CODES or adjustment not in _ADJUSTMENT_CODES:
            raise UsageError(f"Unknown estimator {method!r} or adjustment {adjustment!r}.")
        self._rt = np.ascontiguousarray(np.asarray(residuals, dtype=np.float64).T)
        self._ft = np.ascontiguousarray(np.asarray(fitted, dtype=np.float64).T)
        self._vt = np.ascontiguousarray(np.where(ok, variances, 1.0).T, dtype=np.float64)
        self._ok = np.ascontiguousarray(np.asarray(ok, dtype=bool).T)
        self._design = np.ascontiguousarray(design, dtype=np.float64)
        self._contrast = np.ascontiguousarray(np.atleast_2d(contrast), dtype=np.float64)
        self._codes = (_METHOD_CODES[method], _ADJUSTMENT_CODES[adjustment])
        self._n_grid = n_grid
        self.dof = (self._ok.sum(axis=1) - design.shape[1]).astype(np.float64)

    def stats(self, signs: np.ndarray, perms: np.ndarray) -> np.ndarray:
        """t or F, (n_batch, n_voxels) float64, for relabellings ``signs``/``perms`` (n_batch,
        n_maps)."""
        out = np.empty((signs.shape[0], self._rt.shape[0]))
        method, adj = self._codes
        kern.relabelled_stats(self._rt, self._ft, self._vt, self._ok, self._design, method,
                              self._n_grid, np.ascontiguousarray(signs, dtype=np.float64),
                              np.ascontiguousarray(perms, dtype=np.int64), self._contrast, adj,
                              out)  # fmt: skip
        return out
