"""TFCE: exact integral vs an independent interval-by-interval oracle; presets vs FSL's rule and
nilearn's own implementation; voxel graph vs scipy.ndimage connectivity."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from scipy import ndimage

from bids_group.errors import UsageError
from bids_group.inference.tfce import TfceParams, batch_tfce, fsl_dh, tfce, voxel_graph

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


def _fsl_oracle(x3, dh):
    """FSL's fixed-step Riemann sum, 26-connectivity, one label per step."""
    struct = ndimage.generate_binary_structure(3, 3)
    want = np.zeros(x3.shape)
    k = 1
    while k * dh < x3.max():
        lab, _ = ndimage.label(x3 > k * dh, struct)  # FSL: strictly above the step
        size = np.bincount(lab.ravel())
        size[0] = 0
        want += np.sqrt(size[lab]) * (k * dh) ** 2  # no dh factor, as fslmaths
        k += 1
    return want


def test_fsl_preset_is_fixed_step_riemann_sum():
    x3, mask = _smooth_map(seed=11)
    dh = x3[mask].max() / 100
    want = _fsl_oracle(x3, dh)
    got = tfce(x3, mask, params=TfceParams(integration="fsl"), connectivity=26)
    np.testing.assert_allclose(got, want[mask], rtol=1e-9)
    # the preset's values are ~ exact integral / dh
    exact = tfce(x3, mask, connectivity=26)
    top = np.argmax(exact)
    assert got[top] * dh == pytest.approx(exact[top], rel=0.05)


def test_fsl_preset_more_steps_than_the_kernel_counters():
    # ~13,000 steps: more levels than the counting sort's preallocated counters (6 * 2048)
    x3, mask = _smooth_map(shape=(5, 5, 3), seed=2, scale=1.0)
    dh = x3[mask].max() / 13_000
    got = tfce(x3, mask, params=TfceParams(integration="fsl", dh=dh), connectivity=26)
    np.testing.assert_allclose(got, _fsl_oracle(x3, dh)[mask], rtol=1e-9)


@pytest.mark.parametrize("quantum", [0.0, 0.25])
def test_batch_float32_ties_counts_and_any_thread_count(quantum):
    # float32 rows (as in the permutation engine), with many exact ties when quantised; the
    # exceedance counts fused into the kernel equal numpy's count over the maps it returns,
    # and nothing depends on the number of threads
    x3, mask = _smooth_map(shape=(8, 9, 7), seed=21)
    if quantum:
        x3 = np.round(x3 / quantum) * quantum
    base = x3[mask].astype(np.float32)
    rows = np.stack([base, -base, base[::-1].copy(), np.roll(base, 7)])
    g = voxel_graph(mask, 26)
    params = TfceParams()
    threads = numba.get_num_threads()
    try:
        for two_sided in (False, True):
            want = []
            for r in rows:
                r3 = np.zeros(mask.shape)
                r3[mask] = r
                want.append(_exact_oracle(r3, mask, 26, two_sided))
            want = np.array(want)
            # ties with row 0's float32 values must count (>=), and a spread of thresholds
            thr = np.abs(want[0].astype(np.float32)).astype(float)
            thr[::2] *= np.linspace(0.5, 1.5, thr[::2].size)
            results = []
            for n_threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
                numba.set_num_threads(n_threads)
                out = np.empty(rows.shape, np.float32)
                maxima = np.zeros(len(rows))
                counts = np.zeros(mask.sum(), np.int64)
                batch_tfce(rows, params, two_sided, g, out, maxima, threshold=thr, counts=counts)
                results.append((out, maxima, counts))
            out, maxima, counts = results[0]
            for other in results[1:]:
                for a, b in zip(results[0], other, strict=True):
                    np.testing.assert_array_equal(a, b)
            np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
            np.testing.assert_allclose(maxima, np.abs(want).max(axis=1), rtol=1e-9)
            np.testing.assert_array_equal(counts, (np.abs(out.astype(float)) >= thr).sum(0))
    finally:
        numba.set_num_threads(threads)


def test_constant_map_and_empty_tail():
    mask = np.ones((3, 4, 5), bool)
    # one component of 60 voxels at height 2 (every key equal: the radix sort has no pass)
    got = tfce(np.full(mask.shape, 2.0), mask, connectivity=6)
    np.testing.assert_allclose(got, np.sqrt(60) * 8 / 3, rtol=1e-12)
    # nilearn preset on a map with nothing above 0: zeros, not leftovers of a previous map
    rows = np.stack([np.ones(60), -np.ones(60)])
    out = np.full(rows.shape, np.nan)
    maxima = np.full(2, np.nan)
    params = TfceParams(integration="nilearn")
    batch_tfce(rows, params, False, voxel_graph(mask, 6), out, maxima)
    assert np.all(out[0] > 0) and np.all(out[1] == 0)
    assert maxima[1] == 0 and maxima[0] == out[0].max()


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
    # the padded grid gives the same neighbours in the same (increasing index) order
    cell = np.full(g.grid_size, -1)
    cell[g.grid_pos] = np.arange(g.n_voxels)
    for v in range(g.n_voxels):
        nb = cell[g.grid_pos[v] + g.grid_off]
        np.testing.assert_array_equal(nb[nb >= 0], g.idx[g.ptr[v] : g.ptr[v + 1]])


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


@pytest.mark.parametrize("integration", ["exact", "fsl"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_two_sided_is_bit_identical_to_each_tail_apart(integration, dtype):
    """Two-sided TFCE equals, bit for bit, the one-sided
    TFCE of x on x > 0 and minus that of -x on x < 0: with ties across signs (|x| equal), zeros
    of both signs, a map with one tail empty, and 1 or 2 threads."""
    x3, mask = _smooth_map(seed=3)
    x = x3[mask]
    rng = np.random.default_rng(0)
    x[rng.choice(x.size, 40, replace=False)] = 0.0
    x[rng.choice(x.size, 10, replace=False)] = -0.0
    x[:30] = np.round(x[:30])  # ties within and across tails
    rows = np.stack([x, -x, np.abs(x), -np.abs(x), np.round(x * 4) / 4]).astype(dtype)
    g = voxel_graph(mask, 26)
    params = TfceParams(integration=integration, dh=0.05 if integration == "fsl" else None)

    def run(r, two_sided, n_threads):
        out = np.zeros(r.shape, dtype)
        maxima = np.zeros(r.shape[0])
        thr = np.abs(out[0]) + 3.0
        counts = np.zeros(r.shape[1], np.int64)
        old = numba.get_num_threads()
        numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))
        try:
            batch_tfce(r, params, two_sided, g, out, maxima, threshold=thr, counts=counts)
        finally:
            numba.set_num_threads(old)
        return out, maxima, counts

    pos, pos_max, _ = run(rows, False, 1)
    neg, neg_max, _ = run(-rows, False, 1)
    want = np.where(neg > 0, -neg, pos)
    for n_threads in (1, 2):
        got, got_max, counts = run(rows, True, n_threads)
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))  # incl. -0.0
        np.testing.assert_array_equal(got_max, np.maximum(pos_max, neg_max))
        np.testing.assert_array_equal(counts, np.sum(np.abs(want.astype(float)) >= 3.0, axis=0))
    assert np.all(got[3] <= 0) and np.all(got[2] >= 0) and np.any(got[0] < 0) and np.any(got[0] > 0)
