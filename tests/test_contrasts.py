"""t/F contrasts against closed forms (scipy.stats, explicit linear algebra) and error paths."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st

from bids_group.contrasts import compute_contrast, two_sided_p
from bids_group.errors import DataError, UsageError
from bids_group.glm import fit_ols


@pytest.fixture(scope="module")
def fit():
    rng = np.random.default_rng(7)
    n = 24
    groups = np.repeat([0, 1, 2], 8)
    x = np.column_stack([(groups == g).astype(float) for g in range(3)] + [rng.normal(size=n)])
    beta = rng.normal(size=(4, 400))
    y = (x @ beta + rng.normal(size=(n, 400))).astype(np.float32)
    return fit_ols(y, x), x, y


def test_one_sample_t_equals_scipy_ttest():
    rng = np.random.default_rng(0)
    y = rng.normal(0.3, 1, size=(15, 50))
    res = compute_contrast(fit_ols(y, np.ones((15, 1))), np.array([[1.0]]), "t")
    ref = st.ttest_1samp(y, 0.0, axis=0, alternative="greater")
    np.testing.assert_allclose(res.stat, ref.statistic, rtol=1e-12)
    np.testing.assert_allclose(res.p, ref.pvalue, rtol=1e-10)
    np.testing.assert_allclose(res.z, st.norm.isf(ref.pvalue), rtol=1e-9)
    assert res.dof == (14.0,)
    np.testing.assert_allclose(res.effect[0], y.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(res.variance[0], y.var(axis=0, ddof=1) / 15, rtol=1e-10)
    np.testing.assert_allclose(two_sided_p(res), st.ttest_1samp(y, 0.0, axis=0).pvalue, rtol=1e-10)
    np.testing.assert_allclose(res.two_sided_p(), two_sided_p(res))


def test_two_sample_t_equals_scipy(fit):
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.5, 1, (12, 30)), rng.normal(0, 1, (9, 30))
    x = np.zeros((21, 2))
    x[:12, 0] = x[12:, 1] = 1
    res = compute_contrast(fit_ols(np.vstack([a, b]), x), np.array([[1.0, -1.0]]), "t")
    ref = st.ttest_ind(a, b, axis=0)
    np.testing.assert_allclose(res.stat, ref.statistic, rtol=1e-11)
    np.testing.assert_allclose(two_sided_p(res), ref.pvalue, rtol=1e-9)


def test_f_equals_closed_form_and_anova(fit):
    glm, x, y = fit
    c = np.array([[1.0, -1, 0, 0], [0, 1, -1, 0]])
    res = compute_contrast(glm, c, "F")
    # Closed form, voxel by voxel, with explicit inverses.
    xtx_inv = np.linalg.inv(x.T @ x)
    m_inv = np.linalg.inv(c @ xtx_inv @ c.T)
    for v in (0, 17, 399):
        b = xtx_inv @ x.T @ y[:, v].astype(float)
        sigma2 = np.sum((y[:, v] - x @ b) ** 2) / (24 - 4)
        f = (c @ b) @ m_inv @ (c @ b) / (2 * sigma2)
        assert res.stat[v] == pytest.approx(f, rel=1e-10)
        np.testing.assert_allclose(res.effect[:, v], c @ b, rtol=1e-10)
        np.testing.assert_allclose(res.variance[:, v], sigma2 * np.diag(c @ xtx_inv @ c.T))
    assert res.dof == (2.0, 20.0)
    np.testing.assert_allclose(res.p, st.f.sf(res.stat, 2, 20), rtol=1e-10)
    np.testing.assert_allclose(res.z, st.norm.isf(res.p), rtol=1e-8, atol=1e-10)
    assert res.effect.shape == res.variance.shape == (2, 400)


def test_one_row_f_is_t_squared(fit):
    glm, _, _ = fit
    c = np.array([[1.0, 0, -1, 0.5]])
    t = compute_contrast(glm, c, "t")
    f = compute_contrast(glm, c, "F")
    np.testing.assert_allclose(f.stat, t.stat**2, rtol=1e-10)
    np.testing.assert_allclose(f.p, two_sided_p(t), rtol=1e-9)


def test_redundant_f_rows_use_rank(fit):
    glm, _, _ = fit
    c2 = np.array([[1.0, -1, 0, 0], [0, 1, -1, 0]])
    c3 = np.vstack([c2, [1.0, 0, -1, 0]])
    r2, r3 = compute_contrast(glm, c2, "F"), compute_contrast(glm, c3, "F")
    assert r3.dof == (2.0, 20.0)
    np.testing.assert_allclose(r3.stat, r2.stat, rtol=1e-9)


def test_zero_variance_voxel_is_finite():
    y = np.ones((10, 2))
    y[:, 1] = 0.0
    res = compute_contrast(fit_ols(y, np.ones((10, 1))), np.array([[1.0]]), "t")
    assert np.isfinite(res.z).all()
    # 0 / 0 -> t = 0; c / 0 -> t = c / 1e-25 (nilearn's variance floor): large but finite z.
    assert res.z[1] == 0.0 and res.z[0] > 20


def test_errors(fit):
    glm, x, y = fit
    with pytest.raises(UsageError, match="4 columns"):
        compute_contrast(glm, np.ones((1, 3)), "t")
    with pytest.raises(UsageError, match="use test 'F'"):
        compute_contrast(glm, np.eye(4)[:2], "t")
    with pytest.raises(UsageError, match="not all zero"):
        compute_contrast(glm, np.zeros((1, 4)), "t")
    res = compute_contrast(glm, np.eye(4)[:2], "F")
    with pytest.raises(UsageError, match="only defined for t"):
        two_sided_p(res)
    # Rank-deficient design: the sum of the group columns equals a constant column.
    glm_def = fit_ols(y, np.column_stack([np.ones(24), x]))
    with pytest.raises(DataError, match="not estimable"):
        compute_contrast(glm_def, np.array([[1.0, 0, 0, 0, 0]]), "t")
    ok = compute_contrast(glm_def, np.array([[0.0, 1, -1, 0, 0]]), "t")
    ref = compute_contrast(glm, np.array([[1.0, -1, 0, 0]]), "t")
    np.testing.assert_allclose(ok.stat, ref.stat, rtol=1e-8)
