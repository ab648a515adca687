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
from bids_group.inference.clusters import DEFAULT_CONNECTIVITY
from bids_group.inference.height import DEFAULT_ALPHA as HEIGHT_DEFAULT_ALPHA
from bids_group.spec import InferenceDefaults

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


@dataclass(frozen=True)
class InferenceConfig:
    """Resolved parametric inference settings (no ``None`` left)."""

    height_control: HeightControl = DEFAULT_HEIGHT_CONTROL
    alpha: float = HEIGHT_DEFAULT_ALPHA[DEFAULT_HEIGHT_CONTROL]
    threshold: float | None = None
    cluster_threshold: int = DEFAULT_CLUSTER_THRESHOLD
    two_sided: bool = DEFAULT_TWO_SIDED
    connectivity: int = DEFAULT_CONNECTIVITY
    smoothing_fwhm: float | None = None
    ari: bool = False
    ari_thresholds: tuple[float, ...] = DEFAULT_ARI_THRESHOLDS
    ari_alpha: float = DEFAULT_ARI_ALPHA


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
    """

    bids_dir: Path
    out_dir: Path
    model: Path | None = None
    participant_labels: tuple[str, ...] | None = None
    derivatives: tuple[Path, ...] = ()
    bids_filters: Mapping[str, Any] | None = None
    mask: Path | None = None
    resample: bool = False
    inference_overrides: Mapping[str, Any] = field(default_factory=dict)
    n_jobs: int = 1
    work_dir: Path | None = None
    overwrite: bool = False
    json_summary: bool = False
    command: str = ""
    report: bool = True


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
    if overrides.get("height_control") is not None:
        # The height settings go together: a height control given on the command line replaces
        # the model file's control, alpha and threshold as a unit (its own alpha/threshold, if
        # given, are added back below).
        for key in _HEIGHT_SETTINGS:
            merged.pop(key, None)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    known = set(InferenceConfig.__dataclass_fields__)
    unknown = sorted(set(merged) - known)
    if unknown:
        raise UsageError(f"unknown inference setting(s): {', '.join(unknown)}")
    if "alpha" not in merged:
        method = merged.get("height_control", DEFAULT_HEIGHT_CONTROL)
        merged["alpha"] = HEIGHT_DEFAULT_ALPHA.get(method, HEIGHT_DEFAULT_ALPHA["fpr"])
    if merged.get("ari_alpha") is None:
        # ARI's level: ARIAlpha / --ari-alpha, else the run's family-wise or FDR alpha.
        method = merged.get("height_control", DEFAULT_HEIGHT_CONTROL)
        family = method in _FAMILY_ALPHA_CONTROLS
        merged["ari_alpha"] = merged["alpha"] if family else DEFAULT_ARI_ALPHA
    if merged.get("ari_thresholds") is not None:
        merged["ari_thresholds"] = tuple(sorted({float(t) for t in merged["ari_thresholds"]}))
    config = replace(InferenceConfig(), **merged)
    _check_inference(config)
    return config


def _check_inference(config: InferenceConfig) -> None:
    if config.height_control not in HEIGHT_CONTROLS:
        raise UsageError(
            f"height control {config.height_control!r} is not one of {', '.join(HEIGHT_CONTROLS)}"
        )
    if not 0.0 < config.alpha < 1.0:
        raise UsageError(f"alpha == {config.alpha}, must be > 0 and < 1")
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
    if config.threshold is not None and config.threshold < 0:
        raise UsageError(f"--threshold == {config.threshold}, must be >= 0 (a z value)")
    if config.cluster_threshold < 0:
        raise UsageError(f"--cluster-threshold == {config.cluster_threshold}, must be >= 0 voxels")
    if config.connectivity not in CONNECTIVITIES:
        raise UsageError(
            f"connectivity == {config.connectivity}, must be one of 6 (faces), 18 (edges), "
            "26 (corners)"
        )
    if not config.ari_thresholds or min(config.ari_thresholds) <= 0:
        raise UsageError(
            f"ARI thresholds {list(config.ari_thresholds)} must be z values > 0, "
            "e.g. --ari-thresholds 3.0 3.5"
        )
    if not 0.0 < config.ari_alpha < 1.0:
        raise UsageError(f"ARI alpha == {config.ari_alpha}, must be > 0 and < 1")
    if config.smoothing_fwhm is not None and config.smoothing_fwhm < 0:
        raise UsageError(f"--smoothing-fwhm == {config.smoothing_fwhm}, must be >= 0 mm")
