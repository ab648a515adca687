"""Non-brain figures: design matrix, regressor correlations, contrast weights, permutation null.

Pure functions: arrays in, PNG/SVG bytes out (matplotlib object API, no pyplot).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes

from bids_group.errors import DataError
from bids_group.report._common import ImageFormat, figure_bytes, new_figure


@dataclass(frozen=True)
class DesignSummary:
    """Collinearity diagnostics of a design matrix.

    Attributes
    ----------
    correlation : ndarray of shape (n_params, n_params)
        Pearson correlation between columns (NaN for a constant column such as the intercept).
    condition_number : float
        Ratio of the largest to the smallest singular value of X (inf if rank-deficient).
    """

    correlation: np.ndarray
    condition_number: float


def design_summary(matrix: np.ndarray) -> DesignSummary:
    """Column correlations and condition number of a design matrix.

    Parameters
    ----------
    matrix : ndarray of shape (n_maps, n_params), float

    Returns
    -------
    DesignSummary

    Examples
    --------
    >>> design_summary(np.eye(3)).condition_number
    1.0
    """
    x = np.asarray(matrix, dtype=np.float64)
    centred = x - x.mean(axis=0)
    norms = np.linalg.norm(centred, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = centred / np.where(norms > 0, norms, np.nan)
    correlation = unit.T @ unit
    singular = np.linalg.svd(x, compute_uv=False)
    cond = float(singular[0] / singular[-1]) if singular[-1] > 0 else float("inf")
    return DesignSummary(correlation=correlation, condition_number=cond)


def _check_design(matrix: np.ndarray, column_names: Sequence[str]) -> np.ndarray:
    x = np.asarray(matrix, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(column_names):
        raise DataError(
            f"report: the design matrix has shape {x.shape} but {len(column_names)} column "
            "names were given."
        )
    return x


def _names_axis(ax: Axes, names: Sequence[str], axis: str = "x") -> None:
    ticks = np.arange(len(names))
    if axis == "x":
        ax.set_xticks(ticks)
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
    else:
        ax.set_yticks(ticks)
        ax.set_yticklabels(names, fontsize=8)


def design_matrix_plot(
    matrix: np.ndarray,
    column_names: Sequence[str],
    *,
    row_labels: Sequence[str] | None = None,
    title: str = "Design matrix",
    fmt: ImageFormat = "png",
) -> bytes:
    """The design matrix (each column scaled by its maximum |value|) and column correlations.

    Parameters
    ----------
    matrix : ndarray of shape (n_maps, n_params)
    column_names : sequence of str, length n_params
    row_labels : sequence of str, length n_maps, optional
        E.g. subject labels; shown when there are at most 60 rows.
    title : str
    fmt : {"png", "svg"}

    Returns
    -------
    bytes

    Raises
    ------
    DataError
        If the number of names does not match the columns.
    """
    x = _check_design(matrix, column_names)
    summary = design_summary(x)
    n_maps, n_params = x.shape
    fig = new_figure(10.0, max(3.8, min(7.0, 2.0 + 0.09 * n_maps)))
    grid = fig.add_gridspec(1, 2, width_ratios=[max(1.0, 0.5 * n_params), 1.2 * n_params + 1])
    ax = fig.add_subplot(grid[0, 0])
    scale = np.abs(x).max(axis=0)
    scaled = x / np.where(scale > 0, scale, 1.0)
    ax.imshow(scaled, aspect="auto", cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    for edge in np.arange(n_params - 1) + 0.5:  # a constant white column would vanish otherwise
        ax.axvline(edge, color="#8090a8", linewidth=0.8)
    _names_axis(ax, column_names, "x")
    if row_labels is not None and n_maps <= 60:
        _names_axis(ax, [str(r) for r in row_labels], "y")
        ax.tick_params(axis="y", labelsize=max(4, min(8, 400 // max(n_maps, 1))))
    else:
        ax.set_ylabel(f"{n_maps} maps", fontsize=9)
    ax.set_title("columns scaled to max |value| = 1", fontsize=8, color="#505050")

    ax2 = fig.add_subplot(grid[0, 1])
    corr = np.nan_to_num(summary.correlation, nan=0.0)
    ax2.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1)
    for (i, j), value in np.ndenumerate(summary.correlation):
        text = "–" if np.isnan(value) else f"{value:.2f}"
        colour = "white" if abs(np.nan_to_num(value)) > 0.6 else "black"
        ax2.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
    _names_axis(ax2, column_names, "x")
    _names_axis(ax2, column_names, "y")
    cond = summary.condition_number
    ax2.set_title(f"correlation of columns · condition number {cond:.3g}", fontsize=9)
    fig.suptitle(title, fontsize=11, x=0.01, ha="left")
    fig.subplots_adjust(left=0.12, right=0.98, top=0.86, bottom=0.25, wspace=0.45)
    return figure_bytes(fig, fmt)


def contrast_weights_plot(
    weights: np.ndarray,
    column_names: Sequence[str],
    *,
    title: str = "",
    row_names: Sequence[str] | None = None,
    fmt: ImageFormat = "png",
) -> bytes:
    """Contrast weights as a heat row per contrast row (t: one row, F: several), values printed.

    Parameters
    ----------
    weights : ndarray of shape (n_params,) or (n_rows, n_params)
    column_names : sequence of str, length n_params
    title : str
    row_names : sequence of str, optional
    fmt : {"png", "svg"}

    Returns
    -------
    bytes

    Raises
    ------
    DataError
        If the number of names does not match the weights.
    """
    w = _check_design(np.atleast_2d(weights), column_names)
    n_rows, n_params = w.shape
    fig = new_figure(min(10.0, 1.5 + 0.9 * n_params), 1.3 + 0.35 * n_rows)
    ax = fig.add_subplot()
    top = float(np.abs(w).max()) or 1.0
    ax.imshow(w, cmap="RdBu_r", vmin=-top, vmax=top, aspect="auto")
    for (i, j), value in np.ndenumerate(w):
        colour = "white" if abs(value) > 0.6 * top else "black"
        ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=8, color=colour)
    _names_axis(ax, column_names, "x")
    if row_names is not None or n_rows > 1:
        names = row_names if row_names is not None else [f"row {i + 1}" for i in range(n_rows)]
        _names_axis(ax, names, "y")
    else:
        ax.set_yticks([])
    ax.set_title(title, fontsize=10, loc="left")
    fig.subplots_adjust(left=0.15, right=0.98, top=0.8, bottom=0.4)
    return figure_bytes(fig, fmt)


def null_distribution_plot(
    null_max: np.ndarray,
    observed_max: float,
    critical: float,
    *,
    alpha: float = 0.05,
    stat_label: str = "max z",
    title: str = "",
    fmt: ImageFormat = "png",
) -> bytes:
    """Histogram of a permutation null of the maximum, with the observed value and critical value.

    Parameters
    ----------
    null_max : ndarray of shape (n_permutations,)
        Maximum statistic of each permutation (including the identity, if the method does).
    observed_max : float
        The maximum of the unpermuted data.
    critical : float
        The (1 - alpha) quantile used as the corrected threshold.
    alpha : float
        Level, only for the legend.
    stat_label : str
        What the maximum is of, e.g. ``"max |z|"``, ``"max cluster size (voxels)"``, ``"max TFCE"``.
    title : str
    fmt : {"png", "svg"}

    Returns
    -------
    bytes

    Raises
    ------
    DataError
        If ``null_max`` is empty or not finite.
    """
    null = np.asarray(null_max, dtype=np.float64).ravel()
    if null.size == 0 or not np.all(np.isfinite(null)):
        raise DataError("report: the permutation null distribution is empty or not finite.")
    fig = new_figure(9.0, 3.4)
    ax = fig.add_subplot()
    bins = min(60, max(10, null.size // 20))
    ax.hist(null, bins=bins, color="#8fa8c8", edgecolor="white", linewidth=0.4,
            label=f"null ({null.size} permutations)")  # fmt: skip
    ax.axvline(critical, color="#d08000", linestyle="--", linewidth=1.6,
               label=f"critical value ({1 - alpha:.0%} quantile) = {critical:.3g}")  # fmt: skip
    ax.axvline(observed_max, color="#c00020", linewidth=2.0,
               label=f"observed = {observed_max:.3g}")  # fmt: skip
    ax.set_xlim(right=1.04 * max(observed_max, critical, float(null.max())))
    ax.set_xlabel(stat_label, fontsize=9)
    ax.set_ylabel("permutations", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=10, loc="left")
    fig.subplots_adjust(left=0.08, right=0.64, top=0.88, bottom=0.16)
    return figure_bytes(fig, fmt)
