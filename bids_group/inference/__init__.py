"""Inference on z maps: voxel-level height thresholds (fpr, fdr, bonferroni, none) and clusters.

Thresholds are applied to z maps (z has the same upper-tail p as the t/F statistic). The
permutation, TFCE and ARI modules live beside these. The names below are imported on first use
(PEP 562), so that importing a light submodule (:mod:`bids_group.inference.defaults`) does not
import pandas and scipy.ndimage.
"""

from __future__ import annotations

import importlib
from typing import Any

_SOURCES = {
    "apply_cluster_extent": "clusters",
    "cluster_table": "clusters",
    "cluster_table_metadata": "clusters",
    "label_clusters": "clusters",
    "fdr_threshold": "fdr",
    "HeightThreshold": "height",
    "height_threshold": "height",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_SOURCES[name]}"), name)
