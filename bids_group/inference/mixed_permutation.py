"""Permutation inference on mixed-effects statistics: voxel, cluster and TFCE FWER.

The model at each voxel is that of :mod:`bids_group.mixed_effects`: ``y_i = x_i' beta + u_i +
e_i`` with ``Var(e_i) = v_i`` known (the first-level variance) and ``Var(u_i) = tau^2``
estimated. The errors ``u_i + e_i`` are independent with *unequal* variances ``v_i + tau^2``, so
rows are not exchangeable (a row permutation would pair one map's residual with another map's
variance) but each error is symmetric about 0: the relabellings are **sign flips** (Winkler et
al. 2014, "independent and symmetric errors"; within or of whole exchangeability blocks).

Nuisance: Freedman-Lane with the mixed model. The reduced model is ``Z = X C_u`` (``C_u`` a
basis of the null space of the contrast ``C``: ``C beta = 0`` iff ``beta = C_u gamma``), fitted at
every voxel with the same estimator (its own ``tau^2``); ``H = Z gamma`` are its fitted values and
``E = Y - H`` its residuals. A relabelling with signs ``s`` gives ``Y* = s * E + H``, with every
map keeping its variance (flipping a sign does not change a variance), refitted with the full
model: **tau^2 is re-estimated in every relabelling** by the same estimator (the same global
search for ML/REML) and the contrast's t or F computed with the same small-sample adjustment.
Without nuisance (the contrast spans the design, e.g. a one-sample test), ``Y* = s * Y`` and the
test is exact under H0 for any symmetric error distribution; with nuisance it is approximate, as
Freedman-Lane is for OLS.

Statistic: **z**, the t (or F) converted with each voxel's own degrees of freedom (``k - p``, k
the maps valid at the voxel), as PALM's ``-zstat``. Voxels where some maps are excluded (zero or
negative variance) have fewer dof; on the z scale every voxel's statistic has the same null
distribution, so the maximum over voxels weighs them alike and the cluster-forming threshold and
TFCE mean the same thing everywhere. The cluster-forming height is the z of the given p.
The identity is run through the same path as every relabelling and compared with the
parametric z as in :mod:`bids_group.inference.permutation` (ties counted, p can only grow).

Cost: one full mixed-effects refit per relabelling, compiled and parallel over voxel chunks
(:class:`bids_group.mixed_effects.RelabelledFits`): on pain21's 192,885 voxels and 21 maps, 2
cores, 0.115 s per relabelling for DerSimonian-Laird and 0.364 s for REML
(``benchmarks/bench_mixed_permutation.py``), so 1,000 relabellings take minutes, not seconds;
with variance groups the general fit runs once per relabelling (slower). p-values are
reproducible from the seed as for OLS, in process or on Dask workers.

References
----------
Winkler AM, Ridgway GR, Webster MA, Smith SM, Nichols TE (2014). Permutation inference for the
general linear model. NeuroImage 92:381-397.
Freedman D, Lane D (1983). A nonstochastic interpretation of reported significance levels.
J Bus Econ Stat 1:292-298.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property, partial
from typing import TYPE_CHECKING

import numpy as np
from scipy import linalg, special

from bids_group.errors import DataError, UsageError
from bids_group.inference import exchangeability as exch
from bids_group.inference import tfce as tfce_mod
from bids_group.inference.permutation import (
    BATCH_SPATIAL,
    NullEngine,
    NullStatType,
    PermutationResult,
    ProgressCallback,
    StatType,
    _Config,
    _validate,
    design_exchangeability,
    numba_threads,
    observed_maps,
    relabelling_count,
    run_test,
)
from bids_group.mixed_effects import (
    DEFAULT_N_GRID,
    Adjustment,
    Method,
    MixedFit,
    RelabelledFits,
    fit_mixed,
    mixed_contrast,
    valid_values,
)

if TYPE_CHECKING:
    from bids_group.executor import Executor

log = logging.getLogger(__name__)

#: Relabellings per batch without spatial statistics (each is a whole-brain fit: the batch only
#: sets how often progress is reported).
BATCH_VOXEL = 8


@dataclass(frozen=True)
class _Model:
    """What every relabelling refits: the Freedman-Lane parts and the estimator."""

    residuals: np.ndarray  # E, (n_maps, n_voxels) float64, 0 where a value is excluded
    fitted: np.ndarray  # H, (n_maps, n_voxels) float64
    variances: np.ndarray  # NaN where a value is excluded
    design: np.ndarray
    contrast: np.ndarray
    stat_type: StatType
    method: Method
    adjustment: Adjustment
    groups: np.ndarray | None
    n_grid: int

    def fit(self, effects: np.ndarray) -> MixedFit:
        return fit_mixed(effects, self.variances, self.design, self.method, self.groups,
                         self.n_grid)  # fmt: skip

    def z(self, fit: MixedFit) -> np.ndarray:
        """The contrast's z at every voxel (0 where undefined, as a zero-variance OLS voxel)."""
        z = mixed_contrast(fit, self.contrast, self.stat_type, self.adjustment).z
        return np.where(np.isnan(z), 0.0, z)

    def batch_z(self, signs: np.ndarray, perms: np.ndarray) -> np.ndarray:
        """z maps (n_batch, n_voxels) of a batch of relabellings."""
        if self.groups is not None:  # one tau^2 per group: the general fit, one at a time
            return np.stack([self.z(self.fit(s[:, None] * self.residuals[p] + self.fitted))
                             for s, p in zip(signs, perms, strict=True)])  # fmt: skip
        return fast_z(self.refits.stats(signs, perms), self.refits.dof, self.stat_type,
                      float(self.contrast.shape[0]))  # fmt: skip

    @cached_property
    def refits(self) -> RelabelledFits:
        ok = np.isfinite(self.variances)
        return RelabelledFits(self.residuals, self.fitted, self.variances, ok, self.design,
                              self.method, self.contrast, self.adjustment, self.n_grid)  # fmt: skip


def fast_z(stat: np.ndarray, dof: np.ndarray, stat_type: StatType, df1: float) -> np.ndarray:
    """z of t (or F) with per-voxel ``dof``, vectorised (no loop over distinct dof values).

    From the smaller tail, so precise wherever it does not underflow (|z| < ~37), and exactly
    antisymmetric in t (a sign flip of every map of a one-sample test gives exactly -z). Not
    the precise-in-every-tail conversion of :mod:`bids_group.distributions`: the permutation
    test compares the observed z with the engine's own value for the identity (see
    :mod:`bids_group.inference.permutation`), so only consistency matters here. NaN -> 0.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        if stat_type == "t":
            z = -special.ndtri(special.stdtr(dof, -np.abs(stat))) * np.sign(stat)
        else:
            z = -special.ndtri(special.fdtrc(df1, dof, stat))
    return np.where(np.isnan(z), 0.0, z)


def reduced_design(design: np.ndarray, contrast: np.ndarray) -> np.ndarray:
    """Freedman-Lane's reduced (nuisance-only) design ``X C_u``, ``C_u`` an orthonormal basis
    of the null space of the contrast: (n_maps, p - q), no column when the contrast spans X."""
    contrast = np.atleast_2d(np.asarray(contrast, dtype=np.float64))
    return np.asarray(design, dtype=np.float64) @ linalg.null_space(contrast)


def _freedman_lane(effects, variances, ok, design, contrast, method, groups, n_grid):
    """(E, H): residuals and fitted values of the reduced (nuisance-only) mixed model."""
    reduced = reduced_design(design, contrast)
    if reduced.shape[1] == 0:
        return np.where(ok, effects, 0.0), np.zeros(effects.shape)
    fit = fit_mixed(effects, variances, reduced, method, groups, n_grid)
    fitted = reduced @ np.where(np.isfinite(fit.beta), fit.beta, 0.0)
    return np.where(ok, effects - fitted, 0.0), fitted


class _MixedEngine(NullEngine):
    """Statistic maps of a batch: one full mixed-effects refit per relabelling."""

    def __init__(self, cfg: _Config, obs, model: _Model):
        self.cfg, self.obs, self.model = cfg, obs, model
        self.spatial = cfg.graph is not None
        self.batch_size = BATCH_SPATIAL if self.spatial else BATCH_VOXEL
        self._identity(np.abs(obs.stat) if cfg.two_sided else obs.stat)

    def _stats(self, batch: exch.Relabellings, full, maxima, threshold, counts) -> None:
        zs = self.model.batch_z(batch.signs, batch.perm)
        for i, z in enumerate(zs):
            cmp = np.abs(z) if self.cfg.two_sided else z
            maxima[i] = cmp.max(initial=-np.inf)
            counts += cmp >= threshold
            if full is not None:
                full[i] = z

    def _result_dof(self) -> tuple[float, ...]:
        n_rows, p = self.cfg.design.shape
        q = float(self.cfg.contrast.shape[0])
        return (float(n_rows - p),) if self.cfg.stat_type == "t" else (q, float(n_rows - p))

    def _result_stat_type(self) -> NullStatType:
        return "z"


def cluster_height_z(cluster_forming_p: float, two_sided: bool) -> float:
    """The z of an upper-tail p (halved per tail when two-sided)."""
    return float(-special.ndtri(cluster_forming_p / (2.0 if two_sided else 1.0)))


def mixed_permutation_test(
    effects: np.ndarray,
    variances: np.ndarray,
    design: np.ndarray,
    contrast: np.ndarray,
    *,
    method: Method = "reml",
    adjustment: Adjustment = "none",
    groups: np.ndarray | None = None,
    stat_type: StatType = "t",
    n_perm: int = 1000,
    two_sided: bool = False,
    mask: np.ndarray | None = None,
    cluster_forming_p: float | None = None,
    tfce: bool = False,
    tfce_params: tfce_mod.TfceParams | None = None,
    connectivity: int = tfce_mod.DEFAULT_CONNECTIVITY,
    scheme: exch.SchemeChoice = "auto",
    blocks: np.ndarray | None = None,
    whole_blocks: bool = False,
    seed: int | None = None,
    n_jobs: int = 1,
    progress: ProgressCallback | None = None,
    n_grid: int = DEFAULT_N_GRID,
    executor: Executor | None = None,
) -> PermutationResult:
    """Sign-flipping test of one contrast of a mixed-effects model (see the module docstring).

    Parameters
    ----------
    effects, variances : ndarray of shape (n_maps, n_voxels)
        First-level effects and their variances; values failing
        :func:`bids_group.mixed_effects.valid_values` are excluded at their voxel. Every voxel
        must be estimable (:func:`bids_group.mixed_effects.estimable_voxels`).
    design, contrast, stat_type, n_perm, two_sided, mask, cluster_forming_p, tfce, tfce_params,
    connectivity, blocks, whole_blocks, seed, n_jobs, progress
        As :func:`bids_group.inference.permutation.permutation_test`.
    method, adjustment, groups, n_grid
        As :func:`bids_group.mixed_effects.fit_mixed` and :func:`~.mixed_contrast`.
    scheme : {"auto", "flip"}
        Sign flips ("auto" is "flip"); row permutation is refused (see the module docstring).
    executor : Executor, optional
        As :func:`~bids_group.inference.permutation.permutation_test`.

    Returns
    -------
    PermutationResult
        ``stat_type`` is ``"z"``; ``stat`` is the parametric z; ``dof`` the nominal ones
        (``n - p``); cluster heights are on the z scale.

    Raises
    ------
    UsageError
        Row permutation asked for, or as ``permutation_test``.
    DataError
        A voxel where the model is not estimable, or as ``permutation_test``.
    """
    if scheme == "permute":
        raise UsageError(
            "mixed-effects permutation inference flips signs: the maps' errors have unequal "
            "variances (first-level variance + tau^2), so rows are not exchangeable; use the "
            "sign-flipping scheme (auto or flip)"
        )
    effects = np.asarray(effects)
    variances = np.asarray(variances)
    if effects.shape != variances.shape:
        raise DataError(f"effects {effects.shape} and variances {variances.shape} differ.")
    ok = valid_values(effects, variances)
    clean = np.where(ok, effects, 0.0)
    cfg = _validate(clean, design, contrast, stat_type, n_perm, two_sided, mask,
                    cluster_forming_p, tfce, tfce_params, connectivity, seed, n_jobs)  # fmt: skip
    _, ex = design_exchangeability(
        cfg.design, cfg.contrast, scheme="flip", blocks=blocks, whole_blocks=whole_blocks
    )
    n_total, exhaustive = relabelling_count(ex, n_perm)
    log.info("Mixed-effects permutation test (%s): %d sign flips%s, %d voxels", method, n_total,
             " (all distinct, exact)" if exhaustive else "", cfg.data.shape[1])  # fmt: skip
    with numba_threads(cfg.n_jobs):  # the reduced and observed fits are compiled kernels too
        v_clean = np.where(ok, variances, np.nan)
        groups = None if groups is None else np.asarray(groups)
        resid, fitted = _freedman_lane(
            effects, v_clean, ok, cfg.design, cfg.contrast, method, groups, n_grid
        )
        model = _Model(resid, fitted, v_clean, cfg.design, cfg.contrast, cfg.stat_type, method,
                       adjustment, groups, n_grid)  # fmt: skip
        fit = model.fit(np.where(ok, effects, np.nan))
        if not fit.estimable.all():
            raise DataError(
                f"the mixed-effects model is not estimable at {fit.n_not_estimable} voxel(s) "
                "(too few maps with a usable variance): remove them from the mask first"
            )
        height = (
            cluster_height_z(cfg.cluster_forming_p, cfg.two_sided)
            if cfg.cluster_forming_p is not None
            else None
        )
        observed = observed_maps(cfg, model.z(fit), height)
        make = partial(_MixedEngine, cfg, observed, model)
        return run_test(make, ex, exhaustive, n_total, cfg.seed, progress, executor)
