"""File names: doctests of the builders plus the rules (order, validation, uniqueness)."""

from __future__ import annotations

import doctest
import itertools

import pytest

from bids_group.outputs import naming


def test_doctests():
    result = doctest.testmod(naming)
    assert result.attempted >= 10
    assert result.failed == 0


def test_entity_order_is_fixed_whatever_the_keyword_order():
    name = naming.statmap_name(desc="fdr", stat="z", contrast="a", space="MNI", task="rest")
    assert name == "task-rest_space-MNI_contrast-a_stat-z_desc-fdr_statmap.nii.gz"


@pytest.mark.parametrize("bad", ["a-b", "a_b", "a b", "", "é", "a.b", "a/b"])
def test_non_alphanumeric_labels_are_programming_errors(bad):
    with pytest.raises(ValueError, match="alphanumeric"):
        naming.statmap_name(contrast=bad, stat="t")
    with pytest.raises(ValueError, match="alphanumeric"):
        naming.statmap_name(contrast="a", stat="t", task=bad)
    with pytest.raises(ValueError, match="alphanumeric"):
        naming.node_dir(bad)
    with pytest.raises(ValueError, match="alphanumeric"):
        naming.model_name(bad)


def test_unknown_stat_and_bad_extension_rejected():
    with pytest.raises(ValueError, match="stat 'T'"):
        naming.statmap_name(contrast="a", stat="T")
    with pytest.raises(ValueError, match="extension"):
        naming.statmap_name(contrast="a", stat="t", extension="nii.gz")


def test_stats_table_has_the_agreed_values():
    assert {"effect", "variance", "t", "F", "z", "p", "logp", "tfce"} <= set(naming.STATS)


def test_names_unique_per_contrast_stat_desc():
    contrasts = ["a", "aB", "b"]
    descs = [None, *(naming.desc_label(m) for m in naming.DESC_LABELS)]
    descs += [naming.desc_label("fdr", alpha=0.05), naming.desc_label("fpr", cluster_threshold=5)]
    names = [
        naming.statmap_name(contrast=c, stat=s, desc=d)
        for c, s, d in itertools.product(contrasts, naming.STATS, descs)
    ]
    assert len(set(names)) == len(names)
    # the desc labels themselves are distinct and alphanumeric
    labels = list(naming.DESC_LABELS.values())
    assert len(set(labels)) == len(labels)
    assert all(naming.is_label(label) for label in labels)


def test_design_and_mask_names():
    assert naming.design_name() == "design.tsv"
    assert naming.design_name(task="x", contrast="c") == "task-x_contrast-c_design.tsv"
    assert naming.design_figure_name() == "design.svg"
    assert naming.mask_name() == "mask.nii.gz"
    assert naming.mask_name(contrast="c") == "contrast-c_mask.nii.gz"
    assert naming.clusters_name(contrast="c") == "contrast-c_stat-z_clusters.tsv"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"method": "fdr", "alpha": 0.05}, "fdr05"),
        ({"method": "fpr", "alpha": 0.001}, "fpr001"),
        ({"method": "bonferroni", "alpha": 0.1}, "bonferroni1"),
        ({"method": "fdr", "alpha": 0.0125}, "fdr0125"),
        ({"method": "none"}, "uncorrected"),
        ({"method": "none", "cluster_threshold": 20}, "uncorrectedK20"),
        ({"method": "permTfce", "alpha": 0.05}, "permTfce05"),
        ({"method": "fdr", "cluster_threshold": 0}, "fdr"),
    ],
)
def test_desc_label(kwargs, expected):
    method = kwargs.pop("method")
    assert naming.desc_label(method, **kwargs) == expected


@pytest.mark.parametrize(
    ("method", "kwargs", "match"),
    [
        ("FDR", {}, "method"),
        ("fdr", {"alpha": 0.0}, "alpha"),
        ("fdr", {"alpha": 1.0}, "alpha"),
        ("none", {"alpha": 0.05}, "no alpha"),
        ("fpr", {"cluster_threshold": -1}, "cluster_threshold"),
    ],
)
def test_desc_label_rejects(method, kwargs, match):
    with pytest.raises(ValueError, match=match):
        naming.desc_label(method, **kwargs)


def test_sidecar_name():
    assert naming.sidecar_name("x_statmap.nii.gz") == "x_statmap.json"
    assert naming.sidecar_name("x_design.svg") == "x_design.json"
    with pytest.raises(ValueError):
        naming.sidecar_name(".hidden")
