"""Design matrix and contrast weights, from the model spec and one row of variables per map.

Pure pandas/numpy: no file I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from bids_group.spec import ModelSpec, StatType


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
        BIDS-safe camelCase label used in file names (see :func:`bids_group.outputs.naming.to_label`).
    weights : ndarray of shape (n_rows, n_params), float64
        Always 2-D; one row for a t contrast.
    test : {"t", "F"}
    """

    name: str
    label: str
    weights: np.ndarray
    test: StatType


def build_design(spec: ModelSpec, variables: pd.DataFrame) -> Design:
    """Apply the transformations and build X. Raises SpecError (64) / DataError (65)."""
    raise NotImplementedError


def resolve_contrasts(spec: ModelSpec, design: Design) -> tuple[Contrast, ...]:
    """Turn the spec's contrasts (and DummyContrasts) into weight matrices over ``design.columns``."""
    raise NotImplementedError
