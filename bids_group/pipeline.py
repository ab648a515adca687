"""The whole group analysis, one stage after another.

Everything is validated before the first image is read: the model, the inputs, every design and
contrast, and that OUT_DIR can take the results. Results are written into a staging folder and
appear in OUT_DIR only when the run succeeded (see :mod:`bids_group.outputs.staging`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bids_group import CODE_URL, __version__, coverage
from bids_group.config import InferenceConfig, RunConfig, resolve_estimation, resolve_inference
from bids_group.contrasts import ContrastResult
from bids_group.data_checks import DataFindings, check_masked_data
from bids_group.design import (
    Contrast,
    Design,
    add_contrast_indicators,
    build_design,
    resolve_contrasts,
    variables_for_maps,
)
from bids_group.errors import DataError, EmptySelectionError, UsageError
from bids_group.estimation import FittedModel, fit_model, mixed_estimable
from bids_group.images import MaskedData, load_on_mask
from bids_group.inference.ari import ARIResult, ari_clusters
from bids_group.inference.clusters import (
    apply_cluster_extent,
    cluster_table,
    cluster_table_metadata,
)
from bids_group.inference.height import HeightThreshold, height_threshold
from bids_group.inputs import InputMap, collect_inputs, listing
from bids_group.labels import first_level_labels, group_contrast_label, node_label, to_label
from bids_group.memory import (
    MIXED_BYTES_PER_CELL,
    MIXED_PERMUTATION_BYTES_PER_CELL,
    PERMUTATION_BYTES_PER_CELL,
    choose_budget,
)
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
from bids_group.pipeline_permutation import (
    MixedInputs,
    PermutationJob,
    plan_permutations,
    write_permutation,
)
from bids_group.report import build as report
from bids_group.report.html import ReportSection, write_report
from bids_group.spec import (
    EstimationSpec,
    ModelSpec,
    default_spec,
    load_specs,
    resolved_models_dict,
)
from bids_group.store import VoxelStore, load_data, release
from bids_group.streamed_fit import StreamedOls, StreamPlan
from bids_group.templates import mni_space
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
    #: Mixed-effects models with VarianceGroups: each map's group (its level of the column).
    variance_groups: tuple[str, ...] | None = None

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


@dataclass(frozen=True)
class _NodePlan:
    """One Dataset node, planned: its model, maps, analyses and permutation plans."""

    spec: ModelSpec
    inputs: Any
    analyses: tuple[Analysis, ...]
    plans: Mapping[tuple[int, str], Any]


def _run(config: RunConfig, warnings: list[str]) -> RunResult:
    started = time.perf_counter()
    isolate_caches(config.work_dir)  # a no-op when the CLI did it before matplotlib's import
    specs = load_specs(config.model) if config.model else (default_spec(),)
    # Dataset nodes share the inference settings (checked when the file is read).
    inference = resolve_inference(config.inference_overrides, specs[0].inference)
    specs = tuple(replace(s, estimation=resolve_estimation(s.estimation, config)) for s in specs)
    for spec in specs:
        _check_estimation(spec.estimation, inference, config)
    _check_coverage_options(config, inference)
    first = specs[0]
    entries = [
        naming.DATASET_DESCRIPTION,
        naming.README,
        naming.BIDSIGNORE,
        naming.model_name(to_label(first.name)),
        *(naming.node_dir(node_label(s.node_name)) for s in specs),
    ]
    if config.report:
        entries.append(naming.report_name(to_label(first.name)))
    check_writable(
        config.out_dir, overwrite=config.overwrite, entries=entries, inputs=config.input_files
    )
    nodes = tuple(_plan_node(spec, config, inference, len(specs) > 1) for spec in specs)
    maps = list({m.path: m for node in nodes for m in node.inputs.maps}.values())
    # after every check of the arguments and inputs: a refused run says only why
    model_budget = next((s.memory_budget for s in specs if s.memory_budget), None)
    budget = choose_budget(
        config.mem_budget or model_budget,
        "--mem-budget" if config.mem_budget else "model file MemoryBudget",
    )
    log.info("threads: %d (--n-jobs; its default: the CPUs this process may use)", config.n_jobs)
    preload = _preload_mixed_kernels(specs)
    executor = _executor(config, any(node.plans for node in nodes))
    log.info(
        "%d map(s) of %d participant(s); %d model(s) to fit",
        len(maps),
        len({m.entities["subject"] for m in maps}),
        sum(len(node.analyses) for node in nodes),
    )
    written: list[Path] = []
    summary: dict[str, Any] = {
        "version": __version__,
        "out_dir": str(config.out_dir),
        "model": first.name,
        "nodes": [s.node_name for s in specs],
        "inference": vars(inference),
        "analyses": [],
    }
    sections: list[ReportSection] = []
    with _closing(executor), staged_output(config.out_dir, overwrite=config.overwrite) as stage:
        sources = list(dict.fromkeys(d for n in nodes for d in n.inputs.source_datasets))
        written += _write_run_metadata(stage, config, nodes, sources)
        with MapWriter(n_jobs=config.n_jobs) as writer:
            for node in nodes:
                files, analyses, parts = _run_node(node, config, inference, stage, writer,
                                                   named=len(nodes) > 1, budget=budget,
                                                   executor=executor)  # fmt: skip
                written += files
                summary["analyses"] += analyses
                sections += parts
        if config.report:
            summary["seconds"] = round(time.perf_counter() - started, 3)
            written.append(
                _write_report(stage, config, specs, inference, maps, sections, warnings, summary)
            )
    if preload is not None:
        preload.join()
    final = tuple(config.out_dir / p.relative_to(stage) for p in written)
    summary["files"] = [str(p) for p in final]
    if config.report:
        summary["report"] = str(final[-1])
    summary["seconds"] = round(time.perf_counter() - started, 3)
    log.info("done in %.1f s: %d files in %s", summary["seconds"], len(final), config.out_dir)
    return RunResult(written=final, summary=summary)


def _preload_mixed_kernels(specs: Sequence[ModelSpec]) -> threading.Thread | None:
    """Start loading the mixed-effects kernel in a background thread (see
    :func:`bids_group.mixed_effects.preload_kernels`), when a model is mixed."""
    if not any(spec.estimation.mixed for spec in specs):
        return None

    def preload() -> None:
        try:
            from bids_group.mixed_effects import preload_kernels

            preload_kernels()
        except Exception as err:  # the fit loads or compiles it in any case, and says why
            log.debug("preloading the mixed-effects kernel failed: %s", err)

    thread = threading.Thread(target=preload, name="bids-group-preload", daemon=True)
    thread.start()
    return thread


def _check_coverage_options(config: RunConfig, inference: InferenceConfig) -> None:
    """Settings per-voxel missing data cannot honour, refused before any image is read."""
    if config.min_coverage is None:
        return
    reason = coverage.refused_with(permutation=bool(inference.permutation),
                                   smoothing=bool(inference.smoothing_fwhm),
                                   residuals=config.write_residuals)  # fmt: skip
    if reason:
        raise UsageError(f"--min-coverage with {reason}")


def _coverage_count(config: RunConfig, analysis: Analysis) -> int | None:
    """Maps a voxel of ``analysis`` needs (``--min-coverage``), or None (every map)."""
    if config.min_coverage is None:
        return None
    where = ", ".join(f"{k} {v}" for k, v in analysis.group.items()) or "the dataset"
    return coverage.min_maps(config.min_coverage, len(analysis.maps),
                             analysis.design.matrix.shape[1], where)  # fmt: skip


def _plan_node(
    spec: ModelSpec, config: RunConfig, inference: InferenceConfig, named: bool
) -> _NodePlan:
    """Select the node's maps and build (so validate) its designs, before any image is read.
    ``named``: the run has several Dataset nodes, so messages name this one."""
    try:
        inputs = collect_inputs(
            config.bids_dir,
            derivatives=config.derivatives,
            input_filters=spec.map_filters,
            participant_labels=config.participant_labels,
            bids_filters=config.bids_filters,
            group_by=spec.group_by,
            index_cache=config.work_dir / "bids-group-pybids" if config.work_dir else None,
        )
        _warn_unmatched_filter(spec, inputs.maps)
        analyses = plan_analyses(spec, inputs.maps, inputs.participants)
        if config.min_coverage is not None:  # each model's count, checked before reading
            for analysis in analyses:
                _coverage_count(config, analysis)
    except (DataError, UsageError, EmptySelectionError) as err:
        if not named:
            raise
        raise type(err)(f"Dataset node {spec.node_name!r}: {err}") from err
    plans = plan_permutations(
        analyses, inference, mixed=spec.estimation.mixed, estimator=spec.estimation.estimator
    )
    return _NodePlan(spec, inputs, analyses, plans)


def _warn_unmatched_filter(spec: ModelSpec, maps: Sequence[InputMap]) -> None:
    """A contrast named in the edge Filter that no selected map carries: a typo, or a map the
    upstream node did not write."""
    present = {str(m.entities.get("contrast")) for m in maps}
    for name in spec.edge_filter.get("contrast", ()):
        labels = first_level_labels(name)
        if not present & set(labels):
            log.warning(
                "%s: no map has contrast %s (the contrast %r); node %r runs without it",
                spec.filter_where, " or ".join(f"contrast-{x}" for x in labels), name,
                spec.node_name,
            )  # fmt: skip


def _run_node(
    node: _NodePlan,
    config: RunConfig,
    inference: InferenceConfig,
    stage: Path,
    writer: MapWriter,
    *,
    named: bool,
    budget: int | None = None,
    executor: Any = None,
) -> tuple[list[Path], list[dict[str, Any]], list[ReportSection]]:
    """Fit and write every analysis of one Dataset node into ``node-<name>/``."""
    node_dir = stage / naming.node_dir(node_label(node.spec.node_name))
    node_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    summaries: list[dict[str, Any]] = []
    sections: list[ReportSection] = []
    for i, analysis in enumerate(node.analyses):
        jobs = {
            name: PermutationJob(
                plan, analysis.design.matrix, config.n_jobs, config.progress, executor=executor
            )
            for (index, name), plan in node.plans.items()
            if index == i
        }
        files, summary, parts = _run_analysis(analysis, config, node.spec, inference, node_dir,
                                              writer, jobs, budget, named=named,
                                              executor=executor)  # fmt: skip
        written += files
        sections += parts
        summaries.append({"node": node.spec.node_name, **summary})
    return written, summaries, sections


@contextlib.contextmanager
def _closing(executor: Any) -> Iterator[None]:
    """Disconnect from the Dask scheduler at the end of the run (workers keep running)."""
    try:
        yield
    finally:
        if executor is not None:
            executor.close()


def _executor(config: RunConfig, permutations: bool) -> Any:
    """The Dask executor of ``--dask-scheduler`` / ``--scheduler-file`` (None without): it runs
    the permutations, so asking for it without any is refused as a setting that does nothing."""
    if config.dask_scheduler is None and config.scheduler_file is None:
        return None
    if not permutations:
        raise UsageError(
            "--dask-scheduler / --scheduler-file run the permutations on a Dask cluster: add "
            "--permutation (or drop the scheduler option)"
        )
    from bids_group.executor import connect  # Dask: only when asked for

    return connect(config.dask_scheduler, config.scheduler_file)


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
    if inference.permutation and inference.perm_scheme == "permute":
        raise UsageError(
            f"--perm-scheme permute with the {estimation.estimator} estimator: the maps' errors "
            "have unequal variances (first-level variance + tau^2), so rows are not "
            "exchangeable; mixed-effects permutation inference flips signs (--perm-scheme auto "
            "or flip)"
        )
    if inference.smoothing_fwhm:
        raise UsageError(
            f"--smoothing-fwhm {inference.smoothing_fwhm:g} with the {estimation.estimator} "
            "estimator: smoothing the effect maps changes their variances in a way the "
            "first-level variance maps do not describe; smooth at the first level instead"
        )
    if config.write_residuals:
        raise UsageError(
            f"--write-residuals with the {estimation.estimator} estimator: residuals and "
            "fitted values of mixed-effects models are not written yet; drop the option, or "
            "use --estimator ols for them"
        )


def plan_analyses(
    spec: ModelSpec, maps: Sequence[InputMap], participants: Any
) -> tuple[Analysis, ...]:
    """Split maps by GroupBy and build (and so validate) every design before any image is read."""
    unknown = [e for e in spec.group_by if e not in GROUPABLE_ENTITIES]
    if unknown:
        raise UsageError(
            f"node {spec.node_name!r}: GroupBy {unknown[0]!r} is not supported; use a subset of "
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
        variables = add_contrast_indicators(spec, variables)
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
        variance_groups = _variance_groups(spec.estimation, variables, design, group_maps, group)
        analyses.append(Analysis(group, group_maps, design, contrasts, variables, variance_paths,
                                 variance_groups))  # fmt: skip
    return tuple(analyses)


def _variance_groups(
    estimation: EstimationSpec,
    variables: Any,
    design: Design,
    maps: Sequence[InputMap],
    group: Mapping[str, Any],
) -> tuple[str, ...] | None:
    """Each map's level of the VarianceGroups column, checked against the design (enough maps
    per group, an estimator that can fit it) before any image is read."""
    column = estimation.variance_groups
    if not column or not estimation.mixed:
        return None
    where = ", ".join(f"{k} {v}" for k, v in group.items())
    suffix = f" (model for {where})" if where else ""
    if column not in variables.columns:
        known = ", ".join(sorted(str(c) for c in variables.columns))
        raise UsageError(
            f"VarianceGroups / --variance-groups: {column!r} is not a participants.tsv column "
            f"or an entity of the maps{suffix}; known: {known}"
        )
    values = variables[column]
    missing = [f"sub-{m.entities.get('subject')}"
               for m, bad in zip(maps, values.isna(), strict=True) if bad]  # fmt: skip
    if missing:
        raise DataError(
            f"VarianceGroups column {column!r} has no value for subject(s) {listing(missing)}"
            f"{suffix}: fill it in participants.tsv or leave those subjects out"
        )
    labels = tuple(str(v) for v in values)
    from bids_group.mixed_effects import check_variance_groups

    try:
        check_variance_groups(design.matrix, np.array(labels), estimation.estimator)
    except (DataError, UsageError) as err:
        context = f"VarianceGroups {column!r}" + (f", model for {where}" if where else "")
        raise type(err)(f"{err} ({context})") from err
    return labels


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
    found: DataFindings, n_voxels: int, maps: Sequence[InputMap], where: str, *, ols: bool = True
) -> None:
    """Outlier or all-zero maps, voxels without variance (of the ``n_voxels`` of the mask):
    WARNINGs naming maps or counting.

    Constant voxels are only a problem for OLS (zero residual variance); a mixed-effects model
    weighs them by their first-level variances."""
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
            where, found.all_zero_voxels, n_voxels,
        )  # fmt: skip
    if found.constant_voxels and ols:
        log.warning(
            "%s: %d of %d mask voxels have the same value in every map: with no variance "
            "between maps their t is the effect over a tiny floor (huge); exclude them with "
            "--mask",
            where, found.constant_voxels, n_voxels,
        )  # fmt: skip


def _run_analysis(
    analysis: Analysis,
    config: RunConfig,
    spec: ModelSpec,
    inference: InferenceConfig,
    node_dir: Path,
    writer: MapWriter,
    jobs: Mapping[str, PermutationJob] | None = None,
    budget: int | None = None,
    *,
    named: bool = False,
    executor: Any = None,
) -> tuple[list[Path], dict[str, Any], list[ReportSection]]:
    """Fit one model and write its outputs; return the files, a summary and report sections
    (none when ``config.report`` is off). ``jobs``: permutation job per contrast name;
    ``named``: the run has several Dataset nodes, so titles and log lines name this one;
    ``executor``: the Dask cluster that decodes the maps (None: this process)."""
    where = ", ".join(f"{k} {v}" for k, v in analysis.group.items()) or "all maps"
    if named:
        where = f"node {spec.node_name}, {where}"
    log.info(
        "model for %s: %d maps, columns %s", where, len(analysis.maps), analysis.design.columns
    )
    data = load_data(
        [m.path for m in analysis.maps],
        budget=budget or choose_budget(None),
        work_dir=config.work_dir,
        mask_path=config.mask,
        resample=config.resample,
        smoothing_fwhm=inference.smoothing_fwhm,
        n_jobs=config.n_jobs,
        target_voxel_size=config.target_voxel_size,
        min_maps=_coverage_count(config, analysis),
        unsupported=_not_streamed(spec, config),
        bytes_per_cell=_bytes_per_cell(spec, bool(jobs)),
        executor=executor,
        stream_fit=_stream_plan(analysis, spec, config, jobs),
    )
    try:
        return _analyse(analysis, data, config, spec, inference, node_dir, writer, jobs, budget,
                        where)  # fmt: skip
    finally:
        if config.keep_store and not isinstance(data.data, VoxelStore):
            log.warning("--keep-store: the data of the model for %s fit in the memory budget, "
                        "so no store was built and none is kept", where)  # fmt: skip
        release(data, keep=config.keep_store)


def _bytes_per_cell(spec: ModelSpec, permutations: bool) -> int:
    """What the model holds in memory per map and voxel (see :mod:`bids_group.memory`), which
    decides whether its data fit in the budget."""
    if spec.estimation.mixed:
        held = MIXED_PERMUTATION_BYTES_PER_CELL if permutations else MIXED_BYTES_PER_CELL
        # variances from standard errors or t are computed in float64, not kept as read
        return held + (4 if spec.estimation.variance_from != "variance" else 0)
    return PERMUTATION_BYTES_PER_CELL if permutations else 4


def _not_streamed(spec: ModelSpec, config: RunConfig) -> str:
    """What this model needs that the tiled store cannot do yet ('' when nothing): such a
    model is refused rather than loaded over the memory budget."""
    needs = [
        name
        for name, used in (
            ("a mixed-effects estimator", spec.estimation.mixed),
            ("--write-residuals", config.write_residuals),
            ("--min-coverage", config.min_coverage is not None),
        )
        if used
    ]
    return " and ".join(needs)


def _stream_plan(
    analysis: Analysis,
    spec: ModelSpec,
    config: RunConfig,
    jobs: Mapping[str, PermutationJob] | None,
) -> StreamPlan | None:
    """The OLS fit to stream from the decoded maps when they do not fit in the budget (see
    :mod:`bids_group.streamed_fit`), or None when the run needs more of the data than that
    fit: what the store cannot do either (:func:`_not_streamed`), permutations (the only runs
    a Dask cluster is taken for), or --keep-store (which asks for the store)."""
    if _not_streamed(spec, config) or jobs or config.keep_store:
        return None
    # the report's background is the mean |map| only off the MNI template
    background = config.report and not mni_space(analysis.name_entities.get("space"))
    return StreamPlan(analysis.design.matrix, background=background)


def _analyse(
    analysis: Analysis,
    data: MaskedData,
    config: RunConfig,
    spec: ModelSpec,
    inference: InferenceConfig,
    node_dir: Path,
    writer: MapWriter,
    jobs: Mapping[str, PermutationJob] | None,
    budget: int | None,
    where: str,
) -> tuple[list[Path], dict[str, Any], list[ReportSection]]:
    """Fit the model on ``data`` and write its outputs (see :func:`_run_analysis`); ``where``
    names the model in messages."""
    log.info("mask: %d voxels", data.data.shape[1])
    if inference.cluster_threshold > data.data.shape[1]:
        log.warning("cluster threshold %d voxels > the mask's %d voxels (model for %s): no "
                    "cluster can survive it", inference.cluster_threshold, data.data.shape[1],
                    where)  # fmt: skip
    streamed = data.data if isinstance(data.data, StreamedOls) else None
    found = streamed.findings if streamed else check_masked_data(data.data, n_jobs=config.n_jobs)
    _warn_data_findings(found, data.data.shape[1], analysis.maps, where,
                        ols=not spec.estimation.mixed)  # fmt: skip
    variances = None
    if config.min_coverage is not None and not spec.estimation.mixed:
        data = _estimable_coverage(analysis, data, where)
    if spec.estimation.mixed:
        data, variances = _load_variances(analysis, data, spec.estimation, config, where)
        mixed = MixedInputs(variances, spec.estimation.estimator, spec.estimation.adjustment,
                            analysis.variance_groups)  # fmt: skip
        jobs = {name: replace(job, mixed=mixed) for name, job in (jobs or {}).items()}
    if streamed is not None:  # fitted while the maps were decoded
        fit = FittedModel(spec.estimation, float(streamed.fit.dof), ols=streamed.fit)
    else:  # only --min-coverage leaves maps without data (NaN) at some voxels
        fit = fit_model(spec.estimation, data.data, analysis.design.matrix, variances,
                        analysis.variance_groups, budget=budget, n_jobs=config.n_jobs,
                        missing=None if config.min_coverage is not None else False)  # fmt: skip
    entities = analysis.name_entities
    written, design_info = _write_design(analysis, data, node_dir, entities, writer)
    written += _write_model_maps(analysis, fit, data, node_dir, writer, config.write_residuals)
    view = None
    if config.report:
        background = report.report_background(
            data.data, data.mask, data.affine, space=entities.get("space")
        )
        view = _ReportView(data, background)
    contrasts_summary, contrast_sections = [], []
    for contrast in analysis.contrasts:
        result = fit.contrast(contrast.weights, contrast.test)
        label = group_contrast_label(analysis.input_contrast, contrast.name)
        files, contrast_summary, methods, figures = _write_contrast(
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
                    figures=figures,
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
        **({"variance_groups": fit.variance_groups()} if analysis.variance_groups else {}),
        "mask_voxels": int(data.data.shape[1]),
        "contrasts": contrasts_summary,
    }
    return written, summary, sections


@dataclass(frozen=True)
class _ReportView:
    """What the figures of one analysis share: its data grid and the background."""

    data: MaskedData
    background: report.Background

    def unthresholded(self, volume, *, label, cut, title, name, caption):
        """Slices of a map with no threshold, cut at ``cut`` (mm)."""
        return report.unthresholded_figure(volume, self.data.affine, mask=self.data.mask,
                                           background=self.background, label=label, cut=cut,
                                           title=title, filename=name,
                                           caption=caption)  # fmt: skip

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
    notes: tuple[str, ...] = ()
    if fit.mixed is not None:  # tau^2 (mixed effects) or the maps per voxel (coverage)
        label = _label(analysis.input_contrast)
        stat, values, text, shown = (
            ("nmaps", fit.n_maps, "maps with data per voxel", "maps per voxel")
            if fit.missing
            else ("tau2", fit.mixed.tau2, "between-subject variance tau²", "tau² > 0")
        )
        names = tuple(naming.figure_name(contrast=label, stat=stat, kind=kind,
                                         **analysis.name_entities)
                      for kind in naming.FIGURE_SUFFIXES)  # fmt: skip
        levels = (None,) if fit.missing else (fit.mixed.group_labels or (None,))
        for level, row in zip(levels, np.atleast_2d(values), strict=True):
            volume = np.zeros(data.mask.shape)
            volume[data.mask] = row
            title = f"{text[0].upper()}{text[1:]} ({where})"
            if level is not None:  # one tau^2 figure per variance group: desc-<level>
                names = tuple(naming.figure_name(contrast=label, stat=stat, kind=kind,
                                                 desc=to_label(str(level)),
                                                 **analysis.name_entities)
                              for kind in naming.FIGURE_SUFFIXES)  # fmt: skip
                title = (f"Between-subject variance tau² of {fit.estimation.variance_groups} "
                         f"{level} ({where})")  # fmt: skip
            if not np.any(volume > 0):  # an empty figure says less than one line
                who = "" if level is None else f" of {fit.estimation.variance_groups} {level}"
                notes += (f"Between-subject variance{who}: tau² = 0 at every voxel (no figure).",)
                continue
            extra += view.figures(volume, threshold=None, label=shown.split(" ")[0],
                                  names=names, title=title, shown=shown)  # fmt: skip
    sections = report.analysis_sections(
        f"Model for {where}", facts=facts, design_svg=figure_path.read_bytes(),
        design_filename=figure_path.name, design_summary=summary, mask=mask,
        contrasts=contrast_sections, participants=_participants(analysis.maps),
        figures=extra, notes=notes,
    )  # fmt: skip
    return report.write_figures(node_dir, [mask, *extra]), list(sections)


def _participants(maps: Sequence[InputMap]) -> list[str]:
    """``sub-<label>`` of every subject with a map, in order (once each)."""
    return list(dict.fromkeys(f"sub-{m.entities['subject']}" for m in maps))


def _write_report(
    stage: Path,
    config: RunConfig,
    specs: Sequence[ModelSpec],
    inference: InferenceConfig,
    maps: Sequence[InputMap],
    sections: list[ReportSection],
    warnings: list[str],
    summary: Mapping[str, Any],
) -> Path:
    spec = specs[0]
    model_label = to_label(spec.name)
    model_json = (stage / naming.model_name(model_label)).read_text(encoding="utf-8")
    facts = (
        ("dataset", str(config.bids_dir)),
        ("output folder", str(config.out_dir)),
        ("input maps", str(len(maps))),
        ("participants", str(len({m.entities["subject"] for m in maps}))),
        ("models fitted", str(len(summary["analyses"]))),
        ("analysis time", f"{summary['seconds']:.1f} s (before the report)"),
    )
    content = report.report_content(
        title=f"bids-group · model {spec.name} · node {', '.join(s.node_name for s in specs)}",
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


def _estimable_coverage(analysis: Analysis, data: MaskedData, where: str) -> MaskedData:
    """Drop the voxels where the maps present leave the design without residual dof or rank
    deficient (e.g. every map of one group missing), counted in a warning."""
    units = np.broadcast_to(1.0, data.data.shape)  # a view: missing maps are NaN effects
    keep = mixed_estimable(data.data, units, analysis.design.matrix)
    if keep.all():
        return data
    if not keep.any():
        raise DataError(f"{where}: no voxel of the coverage mask has maps that can fit the design")
    log.warning(
        "%s: %d of %d coverage-mask voxels removed: the maps with data there leave the design "
        "rank deficient (e.g. every map of one group missing)",
        where, int(np.count_nonzero(~keep)), keep.size,
    )  # fmt: skip
    return data.restricted(keep)


def _warn_unusable_maps(
    analysis: Analysis, effects: np.ndarray, variances: np.ndarray, source: str, where: str
) -> None:
    """A WARNING naming each map with no usable value anywhere in the mask (its variance zero,
    negative or not finite everywhere, e.g. a broken or empty variance map): the fit leaves it
    out at every voxel, which the per-value count alone did not say. One row at a time: no
    temporary of the data's size."""
    from bids_group.mixed_effects import valid_values

    unusable = [i for i in range(effects.shape[0])
                if not valid_values(effects[i : i + 1], variances[i : i + 1]).any()]  # fmt: skip
    for i in unusable:
        log.warning(
            "%s: sub-%s has no usable value in the mask (its stat-%s map %s is zero, negative "
            "or not finite at every voxel, or its effect map is not finite): the map is left "
            "out of the mixed-effects fit everywhere",
            where, analysis.maps[i].entities.get("subject", "?"), source,
            analysis.variance_paths[i],
        )  # fmt: skip


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
    _warn_unusable_maps(analysis, data.data, variances, estimation.variance_from, where)
    keep = mixed_estimable(data.data, variances, analysis.design.matrix, analysis.variance_groups)
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
) -> tuple[list[Path], dict[str, Any], list[report.MethodReport], tuple]:
    """Every output of one contrast: maps, thresholded map and table, ARI, permutation
    inference (with a ``permutation`` job), figures.

    Returns the written files, the contrast's summary and (with ``view``) one
    :class:`~bids_group.report.build.MethodReport` per correction method and the figures of
    the unthresholded maps.
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
    perm_files, perm_summary, perm_methods, perm_clusters = [], None, [], None
    if permutation is not None:  # first: its cluster-size null gives the clusters a p-value
        perm_files, perm_summary, perm_methods, perm_clusters = write_permutation(
            out, contrast, result, inference, permutation, two_sided, view
        )
    files, summary, method = _write_height(out, contrast, result, z_vol, inference, two_sided,
                                           view, perm_clusters)  # fmt: skip
    written += files
    methods = [method] if method is not None else []
    if inference.ari:
        files, summary["ari"], method = _write_ari(out, z_vol, inference, two_sided, view)
        written += files
        methods += [method] if method is not None else []
    if permutation is not None:
        written += perm_files
        summary["permutation"] = perm_summary
        methods += perm_methods
    figures = ()
    if view is not None:  # the maps before any threshold: z and the contrast estimate
        figures = _unthresholded_figures(out, result, z_vol, view)
        written += report.write_figures(out.node_dir, figures)
    return written, summary, methods, figures


def _unthresholded_figures(out, result: ContrastResult, z_vol: np.ndarray, view) -> tuple:
    """Slices of the z map and (t contrasts) of the effect map, cut at the peak |z|."""
    peak = np.unravel_index(int(np.argmax(np.abs(z_vol))), z_vol.shape)
    cut = tuple(out.data.affine[:3] @ np.array([*peak, 1.0]))
    figures = [
        view.unthresholded(z_vol, label="z", cut=cut, title=f"{out.label} · z, unthresholded",
                           name=out.figure_name("z"),
                           caption="Every voxel of the mask, coloured by z (no threshold).")
    ]  # fmt: skip
    if result.effect.shape[0] == 1:  # an F contrast has one effect map per row: not drawn
        effect = np.zeros(z_vol.shape)
        effect[out.data.mask] = result.effect[0]
        caption = (
            "The contrast of the parameter estimates (c'beta), in the units of the input "
            "maps, at every voxel of the mask (no threshold); cut at the peak |z|."
        )
        figures.append(view.unthresholded(
            effect, label="effect", cut=cut, name=out.figure_name("effect"), caption=caption,
            title=f"{out.label} · contrast estimate (effect size), unthresholded"))  # fmt: skip
    return tuple(figures)


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

    def figure_name(self, stat: str) -> str:
        """The slices figure of an unthresholded map."""
        return naming.figure_name(contrast=self.label, stat=stat, kind="slices", **self.entities)

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
    perm_clusters: pd.DataFrame | None = None,
) -> tuple[list[Path], dict[str, Any], report.MethodReport | None]:
    """Height (+ cluster extent) thresholding: thresholded z map, cluster table, figures.

    ``perm_clusters``: the permutation clusters of the contrast (when cluster inference ran),
    whose size FWER p the report gives to the same clusters of this table.
    """
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
        table=report.cluster_report_table(table, filename=table_path.name,
                                          permutation=perm_clusters) if len(table) else None,
        survivors=report.survivors(thresholded, out.data.affine,
                                   connectivity=inference.connectivity),
    )  # fmt: skip
    return written, summary, method


def _method_title(inference: InferenceConfig, threshold: HeightThreshold) -> str:
    names = {"fpr": "uncorrected p <", "fdr": "FDR q <", "bonferroni": "Bonferroni FWE p <"}
    if inference.height_control == "none":
        stat = "|z|" if threshold.two_sided else "z"
        text = f"uncorrected {stat} > {threshold.z_threshold:.3g}"
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
    table = None  # where nothing survives, rows of zero bounds say no more than the one line
    if empty is None and len(ari.table):
        table = report.ari_report_table(ari.table, alpha=ari.alpha, filename=table_path.name)
    found = report.survivors(np.where(ari.tdp_map > 0, z_vol, 0.0), out.data.affine,
                             connectivity=inference.connectivity)  # fmt: skip
    method = report.MethodReport(title, facts=facts, figures=figures, table=table, empty=empty,
                                 survivors=found)  # fmt: skip
    return written, summary, method


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
    stage: Path, config: RunConfig, nodes: Sequence[_NodePlan], source_datasets: Sequence[str]
) -> list[Path]:
    spec = nodes[0].spec
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
    # Record X with wildcards expanded when every model of a node has the same columns.
    x_columns = []
    for node in nodes:
        columns = {a.design.columns for a in node.analyses}
        x_columns.append(next(iter(columns)) if len(columns) == 1 else None)
    specs = [node.spec for node in nodes]
    write_json(model_path, resolved_models_dict(specs, x_columns=x_columns))
    return [Path(description), readme, write_bidsignore(stage), model_path]
