"""Design matrix and contrast weights, from the model spec and one row of variables per map.

Pure pandas/numpy: no file I/O. Every check that can fail names the column, the subjects or the
contrast at fault and says what to do; nothing is filled in silently (a missing covariate is an
error, never a 0).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from bids_group.errors import DataError, SpecError
from bids_group.inputs import explain_missing_spellings
from bids_group.labels import INTERCEPT, first_level_labels, to_label
from bids_group.spec import ModelSpec, StatType
from bids_group.transformations import apply_transformations, expand_names, nearest

log = logging.getLogger(__name__)

#: Entities whose values are labels and must stay strings ("01" is not 1).
_STRING_ENTITIES = frozenset(
    {
        "subject",
        "session",
        "task",
        "acquisition",
        "contrast",
        "space",
        "desc",
        "label",
        "suffix",
        "stat",
        "datatype",
        "extension",
    }
)
#: Relative tolerance for "this contrast lies in the row space of X".
ESTIMABILITY_TOL = 1e-8


@dataclass(frozen=True)
class Design:
    """A full-rank design matrix.

    Attributes
    ----------
    matrix : ndarray of shape (n_maps, n_params), float64
    columns : tuple of str
        Column names (``intercept`` for ``1``; pybids names such as ``group.patient``).
    variables : DataFrame
        The transformed variables, one row per map (same order as ``matrix``), for provenance.
    """

    matrix: np.ndarray
    columns: tuple[str, ...]
    variables: pd.DataFrame


@dataclass(frozen=True)
class Contrast:
    """A contrast resolved against a design.

    Attributes
    ----------
    name : str
        As written in the model.
    label : str
        BIDS-safe label of the contrast name (:func:`bids_group.labels.to_label`); combine it
        with the input contrast with :func:`bids_group.labels.group_contrast_label`.
    weights : ndarray of shape (n_rows, n_params), float64
        Always 2-D; one row for a t contrast.
    test : {"t", "F"}
    """

    name: str
    label: str
    weights: np.ndarray
    test: StatType


# ----------------------------------------------------------------------------------------------
# Variables


def _to_numeric_if_possible(series: pd.Series) -> pd.Series:
    """Numbers stay numbers: a column whose every non-missing value parses as a number."""
    if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
        return series
    cleaned = series.replace({"n/a": np.nan, "": np.nan})
    try:
        return pd.to_numeric(cleaned)
    except (ValueError, TypeError):
        return series


def variables_for_maps(
    entities: Sequence[Mapping[str, Any]], participants: pd.DataFrame
) -> pd.DataFrame:
    """One row of design variables per map: participants.tsv columns plus the map's entities.

    Parameters
    ----------
    entities : sequence of mapping, length n_maps
        BIDS entities of each map (pybids names: ``subject`` without ``sub-``, ``session``,
        ``run``, ``task``, ``contrast``...). Every map needs ``subject``.
    participants : DataFrame
        participants.tsv, indexed by subject label (a ``sub-`` prefix is removed). A
        ``participant_id`` column, if present, is dropped.

    Returns
    -------
    DataFrame of shape (n_maps, n_columns)
        participants columns first (NaN for subjects absent from participants.tsv), then the
        entity columns. Numeric-looking participants columns (and ``run``/``echo``...) are
        numeric; label entities (``subject``, ``session``...) stay strings. Index 0..n_maps-1.

    Raises
    ------
    DataError
        A map without a ``subject`` entity, or participants.tsv listing a subject twice.
    """
    index = pd.Index([str(i).removeprefix("sub-") for i in participants.index], name="subject")
    table = participants.drop(columns=["participant_id"], errors="ignore").set_axis(index, axis=0)
    duplicated = sorted(set(index[index.duplicated()]))
    if duplicated:
        raise DataError(f"participants.tsv lists subject(s) {', '.join(duplicated)} more than once")
    rows = []
    for i, ents in enumerate(entities):
        if "subject" not in ents:
            raise DataError(f"input map {i} has no 'subject' entity: {dict(ents)}")
        rows.append({k: v for k, v in ents.items()})
    ent_frame = pd.DataFrame(rows, index=pd.RangeIndex(len(rows)))
    ent_frame["subject"] = ent_frame["subject"].astype(str).str.removeprefix("sub-")
    absent = sorted(set(ent_frame["subject"]) - set(table.index))
    if absent and len(table.columns):  # inputs.collect_inputs warns about them, once
        log.debug(
            "subjects not in participants.tsv (their participant variables are n/a): %s",
            ", ".join(absent),
        )
    # numeric conversion on the whole table, so every GroupBy subset gets the same types
    part = table.apply(_to_numeric_if_possible).reindex(ent_frame["subject"]).reset_index(drop=True)
    clashes = [c for c in part.columns if c in ent_frame.columns]
    if clashes:
        log.warning(
            "participants.tsv column(s) %s have the name of an entity; using the "
            "entity values of each map",
            clashes,
        )
        part = part.drop(columns=clashes)
    for column in ent_frame.columns:
        if column in _STRING_ENTITIES:
            ent_frame[column] = ent_frame[column].map(lambda v: v if pd.isna(v) else str(v))
        else:
            ent_frame[column] = _to_numeric_if_possible(ent_frame[column])
    return pd.concat([part, ent_frame], axis=1)


# ----------------------------------------------------------------------------------------------
# Design


def _where(spec: ModelSpec) -> str:
    name = spec.source.name if spec.source is not None else "model"
    return f"{name}: Model.X"


def _expand_x(spec: ModelSpec, columns: list[str]) -> list[str]:
    """X entries -> design columns; ``intercept`` is always available."""
    available = columns if INTERCEPT in columns else [*columns, INTERCEPT]
    return expand_names(list(spec.x), available, where=_where(spec))


def _row_ids(variables: pd.DataFrame, rows: np.ndarray) -> str:
    """``sub-01, sub-03 (ses-2)``: human names of map rows, for messages."""
    out = []
    for r in np.flatnonzero(rows):
        row = variables.iloc[r]
        text = f"sub-{row['subject']}" if "subject" in variables.columns else f"map {r}"
        for entity, key in (("session", "ses"), ("contrast", "contrast"), ("run", "run")):
            if entity in variables.columns and not pd.isna(row[entity]):
                text += f" {key}-{row[entity]}"
        out.append(text)
    return ", ".join(out)


def _column_values(variables: pd.DataFrame, name: str, where: str) -> np.ndarray:
    if name == INTERCEPT and INTERCEPT not in variables.columns:
        return np.ones(len(variables))
    series = variables[name]
    if pd.api.types.is_bool_dtype(series):
        return series.to_numpy(dtype=float)
    if not pd.api.types.is_numeric_dtype(series):
        rows = variables["subject"] if "subject" in variables.columns else series.index.to_series()
        missing = explain_missing_spellings(series, name, rows)
        if missing:
            raise DataError(f"{where}: {missing}")
        examples = ", ".join(repr(v) for v in series.dropna().unique()[:3])
        raise SpecError(
            f"{where}: column {name!r} is not numeric (values such as {examples}); add a "
            f"Factor transformation ({{Name: Factor, Input: [{name}]}}) and use its "
            f"columns ({name}.<level>) in X"
        )
    return series.to_numpy(dtype=float)


def _dependency(matrix: np.ndarray, columns: Sequence[str]) -> str:
    """Describe one linear dependency among columns, e.g. ``intercept = a + b``."""
    null = np.linalg.svd(matrix, full_matrices=True)[2][-1]  # a null-space vector of X
    null = null / null[np.argmax(np.abs(null))]
    involved = [(c, float(w)) for c, w in zip(columns, null, strict=True) if abs(w) > 1e-8]
    lead = involved[0][0]
    names = ", ".join(repr(c) for c, _ in involved)
    return f"columns {names} are linearly dependent ({lead} = {_format_rhs(involved, lead)})"


def _format_rhs(involved: list[tuple[str, float]], lead: str) -> str:
    """Right-hand side of ``lead = ...`` from a null vector normalised so lead's weight is 1."""
    weights = dict(involved)
    parts = []
    for name, w in involved:
        if name == lead:
            continue
        coef = -w / weights[lead]
        sign = "-" if coef < 0 else "+"
        magnitude = "" if np.isclose(abs(coef), 1) else f"{abs(coef):.3g}*"
        parts.append(f"{sign} {magnitude}{name}")
    text = " ".join(parts)
    return text[2:] if text.startswith("+ ") else text or "0"


def _check_infinite_inputs(variables: pd.DataFrame, spec: ModelSpec, where: str) -> None:
    """An infinite covariate value, named before a transformation (Demean, Scale) spreads it
    to every row and the message would blame every subject."""
    used = set(spec.x)
    for step in spec.transformations:
        used.update(str(c) for c in step.get("Input", ()) or ())
    for name in sorted(used & set(variables.columns)):
        values = pd.to_numeric(variables[name], errors="coerce").to_numpy(dtype=float)
        bad = np.isinf(values)
        if bad.any():
            raise DataError(
                f"{where}: infinite value(s) in {name!r} for {_row_ids(variables, bad)}; fix "
                "them in participants.tsv (n/a for a missing value)"
            )


def add_contrast_indicators(spec: ModelSpec, variables: pd.DataFrame) -> pd.DataFrame:
    """Indicator columns named after the upstream contrasts that the model's X refers to.

    As pybids does above the run level, a Dataset node that does not group by contrast may use
    an incoming contrast *name* as a design column: 1 for the maps of that contrast, else 0
    (fitlins' ds000003 F-test: ``X: [trial_type.word, trial_type.pseudoword]``). A map is of
    the contrast when its ``contrast`` entity is one of the name's labels
    (:func:`~bids_group.labels.first_level_labels`). Names that are already variables, that
    hold wildcards or that match no map are left alone (an unknown column is reported by
    :func:`build_design`).

    Examples
    --------
    >>> from bids_group.spec import default_spec
    >>> from dataclasses import replace
    >>> spec = replace(default_spec(), group_by=(), x=("trial_type.word",))
    >>> v = pd.DataFrame({"contrast": ["trialTypeWord", "trialTypePseudoword"]})
    >>> add_contrast_indicators(spec, v)["trial_type.word"].tolist()
    [1.0, 0.0]
    """
    if "contrast" in spec.group_by or "contrast" not in variables.columns:
        return variables
    names = [*spec.x, *(n for c in spec.contrasts for n in c.condition_list)]
    contrast = variables["contrast"].astype(str)
    out = variables.copy()
    for name in dict.fromkeys(names):
        if name in out.columns or name == INTERCEPT or set("*?[") & set(name):
            continue
        indicator = contrast.isin(first_level_labels(name))
        if indicator.any():
            out[name] = indicator.astype(float)
            log.info("design column %r: 1 for the maps of contrast %s", name,
                     "/".join(first_level_labels(name)))  # fmt: skip
    return out


def build_design(spec: ModelSpec, variables: pd.DataFrame) -> Design:
    """Apply the transformations and build X.

    Parameters
    ----------
    spec : ModelSpec
    variables : DataFrame of shape (n_maps, n_variables)
        One row per map (see :func:`variables_for_maps`), in the order of the maps.

    Returns
    -------
    Design
        ``matrix`` float64 of shape (n_maps, n_params), full column rank, columns in X order
        (wildcards expanded in place, in the order of the variables).

    Raises
    ------
    SpecError
        A column named in X (or a transformation input) that does not exist, a non-numeric
        column in X.
    DataError
        Missing (NaN) or infinite values in a used column (names column and subjects), a column
        of zeros, fewer maps than parameters + 1, linearly dependent columns.
    """
    source = spec.source.name if spec.source is not None else "model"
    where = _where(spec)
    _check_infinite_inputs(variables, spec, where)
    transformed = apply_transformations(variables, spec.transformations, source=source)
    transformed = transformed.reset_index(drop=True)
    columns = _expand_x(spec, list(transformed.columns))
    matrix = np.column_stack([_column_values(transformed, c, where) for c in columns])
    matrix = np.ascontiguousarray(matrix, dtype=np.float64).reshape(len(transformed), len(columns))

    problems = []
    for j, name in enumerate(columns):
        bad = ~np.isfinite(matrix[:, j])
        if bad.any():
            problems.append(f"{name!r} for {_row_ids(transformed, bad)}")
    if problems:
        raise DataError(
            f"{where}: missing or non-finite values in {'; '.join(problems)}. Fill them in "
            f"participants.tsv, or exclude these subjects (e.g. --participant-label); "
            f"bids-group never fills covariates with 0"
        )
    zero = [c for j, c in enumerate(columns) if not matrix[:, j].any()]
    if zero:
        raise DataError(
            f"{where}: column(s) {', '.join(map(repr, zero))} are zero for every "
            "selected map; remove them from X"
        )
    n_maps, n_params = matrix.shape
    if n_maps < n_params + 1:
        raise DataError(
            f"{where}: {n_maps} map(s) for {n_params} parameter(s) ({', '.join(columns)}): at "
            f"least {n_params + 1} maps are needed to estimate the variance (residual degrees "
            f"of freedom >= 1)"
        )
    rank = np.linalg.matrix_rank(matrix)
    if rank < n_params:
        raise DataError(
            f"{where}: the design is rank deficient (rank {rank} < {n_params} columns): "
            f"{_dependency(matrix, columns)}. Remove one of them from X (e.g. drop 1 when X "
            f"has a column for every group)"
        )
    log.debug("design %s x %s: %s", n_maps, n_params, columns)
    return Design(matrix=matrix, columns=tuple(columns), variables=transformed)


# ----------------------------------------------------------------------------------------------
# Contrasts


def _weights_over_design(
    names: Sequence[str], weights: np.ndarray, design: Design, where: str
) -> np.ndarray:
    full = np.zeros((weights.shape[0], len(design.columns)), dtype=np.float64)
    for k, name in enumerate(names):
        if name not in design.columns:
            raise SpecError(
                f"{where}: {name!r} is not a design column{nearest(name, design.columns)}; "
                f"design columns: {', '.join(map(repr, design.columns))}"
            )
        full[:, design.columns.index(name)] += weights[:, k]
    return full


def _check_estimable(weights: np.ndarray, design: Design, where: str) -> None:
    """Each row must lie in the row space of X, i.e. c = c pinv(X) X."""
    x = design.matrix
    projected = weights @ np.linalg.pinv(x) @ x
    residual = np.linalg.norm(weights - projected, axis=1)
    scale = np.linalg.norm(weights, axis=1)
    if np.any(residual > ESTIMABILITY_TOL * np.maximum(scale, 1.0)):
        raise DataError(
            f"{where}: the contrast is not estimable with this design (it is not a "
            "combination of the rows of X)"
        )
    if weights.shape[0] > 1 and np.linalg.matrix_rank(weights) < weights.shape[0]:
        raise SpecError(
            f"{where}: the rows of this F contrast are linearly dependent; "
            "remove the redundant rows"
        )


def resolve_contrasts(spec: ModelSpec, design: Design) -> tuple[Contrast, ...]:
    """Turn the spec's contrasts (and DummyContrasts) into weight matrices over ``design.columns``.

    Parameters
    ----------
    spec : ModelSpec
    design : Design

    Returns
    -------
    tuple of Contrast
        Explicit contrasts first, in file order, then one t contrast per DummyContrasts column
        (wildcards expanded against the design columns), named after the column.

    Raises
    ------
    SpecError
        A condition that is not a design column (nearest suggested), duplicate contrast names
        or labels, linearly dependent F rows.
    DataError
        A contrast that is not estimable (not in the row space of X).
    """
    source = spec.source.name if spec.source is not None else "model"
    resolved: list[Contrast] = []
    for i, c in enumerate(spec.contrasts):
        where = f"{source}: Contrasts[{i}] ({c.name!r})"
        weights = _weights_over_design(c.condition_list, c.weights, design, where)
        _check_estimable(weights, design, where)
        resolved.append(Contrast(c.name, to_label(c.name), weights, c.test))
    if spec.dummy_contrasts:
        where = f"{source}: DummyContrasts"
        for name in expand_names(list(spec.dummy_contrasts), list(design.columns), where=where):
            weights = _weights_over_design([name], np.ones((1, 1)), design, where)
            _check_estimable(weights, design, f"{where} ({name!r})")
            resolved.append(Contrast(name, to_label(name), weights, "t"))
    _check_unique(resolved, source)
    return tuple(resolved)


def _check_unique(contrasts: Sequence[Contrast], source: str) -> None:
    by_name: dict[str, int] = {}
    by_label: dict[str, str] = {}
    for contrast in contrasts:
        if contrast.name in by_name:
            raise SpecError(
                f"{source}: two contrasts are named {contrast.name!r} (DummyContrasts "
                "are named after their column); rename one"
            )
        by_name[contrast.name] = 1
        if contrast.label in by_label:
            raise SpecError(
                f"{source}: contrasts {by_label[contrast.label]!r} and "
                f"{contrast.name!r} both get the file label {contrast.label!r}; "
                "rename one"
            )
        by_label[contrast.label] = contrast.name
