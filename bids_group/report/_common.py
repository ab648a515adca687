"""Shared helpers for report figures: canonical orientation, colour maps, colour limits.

Display convention: **neurological** (the subject's left is on the left of the image, "L" and
"R" are printed on the panels). Volumes are first reoriented to the closest RAS+ voxel order
(no resampling; obliquity, if any, is ignored for display only), so every axis runs left->right,
posterior->anterior, inferior->superior in world millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel import orientations

from bids_group.errors import DataError

#: Statement printed under brain figures.
CONVENTION = "Neurological convention: left hemisphere on the left"
#: The three orthogonal views in RAS order: (name, cut or projected axis, horizontal axis,
#: vertical axis, letters at the left and right edges).
VIEWS = (
    ("sagittal", 0, 1, 2, ("P", "A")),
    ("coronal", 1, 0, 2, ("L", "R")),
    ("axial", 2, 0, 1, ("L", "R")),
)

#: Height (em size, pixels) of the smallest text in a figure; titles are larger.
MIN_TEXT_PX = 17


@dataclass(frozen=True)
class RasGrid:
    """A volume reoriented to RAS+ voxel order, with the world position of each axis.

    Attributes
    ----------
    data : ndarray of shape (nx, ny, nz)
    origin : ndarray of shape (3,)
        World coordinates (mm) of voxel (0, 0, 0).
    step : ndarray of shape (3,)
        Voxel size along x, y, z (mm, positive).
    """

    data: np.ndarray
    origin: np.ndarray
    step: np.ndarray

    def coords(self, axis: int) -> np.ndarray:
        """World coordinates (mm) of the voxel centres along ``axis``."""
        return self.origin[axis] + self.step[axis] * np.arange(self.data.shape[axis])

    def extent(self, axis: int) -> tuple[float, float]:
        """Edges (mm) of the volume along ``axis``, for ``imshow(extent=...)``."""
        c = self.coords(axis)
        half = self.step[axis] / 2.0
        return float(c[0] - half), float(c[-1] + half)

    def index(self, axis: int, mm: float) -> int:
        """Nearest voxel index along ``axis`` to the world coordinate ``mm`` (clipped)."""
        i = int(round((mm - self.origin[axis]) / self.step[axis]))
        return int(np.clip(i, 0, self.data.shape[axis] - 1))


def to_ras(volume: np.ndarray, affine: np.ndarray) -> RasGrid:
    """Reorient ``volume`` to the closest RAS+ voxel order (flips/transposes only).

    Parameters
    ----------
    volume : ndarray of shape (nx, ny, nz)
    affine : ndarray of shape (4, 4)

    Returns
    -------
    RasGrid

    Raises
    ------
    DataError
        If the volume is not 3-D or the affine not 4x4.
    """
    volume = np.asarray(volume)
    affine = np.asarray(affine, dtype=np.float64)
    if volume.ndim != 3 or affine.shape != (4, 4):
        raise DataError(
            f"report: expected a 3-D volume and a 4x4 affine; got {volume.shape}, {affine.shape}."
        )
    ornt = orientations.io_orientation(affine)
    data = orientations.apply_orientation(volume, ornt)
    new_affine = affine @ orientations.inv_ornt_aff(ornt, volume.shape)
    step = np.abs(np.diag(new_affine)[:3])
    step[step == 0] = 1.0
    return RasGrid(data=data, origin=new_affine[:3, 3].copy(), step=step)


def check_same_grid(name: str, volume: np.ndarray | None, shape: tuple[int, ...]) -> None:
    """Raise DataError if ``volume`` is given and its shape is not ``shape``."""
    if volume is not None and np.shape(volume) != tuple(shape):
        raise DataError(
            f"report: the {name} has shape {np.shape(volume)} but the statistical map has "
            f"shape {tuple(shape)}; they must be on the same grid."
        )


def robust_range(values: np.ndarray) -> tuple[float, float]:
    """2nd-98th percentile of the finite non-zero values (for background grey levels)."""
    finite = values[np.isfinite(values) & (values != 0)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [2.0, 98.0])
    return float(low), float(high if high > low else low + 1.0)


def stat_limits(stat: np.ndarray, threshold: float, vmax: float | None) -> tuple[bool, float]:
    """Whether the map is signed, and the colour scale maximum (>= threshold)."""
    finite = stat[np.isfinite(stat)]
    signed = bool(finite.size and finite.min() < 0)
    peak = float(np.abs(finite).max()) if finite.size else 1.0
    top = float(vmax) if vmax is not None else peak
    return signed, max(top, threshold * 1.05, 1e-12)


def format_threshold(threshold: float, signed: bool, label: str) -> str:
    """``"|z| > 3.10"`` or ``"z > 3.10"``."""
    name = label or "value"
    return f"|{name}| > {threshold:.3g}" if signed else f"{name} > {threshold:.3g}"
