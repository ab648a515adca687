"""Command line: ``bids-group BIDS_DIR OUT_DIR group [options]``.

Thin on purpose: parse, normalise into a :class:`~bids_group.config.RunConfig`, call
:func:`bids_group.pipeline.run`, print results on stdout, map errors to exit codes.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from bids_group import __version__, interrupts
from bids_group.config import (
    ANALYSIS_LEVELS,
    CONNECTIVITIES,
    DEFAULT_ARI_ALPHA,
    DEFAULT_ARI_THRESHOLDS,
    DEFAULT_CLUSTER_FORMING_P,
    DEFAULT_CLUSTER_THRESHOLD,
    DEFAULT_CONNECTIVITY,
    DEFAULT_HEIGHT_CONTROL,
    DEFAULT_N_PERM,
    DEFAULT_PERM_ALPHA,
    DEFAULT_SEED,
    DEFAULT_TFCE_E,
    DEFAULT_TFCE_H,
    HEIGHT_CONTROLS,
    PERMUTATION_METHODS,
    PERMUTATION_SCHEMES,
    TFCE_INTEGRATIONS,
    RunConfig,
)
from bids_group.errors import (
    EXIT_CODES,
    BidsGroupError,
    MissingInputError,
    UnknownLevelError,
    UsageError,
)
from bids_group.memory import available_cpus, keep_heap_warm, parse_size
from bids_group.paths import check_run_paths, isolate_caches, scratch_disk_error
from bids_group.spec import ADJUSTMENTS, ESTIMATORS, VARIANCE_SOURCES
from bids_group.validation import SETTINGS, check_setting, read_utf8

log = logging.getLogger("bids_group")

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
EXIT_INTERRUPTED = 130


#: The ``--help`` sections, in order: section title -> click parameter names (the Python
#: names, e.g. ``json_summary`` for ``--json``; ``-h/--help`` goes last in "Run"). An option is
#: tagged here, once; within a section options keep their declaration order. An option missing
#: here is listed under "Other options" (tests/test_cli.py fails until it is given a section).
OPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "Inputs and preprocessing": (
        "participant_labels", "derivatives", "bids_filter_file", "mask", "resample",
        "target_voxel_size", "smoothing_fwhm",
    ),
    "Model": (
        "model", "estimator", "variance_from", "adjustment", "variance_groups", "min_coverage",
    ),
    "Inference": (
        "height_control", "alpha", "threshold", "cluster_threshold", "two_sided", "connectivity",
        "ari", "ari_thresholds", "ari_alpha",
    ),
    "Permutation inference": (
        "permutation", "n_perm", "seed", "perm_alpha", "cluster_forming_p", "tfce_integration",
        "tfce_e", "tfce_h", "tfce_dh", "perm_scheme", "exchangeability_blocks", "whole_blocks",
    ),
    "Outputs": ("report", "write_residuals", "overwrite", "json_summary"),
    "Run": ("n_jobs", "work_dir", "mem_budget", "keep_store", "dask_scheduler", "scheduler_file",
            "verbose", "quiet", "version"),
}  # fmt: skip
OTHER_OPTIONS = "Other options"

#: Command lines shown at the end of ``--help`` (tests/test_cli.py parses each one).
EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "Two-sample model with an age covariate, on the example dataset:",
        "bids-group examples/ds-faces out group --model configs/two_sample_age.yaml",
    ),
    (
        "A raw dataset, maps in one of its derivatives folders, two participants:",
        "bids-group raw raw/derivatives/bids-group group -d raw/derivatives/spm "
        "--participant-label 01 02",
    ),
    (
        "FDR at 0.05 with clusters of at least 10 voxels:",
        "bids-group ds out group --height-control fdr --alpha 0.05 --cluster-threshold 10",
    ),
    (
        "TFCE, family-wise error by 5000 sign flips on 2 threads:",
        "bids-group ds out group --permutation tfce --n-perm 5000 --n-jobs 2",
    ),
    (
        "A JSON summary on stdout, warnings only on stderr:",
        "bids-group ds out group --json -q",
    ),
)


class GroupedCommand(click.Command):
    """A command whose ``--help`` lists its options in sections (:data:`OPTION_GROUPS`).

    Click has no option groups; this overrides :meth:`click.Command.format_options` only, so
    parsing is click's own.
    """

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {title: [] for title in OPTION_GROUPS}
        section_of = {name: t for t, names in OPTION_GROUPS.items() for name in names}
        help_option = self.get_help_option(ctx)
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None or not isinstance(param, click.Option):
                continue  # arguments are described in the command's help text
            title = "Run" if param is help_option else section_of.get(param.name, OTHER_OPTIONS)
            sections.setdefault(title, []).append(record)
        for title, records in sections.items():
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


def _examples_epilog() -> str:
    lines = [f"  {text}\n    {command}" for text, command in EXAMPLES]
    return "\b\nExamples:\n" + "\n".join(lines)


def _exit_code_epilog() -> str:
    rows = "\n".join(
        f"  {code:>3}  {name}: {meaning}" for code, (name, meaning) in EXIT_CODES.items()
    )
    return "\b\nExit codes:\n" + rows


class ParticipantLabel(click.ParamType):
    """A participant label given with or without ``sub-``; normalised to the bare label."""

    name = "LABEL"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        label = str(value).strip()
        label = label[4:] if label.startswith("sub-") else label
        if not label or not label.isalnum():
            self.fail(
                f"{value!r} is not a BIDS participant label (letters and digits only)", param, ctx
            )
        return label


class FilterFile(click.ParamType):
    """``--bids-filter-file``: a JSON object mapping entities to a value or a list of values."""

    name = "FILE"

    def convert(self, value: Any, param: Any, ctx: Any) -> dict[str, Any]:
        path = Path(value)
        if path.is_dir():
            raise _MissingPath(f"--bids-filter-file {path} is a folder; expected a JSON file")
        if not path.is_file():
            raise _MissingPath(f"--bids-filter-file {path}: no such file")
        if ctx is not None:  # checked with the other paths (no output may replace it)
            ctx.meta[_FILTER_FILE_KEY] = path
        try:
            content = json.loads(read_utf8(path, UsageError, " (--bids-filter-file)"))
        except json.JSONDecodeError as err:
            self.fail(
                f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})",
                param,
                ctx,
            )
        if not isinstance(content, dict):
            self.fail(f'{path} must hold a JSON object such as {{"task": "faces"}}', param, ctx)
        return content


_FILTER_FILE_KEY = "bids_group.filter_file"


class Size(click.ParamType):
    """A memory size such as ``4GB``, ``512MB`` or ``2GiB`` (decimal and binary units), in bytes,
    checked against the ``mem_budget`` row of :data:`bids_group.validation.SETTINGS`."""

    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        option = _option_of(param, "mem_budget")
        try:
            size = parse_size(value)
        except ValueError as err:
            raise UsageError(f"{option}: {err}") from err
        return int(check_setting(size, "mem_budget", option))


class Setting(click.ParamType):
    """A numeric option checked by :func:`bids_group.validation.check_setting`: type, finite,
    range; the message names the option and the accepted range (``--alpha == nan, must be a
    finite number > 0 and < 1``)."""

    def __init__(self, field: str) -> None:
        self.field = field
        self.integer = SETTINGS[field].integer
        self.name = "INTEGER" if self.integer else "FLOAT"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return check_setting(value, self.field, _option_of(param, self.field))
        text = str(value).strip()
        try:
            number: Any = int(text) if self.integer else float(text)
        except ValueError:
            number = text
        return check_setting(number, self.field, _option_of(param, self.field))


def _range(field: str) -> str:
    """`` [range: 1e-10<=x<1]``: the accepted values, for the help text."""
    return f" [range: {SETTINGS[field].interval()}]"


def _option_of(param: Any, field: str) -> str:
    """The option as the user knows it (its first long name), e.g. ``--n-perm``."""
    names = [n for n in getattr(param, "opts", ()) if n.startswith("--")]
    return names[0] if names else "--" + field.replace("_", "-")


class _MissingPath(click.ClickException):
    """Raised during parsing for a path that does not exist (exit 66, not a usage error)."""

    exit_code = MissingInputError.exit_code


def _option(*names: str, **kwargs: Any):
    """A click option that also accepts the ``_`` spelling of each ``--long-name`` (BIDS-Apps)."""
    spellings = list(names)
    for name in names:
        parts = name.split("/")
        changed = [_underscored(part) for part in parts]
        if changed == parts:
            continue
        if len(parts) == 1:
            spellings.append(changed[0])
        else:  # a --flag/--no-flag pair: click's " /--x" form adds a secondary name only
            primary = changed[0] if changed[0] != parts[0] else " "
            spellings.append(f"{primary}/{changed[1]}" if changed[1] != parts[1] else primary)
    if isinstance(kwargs.get("type"), Setting):  # the accepted range, as the code checks it
        kwargs["help"] = kwargs.get("help", "") + _range(kwargs["type"].field)
    return click.option(*spellings, **kwargs)


def _underscored(name: str) -> str:
    return "--" + name[2:].replace("-", "_") if name.startswith("--") else name


@click.command(
    cls=GroupedCommand,
    context_settings=CONTEXT_SETTINGS,
    epilog=_examples_epilog() + "\n\n" + _exit_code_epilog(),
)
@click.argument("bids_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.argument("analysis_level", metavar="{group,dataset}")
@_option(
    "--model",
    "-m",
    type=click.Path(path_type=Path),
    help="Model file (BIDS Stats Models, YAML or JSON); each of its Dataset nodes runs. "
    "Default: one-sample t-test of every input contrast.",
)
@_option(
    "--participant-label",
    "participant_labels",
    multiple=True,
    type=ParticipantLabel(),
    help="Participant(s) to include, with or without 'sub-': --participant-label 01 02 03.",
)
@_option(
    "--derivatives",
    "-d",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Derivatives folder holding the first-level maps (when BIDS_DIR is a raw dataset). "
    "Repeatable.",
)
@_option(
    "--bids-filter-file",
    type=FilterFile(),
    help="JSON file of extra entity filters, "
    'e.g. {"task": "faces", "space": "MNI152NLin2009cAsym"}.',
)
@_option(
    "--mask",
    type=click.Path(path_type=Path),
    help="Mask image (non-zero = in). Default: voxels finite and non-zero in every map.",
)
@_option(
    "--resample/--no-resample",
    default=False,
    show_default=True,
    help="Resample maps on other grids to the mask's (or the first map's) grid "
    "instead of stopping.",
)
@_option(
    "--estimator",
    type=click.Choice(ESTIMATORS),
    help="Model estimator: ols (OLS on the effect maps), or mixed effects with the first-level "
    "variances: fe (tau²=0), dl (DerSimonian-Laird), hedges, ml, reml (FLAME1). "
    "[default: the model file's: ols for Type glm, reml for Type meta]",
)
@_option(
    "--variance-from",
    type=click.Choice(VARIANCE_SOURCES),
    help="Mixed effects: each effect map's variance comes from its stat-variance sibling, "
    "stat-se (squared) or stat-t ((effect/t)²). [default: variance]",
)
@_option(
    "--adjustment",
    type=click.Choice(ADJUSTMENTS),
    help="Mixed effects: small-sample adjustment of t/F (Knapp-Hartung, or floored at 1). "
    "[default: none]",
)
@_option(
    "--variance-groups",
    metavar="COLUMN",
    help="Mixed effects (ml, reml; fe, dl, hedges with a design separable by group): one tau² "
    "per level of this participants.tsv column or entity (FLAME's variance groups). "
    "[default: the model file's VarianceGroups, else one tau²]",
)
@_option(
    "--target-voxel-size",
    type=Setting("target_voxel_size"),
    metavar="MM",
    help="Resample every map (and --mask) to isotropic voxels of this size before fitting, "
    "over the same field of view (nilearn's target_affine / target_shape).",
)
@_option(
    "--min-coverage",
    type=Setting("min_coverage"),
    metavar="F|N",
    help="Per-voxel missing data: analyse every voxel where at least this fraction (<= 1) or "
    "number (> 1) of the maps have data, each on its own maps with its own dof (stat-nmaps "
    "and stat-dof maps). Default: only voxels where every map has data.",
)
@_option(
    "--smoothing-fwhm",
    type=Setting("smoothing_fwhm"),
    help="Smooth each map with a Gaussian of this FWHM in mm.",
)
@_option(
    "--height-control",
    type=click.Choice(HEIGHT_CONTROLS),
    help=f"Voxel-level correction. [default: {DEFAULT_HEIGHT_CONTROL}]",
)
@_option(
    "--alpha",
    type=Setting("alpha"),
    help="Error rate of the height control (fpr, fdr, bonferroni; not with none, whose "
    "--threshold is a z). [default: 0.001 for fpr, 0.05 for fdr and bonferroni]",
)
@_option(
    "--threshold", type=Setting("threshold"), help="z threshold, only with --height-control none."
)
@_option(
    "--cluster-threshold",
    type=Setting("cluster_threshold"),
    help=f"Minimum cluster size in voxels. [default: {DEFAULT_CLUSTER_THRESHOLD}]",
)
@_option(
    "--two-sided/--one-sided",
    "two_sided",
    default=None,
    help="Test both signs (default) or only positive effects.",
)
@_option(
    "--connectivity",
    type=click.Choice([str(c) for c in CONNECTIVITIES]),
    help=f"Cluster connectivity: 6 faces, 18 edges, 26 corners. [default: {DEFAULT_CONNECTIVITY}]",
)
@_option(
    "--ari/--no-ari",
    "ari",
    default=None,
    help="All-Resolution Inference: lower bounds of the true discovery proportion of the "
    "clusters at each --ari-thresholds value (simultaneous at --ari-alpha). [default: no-ari]",
)
@_option(
    "--ari-thresholds",
    "ari_thresholds",
    multiple=True,
    type=Setting("ari_thresholds"),
    metavar="Z",
    help="Cluster-forming thresholds of ARI, in z units (> 0): --ari-thresholds 3.0 3.5. "
    f"[default: {' '.join(map(str, DEFAULT_ARI_THRESHOLDS))}]",
)
@_option(
    "--ari-alpha",
    type=Setting("ari_alpha"),
    help="Level of the ARI bounds. [default: --alpha with fdr or bonferroni, else "
    f"{DEFAULT_ARI_ALPHA}]",
)
@_option(
    "--permutation",
    "permutation",
    multiple=True,
    type=click.Choice([*PERMUTATION_METHODS, "none"]),
    metavar="METHOD",
    help="Permutation inference (FWER): voxel (max statistic), cluster (size and mass), tfce; "
    "several at once: --permutation voxel cluster tfce. 'none' turns off the model file's. "
    "[default: none]",
)
@_option(
    "--n-perm",
    type=Setting("n_perm"),
    metavar="N",
    help=f"Random relabellings beside the unpermuted data; when 1 + N reaches the number of "
    f"distinct ones, all are enumerated (exact test). [default: {DEFAULT_N_PERM}]",
)
@_option(
    "--seed",
    type=Setting("seed"),
    help=f"Seed of the relabellings; the same seed gives the same results for any --n-jobs. "
    f"[default: {DEFAULT_SEED}]",
)
@_option(
    "--perm-alpha",
    type=Setting("perm_alpha"),
    help=f"FWER level of the thresholded permutation maps. [default: {DEFAULT_PERM_ALPHA}]",
)
@_option(
    "--cluster-forming-p",
    type=Setting("cluster_forming_p"),
    metavar="P",
    help="Cluster-forming threshold of --permutation cluster, as a one-sided uncorrected "
    "p-value, 0 < P < 0.5 (split between the tails when two-sided; z 3.1 is p 0.00097). "
    f"[default: {DEFAULT_CLUSTER_FORMING_P}]",
)
@_option(
    "--tfce-integration",
    type=click.Choice(TFCE_INTEGRATIONS),
    help="TFCE: the exact integral, or the presets reproducing FSL randomise (100 fixed steps "
    "of dh = max/100, no dh factor) and nilearn (100 steps per map). [default: exact]",
)
@_option(
    "--tfce-e", type=Setting("tfce_e"), help=f"TFCE extent exponent E. [default: {DEFAULT_TFCE_E}]"
)
@_option(
    "--tfce-h", type=Setting("tfce_h"), help=f"TFCE height exponent H. [default: {DEFAULT_TFCE_H}]"
)
@_option(
    "--tfce-dh",
    type=Setting("tfce_dh"),
    help="TFCE step of --tfce-integration fsl. [default: max of the unpermuted map / 100]",
)
@_option(
    "--perm-scheme",
    type=click.Choice(PERMUTATION_SCHEMES),
    help="flip: sign flipping (symmetric errors; effects that include the mean); permute: "
    "row permutation (exchangeable errors); auto chooses from the contrast. [default: auto]",
)
@_option(
    "--exchangeability-blocks",
    metavar="VARIABLE",
    help="Variable (participants.tsv column or entity, e.g. subject) whose values are "
    "exchangeability blocks: rows are permuted only within a block.",
)
@_option(
    "--whole-blocks/--within-blocks",
    "whole_blocks",
    default=None,
    help="Permute (or flip) whole blocks as units instead of rows within blocks. "
    "[default: within-blocks]",
)
@_option(
    "--report/--no-report",
    default=True,
    show_default=True,
    help="Write the HTML report (OUT_DIR/model-<name>_report.html) and the PNG figures beside "
    "the thresholded maps.",
)
@_option(
    "--write-residuals",
    is_flag=True,
    default=False,
    help="Also write each model's residuals (stat-errorts) and fitted values (stat-predicted) "
    "as 4-D images, one volume per input map (as large as the inputs together).",
)
@_option(
    "--mem-budget",
    type=Size(),
    help="Memory one model may hold, e.g. 4GB, 512MB, 2GiB (model file: Software.bids-group."
    "MemoryBudget). Maps that do not fit in half of it are decoded once into a voxel-tiled "
    "store in the work folder (-w) and fitted tile by tile, with the same results; a model "
    "that needs them only for its OLS fit (no permutations, residuals, coverage or mixed "
    "effects) is fitted as they are decoded instead, with no store (results equal up to "
    "float64 rounding). "
    "Default: the smaller of half the available memory and 4 GB.",
)
@_option(
    "--keep-store",
    is_flag=True,
    help="Keep the tiled data store in the work folder (-w, required) after the run (it is "
    "then built even for a fit that could be streamed); a later run on the same inputs "
    "(paths, sizes, modification times) reuses it.",
)
@_option(
    "--n-jobs",
    "--nprocs",
    "n_jobs",
    type=Setting("n_jobs"),
    default=None,
    help="Threads for reading and writing images, the mixed-effects fit and the permutation "
    "kernels  [default: every CPU this process may use: its affinity, e.g. a SLURM job's "
    "cores, capped by a container's CPU quota]",
)
@_option(
    "--work-dir",
    "-w",
    type=click.Path(path_type=Path),
    help="Scratch folder (matplotlib config and cache; the pybids index, reused by later runs "
    "while the dataset is unchanged), outside OUT_DIR. Default: a private temporary folder, "
    "removed at exit.",
)
@_option(
    "--dask-scheduler",
    metavar="ADDRESS",
    help="Run the permutations as tasks on the workers of this running Dask scheduler (e.g. "
    "tcp://node1:8786); same seed, same results as without. Needs the dask extra.",
)
@_option(
    "--scheduler-file",
    type=click.Path(path_type=Path),
    help="As --dask-scheduler, the scheduler named in this file (written by `dask scheduler "
    "--scheduler-file FILE`, dask-jobqueue or dask-mpi; the HPC convention).",
)
@_option("--overwrite", is_flag=True, help="Replace existing results of the same names in OUT_DIR.")
@_option(
    "--json",
    "json_summary",
    is_flag=True,
    help="Print a JSON summary on stdout instead of the list of written files.",
)
@click.option(
    "-v", "--verbose", count=True, help="More log output on stderr (-v: tracebacks, -vv: debug)."
)
@click.option(
    "-q",
    "--quiet",
    count=True,
    help="Less log output on stderr (-q: warnings only, -qq: errors only).",
)
@click.version_option(__version__, "--version", "-V", prog_name="bids-group")
@click.pass_obj
def cli(state: dict[str, int], **options: Any) -> None:
    """Group-level (second-level) statistics on first-level maps of a BIDS dataset.

    \b
    BIDS_DIR        the dataset (raw with --derivatives, or a derivatives dataset of maps)
    OUT_DIR         where results go (created); never inside a dataset that is read, but
                    <raw BIDS_DIR>/derivatives/bids-group is fine
    ANALYSIS_LEVEL  group (alias: dataset)
    """
    state["verbosity"] = options["verbose"] - options["quiet"]
    _setup_logging(state["verbosity"])
    config = _make_config(options)
    isolate_caches(config.work_dir)  # before matplotlib is imported
    from bids_group import pipeline  # heavy imports only once arguments are valid

    result = pipeline.run(config)
    if config.json_summary:
        click.echo(json.dumps(result.summary, indent=2))
    else:
        for path in result.written:
            click.echo(str(path))


def _make_config(options: dict[str, Any]) -> RunConfig:
    level = options["analysis_level"]
    if level not in ANALYSIS_LEVELS:
        raise UnknownLevelError(
            f"analysis level {level!r} is not supported: bids-group runs the group level "
            "(use 'group' or its alias 'dataset')"
        )
    paths = check_run_paths(
        options["bids_dir"],
        options["out_dir"],
        derivatives=options["derivatives"],
        model=options["model"],
        mask=options["mask"],
        work_dir=options["work_dir"],
        filter_file=click.get_current_context().meta.get(_FILTER_FILE_KEY),
    )
    if options["keep_store"] and paths.work_dir is None:
        raise UsageError(
            "--keep-store keeps the tiled data store in the work folder: give one with -w "
            "(without it the store lives in a temporary folder removed at exit)"
        )
    overrides = {
        "height_control": options["height_control"],
        "alpha": options["alpha"],
        "threshold": options["threshold"],
        "cluster_threshold": options["cluster_threshold"],
        "two_sided": options["two_sided"],
        "connectivity": int(options["connectivity"]) if options["connectivity"] else None,
        "smoothing_fwhm": options["smoothing_fwhm"],
        "ari": options["ari"],
        "ari_thresholds": tuple(options["ari_thresholds"]) or None,
        "ari_alpha": options["ari_alpha"],
        "permutation": _permutation_methods(options["permutation"]),
        "n_perm": options["n_perm"],
        "seed": options["seed"],
        "perm_alpha": options["perm_alpha"],
        "cluster_forming_p": options["cluster_forming_p"],
        "tfce_integration": options["tfce_integration"],
        "tfce_e": options["tfce_e"],
        "tfce_h": options["tfce_h"],
        "tfce_dh": options["tfce_dh"],
        "perm_scheme": options["perm_scheme"],
        "exchangeability_blocks": options["exchangeability_blocks"],
        "whole_blocks": options["whole_blocks"],
    }
    return RunConfig(
        bids_dir=paths.bids_dir,
        out_dir=paths.out_dir,
        model=paths.model,
        participant_labels=tuple(options["participant_labels"]) or None,
        derivatives=paths.derivatives,
        bids_filters=options["bids_filter_file"],
        mask=paths.mask,
        resample=options["resample"],
        target_voxel_size=options["target_voxel_size"],
        min_coverage=options["min_coverage"],
        estimator=options["estimator"],
        variance_from=options["variance_from"],
        adjustment=options["adjustment"],
        variance_groups=options["variance_groups"],
        inference_overrides={k: v for k, v in overrides.items() if v is not None},
        n_jobs=options["n_jobs"] or available_cpus(),
        work_dir=paths.work_dir,
        dask_scheduler=options["dask_scheduler"],
        scheduler_file=options["scheduler_file"],
        input_files=paths.input_files,
        overwrite=options["overwrite"],
        json_summary=options["json_summary"],
        command=shlex.join(["bids-group", *sys.argv[1:]]),
        report=options["report"],
        write_residuals=options["write_residuals"],
        mem_budget=options["mem_budget"],
        keep_store=options["keep_store"],
        progress=options["verbose"] - options["quiet"] >= 0 and sys.stderr.isatty(),
    )


def _permutation_methods(values: tuple[str, ...]) -> tuple[str, ...] | None:
    """``--permutation`` values: None when not given, () for ``none``."""
    if not values:
        return None
    if "none" in values:
        if len(set(values)) > 1:
            raise UsageError("--permutation none cannot be combined with a method")
        return ()
    return tuple(m for m in PERMUTATION_METHODS if m in values)


def _setup_logging(verbosity: int) -> None:
    level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(
        max(verbosity, -2), logging.DEBUG
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("bids-group %(levelname)s: %(message)s"))
    root = logging.getLogger("bids_group")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.handlers[:] = [handler]
    warnings_logger.setLevel(logging.ERROR if verbosity < 1 else logging.WARNING)


_MULTI_VALUE_OPTIONS = (
    "--participant-label",
    "--participant_label",
    "--ari-thresholds",
    "--ari_thresholds",
    "--permutation",
)


def expand_multi_value_options(argv: list[str]) -> list[str]:
    """Accept ``--participant-label 01 02 03`` (argparse ``nargs='+'``, as in fMRIPrep).

    The same for ``--ari-thresholds 3.0 3.5`` and ``--permutation voxel tfce``.

    Click takes one value per occurrence, so every following token that is not an option is
    given its own ``--participant-label``. As with argparse, put such options after the
    positional arguments.

    >>> expand_multi_value_options(["ds", "out", "group", "--participant-label", "01", "02", "-q"])
    ['ds', 'out', 'group', '--participant-label', '01', '--participant-label', '02', '-q']
    """
    expanded: list[str] = []
    option: str | None = None  # the multi-value option whose values we are reading
    has_value = False
    for token in argv:
        if token in _MULTI_VALUE_OPTIONS:
            if option is not None and not has_value:
                expanded.append(option)  # no value: leave it to click to report
            option, has_value = token, False
        elif option is not None and not token.startswith("-"):
            expanded += [option, token]
            has_value = True
        else:
            if option is not None and not has_value:
                expanded.append(option)
            option = None
            expanded.append(token)
    if option is not None and not has_value:
        expanded.append(option)
    return expanded


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bids-group`` console script; returns the exit code."""
    if argv is None:
        argv = sys.argv[1:]
    argv = expand_multi_value_options(list(argv))
    state = {"verbosity": 0}
    previous = interrupts.install()  # SIGINT and SIGTERM, recorded even if swallowed
    saved_logging = _logging_state()
    try:
        cli.main(args=argv, prog_name="bids-group", standalone_mode=False, obj=state)
        return 0
    except click.exceptions.Exit as stop:  # --help, --version
        return stop.exit_code
    except _MissingPath as err:
        click.echo(f"bids-group: error: {err.format_message()}", err=True)
        return err.exit_code
    except click.UsageError as err:
        click.echo(err.ctx.get_usage() if err.ctx else "", err=True)
        click.echo(f"bids-group: error: {err.format_message()}", err=True)
        return UsageError.exit_code
    except click.Abort:
        click.echo("bids-group: interrupted; nothing was written", err=True)
        return EXIT_INTERRUPTED
    except BidsGroupError as err:
        if state["verbosity"] > 0:
            log.exception("details (shown because of -v)")
        click.echo(f"bids-group: error: {err}", err=True)
        return err.exit_code
    except KeyboardInterrupt:
        click.echo("bids-group: interrupted; nothing was written to OUT_DIR", err=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed by a pipeline consumer (e.g. `| head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as err:  # a bug: say so, traceback with -vv
        scratch = scratch_disk_error(err) if isinstance(err, OSError) else None
        if scratch is not None:  # e.g. no space left for numba's compiled kernels
            click.echo(f"bids-group: error: {scratch}", err=True)
            return scratch.exit_code
        if state["verbosity"] > 0:
            log.exception("unexpected error")
        else:
            click.echo(
                f"bids-group: unexpected error ({type(err).__name__}: {err}). This is a bug; "
                "rerun with -v for the traceback and report it.",
                err=True,
            )
        return 1
    finally:
        interrupts.restore(previous)
        _restore_logging(saved_logging)


_LOGGERS = ("bids_group", "py.warnings")


def _logging_state() -> list[tuple[logging.Logger, list[logging.Handler], int, bool]]:
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    return [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]


def _restore_logging(state: list[tuple[logging.Logger, list[logging.Handler], int, bool]]) -> None:
    """Undo :func:`_setup_logging`, so that calling :func:`main` in-process (tests, notebooks)
    leaves the caller's logging as it was."""
    for logger, handlers, level, propagate in state:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
    logging.captureWarnings(False)


def console_main() -> None:
    """The ``bids-group`` console script: the process is ours, so tune its allocator."""
    keep_heap_warm()
    sys.exit(main())
