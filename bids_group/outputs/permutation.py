"""Tables and sidecar metadata of permutation inference (pure: no file is written here).

What is stored, and why:

* p-value maps hold ``-log10(p)`` (``stat-logp``), as nilearn's ``non_parametric_inference`` and
  PALM's ``-logp`` do: the smallest permutation p is ``1 / N`` (N = 10,001 gives 4.0), and a
  log scale keeps small p-values readable in any viewer. ``p = 10 ** -value``; 0 means p = 1.
* The null distribution of each maximum is written as TSV, one row per relabelling, row 0 the
  unpermuted data (:func:`null_distribution_table`), so that a run can be audited, a p-value
  recomputed, and runs with different seeds merged (concatenate the rows after row 0 of each
  and count ``p = (1 + #{null >= observed}) / (1 + n_perm)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bids_group.inference.clusters import CONNECTIVITY

if TYPE_CHECKING:  # the engine's module compiles numba kernels: not imported to write tables
    from bids_group.inference.permutation import ClusterInference, PermutationResult

#: Columns of the null-distribution table and their description (BIDS sidecar entries).
NULL_COLUMNS: Mapping[str, str] = {
    "relabelling": "Index of the relabelling; 0 is the unpermuted data (counted in every null)",
    "max_stat": "Maximum over the mask of the statistic named by the file's stat- entity (t, F, "
    "or z for mixed effects), of its absolute value when two-sided",
    "max_cluster_size": "Largest cluster above the cluster-forming threshold, in voxels",
    "max_cluster_mass": "Largest cluster mass (sum of statistic - threshold over the cluster)",
    "max_tfce": "Maximum TFCE score over the mask (of |TFCE| when two-sided)",
}

#: Columns of the permutation cluster table.
CLUSTER_COLUMNS: Mapping[str, Mapping[str, str]] = {
    "cluster_id": {"Description": "Cluster number, by decreasing size (ties: peak |stat|)"},
    "sign": {"Description": "+1: cluster of high values; -1: of low values (two-sided tests)"},
    "size_voxels": {"Description": "Cluster size", "Units": "voxels"},
    "size_mm3": {"Description": "Cluster volume", "Units": "mm^3"},
    "mass": {"Description": "Cluster mass: sum over its voxels of |stat| - cluster-forming height"},
    "p_fwe_size": {"Description": "Family-wise error corrected p of the cluster size"},
    "p_fwe_mass": {"Description": "Family-wise error corrected p of the cluster mass"},
    "peak_stat": {"Description": "Statistic (t, F, or z for mixed effects) at the cluster's peak"},
    "peak_z": {"Description": "z at the cluster's peak (same upper-tail p as peak_stat)"},
    "peak_x": {"Description": "x coordinate of the peak", "Units": "mm"},
    "peak_y": {"Description": "y coordinate of the peak", "Units": "mm"},
    "peak_z_mm": {"Description": "z coordinate of the peak", "Units": "mm"},
}


def logp(p: np.ndarray) -> np.ndarray:
    """``-log10(p)`` as float64 (0 for p = 1).

    >>> logp(np.array([1.0, 0.1, 1 / 1024])).round(4).tolist()
    [0.0, 1.0, 3.0103]
    """
    return np.abs(-np.log10(np.asarray(p, dtype=np.float64)))


def null_distribution_table(result: PermutationResult) -> pd.DataFrame:
    """One row per relabelling (row 0: unpermuted) and one column per maximum computed.

    Returns
    -------
    DataFrame of shape (result.n_relabellings, 2 to 5)
        Columns among :data:`NULL_COLUMNS`; cluster and TFCE columns only when they were run.
    """
    columns: dict[str, np.ndarray] = {
        "relabelling": np.arange(result.n_relabellings, dtype=np.int64),
        "max_stat": result.null_max_stat,
    }
    if result.clusters is not None:
        columns["max_cluster_size"] = result.clusters.null_max_size
        columns["max_cluster_mass"] = result.clusters.null_max_mass
    if result.tfce is not None:
        columns["max_tfce"] = result.tfce.null_max
    return pd.DataFrame(columns)


def null_distribution_sidecar(
    result: PermutationResult, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """Column descriptions plus how the null was drawn (scheme, N, seed, exactness)."""
    table_columns = null_distribution_table(result).columns
    meta: dict[str, Any] = {c: {"Description": NULL_COLUMNS[c]} for c in table_columns}
    if "max_cluster_size" in meta:
        meta["max_cluster_size"]["Units"] = "voxels"
    return {**meta, **settings}


def cluster_inference_table(
    clusters: ClusterInference,
    stat: np.ndarray,
    z: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
) -> pd.DataFrame:
    """Every cluster above the cluster-forming height with its size and mass FWER p-values.

    Parameters
    ----------
    clusters : ClusterInference
    stat, z : ndarray of shape (n_voxels,)
        The observed statistic (t or F) and its z, in mask order.
    mask : ndarray of shape (nx, ny, nz), bool
    affine : ndarray of shape (4, 4)

    Returns
    -------
    DataFrame
        Columns :data:`CLUSTER_COLUMNS`, one row per cluster, largest first.
    """
    n = clusters.sizes.shape[0]
    ijk = np.argwhere(mask)[clusters.peaks] if n else np.zeros((0, 3), dtype=np.int64)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    table = pd.DataFrame(
        {
            "sign": clusters.signs.astype(np.int64),
            "size_voxels": clusters.sizes.astype(np.int64),
            "size_mm3": clusters.sizes * voxel_mm3,
            "mass": clusters.masses,
            "p_fwe_size": clusters.p_fwe_size,
            "p_fwe_mass": clusters.p_fwe_mass,
            "peak_stat": stat[clusters.peaks] if n else np.zeros(0),
            "peak_z": z[clusters.peaks] if n else np.zeros(0),
            "peak_x": xyz[:, 0],
            "peak_y": xyz[:, 1],
            "peak_z_mm": xyz[:, 2],
        }
    )
    order = np.lexsort((-np.abs(table["peak_stat"].to_numpy()), -table["size_voxels"].to_numpy()))
    table = table.iloc[order].reset_index(drop=True)
    table.insert(0, "cluster_id", np.arange(1, n + 1, dtype=np.int64))
    return table


def connectivity_description(connectivity: int) -> str:
    """'6 (faces)' etc., for sidecars and the report."""
    names = {6: "faces", 18: "faces and edges", 26: "faces, edges and corners"}
    if connectivity not in CONNECTIVITY:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    return f"{connectivity} ({names[connectivity]})"
