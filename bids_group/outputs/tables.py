"""Write tables as BIDS TSV (``n/a`` for missing values) with a JSON sidecar describing columns."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from bids_group.outputs.description import write_json
from bids_group.outputs.naming import sidecar_name

log = logging.getLogger(__name__)

#: Six significant digits: more than a float32 map holds in a TSV meant for reading.
FLOAT_FORMAT = "%.6g"
MISSING = "n/a"

#: Descriptions of columns bids-group writes, used when the caller gives none.
KNOWN_COLUMNS: Mapping[str, Mapping[str, str]] = {
    "participant_id": {"Description": "Participant label, with the sub- prefix"},
    "subject": {"Description": "Participant label, with the sub- prefix"},
    "path": {"Description": "File name of the input map of this row"},
    "Cluster ID": {"Description": "Cluster number, 1 = largest; sub-peaks as 1a, 1b, ..."},
    "X": {"Description": "x coordinate of the peak", "Units": "mm"},
    "Y": {"Description": "y coordinate of the peak", "Units": "mm"},
    "Z": {"Description": "z coordinate of the peak", "Units": "mm"},
    "Peak Stat": {"Description": "Value of the statistic at the peak"},
    "Cluster Size (mm3)": {"Description": "Cluster volume", "Units": "mm^3"},
    "Cluster Size (voxels)": {"Description": "Number of voxels in the cluster"},
    "intercept": {"Description": "Constant column of the design matrix"},
}


def table_sidecar(df: pd.DataFrame, sidecar: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The caller's sidecar plus a description for every column that has none.

    Parameters
    ----------
    df : DataFrame
    sidecar : mapping or None
        Column entries (``{"col": {"Description": ...}}``) and any other metadata.

    Returns
    -------
    dict
        Column entries first, in column order, then the other keys.

    Examples
    --------
    >>> table_sidecar(pd.DataFrame({"X": [1.0], "age": [30]}), {"age": {"Units": "years"}})
    {'X': {'Description': 'x coordinate of the peak', 'Units': 'mm'}, 'age': {'Units': 'years', 'Description': 'Column age (int64)'}}
    """  # noqa: E501 (a doctest line cannot be wrapped)
    given = dict(sidecar or {})
    out: dict[str, Any] = {}
    for column in df.columns:
        name = str(column)
        entry = dict(given.pop(name, None) or {})
        if "Description" not in entry:
            known = KNOWN_COLUMNS.get(name, {})
            entry = {**known, **entry}
            entry.setdefault("Description", f"Column {name} ({df[column].dtype})")
        out[name] = entry
    out.update(given)
    return out


def format_table(df: pd.DataFrame) -> str:
    """TSV text: tab separated, ``n/a`` for missing, floats as ``%.6g``, no index.

    >>> text = format_table(pd.DataFrame({"a": [1.0, float("nan")], "b": ["x", None]}))
    >>> print(text.replace("\\t", " | "), end="")
    a | b
    1 | x
    n/a | n/a
    """
    return df.to_csv(
        sep="\t", na_rep=MISSING, float_format=FLOAT_FORMAT, index=False, lineterminator="\n"
    )


def write_table(path: Path, df: pd.DataFrame, sidecar: Mapping[str, Any] | None = None) -> Path:
    """Write ``df`` as a TSV and its JSON sidecar (same stem, ``.json``).

    Parameters
    ----------
    path : Path
        ``.tsv`` file.
    df : DataFrame
        Written without its index: put row labels in a column (e.g. ``participant_id``).
    sidecar : mapping or None
        See :func:`table_sidecar`.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    if not path.name.endswith(".tsv"):
        raise ValueError(f"table path {path} must end with .tsv")
    if len(set(map(str, df.columns))) != df.shape[1]:
        raise ValueError(f"table {path.name} has duplicate column names: {list(df.columns)}")
    path.write_text(format_table(df), encoding="utf-8")
    write_json(path.with_name(sidecar_name(path.name)), table_sidecar(df, sidecar))
    log.debug("wrote %s", path)
    return path
