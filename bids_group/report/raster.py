"""The report's figures: numpy pixels, FreeType text, a minimal PNG encoder.

The one renderer of the brain figures (and, through :mod:`bids_group.report.histogram`, of the
null distributions). Matplotlib figures took 0.3-1 s each (axes, colour bar, text layout), and
a run draws two per contrast and method: too slow for a report that must cost well under the
analysis itself. These functions compose the views directly as an RGB array (nearest-neighbour
sampling on a millimetre grid, colour look-up tables, text rendered by FreeType through
``matplotlib.ft2font`` with the DejaVu font matplotlib ships, so nothing is downloaded) and
encode a PNG with zlib: ~10-30 ms per figure.

Display conventions: volumes reoriented to RAS+ (no resampling), neurological convention (L on
the left, letters printed), cold-hot colours for signed maps, dark red -> yellow for non-negative
ones, the threshold marked on the colour bar.

Legibility: every text is at least :data:`MIN_TEXT_PX` pixels high and a figure is at most
:data:`MAX_WIDTH` pixels wide; the report never shows a figure below ``12 / MIN_TEXT_PX`` of its
size, so its text stays >= 12 CSS pixels (see :mod:`bids_group.report.html`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import ft2font
from matplotlib.colors import Colormap, LinearSegmentedColormap

from bids_group.errors import DataError
from bids_group.png import png_bytes
from bids_group.report._common import (
    CONVENTION,
    MIN_TEXT_PX,
    VIEWS,
    RasGrid,
    check_same_grid,
    format_threshold,
    robust_range,
    stat_limits,
    to_ras,
)

#: Largest pixels per millimetre of the brain panels (a 2 mm MNI brain is ~170 mm wide).
PX_PER_MM = 2.4
#: Widest figure (pixels): panels are scaled down to fit it (so that the report can show it
#: whole at 1400 px and, at >= 12 / MIN_TEXT_PX of its size, in an 800 px window).
MAX_WIDTH = 1000
#: Narrowest brain figure (pixels): small volumes are enlarged to it.
MIN_WIDTH = 760
_TITLE_PX = 20
#: Colours (RGB 0-255) of the dark (slices) and light (glass brain) themes.
_DARK = {"bg": (0, 0, 0), "ink": (235, 235, 235), "muted": (170, 170, 170), "cross": (90, 200, 90)}
_LIGHT = {"bg": (255, 255, 255), "ink": (30, 35, 48), "muted": (90, 96, 110), "cross": (0, 0, 0)}
_SILHOUETTE, _SILHOUETTE_EDGE = (236, 238, 242), (120, 124, 132)
_OUTLINE = (255, 60, 50)
# Signed maps: blue->cyan below -threshold, red->yellow above +threshold (the "cold-hot" look).
COLD_HOT: Colormap = LinearSegmentedColormap.from_list(
    "cold_hot",
    [(0.0, "#00ffff"), (0.2, "#0040ff"), (0.5, "#101020"), (0.8, "#ff2000"), (1.0, "#ffff00")],
)
# Non-negative maps (TDP, F, -log10 p): dark red -> yellow.
HOT: Colormap = LinearSegmentedColormap.from_list(
    "warm", [(0.0, "#7a0000"), (0.5, "#ff3000"), (1.0, "#ffff40")]
)
_GAP, _MARGIN, _HEADER, _FOOTER, _BAR_W = 8, 10, 34, 32, 14
#: Room above the panels for the view names, and right of them for the colour bar and ticks.
_NAMES, _BAR_SPACE = 26, 18 + _BAR_W + 90


# --------------------------------------------------------------------------- PNG and text


@functools.lru_cache(maxsize=4)
def _font(bold: bool) -> ft2font.FT2Font:
    # The file matplotlib ships, by path: its font manager would scan every system font and
    # build a cache (~0.45 s) on each run, whose cache folder is private to the run.
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ft2font.FT2Font(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name))


def _text_mask(text: str, size: float, bold: bool = False) -> np.ndarray:
    """Anti-aliased coverage (0..1) of ``text`` with an em size of ``size`` pixels."""
    font = _font(bold)
    font.set_size(size, 72)  # points at 72 dpi: 1 point = 1 pixel
    font.set_text(text, 0.0)
    font.draw_glyphs_to_bitmap(antialiased=True)
    return np.asarray(font.get_image(), dtype=np.float32) / 255.0


def _draw_text(canvas, text, x, y, colour, size=MIN_TEXT_PX, bold=False, anchor="left") -> int:
    """Blend ``text`` onto ``canvas`` with its top-left (or top-right/centre) at (x, y).

    ``size`` is the em size in pixels (at least :data:`MIN_TEXT_PX`). Returns the text width in
    pixels. Clipped at the canvas edges.
    """
    if size < MIN_TEXT_PX:  # the report's legibility rests on it (see the module docstring)
        raise ValueError(f"figure text of {size} px is below the minimum of {MIN_TEXT_PX} px")
    if not text:
        return 0
    alpha = _text_mask(text, size, bold)
    h, w = alpha.shape
    x = {"left": x, "right": x - w, "center": x - w // 2}[anchor]
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(canvas.shape[1], x + w), min(canvas.shape[0], y + h)
    if x1 <= x0 or y1 <= y0:
        return w
    a = alpha[y0 - y : y1 - y, x0 - x : x1 - x, None]
    region = canvas[y0:y1, x0:x1].astype(np.float32)
    canvas[y0:y1, x0:x1] = (region * (1 - a) + np.asarray(colour, np.float32) * a).astype(np.uint8)
    return w


# --------------------------------------------------------------------------- sampling


def _lut(cmap: Colormap) -> np.ndarray:
    return (np.asarray(cmap(np.linspace(0.0, 1.0, 256)))[:, :3] * 255).astype(np.uint8)


def _pixel_index(grid: RasGrid, axis: int, n_px: int) -> np.ndarray:
    """Voxel index along ``axis`` of each of ``n_px`` pixels spanning the volume (nearest)."""
    low, high = grid.extent(axis)
    mm = low + (np.arange(n_px) + 0.5) * (high - low) / n_px
    return np.clip(np.floor((mm - low) / grid.step[axis]).astype(int), 0, grid.data.shape[axis] - 1)


def _panel_size(grid: RasGrid, h: int, v: int, scale: float) -> tuple[int, int]:
    width = max(8, int(round((grid.extent(h)[1] - grid.extent(h)[0]) * scale)))
    height = max(8, int(round((grid.extent(v)[1] - grid.extent(v)[0]) * scale)))
    return width, height


def _sample(plane: np.ndarray, grid: RasGrid, h: int, v: int, size: tuple[int, int]):
    """Resample a 2-D plane (axes h, v) to ``size`` pixels, rows top (superior) to bottom."""
    cols = _pixel_index(grid, h, size[0])
    rows = _pixel_index(grid, v, size[1])[::-1]
    return plane[np.ix_(cols, rows)].T


def _grey(values: np.ndarray, low: float, high: float) -> np.ndarray:
    # Grey levels 30..200, not 0..255: the coloured overlay must stand out of the background.
    level = 30 + np.clip((np.nan_to_num(values) - low) / (high - low), 0.0, 1.0) * 170
    level = np.where(np.isfinite(values) & (values != 0), level, 0).astype(np.uint8)
    return np.repeat(level[..., None], 3, axis=2)


def _colour(values: np.ndarray, lut: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    index = np.clip((values - vmin) / (vmax - vmin) * 255, 0, 255).astype(int)
    return lut[index]


def _edges(inside: np.ndarray) -> np.ndarray:
    """Pixels of ``inside`` with a 4-neighbour outside (a one-pixel outline)."""
    padded = np.pad(inside, 1, constant_values=False)
    core = padded[1:-1, 1:-1]
    return core & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])


def _crop(grids: Sequence[RasGrid | None], keep: np.ndarray, pad: int = 2) -> list:
    """Cut every grid to the bounding box of ``keep`` (plus ``pad`` voxels): no empty margins."""
    if not keep.any():
        return list(grids)
    inside = np.argwhere(keep)
    lo = np.maximum(inside.min(axis=0) - pad, 0)
    hi = np.minimum(inside.max(axis=0) + pad + 1, keep.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    return [
        None if g is None else RasGrid(g.data[box], g.origin + g.step * lo, g.step) for g in grids
    ]


def signed_mip(values: np.ndarray, axis: int) -> np.ndarray:
    """Maximum-intensity projection of ``|values|`` that keeps the sign of the winner.

    Parameters
    ----------
    values : ndarray, float
        NaN counts as 0.
    axis : int

    Returns
    -------
    ndarray
        ``values`` reduced along ``axis``; each entry is the value of largest magnitude.

    Examples
    --------
    >>> signed_mip(np.array([[1.0, -3.0], [2.0, 0.5]]), axis=1).tolist()
    [-3.0, 2.0]
    """
    clean = np.nan_to_num(np.asarray(values, dtype=np.float64))
    winner = np.expand_dims(np.argmax(np.abs(clean), axis=axis), axis)
    return np.take_along_axis(clean, winner, axis=axis).squeeze(axis)


# --------------------------------------------------------------------------- layout


def _fit_scale(grid: RasGrid, with_bar: bool, scale: float | None) -> float:
    """``scale`` if given, else up to PX_PER_MM as fits in MAX_WIDTH, and at least MIN_WIDTH.

    A small volume is enlarged to MIN_WIDTH, so its panels have room for their labels.
    """
    if scale is not None:
        return scale
    span_mm = max(sum(np.ptp(grid.extent(view[2])) for view in VIEWS), 1e-9)
    fixed = 2 * _MARGIN + (len(VIEWS) - 1) * _GAP + (_BAR_SPACE if with_bar else 0)
    fitted = min(PX_PER_MM, (MAX_WIDTH - fixed) / span_mm)
    return float(max(fitted, (MIN_WIDTH - fixed) / span_mm))


def _layout(grid: RasGrid, scale: float | None, with_bar: bool) -> tuple[list[tuple], int, int]:
    scale = _fit_scale(grid, with_bar, scale)
    boxes, x = [], _MARGIN
    height = 0
    for view in VIEWS:
        w, h = _panel_size(grid, view[2], view[3], scale)
        boxes.append((view, x, w, h))
        x += w + _GAP
        height = max(height, h)
    width = x - _GAP + _MARGIN + (_BAR_SPACE - 18 if with_bar else 0)
    return boxes, width, height


def _colour_bar(canvas, x, top, height, lut, vmin, vmax, threshold, signed, label, theme):
    """Vertical colour bar with the hidden range greyed and the threshold(s) ticked."""
    values = np.linspace(vmax, vmin, height)
    strip = _colour(values, lut, vmin, vmax)
    if threshold is not None and threshold > 0:
        hidden = (np.abs(values) <= threshold) if signed else (values <= threshold)
        strip[hidden] = (80, 80, 80)
    canvas[top : top + height, x : x + _BAR_W] = strip[:, None, :]
    ticks = {vmin, vmax}
    if threshold is not None and threshold > 0:
        ticks |= {threshold, -threshold} if signed else {threshold}
    for tick in sorted(ticks):
        row = top + int(round((vmax - tick) / (vmax - vmin) * (height - 1)))
        canvas[row, x - 2 : x + _BAR_W + 3] = theme["ink"]
        _draw_text(canvas, f"{tick:.3g}", x + _BAR_W + 5, row - MIN_TEXT_PX // 2 - 2, theme["ink"])
    _draw_text(canvas, label, x + _BAR_W // 2, top - MIN_TEXT_PX - 16, theme["ink"], bold=True,
               anchor="center")  # fmt: skip


def _frame(width: int, panel_h: int, theme: dict) -> np.ndarray:
    canvas = np.empty((_HEADER + panel_h + _FOOTER, width, 3), dtype=np.uint8)
    canvas[:] = theme["bg"]
    return canvas


def _panel_labels(canvas, x, y, w, h, name, letters, theme, cut_text=""):
    _draw_text(canvas, name, x + w // 2, y - _NAMES + 2, theme["muted"], anchor="center")
    bottom = y + h - MIN_TEXT_PX - 5
    # Text on the image gets a shadow in the background colour, so it reads on any grey level.
    for dx, colour in ((1, theme["bg"]), (0, theme["ink"])):
        _draw_text(canvas, letters[0], x + 3 + dx, bottom + dx, colour, bold=True)
        _draw_text(canvas, letters[1], x + w - 3 + dx, bottom + dx, colour, bold=True,
                   anchor="right")  # fmt: skip
        _draw_text(canvas, cut_text, x + 3 + dx, y + 2 + dx, colour)


def _fitted_title(title: str, room: int) -> tuple[str, float]:
    """The title and its size: smaller, then cut with an ellipsis, if it is wider than ``room``."""
    for size in (_TITLE_PX, MIN_TEXT_PX):
        if _text_mask(title, size, bold=True).shape[1] <= room:
            return title, size
    while len(title) > 1 and _text_mask(title + "…", MIN_TEXT_PX, True).shape[1] > room:
        title = title[:-1]
    return title.rstrip() + "…", MIN_TEXT_PX


def _caption_lines(caption: str, room: int) -> list[str]:
    """The caption on one line, or its ``·``-separated parts on several when it is too wide."""
    if _text_mask(caption, MIN_TEXT_PX).shape[1] <= room:
        return [caption]
    return [part.strip() for part in caption.split("·")]


def _finish(canvas, title, caption, theme) -> bytes:
    """Title above, caption below (growing the canvas when it needs more lines); PNG bytes."""
    room = canvas.shape[1] - 2 * _MARGIN
    text, size = _fitted_title(title, room)
    _draw_text(canvas, text, _MARGIN, 6, theme["ink"], size, bold=True)
    lines = _caption_lines(caption, room)
    if len(lines) > 1:
        extra = np.empty(((len(lines) - 1) * (MIN_TEXT_PX + 8), canvas.shape[1], 3), np.uint8)
        extra[:] = theme["bg"]
        canvas = np.concatenate([canvas, extra])
    top = canvas.shape[0] - len(lines) * (MIN_TEXT_PX + 8) - 1
    for n, line in enumerate(lines):
        _draw_text(canvas, line, _MARGIN, top + n * (MIN_TEXT_PX + 8), theme["muted"])
    return png_bytes(canvas)


def _close(canvas, boxes, y, panel_h, scale, title, what, theme) -> bytes:
    """Colour bar right of the panels, then title and caption (``what`` is shown); PNG bytes."""
    lut, vmin, top, threshold, signed, label = scale
    bar_x = boxes[-1][1] + boxes[-1][2] + 18
    _colour_bar(canvas, bar_x, y + 12, panel_h - 24, lut, vmin, top, threshold, signed, label,
                theme)  # fmt: skip
    shown = format_threshold(threshold, signed, label) if threshold is not None else None
    caption = f"{what} {shown or 'non-zero voxels'}   ·   {CONVENTION}"
    return _finish(canvas, title, caption, theme)


def _stat_setup(stat_vol, threshold, vmax, cmap):
    signed, top = stat_limits(stat_vol, threshold or 0.0, vmax)
    cmap = cmap or (COLD_HOT if signed else HOT)
    return signed, top, _lut(cmap), (-top if signed else 0.0)


def _shown(values: np.ndarray, threshold: float | None, signed: bool) -> np.ndarray:
    finite = np.isfinite(values)
    if threshold is None:
        return finite & (values != 0)
    return finite & ((np.abs(values) if signed else values) > threshold)


def _cut_coords(stat: RasGrid, shown: np.ndarray, fallback: np.ndarray) -> tuple[int, int, int]:
    """Voxel (RAS grid) of the peak displayed value, else the centre of the fallback volume."""
    if shown.any():
        return np.unravel_index(np.argmax(np.where(shown, np.abs(stat.data), -np.inf)), shown.shape)
    inside = np.argwhere(fallback)
    if inside.size == 0:
        return tuple(n // 2 for n in stat.data.shape)
    return tuple(inside.mean(axis=0).round().astype(int))


# --------------------------------------------------------------------------- figures


def slices_png(
    stat_vol: np.ndarray,
    affine: np.ndarray,
    *,
    background_vol: np.ndarray | None,
    threshold: float | None,
    title: str = "",
    colorbar_label: str = "z",
    cut_coords: Sequence[float] | None = None,
    vmax: float | None = None,
    cmap: Colormap | None = None,
    scale: float | None = None,
) -> bytes:
    """Sagittal, coronal and axial slices of a thresholded map over a background, as PNG.

    The cut is at the peak of the displayed voxels (the centre of the background if none), voxels
    with ``|stat| > threshold`` (``stat > threshold`` for maps without negative values) are
    coloured, the colour bar greys out the hidden range and marks the threshold.

    Parameters
    ----------
    stat_vol : ndarray of shape (nx, ny, nz), float
    affine : ndarray of shape (4, 4)
    background_vol : ndarray of shape (nx, ny, nz) or None
        Grey levels (2nd-98th percentile of the non-zero voxels), zeros black.
    threshold : float or None
    title, colorbar_label : str
    cut_coords : (x, y, z) in mm, optional
    vmax : float, optional
    cmap : matplotlib colormap, optional
    scale : float, optional
        Pixels per millimetre; default: up to PX_PER_MM, as fits in MAX_WIDTH.

    Returns
    -------
    bytes
        PNG.

    Raises
    ------
    DataError
        Shapes disagree, or the volume is not 3-D.
    """
    stat_vol = np.asarray(stat_vol, dtype=np.float64)
    check_same_grid("background", background_vol, stat_vol.shape)
    stat = to_ras(stat_vol, affine)
    bg = (
        to_ras(np.asarray(background_vol, np.float64), affine)
        if background_vol is not None
        else None
    )
    signed, top, lut, vmin = _stat_setup(stat.data, threshold, vmax, cmap)
    extent = np.isfinite(stat.data) & (stat.data != 0)
    if bg is not None:
        extent |= np.nan_to_num(bg.data) != 0
    stat, bg = _crop([stat, bg], extent)
    shown = _shown(stat.data, threshold, signed)
    if cut_coords is not None:
        ijk = tuple(stat.index(a, float(cut_coords[a])) for a in range(3))
    else:
        fallback = (np.nan_to_num(bg.data) != 0) if bg is not None else np.isfinite(stat.data)
        ijk = _cut_coords(stat, shown, fallback)
    low, high = robust_range(bg.data) if bg is not None else (0.0, 1.0)
    boxes, width, panel_h = _layout(stat, scale, with_bar=True)
    canvas = _frame(width, panel_h + _NAMES, _DARK)
    y = _HEADER + _NAMES
    for (name, cut, h, v, letters), x, w, hgt in boxes:
        size = (w, hgt)
        rgb = (
            _grey(_sample(np.take(bg.data, ijk[cut], cut), bg, h, v, size), low, high)
            if bg is not None
            else np.zeros((hgt, w, 3), np.uint8)
        )
        values = _sample(np.take(stat.data, ijk[cut], cut), stat, h, v, size)
        on = _sample(np.take(shown, ijk[cut], cut), stat, h, v, size)
        rgb[on] = _colour(values[on], lut, vmin, top)
        # cross-hair at the other two cuts
        col = int((stat.coords(h)[ijk[h]] - stat.extent(h)[0]) * w / np.ptp(stat.extent(h)))
        row = int((stat.extent(v)[1] - stat.coords(v)[ijk[v]]) * hgt / np.ptp(stat.extent(v)))
        rgb[:, min(col, w - 1)] = rgb[:, min(col, w - 1)] // 2 + np.array(_DARK["cross"]) // 2
        rgb[min(row, hgt - 1)] = rgb[min(row, hgt - 1)] // 2 + np.array(_DARK["cross"]) // 2
        canvas[y : y + hgt, x : x + w] = rgb
        mm = stat.coords(cut)[ijk[cut]]
        _panel_labels(canvas, x, y, w, hgt, name, letters, _DARK, f"{'xyz'[cut]} = {mm:.0f} mm")
    scale = (lut, vmin, top, threshold, signed, colorbar_label)
    return _close(canvas, boxes, y, panel_h, scale, title, "shown:", _DARK)


def glass_brain_png(
    stat_vol: np.ndarray,
    affine: np.ndarray,
    *,
    threshold: float | None,
    outline_vol: np.ndarray | None = None,
    title: str = "",
    colorbar_label: str = "z",
    vmax: float | None = None,
    cmap: Colormap | None = None,
    scale: float | None = None,
) -> bytes:
    """Maximum-intensity projections in three views over the brain's silhouette, as PNG.

    The signed value of largest magnitude along each ray is shown (as
    :func:`signed_mip`); the silhouette is the projection of the
    non-zero voxels of ``outline_vol`` (the mask), so no template is needed.

    Parameters
    ----------
    stat_vol : ndarray of shape (nx, ny, nz), float
    affine : ndarray of shape (4, 4)
    threshold : float or None
        Voxels at or below it (in ``|stat|`` for signed maps) are dropped before projecting.
    outline_vol : ndarray of shape (nx, ny, nz), optional
    title, colorbar_label, vmax, cmap, scale
        As in :func:`slices_png`.

    Returns
    -------
    bytes
        PNG.
    """
    stat_vol = np.asarray(stat_vol, dtype=np.float64)
    check_same_grid("outline volume", outline_vol, stat_vol.shape)
    signed, top, lut, vmin = _stat_setup(stat_vol, threshold, vmax, cmap)
    kept = np.where(_shown(stat_vol, threshold, signed), stat_vol, 0.0)
    stat = to_ras(kept, affine)
    outline = to_ras(np.asarray(outline_vol) != 0, affine) if outline_vol is not None else None
    extent = (stat.data != 0) | (outline.data if outline is not None else False)
    stat, outline = _crop([stat, outline], extent)
    boxes, width, panel_h = _layout(stat, scale, with_bar=True)
    canvas = _frame(width, panel_h + _NAMES, _LIGHT)
    y = _HEADER + _NAMES
    for (name, axis, h, v, letters), x, w, hgt in boxes:
        size = (w, hgt)
        rgb = np.empty((hgt, w, 3), np.uint8)
        rgb[:] = _LIGHT["bg"]
        if outline is not None:
            silhouette = _sample(outline.data.any(axis=axis), stat, h, v, size)
            rgb[silhouette] = _SILHOUETTE
            rgb[_edges(silhouette)] = _SILHOUETTE_EDGE
        projection = _sample(signed_mip(stat.data, axis), stat, h, v, size)
        on = projection != 0
        rgb[on] = _colour(projection[on], lut, vmin, top)
        canvas[y : y + hgt, x : x + w] = rgb
        _panel_labels(canvas, x, y, w, hgt, name, letters, _LIGHT)
    scale = (lut, vmin, top, threshold, signed, colorbar_label)
    return _close(canvas, boxes, y, panel_h, scale, title, "maximum-intensity projection of",
                  _LIGHT)  # fmt: skip


def mask_png(
    mask: np.ndarray,
    background: np.ndarray | None,
    affine: np.ndarray,
    *,
    title: str = "",
    n_axial: int = 6,
    scale: float | None = None,
) -> bytes:
    """The analysis mask as a red outline over a background: 3 orthogonal views + axial row.

    Parameters
    ----------
    mask : ndarray of shape (nx, ny, nz), bool
    background : ndarray of shape (nx, ny, nz) or None
        Default: the mask itself (a grey silhouette).
    affine : ndarray of shape (4, 4)
    title : str
    n_axial : int
        Evenly spaced axial slices in the second row.
    scale : float, optional
        Pixels per millimetre; default: up to PX_PER_MM, as fits in MAX_WIDTH.

    Returns
    -------
    bytes
        PNG.

    Raises
    ------
    DataError
        Shapes disagree or the mask is empty.
    """
    mask = np.asarray(mask).astype(bool)
    check_same_grid("background", background, mask.shape)
    if not mask.any():
        raise DataError("report: the mask is empty; there is no outline to draw.")
    m = to_ras(mask, affine)
    bg = to_ras(np.asarray(background if background is not None else mask, np.float64), affine)
    m, bg = _crop([m, bg], m.data)
    low, high = robust_range(bg.data)
    centre = tuple(np.argwhere(m.data).mean(axis=0).round().astype(int))
    boxes, width, panel_h = _layout(m, scale, with_bar=False)
    z_in = np.flatnonzero(m.data.any(axis=(0, 1)))
    levels = np.linspace(z_in[0], z_in[-1], n_axial + 2)[1:-1].round().astype(int)
    small_w = (width - 2 * _MARGIN - (n_axial - 1) * 4) // n_axial
    small_scale = small_w / np.ptp(m.extent(0))
    small_h = _panel_size(m, 0, 1, small_scale)[1]
    canvas = _frame(width, panel_h + _NAMES + small_h + 12, _DARK)
    y = _HEADER + _NAMES

    def draw(x, y, cut, index, h, v, size):
        rgb = _grey(_sample(np.take(bg.data, index, cut), bg, h, v, size), low, high)
        inside = _sample(np.take(m.data, index, cut), m, h, v, size)
        rgb[_edges(inside)] = _OUTLINE
        canvas[y : y + size[1], x : x + size[0]] = rgb

    for (name, cut, h, v, letters), x, w, hgt in boxes:
        draw(x, y, cut, centre[cut], h, v, (w, hgt))
        mm = m.coords(cut)[centre[cut]]
        _panel_labels(canvas, x, y, w, hgt, name, letters, _DARK, f"{'xyz'[cut]} = {mm:.0f} mm")
    y += panel_h + 12
    for n, k in enumerate(levels):
        x = _MARGIN + n * (small_w + 4)
        draw(x, y, 2, int(k), 0, 1, (small_w, small_h))
        _draw_text(canvas, f"z = {m.coords(2)[k]:.0f}", x + 3, y + 2, _DARK["muted"])
    return _finish(canvas, title, CONVENTION, _DARK)
