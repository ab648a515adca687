"""TFCE: exact integral vs an independent interval-by-interval oracle; presets vs FSL's rule and
nilearn's own implementation; voxel graph vs scipy.ndimage connectivity."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bids_group.errors import UsageError
from bids_group.inference.tfce import TfceParams, fsl_dh, tfce, voxel_graph

STRUCT_RANK = {6: 1, 18: 2, 26: 3}


def _smooth_map(shape=(9, 10, 8), seed=0, scale=2.5):
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.standard_normal(shape), 1.2)
    mask = np.ones(shape, bool)
    mask[:1] = False
    mask[4, 4, :] = False  # a hole, so the mask is not a box
    x = x / x[mask].std() * scale
    return np.where(mask, x, 0.0), mask


def _exact_oracle(x3, mask, conn, two_sided, e=0.5, h=2.0):
    """TFCE integral, interval by interval between sorted distinct values (scipy labels)."""
    struct = ndimage.generate_binary_structure(3, STRUCT_RANK[conn])
    out = np.zeros(x3.shape)
    for sign in (1, -1) if two_sided else (1,):
        y = np.where(mask, sign * x3, 0.0)
        levels = np.unique(y[y > 0])
        lo = 0.0
        for hi in levels:
            lab, _ = ndimage.label(y >= hi, struct)
            size = np.bincount(lab.ravel())
            size[0] = 0
            out += sign * size[lab] ** e * (hi ** (h + 1) - lo ** (h + 1)) / (h + 1)
            lo = hi
    return out[mask]


@pytest.mark.parametrize("conn", [6, 18, 26])
@pytest.mark.parametrize("two_sided", [False, True])
def test_exact_integral_matches_oracle(conn, two_sided):
    x3, mask = _smooth_map(shape=(7, 8, 6), seed=conn)
    got = tfce(x3, mask, connectivity=conn, two_sided=two_sided)
    want = _exact_oracle(x3, mask, conn, two_sided)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


def test_exact_integral_other_exponents():
    x3, mask = _smooth_map(shape=(6, 7, 6), seed=3)
    got = tfce(x3, mask, params=TfceParams(e=1.0, h=1.5), connectivity=26)
    want = _exact_oracle(x3, mask, 26, False, e=1.0, h=1.5)
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_exact_integral_single_voxel_closed_form():
    # one isolated voxel of height 3: integral of 1 * h^2 dh from 0 to 3 = 9
    mask = np.ones((3, 3, 3), bool)
    x = np.zeros((3, 3, 3))
    x[1, 1, 1] = 3.0
    assert tfce(x, mask)[13] == pytest.approx(9.0)


@pytest.mark.parametrize("two_sided", [False, True])
def test_nilearn_preset_equals_nilearn(two_sided):
    calculate_tfce = pytest.importorskip("nilearn.mass_univariate._utils").calculate_tfce
    x3, mask = _smooth_map(seed=7)
    struct = ndimage.generate_binary_structure(3, 1)
    want = calculate_tfce(x3[..., None], struct, two_sided_test=two_sided)[..., 0][mask]
    got = tfce(x3, mask, params=TfceParams(integration="nilearn"), two_sided=two_sided)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_fsl_preset_is_fixed_step_riemann_sum():
    x3, mask = _smooth_map(seed=11)
    dh = x3[mask].max() / 100
    struct = ndimage.generate_binary_structure(3, 3)
    want = np.zeros(x3.shape)
    k = 1
    while k * dh < x3.max():
        lab, _ = ndimage.label(x3 > k * dh, struct)  # FSL: strictly above the step
        size = np.bincount(lab.ravel())
        size[0] = 0
        want += np.sqrt(size[lab]) * (k * dh) ** 2  # no dh factor, as fslmaths
        k += 1
    got = tfce(x3, mask, params=TfceParams(integration="fsl"), connectivity=26)
    np.testing.assert_allclose(got, want[mask], rtol=1e-9)
    # the preset's values are ~ exact integral / dh
    exact = tfce(x3, mask, connectivity=26)
    top = np.argmax(exact)
    assert got[top] * dh == pytest.approx(exact[top], rel=0.05)


def test_fsl_dh_fixed_by_caller():
    x3, mask = _smooth_map(seed=5)
    a = tfce(x3, mask, params=TfceParams(integration="fsl", dh=0.05))
    b = tfce(x3, mask, params=TfceParams(integration="fsl", dh=0.1))
    assert not np.allclose(a, b)
    assert fsl_dh(x3[mask], two_sided=False) == pytest.approx(x3[mask].max() / 100)


@pytest.mark.parametrize("conn", [6, 18, 26])
def test_voxel_graph_matches_ndimage(conn):
    _, mask = _smooth_map(shape=(5, 6, 4))
    g = voxel_graph(mask, conn)
    struct = ndimage.generate_binary_structure(3, STRUCT_RANK[conn])
    n_nb = ndimage.convolve(mask.astype(int), struct.astype(int), mode="constant") - 1
    np.testing.assert_array_equal(np.diff(g.ptr), n_nb[mask])
    assert g.fwd_idx.size * 2 == g.idx.size


def test_bad_params():
    with pytest.raises(UsageError, match="extent exponent"):
        TfceParams(e=0)
    with pytest.raises(UsageError, match="height exponent"):
        TfceParams(h=-1)
    with pytest.raises(UsageError, match="integration"):
        TfceParams(integration="spm")
    with pytest.raises(UsageError, match="only applies"):
        TfceParams(dh=0.1)
    with pytest.raises(UsageError, match="connectivity"):
        voxel_graph(np.ones((2, 2, 2), bool), 8)
    with pytest.raises(UsageError, match="fsl"):
        tfce(-np.ones((2, 2, 2)), np.ones((2, 2, 2), bool), params=TfceParams(integration="fsl"))
