"""The whole group analysis, one stage after another.

Everything is validated before the first image is read: the model, the inputs, every design and
contrast, and that OUT_DIR can take the results. Results are written into a staging folder and
appear in OUT_DIR only when the run succeeded (see :mod:`bids_group.outputs.staging`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bids_group import CODE_URL, __version__
from bids_group.config import InferenceConfig, RunConfig, resolve_inference
from bids_group.contrasts import ContrastResult, compute_contrast
from bids_group.design import Contrast, Design, build_design, resolve_contrasts, variables_for_maps
from bids_group.errors import DataError, UsageError
from bids_group.glm import fit_ols
from bids_group.images import MaskedData, load_masked_data
from bids_group.inference.ari import ARIResult, ari_clusters
from bids_group.inference.clusters import (
    apply_cluster_extent,
    cluster_table,
    cluster_table_metadata,
)
from bids_group.inference.height import HeightThreshold, height_threshold
from bids_group.inputs import InputMap, collect_inputs
from bids_group.labels import group_contrast_label, to_label
from bids_group.outputs import naming
from bids_group.outputs.description import write_dataset_description, write_json
from bids_group.outputs.figures import design_summary, plot_design_matrix
from bids_group.outputs.maps import MapWriter, write_mask
from bids_group.outputs.staging import check_writable, staged_output
from bids_group.outputs.tables import write_table
from bids_group.pipeline_permutation import PermutationJob, plan_permutations, write_permutation
from bids_group.report import build as report
from bids_group.report.html import ReportSection, write_report
from bids_group.spec import ModelSpec, default_spec, load_spec, resolved_model_dict

log = logging.getLogger(__name__)

#: Entities that may appear in GroupBy (each becomes part of the output names).
GROUPABLE_ENTITIES = ("contrast", "task", "space")
#: A design column with a variance inflation factor above this is reported as near collinear.
VIF_WARNING = 10.0


@dataclass(frozen=True)
class Analysis:
    """One model to fit: the maps of one GroupBy group, their design and contrasts."""

    group: Mapping[str, Any]
    maps: tuple[InputMap, ...]
    design: Design
    contrasts: tuple[Contrast, ...]
    #: Variables of the maps before the model's transformations (participants.tsv columns and
    #: entities), e.g. for exchangeability blocks.
    variables: Any = None

    @property
    def input_contrast(self) -> str | None:
        return self.group.get("contrast")

    @property
    def name_entities(self) -> dict[str, str]:
        """task/space entities shared by every map of the group (used in output names)."""
        shared = {}
        for entity in ("task", "space"):
            values = {m.entities.get(entity) for m in self.maps}
            if len(values) == 1 and None not in values:
                shared[entity] = str(values.pop())
        return shared


@dataclass(frozen=True)
class RunResult:
    """What a run wrote: paths (final locations) and a JSON-serialisable summary."""

    written: tuple[Path, ...]
    summary: dict[str, Any] = field(default_factory=dict)


def run(config: RunConfig) -> RunResult:
    """Run the group analysis described by ``config``. Raises BidsGroupError subclasses."""
    started = time.perf_counter()
    _isolate_caches(config.work_dir)
    spec = load_spec(config.model) if config.model else default_spec()
    inference = resolve_inference(config.inference_overrides, spec.inference)
    entries = [
        naming.DATASET_DESCRIPTION,
        naming.model_name(to_label(spec.name)),
        naming.node_dir(to_label(spec.node_name)),
    ]
    if config.report:
        entries.append(naming.report_name(to_label(spec.name)))
    check_writable(config.out_dir, overwrite=config.overwrite, entries=entries)
    inputs = collect_inputs(
        config.bids_dir,
        derivatives=config.derivatives,
        input_filters=spec.input_filters,
        participant_labels=config.participant_labels,
        bids_filters=config.bids_filters,
        group_by=spec.group_by,
    )
    analyses = plan_analyses(spec, inputs.maps, inputs.participants)
    plans = plan_permutations(analyses, inference)
    log.info(
        "%d map(s) of %d participant(s); %d model(s) to fit",
        len(inputs.maps),
        len({m.entities["subject"] for m in inputs.maps}),
        len(analyses),
    )
    written: list[Path] = []
    summary: dict[str, Any] = {
        "version": __version__,
        "out_dir": str(config.out_dir),
        "model": spec.name,
        "inference": vars(inference),
        "analyses": [],
    }
    sections: list[ReportSection] = []
    with (
        report.collect_warnings() as warnings,
        staged_output(config.out_dir, overwrite=config.overwrite) as stage,
    ):
        written += _write_run_metadata(stage, config, spec, analyses, inputs.source_datasets)
        node_dir = stage / naming.node_dir(to_label(spec.node_name))
        node_dir.mkdir(parents=True, exist_ok=True)
        with MapWriter(n_jobs=config.n_jobs) as writer:
            for i, analysis in enumerate(analyses):
                jobs = {
                    name: PermutationJob(plan, analysis.design.matrix, config.n_jobs,
                                         config.progress)
                    for (index, name), plan in plans.items()
                    if index == i
                }  # fmt: skip
                files, analysis_summary, parts = _run_analysis(
                    analysis, config, spec, inference, node_dir, writer, jobs
                )
                written += files
                sections += parts
                summary["analyses"].append(analysis_summary)
        if config.report:
            summary["seconds"] = round(time.perf_counter() - started, 3)
            written.append(
                _write_report(stage, config, spec, inference, inputs, sections, warnings, summary)
            )
    final = tuple(config.out_dir / p.relative_to(stage) for p in written)
    summary["files"] = [str(p) for p in final]
    if config.report:
        summary["report"] = str(final[-1])
    summary["seconds"] = round(time.perf_counter() - started, 3)
    log.info("done in %.1f s: %d files in %s", summary["seconds"], len(final), config.out_dir)
    return RunResult(written=final, summary=summary)


def plan_analyses(
    spec: ModelSpec, maps: Sequence[InputMap], participants: Any
) -> tuple[Analysis, ...]:
    """Split maps by GroupBy and build (and so validate) every design before any image is read."""
    unknown = [e for e in spec.group_by if e not in GROUPABLE_ENTITIES]
    if unknown:
        raise UsageError(
            f"GroupBy entity {unknown[0]!r} is not supported; use a subset of "
            f"{list(GROUPABLE_ENTITIES)} (other entities can be design variables instead)"
        )
    groups: dict[tuple, list[InputMap]] = {}
    for input_map in maps:
        missing = [e for e in spec.group_by if e not in input_map.entities]
        if missing:
            raise DataError(
                f"{input_map.path}: has no {missing[0]!r} entity but the model groups by it "
                f"(GroupBy {list(spec.group_by)}); rename the file or change GroupBy"
            )
        key = tuple(str(input_map.entities[e]) for e in spec.group_by)
        groups.setdefault(key, []).append(input_map)
    analyses = []
    for key in sorted(groups):
        group_maps = tuple(groups[key])
        group = dict(zip(spec.group_by, key, strict=True))
        variables = variables_for_maps([m.entities for m in group_maps], participants)
        try:
            design = build_design(spec, variables)
            contrasts = resolve_contrasts(spec, design)
        except (DataError, UsageError) as err:
            where = ", ".join(f"{k} {v}" for k, v in group.items())
            raise type(err)(f"{err} (model for {where})" if where else str(err)) from err
        analyses.append(Analysis(group, group_maps, design, contrasts, variables))
    return tuple(analyses)


def _run_analysis(
    analysis: Analysis,
    config: RunConfig,
    spec: ModelSpec,
    inference: InferenceConfig,
    node_dir: Path,
    writer: MapWriter,
    jobs: Mapping[str, PermutationJob] | None = None,
) -> tuple[list[Path], dict[str, Any], list[ReportSection]]:
    """Fit one model and write its outputs; return the files, a summary and report sections
    (none when ``config.report`` is off). ``jobs``: permutation job per contrast name."""
    where = ", ".join(f"{k} {v}" for k, v in analysis.group.items()) or "all maps"
    log.info(
        "model for %s: %d maps, columns %s", where, len(analysis.maps), analysis.design.columns
    )
    data = load_masked_data(
        [m.path for m in analysis.maps],
        mask_path=config.mask,
        resample=config.resample,
        smoothing_fwhm=inference.smoothing_fwhm,
        n_jobs=config.n_jobs,
    )
    log.info("mask: %d voxels", data.data.shape[1])
    if inference.cluster_threshold > data.data.shape[1]:
        log.warning("cluster threshold %d voxels > the mask's %d voxels (model for %s): no "
                    "cluster can survive it", inference.cluster_threshold, data.data.shape[1],
                    where)  # fmt: skip
    fit = fit_ols(data.data, analysis.design.matrix)
    entities = analysis.name_entities
    written, design_info = _write_design(analysis, data, node_dir, entities, writer)
    view = (
        _ReportView(data, report.background_volume(data.data, data.mask)) if config.report else None
    )
    contrasts_summary, contrast_sections = [], []
    for contrast in analysis.contrasts:
        result = compute_contrast(fit, contrast.weights, contrast.test)
        label = group_contrast_label(analysis.input_contrast, contrast.name)
        files, contrast_summary, methods = _write_contrast(
            analysis, contrast, label, result, data, inference, node_dir, entities, writer, view,
            (jobs or {}).get(contrast.name),
        )  # fmt: skip
        written += files
        contrasts_summary.append(contrast_summary)
        if view is not None:
            contrast_sections.append(
                report.contrast_section(
                    label,
                    name=contrast.name,
                    weights=contrast.weights,
                    columns=analysis.design.columns,
                    test=result.stat_type,
                    dof=result.dof,
                    methods=methods,
                )  # fmt: skip
            )
    sections: list[ReportSection] = []
    if view is not None:
        files, sections = _analysis_report(
            analysis, where, data, fit.dof, design_info, view, contrast_sections, node_dir
        )
        written += files
    summary = {
        "group": dict(analysis.group),
        "n_maps": len(analysis.maps),
        "subjects": sorted({str(m.entities["subject"]) for m in analysis.maps}),
        "columns": list(analysis.design.columns),
        "dof": int(fit.dof),
        "mask_voxels": int(data.data.shape[1]),
        "contrasts": contrasts_summary,
    }
    return written, summary, sections


@dataclass(frozen=True)
class _ReportView:
    """What the figures of one analysis share: its data grid and the background volume."""

    data: MaskedData
    background: np.ndarray

    def figures(self, volume, *, threshold, label, title, names, vmax=None, shown=None) -> tuple:
        return report.map_figures(volume, self.data.affine, mask=self.data.mask,
                                  background=self.background, threshold=threshold, label=label,
                                  title=title, filenames=names, vmax=vmax,
                                  shown=shown)  # fmt: skip


def _analysis_report(
    analysis: Analysis,
    where: str,
    data: MaskedData,
    dof: float,
    design_info: tuple[Path, dict[str, Any]],
    view: _ReportView,
    contrast_sections: list[ReportSection],
    node_dir: Path,
) -> tuple[list[Path], list[ReportSection]]:
    """The mask figure (written beside the mask) and the report sections of one analysis."""
    figure_path, summary = design_info
    mask_name = naming.mask_name(
        contrast=_label(analysis.input_contrast), extension=".png", **analysis.name_entities
    )
    mask = report.mask_figure(data.mask, view.background, data.affine, filename=mask_name)
    facts = (
        ("input maps", str(len(analysis.maps))),
        ("residual degrees of freedom", f"{dof:g}"),
        ("mask voxels", f"{int(data.mask.sum()):,}"),
        ("voxels dropped from the mask", f"{data.n_dropped:,}"),
    )
    sections = report.analysis_sections(
        f"Model for {where}", facts=facts, design_svg=figure_path.read_bytes(),
        design_filename=figure_path.name, design_summary=summary, mask=mask,
        contrasts=contrast_sections,
    )  # fmt: skip
    return report.write_figures(node_dir, [mask]), list(sections)


def _write_report(
    stage: Path,
    config: RunConfig,
    spec: ModelSpec,
    inference: InferenceConfig,
    inputs: Any,
    sections: list[ReportSection],
    warnings: list[str],
    summary: Mapping[str, Any],
) -> Path:
    model_label = to_label(spec.name)
    model_json = (stage / naming.model_name(model_label)).read_text(encoding="utf-8")
    facts = (
        ("dataset", str(config.bids_dir)),
        ("output folder", str(config.out_dir)),
        ("input maps", str(len(inputs.maps))),
        ("participants", str(len({m.entities["subject"] for m in inputs.maps}))),
        ("models fitted", str(len(summary["analyses"]))),
        ("analysis time", f"{summary['seconds']:.1f} s (before the report)"),
    )
    content = report.report_content(
        title=f"bids-group · model {spec.name} · node {spec.node_name}",
        command=config.command or "(not recorded)", summary=facts, model_json=model_json,
        inference=inference, sections=sections, warnings=list(warnings),
    )  # fmt: skip
    return write_report(stage / naming.report_name(model_label), content)


def _write_design(
    analysis: Analysis,
    data: MaskedData,
    node_dir: Path,
    entities: Mapping[str, str],
    writer: MapWriter,
) -> tuple[list[Path], tuple[Path, dict[str, Any]]]:
    design = analysis.design
    input_contrast = analysis.input_contrast
    table = design.variables.loc[:, []].copy()
    table.insert(0, "path", [m.path.name for m in analysis.maps])
    table.insert(0, "subject", [f"sub-{m.entities['subject']}" for m in analysis.maps])
    for j, column in enumerate(design.columns):
        table[column] = design.matrix[:, j]
    label = _label(input_contrast)
    design_path = node_dir / naming.design_name(contrast=label, **entities)
    summary = design_summary(design.matrix, design.columns)
    collinear = {c: v for c, v in summary["vif"].items() if not v <= VIF_WARNING}
    if collinear:
        log.warning(
            "near-collinear design%s: variance inflation factor above %g for %s",
            f" (input contrast {input_contrast})" if input_contrast else "",
            VIF_WARNING,
            ", ".join(f"{c} ({v:.3g})" for c, v in collinear.items()),
        )
    write_table(design_path, table, {"Description": "Design matrix as fitted", **summary})
    figure_path = node_dir / naming.design_figure_name(contrast=label, **entities)
    plot_design_matrix(design.matrix, design.columns, list(table["subject"]), figure_path)
    mask_path = node_dir / naming.mask_name(contrast=label, **entities)
    mask_sidecar = {
        "Type": "Brain",
        "Description": "Voxels analysed: the user's --mask, or voxels finite and non-zero in "
        "every input map",
        "VoxelCount": int(data.mask.sum()),
        "Sources": [str(m.path) for m in analysis.maps],
    }
    write_mask(mask_path, data.mask, data.affine, sidecar=mask_sidecar)
    mask_json = mask_path.with_name(naming.sidecar_name(mask_path.name))
    files = [design_path, design_path.with_suffix(".json"), figure_path, mask_path, mask_json]
    return files, (figure_path, summary)


def _label(input_contrast: str | None) -> str | None:
    return group_contrast_label(None, input_contrast) if input_contrast else None


def _write_contrast(
    analysis: Analysis,
    contrast: Contrast,
    label: str,
    result: ContrastResult,
    data: MaskedData,
    inference: InferenceConfig,
    node_dir: Path,
    entities: Mapping[str, str],
    writer: MapWriter,
    view: _ReportView | None = None,
    permutation: PermutationJob | None = None,
) -> tuple[list[Path], dict[str, Any], list[report.MethodReport]]:
    """Every output of one contrast: maps, thresholded map and table, ARI, permutation
    inference (with a ``permutation`` job), figures.

    Returns the written files, the contrast's summary and (with ``view``) one
    :class:`~bids_group.report.build.MethodReport` per correction method.
    """
    two_sided = inference.two_sided and result.stat_type == "t"
    common = {
        "Contrast": contrast.name,
        "ContrastWeights": contrast.weights.tolist(),
        "DesignColumns": list(analysis.design.columns),
        "StatisticType": result.stat_type,
        "DegreesOfFreedom": list(result.dof),
        "InputMaps": [str(m.path) for m in analysis.maps],
        "Software": {"Name": "bids-group", "Version": __version__, "CodeURL": CODE_URL},
    }
    out = _ContrastOutput(node_dir, label, entities, data, writer, common, result.dof)
    written = _write_contrast_maps(out, result, two_sided)
    # float64 (not images.unmask's float32): thresholds sit exactly on voxel z values (FDR).
    z_vol = np.zeros(data.mask.shape, dtype=np.float64)
    z_vol[data.mask] = result.z
    files, summary, method = _write_height(out, contrast, result, z_vol, inference, two_sided, view)
    written += files
    methods = [method] if method is not None else []
    if inference.ari:
        files, summary["ari"], method = _write_ari(out, z_vol, inference, two_sided, view)
        written += files
        methods += [method] if method is not None else []
    if permutation is not None:
        files, summary["permutation"], perm_methods = write_permutation(
            out, contrast, result, inference, permutation, two_sided, view
        )
        written += files
        methods += perm_methods
    return written, summary, methods


@dataclass(frozen=True)
class _ContrastOutput:
    """Where and how the maps of one contrast are written (shared by its writers)."""

    node_dir: Path
    label: str
    entities: Mapping[str, str]
    data: MaskedData
    writer: MapWriter
    common: Mapping[str, Any]
    dof: tuple[float, ...]

    def statmap(self, stat: str, values: np.ndarray, sidecar: Mapping[str, Any], desc=None):
        path = self.node_dir / naming.statmap_name(
            contrast=self.label, stat=stat, desc=desc, **self.entities
        )
        self.writer.submit(path, values, mask=self.data.mask, affine=self.data.affine,
                           sidecar={**self.common, **sidecar}, stat=stat, dof=self.dof)  # fmt: skip
        return [path, path.with_name(naming.sidecar_name(path.name))]

    def name(self, builder, **kwargs) -> Path:
        return self.node_dir / builder(contrast=self.label, **self.entities, **kwargs)

    def figure_names(self, stat: str, desc: str) -> tuple[str, str]:
        return tuple(
            naming.figure_name(
                contrast=self.label, stat=stat, desc=desc, kind=kind, **self.entities
            )  # fmt: skip
            for kind in naming.FIGURE_SUFFIXES
        )


def _write_contrast_maps(out: _ContrastOutput, result: ContrastResult, two_sided: bool):
    p_values = result.two_sided_p() if two_sided else result.p
    maps = {
        "effect": result.effect if result.effect.shape[0] > 1 else result.effect[0],
        "variance": result.variance if result.variance.shape[0] > 1 else result.variance[0],
        result.stat_type: result.stat,
        "z": result.z,
        "p": p_values,
    }
    written = []
    for stat, values in maps.items():
        sidecar = {"Statistic": stat}
        if stat == "p":
            sidecar["PValueSidedness"] = "two-sided" if two_sided else "one-sided (upper tail)"
        written += out.statmap(stat, values, sidecar)
    return written


def _write_height(
    out: _ContrastOutput,
    contrast: Contrast,
    result: ContrastResult,
    z_vol: np.ndarray,
    inference: InferenceConfig,
    two_sided: bool,
    view: _ReportView | None,
) -> tuple[list[Path], dict[str, Any], report.MethodReport | None]:
    """Height (+ cluster extent) thresholding: thresholded z map, cluster table, figures."""
    mask = out.data.mask
    uncorrected = inference.height_control == "none"
    alpha = None if uncorrected else inference.alpha
    threshold = height_threshold(result.z, method=inference.height_control, alpha=alpha,
                                 threshold=inference.threshold, two_sided=two_sided)  # fmt: skip
    clusters = {"cluster_threshold": inference.cluster_threshold, "two_sided": two_sided,
                "connectivity": inference.connectivity}  # fmt: skip
    thresholded = apply_cluster_extent(z_vol, z_threshold=threshold.z_threshold, **clusters)
    desc = naming.desc_label(inference.height_control, alpha=alpha,
                             cluster_threshold=inference.cluster_threshold)  # fmt: skip
    threshold_meta = _threshold_metadata(threshold, inference)
    written = out.statmap("z", thresholded[mask], {"Statistic": "z", "Threshold": threshold_meta},
                          desc=desc)  # fmt: skip
    table = cluster_table(z_vol, out.data.affine, z_threshold=threshold.z_threshold, **clusters)
    table_path = out.name(naming.clusters_name, stat="z", desc=desc)
    meta = cluster_table_metadata(z_threshold=threshold.z_threshold,
                                  height_control=inference.height_control, alpha=alpha,
                                  p_threshold=threshold.p_threshold, **clusters)  # fmt: skip
    write_table(table_path, table, {**meta, "Threshold": threshold_meta, "Contrast": contrast.name})
    written += [table_path, table_path.with_suffix(".json")]
    n_surviving = int(np.count_nonzero(thresholded))
    n_clusters = (
        int((~table["cluster_id"].astype(str).str.contains("[a-z]", regex=True)).sum())
        if len(table)
        else 0
    )
    log.info("contrast %s: z threshold %.3f (%s), %d voxel(s) survive, %d cluster(s)",
             out.label, threshold.z_threshold, inference.height_control, n_surviving,
             n_clusters)  # fmt: skip
    finite = bool(np.isfinite(threshold.z_threshold))
    summary = {
        "contrast": contrast.name,
        "label": out.label,
        "stat": result.stat_type,
        "z_threshold": float(threshold.z_threshold) if finite else None,
        "surviving_voxels": n_surviving,
        "max_z": float(np.max(result.z)) if result.z.size else None,
        "min_z": float(np.min(result.z)) if result.z.size else None,
    }
    if view is None:
        return written, summary, None
    title = f"{out.label} · {_method_title(inference, threshold)}"
    shown = f"{'|z|' if two_sided else 'z'} > {threshold.z_threshold:.4g}" if finite else "none"
    figures = view.figures(thresholded, threshold=threshold.z_threshold if finite else None,
                           label="z", title=title, names=out.figure_names("z", desc),
                           shown=shown)  # fmt: skip
    written += report.write_figures(out.node_dir, figures)
    facts = (
        ("threshold", f"{shown} (no voxel can survive)" if not finite else shown),
        ("p threshold", f"{threshold.p_threshold:.4g}" + (" (two-sided)" if two_sided else "")),
        ("cluster extent", f">= {inference.cluster_threshold} voxels, "
                           f"{inference.connectivity}-connectivity"),
        ("surviving voxels", f"{n_surviving:,} in {n_clusters} cluster(s)"),
    )  # fmt: skip
    method = report.MethodReport(
        _method_title(inference, threshold), facts=facts, figures=figures,
        table=report.cluster_report_table(table, filename=table_path.name),
    )  # fmt: skip
    return written, summary, method


def _method_title(inference: InferenceConfig, threshold: HeightThreshold) -> str:
    names = {"fpr": "uncorrected p <", "fdr": "FDR q <", "bonferroni": "Bonferroni FWE p <"}
    if inference.height_control == "none":
        text = f"uncorrected z > {threshold.z_threshold:.3g}"
    else:
        text = f"{names[inference.height_control]} {inference.alpha:g}"
    if inference.cluster_threshold:
        text += f", clusters >= {inference.cluster_threshold} voxels"
    return text


def _write_ari(
    out: _ContrastOutput,
    z_vol: np.ndarray,
    inference: InferenceConfig,
    two_sided: bool,
    view: _ReportView | None,
) -> tuple[list[Path], dict[str, Any], report.MethodReport | None]:
    """All-Resolution Inference: TDP map, cluster table with true-discovery bounds, figures."""
    ari: ARIResult = ari_clusters(
        z_vol, out.data.mask, affine=out.data.affine, thresholds=inference.ari_thresholds,
        alpha=inference.ari_alpha, connectivity=inference.connectivity, two_sided=two_sided,
    )  # fmt: skip
    desc = naming.desc_label("ari", alpha=ari.alpha)
    meta = {
        "Method": "All-Resolution Inference (Rosenblatt et al. 2018), Simes local tests",
        "Alpha": ari.alpha,
        "ClusterFormingThresholds": list(ari.thresholds),
        "ThresholdUnits": "z",
        "TwoSided": ari.two_sided,
        "Connectivity": ari.connectivity,
        "HommelValue": ari.hommel,
        "NumberOfTests": ari.n_tests,
    }
    written = out.statmap("tdp", ari.tdp_map[out.data.mask],
                          {"Statistic": "tdp", "Units": "proportion", "ARI": meta},
                          desc=desc)  # fmt: skip
    table_path = out.name(naming.clusters_name, stat="z", desc=desc)
    write_table(table_path, ari.table, {**_ARI_COLUMNS, **meta, "Contrast": out.common["Contrast"]})
    written += [table_path, table_path.with_suffix(".json")]
    summary = {"alpha": ari.alpha, "hommel": ari.hommel, "clusters": len(ari.table),
               "true_discoveries": int(ari.table["true_discoveries"].sum()) if len(ari.table)
               else 0}  # fmt: skip
    log.info("contrast %s: ARI at alpha %g, Hommel value %d, %d cluster(s)", out.label,
             ari.alpha, ari.hommel, len(ari.table))  # fmt: skip
    if view is None:
        return written, summary, None
    thresholds = ", ".join(f"{t:g}" for t in ari.thresholds)
    title = f"ARI: true discovery proportion (z > {thresholds}, alpha {ari.alpha:g})"
    figures = view.figures(
        ari.tdp_map,
        threshold=0.0,
        label="TDP",
        vmax=1.0,
        title=f"{out.label} · {title}",
        names=out.figure_names("tdp", desc),
    )
    written += report.write_figures(out.node_dir, figures)
    facts = (
        ("cluster-forming thresholds", f"z > {thresholds}" + (" (±)" if two_sided else "")),
        ("alpha", f"{ari.alpha:g} (bounds simultaneous over all clusters and thresholds)"),
        ("Hommel value", f"{ari.hommel:,} of {ari.n_tests:,} voxels"),
    )  # fmt: skip
    table = report.ari_report_table(ari.table, alpha=ari.alpha, filename=table_path.name)
    return written, summary, report.MethodReport(title, facts=facts, figures=figures, table=table)


_ARI_COLUMNS: dict[str, dict[str, str]] = {
    "threshold": {"Description": "Cluster-forming threshold", "Units": "z"},
    "cluster_id": {"Description": "Cluster number within its threshold, by decreasing |peak|"},
    "size": {"Description": "Cluster size", "Units": "voxels"},
    "volume_mm3": {"Description": "Cluster volume", "Units": "mm^3"},
    "true_discoveries": {"Description": "Lower bound of the number of active voxels (ARI)"},
    "tdp": {
        "Description": "Lower bound of the true discovery proportion = true_discoveries / size"
    },  # fmt: skip
    "peak_stat": {"Description": "z at the peak (negative for negative clusters)"},
    "peak_x": {"Description": "x coordinate of the peak", "Units": "mm"},
    "peak_y": {"Description": "y coordinate of the peak", "Units": "mm"},
    "peak_z": {"Description": "z coordinate of the peak", "Units": "mm"},
}


def _threshold_metadata(threshold: HeightThreshold, inference: InferenceConfig) -> dict[str, Any]:
    return {
        "HeightControl": inference.height_control,
        "Alpha": threshold.alpha,
        "PValueThreshold": threshold.p_threshold,
        "Value": float(threshold.z_threshold) if np.isfinite(threshold.z_threshold) else "inf",
        "Units": "z",
        "TwoSided": threshold.two_sided,
        "ClusterExtentVoxels": inference.cluster_threshold,
        "Connectivity": inference.connectivity,
    }


def _write_run_metadata(
    stage: Path,
    config: RunConfig,
    spec: ModelSpec,
    analyses: Sequence[Analysis],
    source_datasets: Sequence[str],
) -> list[Path]:
    description = write_dataset_description(
        stage,
        source_datasets=source_datasets,
        pipeline_version=__version__,
        code_url=CODE_URL,
        command=config.command,
    )
    model_path = stage / naming.model_name(to_label(spec.name))
    # Record X with wildcards expanded when every model has the same columns.
    columns = {a.design.columns for a in analyses}
    x_columns = next(iter(columns)) if len(columns) == 1 else None
    write_json(model_path, resolved_model_dict(spec, x_columns=x_columns))
    return [Path(description), model_path]


def _isolate_caches(work_dir: Path | None) -> None:
    """Point matplotlib's cache at a writable scratch folder (HOME may be read-only)."""
    if "MPLCONFIGDIR" in os.environ:
        return
    base = work_dir if work_dir is not None else Path(tempfile.gettempdir())
    target = base / "bids-group-mplconfig"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        target = Path(tempfile.mkdtemp(prefix="bids-group-mpl-"))
    os.environ["MPLCONFIGDIR"] = str(target)
