"""The permutation step of the pipeline: plan it before any image is read, run it per contrast,
write its maps, tables, null distributions and report sections.

Outputs of one contrast (``<c>``: contrast label; ``<S>``: ``t`` or ``F``; ``<a>``: the digits of
``--perm-alpha``, ``05`` for 0.05), see :mod:`bids_group.outputs.naming`:

=======================================================  =========================================
file                                                     content
=======================================================  =========================================
``contrast-<c>_stat-<S>_nulldist.tsv``                   null maxima, one row per relabelling
``contrast-<c>_stat-logp_desc-permUncorrected``          voxel: -log10 uncorrected p   (voxel)
``contrast-<c>_stat-logp_desc-permVoxel``                voxel: -log10 FWER p (max-statistic)
``contrast-<c>_stat-z_desc-permVoxel<a>``                z where the voxel FWER p <= alpha
``contrast-<c>_stat-z_desc-permVoxel<a>_clusters.tsv``   clusters of those voxels
``contrast-<c>_stat-logp_desc-permClusterSize``          -log10 cluster-size FWER p    (cluster)
``contrast-<c>_stat-logp_desc-permClusterMass``          -log10 cluster-mass FWER p
``contrast-<c>_stat-z_desc-permClusterSize<a>``          z in clusters with size FWER p <= alpha
``contrast-<c>_stat-z_desc-permClusterMass<a>``          z in clusters with mass FWER p <= alpha
``contrast-<c>_stat-<S>_desc-permCluster_clusters.tsv``  every cluster, size and mass FWER p
``contrast-<c>_stat-tfce``                               TFCE of the statistic          (tfce)
``contrast-<c>_stat-logp_desc-permTfceUncorrected``      -log10 uncorrected TFCE p
``contrast-<c>_stat-logp_desc-permTfce``                 -log10 TFCE FWER p
``contrast-<c>_stat-z_desc-permTfce<a>``                 z where the TFCE FWER p <= alpha
``contrast-<c>_stat-z_desc-permTfce<a>_clusters.tsv``    clusters of those voxels
=======================================================  =========================================

Maps are ``_statmap.nii.gz`` with a JSON sidecar recording the scheme, the number of
relabellings, the seed and whether the test was exact. A result is significant when its FWER
p <= alpha (with p = #{null >= observed} / N and N relabellings, the identity counted, the test
has level alpha exactly when alpha N is an integer).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bids_group.config import InferenceConfig
from bids_group.errors import DataError, UsageError
from bids_group.inference.clusters import cluster_table, cluster_table_metadata
from bids_group.inference.permutation_plan import PermutationPlan, block_labels, plan_permutation
from bids_group.outputs import naming
from bids_group.outputs import permutation as tables
from bids_group.outputs.tables import write_table
from bids_group.progress import progress_bar
from bids_group.report import build as report
from bids_group.validation import WARN_N_PERM

if TYPE_CHECKING:  # pipeline imports this module
    from bids_group.contrasts import ContrastResult
    from bids_group.design import Contrast
    from bids_group.inference.permutation import PermutationResult
    from bids_group.pipeline import Analysis, _ContrastOutput, _ReportView

log = logging.getLogger(__name__)

#: References written into every sidecar of a permutation output.
REFERENCES = (
    "Winkler AM, Ridgway GR, Webster MA, Smith SM, Nichols TE (2014). Permutation inference "
    "for the general linear model. NeuroImage 92:381-397.",
    "Smith SM, Nichols TE (2009). Threshold-free cluster enhancement. NeuroImage 44:83-98.",
)


def plan_permutations(
    analyses: Sequence[Analysis],
    inference: InferenceConfig,
    *,
    mixed: bool = False,
    estimator: str | None = None,
) -> dict[tuple[int, str], PermutationPlan]:
    """Validate the exchangeability of every contrast before any image is read.

    ``mixed``: a mixed-effects model, whose relabellings are sign flips (see
    :mod:`bids_group.inference.mixed_permutation`); ``estimator`` its method, with which each
    contrast's reduced model (Freedman-Lane) must be fittable with the analysis' variance
    groups.

    Returns
    -------
    dict
        ``(analysis index, contrast name) -> PermutationPlan``; empty without permutations.

    Raises
    ------
    UsageError, DataError
        With the contrast and the model (GroupBy group) named.
    """
    plans: dict[tuple[int, str], PermutationPlan] = {}
    if not inference.permutation:
        return plans
    for i, analysis in enumerate(analyses):
        where = ", ".join(f"{k} {v}" for k, v in analysis.group.items())
        paths = [str(m.path) for m in analysis.maps]
        blocks = block_labels(analysis.variables, inference.exchangeability_blocks, paths=paths)
        for contrast in analysis.contrasts:
            try:
                plan = plan_permutation(
                    analysis.design.matrix,
                    contrast.weights,
                    n_perm=inference.n_perm,
                    scheme="flip" if mixed else inference.perm_scheme,
                    blocks=blocks,
                    whole_blocks=inference.whole_blocks,
                )
                if mixed and analysis.variance_groups is not None:
                    _check_reduced_groups(analysis, contrast.weights, estimator)
            except (UsageError, DataError) as err:
                context = f"contrast {contrast.name!r}" + (f", model for {where}" if where else "")
                raise type(err)(f"permutation inference: {err} ({context})") from err
            if plan.exhaustive:
                log.info(
                    "contrast %s: %d distinct relabellings, all enumerated (exact test)",
                    contrast.name,
                    plan.n_distinct,
                )
            if plan.n_relabellings > WARN_N_PERM:
                log.warning(
                    "contrast %s: %d relabellings: the run may take hours (TFCE on a 2 mm brain: "
                    "~2 h per million on 2 cores) for p-values that 10,000 already give to "
                    "+-0.002; check --n-perm / NPermutations",
                    contrast.name,
                    plan.n_relabellings,
                )
            if plan.n_relabellings * inference.perm_alpha < 1:
                # all distinct relabellings used: only more maps help; else a larger --n-perm
                remedy = "more maps" if plan.exhaustive else "a larger --n-perm"
                log.warning(
                    "contrast %s: with %d relabellings the smallest p-value is %.3g > alpha %g, "
                    "so no permutation result can be significant (%s, or a higher "
                    "--perm-alpha)",
                    contrast.name,
                    plan.n_relabellings,
                    1 / plan.n_relabellings,
                    inference.perm_alpha,
                    remedy,
                )
            plans[(i, contrast.name)] = plan
    return plans


def _check_reduced_groups(analysis: Analysis, contrast: np.ndarray, estimator: str | None) -> None:
    """The reduced model that every relabelling refits must suit the variance groups too:
    e.g. one column per group is separable (DL fits it), but the reduced model of their
    difference is their sum, shared by the groups (DL cannot refit it)."""
    from bids_group.inference.mixed_permutation import reduced_design
    from bids_group.mixed_effects import check_variance_groups

    reduced = reduced_design(analysis.design.matrix, contrast)
    if reduced.shape[1] and estimator is not None:
        check_variance_groups(reduced, np.array(analysis.variance_groups), estimator)


@dataclass(frozen=True)
class MixedInputs:
    """What a mixed-effects permutation test refits in every relabelling."""

    variances: np.ndarray  # (n_maps, n_voxels), on the analysis mask
    method: str
    adjustment: str
    groups: Any = None  # variance group of each map, or None (one tau^2)


@dataclass(frozen=True)
class PermutationJob:
    """What the permutation step of one contrast needs beside the contrast's outputs."""

    plan: PermutationPlan
    design: np.ndarray
    n_jobs: int
    progress: bool
    mixed: MixedInputs | None = None
    #: Where chunks of relabellings run (:mod:`bids_group.executor`); None: this process.
    executor: Any = None


@dataclass(frozen=True)
class _Method:
    """One corrected result as written and reported."""

    key: str  # desc of the FWER logp map
    title: str
    p_fwe: np.ndarray  # per voxel
    null_max: np.ndarray
    observed_max: float
    stat_label: str


def write_permutation(
    out: _ContrastOutput,
    contrast: Contrast,
    result: ContrastResult,
    inference: InferenceConfig,
    job: PermutationJob,
    two_sided: bool,
    view: _ReportView | None,
) -> tuple[list[Path], dict[str, Any], list[report.MethodReport], pd.DataFrame | None]:
    """Run the permutation test of one contrast and write everything it produced.

    Returns the written files, the summary, the report of each method and, when cluster
    inference ran, the table of the permutation clusters (with their FWER p-values).
    """
    perm = _run(out, contrast, result, inference, job, two_sided)
    parametric = result.z if perm.stat_type == "z" else result.stat
    drift = float(np.max(np.abs(perm.stat - parametric))) if perm.stat.size else 0.0
    scale = max(1.0, float(np.max(np.abs(parametric)))) if parametric.size else 1.0
    if drift > 1e-6 * scale:  # the partition makes them equal; anything else is a bug
        raise RuntimeError(f"permutation statistic differs from the parametric one by {drift}")
    settings = _settings(perm, inference, job)
    null_path = out.name(naming.null_distribution_name, stat=perm.stat_type)
    write_table(
        null_path,
        tables.null_distribution_table(perm),
        tables.null_distribution_sidecar(perm, settings),
    )
    written = [null_path, null_path.with_suffix(".json")]
    summary: dict[str, Any] = {
        "scheme": perm.scheme,
        "relabellings": perm.n_relabellings,
        "exact": perm.exhaustive,
        "seed": perm.seed,
    }
    reports: list[report.MethodReport] = []
    common = {"Permutation": settings}
    if "voxel" in inference.permutation:
        written += out.statmap(
            "logp",
            tables.logp(perm.p_uncorrected),
            {**common, "Statistic": "logp", "PValue": "uncorrected voxelwise"},
            desc="permUncorrected",
        )
    if perm.tfce is not None:
        written += out.statmap(
            "tfce", perm.tfce.tfce, {**common, "Statistic": "tfce", "TFCE": _tfce_meta(perm)}
        )
        written += out.statmap(
            "logp",
            tables.logp(perm.tfce.p_uncorrected),
            {**common, "Statistic": "logp", "PValue": "uncorrected TFCE"},
            desc="permTfceUncorrected",
        )
    if perm.clusters is not None:
        files, cluster_table_ref = _write_cluster_table(out, perm, result, settings)
        written += files
    else:
        cluster_table_ref = None
    for method in _methods(perm, inference):
        files, method_summary, method_report = _write_method(
            out,
            method,
            perm,
            result,
            inference,
            settings,
            two_sided,
            view,
            null_path.name,
            cluster_table_ref if method.key.startswith("permCluster") else None,
        )
        written += files
        summary[method.key] = method_summary
        if method_report is not None:
            reports.append(method_report)
    clusters = cluster_table_ref[0] if cluster_table_ref is not None else None
    return written, summary, reports, clusters


def _run(out, contrast, result, inference, job, two_sided) -> PermutationResult:
    from bids_group.inference.tfce import TfceParams  # numba: only when used

    methods = inference.permutation
    params = None
    if "tfce" in methods:
        params = TfceParams(
            e=inference.tfce_e,
            h=inference.tfce_h,
            integration=inference.tfce_integration,
            dh=inference.tfce_dh,
        )
    label = f"contrast {out.label}: {job.plan.n_relabellings:,} relabellings"
    log.info("%s (%s; %s)", label, job.plan.scheme, ", ".join(methods))
    options = {
        "stat_type": result.stat_type,
        "n_perm": inference.n_perm,
        "two_sided": two_sided,
        "mask": out.data.mask,
        "cluster_forming_p": inference.cluster_forming_p if "cluster" in methods else None,
        "tfce": "tfce" in methods,
        "tfce_params": params,
        "connectivity": inference.connectivity,
        "blocks": job.plan.blocks,
        "whole_blocks": inference.whole_blocks,
        "seed": inference.seed,
        "n_jobs": job.n_jobs,
        "executor": job.executor,
    }
    with progress_bar(label, enabled=job.progress) as progress:
        if job.mixed is not None:
            from bids_group.inference.mixed_permutation import mixed_permutation_test

            return mixed_permutation_test(
                out.data.data, job.mixed.variances, job.design, contrast.weights,
                method=job.mixed.method, adjustment=job.mixed.adjustment, progress=progress,
                groups=job.mixed.groups,
                **options,
            )  # fmt: skip
        from bids_group.inference.permutation import permutation_test

        return permutation_test(
            out.data.data, job.design, contrast.weights, scheme=inference.perm_scheme,
            progress=progress, **options,
        )  # fmt: skip


#: How nuisance is handled, per kind of model.
_NUISANCE = {
    "ols": "Freedman-Lane, design partitioned after Beckmann et al. (2001)",
    "mixed": "Freedman-Lane with the reduced mixed-effects model X C_u (C_u: null space of the "
    "contrast) fitted by the same estimator; tau^2 re-estimated in every relabelling",
}


def _settings(perm: PermutationResult, inference: InferenceConfig, job: PermutationJob):
    settings: dict[str, Any] = {
        "Methods": list(inference.permutation),
        "Scheme": {"flip": "sign flipping", "permute": "row permutation"}[perm.scheme],
        "NuisanceMethod": _NUISANCE["mixed" if job.mixed is not None else "ols"],
        "Relabellings": perm.n_relabellings,
        "RelabellingsAsked": 1 + inference.n_perm,
        "Exact": perm.exhaustive,
        "Seed": perm.seed,
        "TwoSided": perm.two_sided,
        "PValue": "p = #{null >= observed} / N, N relabellings, the unpermuted data counted",
        "Alpha": inference.perm_alpha,
        "Connectivity": tables.connectivity_description(inference.connectivity),
        "ExchangeabilityBlocks": inference.exchangeability_blocks,
        "WholeBlocks": inference.whole_blocks,
        "Software": "bids-group",
        "References": list(REFERENCES),
    }
    if job.mixed is not None:
        settings["Statistic"] = (
            f"z: the mixed-effects ({job.mixed.method}) t or F converted with each voxel's "
            "degrees of freedom, in every relabelling"
        )
    if perm.clusters is not None:
        settings["ClusterFormingThreshold"] = {
            "PValue": perm.clusters.forming_p,
            "PValueSidedness": "two-sided: PValue / 2 in each tail"
            if perm.two_sided
            else "one-sided",
            "Height": perm.clusters.height,
            "HeightUnits": perm.stat_type,
        }
    if perm.tfce is not None:
        settings["TFCE"] = _tfce_meta(perm)
    return settings


def _tfce_meta(perm: PermutationResult) -> dict[str, Any]:
    params = perm.tfce.params
    return {
        "E": params.e,
        "H": params.h,
        "Integration": params.integration,
        "dh": params.dh,
        "Connectivity": perm.tfce.connectivity,
    }


def _stat_label(perm: PermutationResult) -> str:
    return f"max |{perm.stat_type}|" if perm.two_sided else f"max {perm.stat_type}"


def _methods(perm: PermutationResult, inference: InferenceConfig) -> list[_Method]:
    methods = []
    if "voxel" in inference.permutation:
        methods.append(
            _Method(
                "permVoxel",
                "permutation voxel-level FWE",
                perm.p_fwe,
                perm.null_max_stat,
                float(perm.null_max_stat[0]),
                _stat_label(perm),
            )
        )
    if perm.clusters is not None:
        c = perm.clusters
        methods.append(
            _Method(
                "permClusterSize",
                "permutation cluster-size FWE",
                c.p_fwe_size_map(),
                c.null_max_size.astype(np.float64),
                float(c.null_max_size[0]),
                "max cluster size (voxels)",
            )
        )
        methods.append(
            _Method(
                "permClusterMass",
                "permutation cluster-mass FWE",
                c.p_fwe_mass_map(),
                c.null_max_mass,
                float(c.null_max_mass[0]),
                "max cluster mass",
            )
        )
    if perm.tfce is not None:
        label = "max |TFCE|" if perm.two_sided else "max TFCE"
        methods.append(
            _Method(
                "permTfce",
                "permutation TFCE FWE",
                perm.tfce.p_fwe,
                perm.tfce.null_max,
                float(perm.tfce.null_max[0]),
                label,
            )
        )
    return methods


def critical_value(null_max: np.ndarray, alpha: float) -> float:
    """Smallest value a result must exceed for FWER p <= alpha (inf when none can).

    With N relabellings, p <= alpha needs #{null >= observed} <= k = floor(alpha N); the
    observed value itself is in the null, so k >= 1 is needed, and the result must exceed the
    (k+1)-th largest null maximum.

    >>> critical_value(np.arange(100.0), 0.05)
    94.0
    """
    null = np.sort(np.asarray(null_max, dtype=np.float64))[::-1]
    k = int(np.floor(alpha * null.size + 1e-9))
    return float(null[k]) if 1 <= k < null.size else float("inf")


def _write_method(
    out, method, perm, result, inference, settings, two_sided, view, null_name, cluster_ref
) -> tuple[list[Path], dict[str, Any], report.MethodReport | None]:
    alpha = inference.perm_alpha
    meta = {"Permutation": settings, "Statistic": "logp", "PValue": method.title}
    written = out.statmap("logp", tables.logp(method.p_fwe), meta, desc=method.key)
    significant = method.p_fwe <= alpha
    z_masked = np.where(significant, result.z, 0.0)
    z_vol = np.zeros(out.data.mask.shape)  # the same map as a volume: table and figures
    z_vol[out.data.mask] = z_masked
    desc = naming.desc_label(method.key, alpha=alpha)
    threshold_meta = {"Method": method.title, "Alpha": alpha, "Criterion": "FWER p <= Alpha"}
    written += out.statmap(
        "z",
        z_masked,
        {"Statistic": "z", "Threshold": threshold_meta, "Permutation": settings},
        desc=desc,
    )
    n_surviving = int(np.count_nonzero(significant))
    critical = critical_value(method.null_max, alpha)
    summary = {
        "surviving_voxels": n_surviving,
        "critical_value": critical if np.isfinite(critical) else None,
        "observed_max": method.observed_max,
    }
    log.info(
        "contrast %s: %s at alpha %g: %d voxel(s) survive (%s observed %.4g, critical %.4g)",
        out.label,
        method.title,
        alpha,
        n_surviving,
        method.stat_label,
        method.observed_max,
        critical,
    )
    table, table_name = None, None
    if cluster_ref is None:
        kwargs = {
            "z_threshold": 0.0,
            "cluster_threshold": 0,
            "two_sided": two_sided,
            "connectivity": inference.connectivity,
        }
        table = cluster_table(z_vol, out.data.affine, **kwargs)
        table["peak_p_fwe"] = _at_peaks(method.p_fwe, table, out.data.mask, out.data.affine)
        table_path = out.name(naming.clusters_name, stat="z", desc=desc)
        table_meta = cluster_table_metadata(height_control="none", **kwargs)
        table_meta["peak_p_fwe"] = {"Description": f"{method.title} p at the (sub)peak"}
        table_meta["HeightThreshold"] = {
            "Value": "FWER p <= Alpha",
            "Method": method.title,
            "Alpha": alpha,
        }
        write_table(table_path, table, {**table_meta, "Contrast": out.common["Contrast"]})
        written += [table_path, table_path.with_suffix(".json")]
        table_name = table_path.name
    if view is None:
        return written, summary, None
    title = f"{method.title} p <= {alpha:g}"
    shown = f"z of voxels with {method.title} p <= {alpha:g}"
    figures, empty = (), None
    if n_surviving:
        figures = view.figures(
            z_vol,
            threshold=None,
            label="z",
            title=f"{out.label} · {title}",
            names=out.figure_names("z", desc),
            shown=shown,
        )
        written += report.write_figures(out.node_dir, figures)
    else:
        peak = report.peak_text(result.z, out.data.mask, out.data.affine, two_sided=two_sided)
        empty = report.nothing_survives(f"{method.title} p <= {alpha:g}", peak)
    shown_critical = critical if np.isfinite(critical) else float(np.max(method.null_max))
    null = report.null_figure(
        method.null_max,
        method.observed_max,
        shown_critical,
        alpha=alpha,
        stat_label=method.stat_label,
        title=f"{out.label} · {title}",
        source=null_name,
    )
    facts = _facts(perm, method, alpha, critical, n_surviving)
    if cluster_ref is not None:
        cluster_frame, cluster_name = cluster_ref
        report_table = report.permutation_cluster_report_table(cluster_frame, filename=cluster_name)
    else:
        report_table = report.cluster_report_table(table, filename=table_name,
                                                   p_fwe=method.title)  # fmt: skip
    method_report = report.MethodReport(
        title,
        facts=facts,
        figures=figures,
        table=report_table if report_table.rows else None,
        null=null,
        empty=empty,
        survivors=report.survivors(z_vol, out.data.affine, connectivity=inference.connectivity),
    )
    return written, summary, method_report


def _at_peaks(values: np.ndarray, table: pd.DataFrame, mask: np.ndarray, affine: np.ndarray):
    """``values`` (in mask order) at the voxel of each row's peak (``peak_x/y/z`` in mm)."""
    if not len(table):
        return np.zeros(0)
    xyz = table[["peak_x", "peak_y", "peak_z"]].to_numpy(dtype=np.float64)
    ijk = np.rint((xyz - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T).astype(np.int64)
    order = np.full(mask.shape, -1, dtype=np.int64)
    order[mask] = np.arange(int(mask.sum()))
    return np.asarray(values)[order[tuple(ijk.T)]]


def _facts(perm, method, alpha, critical, n_surviving) -> tuple[tuple[str, str], ...]:
    scheme = {"flip": "sign flipping", "permute": "row permutation"}[perm.scheme]
    exact = " (all distinct relabellings: exact)" if perm.exhaustive else f" (seed {perm.seed})"
    facts = [
        ("relabellings", f"{perm.n_relabellings:,} by {scheme}{exact}"),
        (
            method.stat_label,
            f"observed {method.observed_max:.4g}; critical "
            + (
                f"{critical:.4g}"
                if np.isfinite(critical)
                else f"none (alpha x N < 1: no result can reach p <= {alpha:g})"
            ),
        ),
        ("surviving voxels", f"{n_surviving:,}"),
    ]
    if method.key.startswith("permCluster"):
        c = perm.clusters
        facts.insert(
            1,
            (
                "cluster-forming threshold",
                (
                    f"p < {c.forming_p:g} two-sided ({c.forming_p / 2:g} per tail: "
                    f"|{perm.stat_type}| > {c.height:.4g})"
                    if perm.two_sided
                    else f"p < {c.forming_p:g} ({perm.stat_type} > {c.height:.4g})"
                ),
            ),
        )
    if method.key == "permTfce":
        p = perm.tfce.params
        facts.insert(
            1,
            (
                "TFCE",
                f"E = {p.e:g}, H = {p.h:g}, integration {p.integration}"
                + (f", dh = {p.dh:.4g}" if p.dh else ""),
            ),
        )
    return tuple(facts)


def _write_cluster_table(out, perm, result, settings) -> tuple[list[Path], tuple[Any, str]]:
    frame = tables.cluster_inference_table(
        perm.clusters, perm.stat, result.z, out.data.mask, out.data.affine
    )
    path = out.name(naming.clusters_name, stat=perm.stat_type, desc="permCluster")
    meta: Mapping[str, Any] = {
        **tables.CLUSTER_COLUMNS,
        "Permutation": settings,
        "Contrast": out.common["Contrast"],
    }
    write_table(path, frame, meta)
    return [path, path.with_suffix(".json")], (frame, path.name)
