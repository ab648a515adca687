"""The permutation null distribution of a maximum, drawn by the report's raster renderer.

A histogram of the null maxima with the critical value (dashed) and the observed maximum (solid),
composed as an RGB array with the text and PNG encoder of :mod:`bids_group.report.raster`, so
every figure of the report has the same fonts and text sizes (>= ``MIN_TEXT_PX`` pixels).
"""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import MaxNLocator

from bids_group.errors import DataError
from bids_group.report.raster import _LIGHT, _TITLE_PX, MIN_TEXT_PX, _draw_text, png_bytes

#: Size of the figure (pixels) and of the plot area's margins.
WIDTH, HEIGHT = 960, 380
_LEFT, _RIGHT, _TOP, _BOTTOM = 78, 24, 62, 104
_BAR, _CRITICAL, _OBSERVED = (143, 168, 200), (208, 128, 0), (192, 0, 32)


def _column(value: float, low: float, high: float) -> int:
    """Pixel column of ``value`` on the x axis."""
    return int(round(_LEFT + (value - low) / (high - low) * (WIDTH - _LEFT - _RIGHT - 1)))


def _bars(canvas: np.ndarray, null: np.ndarray, low: float, high: float, bottom: int) -> int:
    """Histogram bars (at most 60 bins); returns the tallest count."""
    counts, edges = np.histogram(null, bins=min(60, max(10, null.size // 20)))
    tallest = int(counts.max())
    height = bottom - _TOP
    for count, left, right in zip(counts, edges[:-1], edges[1:], strict=True):
        c0, c1 = (
            _column(left, low, high),
            max(_column(right, low, high), _column(left, low, high) + 2),
        )
        top = bottom - int(round(count / tallest * height))
        canvas[top:bottom, c0 : c1 - 1] = _BAR  # one white column between bars
    return tallest


def _axes(canvas, low, high, tallest, bottom, stat_label) -> None:
    ink = _LIGHT["ink"]
    canvas[bottom, _LEFT : WIDTH - _RIGHT] = ink
    canvas[_TOP:bottom, _LEFT - 1] = ink
    for tick in MaxNLocator(nbins=7).tick_values(low, high):
        if low <= tick <= high:
            col = _column(tick, low, high)
            canvas[bottom : bottom + 6, col] = ink
            _draw_text(canvas, f"{tick:.4g}", col, bottom + 8, ink, anchor="center")
    for tick in MaxNLocator(nbins=4, integer=True).tick_values(0, tallest):
        if 0 <= tick <= tallest:
            row = bottom - int(round(tick / tallest * (bottom - _TOP)))
            canvas[row, _LEFT - 7 : _LEFT - 1] = ink
            _draw_text(canvas, f"{tick:g}", _LEFT - 10, row - MIN_TEXT_PX // 2 - 2, ink,
                       anchor="right")  # fmt: skip
    _draw_text(canvas, "relabellings", _LEFT - 8, _TOP - MIN_TEXT_PX - 12, _LIGHT["muted"])
    _draw_text(canvas, stat_label, (_LEFT + WIDTH - _RIGHT) // 2, bottom + 34, _LIGHT["muted"],
               anchor="center")  # fmt: skip


def _vertical(canvas, col: int, colour, bottom: int, dashed: bool) -> None:
    rows = np.arange(_TOP, bottom)
    if dashed:
        rows = rows[(rows - _TOP) % 12 < 7]
    canvas[rows, col - 1 : col + 2] = colour


def _legend(canvas, items) -> None:
    """One row of (swatch, text) at the bottom: a box for the bars, a line for the values."""
    x, y = _LEFT, HEIGHT - MIN_TEXT_PX - 12
    for kind, colour, text in items:
        mid = y + MIN_TEXT_PX // 2 + 2
        if kind == "box":
            canvas[mid - 7 : mid + 7, x : x + 22] = colour
        else:
            cols = np.arange(x, x + 22)
            cols = cols[(cols - x) % 9 < 6] if kind == "dashed" else cols
            canvas[mid - 1 : mid + 2, cols] = colour
        x += 30 + _draw_text(canvas, text, x + 28, y, _LIGHT["ink"]) + 24


def null_distribution_png(
    null_max: np.ndarray,
    observed_max: float,
    critical: float,
    *,
    alpha: float = 0.05,
    stat_label: str = "max z",
    title: str = "",
) -> bytes:
    """Histogram of a permutation null of the maximum, with the observed and critical values.

    Parameters
    ----------
    null_max : ndarray of shape (n_relabellings,)
        Maximum statistic of each relabelling (the unpermuted data included).
    observed_max : float
        The maximum of the unpermuted data.
    critical : float
        The value a result must exceed for FWER p <= alpha (finite).
    alpha : float
        Level, for the legend.
    stat_label : str
        What the maximum is of, e.g. ``"max |z|"``, ``"max cluster size (voxels)"``.
    title : str

    Returns
    -------
    bytes
        PNG, :data:`WIDTH` x :data:`HEIGHT` pixels.

    Raises
    ------
    DataError
        If ``null_max`` is empty or not finite.
    """
    null = np.asarray(null_max, dtype=np.float64).ravel()
    if null.size == 0 or not np.all(np.isfinite(null)):
        raise DataError("report: the permutation null distribution is empty or not finite.")
    low = min(float(null.min()), observed_max, critical)
    top = max(float(null.max()), observed_max, critical)
    span = top - low if top > low else 1.0
    low, high = low - 0.02 * span, top + 0.04 * span
    canvas = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    canvas[:] = _LIGHT["bg"]
    bottom = HEIGHT - _BOTTOM
    tallest = _bars(canvas, null, low, high, bottom)
    _vertical(canvas, _column(critical, low, high), _CRITICAL, bottom, dashed=True)
    _vertical(canvas, _column(observed_max, low, high), _OBSERVED, bottom, dashed=False)
    _axes(canvas, low, high, tallest, bottom, stat_label)
    _draw_text(canvas, title, 10, 6, _LIGHT["ink"], _TITLE_PX, bold=True)
    _legend(canvas, (
        ("box", _BAR, f"null ({null.size:,} relabellings)"),
        ("dashed", _CRITICAL, f"critical value ({1 - alpha:.0%} quantile) = {critical:.4g}"),
        ("solid", _OBSERVED, f"observed = {observed_max:.4g}"),
    ))  # fmt: skip
    return png_bytes(canvas)
