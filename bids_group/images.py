"""Load the maps into a masked data matrix: grid checks, optional resampling, mask, smoothing.

This is the only module (with :mod:`bids_group.outputs`) that reads NIfTI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class MaskedData:
    """The data matrix the GLM sees.

    Attributes
    ----------
    data : ndarray of shape (n_maps, n_voxels), float32
        In-mask values, finite everywhere.
    mask : ndarray of shape (nx, ny, nz), bool
    affine : ndarray of shape (4, 4), float64
    header_zooms : tuple of float
        Voxel sizes in mm.
    n_dropped : int
        Voxels excluded from the automatic mask because they were zero / non-finite in some map
        (0 when the user gave a mask... counting only those made non-finite).
    """

    data: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    voxel_size: tuple[float, float, float]
    n_dropped: int = 0


def load_masked_data(
    paths: Sequence[Path],
    *,
    mask_path: Path | None = None,
    resample: bool = False,
    smoothing_fwhm: float | None = None,
    n_jobs: int = 1,
) -> MaskedData:
    """Read maps as float32, check/resample grids, build the mask, smooth, and mask.

    Raises DataError (65) for grid mismatch without ``resample``, empty mask, unreadable image;
    MissingInputError (66) for a missing mask file.
    """
    raise NotImplementedError
