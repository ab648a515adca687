"""Variance groups with any design (bids_group.mixed_effects, joint ML/REML over the groups'
tau^2): an independent brute-force maximisation (numpy likelihood, scipy optimisers, every
face of the boundary searched on its own), the separable and one-group cases against the
existing fits, boundaries exactly 0, thread independence.

The oracle writes the (restricted) log-likelihood from its definition (Harville 1977;
Viechtbauer 2005) with ``Var(y) = diag(v_i + tau^2_g(i))``, then maximises it on each face of
``tau^2 >= 0`` (every subset of groups at 0, the others free): a dense grid on log tau^2, then
Nelder-Mead on log tau^2 from the grid's best point, then bounded L-BFGS-B on tau^2 itself
from there; the best face wins. Nothing of bids_group is used by it.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize

from bids_group import _mixed_kernels as kern
from bids_group.mixed_effects import (
    _fit_joint,
    _group_index,
    fit_mixed,
    log_likelihood,
    mixed_contrast,
    valid_values,
)

PAIN21 = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "pain21"
#: Made-up variance groups of pain21's 21 studies (alternating), and a shared covariate.
PAIN21_GROUPS = np.arange(21) % 2
TOL = 1e-6


# ---------------------------------------------------------------------------------------------
# Independent oracle (numpy + scipy only)
# ---------------------------------------------------------------------------------------------


def np_loglik(tau, y, v, x, groups, reml):
    """-1/2 [log|V| + r'V^-1 r (+ log|X'V^-1X| for REML)], V = diag(v + tau[groups])."""
    total = v + np.asarray(tau)[groups]
    w = 1.0 / total
    a = x.T @ (w[:, None] * x)
    beta = np.linalg.solve(a, x.T @ (w * y))
    r = y - x @ beta
    ll = -0.5 * (np.log(total).sum() + (w * r * r).sum())
    return ll - 0.5 * np.linalg.slogdet(a)[1] if reml else ll


def np_loglik_many(taus, y, v, x, groups, reml):
    """:func:`np_loglik` at many points ``taus`` (M, G) at once."""
    total = v[None, :] + taus[:, groups]
    w = 1.0 / total
    a = np.einsum("mi,ia,ib->mab", w, x, x)
    beta = np.linalg.solve(a, np.einsum("mi,ia,i->ma", w, x, y)[..., None])[..., 0]
    r = y[None, :] - beta @ x.T
    ll = -0.5 * (np.log(total).sum(axis=1) + (w * r * r).sum(axis=1))
    return ll - 0.5 * np.linalg.slogdet(a)[1] if reml else ll


def _grid_minima(values, shape, n_best):
    """Flat indices of the ``n_best`` lowest local minima of ``values`` on a grid."""
    grid = values.reshape(shape)
    padded = np.pad(grid, 1, constant_values=np.inf)
    is_min = np.ones(shape, bool)
    for off in itertools.product((0, 1, 2), repeat=len(shape)):
        if off != (1,) * len(shape):
            window = tuple(slice(o, o + n) for o, n in zip(off, shape, strict=True))
            is_min &= grid <= padded[window]
    idx = np.flatnonzero(is_min.ravel())
    return idx[np.argsort(values[idx])][:n_best]


def brute_force(y, v, x, groups, reml):
    """(tau, loglik) of the global maximum over tau >= 0, face by face: on each face a dense
    grid on log tau^2, Nelder-Mead from its two best local maxima, then L-BFGS-B."""
    n_groups = groups.max() + 1
    n_grid = 41 if n_groups <= 2 else 17
    top = 100.0 * max(np.var(y) * len(y), v.max())
    logs = np.linspace(np.log(1e-6 * v.min()), np.log(top), n_grid)
    best_tau, best_ll = np.zeros(n_groups), np_loglik(np.zeros(n_groups), y, v, x, groups, reml)
    for n_free in range(1, n_groups + 1):
        for free in itertools.combinations(range(n_groups), n_free):
            free = list(free)

            def full(t, free=free):
                tau = np.zeros(np.shape(t)[:-1] + (n_groups,))
                tau[..., free] = t
                return tau

            pts = np.array(list(itertools.product(logs, repeat=n_free)))
            values = -np_loglik_many(full(np.exp(pts)), y, v, x, groups, reml)
            for start in _grid_minima(values, (n_grid,) * n_free, 2):
                res = optimize.minimize(
                    lambda s, full=full: -np_loglik(full(np.exp(s)), y, v, x, groups, reml),
                    pts[start],
                    method="Nelder-Mead",
                    options={"xatol": 1e-7, "fatol": 1e-11, "maxiter": 5000},
                )
                polish = optimize.minimize(
                    lambda t, full=full: -np_loglik(full(t), y, v, x, groups, reml),
                    np.exp(res.x),
                    method="L-BFGS-B",
                    bounds=[(0.0, None)] * n_free,
                    options={"ftol": 1e-16, "gtol": 1e-12, "maxiter": 1000},
                )
                for t in (np.exp(res.x), polish.x):
                    ll = np_loglik(full(t), y, v, x, groups, reml)
                    if ll > best_ll:
                        best_tau, best_ll = full(t), ll
    return best_tau, best_ll


def assert_matches_oracle(fit, y, v, x, groups, reml):
    """tau^2 within 1e-6 (relative, or absolute in units of the voxel's median variance) of
    the brute force, and our log-likelihood at least as high and within 1e-6."""
    worst_tau, worst_ll = 0.0, 0.0
    for j in range(y.shape[1]):
        tau, ll = brute_force(y[:, j], v[:, j], x, groups, reml)
        ours = np_loglik(fit.tau2[:, j], y[:, j], v[:, j], x, groups, reml)
        scale = np.maximum(tau, np.median(v[:, j]))
        worst_tau = max(worst_tau, float(np.max(np.abs(fit.tau2[:, j] - tau) / scale)))
        worst_ll = max(worst_ll, abs(ours - ll))
        assert ours >= ll - 1e-9, (j, fit.tau2[:, j], tau, ours, ll)
    assert worst_tau <= TOL and worst_ll <= TOL, (worst_tau, worst_ll)
    return worst_tau, worst_ll


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _synthetic(n_vox=100, seed=0, n_groups=2):
    """Three-level group factor collapsed to ``n_groups`` variance groups, an intercept, a
    group difference and a shared covariate (not separable); true tau^2 differ by group and
    are 0 for a quarter of the voxels of each group."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), 24 // n_groups)
    n = groups.size
    x = np.column_stack([np.ones(n), groups == 1, rng.normal(size=n)]).astype(float)
    v = rng.uniform(0.2, 4.0, (n, n_vox)) * rng.choice([1.0, 10.0], (n, 1))
    scale = rng.uniform(0.0, 3.0, (n_groups, n_vox)) * (rng.random((n_groups, n_vox)) > 0.25)
    tau = scale[groups] * np.linspace(0.3, 2.0, n_groups)[groups][:, None]
    y = (x @ [1.0, 0.5, 0.3])[:, None] + rng.normal(size=(n, n_vox)) * np.sqrt(v + tau)
    return y, v, x, groups


@pytest.fixture(scope="module")
def pain21():
    """(y, v, X, groups) at 100 sampled voxels of pain21 with all variances positive:
    intercept, a group difference (alternating studies) and a shared made-up covariate."""
    if not (PAIN21 / "mask.nii.gz").exists():
        pytest.skip(f"pain21 not found at {PAIN21}")
    nib = pytest.importorskip("nibabel")
    mask = np.asarray(nib.load(PAIN21 / "mask.nii.gz").dataobj) > 0

    def load(stem):
        maps = [nib.load(PAIN21 / f"{stem}_{i:02d}.nii.gz").dataobj for i in range(1, 22)]
        return np.stack([np.asarray(m)[mask] for m in maps]).astype(np.float64)

    y, v = load("contrast_pain"), load("var_pain")
    positive = np.flatnonzero((v > 0).all(axis=0))
    cols = np.random.default_rng(13).choice(positive, 100, replace=False)
    covariate = np.random.default_rng(7).normal(size=21)
    x = np.column_stack([np.ones(21), PAIN21_GROUPS, covariate])
    return y[:, cols], v[:, cols], x, PAIN21_GROUPS


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ml", "reml"])
def test_joint_matches_brute_force_synthetic(method):
    y, v, x, groups = _synthetic()
    fit = fit_mixed(y, v, x, method, groups=groups)
    assert fit.group_labels == (0, 1) and fit.tau2.shape == (2, y.shape[1])
    assert fit.estimable.all()
    assert (fit.tau2 == 0).any() and (fit.tau2 > 0).any()  # both kinds of voxel occur
    assert_matches_oracle(fit, y, v, x, groups, method == "reml")


@pytest.mark.parametrize("method", ["ml", "reml"])
def test_joint_matches_brute_force_pain21(method, pain21):
    y, v, x, groups = pain21
    fit = fit_mixed(y, v, x, method, groups=groups)
    assert_matches_oracle(fit, y, v, x, groups, method == "reml")


#: pain21 voxels (i, j, k) where the REML likelihood of PAIN21_GROUPS with the design of the
#: pain21 fixture has two local maxima 0.01 apart in log-likelihood, and (tau2_1, tau2_2) near
#: the lower one: the product grid alone (24 values per group) ended there; the axis scans
#: (score signs along each group's axis) find the better one.
TWO_MAXIMA = {(37, 65, 44): (259.73, 0.0), (21, 49, 49): (9641.9, 13569.3)}


def test_two_nearly_equal_maxima_pain21():
    if not (PAIN21 / "mask.nii.gz").exists():
        pytest.skip(f"pain21 not found at {PAIN21}")
    nib = pytest.importorskip("nibabel")
    idx = tuple(np.array(list(TWO_MAXIMA)).T)

    def load(stem):
        maps = [nib.load(PAIN21 / f"{stem}_{i:02d}.nii.gz").dataobj for i in range(1, 22)]
        return np.stack([np.asarray(m)[idx] for m in maps]).astype(np.float64)

    y, v = load("contrast_pain"), load("var_pain")
    covariate = np.random.default_rng(7).normal(size=21)
    x = np.column_stack([np.ones(21), PAIN21_GROUPS, covariate])
    fit = fit_mixed(y, v, x, "reml", groups=PAIN21_GROUPS)
    assert_matches_oracle(fit, y, v, x, PAIN21_GROUPS, True)
    for j, near in enumerate(TWO_MAXIMA.values()):  # the other local maximum is lower
        args = (y[:, j], v[:, j], x, PAIN21_GROUPS, True)
        res = optimize.minimize(lambda t, a=args: -np_loglik(t, *a), np.array(near),
                                method="L-BFGS-B", bounds=[(0.0, None)] * 2)  # fmt: skip
        best = np_loglik(fit.tau2[:, j], *args)
        assert 1e-3 < best + res.fun < 0.05
        assert np.max(np.abs(res.x - fit.tau2[:, j])) > 50.0  # a different point


def test_three_groups_match_brute_force():
    y, v, x, groups = _synthetic(n_vox=10, seed=3, n_groups=3)
    fit = fit_mixed(y, v, x, "reml", groups=groups)
    assert fit.tau2.shape == (3, 10)
    assert_matches_oracle(fit, y, v, x, groups, True)


def test_beta_and_rwr_are_wls_at_the_groups_tau2():
    """beta, Cov(beta) and r'Wr are the WLS fit with w_i = 1 / (v_i + tau2_g(i)) (numpy)."""
    y, v, x, groups = _synthetic(n_vox=30, seed=1)
    fit = fit_mixed(y, v, x, "reml", groups=groups)
    for j in range(30):
        w = 1.0 / (v[:, j] + fit.tau2[groups, j])
        a = x.T @ (w[:, None] * x)
        beta = np.linalg.solve(a, x.T @ (w * y[:, j]))
        r = y[:, j] - x @ beta
        np.testing.assert_allclose(fit.beta[:, j], beta, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fit.cov_beta[:, :, j], np.linalg.inv(a), rtol=1e-10)
        assert fit.rwr[j] == pytest.approx((w * r * r).sum(), rel=1e-10)
    np.testing.assert_array_equal(fit.dof, x.shape[0] - x.shape[1])
    assert np.isfinite(mixed_contrast(fit, [0.0, 1.0, 0.0]).z).all()


@pytest.mark.parametrize("method", ["ml", "reml"])
def test_separable_design_joint_equals_factorised(method):
    """A separable design (group means, a group-specific covariate): the joint search gives
    the group-by-group fit (the likelihood factorises) to 1e-8."""
    rng = np.random.default_rng(4)
    groups = np.repeat([0, 1], [10, 12])
    x = np.column_stack([groups == 0, groups == 1, (groups == 1) * rng.normal(size=22)])
    x = x.astype(float)
    v = rng.uniform(0.3, 3.0, (22, 200))
    tau = np.where(groups, 3.0, 0.2)[:, None] * rng.uniform(0, 2, (1, 200))
    y = (x @ [1.0, 2.0, 0.5])[:, None] + rng.normal(size=(22, 200)) * np.sqrt(v + tau)
    separable = fit_mixed(y, v, x, method, groups=groups)
    labels, index = _group_index(groups, 22)
    joint = _fit_joint(y, v, x, method, labels, index, 48)
    scale = np.maximum(separable.tau2, np.median(v, axis=0))
    assert np.max(np.abs(joint.tau2 - separable.tau2) / scale) <= 1e-8
    np.testing.assert_array_equal(joint.tau2 == 0, separable.tau2 == 0)
    np.testing.assert_allclose(joint.beta, separable.beta, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["ml", "reml"])
def test_one_group_equals_single_tau2(method):
    """G = 1: fit_mixed gives today's single-tau^2 fit exactly, and the joint kernel agrees
    with it to 1e-10."""
    y, v, x, _ = _synthetic(n_vox=200, seed=2)
    single = fit_mixed(y, v, x, method)
    grouped = fit_mixed(y, v, x, method, groups=np.zeros(len(y), int))
    np.testing.assert_array_equal(grouped.tau2[0], single.tau2)
    np.testing.assert_array_equal(grouped.beta, single.beta)
    joint = _fit_joint(y, v, x, method, [0], np.zeros(len(y), np.int64), 48)
    scale = np.maximum(single.tau2, np.median(v, axis=0))
    assert np.max(np.abs(joint.tau2[0] - single.tau2) / scale) <= 1e-10
    np.testing.assert_array_equal(joint.tau2[0] == 0, single.tau2 == 0)


def test_boundary_is_exactly_zero():
    """Group 0's effects are far less spread than their variances: its tau^2 is exactly 0
    (KKT: a non-positive score there), while group 1's is positive."""
    rng = np.random.default_rng(8)
    groups = np.repeat([0, 1], 10)
    x = np.column_stack([np.ones(20), rng.normal(size=20)])
    v = np.full((20, 50), 4.0)
    y = rng.normal(size=(20, 50)) * np.sqrt(np.where(groups, 9.0, 0.01))[:, None]
    fit = fit_mixed(y, v, x, "reml", groups=groups)
    assert (fit.tau2[0] == 0.0).mean() > 0.9
    assert (fit.tau2[1] > 0).mean() > 0.8
    assert_matches_oracle(fit, y, v, x, groups, True)  # the zeros are the optimum


def test_excluded_maps_and_unidentifiable_groups():
    """An excluded map (zero variance) is dropped at its voxel (same as fitting without it);
    a voxel where a group keeps too few maps for its tau^2 is not estimable."""
    y, v, x, groups = _synthetic(n_vox=3, seed=5)
    v[0, 0] = 0.0
    v[groups == 1, 2] = 0.0
    v[np.flatnonzero(groups == 1)[:-1], 2] = 0.0  # one map of group 1 left (k_g = 1)
    v[np.flatnonzero(groups == 1)[-1], 2] = 1.0
    fit = fit_mixed(y, v, x, "reml", groups=groups)
    np.testing.assert_array_equal(fit.estimable, [True, True, False])
    assert np.isnan(fit.tau2[:, 2]).all() and fit.n_not_estimable == 1
    ref = fit_mixed(y[1:, :1], v[1:, :1], x[1:], "reml", groups=groups[1:])
    np.testing.assert_array_equal(fit.tau2[:, 0], ref.tau2[:, 0])


def test_log_likelihood_matches_numpy():
    y, v, x, groups = _synthetic(n_vox=10, seed=6)
    tau = np.abs(np.random.default_rng(0).normal(size=(2, 10)))
    ok = valid_values(y, v)
    out = np.empty(10)
    kern.loglik_voxels_groups(
        np.ascontiguousarray(y.T), np.ascontiguousarray(v.T), np.ascontiguousarray(ok.T),
        x, groups.astype(np.int64), tau, True, out,
    )  # fmt: skip
    ref = [np_loglik(tau[:, j], y[:, j], v[:, j], x, groups, True) for j in range(10)]
    np.testing.assert_allclose(out, ref, rtol=1e-12)
    one = np.empty(10)  # one group: the single-tau^2 log-likelihood, bit for bit
    kern.loglik_voxels_groups(
        np.ascontiguousarray(y.T), np.ascontiguousarray(v.T), np.ascontiguousarray(ok.T),
        x, np.zeros(len(y), np.int64), tau[:1], True, one,
    )  # fmt: skip
    np.testing.assert_array_equal(one, log_likelihood(y, v, x, tau[0]))


def test_results_do_not_depend_on_threads():
    numba = pytest.importorskip("numba")
    y, v, x, groups = _synthetic(n_vox=700, seed=9)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = fit_mixed(y, v, x, "reml", groups=groups)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = fit_mixed(y, v, x, "reml", groups=groups)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one.tau2, two.tau2)
    np.testing.assert_array_equal(one.beta, two.beta)


@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_scale_equivariance(scale):
    """Effects x s, variances x s^2: tau^2 x s^2 (to rounding), the same zeros."""
    y, v, x, groups = _synthetic(n_vox=200, seed=11)
    base = fit_mixed(y, v, x, "reml", groups=groups)
    scaled = fit_mixed(y * scale, v * scale**2, x, "reml", groups=groups)
    bound = np.maximum(base.tau2, np.median(v, axis=0))
    assert np.max(np.abs(scaled.tau2 / scale**2 - base.tau2) / bound) < 1e-12
    np.testing.assert_array_equal(scaled.tau2 == 0, base.tau2 == 0)
