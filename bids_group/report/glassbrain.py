"""Glass brain: maximum-intensity projections in three views, over the outline of the brain.

No template is downloaded: the outline is the contour of the projection of the mask (or of the
non-zero background), so it shows the analysed volume itself. Neurological convention.
"""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
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
    stat_limits,
    to_ras,
)


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


def _panel(
    ax: Axes,
    stat: RasGrid,
    outline: RasGrid | None,
    view: tuple,
    *,
    cmap: Colormap,
    norm: Normalize,
) -> None:
    name, axis, h, v, letters = view
    projection = signed_mip(stat.data, axis).T  # rows along the vertical axis
    extent = (*stat.extent(h), *stat.extent(v))
    if outline is not None:
        silhouette = (outline.data != 0).any(axis=axis).T.astype(float)
        ax.contourf(stat.coords(h), stat.coords(v), silhouette, levels=[0.5, 1.5],
                    colors=["#f2f2f2"])  # fmt: skip
        ax.contour(stat.coords(h), stat.coords(v), silhouette, levels=[0.5],
                   colors="#707070", linewidths=1.0)  # fmt: skip
    shown = np.ma.masked_where(projection == 0, projection)
    # zorder: images default below contour collections; the map must sit on the silhouette.
    ax.imshow(shown, cmap=cmap, norm=norm, origin="lower", extent=extent,
              interpolation="nearest", zorder=3)  # fmt: skip
    ax.set_xlim(extent[:2])
    ax.set_ylim(extent[2:])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    style = {"color": "#303030", "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.0, 0.0, letters[0], ha="left", va="bottom", **style)
    ax.text(1.0, 0.0, letters[1], ha="right", va="bottom", **style)
    ax.set_title(name, fontsize=9, color="#303030", pad=3)


def glass_brain(
    stat_vol: np.ndarray,
    affine: np.ndarray,
    *,
    threshold: float | None,
    outline_vol: np.ndarray | None = None,
    cmap: Colormap | str | None = None,
    title: str = "",
    colorbar_label: str = "z",
    vmax: float | None = None,
    fmt: ImageFormat = "png",
) -> bytes:
    """Maximum-intensity projections (sagittal, coronal, axial) of a thresholded map.

    Parameters
    ----------
    stat_vol : ndarray of shape (nx, ny, nz), float
    affine : ndarray of shape (4, 4)
    threshold : float or None
        Voxels with ``|stat| <= threshold`` (``stat <= threshold`` for non-negative maps) are
        dropped before projecting; ``None`` projects every non-zero voxel.
    outline_vol : ndarray of shape (nx, ny, nz), optional
        Mask or background whose non-zero voxels define the brain silhouette drawn underneath.
    cmap, title, colorbar_label, vmax, fmt
        As in :func:`bids_group.report.slices.orthogonal_slices`.

    Returns
    -------
    bytes

    Raises
    ------
    DataError
        Shapes disagree, or the volume is not 3-D.
    """
    stat_vol = np.asarray(stat_vol, dtype=np.float64)
    check_same_grid("outline volume", outline_vol, stat_vol.shape)
    signed, top = stat_limits(stat_vol, threshold or 0.0, vmax)
    values = np.abs(stat_vol) if signed else stat_vol
    kept = np.where(np.isfinite(stat_vol) & (values > (threshold or 0.0)), stat_vol, 0.0)
    if threshold is None:
        kept = np.nan_to_num(stat_vol)
    stat = to_ras(kept, affine)
    outline = to_ras(np.asarray(outline_vol), affine) if outline_vol is not None else None
    cmap = cmap or (COLD_HOT if signed else HOT)
    norm = Normalize(vmin=-top if signed else 0.0, vmax=top)

    fig = new_figure(10.0, 3.6)
    spans = [stat.extent(h)[1] - stat.extent(h)[0] for _, _, h, _, _ in VIEWS]
    grid = fig.add_gridspec(1, 4, width_ratios=[*spans, 0.06 * sum(spans)], wspace=0.06)
    for col, view in enumerate(VIEWS):
        _panel(fig.add_subplot(grid[0, col]), stat, outline, view, cmap=cmap, norm=norm)
    cax = fig.add_subplot(grid[0, 3].subgridspec(3, 1, height_ratios=[0.12, 0.76, 0.12])[1, 0])
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    bar.set_label(colorbar_label, fontsize=9)
    bar.ax.tick_params(labelsize=8)
    if threshold is not None and threshold > 0:
        cax.axhspan(-threshold if signed else norm.vmin, threshold, color="#d0d0d0", zorder=3)
        for level in (-threshold, threshold) if signed else (threshold,):
            cax.axhline(level, color="black", linewidth=1.0, zorder=4)
        ticks = sorted({norm.vmin, *((-threshold,) if signed else ()), threshold, norm.vmax})
        bar.set_ticks(ticks)
        bar.set_ticklabels([f"{t:.3g}" for t in ticks])
    caption = (
        f"maximum-intensity projection of {format_threshold(threshold, signed, colorbar_label)}"
        if threshold is not None
        else "maximum-intensity projection of non-zero voxels"
    )
    fig.suptitle(title, fontsize=11, x=0.01, ha="left", y=0.99)
    fig.text(0.01, 0.015, f"{caption}   ·   {CONVENTION}", color="#505050", fontsize=7.5)
    fig.subplots_adjust(left=0.01, right=0.92, top=0.86, bottom=0.08)
    return figure_bytes(fig, fmt)
