"""Permutation inference on mixed-effects statistics, against an exhaustive enumeration.

Oracle: every sign flip enumerated, and at each one the mixed-effects model refitted by an
independent numpy/scipy implementation (closed-form DerSimonian-Laird; REML by the brute-force
search of ``test_mixed_effects``: a dense grid then scipy's bounded Brent search), the t
converted to z with scipy's t and normal distributions, Freedman-Lane done by hand, clusters
labelled by scipy.ndimage and TFCE integrated interval by interval (``test_tfce``'s oracle).
Nothing from bids_group is used by the oracle.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import linalg, ndimage, stats
from test_mixed_effects import _brute_force_tau2
from test_tfce import _exact_oracle

from bids_group.errors import UsageError
from bids_group.inference.mixed_permutation import mixed_permutation_test
from bids_group.inference.permutation import TIE_RTOL
from bids_group.inference.tfce import TfceParams
from bids_group.mixed_effects import fit_mixed, mixed_contrast

# ---------------------------------------------------------------------------------------------
# The oracle (numpy + scipy only)
# ---------------------------------------------------------------------------------------------


def _tau2(method, y, v, x):
    if method == "fe":
        return 0.0
    if method == "dl":
        w = 1.0 / v
        a = x.T @ (w[:, None] * x)
        beta = np.linalg.solve(a, x.T @ (w * y))
        q = np.sum(w * (y - x @ beta) ** 2)
        p_mat = np.diag(w) - (w[:, None] * x) @ np.linalg.solve(a, (w[:, None] * x).T)
        return max(0.0, (q - (y.size - x.shape[1])) / np.trace(p_mat))
    return _brute_force_tau2(y, v, x, reml=method == "reml")


def _wls(method, y, v, x):
    """(beta, Cov(beta)) at the estimator's tau^2."""
    w = 1.0 / (v + _tau2(method, y, v, x))
    a = x.T @ (w[:, None] * x)
    return np.linalg.solve(a, x.T @ (w * y)), np.linalg.inv(a)


def _z(method, y, v, x, c):
    beta, cov = _wls(method, y, v, x)
    t = c @ beta / np.sqrt(c @ cov @ c)
    dof = y.size - x.shape[1]
    return stats.norm.isf(stats.t.sf(t, dof))


def _oracle_z_maps(method, y, v, x, c, signs_list):
    """z maps (n_relabellings, n_voxels) by hand, Freedman-Lane on the reduced model."""
    n, n_vox = y.shape
    null = linalg.null_space(c[None, :])
    out = np.empty((len(signs_list), n_vox))
    for j in range(n_vox):
        ok = np.isfinite(v[:, j]) & (v[:, j] > 0)
        yj, vj, xj = y[ok, j], v[ok, j], x[ok]
        if null.shape[1]:
            z_mat = xj @ null
            fitted = z_mat @ _wls(method, yj, vj, z_mat)[0]
        else:
            fitted = np.zeros(yj.size)
        resid = yj - fitted
        for i, s in enumerate(signs_list):
            out[i, j] = _z(method, s[ok] * resid + fitted, vj, xj, c)
    return out


def _p_values(z_obs, z_null, two_sided):
    """Uncorrected and max-statistic FWER p, ties counted with the engine's tolerance."""
    f = np.abs if two_sided else (lambda a: a)
    obs, null = f(z_obs), f(z_null)
    thr = obs - TIE_RTOL * np.maximum(np.abs(obs), 1.0)
    p_unc = np.mean(null >= thr[None, :], axis=0)
    p_fwe = np.mean(null.max(axis=1)[:, None] >= thr[None, :], axis=0)
    return p_unc, p_fwe


def _all_flips(n):
    return [np.array(s, dtype=float) for s in itertools.product([1.0, -1.0], repeat=n)]


def _data(n, n_vox, seed, shift=0.4):
    rng = np.random.default_rng(seed)
    v = rng.uniform(0.2, 3.0, (n, n_vox))
    y = shift + rng.normal(0, 1, (n, n_vox)) * np.sqrt(v + 0.5)
    return y, v


# ---------------------------------------------------------------------------------------------
# Exhaustive enumeration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fe", "dl", "reml"])
@pytest.mark.parametrize("two_sided", [False, True])
def test_one_sample_exhaustive_equals_enumeration(method, two_sided):
    """7 maps, 2^7 sign flips all enumerated; one map excluded at one voxel (zero variance)."""
    y, v = _data(7, 9, seed=1)
    v[3, 4] = 0.0  # excluded there: 6 maps, 5 dof
    x = np.ones((7, 1))
    c = np.ones(1)
    res = mixed_permutation_test(y, v, x, c, method=method, n_perm=500, two_sided=two_sided,
                                 seed=0)  # fmt: skip
    assert res.exhaustive and res.n_relabellings == 128 and res.stat_type == "z"
    v_oracle = np.where(v > 0, v, np.nan)
    z_null = _oracle_z_maps(method, y, v_oracle, x, c, _all_flips(7))
    np.testing.assert_allclose(res.stat, z_null[0], rtol=1e-6, atol=1e-7)
    p_unc, p_fwe = _p_values(z_null[0], z_null, two_sided)
    np.testing.assert_array_equal(res.p_uncorrected, p_unc)
    np.testing.assert_array_equal(res.p_fwe, p_fwe)
    f = np.abs if two_sided else (lambda a: a)
    np.testing.assert_allclose(
        np.sort(res.null_max_stat), np.sort(f(z_null).max(axis=1)), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("method", ["dl", "reml"])
def test_covariate_freedman_lane_equals_enumeration(method):
    """Intercept + covariate, the covariate tested: residuals of the reduced mixed model (its own
    tau^2) flipped, the reduced fit added back, the full model refitted with tau^2 re-estimated."""
    n = 8
    y, v = _data(n, 6, seed=2, shift=0.0)
    age = np.linspace(-1.0, 1.0, n)
    y += 0.8 * age[:, None]
    x = np.column_stack([np.ones(n), age])
    c = np.array([0.0, 1.0])
    res = mixed_permutation_test(y, v, x, c, method=method, n_perm=1000, seed=0)
    assert res.exhaustive and res.n_relabellings == 256
    z_null = _oracle_z_maps(method, y, v, x, c, _all_flips(n))
    np.testing.assert_allclose(res.stat, z_null[0], rtol=1e-6, atol=1e-7)
    p_unc, p_fwe = _p_values(z_null[0], z_null, False)
    np.testing.assert_array_equal(res.p_uncorrected, p_unc)
    np.testing.assert_array_equal(res.p_fwe, p_fwe)


def test_identity_is_the_parametric_z_and_counts_first():
    y, v = _data(12, 40, seed=3)
    x = np.ones((12, 1))
    res = mixed_permutation_test(y, v, x, np.ones(1), method="reml", n_perm=30, seed=5)
    z = mixed_contrast(fit_mixed(y, v, x, "reml"), np.ones(1)).z
    np.testing.assert_array_equal(res.stat, z)
    assert res.null_max_stat[0] == pytest.approx(z.max(), rel=1e-6)
    assert np.all(res.p_uncorrected >= 1 / 31) and np.all(res.p_fwe >= res.p_uncorrected)
    again = mixed_permutation_test(y, v, x, np.ones(1), method="reml", n_perm=30, seed=5,
                                   n_jobs=2)  # fmt: skip
    np.testing.assert_array_equal(again.null_max_stat, res.null_max_stat)
    np.testing.assert_array_equal(again.p_uncorrected, res.p_uncorrected)


def test_clusters_and_tfce_equal_enumeration():
    """A 5 x 5 x 3 mask, 6 maps (64 flips): cluster sizes by scipy.ndimage, TFCE by the
    interval-by-interval oracle, both on the oracle's z maps."""
    rng = np.random.default_rng(4)
    mask = np.ones((5, 5, 3), bool)
    mask[0, 0, :] = False
    n_vox, n = int(mask.sum()), 6
    smooth = ndimage.gaussian_filter(rng.normal(size=(n, *mask.shape)), (0, 1, 1, 1))
    y = 0.6 + smooth[:, mask] / smooth[:, mask].std()
    v = rng.uniform(0.5, 2.0, (n, n_vox))
    x, c = np.ones((n, 1)), np.ones(1)
    params = TfceParams()
    res = mixed_permutation_test(y, v, x, c, method="dl", n_perm=100, mask=mask,
                                 cluster_forming_p=0.1, tfce=True, tfce_params=params,
                                 connectivity=26, seed=0)  # fmt: skip
    assert res.exhaustive and res.n_relabellings == 64
    z_null = _oracle_z_maps("dl", y, v, x, c, _all_flips(n))
    height = stats.norm.isf(0.1)
    assert res.clusters.height == pytest.approx(height)
    struct = ndimage.generate_binary_structure(3, 3)
    vol = np.zeros(mask.shape)
    max_size = []
    for z in z_null:
        vol[mask] = z
        lab, n_lab = ndimage.label(vol > height, struct)
        max_size.append(np.bincount(lab[mask])[1:].max(initial=0))
    np.testing.assert_array_equal(np.sort(res.clusters.null_max_size), np.sort(max_size))
    expected = [np.mean(np.array(max_size) >= s) for s in res.clusters.sizes]
    np.testing.assert_array_equal(res.clusters.p_fwe_size, expected)
    tf_null = []
    for z in z_null:
        vol[mask] = z
        tf_null.append(_exact_oracle(vol, mask, 26, False).max())
    tf_obs = res.tfce.tfce
    vol[mask] = z_null[0]
    np.testing.assert_allclose(tf_obs, _exact_oracle(vol, mask, 26, False), rtol=1e-9)
    np.testing.assert_allclose(np.sort(res.tfce.null_max), np.sort(tf_null), rtol=1e-4)
    thr = tf_obs - TIE_RTOL * np.maximum(np.abs(tf_obs), 1.0)
    np.testing.assert_array_equal(
        res.tfce.p_fwe, np.mean(np.array(tf_null)[:, None] >= thr[None, :], axis=0)
    )


def test_row_permutation_is_refused():
    y, v = _data(6, 4, seed=5)
    x = np.column_stack([np.ones(6), [0, 0, 0, 1, 1, 1]])
    with pytest.raises(UsageError, match="rows are not exchangeable"):
        mixed_permutation_test(y, v, x, np.array([0.0, 1.0]), scheme="permute", n_perm=10)


def test_two_group_difference_flips_reduced_model_residuals():
    """Group means, their difference tested: the reduced model is the common mean. Enumerated
    exactly against the oracle with 8 maps."""
    n = 8
    y, v = _data(n, 5, seed=6, shift=0.0)
    g = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=float)
    y += 1.5 * g[:, None]
    x = np.column_stack([g, 1 - g])
    c = np.array([1.0, -1.0])
    res = mixed_permutation_test(y, v, x, c, method="dl", n_perm=1000, seed=0)
    assert res.exhaustive and res.scheme == "flip"
    z_null = _oracle_z_maps("dl", y, v, x, c, _all_flips(n))
    np.testing.assert_allclose(res.stat, z_null[0], rtol=1e-6, atol=1e-7)
    p_unc, p_fwe = _p_values(z_null[0], z_null, False)
    np.testing.assert_array_equal(res.p_uncorrected, p_unc)
    np.testing.assert_array_equal(res.p_fwe, p_fwe)


def test_calibrated_where_the_parametric_test_is_liberal():
    """Null (beta = 0, tau^2 = 0.5) with very unequal first-level variances (0.1 to 10) and 10
    maps over 4,000 independent voxels: FLAME1's parametric t (REML, k - p dof) rejects at
    two-sided p < 0.05 ~7% of the time (liberal, see test_mixed_effects); the exhaustive
    sign-flip test (1,024 flips, an exact randomisation test at every voxel, p in steps of 2 /
    1,024 two-sided) rejects at its nominal 25 / 512 = 0.0488, within the binomial 95% interval
    (measured: 0.0495 here; 0.0435 with seed 2)."""
    rng = np.random.default_rng(1)
    n, n_vox = 10, 4000
    v = np.geomspace(0.1, 10.0, n)[:, None] * np.ones((1, n_vox))
    y = rng.normal(size=(n, n_vox)) * np.sqrt(v + 0.5)
    x = np.ones((n, 1))
    res = mixed_permutation_test(y, v, x, np.ones(1), method="reml", n_perm=2000,
                                 two_sided=True, seed=0)  # fmt: skip
    assert res.exhaustive and res.n_relabellings == 1024
    nominal = 25 / 512
    half = 1.96 * np.sqrt(nominal * (1 - nominal) / n_vox)
    perm_rate = np.mean(res.p_uncorrected <= 0.05)
    assert abs(perm_rate - nominal) < half, perm_rate
    c = mixed_contrast(fit_mixed(y, v, x, "reml"), [1.0])
    parametric_rate = np.mean(2 * np.minimum(c.p, 1 - c.p) < 0.05)
    assert parametric_rate > 0.05 + 1.96 * np.sqrt(0.05 * 0.95 / n_vox), parametric_rate
