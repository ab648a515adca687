"""Design matrix figure (SVG) and numeric design diagnostics for the log and the report.

The figure is written as SVG text directly: the matrix as an embedded greyscale PNG (one pixel
per cell, drawn without smoothing), the labels as SVG text and a colour bar as a gradient.
Drawing it with matplotlib cost ~0.3 s plus ~0.9 s of import and font scanning on every run,
more than a whole mixed-effects fit; this costs milliseconds and has no dependency.
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np

from bids_group.png import png_bytes

log = logging.getLogger(__name__)

#: Rows are labelled one by one up to this many (beyond it the labels are unreadable).
MAX_ROW_LABELS = 60

#: Text sizes (CSS pixels at the SVG's natural size): 12 px is the report's smallest text.
_TEXT_PX, _TITLE_PX = 12, 15
#: Average advance of a DejaVu Sans character, in em: to size the margins around the labels.
_CHAR_EM = 0.62
_FONT = "DejaVu Sans, Verdana, Arial, sans-serif"


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
    (black) through 0 (mid grey) to 1 (white) in every column. The same inputs give the same
    bytes (no date, no random ids).

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
    path = Path(path)
    path.write_text(_design_svg(scale_columns(matrix), columns, row_labels, title), "utf-8")
    log.debug("wrote %s", path)
    return path


def _text_width(text: str, size: float = _TEXT_PX) -> float:
    return len(text) * _CHAR_EM * size


def _design_svg(
    scaled: np.ndarray, columns: Sequence[str], rows: Sequence[str], title: str | None
) -> str:
    """The SVG document of :func:`plot_design_matrix` (``scaled`` in [-1, 1])."""
    n_rows, n_cols = scaled.shape
    labelled = n_rows <= MAX_ROW_LABELS
    cell_w = max(28.0, 160.0 / n_cols) if n_cols < 24 else 28.0
    cell_h = 16.0 if labelled else 480.0 / n_rows
    width, height = n_cols * cell_w, n_rows * cell_h
    slope = math.sin(math.radians(60))
    longest = max((_text_width(str(c)) for c in columns), default=0.0)
    left = 12 + (max(_text_width(str(r)) for r in rows) + 6 if labelled and rows else 26)
    top = 10 + (_TITLE_PX + 14 if title else 0) + longest * slope + 10
    bar_h = max(80.0, min(height / 2, 240.0))
    total_w = left + width + 14 + 14 + 30 + 22 + max(longest * 0.5, 0) + 10
    total_h = top + max(height, bar_h) + 14
    grey = np.rint((np.clip(scaled, -1, 1) + 1) * 127.5).astype(np.uint8)
    png = base64.b64encode(png_bytes(np.repeat(grey[:, :, None], 3, axis=2))).decode("ascii")
    out = [
        '<?xml version="1.0" encoding="utf-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'width="{total_w:.0f}" height="{total_h:.0f}" viewBox="0 0 {total_w:.1f} {total_h:.1f}" '
        f'font-family="{_FONT}" font-size="{_TEXT_PX}">',
        f'<rect width="{total_w:.1f}" height="{total_h:.1f}" fill="white"/>',
    ]
    if title:
        out.append(
            f'<text x="{left:.1f}" y="{10 + _TITLE_PX:.1f}" font-size="{_TITLE_PX}">'
            f"{escape(title)}</text>"
        )
    # Cells drawn as sharp blocks when enlarged; smoothed (averaged) when there are more rows
    # than pixels, where blocks would alias into false stripes.
    pixelated = ' style="image-rendering:pixelated"' if cell_h >= 1 else ""
    out.append(
        f'<image x="{left:.1f}" y="{top:.1f}" width="{width:.1f}" height="{height:.1f}" '
        f'preserveAspectRatio="none"{pixelated} '
        f'xlink:href="data:image/png;base64,{png}"/>'
    )
    out.append(
        f'<rect x="{left:.1f}" y="{top:.1f}" width="{width:.1f}" height="{height:.1f}" '
        f'fill="none" stroke="#444" stroke-width="0.8"/>'
    )
    for j, name in enumerate(columns):
        x, y = left + (j + 0.5) * cell_w, top - 6
        out.append(
            f'<text transform="translate({x:.1f} {y:.1f}) rotate(-60)">{escape(str(name))}</text>'
        )
    if labelled:
        for i, name in enumerate(rows):
            y = top + (i + 0.5) * cell_h + _TEXT_PX * 0.35
            out.append(
                f'<text x="{left - 6:.1f}" y="{y:.1f}" text-anchor="end">{escape(str(name))}</text>'
            )
    else:
        x, y = left - 12, top + height / 2
        out.append(
            f'<text transform="translate({x:.1f} {y:.1f}) rotate(-90)" text-anchor="middle">'
            "map (row of the design)</text>"
        )
    out.extend(_colour_bar(left + width + 14, top, bar_h))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _colour_bar(x: float, top: float, height: float) -> list[str]:
    """A black-to-white bar from -1 (bottom) to 1 (top), its ticks and its label."""
    parts = [
        '<defs><linearGradient id="design-grey" x1="0" y1="1" x2="0" y2="0">'
        '<stop offset="0" stop-color="black"/><stop offset="1" stop-color="white"/>'
        "</linearGradient></defs>",
        f'<rect x="{x:.1f}" y="{top:.1f}" width="14" height="{height:.1f}" '
        'fill="url(#design-grey)" stroke="#444" stroke-width="0.8"/>',
    ]
    for value, fraction in (("1", 0.0), ("0", 0.5), ("-1", 1.0)):
        y = top + fraction * height
        parts.append(
            f'<line x1="{x + 14:.1f}" y1="{y:.1f}" x2="{x + 18:.1f}" y2="{y:.1f}" stroke="#444"/>'
        )
        parts.append(f'<text x="{x + 20:.1f}" y="{y + _TEXT_PX * 0.35:.1f}">{value}</text>')
    label_x, label_y = x + 50, top + height / 2
    parts.append(
        f'<text transform="translate({label_x:.1f} {label_y:.1f}) rotate(-90)" '
        'text-anchor="middle">value / max |value| of the column</text>'
    )
    return parts


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
