"""Inference on z maps: voxel-level height thresholds (fpr, fdr, bonferroni, none) and clusters.

Thresholds are applied to z maps (z has the same upper-tail p as the t/F statistic). The
permutation, TFCE and ARI modules live beside these.
"""

from bids_group.inference.clusters import (
    apply_cluster_extent,
    cluster_table,
    cluster_table_metadata,
    label_clusters,
)
from bids_group.inference.fdr import fdr_threshold
from bids_group.inference.height import HeightThreshold, height_threshold

__all__ = [
    "HeightThreshold",
    "apply_cluster_extent",
    "cluster_table",
    "cluster_table_metadata",
    "fdr_threshold",
    "height_threshold",
    "label_clusters",
]
