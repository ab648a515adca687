"""Design matrix figure (SVG) and numeric design diagnostics for the log and the report.

Figures are drawn on a :class:`matplotlib.figure.Figure` and saved through the SVG canvas:
pyplot is never imported, so no backend is chosen for the caller and no figure is left open.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

#: Rows are labelled one by one up to this many (beyond it the labels are unreadable).
MAX_ROW_LABELS = 60

#: Fixed SVG ids and no date, so the same design gives the same file (reproducible outputs).
_SVG_RC = {"svg.hashsalt": "bids-group", "svg.fonttype": "none", "font.size": 10}


def _check_design(matrix: np.ndarray, columns: Sequence[str]) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != len(columns):
        raise ValueError(
            f"design matrix of shape {matrix.shape} does not match {len(columns)} column names"
        )
    return matrix


def scale_columns(matrix: np.ndarray) -> np.ndarray:
    """Divide each column by its largest absolute value (all-zero columns stay 0).

    >>> scale_columns(np.array([[1.0, -2.0], [1.0, 4.0]]))
    array([[ 1. , -0.5],
           [ 1. ,  1. ]])
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    peak = np.max(np.abs(matrix), axis=0)
    return matrix / np.where(peak > 0, peak, 1.0)


def plot_design_matrix(
    matrix: np.ndarray,
    columns: Sequence[str],
    row_labels: Sequence[str],
    path: Path,
    *,
    title: str | None = None,
) -> Path:
    """Draw the design matrix as a grey image and save it as SVG.

    Each column is scaled by its largest absolute value, so the grey scale runs from -1
    (black) through 0 (mid grey) to 1 (white) in every column.

    Parameters
    ----------
    matrix : ndarray of shape (n_maps, n_params)
    columns : sequence of str
        Column names, written above the columns at 60 degrees.
    row_labels : sequence of str
        One per row (e.g. subject labels); shown when there are at most
        :data:`MAX_ROW_LABELS` rows.
    path : Path
        ``.svg`` file to write.
    title : str or None

    Returns
    -------
    Path
        ``path``.
    """
    matrix = _check_design(matrix, columns)
    n_rows, n_cols = matrix.shape
    if len(row_labels) != n_rows:
        raise ValueError(f"{len(row_labels)} row labels for a design with {n_rows} rows")
    longest = max((len(str(c)) for c in columns), default=1)
    width = min(16.0, 2.5 + 0.45 * n_cols + 0.06 * max(len(str(r)) for r in row_labels or [""]))
    height = min(14.0, 2.0 + 0.05 * longest + (0.16 * n_rows if n_rows <= MAX_ROW_LABELS else 7))
    fig = Figure(figsize=(max(width, 3.5), max(height, 3.5)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(
        scale_columns(matrix), interpolation="nearest", aspect="auto", cmap="gray", vmin=-1, vmax=1
    )
    ax.xaxis.tick_top()
    ax.set_xticks(np.arange(n_cols), [str(c) for c in columns], rotation=60, ha="left")
    if n_rows <= MAX_ROW_LABELS:
        # 9 pt = 12 CSS px at the SVG's natural size: the report's smallest text.
        ax.set_yticks(np.arange(n_rows), [str(r) for r in row_labels], fontsize=9)
    else:
        ax.set_ylabel("map (row of the design)")
    if title:
        ax.set_title(title, pad=12)
    fig.colorbar(image, ax=ax, shrink=0.5, label="value / max |value| of the column")
    path = Path(path)
    with matplotlib.rc_context(_SVG_RC):
        fig.savefig(path, format="svg", metadata={"Date": None})
    log.debug("wrote %s", path)
    return path


def design_summary(matrix: np.ndarray, columns: Sequence[str]) -> dict[str, Any]:
    """Diagnostics of a design matrix.

    Parameters
    ----------
    matrix : ndarray of shape (n_maps, n_params)
    columns : sequence of str

    Returns
    -------
    dict
        ``n_rows``, ``n_columns``, ``rank``; ``condition_number`` (ratio of the extreme
        singular values of X, inf when rank deficient); ``correlation`` (n_params x n_params
        Pearson correlations as nested lists, NaN for constant columns); ``vif`` (column ->
        variance inflation factor: 1 / (1 - R^2) of the column regressed on the others, R^2
        centred when the others span a constant, inf for a column the others reproduce).
        Non-finite values become ``null`` when written with
        :func:`bids_group.outputs.description.write_json`.

    Examples
    --------
    >>> X = np.column_stack([np.ones(4), [1.0, 2.0, 3.0, 5.0]])
    >>> s = design_summary(X, ["intercept", "age"])
    >>> s["rank"], round(s["condition_number"], 3), s["vif"]["age"]
    (2, 7.128, 1.0)
    """
    matrix = _check_design(matrix, columns)
    singular = np.linalg.svd(matrix, compute_uv=False)
    rank = int(np.linalg.matrix_rank(matrix))
    full_rank = rank == min(matrix.shape) and singular[-1] > 0
    return {
        "n_rows": int(matrix.shape[0]),
        "n_columns": int(matrix.shape[1]),
        "rank": rank,
        "condition_number": float(singular[0] / singular[-1]) if full_rank else float("inf"),
        "columns": [str(c) for c in columns],
        "correlation": _correlation(matrix).tolist(),
        "vif": {str(c): _vif(matrix, j) for j, c in enumerate(columns)},
    }


def _correlation(matrix: np.ndarray) -> np.ndarray:
    """Pearson correlation of the columns; NaN rows/columns for constant columns."""
    centred = matrix - matrix.mean(axis=0)
    norms = np.linalg.norm(centred, axis=0)
    scale = np.where(norms > 1e-12 * max(1.0, np.abs(matrix).max()), norms, np.nan)
    unit = centred / scale
    return np.clip(unit.T @ unit, -1.0, 1.0)


def _vif(matrix: np.ndarray, j: int) -> float:
    """1 / (1 - R^2) of column ``j`` on the other columns (closed form, as statsmodels does)."""
    target = matrix[:, j]
    others = np.delete(matrix, j, axis=1)
    if others.shape[1] == 0:
        return 1.0
    residual = target - others @ np.linalg.lstsq(others, target, rcond=None)[0]
    ones = np.ones(matrix.shape[0])
    spans_constant = np.allclose(others @ np.linalg.lstsq(others, ones, rcond=None)[0], ones)
    baseline = target - target.mean() if spans_constant else target
    total = float(baseline @ baseline)
    unexplained = float(residual @ residual)
    if total == 0.0 or unexplained <= 1e-12 * total:
        return float("inf")
    return total / unexplained
