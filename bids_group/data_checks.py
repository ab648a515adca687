"""Checks of the masked data that find what a fit would silently get wrong.

Pure numpy on the ``(n_maps, n_voxels)`` matrix of :class:`~bids_group.images.MaskedData`;
the pipeline turns each finding into a WARNING (on stderr and in the report) naming the maps
or counting the voxels. Nothing here changes the data: these are things a user should see.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from bids_group.memory import TiledMaps, iter_tiles

#: A map whose largest |value| exceeds this many times the median map's largest |value| is an
#: outlier (units off by orders of magnitude, a failed first-level fit, 1e30 fill values).
OUTLIER_FACTOR = 1e3
#: Bytes of the values checked at once: the temporaries of a step stay in the CPU cache.
_STEP_BYTES = 1024**2
#: float32's largest finite value: maps are written as float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class DataFindings:
    """What :func:`check_masked_data` found.

    Attributes
    ----------
    outliers : tuple of (int, float)
        (map index, largest |value|) of each outlier map (see :data:`OUTLIER_FACTOR`).
    median_max : float
        The median over maps of each map's largest |value| (what outliers are compared with).
    zero_maps : tuple of int
        Maps that are zero at every voxel of the mask.
    all_zero_voxels : int
        Voxels where every map is zero: t = 0 there.
    constant_voxels : int
        Voxels (not all zero) where every map has the same value: no variance between maps,
        so the residual variance is 0 and t is the effect over a tiny floor (huge).
    """

    outliers: tuple[tuple[int, float], ...] = ()
    median_max: float = 0.0
    zero_maps: tuple[int, ...] = ()
    all_zero_voxels: int = 0
    constant_voxels: int = 0


def check_masked_data(data: np.ndarray | TiledMaps, *, n_jobs: int = 1) -> DataFindings:
    """Find outlier maps, all-zero maps and voxels without variance between maps.

    Parameters
    ----------
    data : ndarray of shape (n_maps, n_voxels), or TiledMaps
        Finite in-mask values, in memory or in the tiled store (read one tile at a time).
    n_jobs : int
        Threads checking the steps of a tile (numpy releases the GIL); the findings do not
        depend on it.

    Returns
    -------
    DataFindings

    Examples
    --------
    >>> data = np.array([[1.0, 2.0, 0.0, 5.0], [2.0, 1.0, 0.0, 5.0], [1e30, 3.0, 0.0, 5.0]])
    >>> found = check_masked_data(data)
    >>> found.outliers, found.all_zero_voxels, found.constant_voxels
    (((2, 1e+30),), 1, 1)
    """
    if not isinstance(data, TiledMaps):
        data = np.asarray(data)
    n_maps, n_voxels = data.shape
    if n_maps * n_voxels == 0:
        return DataFindings()
    largest = np.zeros(n_maps, dtype=np.float64)
    constant = np.ones(n_voxels, dtype=bool)
    all_zero = np.ones(n_voxels, dtype=bool)
    step = max(1, _STEP_BYTES // (4 * n_maps))

    def check_steps(block: slice, tile: np.ndarray, starts: range) -> np.ndarray:
        """Check some steps of a tile (each its own voxels); return each map's largest |x|."""
        found = np.zeros(n_maps, dtype=np.float64)
        for start in starts:
            values = tile[:, start : start + step]
            voxels = slice(block.start + start, block.start + start + values.shape[1])
            # fmax/fmin skip NaN: a map without data at a voxel (--min-coverage)
            np.maximum(found, np.fmax.reduce(values, axis=1, initial=0.0), out=found)
            np.maximum(found, -np.fmin.reduce(values, axis=1, initial=0.0), out=found)
            # every map has the same value (NaN: never the same, as with ==)
            constant[voxels] = values.max(axis=0) == values.min(axis=0)
            all_zero[voxels] = values[0] == 0
        return found

    n_threads = max(1, int(n_jobs))
    with ThreadPoolExecutor(n_threads) if n_threads > 1 else nullcontext() as pool:
        # One tile at a time (no full-size temporary: the data can be most of the memory
        # used), in steps whose temporaries stay in the CPU cache.
        for block, tile in iter_tiles(data):
            starts = range(0, block.stop - block.start, step)
            if pool is None:
                np.maximum(largest, check_steps(block, tile, starts), out=largest)
                continue
            runs = [pool.submit(check_steps, block, tile, starts[i::n_threads])
                    for i in range(n_threads)]  # fmt: skip
            for run in runs:
                np.maximum(largest, run.result(), out=largest)
    return findings_from(largest, constant, all_zero)


def findings_from(
    largest: np.ndarray, constant: np.ndarray, first_zero: np.ndarray
) -> DataFindings:
    """The findings from each map's largest ``|value|`` and, per voxel, whether every map has
    the same value there and whether the first map is zero there (what
    :func:`check_masked_data` gathers, or what a streamed fit gathered while decoding).

    >>> found = findings_from(np.array([2.0, 0.0, 5e3]), np.array([True, True, False]),
    ...                       np.array([True, False, True]))
    >>> found.outliers, found.zero_maps, found.all_zero_voxels, found.constant_voxels
    (((2, 5000.0),), (1,), 1, 1)
    """
    all_zero = constant & first_zero
    median_max = float(np.median(largest))
    outliers: tuple[tuple[int, float], ...] = ()
    if median_max > 0:
        flagged = np.flatnonzero(largest > OUTLIER_FACTOR * median_max)
        outliers = tuple((int(i), float(largest[i])) for i in flagged)
    return DataFindings(
        outliers=outliers,
        median_max=median_max,
        zero_maps=tuple(int(i) for i in np.flatnonzero(largest == 0)),
        all_zero_voxels=int(np.count_nonzero(all_zero)),
        constant_voxels=int(np.count_nonzero(constant & ~all_zero)),
    )


def float32_overflow(values: np.ndarray) -> int:
    """How many finite values are too large for float32 (they would be written as +-inf).

    >>> float32_overflow(np.array([1.0, 1e39, -1e300, np.inf]))
    2
    """
    values = np.asarray(values)
    if values.dtype == np.float32 or not np.issubdtype(values.dtype, np.floating):
        return 0
    return int(np.count_nonzero(np.isfinite(values) & (np.abs(values) > FLOAT32_MAX)))
