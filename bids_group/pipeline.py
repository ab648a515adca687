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
from bids_group.spec import ModelSpec, default_spec, load_spec, resolved_model_dict

log = logging.getLogger(__name__)

#: Entities that may appear in GroupBy (each becomes part of the output names).
GROUPABLE_ENTITIES = ("contrast", "task", "space")


@dataclass(frozen=True)
class Analysis:
    """One model to fit: the maps of one GroupBy group, their design and contrasts."""

    group: Mapping[str, Any]
    maps: tuple[InputMap, ...]
    design: Design
    contrasts: tuple[Contrast, ...]

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
    check_writable(
        config.out_dir,
        overwrite=config.overwrite,
        entries=[
            naming.DATASET_DESCRIPTION,
            naming.model_name(to_label(spec.name)),
            naming.node_dir(to_label(spec.node_name)),
        ],
    )
    inputs = collect_inputs(
        config.bids_dir,
        derivatives=config.derivatives,
        input_filters=spec.input_filters,
        participant_labels=config.participant_labels,
        bids_filters=config.bids_filters,
        group_by=spec.group_by,
    )
    analyses = plan_analyses(spec, inputs.maps, inputs.participants)
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
    with staged_output(config.out_dir, overwrite=config.overwrite) as stage:
        written += _write_run_metadata(stage, config, spec, analyses, inputs.source_datasets)
        node_dir = stage / naming.node_dir(to_label(spec.node_name))
        node_dir.mkdir(parents=True, exist_ok=True)
        with MapWriter(n_jobs=config.n_jobs) as writer:
            for analysis in analyses:
                files, analysis_summary = _run_analysis(
                    analysis, config, spec, inference, node_dir, writer
                )
                written += files
                summary["analyses"].append(analysis_summary)
    final = tuple(config.out_dir / p.relative_to(stage) for p in written)
    summary["files"] = [str(p) for p in final]
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
        analyses.append(Analysis(group, group_maps, design, contrasts))
    return tuple(analyses)


def _run_analysis(
    analysis: Analysis,
    config: RunConfig,
    spec: ModelSpec,
    inference: InferenceConfig,
    node_dir: Path,
    writer: MapWriter,
) -> tuple[list[Path], dict[str, Any]]:
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
    fit = fit_ols(data.data, analysis.design.matrix)
    entities = analysis.name_entities
    written = _write_design(analysis, data, node_dir, entities, writer)
    contrasts_summary = []
    for contrast in analysis.contrasts:
        result = compute_contrast(fit, contrast.weights, contrast.test)
        label = group_contrast_label(analysis.input_contrast, contrast.name)
        files, contrast_summary = _write_contrast(
            analysis, contrast, label, result, data, inference, node_dir, entities, writer
        )
        written += files
        contrasts_summary.append(contrast_summary)
    summary = {
        "group": dict(analysis.group),
        "n_maps": len(analysis.maps),
        "subjects": sorted({str(m.entities["subject"]) for m in analysis.maps}),
        "columns": list(analysis.design.columns),
        "dof": int(fit.dof),
        "mask_voxels": int(data.data.shape[1]),
        "contrasts": contrasts_summary,
    }
    return written, summary


def _write_design(
    analysis: Analysis,
    data: MaskedData,
    node_dir: Path,
    entities: Mapping[str, str],
    writer: MapWriter,
) -> list[Path]:
    design = analysis.design
    input_contrast = analysis.input_contrast
    table = design.variables.loc[:, []].copy()
    table.insert(0, "path", [m.path.name for m in analysis.maps])
    table.insert(0, "subject", [f"sub-{m.entities['subject']}" for m in analysis.maps])
    for j, column in enumerate(design.columns):
        table[column] = design.matrix[:, j]
    label = _label(input_contrast)
    design_path = node_dir / naming.design_name(contrast=label, **entities)
    write_table(
        design_path,
        table,
        {"Description": "Design matrix as fitted", **design_summary(design.matrix, design.columns)},
    )
    figure_path = node_dir / naming.design_figure_name(contrast=label, **entities)
    plot_design_matrix(design.matrix, design.columns, list(table["subject"]), figure_path)
    mask_path = node_dir / naming.mask_name(contrast=label, **entities)
    write_mask(mask_path, data.mask, data.affine)
    return [design_path, design_path.with_suffix(".json"), figure_path, mask_path]


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
) -> tuple[list[Path], dict[str, Any]]:
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
        path = node_dir / naming.statmap_name(contrast=label, stat=stat, **entities)
        sidecar = {**common, "Statistic": stat}
        if stat == "p":
            sidecar["PValueSidedness"] = "two-sided" if two_sided else "one-sided (upper tail)"
        writer.submit(
            path,
            values,
            mask=data.mask,
            affine=data.affine,
            sidecar=sidecar,
            stat=stat,
            dof=result.dof,
        )
        written += [path, path.with_name(path.name.replace(".nii.gz", ".json"))]
    uncorrected = inference.height_control == "none"
    threshold = height_threshold(
        result.z,
        method=inference.height_control,
        alpha=None if uncorrected else inference.alpha,
        threshold=inference.threshold,
        two_sided=two_sided,
    )
    z_vol = np.zeros(data.mask.shape, dtype=np.float64)
    z_vol[data.mask] = result.z
    thresholded = apply_cluster_extent(
        z_vol,
        z_threshold=threshold.z_threshold,
        cluster_threshold=inference.cluster_threshold,
        two_sided=two_sided,
        connectivity=inference.connectivity,
    )
    desc = naming.desc_label(
        inference.height_control,
        alpha=None if uncorrected else inference.alpha,
        cluster_threshold=inference.cluster_threshold,
    )
    threshold_meta = _threshold_metadata(threshold, inference)
    thr_path = node_dir / naming.statmap_name(contrast=label, stat="z", desc=desc, **entities)
    writer.submit(
        thr_path,
        thresholded[data.mask],
        mask=data.mask,
        affine=data.affine,
        sidecar={**common, "Statistic": "z", "Threshold": threshold_meta},
        stat="z",
        dof=result.dof,
    )
    written += [thr_path, thr_path.with_name(thr_path.name.replace(".nii.gz", ".json"))]
    table = cluster_table(
        z_vol,
        data.affine,
        z_threshold=threshold.z_threshold,
        cluster_threshold=inference.cluster_threshold,
        two_sided=two_sided,
        connectivity=inference.connectivity,
    )
    table_path = node_dir / naming.clusters_name(contrast=label, stat="z", desc=desc, **entities)
    meta = cluster_table_metadata(
        z_threshold=threshold.z_threshold,
        cluster_threshold=inference.cluster_threshold,
        two_sided=two_sided,
        connectivity=inference.connectivity,
        height_control=inference.height_control,
        alpha=None if uncorrected else inference.alpha,
        p_threshold=threshold.p_threshold,
    )
    write_table(table_path, table, {**meta, "Threshold": threshold_meta, "Contrast": contrast.name})
    written += [table_path, table_path.with_suffix(".json")]
    n_surviving = int(np.count_nonzero(thresholded))
    log.info(
        "contrast %s: z threshold %.3f (%s), %d voxel(s) survive, %d cluster(s)",
        label,
        threshold.z_threshold,
        inference.height_control,
        n_surviving,
        int((~table["cluster_id"].astype(str).str.contains("[a-z]", regex=True)).sum())
        if len(table)
        else 0,
    )
    summary = {
        "contrast": contrast.name,
        "label": label,
        "stat": result.stat_type,
        "z_threshold": None
        if not np.isfinite(threshold.z_threshold)
        else float(threshold.z_threshold),
        "surviving_voxels": n_surviving,
        "max_z": float(np.max(result.z)) if result.z.size else None,
        "min_z": float(np.min(result.z)) if result.z.size else None,
    }
    return written, summary


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
