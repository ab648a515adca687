"""One interface over the model estimators, so the pipeline does not care which one runs.

:func:`fit_model` fits OLS (:mod:`bids_group.glm`) or a mixed-effects model with known
first-level variances (:mod:`bids_group.mixed_effects`) and returns a :class:`FittedModel`:
its contrasts as :class:`~bids_group.contrasts.ContrastResult`, its model-level maps and
what the report and the sidecars say about it. A new estimator plugs in here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import special

from bids_group.contrasts import ContrastResult, compute_contrast
from bids_group.glm import GlmFit, fit_ols, fitted_values
from bids_group.memory import TiledMaps, iter_tiles
from bids_group.spec import EstimationSpec

if TYPE_CHECKING:  # mixed_effects imports numba (~50 MB, ~0.2 s): only when a model needs it
    from bids_group.mixed_effects import MixedFit

log = logging.getLogger(__name__)

#: Full names of the estimators, for sidecars and the report.
ESTIMATOR_NAMES = {
    "ols": "ordinary least squares",
    "fe": "fixed effects (inverse-variance weighted least squares, tau^2 = 0)",
    "dl": "mixed effects, DerSimonian-Laird tau^2",
    "hedges": "mixed effects, Hedges tau^2",
    "ml": "mixed effects, maximum-likelihood tau^2",
    "reml": "mixed effects, restricted maximum-likelihood tau^2 (FLAME1's estimate)",
}


@dataclass(frozen=True)
class FittedModel:
    """A fitted model, whatever the estimator.

    Attributes
    ----------
    estimation : EstimationSpec
    dof : float
        Nominal residual degrees of freedom (n - rank X); with a mixed-effects model a voxel
        where some maps were excluded has fewer (see ``dof_map``).
    ols : GlmFit or None
    mixed : MixedFit or None
        A mixed-effects fit, or (with ``missing``) OLS on the maps present at each voxel.
    missing : bool
        Per-voxel missing data (``--min-coverage``) with OLS: ``mixed`` holds the fit with unit
        weights and tau^2 = 0, whose covariance the contrasts scale by ``RSS / (k - p)``
        (Knapp-Hartung's factor with unit weights), which is exactly OLS on the k maps present.
    """

    estimation: EstimationSpec
    dof: float
    ols: GlmFit | None = None
    mixed: MixedFit | None = None
    missing: bool = False
    #: Maps with data at each voxel (``missing`` only), for the stat-nmaps map.
    n_maps: np.ndarray | None = None
    #: Whether the design spans the constant vector (R^2 centred; ``missing`` only).
    spans_constant: bool = True

    def contrast(self, weights: np.ndarray, test: str) -> ContrastResult:
        """The t or F contrast ``weights`` at every voxel."""
        if self.ols is not None:
            return compute_contrast(self.ols, weights, test)
        assert self.mixed is not None
        from bids_group.mixed_effects import mixed_contrast

        adjustment = "knapp-hartung" if self.missing else self.estimation.adjustment
        result = mixed_contrast(self.mixed, weights, test, adjustment)
        dof = (self.dof,) if test == "t" else (result.df1, self.dof)
        # Two-sided p from z, which has the same tail probability as t at each voxel's own
        # dof (computed once, precisely, by mixed_contrast).
        return ContrastResult(
            stat_type=result.stat_type,
            effect=result.effect,
            variance=result.variance,
            stat=result.stat,
            p=result.p,
            z=result.z,
            dof=dof,
            p_two_sided=2.0 * special.ndtr(-np.abs(result.z)),
        )

    @property
    def dof_varies(self) -> bool:
        """True when some voxel has fewer degrees of freedom than the nominal ones."""
        return self.mixed is not None and bool(np.any(self.mixed.dof < self.dof))

    def sidecar(self) -> dict[str, Any]:
        """What every map's sidecar says about the estimator."""
        info: dict[str, Any] = {"Estimator": ESTIMATOR_NAMES[self.estimation.estimator]}
        if self.missing:
            info["MissingData"] = (
                "per voxel (--min-coverage): each voxel is fitted on the maps with data there; "
                "degrees of freedom k - p (stat-dof map), maps per voxel in the stat-nmaps map"
            )
        elif self.mixed is not None:
            info["VarianceFrom"] = f"stat-{self.estimation.variance_from} maps"
            info["Adjustment"] = self.estimation.adjustment
            info["DegreesOfFreedomPerVoxel"] = (
                "k - p with k the maps valid at the voxel (see the stat-dof map)"
                if self.dof_varies
                else "n - p at every voxel"
            )
            if self.mixed.group_labels:
                info["VarianceGroups"] = self.variance_groups()
        return info

    def variance_groups(self) -> dict[str, Any]:
        """The variance groups of a mixed fit: the column and its levels (tau^2 volume order)."""
        assert self.mixed is not None
        return {
            "Column": self.estimation.variance_groups,
            "Levels": [str(g) for g in self.mixed.group_labels],
        }

    def model_maps(
        self, data: np.ndarray, *, residuals: bool
    ) -> list[tuple[str, np.ndarray, dict[str, Any]]]:
        """Model-level maps: (stat, in-mask values, sidecar) for each.

        OLS: R^2 and the residual variance (with ``residuals``, also the residuals and the
        fitted values, 4-D). Mixed effects: tau^2 (and the per-voxel dof when it varies).
        """
        if self.ols is not None:
            fit = self.ols
            total = "centred on the voxel's mean" if fit.centred_r_squared else (
                "uncentred (sum of squares: the design does not span the constant)"
            )  # fmt: skip
            maps = [
                ("rsquared", fit.r_squared, {"Statistic": "R-squared = 1 - RSS / TSS",
                                             "TotalSumOfSquares": total}),
                ("residualvariance", fit.residual_variance,
                 {"Statistic": "residual variance = RSS / residual degrees of freedom"}),
            ]  # fmt: skip
            if residuals:
                predicted = fitted_values(fit, data)
                maps += [
                    ("predicted", predicted, {"Statistic": "fitted values X @ beta"}),
                    ("errorts", data - predicted, {"Statistic": "residuals Y - X @ beta"}),
                ]
            return maps
        assert self.mixed is not None
        if self.missing:
            return self._missing_maps(data)
        about = {"Statistic": "between-subject variance tau^2 of the mixed-effects model"}
        if self.mixed.group_labels:  # 4-D: one volume per group, in the order of the levels
            about = {
                "Statistic": "between-subject variance tau^2 of each variance group, one "
                "volume per group in the order of VarianceGroups.Levels"
            }
        maps = [("tau2", self.mixed.tau2, about)]  # fmt: skip
        if self.dof_varies:
            maps.append(("dof", self.mixed.dof, {"Statistic": "residual degrees of freedom"}))
            maps.append(("nmaps", self.mixed.n_used.astype(np.float64),
                         {"Statistic": "number of maps used at the voxel (finite effect, "
                          "positive finite variance)"}))  # fmt: skip
        return maps

    def _missing_maps(self, data: np.ndarray) -> list[tuple[str, np.ndarray, dict[str, Any]]]:
        """OLS with per-voxel missing data: R^2, residual variance, maps and dof per voxel."""
        fit = self.mixed
        assert fit is not None and self.n_maps is not None
        total = np.empty(data.shape[1])
        # tile by tile: the float64 squares of the whole matrix were 4x the data
        for block, tile in iter_tiles(data):
            if self.spans_constant:
                total[block] = np.nansum((tile - np.nanmean(tile, axis=0)) ** 2, axis=0)
            else:
                total[block] = np.nansum(np.asarray(tile, dtype=np.float64) ** 2, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            r_squared = np.where(total > 0, 1.0 - fit.rwr / total, 0.0)
        kind = "centred on the voxel's mean" if self.spans_constant else "uncentred"
        return [
            ("rsquared", r_squared, {"Statistic": "R-squared = 1 - RSS / TSS on the maps with "
                                     "data at the voxel", "TotalSumOfSquares": kind}),
            ("residualvariance", fit.rwr / fit.dof,
             {"Statistic": "residual variance = RSS / (k - p), k maps with data at the voxel"}),
            ("nmaps", self.n_maps.astype(np.float64),
             {"Statistic": "number of input maps with data at the voxel"}),
            ("dof", fit.dof, {"Statistic": "residual degrees of freedom k - p"}),
        ]  # fmt: skip

    def report_facts(self) -> tuple[tuple[str, str], ...]:
        """Facts about the fit for the report's model section."""
        facts = [("estimator", ESTIMATOR_NAMES[self.estimation.estimator])]
        if self.missing and self.n_maps is not None:
            n = self.n_maps
            facts += [
                ("maps per voxel (min, median, max)",
                 f"{int(n.min())}, {np.median(n):g}, {int(n.max())}"),
                ("voxels missing some map", f"{int(np.count_nonzero(n < n.max())):,}"),
            ]  # fmt: skip
        elif self.mixed is not None:
            tau2 = np.atleast_2d(self.mixed.tau2)
            names = [f"tau² of {self.estimation.variance_groups} {g} " for g in
                     self.mixed.group_labels] or ["tau² "]  # fmt: skip
            facts += [
                ("first-level variances", f"stat-{self.estimation.variance_from} maps"),
                ("small-sample adjustment", self.estimation.adjustment),
            ]
            facts += [
                (f"{name}(median, 95th percentile)",
                 f"{np.median(row):.4g}, {np.percentile(row, 95):.4g}; "
                 f"0 at {np.mean(row == 0):.0%} of voxels")
                for name, row in zip(names, tau2, strict=True)
            ]  # fmt: skip
            facts += [
                ("values excluded (variance <= 0 or not finite)",
                 f"{self.mixed.n_excluded_values:,} at "
                 f"{self.mixed.n_voxels_with_exclusions:,} voxels"),
            ]  # fmt: skip
        return tuple(facts)


def fit_model(
    estimation: EstimationSpec,
    data: np.ndarray | TiledMaps,
    design: np.ndarray,
    variances: np.ndarray | None = None,
    groups: Sequence[Any] | None = None,
    *,
    budget: int | None = None,
    n_jobs: int = 1,
    missing: bool | None = None,
) -> FittedModel:
    """Fit ``data`` (n_maps x n_voxels) on ``design`` with the estimator of ``estimation``.

    ``data``: an array, or the tiled store (:class:`~bids_group.memory.TiledMaps`; OLS only).
    ``budget`` (bytes) sizes the OLS fit's working arrays, ``n_jobs`` threads run it
    (:func:`bids_group.glm.fit_ols`; the result does not depend on it).
    ``missing``: whether some map may lack data (NaN) at some voxel (``--min-coverage``);
    None: look (a pass over the data), False: the caller knows every value is finite.
    ``variances`` (same shape as ``data``) are required by the mixed-effects estimators;
    ``groups`` (one label per map) gives one tau^2 per variance group.
    Voxels where a mixed-effects model is not estimable must have been removed by the
    caller (:func:`mixed_estimable`).
    """
    if not estimation.mixed:
        if missing is not False and _has_missing(data):  # OLS per voxel on the maps present
            return _fit_ols_missing(estimation, data, design)
        fit = fit_ols(data, design, budget=budget, n_jobs=n_jobs)
        return FittedModel(estimation, float(fit.dof), ols=fit)
    if variances is None:
        raise ValueError("a mixed-effects estimator needs the first-level variances")
    from bids_group.mixed_effects import fit_mixed

    if not isinstance(data, np.ndarray):
        raise TypeError("the mixed-effects fit needs the data in memory, not the tiled store")
    labels = None if groups is None else np.asarray(groups)
    fit = fit_mixed(data, variances, design, method=estimation.estimator, groups=labels)
    dof = float(data.shape[0] - np.linalg.matrix_rank(design))
    if fit.n_voxels_with_exclusions:
        log.warning(
            "%d first-level value(s) at %d voxel(s) have a variance that is zero, negative or "
            "not finite (or a non-finite effect): those maps are left out at those voxels, "
            "which keep fewer degrees of freedom (stat-dof map)",
            fit.n_excluded_values,
            fit.n_voxels_with_exclusions,
        )
    return FittedModel(estimation, dof, mixed=fit)


def _has_missing(data: np.ndarray | TiledMaps) -> bool:
    """Whether some map has no data (NaN) at some voxel: only with --min-coverage, never in
    the tiled store. Tile by tile, so that no full-size boolean temporary is made."""
    return isinstance(data, np.ndarray) and any(
        bool(np.isnan(tile).any()) for _, tile in iter_tiles(data)
    )


def _fit_ols_missing(
    estimation: EstimationSpec, data: np.ndarray, design: np.ndarray
) -> FittedModel:
    """OLS on the maps present at each voxel (NaN: missing), see :class:`FittedModel`."""
    from bids_group.mixed_effects import fit_mixed

    # unit variances as a read-only view (no n_maps x n_voxels array): a missing map is
    # already excluded by its NaN effect
    fit = fit_mixed(data, np.broadcast_to(1.0, data.shape), design, method="fe")
    dof = float(data.shape[0] - np.linalg.matrix_rank(design))
    ones = np.ones((design.shape[0], 1))
    spans = bool(np.allclose(design @ np.linalg.lstsq(design, ones, rcond=None)[0], ones))
    return FittedModel(estimation, dof, mixed=fit, missing=True, n_maps=fit.n_used,
                       spans_constant=spans)  # fmt: skip


def mixed_estimable(
    data: np.ndarray,
    variances: np.ndarray,
    design: np.ndarray,
    groups: Sequence[Any] | None = None,
) -> np.ndarray:
    """Voxels where a mixed-effects fit is possible: enough valid maps for the design (and
    for every variance group's tau^2)."""
    from bids_group.mixed_effects import estimable_voxels

    return estimable_voxels(data, variances, design, None if groups is None else np.asarray(groups))
