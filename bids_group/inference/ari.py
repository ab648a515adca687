"""All-Resolution Inference (ARI): simultaneous lower bounds on the true discovery proportion.

ARI (Rosenblatt et al. 2018, NeuroImage 181:786-796) is closed testing with Simes local tests
over all in-mask voxels. Its shortcut (Goeman, Meijer, Krebs & Solari 2019, Biometrika 106(4):
841-856) needs one number, the *Hommel value* ``h``: the size of the largest set of hypotheses
that the Simes test does not reject. From ``h`` the lower bound of the number of true discoveries
in *any* set ``S`` follows in ``O(|S| log |S|)``, and the bounds hold simultaneously for every
set at level ``alpha``, so they stay valid for clusters chosen after looking at the data, for
several cluster-forming thresholds at once.

Pure numpy/scipy: no I/O, no images. ``p`` values are one-sided upper-tail by default
(``p = norm.sf(z)``), as in nilearn's ``cluster_level_inference``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from bids_group.distributions import norm_sf
from bids_group.errors import DataError, UsageError
from bids_group.inference.clusters import DEFAULT_CONNECTIVITY, label_clusters

log = logging.getLogger(__name__)

#: Default level of the simultaneous TDP bounds.
DEFAULT_ALPHA = 0.05

Connectivity = Literal[6, 18, 26]

#: Columns of :attr:`ARIResult.table`, in order.
TABLE_COLUMNS = (
    "threshold",
    "cluster_id",
    "size",
    "volume_mm3",
    "true_discoveries",
    "tdp",
    "peak_stat",
    "peak_x",
    "peak_y",
    "peak_z",
)


@dataclass(frozen=True)
class ARIResult:
    """Clusters at one or several thresholds with their ARI true-discovery bounds.

    Attributes
    ----------
    tdp_map : ndarray of shape (nx, ny, nz), float64
        Lower bound of the true discovery proportion of the cluster each voxel belongs to; with
        several thresholds, the cluster at the highest threshold that contains the voxel wins
        (the same rule as nilearn). 0 outside every cluster and outside the mask.
    table : pandas.DataFrame
        One row per cluster per threshold, columns :data:`TABLE_COLUMNS`: ``threshold`` (z),
        ``cluster_id`` (1.. per threshold, by decreasing ``|peak_stat|``), ``size`` (voxels),
        ``volume_mm3``, ``true_discoveries`` (int lower bound), ``tdp`` (= true_discoveries /
        size), ``peak_stat`` (z at the peak; negative for negative clusters), ``peak_x/y/z`` (mm,
        world coordinates of the affine).
    hommel : int
        The Hommel value over all ``n_tests`` in-mask voxels.
    alpha : float
    thresholds : tuple of float
        Cluster-forming thresholds, ascending.
    n_tests : int
        Number of in-mask voxels (hypotheses).
    two_sided : bool
        Whether p was two-sided and negative clusters (z < -threshold) were formed too.
    connectivity : int
    """

    tdp_map: np.ndarray
    table: pd.DataFrame
    hommel: int
    alpha: float
    thresholds: tuple[float, ...]
    n_tests: int
    two_sided: bool
    connectivity: int


# --------------------------------------------------------------------------- validation


def _check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, int | float) and 0.0 < float(alpha) < 1.0):
        raise UsageError(f"ARI: alpha must be a number in (0, 1); got alpha={alpha!r}.")
    return float(alpha)


def _check_p(p: np.ndarray, name: str = "p") -> np.ndarray:
    p = np.asarray(p, dtype=np.float64).ravel()
    if p.size == 0:
        raise DataError(f"ARI: {name} is empty; there must be at least one p-value.")
    if not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0:
        bad = int(np.sum(~np.isfinite(p) | (p < 0) | (p > 1)))
        raise DataError(f"ARI: {bad} value(s) of {name} are NaN or outside [0, 1].")
    return p


# --------------------------------------------------------------------------- Hommel value


def hommel_value(p: np.ndarray, alpha: float = DEFAULT_ALPHA) -> int:
    """Size of the largest set of hypotheses that the Simes test does not reject.

    With ``p_(1) <= ... <= p_(m)`` sorted, the Simes test of a set of ``i`` hypotheses rejects
    when some ``p_(j:i) <= j * alpha / i``; the set hardest to reject of size ``i`` holds the
    ``i`` largest p-values, so (Meijer, Krebs & Goeman 2019, Biometrical Journal 61:73, eq. 2)::

        h = max{ i in 0..m : p_(m-i+j) > j * alpha / i  for all j = 1..i }

    Rewriting ``k = m - i + j``, each ``k < m`` with ``p_(k) < alpha`` allows only
    ``i < b_k = (m - k) * alpha / (alpha - p_(k))`` whenever ``k`` is among the top ``i``
    (``i >= m - k + 1``), and ``k = m`` needs ``p_(m) > alpha``. A suffix minimum of ``b`` gives
    every ``i`` in ``O(m)`` after the sort.

    Parameters
    ----------
    p : array_like of float, shape (m,)
        p-values in [0, 1], any order.
    alpha : float
        Level, in (0, 1).

    Returns
    -------
    int
        The Hommel value, in ``0..m`` (always a Python ``int``, also for ``m == 1``).

    Raises
    ------
    DataError
        If ``p`` is empty or has values that are NaN or outside [0, 1].
    UsageError
        If ``alpha`` is not in (0, 1).

    Examples
    --------
    >>> hommel_value([0.01, 0.04, 0.5], alpha=0.05)
    2
    >>> hommel_value([0.001], alpha=0.05)
    0
    """
    alpha = _check_alpha(alpha)
    p_sorted = np.sort(_check_p(p))
    m = p_sorted.size
    # Every set contains its own largest p; if p_(m) <= alpha, Simes rejects every set.
    if p_sorted[-1] <= alpha:
        return 0
    k = np.arange(1, m)  # 1-based ranks of p_(1..m-1)
    with np.errstate(divide="ignore"):
        bound = np.where(p_sorted[:-1] < alpha, (m - k) * alpha / (alpha - p_sorted[:-1]), np.inf)
    # allowed_below[i - 1] = min over k in [m-i+1, m-1] of b_k (inf for i = 1): a suffix minimum.
    suffix_min = np.minimum.accumulate(bound[::-1])  # suffix_min[t] = min(b_{m-1-t}..b_{m-1})
    allowed_below = np.concatenate(([np.inf], suffix_min))  # index i-1 for i = 1..m
    sizes = np.arange(1, m + 1)
    feasible = sizes < allowed_below
    return int(sizes[feasible].max()) if feasible.any() else 0


# --------------------------------------------------------------------------- discoveries


def discoveries_lower_bound(
    p_cluster: np.ndarray, hommel: int, alpha: float = DEFAULT_ALPHA
) -> int:
    """Simultaneous lower bound of the number of true discoveries in a set.

    Goeman, Meijer, Krebs & Solari (2019), Biometrika 106(4), shortcut for closed testing with
    Simes local tests, given the Hommel value ``h`` of the whole family::

        d(S) = max(0, max_{u = 1..|S|} [ 1 - u + #{ i in S : h * p_i <= u * alpha } ])

    ``u`` starts at 1: a ``u = 0`` term (``h * p_i == 0``, i.e. ``h == 0`` or ``p_i`` underflowed
    to 0) would overstate the bound by one.

    Parameters
    ----------
    p_cluster : array_like of float, shape (n,)
        p-values of the set ``S`` (a subset of the family ``hommel`` was computed on).
    hommel : int
        Hommel value of the whole family, from :func:`hommel_value` with the same ``alpha``.
    alpha : float
        Level, in (0, 1).

    Returns
    -------
    int
        Lower bound, in ``0..n``, of the number of false null hypotheses in ``S``.

    Raises
    ------
    DataError
        If ``p_cluster`` is empty or has values that are NaN or outside [0, 1].
    UsageError
        If ``alpha`` is not in (0, 1) or ``hommel`` is negative.

    Examples
    --------
    >>> discoveries_lower_bound([0.001, 0.002, 0.3], hommel=5, alpha=0.05)
    2
    """
    alpha = _check_alpha(alpha)
    if int(hommel) < 0:
        raise UsageError(f"ARI: the Hommel value must be >= 0; got {hommel!r}.")
    scaled = np.sort(int(hommel) * _check_p(p_cluster, "p_cluster"))
    u = np.arange(1, scaled.size + 1)
    n_below = np.searchsorted(scaled, u * alpha, side="right")
    return int(max(0, int(np.max(1 - u + n_below))))


# --------------------------------------------------------------------------- clusters


def _check_volumes(
    z_vol: np.ndarray, mask: np.ndarray, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z_vol = np.asarray(z_vol, dtype=np.float64)
    mask = np.asarray(mask)
    affine = np.asarray(affine, dtype=np.float64)
    if z_vol.ndim != 3 or mask.shape != z_vol.shape:
        raise DataError(
            f"ARI: the z map {z_vol.shape} and the mask {mask.shape} must be 3-D of the same shape."
        )
    if affine.shape != (4, 4):
        raise DataError(f"ARI: the affine must be 4x4; got shape {affine.shape}.")
    mask = mask.astype(bool)
    if not mask.any():
        raise DataError("ARI: the mask is empty; there is nothing to test.")
    if not np.all(np.isfinite(z_vol[mask])):
        raise DataError("ARI: the z map has NaN or infinite values inside the mask.")
    return z_vol, mask, affine


def _check_thresholds(thresholds: float | Sequence[float], two_sided: bool) -> tuple[float, ...]:
    values = (thresholds,) if np.isscalar(thresholds) else tuple(thresholds)
    if not values:
        raise UsageError("ARI: give at least one cluster-forming threshold.")
    values = tuple(sorted(float(t) for t in values))
    if values[0] < 0 or (two_sided and values[0] == 0) or not np.all(np.isfinite(values)):
        raise UsageError(
            f"ARI: cluster-forming thresholds are z values that must be finite and >= 0 "
            f"(> 0 when two-sided); got {list(values)}."
        )
    return values


def _cluster_rows(
    z_vol: np.ndarray,
    p_vol: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    sign: float,
    *,
    threshold: float,
    hommel: int,
    alpha: float,
    affine: np.ndarray,
) -> list[dict]:
    rows = []
    voxel_volume = float(abs(np.linalg.det(affine[:3, :3])))
    for label in range(1, n_labels + 1):
        in_cluster = labels == label
        size = int(in_cluster.sum())
        found = discoveries_lower_bound(p_vol[in_cluster], hommel, alpha)
        idx = np.argwhere(in_cluster)
        peak_ijk = idx[np.argmax(sign * z_vol[in_cluster])]
        peak_xyz = affine[:3, :3] @ peak_ijk + affine[:3, 3]
        rows.append(
            {
                "threshold": threshold,
                "label": label,
                "sign": sign,
                "size": size,
                "volume_mm3": size * voxel_volume,
                "true_discoveries": found,
                "tdp": found / size,
                "peak_stat": float(z_vol[tuple(peak_ijk)]),
                "peak_x": float(peak_xyz[0]),
                "peak_y": float(peak_xyz[1]),
                "peak_z": float(peak_xyz[2]),
            }
        )
    return rows


def ari_clusters(
    z_vol: np.ndarray,
    mask: np.ndarray,
    *,
    affine: np.ndarray,
    thresholds: float | Sequence[float],
    alpha: float = DEFAULT_ALPHA,
    connectivity: Connectivity = DEFAULT_CONNECTIVITY,
    two_sided: bool = False,
) -> ARIResult:
    """ARI true-discovery-proportion bounds of supra-threshold clusters.

    The family is every in-mask voxel; p is ``norm.sf(z)`` (one-sided, positive effects) or
    ``2 * norm.sf(|z|)`` when ``two_sided``. For each threshold ``t``, clusters are connected
    components of ``mask & (z > t)`` (and of ``mask & (z < -t)`` when two-sided).

    Parameters
    ----------
    z_vol : ndarray of shape (nx, ny, nz), float
        z map; values outside the mask are ignored.
    mask : ndarray of shape (nx, ny, nz), bool
        In-mask voxels (the hypotheses).
    affine : ndarray of shape (4, 4)
        Voxel-to-world (mm) affine, for peak coordinates and volumes.
    thresholds : float or sequence of float
        Cluster-forming thresholds on the z scale (>= 0; > 0 when two-sided).
    alpha : float
        Level of the simultaneous bounds, in (0, 1).
    connectivity : {6, 18, 26}
        Neighbourhood defining clusters (6 = faces, the default of nilearn and SPM-like tools).
    two_sided : bool
        Also bound negative clusters, with two-sided p-values for the whole family.

    Returns
    -------
    ARIResult

    Raises
    ------
    DataError
        Shapes disagree, the mask is empty, or the z map is not finite inside the mask.
    UsageError
        Bad alpha, threshold or connectivity.
    """
    z_vol, mask, affine = _check_volumes(z_vol, mask, affine)
    alpha = _check_alpha(alpha)
    levels = _check_thresholds(thresholds, two_sided)
    label_clusters(np.zeros((1, 1, 1), bool), connectivity)  # check it before any work

    p_vol = np.ones_like(z_vol)
    p_vol[mask] = 2.0 * norm_sf(np.abs(z_vol[mask])) if two_sided else norm_sf(z_vol[mask])
    p_vol = np.clip(p_vol, 0.0, 1.0)
    hommel = hommel_value(p_vol[mask], alpha)
    log.debug("ARI: Hommel value %d of %d tests at alpha=%g", hommel, int(mask.sum()), alpha)

    tdp_map = np.zeros(z_vol.shape, dtype=np.float64)
    rows: list[dict] = []
    signs = (1.0, -1.0) if two_sided else (1.0,)
    for threshold in levels:  # ascending: higher thresholds overwrite the map (nilearn's rule)
        for sign in signs:
            labels, n_labels = label_clusters(mask & (sign * z_vol > threshold), connectivity)
            new = _cluster_rows(
                z_vol,
                p_vol,
                labels,
                n_labels,
                sign,
                threshold=threshold,
                hommel=hommel,
                alpha=alpha,
                affine=affine,
            )
            for row in new:
                tdp_map[labels == row["label"]] = row["tdp"]
            rows.extend(new)
    return ARIResult(
        tdp_map=tdp_map,
        table=_make_table(rows),
        hommel=hommel,
        alpha=alpha,
        thresholds=levels,
        n_tests=int(mask.sum()),
        two_sided=bool(two_sided),
        connectivity=int(connectivity),
    )


def _make_table(rows: list[dict]) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in TABLE_COLUMNS})
    table = pd.DataFrame(rows)
    table["abs_peak"] = table["peak_stat"].abs()
    table = table.sort_values(["threshold", "abs_peak"], ascending=[True, False], kind="stable")
    table["cluster_id"] = table.groupby("threshold").cumcount() + 1
    table = table[list(TABLE_COLUMNS)].reset_index(drop=True)
    return table.astype({"cluster_id": int, "size": int, "true_discoveries": int})
