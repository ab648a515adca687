"""Model specification: read a BIDS Stats Models file (YAML or JSON) into :class:`ModelSpec` s.

One :class:`ModelSpec` per ``Level: Dataset`` node, with the ``Filter`` of the edge into it;
other nodes are not run (a log message says so; see :mod:`bids_group.graph`). Validation
happens here, once, and every message names the file and the field path
(``model.yaml: Nodes[0].Contrasts[1].Weights: ...``); later stages trust the result.

Inference defaults (bids-group extension)
-----------------------------------------
BIDS Stats Models reserves ``Model.Software`` for software-specific options: an object whose keys
are software names. bids-group reads ``Model.Software.bids-group.Inference``::

    Model:
      Type: glm
      X: [1]
      Software:
        bids-group:
          Inference:
            HeightControl: fdr      # fpr | fdr | bonferroni | none
            Alpha: 0.05             # 1e-10 <= Alpha < 1 (with fpr, fdr, bonferroni)
            Threshold: 3.1          # z threshold >= 0 (with HeightControl none)
            ClusterThreshold: 10    # minimum cluster size in voxels, integer >= 0
            TwoSided: false
            Connectivity: 6         # 6 | 18 | 26
            SmoothingFWHM: 8        # mm, 0 to 1000
            ARI: true               # All-Resolution Inference (ARIThresholds, ARIAlpha)
            Permutation: [voxel, cluster, tfce]   # any of them; none = off (default)
            NPermutations: 10000    # relabellings beside the unpermuted data, 1 to 10**7
            Seed: 0                 # integer 0 to 2**32 - 1; same seed, same results
            PermutationAlpha: 0.05  # FWER level of the thresholded permutation maps
            ClusterFormingP: 0.001  # cluster-forming threshold: one-sided p, 0 < p < 0.5
            TFCE: {Integration: exact, E: 0.5, H: 2}   # exact|fsl|nilearn; 0 < E, H <= 10; dh: fsl
            PermutationScheme: auto # auto | flip (sign flips) | permute (rows)
            ExchangeabilityBlocks: subject   # variable whose values are the blocks
            WholeBlocks: false      # permute blocks as units instead of rows within blocks
          MemoryBudget: 4GB         # memory one model may hold (MB, GB, MiB, GiB...)

The accepted keys live in one table, :data:`INFERENCE_KEYS`; add a row there to accept a new one.
Numeric values are checked by :func:`bids_group.validation.check_setting`, as the command line's.
Values from the file are defaults: command-line options override them.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from bids_group.errors import MissingInputError, SpecError
from bids_group.expression import ExpressionError, parse_linear
from bids_group.graph import (
    DatasetNode,
    as_list,
    check_not_draft,
    dataset_nodes,
    level,
    map_filters,
    parse_filter,
)
from bids_group.labels import INTERCEPT, node_label, to_label
from bids_group.memory import parse_size
from bids_group.transformations import nearest, normalise_instruction
from bids_group.validation import MAX_WEIGHT, MIN_WEIGHT, check_setting, read_utf8

log = logging.getLogger(__name__)

StatType = Literal["t", "F"]

#: The key under ``Model.Software`` that holds bids-group's own options.
SOFTWARE_KEY = "bids-group"
#: Written into ``BIDSModelVersion`` of models bids-group creates.
BIDS_MODEL_VERSION = "1.0.0"

#: BIDS entities (pybids names) accepted as ``Input`` filters and suggested for typos in GroupBy.
KNOWN_ENTITIES: tuple[str, ...] = (
    "subject", "session", "task", "acquisition", "ceagent", "tracer", "reconstruction",
    "direction", "run", "modality", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space",
    "split", "recording", "chunk", "atlas", "roi", "label", "segmentation", "resolution",
    "density", "model", "subset", "desc", "contrast", "stat", "suffix", "extension", "datatype",
    "sample", "staining", "tracksys", "node",
)  # fmt: skip
#: Entities whose values are labels: YAML turns ``01`` into 1, which loses the zero.
_LABEL_ENTITIES = frozenset(KNOWN_ENTITIES) - {"run", "echo", "flip", "inv", "mt", "split", "chunk"}

_TOP_KEYS = ("Name", "BIDSModelVersion", "Description", "Input", "Nodes", "Edges")
_NODE_KEYS = (
    "Level",
    "Name",
    "GroupBy",
    "Model",
    "Transformations",
    "Contrasts",
    "DummyContrasts",
    "Description",
)
_MODEL_KEYS = ("Type", "X", "Formula", "HRF", "Options", "Software", "Description")
_CONTRAST_KEYS = ("Name", "ConditionList", "Weights", "Test", "Description")
_DUMMY_KEYS = ("Test", "Contrasts", "Conditions", "Description")
_EDGE_KEYS = ("Source", "Destination", "Filter", "Description")
_SOFTWARE_KEYS = (
    "Inference", "ContrastLabels", "Estimator", "VarianceFrom", "Adjustment", "Filter",
    "MemoryBudget",
    "VarianceGroups",
)  # fmt: skip
#: Model estimators: OLS on the effects (``Type: glm``) or, with the first-level variances
#: (``Type: meta``), a mixed-effects estimator of :mod:`bids_group.mixed_effects`.
ESTIMATORS: tuple[str, ...] = ("ols", "fe", "dl", "hedges", "ml", "reml")
#: Default estimator of ``Type: meta`` (FLAME1's).
DEFAULT_META_ESTIMATOR = "reml"
#: Where a map's first-level variance comes from: its ``stat-variance`` sibling, a
#: ``stat-se`` sibling (squared) or a ``stat-t`` sibling (``(effect / t)^2``, as AFNI 3dMEMA).
VARIANCE_SOURCES: tuple[str, ...] = ("variance", "se", "t")
#: Small-sample adjustments of the mixed-effects t / F (see :mod:`bids_group.mixed_effects`).
ADJUSTMENTS: tuple[str, ...] = ("none", "knapp-hartung", "knapp-hartung-floor")
_HEIGHT_CONTROLS = ("fpr", "fdr", "bonferroni", "none")


@dataclass(frozen=True)
class ContrastSpec:
    """One contrast as written in the model (before it is resolved against the design).

    Attributes
    ----------
    name : str
        The contrast name as written (``Name``).
    condition_list : tuple of str
        Column names the weights refer to (``1`` normalised to ``intercept``). For an expression
        contrast, the names in the expression in order of first appearance (or the
        ``ConditionList`` when one was given).
    weights : ndarray of shape (n_rows, len(condition_list)), float64
        Always 2-D: a t contrast has one row, an F contrast one or more.
    test : {"t", "F"}
    expression : str or None
        Weights as written when they were an expression over column names
        (``group.patient - group.control``); ``weights`` then holds the parsed coefficients.
    description : str or None
        ``Description`` as written.
    """

    name: str
    condition_list: tuple[str, ...]
    weights: np.ndarray
    test: StatType
    expression: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class InferenceDefaults:
    """Inference settings from ``Model.Software.bids-group.Inference``. ``None`` = not set there.

    ``extra`` holds accepted keys (rows of :data:`INFERENCE_KEYS`) that have no attribute of
    their own yet, by snake_case name; None when there are none (so ``vars()`` consumers that
    drop None values see only the attributes).
    """

    height_control: str | None = None
    alpha: float | None = None
    threshold: float | None = None
    cluster_threshold: int | None = None
    two_sided: bool | None = None
    connectivity: int | None = None
    smoothing_fwhm: float | None = None
    ari: bool | None = None
    ari_thresholds: tuple[float, ...] | None = None
    extra: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class EstimationSpec:
    """How the model is fitted: ``Model.Type`` and ``Software.bids-group.Estimator`` etc.

    Attributes
    ----------
    estimator : {"ols", "fe", "dl", "hedges", "ml", "reml"}
        ``ols`` for ``Type: glm``; a mixed-effects estimator (default ``reml``) for
        ``Type: meta``.
    variance_from : {"variance", "se", "t"}
        The sibling map (``stat-<variance_from>``) that gives each effect map's variance.
    adjustment : {"none", "knapp-hartung", "knapp-hartung-floor"}
    variance_groups : str or None
        ``VarianceGroups``: a participants.tsv column (or entity) whose levels get one tau^2
        each (FLAME's variance groups); None for one tau^2.
    """

    estimator: str = "ols"
    variance_from: str = "variance"
    adjustment: str = "none"
    variance_groups: str | None = None

    @property
    def mixed(self) -> bool:
        """True for a mixed-effects (meta) estimator, which needs first-level variances."""
        return self.estimator != "ols"


@dataclass(frozen=True)
class ModelSpec:
    """The validated dataset-level model.

    Attributes
    ----------
    name : str
        Model ``Name``.
    node_name : str
        Name of the dataset-level node (used for the output folder ``node-<node_name>``).
    input_filters : mapping
        ``Input`` entity filters (pybids entity name -> str or list of str/int).
    group_by : tuple of str
        ``GroupBy`` of the node, e.g. ``("contrast",)`` or ``()``.
    x : tuple of str
        Design columns as written (``1`` is normalised to ``"intercept"``); entries may be
        fnmatch wildcards (``subject.*``) expanded against the variables by the design step.
    transformations : tuple of mapping
        ``Transformations.Instructions`` in order, normalised (``Name``, ``Input``/``Output``
        as lists, options as written).
    contrasts : tuple of ContrastSpec
    dummy_contrasts : tuple of str or None
        X entries (possibly wildcards) that get an automatic one-column t contrast each; None
        when DummyContrasts is absent or false.
    inference : InferenceDefaults
    raw : mapping
        The whole file as parsed, for provenance.
    source : Path or None
        The file it came from (None for the built-in default).
    description : str or None
        Model ``Description``.
    bids_model_version : str
    edge_filter : mapping of str to tuple of str
        ``Filter`` of the edge into the node (contrast *names* of the upstream node, or other
        entities), as written; recorded in the resolved model as
        ``Model.Software.bids-group.Filter`` (the upstream node is not written there).
    filter_where : str or None
        Where that Filter was read, for messages.
    """

    name: str
    node_name: str
    input_filters: Mapping[str, Any]
    group_by: tuple[str, ...]
    x: tuple[str, ...]
    transformations: tuple[Mapping[str, Any], ...]
    contrasts: tuple[ContrastSpec, ...]
    dummy_contrasts: tuple[str, ...] | None
    inference: InferenceDefaults = field(default_factory=InferenceDefaults)
    estimation: EstimationSpec = field(default_factory=EstimationSpec)
    #: ``Software.bids-group.MemoryBudget`` in bytes (None: not set; ``--mem-budget`` wins).
    memory_budget: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)
    source: Path | None = None
    description: str | None = None
    bids_model_version: str = BIDS_MODEL_VERSION
    edge_filter: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    filter_where: str | None = None

    @property
    def map_filters(self) -> dict[str, Any]:
        """Entity filters of this node's maps: ``Input`` narrowed by the edge ``Filter``."""
        return map_filters(self.input_filters, self.edge_filter, self.filter_where)


# ----------------------------------------------------------------------------------------------
# Small validation helpers. `where` is always "<file>: <field path>".


def _fail(where: str, message: str) -> SpecError:
    return SpecError(f"{where}: {message}")


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _check_keys(
    obj: Mapping[str, Any], allowed: Sequence[str], required: Sequence[str], where: str
) -> None:
    for key in obj:
        if key not in allowed:
            raise _fail(
                where,
                f"unknown key {key!r}{nearest(str(key), allowed)}; "
                f"allowed keys: {', '.join(allowed)}",
            )
    for key in required:
        if key not in obj:
            raise _fail(where, f"missing required key {key!r}")


def _mapping(value: Any, where: str, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(where, f"{what} must be a mapping, got {_type_name(value)} {value!r}")
    return value


def _string(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"{what} must be a non-empty string, got {value!r}")
    return value


def _column_name(value: Any, where: str) -> str:
    """A design column reference: a string or the intercept ``1``."""
    if isinstance(value, bool):
        raise _fail(where, f"expected a column name or 1, got {value!r}")
    if value == 1 or value == "1":
        return INTERCEPT
    if isinstance(value, int | float) and value == 0:
        raise _fail(where, "0 is not supported: leave out 1 to fit a model without intercept")
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"expected a column name or 1, got {value!r}")
    return value


def _column_list(value: Any, where: str, what: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _fail(where, f"{what} must be a list of column names, got {value!r}")
    names = tuple(_column_name(v, f"{where}[{i}]") for i, v in enumerate(value))
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise _fail(where, f"{what} lists {', '.join(map(repr, duplicates))} more than once")
    return names


# ----------------------------------------------------------------------------------------------
# Inference block


def _setting(field_name: str) -> Callable[[Any, str], Any]:
    """Validator of a numeric setting: :func:`bids_group.validation.check_setting`, the same
    type, finiteness and range checks (and message) as the command line's, naming the file and
    the key: ``model.yaml: ...Inference.Alpha == nan, must be a finite number > 0 and < 1``."""

    def check(value: Any, where: str) -> Any:
        return check_setting(value, field_name, where, error=SpecError)

    return check


def _boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, f"must be true or false, got {value!r}")
    return value


def _height_control(value: Any, where: str) -> str:
    if value is None:
        return "none"  # YAML `none`/`null` both mean "no correction"
    text = str(value).lower()
    if text not in _HEIGHT_CONTROLS:
        raise _fail(
            where,
            f"must be one of {', '.join(_HEIGHT_CONTROLS)}, got {value!r}"
            f"{nearest(text, _HEIGHT_CONTROLS)}",
        )
    return text


def _connectivity(value: Any, where: str) -> int:
    if isinstance(value, bool) or value not in (6, 18, 26):
        raise _fail(where, f"must be 6 (faces), 18 (edges) or 26 (corners), got {value!r}")
    return int(value)


def _thresholds(value: Any, where: str) -> tuple[float, ...]:
    """A z threshold or a non-empty list of them, each finite and > 0."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise _fail(where, "must list at least one z threshold, e.g. [3.0, 3.5]")
    positive = _setting("ari_thresholds")
    return tuple(sorted({positive(v, f"{where}[{i}]") for i, v in enumerate(values)}))


#: Permutation inference: methods, TFCE integrations and exchangeability schemes accepted by the
#: model file and the command line (the CLI and config import them from here).
PERMUTATION_METHODS: tuple[str, ...] = ("voxel", "cluster", "tfce")
TFCE_INTEGRATIONS: tuple[str, ...] = ("exact", "fsl", "nilearn")
PERMUTATION_SCHEMES: tuple[str, ...] = ("auto", "flip", "permute")


def _choice(options: tuple[str, ...]) -> Callable[[Any, str], str]:
    def check(value: Any, where: str) -> str:
        text = str(value).lower() if isinstance(value, str) else value
        if text not in options:
            hint = nearest(str(value), options) if isinstance(value, str) else ""
            raise _fail(where, f"must be one of {', '.join(options)}, got {value!r}{hint}")
        return text

    return check


def _permutation_methods(value: Any, where: str) -> tuple[str, ...]:
    """A method, a list of methods, or none/null/[] (no permutation inference)."""
    if value is None or value == "none" or value == []:
        return ()
    values = value if isinstance(value, list) else [value]
    check = _choice(PERMUTATION_METHODS)
    chosen = {check(v, f"{where}[{i}]") for i, v in enumerate(values)}
    return tuple(m for m in PERMUTATION_METHODS if m in chosen)


def cluster_forming_p(value: Any, where: str) -> float:
    """The cluster-forming threshold: an uncorrected one-sided p-value, 0 < p < 0.5.

    A value >= 1 is a height (z or t), not a p-value; it is refused with the conversion rather
    than silently reinterpreted.
    """
    return float(check_setting(value, "cluster_forming_p", where, error=SpecError))


#: Keys of the TFCE mapping: CamelCase key -> validator.
_TFCE_KEYS: dict[str, Callable[[Any, str], Any]] = {
    "Integration": _choice(TFCE_INTEGRATIONS),
    "E": _setting("tfce_e"),
    "H": _setting("tfce_h"),
    "dh": _setting("tfce_dh"),
}


def _tfce_settings(value: Any, where: str) -> dict[str, Any]:
    block = _mapping(value, where, "TFCE")
    _check_keys(block, tuple(_TFCE_KEYS), (), where)
    settings = {key: _TFCE_KEYS[key](v, f"{where}.{key}") for key, v in block.items()}
    if "dh" in settings and settings.get("Integration") != "fsl":
        raise _fail(
            where,
            "dh is the fixed step of Integration: fsl; the exact integral has no step and the "
            "nilearn preset uses 100 steps per map (set Integration: fsl or drop dh)",
        )
    return settings


def _label_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"must name a variable (e.g. subject), got {value!r}")
    return value.strip()


#: Accepted keys of ``Software.bids-group.Inference``: CamelCase key -> (snake_case name,
#: validator). Names that are not InferenceDefaults attributes go to ``InferenceDefaults.extra``.
INFERENCE_KEYS: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
    "HeightControl": ("height_control", _height_control),
    "Alpha": ("alpha", _setting("alpha")),
    "Threshold": ("threshold", _setting("threshold")),
    "ClusterThreshold": ("cluster_threshold", _setting("cluster_threshold")),
    "TwoSided": ("two_sided", _boolean),
    "Connectivity": ("connectivity", _connectivity),
    "SmoothingFWHM": ("smoothing_fwhm", _setting("smoothing_fwhm")),
    "ARI": ("ari", _boolean),
    "ARIThresholds": ("ari_thresholds", _thresholds),
    "ARIAlpha": ("ari_alpha", _setting("ari_alpha")),
    "Permutation": ("permutation", _permutation_methods),
    "NPermutations": ("n_perm", _setting("n_perm")),
    "Seed": ("seed", _setting("seed")),
    "PermutationAlpha": ("perm_alpha", _setting("perm_alpha")),
    "ClusterFormingP": ("cluster_forming_p", cluster_forming_p),
    "TFCE": ("tfce", _tfce_settings),
    "PermutationScheme": ("perm_scheme", _choice(PERMUTATION_SCHEMES)),
    "ExchangeabilityBlocks": ("exchangeability_blocks", _label_name),
    "WholeBlocks": ("whole_blocks", _boolean),
}


def _parse_inference(block: Any, where: str) -> InferenceDefaults:
    block = _mapping(block, where, "Inference")
    _check_keys(block, tuple(INFERENCE_KEYS), (), where)
    attributes = {f.name for f in fields(InferenceDefaults)}
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in block.items():
        name, check = INFERENCE_KEYS[key]
        (values if name in attributes else extra)[name] = check(value, f"{where}.{key}")
    # Contradictions are errors, not warnings: the user would get another analysis.
    control = values.get("height_control")
    if values.get("threshold") is not None and control not in (None, "none"):
        raise _fail(
            where,
            f"Threshold is a z threshold for HeightControl none; with "
            f"HeightControl {control} set Alpha instead (or set HeightControl: none)",
        )
    if values.get("alpha") is not None and control == "none":
        raise _fail(
            where,
            "Alpha has no effect with HeightControl none: set Threshold "
            "(a z value) or choose fpr, fdr or bonferroni",
        )
    return InferenceDefaults(**values, extra=extra or None)


def _parse_software(software: Any, where: str) -> InferenceDefaults:
    software = _mapping(software, where, "Software")
    inference = InferenceDefaults()
    for key, block in software.items():
        squashed = str(key).lower().replace("_", "").replace("-", "").replace(" ", "")
        if key != SOFTWARE_KEY and squashed == SOFTWARE_KEY.replace("-", ""):
            raise _fail(where, f"unknown software key {key!r} (did you mean {SOFTWARE_KEY!r}?)")
        if key != SOFTWARE_KEY:
            log.info("%s: ignoring options for other software %r", where, key)
            continue
        sub = f"{where}.{key}"
        block = _mapping(block, sub, SOFTWARE_KEY)
        _check_keys(block, _SOFTWARE_KEYS, (), sub)
        if "Inference" in block:
            inference = _parse_inference(block["Inference"], f"{sub}.Inference")
        labels = block.get("ContrastLabels", {})
        if not isinstance(labels, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise _fail(f"{sub}.ContrastLabels", "must map contrast names to labels (strings)")
    return inference


# ----------------------------------------------------------------------------------------------
# Contrasts


def _test(value: Any, where: str) -> StatType:
    if value == "pass":
        raise _fail(where, "Test 'pass' is not supported at the dataset level: use 't' or 'F'")
    if value not in ("t", "F"):
        hint = {"T": " (did you mean 't'?)", "f": " (did you mean 'F'?)"}.get(str(value), "")
        raise _fail(where, f"Test must be 't' or 'F', got {value!r}{hint}")
    return value


def _weight_value(value: Any, where: str) -> float:
    """One numeric weight: a number or a fraction string such as ``"-1/3"``."""
    if isinstance(value, bool):
        raise _fail(where, f"weights must be numbers, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise _fail(where, f"weights must be finite, got {value!r}")
        return float(value)
    if isinstance(value, str):
        try:
            form = parse_linear(value)
        except ExpressionError as err:
            raise _fail(where, f"cannot read weight {value!r}: {err}") from err
        if not form.coefs:
            return form.constant
    raise _fail(where, f"weights must be numbers (or fractions such as '1/3'), got {value!r}")


def _expression_rows(
    texts: Sequence[str], condition_list: tuple[str, ...] | None, where: str
) -> tuple[tuple[str, ...], np.ndarray]:
    """Parse expression rows into (names, weights of shape (n_rows, n_names))."""
    forms = []
    for i, text in enumerate(texts):
        sub = where if len(texts) == 1 else f"{where}[{i}]"
        try:
            form = parse_linear(text)
        except ExpressionError as err:
            raise _fail(sub, f"cannot read the contrast expression: {err}") from err
        if form.constant != 0:
            raise _fail(
                sub,
                f"{text!r} has a constant term ({form.constant:g}); a contrast is a "
                "weighted sum of columns only (write 1*intercept for the intercept)",
            )
        coefs = {(INTERCEPT if k.lower() == INTERCEPT else k): v for k, v in form.coefs.items()}
        if not any(coefs.values()):
            raise _fail(sub, f"{text!r} has all weights zero")
        forms.append(coefs)
    names: list[str] = list(condition_list or ())
    for coefs in forms:
        for name in coefs:
            if name not in names:
                if condition_list:
                    raise _fail(
                        where,
                        f"the expression uses {name!r}, which is not in "
                        f"ConditionList {list(condition_list)}",
                    )
                names.append(name)
    weights = np.array([[coefs.get(n, 0.0) for n in names] for coefs in forms], dtype=float)
    return tuple(names), weights


def _parse_contrast(raw: Any, where: str) -> ContrastSpec:
    raw = _mapping(raw, where, "each contrast")
    _check_keys(raw, _CONTRAST_KEYS, ("Name", "Weights", "Test"), where)
    name = _string(raw["Name"], f"{where}.Name", "Name")
    test = _test(raw["Test"], f"{where}.Test")
    description = raw.get("Description")
    weights_raw = raw["Weights"]
    conditions = (
        _column_list(raw["ConditionList"], f"{where}.ConditionList", "ConditionList")
        if "ConditionList" in raw
        else None
    )
    expression: str | None = None
    if isinstance(weights_raw, str) or (
        isinstance(weights_raw, list)
        and weights_raw
        and all(isinstance(w, str) for w in weights_raw)
        and any(_is_expression(w) for w in weights_raw)
    ):
        texts = [weights_raw] if isinstance(weights_raw, str) else list(weights_raw)
        names, weights = _expression_rows(texts, conditions, f"{where}.Weights")
        expression = "; ".join(texts)
    else:
        if conditions is None:
            raise _fail(
                where,
                "missing 'ConditionList' (needed unless Weights is an "
                "expression such as 'group.patient - group.control')",
            )
        names = conditions
        weights = _numeric_weights(weights_raw, len(names), f"{where}.Weights")
    if test == "t" and weights.shape[0] > 1:
        raise _fail(
            f"{where}.Weights",
            f"a t contrast takes one row of weights, got "
            f"{weights.shape[0]} rows; use Test: F for a multi-row contrast",
        )
    for r, row in enumerate(weights):
        if not row.any():
            sub = f"{where}.Weights" + (f"[{r}]" if weights.shape[0] > 1 else "")
            raise _fail(sub, "all weights are zero")
    _check_weight_scale(weights, name, f"{where}.Weights")
    return ContrastSpec(name, names, weights, test, expression, description)


def _check_weight_scale(weights: np.ndarray, name: str, where: str) -> None:
    """Refuse weights that are not finite, or whose size is absurd (1e-320, 1e308).

    Such weights are refused rather than normalised. Normalising would leave t, z and p
    unchanged, but not the effect and variance maps, which are written (float32) with the
    weights in their sidecars: a weight of 1e308 makes the effect overflow to inf and 1e-320
    (a denormal) makes it 0 and t = 0/0, while rescaling them silently would write maps of
    another contrast than the one in the file. Weights that size are typos, so the user is asked.
    """
    magnitude = np.abs(weights)
    bad = ~np.isfinite(weights) | (
        (magnitude != 0) & ((magnitude < MIN_WEIGHT) | (magnitude > MAX_WEIGHT))
    )
    if bad.any():
        value = float(weights[bad][0])
        raise _fail(
            where,
            f"contrast {name!r} has the weight {value!r}; a weight must be 0 or between "
            f"{MIN_WEIGHT:g} and {MAX_WEIGHT:g} in absolute value (t, z and p do not depend on "
            "the scale of the weights, but the effect and variance maps would "
            "overflow or vanish): rescale the weights, e.g. to 1 and -1",
        )


def _is_expression(text: str) -> bool:
    try:
        return bool(parse_linear(text).coefs)
    except ExpressionError:
        return True  # let the expression parser report the syntax error


def _numeric_weights(value: Any, n_conditions: int, where: str) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise _fail(where, f"must be a list of numbers (or a list of lists for F), got {value!r}")
    rows = value if all(isinstance(v, list) for v in value) else [value]
    if any(isinstance(v, list) for v in value) and rows is not value:
        raise _fail(
            where,
            "mixes numbers and lists: use a list of numbers (t) or a list of "
            "equal-length lists (F)",
        )
    matrix = []
    for r, row in enumerate(rows):
        sub = where if len(rows) == 1 else f"{where}[{r}]"
        if len(row) != n_conditions:
            raise _fail(
                sub,
                f"has {len(row)} weight(s) but ConditionList has {n_conditions} "
                "column(s); give one weight per column",
            )
        matrix.append([_weight_value(v, f"{sub}[{c}]") for c, v in enumerate(row)])
    return np.array(matrix, dtype=float).reshape(len(rows), n_conditions)


def _parse_dummy(raw: Any, x: tuple[str, ...], where: str) -> tuple[str, ...] | None:
    if raw is None or raw is False:
        return None
    if raw is True:
        return x
    raw = _mapping(raw, where, "DummyContrasts (true, false or a mapping)")
    _check_keys(raw, _DUMMY_KEYS, (), where)
    if "Contrasts" in raw and "Conditions" in raw:
        raise _fail(where, "give either 'Contrasts' or 'Conditions', not both")
    if raw.get("Test", "t") != "t":
        _test(raw["Test"], f"{where}.Test")
        raise _fail(
            f"{where}.Test",
            "DummyContrasts supports only 't'; write an F contrast under Contrasts instead",
        )
    key = "Contrasts" if "Contrasts" in raw else "Conditions"
    if key not in raw:
        return x
    names = _column_list(raw[key], f"{where}.{key}", key)
    plain_x = not any(set("*?[") & set(c) for c in x)
    for i, name in enumerate(names):
        if plain_x and name not in x and not set("*?[") & set(name):
            raise _fail(
                f"{where}.{key}[{i}]", f"{name!r} is not in Model.X {list(x)}{nearest(name, x)}"
            )
    return names


# ----------------------------------------------------------------------------------------------
# Nodes and the whole file


def _parse_input(raw: Any, where: str) -> dict[str, Any]:
    raw = _mapping(raw, where, "Input")
    filters: dict[str, Any] = {}
    for key, value in raw.items():
        sub = f"{where}.{key}"
        if key not in KNOWN_ENTITIES:
            raise _fail(
                where,
                f"unknown entity {key!r}{nearest(str(key), KNOWN_ENTITIES)}; "
                f"use pybids entity names ({', '.join(KNOWN_ENTITIES[:8])}, ...)",
            )
        values = value if isinstance(value, list) else as_list(value, sub)
        if not isinstance(values, list) or not values:
            raise _fail(sub, "an empty list would select nothing")
        for item in values:
            if isinstance(item, bool) or not isinstance(item, str | int):
                raise _fail(sub, f"values must be strings (or lists of strings), got {item!r}")
            if isinstance(item, int) and key in _LABEL_ENTITIES:
                raise _fail(
                    sub,
                    f"{item!r} was read as a number; quote it (e.g. '0{item}' or "
                    f"'{item}') so the label keeps its leading zeros",
                )
        filters[key] = list(values) if isinstance(value, list) else value
    return filters


def _parse_transformations(raw: Any, where: str) -> tuple[dict[str, Any], ...]:
    if isinstance(raw, Mapping):
        _check_keys(raw, ("Transformer", "Instructions", "Description"), ("Instructions",), where)
        transformer = raw.get("Transformer", "pybids-transforms-v1")
        if transformer != "pybids-transforms-v1":
            raise _fail(
                f"{where}.Transformer",
                f"only 'pybids-transforms-v1' is supported, got {transformer!r}",
            )
        instructions = raw["Instructions"]
        where = f"{where}.Instructions"
    else:
        instructions = raw
    if not isinstance(instructions, list):
        raise _fail(where, f"must be a list of instructions, got {_type_name(instructions)}")
    return tuple(
        normalise_instruction(inst, f"{where}[{i}]") for i, inst in enumerate(instructions)
    )


def _parse_group_by(raw: Any, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(v, str) and v for v in raw):
        raise _fail(
            where, f"GroupBy must be a list of entity names, got {raw!r} (e.g. [contrast] or [])"
        )
    for i, name in enumerate(raw):
        if name not in KNOWN_ENTITIES:
            hint = nearest(name, KNOWN_ENTITIES)
            if hint:  # a typo of an entity, not a metadata column
                raise _fail(f"{where}[{i}]", f"unknown entity {name!r}{hint}")
    if len(set(raw)) != len(raw):
        raise _fail(where, f"lists an entity twice: {raw!r}")
    return tuple(raw)


def _parse_model(raw: Any, where: str) -> tuple[tuple[str, ...], InferenceDefaults, EstimationSpec]:
    raw = _mapping(raw, where, "Model")
    _check_keys(raw, _MODEL_KEYS, ("Type", "X"), where)
    model_type = str(raw["Type"]).lower()
    if model_type not in ("glm", "meta"):
        raise _fail(
            f"{where}.Type",
            f"{raw['Type']!r} is not supported: use glm (OLS on the effect maps) or meta "
            "(mixed effects with the first-level variances)",
        )
    if "Formula" in raw:
        raise _fail(
            f"{where}.Formula",
            "formulas are not supported: list the columns in X and "
            "build them with Transformations (Factor, Product, ...)",
        )
    if raw.get("Options"):
        options = _mapping(raw["Options"], f"{where}.Options", "Options")
        keys = [k for k in options if k != "Description"]
        if keys:
            raise _fail(
                f"{where}.Options",
                f"{', '.join(keys)} not supported at the dataset level by bids-group; remove them",
            )
    if "HRF" in raw:
        log.info("%s.HRF: ignored at the dataset level (no time series)", where)
    x = _column_list(as_list(raw["X"], f"{where}.X"), f"{where}.X", "X")
    if not x:
        raise _fail(f"{where}.X", "X is empty: list at least one column (1 for the intercept)")
    inference = _parse_software(raw.get("Software", {}), f"{where}.Software")
    estimation = _parse_estimation(model_type, raw.get("Software", {}), f"{where}.Software")
    return x, inference, estimation


def _parse_estimation(model_type: str, software: Any, where: str) -> EstimationSpec:
    """``Type`` plus ``Software.bids-group.{Estimator, VarianceFrom, Adjustment,
    VarianceGroups}``."""
    block = software.get(SOFTWARE_KEY, {}) if isinstance(software, Mapping) else {}
    where = f"{where}.{SOFTWARE_KEY}"
    default = DEFAULT_META_ESTIMATOR if model_type == "meta" else "ols"
    values = {}
    for key, name, allowed in (
        ("Estimator", "estimator", ESTIMATORS),
        ("VarianceFrom", "variance_from", VARIANCE_SOURCES),
        ("Adjustment", "adjustment", ADJUSTMENTS),
    ):
        if key in block:
            value = str(block[key]).lower()
            if value not in allowed:
                raise _fail(f"{where}.{key}", f"{block[key]!r} is not one of {', '.join(allowed)}")
            values[name] = value
    estimator = values.get("estimator", default)
    if model_type == "glm" and estimator != "ols":
        raise _fail(
            f"{where}.Estimator",
            f"{estimator} is a mixed-effects estimator: set Model.Type to meta (Type glm is OLS)",
        )
    if model_type == "meta" and estimator == "ols":
        raise _fail(f"{where}.Estimator", "ols ignores the variances: use Type glm for OLS")
    groups = block.get("VarianceGroups")
    if groups is not None and (not isinstance(groups, str) or not groups.strip()):
        raise _fail(f"{where}.VarianceGroups", f"{groups!r} is not a column name")
    if estimator == "ols" and (set(values) - {"estimator"} or groups is not None):
        raise _fail(where, "VarianceFrom, Adjustment and VarianceGroups only apply to Type meta")
    return EstimationSpec(
        estimator=estimator,
        variance_from=values.get("variance_from", "variance"),
        adjustment=values.get("adjustment", "none"),
        variance_groups=groups.strip() if groups is not None else None,
    )


def _parse_memory_budget(software: Any, where: str) -> int | None:
    """``Software.bids-group.MemoryBudget``: a size such as ``4GB`` or ``512MiB``, in bytes."""
    block = software.get(SOFTWARE_KEY, {}) if isinstance(software, Mapping) else {}
    if not isinstance(block, Mapping) or "MemoryBudget" not in block:
        return None
    where = f"{where}.{SOFTWARE_KEY}.MemoryBudget"
    try:
        size = parse_size(block["MemoryBudget"])
    except ValueError as err:
        raise _fail(where, str(err)) from err
    return int(check_setting(size, "mem_budget", where, error=SpecError))


def _check_nodes(nodes: Any, where: str) -> list[Mapping[str, Any]]:
    """Nodes is a non-empty list of mappings with a valid Level and a unique Name each."""
    if not isinstance(nodes, list) or not nodes:
        raise _fail(where, "Nodes must be a non-empty list of nodes")
    names: dict[str, int] = {}
    for i, node in enumerate(nodes):
        node = _mapping(node, f"{where}[{i}]", "each node")
        if "Level" not in node:
            raise _fail(f"{where}[{i}]", "missing required key 'Level'")
        level(node["Level"], f"{where}[{i}].Level")
        name = _string(node.get("Name"), f"{where}[{i}].Name", "Name")
        if name in names:
            raise _fail(f"{where}[{i}].Name", f"{name!r} also names Nodes[{names[name]}]")
        names[name] = i
    return nodes


def _check_edges(edges: Any, nodes: list[Mapping[str, Any]], where: str) -> list[Mapping]:
    if not isinstance(edges, list):
        raise _fail(where, f"Edges must be a list, got {_type_name(edges)}")
    names = [str(n.get("Name")) for n in nodes]
    for i, edge in enumerate(edges):
        edge = _mapping(edge, f"{where}[{i}]", "each edge")
        _check_keys(edge, _EDGE_KEYS, ("Source", "Destination"), f"{where}[{i}]")
        for key in ("Source", "Destination"):
            if edge[key] not in names:
                raise _fail(
                    f"{where}[{i}].{key}",
                    f"no node named {edge[key]!r}"
                    f"{nearest(str(edge[key]), names)}; nodes: {', '.join(names)}",
                )
    return edges


def parse_specs(data: Any, *, source: Path | str | None = None) -> tuple[ModelSpec, ...]:
    """Validate an already-parsed model (a dict from YAML/JSON): one :class:`ModelSpec` per
    ``Level: Dataset`` node, in the order of ``Nodes``.

    Parameters
    ----------
    data : mapping
        The model file's content.
    source : Path or str, optional
        Where it came from; its name prefixes every message.

    Raises
    ------
    SpecError
        Anything wrong with the model, with the field path; what bids-group cannot honour
        (see :mod:`bids_group.graph`); Dataset nodes whose inference settings or output folders
        would clash.
    """
    fname = Path(source).name if source is not None else "model"
    if not isinstance(data, Mapping):
        raise SpecError(
            f"{fname}: the top level must be a mapping (Name, BIDSModelVersion, "
            f"Nodes, ...), got {_type_name(data)}"
        )
    check_not_draft(data, fname)
    _check_keys(data, _TOP_KEYS, ("Name", "BIDSModelVersion", "Nodes"), fname)
    name = _string(data["Name"], f"{fname}: Name", "Name")
    version = data["BIDSModelVersion"]
    if not isinstance(version, str | int | float) or isinstance(version, bool):
        raise _fail(f"{fname}: BIDSModelVersion", f"must be a version string, got {version!r}")
    filters = _parse_input(data.get("Input", {}), f"{fname}: Input")
    nodes = _check_nodes(data["Nodes"], f"{fname}: Nodes")
    edges = _check_edges(data.get("Edges", []), nodes, f"{fname}: Edges")
    common = {
        "name": name,
        "input_filters": filters,
        "raw": data,
        "source": Path(source) if source is not None else None,
        "description": data.get("Description"),
        "bids_model_version": str(version),
    }
    specs = tuple(_parse_node(d, fname, common) for d in dataset_nodes(nodes, edges, fname))
    _check_nodes_agree(specs, fname)
    return specs


def parse_spec(data: Any, *, source: Path | str | None = None) -> ModelSpec:
    """:func:`parse_specs` of a model with one Dataset node (a SpecError names them otherwise)."""
    specs = parse_specs(data, source=source)
    if len(specs) > 1:
        fname = Path(source).name if source is not None else "model"
        raise _fail(
            f"{fname}: Nodes",
            f"{len(specs)} Dataset nodes ({', '.join(s.node_name for s in specs)}); "
            "read them with parse_specs / load_specs",
        )
    return specs[0]


def _parse_node(dataset: DatasetNode, fname: str, common: Mapping[str, Any]) -> ModelSpec:
    """One Dataset node (and the Filter of the edge into it) as a :class:`ModelSpec`."""
    node = dataset.node
    where = f"{fname}: Nodes[{dataset.index}]"
    _check_keys(node, _NODE_KEYS, ("Level", "Name", "GroupBy", "Model"), where)
    node_name = _string(node["Name"], f"{where}.Name", "Name")
    if any(c in node_name for c in "/\\") or not any(
        c.isascii() and c.isalnum() for c in node_name
    ):
        raise _fail(f"{where}.Name", f"{node_name!r} cannot name an output folder (node-<label>)")
    group_by = _parse_group_by(as_list(node["GroupBy"], f"{where}.GroupBy"), f"{where}.GroupBy")
    x, inference, estimation = _parse_model(node["Model"], f"{where}.Model")
    memory_budget = _parse_memory_budget(node["Model"].get("Software"), f"{where}.Model.Software")
    transformations: tuple[dict[str, Any], ...] = ()
    if node.get("Transformations") is not None:
        transformations = _parse_transformations(
            node["Transformations"], f"{where}.Transformations"
        )
    raw_contrasts = node.get("Contrasts") or []
    if not isinstance(raw_contrasts, list):
        raise _fail(
            f"{where}.Contrasts", f"must be a list of contrasts, got {_type_name(raw_contrasts)}"
        )
    contrasts = tuple(
        _parse_contrast(c, f"{where}.Contrasts[{i}]") for i, c in enumerate(raw_contrasts)
    )
    dummy = _parse_dummy(node.get("DummyContrasts"), x, f"{where}.DummyContrasts")
    _check_contrast_names(contrasts, dummy, x, where)
    edge_filter, filter_where = _node_filter(dataset, node["Model"], f"{where}.Model")
    spec = ModelSpec(
        node_name=node_name,
        group_by=group_by,
        x=x,
        transformations=transformations,
        contrasts=contrasts,
        dummy_contrasts=dummy,
        inference=inference,
        estimation=estimation,
        edge_filter=edge_filter,
        filter_where=filter_where,
        **common,
        memory_budget=memory_budget,
    )
    spec.map_filters  # noqa: B018 - checks Input and the Filter together, now
    return spec


def _node_filter(
    dataset: DatasetNode, model: Mapping[str, Any], where: str
) -> tuple[Mapping[str, tuple[str, ...]], str | None]:
    """The edge Filter, or the one a resolved model recorded in ``Software.bids-group.Filter``."""
    software = model.get("Software") or {}
    block = software.get(SOFTWARE_KEY) if isinstance(software, Mapping) else None
    if not isinstance(block, Mapping) or "Filter" not in block:
        return dataset.edge_filter, dataset.filter_where
    sub = f"{where}.Software.{SOFTWARE_KEY}.Filter"
    if dataset.edge_filter:
        raise _fail(sub, f"the node also receives the Filter of {dataset.filter_where}; keep one")
    return parse_filter(block["Filter"], sub), sub


def _check_nodes_agree(specs: Sequence[ModelSpec], fname: str) -> None:
    """Dataset nodes of one run need distinct output folders and one set of inference settings
    (the report and the --json summary state one)."""
    folders: dict[str, str] = {}
    for spec in specs:
        label = node_label(spec.node_name)
        if label in folders:
            raise _fail(
                f"{fname}: Nodes",
                f"Dataset nodes {folders[label]!r} and {spec.node_name!r} both write to "
                f"node-{label}/; rename one",
            )
        folders[label] = spec.node_name
    first = specs[0]
    for spec in specs[1:]:
        if spec.inference != first.inference:
            raise _fail(
                f"{fname}: Nodes",
                f"Dataset nodes {first.node_name!r} and {spec.node_name!r} have different "
                f"Software.{SOFTWARE_KEY}.Inference settings; a run has one set: give them the "
                "same, or run the nodes from separate model files",
            )


def _check_contrast_names(
    contrasts: tuple[ContrastSpec, ...], dummy: tuple[str, ...] | None, x: tuple[str, ...],
    where: str,
) -> None:  # fmt: skip
    if not contrasts and not dummy:
        raise _fail(where, "the node defines no contrast: add Contrasts or DummyContrasts: true")
    seen: dict[str, str] = {}
    plain_dummy = [d for d in (dummy or ()) if not set("*?[") & set(d)]
    for i, contrast in enumerate(contrasts):
        if contrast.name in seen or contrast.name in plain_dummy:
            raise _fail(
                f"{where}.Contrasts[{i}].Name",
                f"contrast name {contrast.name!r} is "
                "used twice (DummyContrasts are named after their column)",
            )
        seen[contrast.name] = f"Contrasts[{i}]"
    labels: dict[str, str] = {}
    for name in [c.name for c in contrasts] + plain_dummy:
        label = to_label(name)
        if label in labels:
            raise _fail(
                where,
                f"contrasts {labels[label]!r} and {name!r} both get the file "
                f"label {label!r}; rename one",
            )
        labels[label] = name


def _load_text(path: Path) -> Any:
    text = read_utf8(path, SpecError)
    if not text.strip():
        raise SpecError(f"{path.name}: the file is empty")
    if text.lstrip().startswith(("{", "[")):
        # JSON first: JSON indented with tabs is valid JSON but not valid YAML.
        try:
            return json.loads(text, object_pairs_hook=_no_duplicates_json(path))
        except json.JSONDecodeError as err:
            raise SpecError(f"{path.name}: JSON syntax error at line {err.lineno}, column "
                            f"{err.colno}: {err.msg}") from err  # fmt: skip
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path.name}: YAML syntax error{at}: {err.problem or err}") from err
    except yaml.reader.ReaderError as err:  # a control character: no mark, a 2-line message
        line = text.count("\n", 0, err.position) + 1
        column = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        raise SpecError(
            f"{path.name}: line {line}, column {column}: the character {_codepoint(err.character)} "
            "is not allowed in YAML (control characters other than tab and newline); remove it"
        ) from err
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())  # one line
        raise SpecError(f"{path.name}: YAML syntax error: {detail}") from err


def _codepoint(character: Any) -> str:
    """``U+001F`` for a character or its code (yaml gives either)."""
    code = character if isinstance(character, int) else ord(str(character)[:1] or "\0")
    return f"U+{code:04X}"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):  # noqa: D401
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping
)


def _no_duplicates_json(path: Path) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise SpecError(f"{path.name}: duplicate key(s) {', '.join(map(repr, dupes))}")
        return dict(pairs)

    return hook


def load_specs(path: Path) -> tuple[ModelSpec, ...]:
    """Read and validate a model file (YAML, or JSON, which YAML also reads): one
    :class:`ModelSpec` per Dataset node.

    Parameters
    ----------
    path : Path
        The model file.

    Returns
    -------
    tuple of ModelSpec

    Raises
    ------
    MissingInputError
        The file does not exist (exit 66).
    SpecError
        Syntax error (with line and column), or any invalid field (with its path) (exit 64).
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"model file {str(path)!r} does not exist")
    if not path.is_file():
        raise MissingInputError(f"model file {str(path)!r} is not a file")
    data = _load_text(path)
    specs = parse_specs(data, source=path)
    for spec in specs:
        log.info(
            "model %r: node %r, GroupBy %s, X %s, %d contrast(s)%s%s",
            spec.name,
            spec.node_name,
            list(spec.group_by),
            list(spec.x),
            len(spec.contrasts),
            " + dummy contrasts" if spec.dummy_contrasts else "",
            f", maps filtered by {dict(spec.edge_filter)}" if spec.edge_filter else "",
        )
    return specs


def load_spec(path: Path) -> ModelSpec:
    """:func:`load_specs` of a model file with one Dataset node (a SpecError otherwise)."""
    specs = load_specs(path)
    if len(specs) > 1:
        raise _fail(
            f"{Path(path).name}: Nodes",
            f"{len(specs)} Dataset nodes ({', '.join(s.node_name for s in specs)}); "
            "read them with load_specs",
        )
    return specs[0]


DEFAULT_MODEL: dict[str, Any] = {
    "Name": "default",
    "BIDSModelVersion": BIDS_MODEL_VERSION,
    "Description": "One-sample t-test of every input contrast (bids-group default).",
    "Nodes": [
        {
            "Level": "Dataset",
            "Name": "dataset",
            "GroupBy": ["contrast"],
            "Model": {"Type": "glm", "X": [1]},
            "DummyContrasts": {"Test": "t"},
        }
    ],
}


def default_spec() -> ModelSpec:
    """One-sample t-test of every input contrast (GroupBy contrast, X = [1], DummyContrasts t).

    Examples
    --------
    >>> spec = default_spec()
    >>> spec.group_by, spec.x, spec.dummy_contrasts
    (('contrast',), ('intercept',), ('intercept',))
    """
    return parse_spec(json.loads(json.dumps(DEFAULT_MODEL)), source=None)


def _x_out(name: str) -> Any:
    return 1 if name == INTERCEPT else name


def _weights_out(weights: np.ndarray) -> list[Any]:
    rows = [[float(w) for w in row] for row in weights]
    return rows[0] if len(rows) == 1 else rows


def resolved_model_dict(spec: ModelSpec, *, x_columns: Sequence[str] | None = None) -> dict:
    """The model as run, as a BIDS Stats Models dict (JSON-serialisable).

    Contrasts are written with explicit ``ConditionList`` and numeric ``Weights`` (an expression
    is kept in ``Description``), and ``Software.bids-group.ContrastLabels`` records the file label
    of every contrast. :func:`parse_spec` reads the result back to an equivalent spec.

    Parameters
    ----------
    spec : ModelSpec
    x_columns : sequence of str, optional
        The design columns after wildcard expansion; written as ``X`` when given.
    """
    return resolved_models_dict([spec], x_columns=[x_columns])


def resolved_models_dict(
    specs: Sequence[ModelSpec], *, x_columns: Sequence[Sequence[str] | None] | None = None
) -> dict:
    """:func:`resolved_model_dict` of the Dataset nodes of one model file, run together.

    Only the Dataset nodes are written (the nodes upstream were not run by bids-group); the
    Filter of the edge into a node is kept as ``Model.Software.bids-group.Filter``, which
    :func:`parse_specs` reads as that edge's. ``x_columns``: one entry (or None) per spec.
    """
    columns = list(x_columns) if x_columns is not None else [None] * len(specs)
    spec = specs[0]
    out: dict[str, Any] = {"Name": spec.name, "BIDSModelVersion": spec.bids_model_version}
    if spec.description:
        out["Description"] = spec.description
    if spec.input_filters:
        # The specification's Input is a Filter, entity -> *list* of values (bsmschema rejects a
        # scalar, which model files may use, as fitlins accepts): write every value as a list.
        out["Input"] = {k: (list(v) if isinstance(v, list | tuple) else [v])
                        for k, v in spec.input_filters.items()}  # fmt: skip
    out["Nodes"] = [_resolved_node(s, c) for s, c in zip(specs, columns, strict=True)]
    return json.loads(json.dumps(out))  # proves it is JSON-serialisable, and deep-copies


def _resolved_node(spec: ModelSpec, x_columns: Sequence[str] | None) -> dict[str, Any]:
    """One Dataset node as run (see :func:`resolved_model_dict`)."""
    contrasts = []
    for c in spec.contrasts:
        entry: dict[str, Any] = {
            "Name": c.name,
            "ConditionList": [_x_out(n) for n in c.condition_list],
            "Weights": _weights_out(c.weights),
            "Test": c.test,
        }
        description = c.description or (
            f"Weights from the expression: {c.expression}" if c.expression else None
        )
        if description:
            entry["Description"] = description
        contrasts.append(entry)
    software: dict[str, Any] = {}
    inference = {
        key: getattr(spec.inference, name, (spec.inference.extra or {}).get(name))
        for key, (name, _) in INFERENCE_KEYS.items()
    }
    inference = {k: v for k, v in inference.items() if v is not None}
    if inference:
        software["Inference"] = inference
    dummies = list(spec.dummy_contrasts or ())
    if x_columns is not None:  # expand wildcards the way the design step does
        dummies = [c for c in x_columns if any(fnmatch.fnmatchcase(c, d) for d in dummies)]
    labels = {c.name: to_label(c.name) for c in spec.contrasts}
    labels.update({d: to_label(d) for d in dummies if not set("*?[") & set(d)})
    if labels:
        software["ContrastLabels"] = labels
    if spec.estimation.mixed:
        software["Estimator"] = spec.estimation.estimator
        software["VarianceFrom"] = spec.estimation.variance_from
        software["Adjustment"] = spec.estimation.adjustment
        if spec.estimation.variance_groups:
            software["VarianceGroups"] = spec.estimation.variance_groups
    if spec.edge_filter:
        software["Filter"] = {k: list(v) for k, v in spec.edge_filter.items()}
    model: dict[str, Any] = {
        "Type": "meta" if spec.estimation.mixed else "glm",
        "X": [_x_out(n) for n in (x_columns if x_columns is not None else spec.x)],
    }
    if software:
        model["Software"] = {SOFTWARE_KEY: software}
    node: dict[str, Any] = {
        "Level": "Dataset",
        "Name": spec.node_name,
        "GroupBy": list(spec.group_by),
    }
    if spec.transformations:
        node["Transformations"] = {
            "Transformer": "pybids-transforms-v1",
            "Instructions": [dict(t) for t in spec.transformations],
        }
    node["Model"] = model
    if contrasts:
        node["Contrasts"] = contrasts
    if dummies:
        node["DummyContrasts"] = {"Test": "t", "Contrasts": [_x_out(d) for d in dummies]}
    return node
