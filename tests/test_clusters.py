"""Cluster labelling, extent thresholding and peak tables, against nilearn and by hand."""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bids_group.errors import DataError, UsageError
from bids_group.inference.clusters import (
    COLUMNS,
    apply_cluster_extent,
    cluster_table,
    cluster_table_metadata,
    label_clusters,
)

AFFINE = np.array([[-2.0, 0, 0, 40], [0, 2, 0, -40], [0, 0, 2, -30], [0, 0, 0, 1]])


def smooth_z(seed: int) -> np.ndarray:
    """Smooth noise with one positive and one negative blob, float32-representable."""
    rng = np.random.default_rng(seed)
    z = ndimage.gaussian_filter(rng.normal(size=(30, 30, 30)), 1.5) * 5
    z[5:10, 5:12, 5:9] += 3
    z[18:24, 18:25, 15:22] -= 3.5
    return z.astype(np.float32).astype(np.float64)


def _quiet(func, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return func(*args, **kwargs)


def test_connectivity():
    vol = np.zeros((3, 3, 3), bool)
    vol[0, 0, 0] = vol[1, 1, 0] = vol[2, 2, 1] = True
    assert label_clusters(vol)[1] == 3  # default 6: faces only
    assert label_clusters(vol, 18)[1] == 2  # edge joins the first two
    assert label_clusters(vol, 26)[1] == 1  # corner joins the third
    with pytest.raises(UsageError, match="6 \\(faces\\)"):
        label_clusters(vol, 8)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize(("z_thr", "k"), [(2.3, 5), (3.1, 20), (1.5, 0)])
def test_extent_matches_nilearn_threshold_img(seed, two_sided, z_thr, k):
    from nilearn.image import threshold_img

    z = smooth_z(seed)
    img = nib.Nifti1Image(z.astype(np.float32), AFFINE)
    theirs = _quiet(threshold_img, img, z_thr, cluster_threshold=k, two_sided=two_sided)
    ours = apply_cluster_extent(z, z_threshold=z_thr, cluster_threshold=k, two_sided=two_sided)
    np.testing.assert_array_equal(ours, theirs.get_fdata())


def test_extent_keeps_cluster_of_exactly_k_and_separates_signs():
    z = np.zeros((8, 8, 8))
    z[1, 1, 1:4] = 4.0  # 3 voxels
    z[5, 5, 5] = 4.0
    z[5, 5, 6] = -4.0  # touches the positive voxel but is another cluster
    out = apply_cluster_extent(z, z_threshold=3.0, cluster_threshold=3, two_sided=True)
    assert np.count_nonzero(out) == 3
    out = apply_cluster_extent(z, z_threshold=3.0, cluster_threshold=1, two_sided=False)
    assert np.count_nonzero(out) == 4 and out.min() == 0.0
    assert not apply_cluster_extent(z, z_threshold=np.inf, two_sided=True).any()
    # A threshold of 0 must not make the out-of-mask zeros a cluster.
    assert np.count_nonzero(apply_cluster_extent(z, z_threshold=0.0, two_sided=True)) == 5


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_table_matches_nilearn_one_sided(seed):
    from nilearn.reporting import get_clusters_table

    z = smooth_z(seed)
    img = nib.Nifti1Image(z.astype(np.float32), AFFINE)
    theirs = _quiet(get_clusters_table, img, 2.3, cluster_threshold=5, two_sided=False)
    ours = cluster_table(z, AFFINE, z_threshold=2.3, cluster_threshold=5, two_sided=False)
    assert list(ours["cluster_id"]) == [str(c) for c in theirs["Cluster ID"]]
    np.testing.assert_array_equal(
        ours[["peak_x", "peak_y", "peak_z", "peak_stat"]].to_numpy(),
        theirs[["X", "Y", "Z", "Peak Stat"]].to_numpy(dtype=float),
    )
    main = theirs["Cluster Size (mm3)"] != ""
    np.testing.assert_array_equal(
        ours.loc[main.to_numpy(), "size_mm3"], theirs.loc[main, "Cluster Size (mm3)"].astype(float)
    )


def test_two_sided_ids_sequential_where_nilearn_skips():
    """nilearn numbers negative clusters after the number of *rows* (1, 1a, 1b, 4, ...)."""
    from nilearn.reporting import get_clusters_table

    z = smooth_z(0)
    img = nib.Nifti1Image(z.astype(np.float32), AFFINE)
    theirs = _quiet(get_clusters_table, img, 2.3, cluster_threshold=5, two_sided=True)
    ours = cluster_table(z, AFFINE, z_threshold=2.3, cluster_threshold=5, two_sided=True)
    assert [str(c) for c in theirs["Cluster ID"]] == ["1", "1a", "1b", "4", "4a"]
    assert list(ours["cluster_id"]) == ["1", "1a", "1b", "2", "2a"]
    # Same peaks, same order; negative clusters carry negative z.
    np.testing.assert_array_equal(
        ours[["peak_x", "peak_y", "peak_z", "peak_stat"]].to_numpy(),
        theirs[["X", "Y", "Z", "Peak Stat"]].to_numpy(dtype=float),
    )
    assert (ours.loc[ours.cluster == 2, "peak_stat"] < 0).all()


def test_subpeaks_are_min_distance_apart_where_nilearn_readmits_one():
    """nilearn's _pare_subpeaks lets a later kept peak re-admit a subpeak that an earlier peak
    had rejected: here its '5b' lies 6.6 mm from the main peak (min_distance 8 mm)."""
    from nilearn.reporting import get_clusters_table

    z = smooth_z(4)
    img = nib.Nifti1Image(z.astype(np.float32), AFFINE)
    theirs = _quiet(get_clusters_table, img, 2.3, cluster_threshold=5, two_sided=True)
    ours = cluster_table(z, AFFINE, z_threshold=2.3, cluster_threshold=5, two_sided=True)

    def min_gap(xyz):
        d = np.linalg.norm(xyz[:, None] - xyz[None], axis=2)
        return d[np.triu_indices(len(xyz), 1)].min()

    neg_theirs = theirs.iloc[4:][["X", "Y", "Z"]].to_numpy(dtype=float)
    neg_ours = ours[ours.cluster == 2][["peak_x", "peak_y", "peak_z"]].to_numpy()
    assert min_gap(neg_theirs) < 8.0
    assert min_gap(neg_ours) > 8.0
    # Everything nilearn gets right (the other rows) is identical.
    kept = [0, 1, 2, 3, 4, 5, 7]
    np.testing.assert_array_equal(
        ours[["peak_x", "peak_y", "peak_z", "peak_stat"]].to_numpy(),
        theirs.iloc[kept][["X", "Y", "Z", "Peak Stat"]].to_numpy(dtype=float),
    )


def test_columns_sizes_and_p():
    z = smooth_z(0)
    aff = np.diag([3.0, 3.0, 3.3, 1.0])
    tab = cluster_table(
        z, aff, z_threshold=2.3, cluster_threshold=5, two_sided=True, stat_vol=2 * z
    )
    assert list(tab.columns) == [*COLUMNS, "peak_value"]
    main = tab[tab.size_voxels.notna()]
    np.testing.assert_allclose(main.size_mm3, main.size_voxels.astype(float) * 29.7)
    np.testing.assert_allclose(tab.peak_value, 2 * tab.peak_stat)
    from scipy.stats import norm

    np.testing.assert_allclose(tab.peak_p, 2 * norm.sf(np.abs(tab.peak_stat)), rtol=1e-12)
    labels, n = label_clusters(np.abs(z) >= 2.3)
    sizes = np.bincount(labels.ravel())[1:]
    assert sorted(main.size_voxels) == sorted(s for s in sizes if s >= 5)


def test_plateaus_binary_cluster_and_donut():
    z = np.zeros((9, 9, 9))
    z[2:5, 2:5, 2:5] = 3.0  # binary cube: peak at its centre
    tab = cluster_table(z, np.eye(4), z_threshold=1.0, two_sided=False)
    assert tab[["peak_x", "peak_y", "peak_z"]].to_numpy().tolist() == [[3.0, 3.0, 3.0]]
    donut = np.zeros((9, 9, 3))
    donut[2:7, 2:7, 1] = 3.0
    donut[4, 4, 1] = 0.0  # centroid falls in the hole: nearest plateau voxel instead
    tab = cluster_table(donut, np.eye(4), z_threshold=1.0, two_sided=False)
    x, y, zc = tab[["peak_x", "peak_y", "peak_z"]].to_numpy()[0]
    assert donut[int(x), int(y), int(zc)] == 3.0 and abs(x - 4) + abs(y - 4) == 1


def test_empty_table_and_errors():
    tab = cluster_table(np.zeros((5, 5, 5)), np.eye(4), z_threshold=3.0, two_sided=True)
    assert tab.empty and list(tab.columns) == list(COLUMNS)
    with pytest.raises(DataError, match="3-D"):
        cluster_table(np.zeros((5, 5)), np.eye(4), z_threshold=3.0, two_sided=True)
    with pytest.raises(DataError, match="NaN"):
        apply_cluster_extent(np.full((3, 3, 3), np.nan), z_threshold=3.0, two_sided=True)
    with pytest.raises(UsageError, match=">= 0"):
        apply_cluster_extent(np.zeros((3, 3, 3)), z_threshold=-1.0, two_sided=True)
    with pytest.raises(UsageError, match="voxels"):
        apply_cluster_extent(
            np.zeros((3, 3, 3)), z_threshold=1.0, cluster_threshold=2.5, two_sided=True
        )
    with pytest.raises(UsageError, match="min_distance"):
        cluster_table(
            np.zeros((3, 3, 3)), np.eye(4), z_threshold=1.0, two_sided=True, min_distance=0
        )


def test_metadata_is_json_and_describes_every_column():
    meta = cluster_table_metadata(
        z_threshold=3.09,
        cluster_threshold=10,
        two_sided=True,
        connectivity=26,
        height_control="fpr",
        alpha=0.001,
        p_threshold=0.001,
        stat_vol_description="t statistic with 20 dof",
    )
    json.dumps(meta)
    for col in [*COLUMNS, "peak_value"]:
        assert meta[col]["Description"]
    assert meta["HeightThreshold"] == {"Value": 3.09, "Units": "z"}
    assert meta["Connectivity"] == 26 and meta["MinDistance"]["Units"] == "mm"
    assert meta["ClusterExtentThreshold"]["Units"] == "voxels"
