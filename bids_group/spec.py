"""Model specification: read a BIDS Stats Models file (YAML or JSON) into a validated :class:`ModelSpec`.

Only the dataset-level node is used. Validation happens here, once; later stages trust the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

StatType = Literal["t", "F"]


@dataclass(frozen=True)
class ContrastSpec:
    """One contrast as written in the model (before it is resolved against the design).

    Attributes
    ----------
    name : str
        The contrast name as written (``Name``).
    condition_list : tuple of str
        Column names the weights refer to. Empty when ``expression`` is used.
    weights : ndarray of shape (n_rows, len(condition_list))
        Always 2-D: a t contrast has one row, an F contrast one or more.
    test : {"t", "F"}
    expression : str or None
        Weights written as an expression over column names (``group.patient - group.control``).
    """

    name: str
    condition_list: tuple[str, ...]
    weights: np.ndarray
    test: StatType
    expression: str | None = None


@dataclass(frozen=True)
class InferenceDefaults:
    """Inference settings from the model file's extension block. ``None`` = not set there."""

    height_control: str | None = None
    alpha: float | None = None
    threshold: float | None = None
    cluster_threshold: int | None = None
    two_sided: bool | None = None
    connectivity: int | None = None
    smoothing_fwhm: float | None = None


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
        ``Input`` entity filters (pybids entity name -> value or list of values).
    group_by : tuple of str
        ``GroupBy`` of the node, e.g. ``("contrast",)`` or ``()``.
    x : tuple of str
        Design columns (``1`` is normalised to ``"intercept"``).
    transformations : tuple of mapping
        ``Transformations.Instructions`` in order, normalised (``Name`` + args).
    contrasts : tuple of ContrastSpec
    dummy_contrasts : tuple of str or None
        Columns that get an automatic one-column t contrast; None when DummyContrasts is absent/false.
    inference : InferenceDefaults
    raw : mapping
        The whole file as parsed, for provenance.
    source : Path or None
        The file it came from (None for the built-in default).
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
    raw: Mapping[str, Any] = field(default_factory=dict)
    source: Path | None = None


def load_spec(path: Path) -> ModelSpec:
    """Read and validate a model file. Raises SpecError / MissingInputError."""
    raise NotImplementedError


def default_spec() -> ModelSpec:
    """One-sample t-test of every input contrast (GroupBy contrast, X = [1], DummyContrasts)."""
    raise NotImplementedError
