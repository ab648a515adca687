"""Clusters of supra-threshold voxels: labelling, extent thresholding and peak tables.

Volumes are 3-D arrays on the image grid with 0 outside the mask; voxel coordinates are
turned into millimetres with the image affine. Positive and negative clusters are always
formed separately (a cluster never mixes signs).
"""

from __future__ import annotations

import logging
from string import ascii_lowercase

import numpy as np
import pandas as pd
from scipy import ndimage

from bids_group.errors import DataError, UsageError
from bids_group.inference.defaults import DEFAULT_CONNECTIVITY
from bids_group.inference.fdr import log_p_from_z

log = logging.getLogger(__name__)

#: Neighbourhood size -> scipy.ndimage.generate_binary_structure connectivity rank.
CONNECTIVITY: dict[int, int] = {6: 1, 18: 2, 26: 3}
DEFAULT_MIN_DISTANCE = 8.0
#: Subpeaks reported per cluster besides its peak (nilearn's get_clusters_table reports 3).
DEFAULT_MAX_SUBPEAKS = 3

COLUMNS: dict[str, str] = {
    "cluster_id": "Cluster number (1, 2, ... positive clusters first, then negative ones, each "
    "by decreasing peak |z|); subpeaks are the cluster number followed by a letter (1a, 1b).",
    "cluster": "Integer cluster number the row belongs to (same for a peak and its subpeaks).",
    "peak_x": "x coordinate of the (sub)peak, in mm (image affine).",
    "peak_y": "y coordinate of the (sub)peak, in mm (image affine).",
    "peak_z": "z coordinate of the (sub)peak, in mm (image affine).",
    "peak_stat": "z statistic at the (sub)peak (negative for negative clusters).",
    "peak_p": "Uncorrected p of peak_stat (two-sided when the table is two-sided).",
    "size_voxels": "Cluster size in voxels (empty on subpeak rows).",
    "size_mm3": "Cluster size in cubic millimetres: voxels x |det(affine[:3, :3])| "
    "(empty on subpeak rows).",
}
_PEAK_VALUE_DESCRIPTION = "Value of the original statistic map (t or F) at the (sub)peak."


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in CONNECTIVITY:
        raise UsageError(
            "Cluster connectivity must be 6 (faces), 18 (edges) or 26 (corners), "
            f"got {connectivity}."
        )
    return ndimage.generate_binary_structure(3, CONNECTIVITY[connectivity])


def label_clusters(
    binary: np.ndarray, connectivity: int = DEFAULT_CONNECTIVITY
) -> tuple[np.ndarray, int]:
    """Connected components of a 3-D boolean volume.

    Parameters
    ----------
    binary : ndarray of shape (nx, ny, nz), bool
    connectivity : {6, 18, 26}, default=6
        Voxels sharing a face (6), a face or an edge (18), or any corner (26) are neighbours.

    Returns
    -------
    labels : ndarray of shape (nx, ny, nz), int32
        0 outside clusters, 1..n_clusters inside (in scan order).
    n_clusters : int

    Examples
    --------
    >>> vol = np.zeros((3, 3, 1), bool); vol[0, 0, 0] = vol[1, 1, 0] = True
    >>> label_clusters(vol, 6)[1], label_clusters(vol, 18)[1]
    (2, 1)
    """
    binary = np.asarray(binary, dtype=bool)
    if binary.ndim != 3:
        raise DataError(f"Clusters need a 3-D volume, got shape {binary.shape}.")
    labels, n_clusters = ndimage.label(binary, structure=_structure(connectivity))
    return labels.astype(np.int32, copy=False), int(n_clusters)


def _check_volume(z_vol: np.ndarray, z_threshold: float, cluster_threshold: int) -> np.ndarray:
    z_vol = np.asarray(z_vol, dtype=np.float64)
    if z_vol.ndim != 3:
        raise DataError(f"Expected a 3-D z volume, got shape {z_vol.shape}.")
    if not np.isfinite(z_vol).all():
        raise DataError("The z volume contains NaN or inf: set out-of-mask voxels to 0.")
    if np.isnan(z_threshold) or z_threshold < 0:
        raise UsageError(f"The cluster-forming z threshold must be >= 0, got {z_threshold}.")
    if int(cluster_threshold) != cluster_threshold or cluster_threshold < 0:
        raise UsageError(
            f"The cluster extent threshold is a number of voxels >= 0, got {cluster_threshold}."
        )
    return z_vol


def _signs(two_sided: bool) -> tuple[int, ...]:
    return (1, -1) if two_sided else (1,)


def _sized_clusters(
    z_vol: np.ndarray, sign: int, z_threshold: float, cluster_threshold: int, connectivity: int
) -> tuple[np.ndarray, list[int]]:
    """Labels of the clusters of ``sign * z >= z_threshold`` and the ids of those kept."""
    # z > 0 as well, so that a threshold of 0 does not make the zeros outside the mask a cluster.
    signed = sign * z_vol
    labels, n_clusters = label_clusters((signed >= z_threshold) & (signed > 0), connectivity)
    sizes = np.bincount(labels.ravel(), minlength=n_clusters + 1)
    kept = [c for c in range(1, n_clusters + 1) if sizes[c] >= cluster_threshold]
    return labels, kept


def apply_cluster_extent(
    z_vol: np.ndarray,
    *,
    z_threshold: float,
    cluster_threshold: int = 0,
    two_sided: bool,
    connectivity: int = DEFAULT_CONNECTIVITY,
) -> np.ndarray:
    """Zero every voxel below the height threshold or in a cluster smaller than the extent.

    Parameters
    ----------
    z_vol : ndarray of shape (nx, ny, nz), float
        z map, 0 outside the mask.
    z_threshold : float
        Voxels with ``z >= z_threshold`` (and, if ``two_sided``, ``z <= -z_threshold``) are
        supra-threshold; ``np.inf`` keeps nothing.
    cluster_threshold : int, default=0
        Clusters with fewer voxels are removed (a cluster of exactly this size is kept, as in
        nilearn).
    two_sided : bool
        Also keep negative clusters, formed separately from the positive ones.
    connectivity : {6, 18, 26}, default=6
        nilearn's ``threshold_stats_img``/``threshold_img`` always use 6 (faces).

    Returns
    -------
    ndarray of shape (nx, ny, nz), float64
        ``z_vol`` where kept, 0 elsewhere.
    """
    z_vol = _check_volume(z_vol, z_threshold, cluster_threshold)
    keep = np.zeros(z_vol.shape, dtype=bool)
    for sign in _signs(two_sided):
        labels, kept = _sized_clusters(z_vol, sign, z_threshold, cluster_threshold, connectivity)
        keep |= np.isin(labels, kept)
    return np.where(keep, z_vol, 0.0)


def _plateau_voxel(plateau_ijk: np.ndarray) -> np.ndarray:
    """The voxel reported for a plateau of equal maxima: its rounded centroid if that is in the
    plateau, else the plateau voxel nearest the centroid (nilearn's rule)."""
    centroid = plateau_ijk.mean(axis=0)
    rounded = np.round(centroid).astype(int)
    if (plateau_ijk == rounded).all(axis=1).any():
        return rounded
    return plateau_ijk[np.argmin(np.linalg.norm(plateau_ijk - centroid, axis=1))]


def _local_maxima(values: np.ndarray, in_cluster: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of ``values`` inside one cluster (26-neighbourhood, cluster voxels only).

    Returns (ijk (n, 3) int, value (n,)), one entry per plateau of equal maxima.
    """
    masked = np.where(in_cluster, values, -np.inf)
    is_max = in_cluster & (
        masked >= ndimage.maximum_filter(masked, size=3, mode="constant", cval=-np.inf)
    )
    plateaus, n_plateaus = ndimage.label(is_max, structure=np.ones((3, 3, 3), bool))
    ijk = np.argwhere(is_max)
    plateau_of = plateaus[is_max]  # same (C) order as argwhere
    peaks = np.empty((n_plateaus, 3), dtype=int)
    for k in range(1, n_plateaus + 1):
        peaks[k - 1] = _plateau_voxel(ijk[plateau_of == k])
    return peaks, values[tuple(peaks.T)]


def _cluster_peaks(
    values: np.ndarray,
    in_cluster: np.ndarray,
    affine: np.ndarray,
    min_distance: float,
    max_subpeaks: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Peak then subpeaks of one cluster: local maxima by decreasing value, each kept only if
    more than ``min_distance`` mm from every peak kept before it."""
    ijk, vals = _local_maxima(values, in_cluster)
    order = np.argsort(-vals, kind="stable")
    ijk, vals = ijk[order], vals[order]
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    kept: list[int] = []
    for i in range(len(vals)):
        # Greedy, against every kept peak. (nilearn's loop lets a later peak re-admit a
        # candidate that an earlier peak had rejected.)
        if all(np.linalg.norm(xyz[i] - xyz[j]) > min_distance for j in kept):
            kept.append(i)
            if len(kept) == max_subpeaks + 1:
                break
    return ijk[kept], vals[kept]


def cluster_table(
    z_vol: np.ndarray,
    affine: np.ndarray,
    *,
    z_threshold: float,
    cluster_threshold: int = 0,
    two_sided: bool,
    connectivity: int = DEFAULT_CONNECTIVITY,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    stat_vol: np.ndarray | None = None,
    max_subpeaks: int = DEFAULT_MAX_SUBPEAKS,
) -> pd.DataFrame:
    """Table of clusters, their peaks and subpeaks.

    Parameters
    ----------
    z_vol : ndarray of shape (nx, ny, nz), float
        z map, 0 outside the mask.
    affine : ndarray of shape (4, 4)
        Voxel -> mm.
    z_threshold, cluster_threshold, two_sided, connectivity
        As in :func:`apply_cluster_extent` (the table describes exactly the voxels it keeps).
    min_distance : float, default=8.0
        Subpeaks are local maxima (26-neighbourhood) more than ``min_distance`` mm from every
        higher peak kept in the same cluster.
    stat_vol : ndarray of shape (nx, ny, nz), optional
        The original statistic (t or F); adds a ``peak_value`` column.
    max_subpeaks : int, default=3
        Subpeaks reported per cluster (at most 26).

    Returns
    -------
    pandas.DataFrame
        One row per peak, columns :data:`COLUMNS` (+ ``peak_value``). Clusters are numbered
        1, 2, ... without gaps: positive clusters by decreasing peak z, then negative ones by
        increasing (most negative first) peak z. Subpeak rows have ids "1a", "1b", ... and empty
        sizes. Empty (with the columns) when no cluster survives.

    Notes
    -----
    Differences from ``nilearn.reporting.get_clusters_table`` (0.14): nilearn numbers the
    negative clusters after the number of *rows* (so with subpeaks the ids jump, e.g. 1, 1a,
    2, then 4); its subpeak loop can re-admit a subpeak too close to the main peak; it
    rounds the cluster volume down to an integer; and it forms clusters with ``z >
    threshold`` while ``threshold_stats_img`` keeps ``|z| >= threshold``. Plateaus of equal
    maxima are reported as nilearn does (rounded centroid, or nearest plateau voxel).
    """
    z_vol = _check_volume(z_vol, z_threshold, cluster_threshold)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise DataError(f"The affine must be 4x4, got shape {affine.shape}.")
    if min_distance <= 0:
        raise UsageError(f"min_distance must be > 0 mm, got {min_distance}.")
    if not 0 <= max_subpeaks <= len(ascii_lowercase):
        raise UsageError(f"max_subpeaks must be in 0..26, got {max_subpeaks}.")
    voxel_mm3 = _voxel_volume(affine)
    rows: list[dict] = []
    n_done = 0
    for sign in _signs(two_sided):
        labels, kept = _sized_clusters(z_vol, sign, z_threshold, cluster_threshold, connectivity)
        signed = sign * z_vol
        objects = ndimage.find_objects(labels)
        clusters = []
        for c in kept:
            box = objects[c - 1]
            in_cluster = labels[box] == c
            ijk, vals = _cluster_peaks(signed[box], in_cluster, affine, min_distance, max_subpeaks)
            offset = np.array([s.start for s in box])
            clusters.append((vals[0], int(in_cluster.sum()), ijk + offset))
        # Decreasing peak (sign * z); stable, so ties keep scan order.
        clusters.sort(key=lambda item: -item[0])
        for n, (_, size, peaks_ijk) in enumerate(clusters, start=n_done + 1):
            rows.extend(
                _cluster_rows(n, size, peaks_ijk, z_vol, affine, voxel_mm3, two_sided, stat_vol)
            )
        n_done += len(clusters)
    columns = list(COLUMNS) + (["peak_value"] if stat_vol is not None else [])
    table = pd.DataFrame(rows, columns=columns)
    return table.astype({"cluster": "int64", "size_voxels": "Int64", "size_mm3": "float64"})


def _voxel_volume(affine: np.ndarray) -> float:
    """|det(affine[:3, :3])| in mm^3; the product of the voxel sizes when the axes are
    orthogonal (the usual case), which avoids LU round-off (8 mm^3, not 7.9999999)."""
    det = abs(float(np.linalg.det(affine[:3, :3])))
    zooms_product = float(np.prod(np.linalg.norm(affine[:3, :3], axis=0)))
    return zooms_product if abs(zooms_product - det) <= 1e-9 * zooms_product else det


def _cluster_rows(
    number: int,
    size: int,
    peaks_ijk: np.ndarray,
    z_vol: np.ndarray,
    affine: np.ndarray,
    voxel_mm3: float,
    two_sided: bool,
    stat_vol: np.ndarray | None,
) -> list[dict]:
    rows = []
    xyz = peaks_ijk @ affine[:3, :3].T + affine[:3, 3]
    for k, (ijk, (x, y, z)) in enumerate(zip(peaks_ijk, xyz, strict=True)):
        peak_z = float(z_vol[tuple(ijk)])
        row = {
            "cluster_id": str(number) if k == 0 else f"{number}{ascii_lowercase[k - 1]}",
            "cluster": number,
            "peak_x": float(x),
            "peak_y": float(y),
            "peak_z": float(z),
            "peak_stat": peak_z,
            # p in the direction of the cluster: P(Z >= |z|), doubled when two-sided.
            "peak_p": float(np.exp(log_p_from_z(np.float64(abs(peak_z)), two_sided=two_sided))),
            "size_voxels": size if k == 0 else pd.NA,
            "size_mm3": size * voxel_mm3 if k == 0 else np.nan,
        }
        if stat_vol is not None:
            row["peak_value"] = float(stat_vol[tuple(ijk)])
        rows.append(row)
    return rows


def cluster_table_metadata(
    *,
    z_threshold: float,
    cluster_threshold: int,
    two_sided: bool,
    connectivity: int = DEFAULT_CONNECTIVITY,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    height_control: str = "none",
    alpha: float | None = None,
    p_threshold: float | None = None,
    stat_vol_description: str | None = None,
) -> dict:
    """JSON sidecar content for a cluster table (BIDS: one key per column, plus parameters).

    Parameters
    ----------
    z_threshold, cluster_threshold, two_sided, connectivity, min_distance
        As passed to :func:`cluster_table`.
    height_control : str, default="none"
        How the height threshold was chosen (fpr, fdr, bonferroni, none); see
        :class:`bids_group.inference.height.HeightThreshold`.
    alpha, p_threshold : float, optional
        The corrected level asked for and the uncorrected p that the z threshold corresponds to.
    stat_vol_description : str, optional
        Describes the ``peak_value`` column when the table has one (e.g. "t statistic, 20 dof").

    Returns
    -------
    dict
        JSON-serialisable.
    """
    _structure(connectivity)  # validates
    meta: dict = {name: {"Description": text} for name, text in COLUMNS.items()}
    for name in ("peak_x", "peak_y", "peak_z"):
        meta[name]["Units"] = "mm"
    meta["size_voxels"]["Units"] = "voxels"
    meta["size_mm3"]["Units"] = "mm^3"
    if stat_vol_description is not None:
        meta["peak_value"] = {"Description": f"{_PEAK_VALUE_DESCRIPTION} {stat_vol_description}"}
    meta.update(
        {
            "HeightThreshold": {"Value": float(z_threshold), "Units": "z"},
            "HeightControl": height_control,
            "Alpha": alpha,
            "PThreshold": p_threshold,
            "TwoSided": bool(two_sided),
            "ClusterExtentThreshold": {"Value": int(cluster_threshold), "Units": "voxels"},
            "Connectivity": int(connectivity),
            "ConnectivityDescription": {
                6: "faces",
                18: "faces and edges",
                26: "faces, edges and corners",
            }[connectivity],
            "MinDistance": {"Value": float(min_distance), "Units": "mm"},
        }
    )
    return meta
