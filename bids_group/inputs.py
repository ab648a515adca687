"""Find the first-level maps with pybids and read participants.tsv.

This is the only module that talks to pybids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class InputMap:
    """One first-level map: its path and its BIDS entities (``subject`` without ``sub-``)."""

    path: Path
    entities: Mapping[str, Any]


@dataclass(frozen=True)
class InputSet:
    """Everything the later stages need from the dataset.

    Attributes
    ----------
    maps : tuple of InputMap
        Sorted by (subject, session, other entities).
    participants : DataFrame
        participants.tsv, indexed by subject label without ``sub-``; empty (but indexed by the
        subjects of ``maps``) when the file is absent.
    dataset_root : Path
        Folder holding the maps (the derivatives folder when ``--derivatives`` is used).
    participants_path : Path or None
    source_datasets : tuple of str
        For dataset_description.json ``SourceDatasets``.
    """

    maps: tuple[InputMap, ...]
    participants: pd.DataFrame
    dataset_root: Path
    participants_path: Path | None
    source_datasets: tuple[str, ...]


def collect_inputs(
    bids_dir: Path,
    *,
    derivatives: Sequence[Path] = (),
    input_filters: Mapping[str, Any] | None = None,
    participant_labels: Sequence[str] | None = None,
    bids_filters: Mapping[str, Any] | None = None,
) -> InputSet:
    """Index the dataset and select maps.

    Raises BidsDatasetError (16), EmptySelectionError (18), MissingInputError (66), DataError (65).
    """
    raise NotImplementedError
