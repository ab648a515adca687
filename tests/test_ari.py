"""ARI: oracles are exact closed testing (enumeration) and nilearn's cluster_level_inference."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage, stats

from bids_group.errors import DataError, UsageError
from bids_group.inference.ari import (
    TABLE_COLUMNS,
    ari_clusters,
    discoveries_lower_bound,
    hommel_value,
)

# --------------------------------------------------------------------------- brute force oracle


def _simes_rejects(p_subset: np.ndarray, alpha: float) -> bool:
    """Simes' local test of the intersection hypothesis of ``p_subset``."""
    p_sorted = np.sort(p_subset)
    n = p_sorted.size
    return bool(np.any(p_sorted <= np.arange(1, n + 1) * alpha / n))


def _closed_testing(p: np.ndarray, alpha: float) -> tuple[int, np.ndarray]:
    """Enumerate all 2^m - 1 intersection hypotheses.

    Returns the Hommel value (size of the largest set Simes does not reject) and, for every
    subset S (a bitmask), the closed-testing lower bound of true discoveries:
    ``|S| - max{|I| : I subset of S, I not rejected by closed testing}`` (Goeman & Solari 2011).
    """
    m = p.size
    n_sets = 1 << m
    members = [np.array([i for i in range(m) if s >> i & 1], dtype=int) for s in range(n_sets)]
    size = np.array([len(x) for x in members])
    simes = np.array([s == 0 or _simes_rejects(p[members[s]], alpha) for s in range(n_sets)])
    hommel = int(max((size[s] for s in range(1, n_sets) if not simes[s]), default=0))
    # closed[I] = all Simes-rejected supersets; supersets I | bit > I, so go downwards.
    closed = np.zeros(n_sets, dtype=bool)
    for s in range(n_sets - 1, 0, -1):
        closed[s] = simes[s] and all(closed[s | 1 << b] for b in range(m) if not s >> b & 1)
    # largest non-rejected subset inside each S (empty set counts as size 0).
    largest = np.where(closed, 0, size)
    largest[0] = 0
    for b in range(m):  # subset-maximum over the lattice, one bit at a time
        for s in range(n_sets):
            if s >> b & 1:
                largest[s] = max(largest[s], largest[s ^ 1 << b])
    return hommel, size - largest


def _random_p_sets(n_sets: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n_sets):
        m = int(rng.integers(1, 11))
        n_signal = int(rng.integers(0, m + 1))
        signal = rng.uniform(0, 0.02, n_signal)  # mixes clear, borderline and null p-values
        null = rng.uniform(0, 1, m - n_signal)
        yield rng.permutation(np.concatenate([signal, null])), float(rng.choice([0.05, 0.1, 0.2]))


@pytest.mark.parametrize("seed", range(4))
def test_hommel_and_bounds_equal_brute_force_closed_testing(seed):
    for p, alpha in _random_p_sets(12, seed):
        hommel, bound = _closed_testing(p, alpha)
        assert hommel_value(p, alpha) == hommel, (p, alpha)
        for s in range(1, 1 << p.size):
            subset = [i for i in range(p.size) if s >> i & 1]
            assert discoveries_lower_bound(p[subset], hommel, alpha) == bound[s], (p, subset)


def test_brute_force_on_exact_ties_and_extremes():
    # 0.025 sits exactly on the Simes line for m=2 (1 * 0.05 / 2): Simes rejects (<=).
    cases = [
        np.array([0.025, 0.5]),
        np.array([0.0, 0.0, 0.3]),  # p underflowed to 0
        np.array([0.01, 0.02, 0.03]),  # every p <= alpha: h = 0
        np.array([0.05, 0.05]),  # exactly alpha
        np.array([0.9]),
        np.array([0.001]),
    ]
    for p in cases:
        hommel, bound = _closed_testing(p, 0.05)
        assert hommel_value(p, 0.05) == hommel, p
        full = (1 << p.size) - 1
        assert discoveries_lower_bound(p, hommel, 0.05) == bound[full], p


def test_worked_example_by_hand():
    # p = (0.001, 0.01, 0.02, 0.3, 0.8), alpha = 0.05, m = 5.
    # Sets of the i largest p, Simes critical values j * 0.05 / i:
    #   i=5: 0.001 <= 0.01  -> rejected;  i=4: (0.01, .02, .3, .8) vs (.0125, .025, ..): rejected;
    #   i=3: (0.02, 0.3, 0.8) vs (0.0167, 0.0333, 0.05): not rejected  -> h = 3.
    # Hommel's procedure rejects H_i iff h * p_i <= alpha: 0.003, 0.03 yes; 0.06 no.
    # d({1,2,3}) = max_u 1 - u + #{3 p <= 0.05 u}: u=1 -> 2; u=2 -> 1 - 2 + 3 = 2  -> 2.
    p = np.array([0.001, 0.01, 0.02, 0.3, 0.8])
    assert hommel_value(p, 0.05) == 3
    assert [discoveries_lower_bound([x], 3, 0.05) for x in p] == [1, 1, 0, 0, 0]
    assert discoveries_lower_bound(p[:3], 3, 0.05) == 2
    assert discoveries_lower_bound(p, 3, 0.05) == 2


def test_hommel_value_always_returns_int():
    for p in ([0.9], [0.01], [0.2, 0.3], np.array([0.001, 0.5])):
        assert type(hommel_value(p, 0.05)) is int


def test_large_family_matches_nilearn_hommel():
    from nilearn.glm.thresholding import _compute_hommel_value

    rng = np.random.default_rng(3)
    z = np.concatenate([rng.standard_normal(20000), rng.normal(4, 1, 500)])
    assert hommel_value(stats.norm.sf(z), 0.05) == _compute_hommel_value(z, 0.05)


# --------------------------------------------------------------------------- nilearn parity


def _synthetic_z(seed: int, shape=(18, 20, 16)):
    rng = np.random.default_rng(seed)
    z = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)
    z /= z.std()
    z[4:8, 4:8, 4:8] += 4.0
    z[10:13, 12:16, 8:11] += 3.0
    z[12:16, 3:7, 3:7] -= 4.5  # a negative blob, for the two-sided case
    mask = np.zeros(shape, dtype=bool)
    mask[2:-2, 2:-2, 1:-1] = True
    affine = np.array([[-2.0, 0, 0, 18], [0, 2, 0, -20], [0, 0, 2, -14], [0, 0, 0, 1]])
    return z, mask, affine


def _nilearn_tdp(z, mask, affine, thresholds, alpha):
    from nilearn.glm import cluster_level_inference

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        img = cluster_level_inference(
            nib.Nifti1Image(z, affine),
            nib.Nifti1Image(mask.astype(np.uint8), affine),
            threshold=list(thresholds),
            alpha=alpha,
        )
    return np.asarray(img.get_fdata())


@pytest.mark.parametrize(
    ("seed", "thresholds", "alpha"),
    [(0, [3.0], 0.05), (1, [2.0, 3.0, 3.5], 0.05), (2, [2.5, 3.1], 0.1), (3, [1.5, 4.0], 0.01)],
)
def test_tdp_map_equals_nilearn(seed, thresholds, alpha):
    z, mask, affine = _synthetic_z(seed)
    result = ari_clusters(z, mask, affine=affine, thresholds=thresholds, alpha=alpha)
    expected = _nilearn_tdp(z, mask, affine, thresholds, alpha)
    assert result.tdp_map.max() > 0  # the test can fail: there are clusters with a bound
    np.testing.assert_array_equal(result.tdp_map, expected)


def test_table_is_consistent_with_map_and_clusters():
    z, mask, affine = _synthetic_z(1)
    result = ari_clusters(z, mask, affine=affine, thresholds=[2.0, 3.5])
    table = result.table
    assert tuple(table.columns) == TABLE_COLUMNS
    assert result.thresholds == (2.0, 3.5)
    for threshold, rows in table.groupby("threshold"):
        labels, n_labels = ndimage.label(mask & (z > threshold))
        assert len(rows) == n_labels
        assert sorted(rows["size"]) == sorted(np.bincount(labels.ravel())[1:])
        assert list(rows["cluster_id"]) == list(range(1, n_labels + 1))
        assert np.all(np.diff(rows["peak_stat"].to_numpy()) <= 0)
    np.testing.assert_allclose(table["tdp"], table["true_discoveries"] / table["size"])
    np.testing.assert_allclose(table["volume_mm3"], table["size"] * 8.0)
    # Peak coordinates are the world position of the cluster maximum.
    top = table.iloc[0]
    ijk = np.unravel_index(np.argmax(np.where(mask, z, -np.inf)), z.shape)
    np.testing.assert_allclose(
        [top.peak_x, top.peak_y, top.peak_z], (affine @ [*ijk, 1])[:3], atol=1e-12
    )
    assert top.peak_stat == pytest.approx(z[ijk])
    # Highest threshold wins in the map.
    high = table[table.threshold == 3.5].iloc[0]
    assert result.tdp_map[ijk] == pytest.approx(high.tdp)


def test_connectivity_changes_clusters():
    z = np.zeros((5, 5, 5))
    mask = np.ones_like(z, dtype=bool)
    z[1, 1, 1] = z[2, 2, 2] = 8.0  # corner neighbours: 2 clusters with 6/18, 1 with 26
    sizes = {
        c: len(ari_clusters(z, mask, affine=np.eye(4), thresholds=3.0, connectivity=c).table)
        for c in (6, 18, 26)
    }
    assert sizes == {6: 2, 18: 2, 26: 1}


def test_two_sided_finds_negative_clusters():
    z, mask, affine = _synthetic_z(0)
    one = ari_clusters(z, mask, affine=affine, thresholds=[3.0])
    two = ari_clusters(z, mask, affine=affine, thresholds=[3.0], two_sided=True)
    assert (one.table.peak_stat < 0).sum() == 0
    negative = two.table[two.table.peak_stat < 0]
    assert len(negative) >= 1 and negative.true_discoveries.max() > 0
    assert two.tdp_map[13, 4, 4] > 0 and one.tdp_map[13, 4, 4] == 0
    # The family is the same: one Hommel value covers both signs.
    p_two = 2 * stats.norm.sf(np.abs(z[mask]))
    assert two.hommel == hommel_value(p_two, 0.05)


def test_where_nilearn_is_wrong_every_voxel_significant():
    # All in-mask p <= alpha: h = 0, every voxel is a discovery, TDP = 1. nilearn's u = 0 term
    # reports (n + 1) / n.
    z = np.full((3, 3, 3), 5.0)
    mask = np.ones_like(z, dtype=bool)
    result = ari_clusters(z, mask, affine=np.eye(4), thresholds=[3.0])
    assert result.hommel == 0
    assert np.all(result.tdp_map == 1.0)
    assert result.table.true_discoveries.tolist() == [27]
    nilearn_map = _nilearn_tdp(z, mask, np.eye(4), [3.0], 0.05)
    assert nilearn_map.max() == pytest.approx(28 / 27)


def test_errors_name_the_problem():
    z, mask, affine = _synthetic_z(0)
    with pytest.raises(UsageError, match="alpha"):
        hommel_value([0.1, 0.2], alpha=1.5)
    with pytest.raises(DataError, match="outside"):
        hommel_value([0.1, np.nan], alpha=0.05)
    with pytest.raises(UsageError, match="thresholds"):
        ari_clusters(z, mask, affine=affine, thresholds=[-1.0])
    with pytest.raises(UsageError, match="connectivity"):
        ari_clusters(z, mask, affine=affine, thresholds=[3.0], connectivity=8)
    with pytest.raises(DataError, match="same shape"):
        ari_clusters(z, mask[:-1], affine=affine, thresholds=[3.0])
    with pytest.raises(DataError, match="empty"):
        ari_clusters(z, np.zeros_like(mask), affine=affine, thresholds=[3.0])


def test_no_cluster_gives_empty_table():
    z, mask, affine = _synthetic_z(0)
    result = ari_clusters(z, mask, affine=affine, thresholds=[50.0])
    assert result.table.empty and tuple(result.table.columns) == TABLE_COLUMNS
    assert not result.tdp_map.any()
