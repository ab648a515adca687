"""t/F -> p and z, against mpmath at 40 digits (far tails) and scipy.stats (central range)."""

from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest
import scipy.stats as st

import bids_group.distributions as dist
from bids_group.distributions import (
    f_sf_and_z,
    f_to_z,
    log_betainc,
    log_sf_f,
    log_sf_t,
    t_sf_and_z,
    t_to_z,
)

mp.mp.dps = 40


def _mp_isf(log_p: mp.mpf) -> mp.mpf:
    """z with log P(Z >= z) = log_p, solved at high precision."""
    z0 = mp.sqrt(-2 * log_p) if log_p < mp.log(0.25) else mp.mpf(0.3)
    return mp.findroot(lambda z: mp.log(mp.erfc(z / mp.sqrt(2)) / 2) - log_p, z0)


def _mp_z_from_tails(upper: mp.mpf, lower: mp.mpf) -> float:
    return float(_mp_isf(mp.log(upper)) if upper < lower else -_mp_isf(mp.log(lower)))


def mp_t(t: float, dof: float) -> tuple[float, float]:
    """(log P(T >= t), z) exactly."""
    t, dof = mp.mpf(t), mp.mpf(dof)
    x = dof / (dof + t * t)
    tail = mp.betainc(dof / 2, mp.mpf(1) / 2, 0, x, regularized=True) / 2
    upper, lower = (tail, 1 - tail) if t >= 0 else (1 - tail, tail)
    return float(mp.log(upper)), _mp_z_from_tails(upper, lower)


def mp_f(f: float, d1: float, d2: float) -> tuple[float, float]:
    f, d1, d2 = mp.mpf(f), mp.mpf(d1), mp.mpf(d2)
    x = d2 / (d2 + d1 * f)
    upper = mp.betainc(d2 / 2, d1 / 2, 0, x, regularized=True)
    lower = mp.betainc(d1 / 2, d2 / 2, 0, 1 - x, regularized=True)
    return float(mp.log(upper)), _mp_z_from_tails(upper, lower)


T_GRID = [-50, -30, -12.5, -4, -1, -0.01, 0.5, 2, 6, 10, 20, 30, 40, 50]
DOF_GRID = [2, 5, 12, 30, 80, 200]


@pytest.mark.parametrize("dof", DOF_GRID)
def test_t_matches_mpmath_on_grid(dof):
    t = np.array(T_GRID, dtype=float)
    p, z = t_sf_and_z(t, dof)
    exact = np.array([mp_t(v, dof) for v in t])
    np.testing.assert_allclose(z, exact[:, 1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(log_sf_t(t, dof), exact[:, 0], rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(p, np.exp(exact[:, 0]), rtol=1e-11, atol=0)


@pytest.mark.parametrize(
    ("t", "dof"),
    [(30, 1e4), (50, 1e4), (40, 1e6), (1e10, 3), (1e100, 50), (38, 5e3), (8, 1e8)],
)
def test_t_far_tail_where_scipy_underflows(t, dof):
    log_p, z_exact = mp_t(t, dof)
    z = float(t_to_z(t, dof))
    assert np.isfinite(z)
    # dof = 1e8: x = dof / (dof + t^2) carries a 1e-16 relative rounding that I_x(dof/2, 1/2)
    # amplifies by ~dof/2, hence 3e-11 relative on z there; 1e-13 elsewhere.
    assert z == pytest.approx(z_exact, rel=1e-10 if dof > 1e7 else 1e-12)
    assert float(log_sf_t(t, dof)) == pytest.approx(log_p, rel=1e-9 if dof > 1e7 else 1e-11)
    assert float(t_to_z(-t, dof)) == -z


F_GRID = [1e-30, 1e-3, 0.2, 1.0, 3.0, 10.0, 100.0, 1e3, 1e4]


@pytest.mark.parametrize(("d1", "d2"), [(1, 2), (2, 20), (3, 50), (5, 200), (10, 12), (4, 1000)])
def test_f_matches_mpmath_on_grid(d1, d2):
    f = np.array(F_GRID)
    p, z = f_sf_and_z(f, d1, d2)
    exact = np.array([mp_f(v, d1, d2) for v in f])
    np.testing.assert_allclose(z, exact[:, 1], rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(log_sf_f(f, d1, d2), exact[:, 0], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(p, np.exp(exact[:, 0]), rtol=1e-10, atol=0)


def test_central_range_matches_scipy():
    rng = np.random.default_rng(1)
    t = rng.uniform(-8, 8, 2000)
    for dof in (3, 17, 60):
        p, z = t_sf_and_z(t, dof)
        np.testing.assert_allclose(p, st.t.sf(t, dof), rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(z, st.norm.isf(st.t.sf(t, dof)), atol=1e-8)
    f = rng.uniform(0.01, 30, 2000)
    p, z = f_sf_and_z(f, 3, 25)
    np.testing.assert_allclose(p, st.f.sf(f, 3, 25), rtol=1e-11)
    np.testing.assert_allclose(z, st.norm.isf(st.f.sf(f, 3, 25)), atol=1e-8)


def test_z_monotone_finite_and_zero_at_zero():
    t = np.concatenate([-np.logspace(3, -6, 400), [0.0], np.logspace(-6, 3, 400)])
    for dof in (2, 20, 2000):
        z = t_to_z(t, dof)
        assert np.isfinite(z).all()
        assert np.all(np.diff(z) > 0)
        assert t_to_z(0.0, dof) == 0.0
        np.testing.assert_array_equal(z, -t_to_z(-t, dof))
    f = np.logspace(-8, 6, 800)
    for d1, d2 in ((1, 5), (3, 40), (8, 500)):
        z = f_to_z(f, d1, d2)
        assert np.isfinite(z).all()
        assert np.all(np.diff(z) > 0)


def test_special_values():
    assert t_to_z(np.inf, 5) == np.inf and t_to_z(-np.inf, 5) == -np.inf
    assert np.isnan(t_to_z(np.nan, 5))
    assert f_to_z(np.inf, 2, 5) == np.inf
    # F = 0 has P(F <= 0) = 0: floored at the smallest double instead of -inf.
    assert f_to_z(0.0, 3, 10) == pytest.approx(-38.4674, abs=1e-3)


def test_log_betainc_continued_fraction_against_mpmath():
    # All three underflow in scipy.special.betainc.
    for a, b, x in [(500.0, 0.5, 1e-3), (5e5, 0.5, 0.998), (250.0, 1.5, 1e-5)]:
        exact = float(mp.log(mp.betainc(a, b, 0, x, regularized=True)))
        assert float(log_betainc(a, b, x)) == pytest.approx(exact, rel=1e-11)


def test_nilearn_clips_z_where_we_do_not():
    """nilearn's z_score clips p to >= 1e-300, so z saturates at 37.04 (t = 50, dof = 1e4:
    the exact z is 47.24); it is exact elsewhere (t = 30, dof = 10)."""
    from nilearn.glm.contrasts import Contrast

    t = np.array([30.0, 50.0])
    dofs = np.array([10.0, 1e4])
    ours = np.array([float(t_to_z(v, d)) for v, d in zip(t, dofs, strict=True)])
    exact = np.array([mp_t(v, d)[1] for v, d in zip(t, dofs, strict=True)])
    theirs = []
    for v, d in zip(t, dofs, strict=True):
        con = Contrast(effect=np.array([[v]]), variance=np.array([1.0]), dof=d, stat_type="t")
        theirs.append(float(con.z_score()[0]))
    np.testing.assert_allclose(ours, exact, rtol=1e-12)
    assert theirs[0] == pytest.approx(exact[0], abs=1e-9)
    assert theirs[1] == pytest.approx(st.norm.isf(1e-300))  # 37.04: clipped
    assert exact[1] - theirs[1] > 10


def test_quantiles_equal_scipy_stats_which_is_not_imported_at_run_time():
    # t_isf / f_isf / norm_sf avoid importing scipy.stats (~0.3 s at every start); they must give
    # scipy.stats' numbers exactly, and the doctests their printed values.
    import doctest

    assert doctest.testmod(dist).failed == 0
    for p in (0.05, 0.01, 1e-3, 1e-6, 1e-12):
        for dof in (1, 3.5, 20, 1000):
            assert dist.t_isf(p, dof) == st.t.isf(p, dof)
            assert dist.f_isf(p, 2, dof) == st.f.isf(p, 2, dof)
    z = np.linspace(-40, 40, 801)
    np.testing.assert_array_equal(dist.norm_sf(z), st.norm.sf(z))
