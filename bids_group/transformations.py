"""Variable transformations (``pybids-transforms-v1`` names and options) on a one-row-per-map table.

Each instruction is a mapping such as ``{"Name": "Factor", "Input": ["group"]}``. Option names and
defaults follow pybids (``bids.modeling.transformations``), written in the CamelCase of BIDS Stats
Models: ``Scale`` takes ``Demean``, ``Rescale`` and ``ReplaceNa``; ``Factor`` takes
``Constraint``, ``RefLevel`` and ``Sep``; ``Threshold`` takes ``Threshold``, ``Binarize``,
``Above`` and ``Signed``; and so on. ``Output`` renames results (required by ``Copy``, ``Rename``,
``Product``, ``Sum``, ``And``, ``Or`` and ``Constant``); without it a transformation replaces its
input column, as in pybids.

Two differences from pybids, both to avoid silently changing the analysis:

* ``Factor`` on a column with missing values gives NaN (not 0) in every level column for those
  rows, so the design check later names the subjects instead of coding them as a reference group.
* ``Constant`` (``Output``, ``Value`` = 1) is a bids-group addition, handy for a second intercept-
  like column in multi-group designs.

Validation of instruction *structure* (:func:`normalise_instruction`) happens when the model file
is read; :func:`apply_transformations` then checks columns against the data.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from bids_group.errors import DataError, SpecError
from bids_group.inputs import explain_missing_spellings

log = logging.getLogger(__name__)

_COMMON_KEYS = ("Name", "Input", "Output", "Description")
_WILDCARD_CHARS = set("*?[")


@dataclass(frozen=True)
class _Transform:
    """How one named transformation is called and checked."""

    func: Callable[..., pd.DataFrame]
    options: Mapping[str, Any]  # CamelCase option -> default
    output_required: bool = False
    output_allowed: bool = True
    many_to_one: bool = False  # Input list -> one Output (Product, Sum, And, Or)
    needs_input: bool = True


# ----------------------------------------------------------------------------------------------
# Helpers


def nearest(name: str, candidates: Sequence[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest candidate, or ``""`` when none is close."""
    lower = {c.lower(): c for c in candidates}
    if name.lower() in lower and lower[name.lower()] != name:
        return f" (did you mean {lower[name.lower()]!r}?)"
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _available(columns: Sequence[str]) -> str:
    return ", ".join(repr(c) for c in columns) if len(columns) else "none"


def expand_names(patterns: Sequence[str], columns: Sequence[str], *, where: str) -> list[str]:
    """Resolve column names and fnmatch wildcards (``subject.*``) against ``columns``.

    Raises SpecError naming the unknown column, the nearest one and the available ones.
    """
    resolved: list[str] = []
    for pattern in patterns:
        if _WILDCARD_CHARS & set(pattern):
            matches = [c for c in columns if fnmatch.fnmatchcase(c, pattern)]
            if not matches:
                raise SpecError(
                    f"{where}: no column matches {pattern!r}; available columns: "
                    f"{_available(columns)}"
                )
            resolved.extend(m for m in matches if m not in resolved)
        elif pattern in columns:
            if pattern not in resolved:
                resolved.append(pattern)
        else:
            raise SpecError(
                f"{where}: no column named {pattern!r}{nearest(pattern, list(columns))}; "
                f"available columns: {_available(columns)}"
            )
    return resolved


def _numeric(data: pd.DataFrame, column: str, where: str) -> pd.Series:
    series = data[column]
    if pd.api.types.is_bool_dtype(series):
        return series.astype(float)
    if not pd.api.types.is_numeric_dtype(series):
        rows = data["subject"] if "subject" in data.columns else pd.Series(data.index, data.index)
        missing = explain_missing_spellings(series, column, rows)
        if missing:
            raise DataError(f"{where}: {missing}")
        examples = ", ".join(repr(v) for v in series.dropna().unique()[:3])
        raise DataError(
            f"{where}: column {column!r} is not numeric (values such as {examples}); "
            f"use Factor to turn a categorical column into indicator columns"
        )
    return series.astype(float)


def _level_name(level: Any) -> str:
    """pybids' ``str(level)``, but integer-valued floats print as integers (1.0 -> '1')."""
    if isinstance(level, float | np.floating) and float(level).is_integer():
        return str(int(level))
    return str(level)


# ----------------------------------------------------------------------------------------------
# Transformations: each takes (data, inputs, outputs, where, **options) and returns a new frame.


def _put(data: pd.DataFrame, inputs: list[str], outputs: list[str], values: list[pd.Series]):
    out = data.copy()
    for name, series in zip(outputs or inputs, values, strict=True):
        out[name] = series
    return out


def _factor(data, inputs, outputs, where, *, Constraint, RefLevel, Sep):  # noqa: N803
    if Constraint not in ("none", "drop_one", "mean_zero"):
        raise SpecError(
            f"{where}.Constraint: must be 'none', 'drop_one' or 'mean_zero', got {Constraint!r}"
        )
    out = data.copy()
    for column in inputs:
        series = data[column]
        missing = series.isna()
        levels = sorted(series[~missing].unique())
        names = [_level_name(level) for level in levels]
        _warn_missing_levels(series, column, data, where)
        ref = None
        if Constraint != "none" and len(levels) > 1:
            ref = names[0] if RefLevel is None else str(RefLevel)
            if ref not in names:
                raise SpecError(
                    f"{where}.RefLevel: {RefLevel!r} is not a level of {column!r} "
                    f"(levels: {', '.join(names)})"
                )
        position = out.columns.get_loc(column)
        out = out.drop(columns=column)
        as_names = series.map(lambda v: None if pd.isna(v) else _level_name(v))
        for name in names:
            if name == ref:
                continue
            values = (as_names == name).astype(float)
            if Constraint == "mean_zero":
                values[as_names == ref] = -1.0 / (len(levels) - 1)
            values[missing] = np.nan
            out.insert(position, f"{column}{Sep}{name}", values)
            position += 1
    return out


#: Factor levels that are almost surely a missing value spelled otherwise than BIDS's n/a (not
#: "none" or "-", which can be real categories).
_MISSING_LEVELS = frozenset({"na", "nan", "n/a", "null", "nil", "#n/a", "<na>", "nat", "missing"})


def _warn_missing_levels(series: pd.Series, column: str, data: pd.DataFrame, where: str) -> None:
    """A level like 'NA' becomes a group of its own: say so (a warning: it may be a real one)."""
    text = series.dropna().astype(str).str.strip()
    odd = text[text.str.lower().isin(_MISSING_LEVELS)]
    if odd.empty:
        return
    rows = data["subject"] if "subject" in data.columns else pd.Series(data.index, data.index)
    who = ", ".join(dict.fromkeys(f"sub-{rows[i]}" for i in odd.index))
    log.warning(
        "%s: Factor(%s) makes a level of %s (%s); BIDS spells a missing value n/a, which "
        "bids-group refuses to fill in. If it is a real category, ignore this warning",
        where, column, ", ".join(repr(v) for v in dict.fromkeys(odd)), who,
    )  # fmt: skip


def _demean(data, inputs, outputs, where):
    values = [_numeric(data, c, where) for c in inputs]
    return _put(data, inputs, outputs, [v - v.mean() for v in values])


def _scale(data, inputs, outputs, where, *, Demean, Rescale, ReplaceNa):  # noqa: N803
    if ReplaceNa not in (None, "before", "after"):
        raise SpecError(f"{where}.ReplaceNa: must be null, 'before' or 'after', got {ReplaceNa!r}")
    results = []
    for column in inputs:
        values = _numeric(data, column, where)
        if values.nunique() == 1 and ReplaceNa in (None, "before"):
            raise DataError(
                f"{where}: cannot scale {column!r}: it has the constant value "
                f"{values.dropna().iloc[0]!r} for every selected map"
            )
        if ReplaceNa == "before":
            values = values.fillna(0.0)
        if Demean:
            values = values - values.mean()
        if Rescale:
            values = values / values.std()  # ddof=1, as pandas and pybids
        if ReplaceNa == "after":
            values = values.fillna(0.0)
        results.append(values)
    return _put(data, inputs, outputs, results)


def _copy(data, inputs, outputs, where):
    return _put(data, inputs, outputs, [data[c] for c in inputs])


def _rename(data, inputs, outputs, where):
    out = data.rename(columns=dict(zip(inputs, outputs, strict=True)))
    return out


def _product(data, inputs, outputs, where):
    values = pd.concat([_numeric(data, c, where) for c in inputs], axis=1)
    return _put(data, [], outputs, [values.prod(axis=1, skipna=False)])


def _sum(data, inputs, outputs, where, *, Weights):  # noqa: N803
    values = pd.concat([_numeric(data, c, where) for c in inputs], axis=1)
    weights = np.ones(len(inputs)) if Weights is None else np.asarray(Weights, dtype=float)
    if weights.shape != (len(inputs),):
        raise SpecError(
            f"{where}.Weights: needs one weight per input ({len(inputs)}), got {len(weights)}"
        )
    return _put(data, [], outputs, [(values * weights).sum(axis=1, skipna=False)])


def _threshold(data, inputs, outputs, where, *, Threshold, Binarize, Above, Signed):  # noqa: N803
    results = []
    for column in inputs:
        values = _numeric(data, column, where)
        cut = float(Threshold)
        if not Signed:
            cut, values = abs(cut), values.abs()
        keep = values >= cut if Above else values <= cut
        result = values.where(keep | values.isna(), 0.0)
        if Binarize:
            result = result.where(~keep, 1.0)
        results.append(result)
    return _put(data, inputs, outputs, results)


def _not(data, inputs, outputs, where):
    return _put(
        data, inputs, outputs, [(_numeric(data, c, where) == 0).astype(float) for c in inputs]
    )


def _and(data, inputs, outputs, where):
    values = pd.concat([_numeric(data, c, where) != 0 for c in inputs], axis=1)
    return _put(data, [], outputs, [values.all(axis=1).astype(float)])


def _or(data, inputs, outputs, where):
    values = pd.concat([_numeric(data, c, where) != 0 for c in inputs], axis=1)
    return _put(data, [], outputs, [values.any(axis=1).astype(float)])


def _replace(data, inputs, outputs, where, *, Replace, Attribute):  # noqa: N803
    if Attribute != "value":
        raise SpecError(f"{where}.Attribute: only 'value' applies to map-level variables")
    if not isinstance(Replace, Mapping):
        raise SpecError(f"{where}.Replace: must be a mapping old value -> new value")
    return _put(data, inputs, outputs, [data[c].replace(dict(Replace)) for c in inputs])


def _orthogonalize(data, inputs, outputs, where, *, Other):  # noqa: N803
    others = expand_names(
        Other if isinstance(Other, list) else [Other], list(data.columns), where=f"{where}.Other"
    )
    basis = np.column_stack([np.ones(len(data))] + [_numeric(data, c, where) for c in others])
    results = []
    for column in inputs:
        y = _numeric(data, column, where).to_numpy()
        coefs = np.linalg.lstsq(basis, y, rcond=None)[0]
        # as pybids: remove the projection on the other columns, keep the mean
        results.append(pd.Series(y - basis[:, 1:] @ coefs[1:], index=data.index))
    return _put(data, inputs, outputs, results)


def _delete(data, inputs, outputs, where):
    return data.drop(columns=inputs)


def _select(data, inputs, outputs, where):
    return data[inputs].copy()


def _constant(data, inputs, outputs, where, *, Value):  # noqa: N803
    return _put(data, [], outputs, [pd.Series(float(Value), index=data.index)])


#: Name -> how to call it. Add an entry here to support a new transformation.
TRANSFORMS: dict[str, _Transform] = {
    "Factor": _Transform(
        _factor, {"Constraint": "none", "RefLevel": None, "Sep": "."}, output_allowed=False
    ),
    "Demean": _Transform(_demean, {}),
    "Scale": _Transform(_scale, {"Demean": True, "Rescale": True, "ReplaceNa": None}),
    "Rename": _Transform(_rename, {}, output_required=True),
    "Copy": _Transform(_copy, {}, output_required=True),
    "Product": _Transform(_product, {}, output_required=True, many_to_one=True),
    "Sum": _Transform(_sum, {"Weights": None}, output_required=True, many_to_one=True),
    "Threshold": _Transform(
        _threshold, {"Threshold": 0.0, "Binarize": False, "Above": True, "Signed": True}
    ),
    "Not": _Transform(_not, {}),
    "And": _Transform(_and, {}, output_required=True, many_to_one=True),
    "Or": _Transform(_or, {}, output_required=True, many_to_one=True),
    "Replace": _Transform(_replace, {"Replace": None, "Attribute": "value"}),
    "Orthogonalize": _Transform(_orthogonalize, {"Other": None}),
    "Delete": _Transform(_delete, {}, output_allowed=False),
    "Select": _Transform(_select, {}, output_allowed=False),
    "Constant": _Transform(
        _constant, {"Value": 1.0}, output_required=True, many_to_one=True, needs_input=False
    ),
}
_ALIASES = {"And_": "And", "Or_": "Or"}
#: pybids transformations that make no sense on one row per map.
_UNSUPPORTED = {
    "Convolve": "it convolves time series with an HRF (first level only)",
    "Lag": "it shifts time series (first level only)",
    "ToDense": "it resamples time series (first level only)",
    "Resample": "it resamples time series (first level only)",
    "Assign": "it assigns event onsets/durations (first level only)",
    "Split": "it splits event variables (first level only)",
    "Filter": "it drops rows; select maps with the model's Input instead",
    "DropNA": "it drops rows; select maps with the model's Input instead",
    "Group": "variable groups are not supported",
}
_REQUIRED_OPTIONS = {("Replace", "Replace"), ("Orthogonalize", "Other")}


# ----------------------------------------------------------------------------------------------
# Public API


def _as_name_list(value: Any, where: str) -> list[str]:
    items = value if isinstance(value, list | tuple) else [value]
    for item in items:
        if not isinstance(item, str) or not item:
            raise SpecError(
                f"{where}: must be a column name or a list of column names, got {value!r}"
            )
    return list(items)


def normalise_instruction(instruction: Any, where: str) -> dict[str, Any]:
    """Check one instruction's structure and return it with ``Input``/``Output`` as lists.

    Parameters
    ----------
    instruction : mapping
        As written in the model, e.g. ``{"Name": "Scale", "Input": "age", "Rescale": False}``.
    where : str
        Prefix for messages (``"model.yaml: Nodes[0].Transformations.Instructions[1]"``).

    Returns
    -------
    dict
        ``Name`` (canonical spelling), ``Input`` (list), ``Output`` (list, when given) and the
        options as written (defaults are filled in when the instruction is applied).

    Raises
    ------
    SpecError
        Unknown transformation (with the nearest name), unknown option, missing Input/Output,
        Output count not matching Input.
    """
    if not isinstance(instruction, Mapping):
        raise SpecError(
            f"{where}: each instruction must be a mapping with a Name, got {instruction!r}"
        )
    name = instruction.get("Name")
    if not isinstance(name, str):
        raise SpecError(f"{where}: missing 'Name' (the transformation, e.g. 'Factor')")
    name = _ALIASES.get(name, name)
    if name in _UNSUPPORTED:
        raise SpecError(
            f"{where}: {name} is not supported at the dataset level: {_UNSUPPORTED[name]}"
        )
    if name not in TRANSFORMS:
        raise SpecError(
            f"{where}.Name: unknown transformation {name!r}"
            f"{nearest(name, list(TRANSFORMS))}; supported: {', '.join(TRANSFORMS)}"
        )
    spec = TRANSFORMS[name]
    allowed = set(_COMMON_KEYS) | set(spec.options)
    if not spec.output_allowed:
        allowed.discard("Output")
    for key in instruction:
        if key not in allowed:
            hint = nearest(key, sorted(allowed))
            raise SpecError(
                f"{where}: unknown option {key!r} for {name}{hint}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
    for option in spec.options:
        if (name, option) in _REQUIRED_OPTIONS and instruction.get(option) is None:
            raise SpecError(f"{where}: {name} needs {option!r}")
    out: dict[str, Any] = {"Name": name}
    if spec.needs_input:
        if "Input" not in instruction:
            raise SpecError(f"{where}: {name} needs 'Input' (the column(s) to transform)")
        out["Input"] = _as_name_list(instruction["Input"], f"{where}.Input")
    elif "Input" in instruction:
        raise SpecError(f"{where}: {name} takes no 'Input'")
    if "Output" in instruction:
        out["Output"] = _as_name_list(instruction["Output"], f"{where}.Output")
        expected = 1 if spec.many_to_one else len(out.get("Input", []))
        has_wildcard = any(_WILDCARD_CHARS & set(n) for n in out.get("Input", []))
        if len(out["Output"]) != expected and not (has_wildcard and not spec.many_to_one):
            raise SpecError(
                f"{where}.Output: {name} needs {expected} output name(s) "
                f"(one per Input{' in total' if spec.many_to_one else ''}), "
                f"got {len(out['Output'])}"
            )
    elif spec.output_required:
        raise SpecError(f"{where}: {name} needs 'Output' (the name of the new column)")
    for key, value in instruction.items():
        if key not in ("Name", "Input", "Output"):
            out[key] = value
    return out


def apply_transformations(
    variables: pd.DataFrame, instructions: Sequence[Mapping[str, Any]], *, source: str = "model"
) -> pd.DataFrame:
    """Apply instructions in order to a table with one row per map.

    Parameters
    ----------
    variables : DataFrame of shape (n_maps, n_variables)
        Not modified.
    instructions : sequence of mapping
        Normalised instructions (see :func:`normalise_instruction`).
    source : str
        Prefix for messages (the model file name).

    Returns
    -------
    DataFrame of shape (n_maps, n_variables_after)
        Same index and row order as ``variables``.

    Raises
    ------
    SpecError
        An input column that does not exist, a bad option value.
    DataError
        A column that cannot be transformed with these data (non-numeric, constant for Scale).
    """
    data = variables.copy()
    for index, raw in enumerate(instructions):
        where = f"{source}: Transformations.Instructions[{index}]"
        instruction = normalise_instruction(raw, where)
        name = instruction["Name"]
        spec = TRANSFORMS[name]
        inputs = expand_names(
            instruction.get("Input", []), list(data.columns), where=f"{where}.Input"
        )
        outputs = instruction.get("Output", [])
        if outputs and not spec.many_to_one and len(outputs) != len(inputs):
            raise SpecError(
                f"{where}.Output: Input {instruction['Input']} matched {len(inputs)} columns, "
                f"but {len(outputs)} output names were given"
            )
        options = {k: instruction.get(k, default) for k, default in spec.options.items()}
        data = spec.func(data, inputs, outputs, where, **options)
        log.debug("%s %s -> columns %s", name, inputs, list(data.columns))
    return data
