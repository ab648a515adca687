"""The whole group analysis, one stage after another.

Everything is validated before the first image is read: the model, the inputs, every design and
contrast, and that OUT_DIR can take the results. Results are written into a staging folder and
appear in OUT_DIR only when the run succeeded (see :mod:`bids_group.outputs.staging`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bids_group import CODE_URL, __version__
from bids_group.config import InferenceConfig, RunConfig, resolve_estimation, resolve_inference
from bids_group.contrasts import ContrastResult
from bids_group.data_checks import check_masked_data
from bids_group.design import Contrast, Design, build_design, resolve_contrasts, variables_for_maps
from bids_group.errors import DataError, UsageError
from bids_group.estimation import FittedModel, fit_model, mixed_estimable
from bids_group.images import MaskedData, load_masked_data, load_on_mask
from bids_group.inference.ari import ARIResult, ari_clusters
from bids_group.inference.clusters import (
    apply_cluster_extent,
    cluster_table,
    cluster_table_metadata,
)
from bids_group.inference.height import HeightThreshold, height_threshold
from bids_group.inputs import InputMap, collect_inputs, listing
from bids_group.labels import group_contrast_label, to_label
from bids_group.outputs import naming
from bids_group.outputs.description import (
    write_bidsignore,
    write_dataset_description,
    write_json,
    write_readme,
)
from bids_group.outputs.figures import design_summary, plot_design_matrix
from bids_group.outputs.maps import MapWriter, write_mask
from bids_group.outputs.staging import check_writable, staged_output
from bids_group.outputs.tables import write_table
from bids_group.paths import isolate_caches
from bids_group.pipeline_permutation import PermutationJob, plan_permutations, write_permutation
from bids_group.report import build as report
from bids_group.report.html import ReportSection, write_report
from bids_group.spec import (
    EstimationSpec,
    ModelSpec,
    default_spec,
    load_spec,
    resolved_model_dict,
)
from bids_group.variance_maps import sibling_paths, to_variance

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
    #: Mixed-effects models: the sibling map giving each map's first-level variance.
    variance_paths: tuple[Path, ...] = ()

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
    # Every warning from the first step on (inputs, designs, data) reaches the report.
    with report.collect_warnings() as warnings:
        return _run(config, warnings)


def _run(config: RunConfig, warnings: list[str]) -> RunResult:
    started = time.perf_counter()
    isolate_caches(config.work_dir)  # a no-op when the CLI did it before matplotlib's import
    spec = load_spec(config.model) if config.model else default_spec()
    inference = resolve_inference(config.inference_overrides, spec.inference)
    spec = replace(spec, estimation=resolve_estimation(spec.estimation, config))
    _check_estimation(spec.estimation, inference, config)
    entries = [
        naming.DATASET_DESCRIPTION,
        naming.README,
        naming.BIDSIGNORE,
        naming.model_name(to_label(spec.name)),
        naming.node_dir(to_label(spec.node_name)),
    ]
    if config.report:
        entries.append(naming.report_name(to_label(spec.name)))
    check_writable(
        config.out_dir, overwrite=config.overwrite, entries=entries, inputs=config.input_files
    )
    inputs = collect_inputs(
        config.bids_dir,
        derivatives=config.derivatives,
        input_filters=spec.input_filters,
        participant_labels=config.participant_labels,
        bids_filters=config.bids_filters,
        group_by=spec.group_by,
        index_cache=config.work_dir / "bids-group-pybids" if config.work_dir else None,
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
    with staged_output(config.out_dir, overwrite=config.overwrite) as stage:
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


def _check_estimation(
    estimation: EstimationSpec, inference: InferenceConfig, config: RunConfig
) -> None:
    """Settings a mixed-effects model cannot honour (yet), refused before any image is read."""
    if not estimation.mixed:
        return
    resampling = "--target-voxel-size" if config.target_voxel_size else (
        "--resample" if config.resample else None
    )  # fmt: skip
    if resampling:
        raise UsageError(
            f"{resampling} with the {estimation.estimator} estimator: interpolating the effect "
            "maps changes their variances in a way the first-level variance maps do not "
            "describe (and interpolated variances can turn negative); resample at the first "
            "level instead"
        )
    if inference.permutation:
        raise UsageError(
            f"permutation inference ({', '.join(inference.permutation)}) with the "
            f"{estimation.estimator} estimator is not available yet: use parametric inference "
            "(--height-control, --cluster-threshold, --ari) or --estimator ols"
        )
    if inference.smoothing_fwhm:
        raise UsageError(
            f"--smoothing-fwhm {inference.smoothing_fwhm:g} with the {estimation.estimator} "
            "estimator: smoothing the effect maps changes their variances in a way the "
            "first-level variance maps do not describe; smooth at the first level instead"
        )


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
    _warn_incomplete_groups(groups, spec.group_by)
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
        _warn_zero_rows(design, group_maps, group)
        variance_paths = (
            sibling_paths(group_maps, spec.estimation.variance_from)
            if spec.estimation.mixed
            else ()
        )
        analyses.append(Analysis(group, group_maps, design, contrasts, variables, variance_paths))
    return tuple(analyses)


def _warn_zero_rows(design: Design, maps: Sequence[InputMap], group: Mapping[str, Any]) -> None:
    """Maps left out by the cell-means coding of a Factor: with one 0/1 column per level in X
    and no intercept, a map whose level is not in X (e.g. a group written NA) has zeros in all
    of them and is modelled by the other columns only, silently. Say so, naming the subjects.
    (With an intercept, zeros are the reference level and fine.)"""
    columns = list(design.columns)
    if "intercept" in columns:
        return
    matrix = design.matrix
    prefixes = {c.split(".", 1)[0] for c in columns if "." in c}
    for prefix in sorted(prefixes):
        index = [i for i, c in enumerate(columns) if c.startswith(prefix + ".")]
        block = matrix[:, index]
        if len(index) < 2 or not np.isin(block, (0.0, 1.0)).all():
            continue
        total = block.sum(axis=1)
        missing = np.flatnonzero(total == 0)
        if total.max() != 1 or not missing.size:
            continue
        where = ", ".join(f"{k} {v}" for k, v in group.items()) or "all maps"
        who = listing([f"sub-{maps[i].entities['subject']}" for i in missing])
        log.warning(
            "%s: %s have no %s.* column of X set (their level of %r is not in X: %s); "
            "they are modelled by the other columns only. Add their level to X or leave them "
            "out (--participant-label, or a filter)",
            where, who, prefix, prefix, ", ".join(columns[i] for i in index),
        )  # fmt: skip


def _warn_incomplete_groups(
    groups: Mapping[tuple, Sequence[InputMap]], group_by: Sequence[str]
) -> None:
    """Warn when a subject has maps for some GroupBy groups (e.g. contrasts) but not others:
    that subject is silently absent from the other models otherwise."""
    if len(groups) < 2:
        return
    subjects = {key: {str(m.entities["subject"]) for m in maps} for key, maps in groups.items()}
    everyone = set().union(*subjects.values())
    for key in sorted(groups):
        missing = sorted(everyone - subjects[key])
        if missing:
            where = ", ".join(f"{e} {v}" for e, v in zip(group_by, key, strict=True))
            listed = listing([f"sub-{s}" for s in missing])
            log.warning(
                "%s: no map for %s, who have maps for other values of %s; the model for %s "
                "uses %d of %d subjects",
                where, listed, "/".join(group_by), where, len(subjects[key]),
                len(everyone),
            )  # fmt: skip


def _warn_data_findings(
    data: MaskedData, maps: Sequence[InputMap], where: str, *, ols: bool = True
) -> None:
    """Outlier or all-zero maps, voxels without variance: WARNINGs naming maps or counting.

    Constant voxels are only a problem for OLS (zero residual variance); a mixed-effects model
    weighs them by their first-level variances."""
    found = check_masked_data(data.data)
    for index, largest in found.outliers:
        log.warning(
            "%s: the map of sub-%s (%s) has values up to %.3g, %.0e times the median map's "
            "largest |value| (%.3g): check its units or its first-level fit; it dominates the "
            "model for %s",
            where, maps[index].entities["subject"], maps[index].path.name, largest,
            largest / found.median_max, found.median_max, where,
        )  # fmt: skip
    for index in found.zero_maps:
        log.warning(
            "%s: the map of sub-%s (%s) is zero at every voxel of the mask",
            where, maps[index].entities["subject"], maps[index].path.name,
        )  # fmt: skip
    if found.all_zero_voxels:
        log.warning(
            "%s: %d of %d mask voxels are zero in every map (t = 0 there); is the mask larger "
            "than the maps' coverage?",
            where, found.all_zero_voxels, data.data.shape[1],
        )  # fmt: skip
    if found.constant_voxels and ols:
        log.warning(
            "%s: %d of %d mask voxels have the same value in every map: with no variance "
            "between maps their t is the effect over a tiny floor (huge); exclude them with "
            "--mask",
            where, found.constant_voxels, data.data.shape[1],
        )  # fmt: skip


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
        target_voxel_size=config.target_voxel_size,
    )
    log.info("mask: %d voxels", data.data.shape[1])
    if inference.cluster_threshold > data.data.shape[1]:
        log.warning("cluster threshold %d voxels > the mask's %d voxels (model for %s): no "
                    "cluster can survive it", inference.cluster_threshold, data.data.shape[1],
                    where)  # fmt: skip
    _warn_data_findings(data, analysis.maps, where, ols=not spec.estimation.mixed)
    variances = None
    if spec.estimation.mixed:
        data, variances = _load_variances(analysis, data, spec.estimation, config, where)
    fit = fit_model(spec.estimation, data.data, analysis.design.matrix, variances)
    entities = analysis.name_entities
    written, design_info = _write_design(analysis, data, node_dir, entities, writer)
    written += _write_model_maps(analysis, fit, data, node_dir, writer, config.write_residuals)
    view = (
        _ReportView(data, report.background_volume(data.data, data.mask)) if config.report else None
    )
    contrasts_summary, contrast_sections = [], []
    for contrast in analysis.contrasts:
        result = fit.contrast(contrast.weights, contrast.test)
        label = group_contrast_label(analysis.input_contrast, contrast.name)
        files, contrast_summary, methods = _write_contrast(
            analysis, contrast, label, result, data, inference, node_dir, entities, writer, view,
            (jobs or {}).get(contrast.name), fit.sidecar(),
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
            analysis, where, data, fit, design_info, view, contrast_sections, node_dir
        )
        written += files
    summary = {
        "group": dict(analysis.group),
        "n_maps": len(analysis.maps),
        "subjects": sorted({str(m.entities["subject"]) for m in analysis.maps}),
        "columns": list(analysis.design.columns),
        "dof": int(fit.dof),
        "estimator": spec.estimation.estimator,
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
    fit: FittedModel,
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
        ("residual degrees of freedom", f"{fit.dof:g}"),
        ("mask voxels", f"{int(data.mask.sum()):,}"),
        ("voxels dropped from the mask", f"{data.n_dropped:,}"),
        *fit.report_facts(),
    )
    extra: tuple = ()
    if fit.mixed is not None:  # the between-subject variance, as the report promises
        label = _label(analysis.input_contrast)
        names = tuple(naming.figure_name(contrast=label, stat="tau2", kind=kind,
                                         **analysis.name_entities)
                      for kind in naming.FIGURE_SUFFIXES)  # fmt: skip
        tau2 = np.zeros(data.mask.shape)
        tau2[data.mask] = fit.mixed.tau2
        extra = view.figures(tau2, threshold=None, label="tau²", names=names,
                             title=f"Between-subject variance tau² ({where})",
                             shown="tau² > 0")  # fmt: skip
    sections = report.analysis_sections(
        f"Model for {where}", facts=facts, design_svg=figure_path.read_bytes(),
        design_filename=figure_path.name, design_summary=summary, mask=mask,
        contrasts=contrast_sections, participants=_participants(analysis.maps),
        figures=extra,
    )  # fmt: skip
    return report.write_figures(node_dir, [mask, *extra]), list(sections)


def _participants(maps: Sequence[InputMap]) -> list[str]:
    """``sub-<label>`` of every subject with a map, in order (once each)."""
    return list(dict.fromkeys(f"sub-{m.entities['subject']}" for m in maps))


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


def _write_model_maps(
    analysis: Analysis,
    fit: FittedModel,
    data: MaskedData,
    node_dir: Path,
    writer: MapWriter,
    residuals: bool,
) -> list[Path]:
    """Model-level maps (no group contrast): OLS R^2 and residual variance (with
    ``residuals`` also the residuals and fitted values as 4-D images, one volume per map in
    the order of the sidecar's InputMaps); mixed effects: tau^2 (and dof where it varies)."""
    common = {
        "DesignColumns": list(analysis.design.columns),
        "DegreesOfFreedom": [fit.dof],
        "InputMaps": [str(m.path) for m in analysis.maps],
        "Software": {"Name": "bids-group", "Version": __version__, "CodeURL": CODE_URL},
        **fit.sidecar(),
    }
    written = []
    for stat, values, sidecar in fit.model_maps(data.data, residuals=residuals):
        path = node_dir / naming.statmap_name(
            contrast=_label(analysis.input_contrast), stat=stat, **analysis.name_entities
        )
        writer.submit(path, values, mask=data.mask, affine=data.affine,
                      sidecar={**common, **sidecar})  # fmt: skip
        written += [path, path.with_name(naming.sidecar_name(path.name))]
    return written


def _load_variances(
    analysis: Analysis,
    data: MaskedData,
    estimation: EstimationSpec,
    config: RunConfig,
    where: str,
) -> tuple[MaskedData, np.ndarray]:
    """The first-level variances at the mask's voxels; voxels where too few maps have a usable
    variance for the design are removed from the mask (counted in a warning)."""
    values = load_on_mask(analysis.variance_paths, data, n_jobs=config.n_jobs,
                          what=f"stat-{estimation.variance_from} map")  # fmt: skip
    variances = to_variance(values, data.data, estimation.variance_from)
    keep = mixed_estimable(data.data, variances, analysis.design.matrix)
    if not keep.all():
        n_out = int(np.count_nonzero(~keep))
        if not keep.any():
            raise DataError(
                f"{where}: no voxel has enough maps with a positive, finite variance for the "
                f"design ({analysis.design.matrix.shape[1]} columns); check the "
                f"stat-{estimation.variance_from} maps, e.g. {analysis.variance_paths[0]}"
            )
        log.warning(
            "%s: %d of %d mask voxels have too few maps with a usable first-level variance "
            "(positive and finite) for the design: removed from the mask",
            where, n_out, keep.size,
        )  # fmt: skip
        data = data.restricted(keep)
        variances = variances[:, keep]
    return data, variances


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
    estimator: Mapping[str, Any] | None = None,
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
        **(estimator or {}),
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
    log.info("contrast %s: %s (%s), %d voxel(s) survive, %d cluster(s)", out.label,
             f"z threshold {threshold.z_threshold:.3f}" if np.isfinite(threshold.z_threshold)
             else "no z threshold (nothing passes)", inference.height_control, n_surviving,
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
    figures, empty = (), None
    if n_surviving:
        figures = view.figures(thresholded, threshold=threshold.z_threshold, label="z",
                               title=title, names=out.figure_names("z", desc),
                               shown=shown)  # fmt: skip
        written += report.write_figures(out.node_dir, figures)
    else:
        criterion = shown if finite else _method_title(inference, threshold)
        if finite and inference.cluster_threshold:
            criterion += f" in clusters >= {inference.cluster_threshold} voxels"
        peak = report.peak_text(result.z, mask, out.data.affine, two_sided=two_sided)
        empty = report.nothing_survives(criterion, peak)
    p_text = (
        f"{threshold.p_threshold:.4g}" + (" (two-sided)" if two_sided else "")
        if threshold.p_threshold is not None
        else f"none: no voxel passes {inference.height_control.upper()} at {alpha:g}"
    )
    facts = (
        ("threshold", f"{shown} (no voxel can survive)" if not finite else shown),
        ("p threshold", p_text),
        ("cluster extent", f">= {inference.cluster_threshold} voxels, "
                           f"{inference.connectivity}-connectivity"),
        ("surviving voxels", f"{n_surviving:,} in {n_clusters} cluster(s)"),
    )  # fmt: skip
    method = report.MethodReport(
        _method_title(inference, threshold), facts=facts, figures=figures, empty=empty,
        table=report.cluster_report_table(table, filename=table_path.name) if len(table) else None,
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
    figures, empty = (), None
    if np.any(ari.tdp_map > 0):
        figures = view.figures(
            ari.tdp_map,
            threshold=0.0,
            label="TDP",
            vmax=1.0,
            title=f"{out.label} · {title}",
            names=out.figure_names("tdp", desc),
        )
        written += report.write_figures(out.node_dir, figures)
    else:
        side = "|z|" if two_sided else "z"
        criterion = (
            f"ARI at alpha {ari.alpha:g} (no cluster of {side} > {thresholds} has a true "
            "discovery proportion above 0)"
        )
        peak = report.peak_text(z_vol[out.data.mask], out.data.mask, out.data.affine,
                                two_sided=two_sided)  # fmt: skip
        empty = report.nothing_survives(criterion, peak)
    facts = (
        ("cluster-forming thresholds", f"z > {thresholds}" + (" (±)" if two_sided else "")),
        ("alpha", f"{ari.alpha:g} (bounds simultaneous over all clusters and thresholds)"),
        ("Hommel value", f"{ari.hommel:,} of {ari.n_tests:,} voxels"),
    )  # fmt: skip
    table = (
        report.ari_report_table(ari.table, alpha=ari.alpha, filename=table_path.name)
        if len(ari.table)
        else None
    )
    return (
        written,
        summary,
        report.MethodReport(title, facts=facts, figures=figures, table=table, empty=empty),
    )


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
    readme = write_readme(stage, model_file=model_path.name, pipeline_version=__version__,
                          code_url=CODE_URL, command=config.command)  # fmt: skip
    # Record X with wildcards expanded when every model has the same columns.
    columns = {a.design.columns for a in analyses}
    x_columns = next(iter(columns)) if len(columns) == 1 else None
    write_json(model_path, resolved_model_dict(spec, x_columns=x_columns))
    return [Path(description), readme, write_bidsignore(stage), model_path]
