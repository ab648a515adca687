"""Per-voxel missing data (``--min-coverage``): which voxels are analysed, on which maps.

In big cohorts every subject lacks some voxels (signal dropout, a cropped cerebellum), and the
intersection of the maps' supports shrinks as N grows. With a coverage threshold a voxel is
analysed when at least ``min_maps`` maps have data there (:func:`bids_group.images.
load_masked_data`), using only those maps, with its own residual degrees of freedom ``k - p``
(the approach of the Big Linear Model toolbox, BLM, by Maullin-Sapey and Nichols:
https://github.com/TomMaullin/BLM). The OLS fit on the maps present is exactly
a weighted least-squares fit with unit weights whose covariance is scaled by ``RSS / (k - p)``
(:mod:`bids_group.estimation` fits it that way, with the compiled per-voxel kernels of the
mixed-effects module); a voxel where the maps present leave the design rank deficient (e.g. one
group absent) is dropped with a warning.
"""

from __future__ import annotations

import math

from bids_group.errors import UsageError


def min_maps(value: float, n_maps: int, n_columns: int, where: str) -> int:
    """The number of maps a voxel needs: ``ceil(value * n_maps)`` for a fraction (<= 1), else
    ``value`` (a count).

    Raises
    ------
    UsageError
        A count that is not an integer or exceeds ``n_maps``, or a threshold that leaves fewer
        than ``n_columns + 1`` maps (no residual degrees of freedom).

    Examples
    --------
    >>> min_maps(0.8, 50, 3, "model"), min_maps(40, 50, 3, "model"), min_maps(1, 50, 3, "model")
    (40, 40, 50)
    """
    if value <= 1:
        count = math.ceil(value * n_maps - 1e-9)
    elif float(value).is_integer():
        count = int(value)
    else:
        raise UsageError(
            f"--min-coverage {value:g}: give a fraction of the maps (<= 1, e.g. 0.9) or a "
            "whole number of maps (e.g. 40)"
        )
    if count > n_maps:
        raise UsageError(
            f"--min-coverage {value:g} asks for {count} maps per voxel but the model for "
            f"{where} has {n_maps}"
        )
    if count < n_columns + 1:
        raise UsageError(
            f"--min-coverage {value:g} allows voxels with {count} map(s), but the model for "
            f"{where} has {n_columns} design columns: a voxel needs at least {n_columns + 1} "
            "maps (one residual degree of freedom); raise --min-coverage"
        )
    return count


def refused_with(*, permutation: bool, smoothing: bool, residuals: bool) -> str | None:
    """The option that cannot go with per-voxel missing data, or None."""
    if permutation:
        return (
            "permutation inference (relabelling maps that are missing at some voxels would mix "
            "voxels with different maps; not implemented)"
        )
    if smoothing:
        return "--smoothing-fwhm (smoothing would spread each map's missing region)"
    if residuals:
        return "--write-residuals (the maps missing at a voxel have no residual there)"
    return None
