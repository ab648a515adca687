"""Orthogonal slices of a thresholded map over a background, and the mask outline figure.

Pure functions: arrays in, PNG/SVG bytes out. Neurological convention (L on the left).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize

from bids_group.report._common import (
    COLD_HOT,
    CONVENTION,
    HOT,
    VIEWS,
    ImageFormat,
    RasGrid,
    check_same_grid,
    figure_bytes,
    format_threshold,
    new_figure,
    robust_range,
    stat_limits,
    to_ras,
)

_AXIS_NAMES = "xyz"


def _slice(grid: RasGrid, cut_axis: int, index: int) -> np.ndarray:
    # Rows of the returned 2-D array run along the vertical axis (for imshow origin="lower").
    return np.take(grid.data, index, axis=cut_axis).T


def _extent(grid: RasGrid, horizontal: int, vertical: int) -> tuple[float, float, float, float]:
    return (*grid.extent(horizontal), *grid.extent(vertical))


def _auto_cut(stat: RasGrid, shown: np.ndarray, fallback: RasGrid | None) -> tuple[float, ...]:
    """World coordinates of the peak of the shown voxels, else the centre of the fallback."""
    if shown.any():
        ijk = np.unravel_index(np.argmax(np.where(shown, np.abs(stat.data), -np.inf)), shown.shape)
    else:
        source = fallback.data if fallback is not None else np.isfinite(stat.data)
        nonzero = np.argwhere(np.nan_to_num(source) != 0)
        ijk = (
            nonzero.mean(axis=0).round().astype(int)
            if nonzero.size
            else np.array(stat.data.shape) // 2
        )
    return tuple(float(stat.origin[a] + stat.step[a] * ijk[a]) for a in range(3))


def _draw_background(ax: Axes, background: RasGrid | None, cut: int, idx: int, extent) -> None:
    ax.set_facecolor("black")
    if background is None:
        return
    low, high = robust_range(background.data)
    image = np.ma.masked_where(
        ~np.isfinite(_slice(background, cut, idx)) | (_slice(background, cut, idx) == 0),
        _slice(background, cut, idx),
    )
    ax.imshow(image, cmap="gray", vmin=low, vmax=high, origin="lower", extent=extent)


def _label_panel(ax: Axes, name: str, cut_mm: float, cut_axis: int, letters) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    style = {"color": "white", "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.03, letters[0], ha="left", va="bottom", **style)
    ax.text(0.98, 0.03, letters[1], ha="right", va="bottom", **style)
    ax.text(0.02, 0.97, f"{_AXIS_NAMES[cut_axis]} = {cut_mm:.0f} mm", ha="left", va="top",
            color="white", fontsize=8, transform=ax.transAxes)  # fmt: skip
    ax.set_title(name, color="white", fontsize=9, pad=3)


def _shown_mask(stat: np.ndarray, threshold: float | None, signed: bool) -> np.ndarray:
    finite = np.isfinite(stat)
    if threshold is None:
        return finite & (stat != 0)
    values = np.abs(stat) if signed else stat
    return finite & (values > threshold)


def _colorbar(ax_cbar: Axes, cmap: Colormap, norm: Normalize, threshold, signed, label):
    mappable = ax_cbar.figure.colorbar(
        _scalar_mappable(cmap, norm), cax=ax_cbar, orientation="vertical"
    )
    mappable.set_label(label, color="white", fontsize=9)
    mappable.ax.tick_params(colors="white", labelsize=8)
    mappable.outline.set_edgecolor("white")
    if threshold is not None and threshold > 0:
        # Grey out the range that is not displayed, and mark the threshold itself.
        low = -threshold if signed else norm.vmin
        ax_cbar.axhspan(low, threshold, color="#505050", zorder=3)
        for level in (-threshold, threshold) if signed else (threshold,):
            ax_cbar.axhline(level, color="white", linewidth=1.2, zorder=4)
        ticks = sorted({norm.vmin, *((-threshold,) if signed else ()), threshold, norm.vmax})
        mappable.set_ticks(ticks)
        mappable.set_ticklabels([f"{t:.3g}" for t in ticks])


def _scalar_mappable(cmap: Colormap, norm: Normalize):
    from matplotlib.cm import ScalarMappable

    return ScalarMappable(norm=norm, cmap=cmap)


def orthogonal_slices(
    stat_vol: np.ndarray,
    affine: np.ndarray,
    *,
    background_vol: np.ndarray | None = None,
    threshold: float | None,
    cmap: Colormap | str | None = None,
    cut_coords: Sequence[float] | None = None,
    title: str = "",
    colorbar_label: str = "z",
    vmax: float | None = None,
    fmt: ImageFormat = "png",
) -> bytes:
    """Sagittal, coronal and axial slices of a thresholded map over a background.

    Parameters
    ----------
    stat_vol : ndarray of shape (nx, ny, nz), float
        Statistical map (NaN = not shown).
    affine : ndarray of shape (4, 4)
        Voxel-to-world affine shared by ``stat_vol`` and ``background_vol``.
    background_vol : ndarray of shape (nx, ny, nz), optional
        Grey-level background (e.g. the mean of the input maps, or the mask); zeros are black.
    threshold : float or None
        Voxels with ``|stat| > threshold`` (``stat > threshold`` when the map has no negative
        value) are coloured; ``None`` colours every non-zero voxel. Stated in the colour bar and
        the caption, in the units of ``colorbar_label``.
    cmap : matplotlib colormap or name, optional
        Default: cold-hot for signed maps, dark red -> yellow for non-negative ones.
    cut_coords : (x, y, z) in mm, optional
        Where to cut; default: the peak of the displayed voxels (the mask centre if none).
    title : str
    colorbar_label : str
        Units of the map, e.g. ``"z"``, ``"t"``, ``"TDP"``.
    vmax : float, optional
        Top of the colour scale; default the largest ``|stat|``.
    fmt : {"png", "svg"}

    Returns
    -------
    bytes
        The encoded figure.

    Raises
    ------
    DataError
        Shapes disagree, or the volume is not 3-D.
    """
    stat_vol = np.asarray(stat_vol, dtype=np.float64)
    check_same_grid("background", background_vol, stat_vol.shape)
    stat = to_ras(stat_vol, affine)
    background = (
        to_ras(np.asarray(background_vol, float), affine) if background_vol is not None else None
    )
    signed, top = stat_limits(stat.data, threshold or 0.0, vmax)
    shown = _shown_mask(stat.data, threshold, signed)
    cmap = cmap or (COLD_HOT if signed else HOT)
    norm = Normalize(vmin=-top if signed else 0.0, vmax=top)
    cut = tuple(cut_coords) if cut_coords is not None else _auto_cut(stat, shown, background)

    fig = new_figure(10.0, 3.6, facecolor="black")
    spans = [stat.extent(h)[1] - stat.extent(h)[0] for _, _, h, _, _ in VIEWS]
    grid = fig.add_gridspec(1, 4, width_ratios=[*spans, 0.06 * sum(spans)], wspace=0.04)
    for col, (name, cut_axis, h, v, letters) in enumerate(VIEWS):
        ax = fig.add_subplot(grid[0, col])
        idx = stat.index(cut_axis, cut[cut_axis])
        extent = _extent(stat, h, v)
        _draw_background(ax, background, cut_axis, idx, extent)
        layer = np.ma.masked_array(_slice(stat, cut_axis, idx), _slice(~shown, cut_axis, idx))
        ax.imshow(layer, cmap=cmap, norm=norm, origin="lower", extent=extent,
                  interpolation="nearest")  # fmt: skip
        ax.axvline(cut[h], color="#80ff80", linewidth=0.5, alpha=0.6)
        ax.axhline(cut[v], color="#80ff80", linewidth=0.5, alpha=0.6)
        ax.set_xlim(extent[:2])
        ax.set_ylim(extent[2:])
        ax.set_aspect("equal")
        _label_panel(ax, name, cut[cut_axis], cut_axis, letters)
    cbar_grid = grid[0, 3].subgridspec(3, 1, height_ratios=[0.12, 0.76, 0.12])
    _colorbar(fig.add_subplot(cbar_grid[1, 0]), cmap, norm, threshold, signed, colorbar_label)
    caption = (
        f"shown: {format_threshold(threshold, signed, colorbar_label)}"
        if threshold is not None
        else "shown: non-zero voxels"
    )
    fig.suptitle(title, color="white", fontsize=11, x=0.01, ha="left", y=0.99)
    fig.text(0.01, 0.015, f"{caption}   ·   {CONVENTION}", color="#c0c0c0", fontsize=7.5)
    fig.subplots_adjust(left=0.01, right=0.92, top=0.86, bottom=0.08)
    return figure_bytes(fig, fmt)


def mask_outline(
    mask: np.ndarray,
    background: np.ndarray | None,
    affine: np.ndarray,
    *,
    title: str = "",
    n_axial: int = 7,
    fmt: ImageFormat = "png",
) -> bytes:
    """The analysis mask as a red outline over a background: 3 orthogonal + axial mosaic.

    Parameters
    ----------
    mask : ndarray of shape (nx, ny, nz), bool
    background : ndarray of shape (nx, ny, nz), optional
        Grey-level background; default the mask itself (a grey silhouette).
    affine : ndarray of shape (4, 4)
    title : str
        E.g. ``"Analysis mask: 52,341 voxels"``.
    n_axial : int
        Number of evenly spaced axial slices in the second row.
    fmt : {"png", "svg"}

    Returns
    -------
    bytes

    Raises
    ------
    DataError
        Shapes disagree, the volume is not 3-D, or the mask is empty.
    """
    from bids_group.errors import DataError

    mask = np.asarray(mask).astype(bool)
    check_same_grid("background", background, mask.shape)
    if not mask.any():
        raise DataError("report: the mask is empty; there is no outline to draw.")
    m = to_ras(mask.astype(np.float64), affine)
    bg = to_ras(np.asarray(background if background is not None else mask, float), affine)
    centre = np.argwhere(m.data > 0).mean(axis=0).round().astype(int)
    cut = tuple(float(m.origin[a] + m.step[a] * centre[a]) for a in range(3))

    fig = new_figure(10.0, 5.6, facecolor="black")
    outer = fig.add_gridspec(2, 1, height_ratios=[1.5, 1.0], hspace=0.12)
    spans = [m.extent(h)[1] - m.extent(h)[0] for _, _, h, _, _ in VIEWS]
    top = outer[0].subgridspec(1, 3, width_ratios=spans, wspace=0.04)
    for col, (name, cut_axis, h, v, letters) in enumerate(VIEWS):
        ax = fig.add_subplot(top[0, col])
        _outline_panel(ax, m, bg, cut_axis, m.index(cut_axis, cut[cut_axis]), h, v)
        _label_panel(ax, name, cut[cut_axis], cut_axis, letters)
    z_in = np.flatnonzero(m.data.any(axis=(0, 1)))
    levels = np.linspace(z_in[0], z_in[-1], n_axial + 2)[1:-1].round().astype(int)
    row = outer[1].subgridspec(1, n_axial, wspace=0.02)
    for col, k in enumerate(levels):
        ax = fig.add_subplot(row[0, col])
        _outline_panel(ax, m, bg, 2, int(k), 0, 1)
        _label_panel(ax, "", float(m.coords(2)[k]), 2, ("L", "R"))
    fig.suptitle(title, color="white", fontsize=11, x=0.01, ha="left", y=0.99)
    fig.text(0.01, 0.012, CONVENTION, color="#c0c0c0", fontsize=7.5)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.05)
    return figure_bytes(fig, fmt)


def _outline_panel(ax: Axes, m: RasGrid, bg: RasGrid, cut: int, idx: int, h: int, v: int) -> None:
    extent = _extent(m, h, v)
    _draw_background(ax, bg, cut, idx, extent)
    piece = _slice(m, cut, idx)
    if piece.any() and not piece.all():
        xs = m.coords(h)
        ys = m.coords(v)
        ax.contour(xs, ys, piece, levels=[0.5], colors="#ff3030", linewidths=1.0)
    ax.set_xlim(extent[:2])
    ax.set_ylim(extent[2:])
    ax.set_aspect("equal")
