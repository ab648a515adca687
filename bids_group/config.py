"""Run configuration: every option of a run, normalised once, with the defaults in one place.

The CLI builds a :class:`RunConfig`; the model file's inference block fills what the command line
left unset (command line wins); :func:`bids_group.pipeline.run` consumes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from bids_group.errors import UsageError
from bids_group.inference.defaults import DEFAULT_ALPHA as HEIGHT_DEFAULT_ALPHA
from bids_group.inference.defaults import DEFAULT_CONNECTIVITY
from bids_group.spec import (
    PERMUTATION_METHODS,
    PERMUTATION_SCHEMES,
    TFCE_INTEGRATIONS,
    EstimationSpec,
    InferenceDefaults,
)
from bids_group.validation import SETTINGS, check_setting

HeightControl = Literal["fpr", "fdr", "bonferroni", "none"]

#: Defaults shared by the CLI help, the model-file extension block and the README.
DEFAULT_HEIGHT_CONTROL: HeightControl = "fpr"
DEFAULT_CLUSTER_THRESHOLD = 0
DEFAULT_TWO_SIDED = True
HEIGHT_CONTROLS: tuple[str, ...] = ("fpr", "fdr", "bonferroni", "none")
CONNECTIVITIES: tuple[int, ...] = (6, 18, 26)
ANALYSIS_LEVELS: tuple[str, ...] = ("group", "dataset")
#: ARI: cluster-forming z thresholds (nilearn's cluster_level_inference default) and the level
#: used when neither ARIAlpha nor a family-wise / FDR alpha of the run gives one.
DEFAULT_ARI_THRESHOLDS: tuple[float, ...] = (3.0,)
DEFAULT_ARI_ALPHA = 0.05
#: Height controls whose alpha is a level for the whole family, so ARI may reuse it (fpr's
#: alpha is a per-voxel p threshold, 0.001 by default: not a sensible confidence level).
_FAMILY_ALPHA_CONTROLS = ("fdr", "bonferroni")
_HEIGHT_SETTINGS = ("height_control", "alpha", "threshold")
#: Permutation inference defaults (FSL randomise's TFCE E/H; nilearn's 10,000 permutations).
DEFAULT_N_PERM = 10_000
DEFAULT_SEED = 0
DEFAULT_PERM_ALPHA = 0.05
DEFAULT_CLUSTER_FORMING_P = 0.001
DEFAULT_TFCE_E = 0.5
DEFAULT_TFCE_H = 2.0
#: The model file's TFCE mapping -> InferenceConfig fields.
_TFCE_FIELDS = {"Integration": "tfce_integration", "E": "tfce_e", "H": "tfce_h", "dh": "tfce_dh"}
#: Settings that only matter for some permutation method: given on the command line without
#: that method, they would silently do nothing, so they are refused.
_NEEDS_METHOD: dict[str, tuple[str, ...]] = {
    "n_perm": PERMUTATION_METHODS,
    "seed": PERMUTATION_METHODS,
    "perm_alpha": PERMUTATION_METHODS,
    "perm_scheme": PERMUTATION_METHODS,
    "exchangeability_blocks": PERMUTATION_METHODS,
    "whole_blocks": PERMUTATION_METHODS,
    "cluster_forming_p": ("cluster",),
    "tfce_integration": ("tfce",),
    "tfce_e": ("tfce",),
    "tfce_h": ("tfce",),
    "tfce_dh": ("tfce",),
}


@dataclass(frozen=True)
class InferenceConfig:
    """Resolved parametric inference settings (no ``None`` left)."""

    height_control: HeightControl = DEFAULT_HEIGHT_CONTROL
    #: The error rate of the height control; None with ``height_control == "none"``, whose
    #: threshold is a z (``threshold``) chosen without an error rate (the p it corresponds to
    #: is each thresholded map's ``PValueThreshold``), so the JSON summary says null where the
    #: report says "—".
    alpha: float | None = HEIGHT_DEFAULT_ALPHA[DEFAULT_HEIGHT_CONTROL]
    threshold: float | None = None
    cluster_threshold: int = DEFAULT_CLUSTER_THRESHOLD
    two_sided: bool = DEFAULT_TWO_SIDED
    connectivity: int = DEFAULT_CONNECTIVITY
    smoothing_fwhm: float | None = None
    ari: bool = False
    ari_thresholds: tuple[float, ...] = DEFAULT_ARI_THRESHOLDS
    ari_alpha: float = DEFAULT_ARI_ALPHA
    permutation: tuple[str, ...] = ()
    n_perm: int = DEFAULT_N_PERM
    seed: int = DEFAULT_SEED
    perm_alpha: float = DEFAULT_PERM_ALPHA
    cluster_forming_p: float = DEFAULT_CLUSTER_FORMING_P
    tfce_integration: str = "exact"
    tfce_e: float = DEFAULT_TFCE_E
    tfce_h: float = DEFAULT_TFCE_H
    tfce_dh: float | None = None
    perm_scheme: str = "auto"
    exchangeability_blocks: str | None = None
    whole_blocks: bool = False


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, validated.

    Attributes
    ----------
    bids_dir, out_dir : Path
        Resolved absolute paths.
    model : Path or None
        Model file; None = the default one-sample model.
    inference_overrides : mapping
        Inference settings given on the command line (field name -> value); they override the
        model file's extension block, which overrides the defaults.
    report : bool
        Write the HTML report and the figures beside the maps (``--no-report`` skips them).
    input_files : tuple of Path
        Files read besides the datasets (model, mask, filter file): no output may replace them.
    """

    bids_dir: Path
    out_dir: Path
    model: Path | None = None
    participant_labels: tuple[str, ...] | None = None
    derivatives: tuple[Path, ...] = ()
    bids_filters: Mapping[str, Any] | None = None
    mask: Path | None = None
    resample: bool = False
    #: Resample every map to an isotropic grid of this voxel size (mm) before fitting.
    target_voxel_size: float | None = None
    #: Per-voxel missing data: the fraction (<= 1) or number (> 1) of maps a voxel needs.
    min_coverage: float | None = None
    inference_overrides: Mapping[str, Any] = field(default_factory=dict)
    n_jobs: int = 1
    work_dir: Path | None = None
    #: Memory budget in bytes (--mem-budget); None: the model file's, else the default.
    mem_budget: int | None = None
    #: Keep the tiled data store in the work folder after the run (--keep-store).
    keep_store: bool = False
    #: A running Dask scheduler for the permutations (address, or the file that names it).
    dask_scheduler: str | None = None
    scheduler_file: Path | None = None
    overwrite: bool = False
    json_summary: bool = False
    command: str = ""
    report: bool = True
    progress: bool = False
    #: Also write the residuals and fitted values of every model as 4-D images.
    write_residuals: bool = False
    #: Command-line overrides of the model's estimation settings (None: the model file's).
    estimator: str | None = None
    variance_from: str | None = None
    adjustment: str | None = None
    variance_groups: str | None = None
    input_files: tuple[Path, ...] = ()


def resolve_inference(
    overrides: Mapping[str, Any], from_model: InferenceDefaults | None
) -> InferenceConfig:
    """Merge defaults < model-file block < command line, then check the combination.

    Raises
    ------
    UsageError
        For contradictions (``--threshold`` with a corrected height control, ``none`` without a
        threshold) and out-of-range values.
    """
    merged: dict[str, Any] = {}
    if from_model is not None:
        merged.update({k: v for k, v in vars(from_model).items() if v is not None and k != "extra"})
        # Accepted keys without an attribute of their own (e.g. ARIAlpha -> ari_alpha).
        merged.update({k: v for k, v in (from_model.extra or {}).items() if v is not None})
        for key, value in (merged.pop("tfce", None) or {}).items():
            merged[_TFCE_FIELDS[key]] = value
    if overrides.get("height_control") is not None:
        # The height settings go together: a height control given on the command line replaces
        # the model file's control, alpha and threshold as a unit (its own alpha/threshold, if
        # given, are added back below).
        for key in _HEIGHT_SETTINGS:
            merged.pop(key, None)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    _check_values(merged)
    known = set(InferenceConfig.__dataclass_fields__)
    unknown = sorted(set(merged) - known)
    if unknown:
        raise UsageError(f"unknown inference setting(s): {', '.join(unknown)}")
    method = merged.get("height_control", DEFAULT_HEIGHT_CONTROL)
    if method == "none":
        if merged.get("alpha") is not None:
            raise UsageError(
                f"--alpha {merged['alpha']:g} has no effect with height control none (a z "
                "threshold given with --threshold): drop --alpha or choose fpr, fdr or bonferroni"
            )
        merged["alpha"] = None
    elif "alpha" not in merged:
        merged["alpha"] = HEIGHT_DEFAULT_ALPHA.get(method, HEIGHT_DEFAULT_ALPHA["fpr"])
    if merged.get("ari_alpha") is None:
        # ARI's level: ARIAlpha / --ari-alpha, else the run's family-wise or FDR alpha.
        family = method in _FAMILY_ALPHA_CONTROLS
        merged["ari_alpha"] = merged["alpha"] if family else DEFAULT_ARI_ALPHA
    if merged.get("ari_thresholds") is not None:
        merged["ari_thresholds"] = tuple(sorted({float(t) for t in merged["ari_thresholds"]}))
    if merged.get("permutation") is not None:
        merged["permutation"] = tuple(m for m in PERMUTATION_METHODS if m in merged["permutation"])
    config = replace(InferenceConfig(), **merged)
    _check_inference(config)
    given = {k for k, v in overrides.items() if v is not None}
    _check_permutation(config, given=given)
    _check_ari(config, given=given)
    return config


def _check_ari(config: InferenceConfig, given: set[str]) -> None:
    """--ari-alpha / --ari-thresholds without ARI would silently do nothing: refused."""
    for name in sorted(given & {"ari_alpha", "ari_thresholds"}):
        if not config.ari:
            option = "--" + name.replace("_", "-")
            raise UsageError(
                f"{option} only applies to All-Resolution Inference, which this run does not "
                "do; add --ari (or ARI: true in the model's inference block)"
            )


def _check_values(settings: Mapping[str, Any]) -> None:
    """Type, finiteness and range of every numeric setting (:data:`~bids_group.validation.
    SETTINGS`), named as the command-line option. The model file's values were checked, under
    their file and key, when it was read; this catches the command line and API callers."""
    for name, value in settings.items():
        if name not in SETTINGS or value is None:
            continue
        if name == "ari_thresholds":
            for item in value if isinstance(value, list | tuple) else [value]:
                check_setting(item, name)
        else:
            check_setting(value, name)


def _check_inference(config: InferenceConfig) -> None:
    if config.height_control not in HEIGHT_CONTROLS:
        raise UsageError(
            f"height control {config.height_control!r} is not one of {', '.join(HEIGHT_CONTROLS)}"
        )
    if config.height_control == "none" and config.threshold is None:
        raise UsageError(
            "--height-control none needs --threshold (a z value), e.g. --threshold 3.1"
        )
    if config.height_control != "none" and config.threshold is not None:
        raise UsageError(
            f"--threshold {config.threshold} contradicts --height-control "
            f"{config.height_control}: the threshold is derived from --alpha. "
            "Use --height-control none to give a z threshold yourself."
        )
    if config.connectivity not in CONNECTIVITIES:
        raise UsageError(
            f"connectivity == {config.connectivity}, must be one of 6 (faces), 18 (edges), "
            "26 (corners)"
        )
    if not config.ari_thresholds:
        raise UsageError(
            f"ARI thresholds {list(config.ari_thresholds)} must be z values > 0, "
            "e.g. --ari-thresholds 3.0 3.5"
        )


def _check_permutation(config: InferenceConfig, given: set[str]) -> None:
    """Permutation settings: ranges, and no command-line setting that would do nothing."""
    unknown = sorted(set(config.permutation) - set(PERMUTATION_METHODS))
    if unknown:
        raise UsageError(
            f"permutation method(s) {', '.join(unknown)} unknown; "
            f"use {', '.join(PERMUTATION_METHODS)}"
        )
    for name in sorted(given & set(_NEEDS_METHOD)):
        methods = _NEEDS_METHOD[name]
        if not set(methods) & set(config.permutation):
            option = "--" + name.replace("_", "-")
            needed = " or ".join(methods)
            raise UsageError(
                f"{option} only applies to permutation inference with {needed}, which this run "
                f"does not do; add --permutation {methods[0]} (or Permutation: [{methods[0]}] "
                "in the model's inference block)"
            )
    if config.tfce_integration not in TFCE_INTEGRATIONS:
        raise UsageError(
            f"--tfce-integration {config.tfce_integration!r} is not one of "
            f"{', '.join(TFCE_INTEGRATIONS)}"
        )
    if config.tfce_dh is not None and config.tfce_integration != "fsl":
        raise UsageError(
            f"--tfce-dh {config.tfce_dh} is the fixed step of --tfce-integration fsl; the exact "
            "integral has no step and the nilearn preset uses 100 steps per map"
        )
    if config.perm_scheme not in PERMUTATION_SCHEMES:
        raise UsageError(
            f"--perm-scheme {config.perm_scheme!r} is not one of {', '.join(PERMUTATION_SCHEMES)}"
        )
    if config.whole_blocks and config.exchangeability_blocks is None:
        raise UsageError(
            "--whole-blocks needs exchangeability blocks: --exchangeability-blocks subject "
            "(or ExchangeabilityBlocks in the model's inference block)"
        )


def resolve_estimation(from_model: EstimationSpec, config: RunConfig) -> EstimationSpec:
    """The model file's estimation settings, overridden by the command line.

    Raises
    ------
    UsageError
        ``--variance-from``, ``--adjustment`` or ``--variance-groups`` with the OLS estimator
        (they would do nothing).
    """
    estimator = config.estimator or from_model.estimator
    if estimator == "ols" and (config.variance_from or config.adjustment or config.variance_groups):
        option = "--variance-from" if config.variance_from else (
            "--adjustment" if config.adjustment else "--variance-groups"
        )  # fmt: skip
        raise UsageError(
            f"{option} applies to mixed-effects estimators only; add --estimator reml (or "
            "another of fe, dl, hedges, ml), or set Model.Type: meta in the model file"
        )
    return EstimationSpec(
        estimator=estimator,
        variance_from=config.variance_from or from_model.variance_from,
        adjustment=config.adjustment or from_model.adjustment,
        variance_groups=config.variance_groups or from_model.variance_groups,
    )
