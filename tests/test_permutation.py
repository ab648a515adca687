"""Permutation engine: exact p by enumeration, parametric equality of the unpermuted statistic,
Freedman-Lane against a brute-force refit, exchangeability, reproducibility, parity with
nilearn, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, stats

from bids_group.errors import DataError, UsageError
from bids_group.inference import exchangeability as exch
from bids_group.inference.permutation import partition_design, permutation_test
from bids_group.inference.tfce import TfceParams


def _ols_t(y, x, c):
    """Closed-form OLS t (numpy only): the independent oracle."""
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    res = y - x @ beta
    dof = x.shape[0] - np.linalg.matrix_rank(x)
    s2 = (res**2).sum(0) / dof
    c = np.atleast_2d(c)
    return (c @ beta)[0] / np.sqrt(s2 * (c @ np.linalg.pinv(x.T @ x) @ c.T)[0, 0])


def _ols_f(y, x, c):
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    res = y - x @ beta
    dof = x.shape[0] - np.linalg.matrix_rank(x)
    s2 = (res**2).sum(0) / dof
    cb = c @ beta
    cov = c @ np.linalg.inv(x.T @ x) @ c.T
    return np.einsum("iv,ij,jv->v", cb, np.linalg.inv(cov), cb) / c.shape[0] / s2


def _designs(rng):
    n = 16
    g = np.r_[np.ones(8), np.zeros(8)]
    age = rng.normal(40, 10, n)
    subj = np.repeat(np.arange(8), 2)
    cond = np.tile([1.0, -1.0], 8)
    paired = np.c_[cond, (subj[:, None] == np.arange(8)).astype(float)]
    return {
        "one-sample": (np.ones((n, 1)), np.array([[1.0]]), "t", None),
        "one-sample+age": (np.c_[np.ones(n), age], np.array([[1.0, 0.0]]), "t", None),
        "two-sample+age": (np.c_[g, 1 - g, age], np.array([[1.0, -1.0, 0.0]]), "t", None),
        "age-effect": (np.c_[g, 1 - g, age], np.array([[0.0, 0.0, 1.0]]), "t", None),
        "paired-blocks": (paired, np.r_[1.0, np.zeros(8)][None, :], "t", subj),
        "F": (np.c_[g, 1 - g, age], np.array([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]]), "F", None),
    }


@pytest.mark.parametrize(
    "name", ["one-sample", "one-sample+age", "two-sample+age", "age-effect", "paired-blocks", "F"]
)
def test_unpermuted_stat_equals_parametric(name):
    rng = np.random.default_rng(0)
    x, c, kind, blocks = _designs(rng)[name]
    y = rng.standard_normal((x.shape[0], 30)) + 0.3
    res = permutation_test(
        y.astype(np.float32), x, c, stat_type=kind, n_perm=20, blocks=blocks, seed=1
    )
    want = (_ols_t if kind == "t" else _ols_f)(y.astype(np.float32).astype(float), x, c)
    np.testing.assert_allclose(res.stat, want, rtol=1e-10, atol=1e-12)
    # and the team's parametric contrast code
    from bids_group.contrasts import compute_contrast
    from bids_group.glm import fit_ols

    fit = fit_ols(y.astype(np.float32), x)
    np.testing.assert_allclose(res.stat, compute_contrast(fit, c, kind).stat, rtol=1e-6)


def test_partition_properties():
    rng = np.random.default_rng(2)
    x = np.c_[np.ones(12), rng.normal(size=(12, 3))]
    c = np.array([[0.0, 1.0, -1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    part = partition_design(x, c)
    # [interest, nuisance] spans col(X); interest orthogonal to nuisance; coefficient = C beta
    full = np.c_[part.interest, part.nuisance]
    assert np.linalg.matrix_rank(np.c_[full, x]) == 4
    np.testing.assert_allclose(part.interest.T @ part.nuisance, 0, atol=1e-10)
    y = rng.normal(size=12)
    gamma = np.linalg.lstsq(full, y, rcond=None)[0]
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    np.testing.assert_allclose(gamma[:2], c @ beta)
    np.testing.assert_allclose(part.basis.T @ part.basis, np.eye(4), atol=1e-12)


def test_exhaustive_sign_flips_exact_p():
    rng = np.random.default_rng(3)
    y = rng.standard_normal((10, 5)).astype(np.float32)
    y[:, 0] = np.abs(y[:, 0]) + 0.1  # every subject positive
    x = np.ones((10, 1))
    one = permutation_test(y, x, [1.0], n_perm=5000, seed=0)
    assert one.exhaustive and one.n_relabellings == 1024 and one.scheme == "flip"
    assert one.p_uncorrected[0] == 1 / 1024
    two = permutation_test(y, x, [1.0], n_perm=1023, two_sided=True, seed=0)
    assert two.exhaustive and two.p_uncorrected[0] == 2 / 1024  # all-flip ties |t|
    # null distribution of the max = brute-force enumeration in float64
    signs = np.array([[1 - 2 * ((k >> i) & 1) for i in range(10)] for k in range(1024)])
    yy = y.astype(float)
    t_all = np.array([stats.ttest_1samp(s[:, None] * yy, 0).statistic for s in signs])
    np.testing.assert_allclose(np.sort(one.null_max_stat), np.sort(t_all.max(1)), rtol=1e-5)
    p_unc = (t_all >= t_all[0] - 1e-9).mean(0)
    np.testing.assert_allclose(one.p_uncorrected, p_unc)


def test_exhaustive_two_sample_permutations_match_enumeration():
    rng = np.random.default_rng(4)
    g = np.r_[np.ones(4), np.zeros(4)]
    x = np.c_[g, 1 - g]
    y = rng.standard_normal((8, 6))
    res = permutation_test(y.astype(np.float32), x, [[1.0, -1.0]], n_perm=10_000, seed=0)
    assert res.exhaustive and res.n_relabellings == 70 and res.scheme == "permute"
    import itertools

    y32 = y.astype(np.float32).astype(float)
    maxima = []
    for grp in itertools.combinations(range(8), 4):
        gg = np.zeros(8)
        gg[list(grp)] = 1
        maxima.append(_ols_t(y32, np.c_[gg, 1 - gg], [1.0, -1.0]).max())
    np.testing.assert_allclose(np.sort(res.null_max_stat), np.sort(maxima), rtol=1e-5)


@pytest.mark.parametrize("name", ["one-sample+age", "two-sample+age", "paired-blocks", "F"])
def test_freedman_lane_matches_bruteforce_refit(name):
    rng = np.random.default_rng(5)
    x, c, kind, blocks = _designs(rng)[name]
    y = (rng.standard_normal((x.shape[0], 12)) + 0.5).astype(np.float32)
    res = permutation_test(y, x, c, stat_type=kind, n_perm=40, blocks=blocks, seed=9)
    # Reproduce the relabellings from the same seed and refit by brute force (W14 table 2).
    part = partition_design(x, c)
    ex = exch.make_exchangeability(x, part.basis[:, : part.n_interest], blocks=blocks)
    rel = exch.random_relabellings(ex, np.random.default_rng(9), 40)
    z = part.nuisance
    yy = y.astype(float)
    hz = z @ np.linalg.pinv(z) if z.shape[1] else np.zeros((x.shape[0],) * 2)
    resid_z = yy - hz @ yy
    stat_fn = _ols_t if kind == "t" else _ols_f
    for k in range(40):
        ystar = rel.signs[k][:, None] * resid_z[rel.perm[k]] + hz @ yy
        assert res.null_max_stat[k + 1] == pytest.approx(stat_fn(ystar, x, c).max(), rel=1e-4)


def test_paired_within_block_permutation_equals_sign_flip_of_differences():
    rng = np.random.default_rng(6)
    x, c, _, subj = _designs(rng)["paired-blocks"]
    y = rng.standard_normal((16, 7)).astype(np.float32)
    blocked = permutation_test(y, x, c, n_perm=300, blocks=subj, seed=0)
    assert blocked.exhaustive and blocked.n_relabellings == 256 and blocked.scheme == "permute"
    diff = y.astype(np.float64)[0::2] - y.astype(np.float64)[1::2]
    flipped = permutation_test(diff, np.ones((8, 1)), [1.0], n_perm=300, seed=0)
    np.testing.assert_allclose(blocked.stat, flipped.stat, rtol=1e-8)
    np.testing.assert_allclose(blocked.p_uncorrected, flipped.p_uncorrected)
    np.testing.assert_allclose(np.sort(blocked.null_max_stat), np.sort(flipped.null_max_stat), 1e-4)


def test_exchangeability_counts_and_enumeration():
    x = np.c_[np.r_[np.ones(3), np.zeros(3)], np.r_[np.zeros(3), np.ones(3)]]
    blocks = np.array(["a", "a", "b", "b", "c", "c"])
    basis = partition_design(x, [[1.0, -1.0]]).basis[:, :1]
    ex = exch.make_exchangeability(x, basis, blocks=blocks)
    # within blocks: block a (two identical rows) 1, block b (mixed) 2, block c 1
    assert ex.n_distinct() == 2
    whole = exch.make_exchangeability(x, basis, blocks=blocks, whole_blocks=True)
    assert whole.n_distinct() == 6  # 3 blocks, all different
    rel = exch.enumerate_relabellings(whole)
    assert len(rel) == 6 and np.array_equal(rel.perm[0], np.arange(6))
    assert len({tuple(p) for p in rel.perm}) == 6
    # whole blocks keep their rows together
    for p in rel.perm:
        assert all(blocks[p[2 * k]] == blocks[p[2 * k + 1]] for k in range(3))
    draws = exch.random_relabellings(ex, np.random.default_rng(0), 200)
    assert np.all(blocks[draws.perm] == blocks[None, :])


def test_random_stream_independent_of_batching():
    x = np.ones((9, 1))
    ex = exch.make_exchangeability(x, np.ones((9, 1)) / 3)
    a = exch.random_relabellings(ex, np.random.default_rng(1), 10)
    r = np.random.default_rng(1)
    b1, b2 = exch.random_relabellings(ex, r, 4), exch.random_relabellings(ex, r, 6)
    np.testing.assert_array_equal(a.signs, np.r_[b1.signs, b2.signs])


def _blob_data(rng, n=14, shape=(9, 9, 8), effect=0.9):
    mask = np.ones(shape, bool)
    mask[0, :, :] = False
    noise = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), 1.0) for _ in range(n)])
    noise /= noise.std()
    blob = np.zeros(shape)
    blob[3:6, 3:6, 3:5] = effect
    return (noise + blob)[:, mask].astype(np.float32), mask


def test_same_seed_bit_identical_any_n_jobs_and_spatial_outputs():
    rng = np.random.default_rng(7)
    y, mask = _blob_data(rng)
    kw = dict(n_perm=64, mask=mask, cluster_forming_p=0.01, tfce=True, seed=123, two_sided=True)
    a = permutation_test(y, np.ones((14, 1)), [1.0], n_jobs=1, **kw)
    b = permutation_test(y, np.ones((14, 1)), [1.0], n_jobs=2, **kw)
    for name in ("p_uncorrected", "p_fwe", "null_max_stat"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.tfce.null_max, b.tfce.null_max)
    np.testing.assert_array_equal(a.tfce.p_uncorrected, b.tfce.p_uncorrected)
    np.testing.assert_array_equal(a.clusters.null_max_mass, b.clusters.null_max_mass)
    c = permutation_test(y, np.ones((14, 1)), [1.0], n_jobs=1, **{**kw, "seed": 124})
    assert not np.array_equal(a.null_max_stat, c.null_max_stat)
    # observed clusters = scipy.ndimage labels of |t| above the height
    cl = a.clusters
    assert cl.height == pytest.approx(stats.t.isf(0.005, 13))
    t3 = np.zeros(mask.shape)
    t3[mask] = a.stat
    lab, n_lab = ndimage.label(t3 > cl.height)
    lab_neg, n_neg = ndimage.label(t3 < -cl.height)
    assert len(cl.sizes) == n_lab + n_neg
    want = sorted(np.bincount(lab[mask])[1:].tolist() + np.bincount(lab_neg[mask])[1:].tolist())
    assert sorted(cl.sizes.tolist()) == want
    assert np.all(np.abs(a.stat[cl.peaks]) >= cl.height)
    assert cl.p_fwe_size_map().shape == a.stat.shape
    # null maxima are at least the observed ones' ranks: p in (0, 1]
    assert np.all((a.tfce.p_fwe > 0) & (a.tfce.p_fwe <= 1))
    assert a.tfce.null_max[0] == pytest.approx(np.abs(a.tfce.tfce).max())


def test_progress_callback_reaches_total():
    y = np.random.default_rng(0).standard_normal((12, 20)).astype(np.float32)
    calls = []
    permutation_test(
        y, np.ones((12, 1)), [1.0], n_perm=600, seed=0, progress=lambda d, t: calls.append((d, t))
    )
    assert calls[-1] == (601, 601) and all(t == 601 for _, t in calls)


def test_nilearn_parity_voxel_cluster_tfce():
    nib = pytest.importorskip("nibabel")
    second_level = pytest.importorskip("nilearn.glm.second_level")
    rng = np.random.default_rng(8)
    y, mask = _blob_data(rng, n=12, effect=1.2)
    affine = np.eye(4)
    imgs = []
    for row in y:
        vol = np.zeros(mask.shape, np.float32)
        vol[mask] = row
        imgs.append(nib.Nifti1Image(vol, affine))
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), affine)
    import pandas as pd

    dm = pd.DataFrame({"intercept": np.ones(12)})
    n_perm = 1000
    out = second_level.non_parametric_inference(
        imgs,
        design_matrix=dm,
        mask=mask_img,
        n_perm=n_perm,
        two_sided_test=False,
        random_state=0,
        threshold=0.01,
        tfce=True,
        n_jobs=1,
    )
    mine = permutation_test(
        y,
        np.ones((12, 1)),
        [1.0],
        n_perm=n_perm,
        mask=mask,
        cluster_forming_p=0.01,
        tfce=True,
        tfce_params=TfceParams(integration="nilearn"),
        seed=0,
    )
    t_nl = out["t"].get_fdata()[mask]
    np.testing.assert_allclose(mine.stat, t_nl, rtol=1e-5)
    # nilearn's TFCE map of the observed t = ours (nilearn preset)
    np.testing.assert_allclose(mine.tfce.tfce, out["tfce"].get_fdata()[mask], rtol=1e-5)

    def close(p_mine, logp_nl, what=""):
        p_nl = 10**-logp_nl
        # two independent Monte-Carlo estimates: |diff| within 4 SE of their difference
        pool = np.clip((p_mine + p_nl) / 2, 1 / n_perm, 1 - 1 / n_perm)
        se = np.sqrt(2 * pool * (1 - pool) / n_perm)
        bad = np.abs(p_mine - p_nl) > 4 * se + 2 / n_perm
        assert not bad.any(), (what, p_mine[bad][:5], p_nl[bad][:5])

    close(mine.p_fwe, out["logp_max_t"].get_fdata()[mask], "voxel")
    close(mine.tfce.p_fwe, out["logp_max_tfce"].get_fdata()[mask], "tfce")
    close(mine.clusters.p_fwe_size_map(), out["logp_max_size"].get_fdata()[mask])
    close(mine.clusters.p_fwe_mass_map(), out["logp_max_mass"].get_fdata()[mask])
    # the blob is found: the comparisons are not vacuous
    assert mine.p_fwe.min() < 0.05 and mine.tfce.p_fwe.min() < 0.05
    assert mine.clusters.p_fwe_size.min() < 0.05


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(n_perm=0), UsageError, "n_perm"),
        (dict(n_perm=2.5), UsageError, "n_perm"),
        (dict(cluster_forming_p=3.1, mask="m"), UsageError, "z = 3.1"),
        (dict(cluster_forming_p=0.0, mask="m"), UsageError, "cluster_forming_p"),
        (dict(cluster_forming_p=0.01), UsageError, "mask"),
        (dict(blocks=np.arange(5)), DataError, "one label per row"),
        (dict(blocks=np.r_[np.zeros(5), np.nan, np.ones(4)]), DataError, "NaN"),
        (dict(whole_blocks=True), UsageError, "needs exchangeability blocks"),
        (dict(scheme="permute"), UsageError, "includes the mean"),
        (dict(scheme="shuffle"), UsageError, "scheme"),
        (dict(stat_type="F", two_sided=True), UsageError, "one-sided"),
        (dict(seed=-3), UsageError, "seed"),
        (dict(n_jobs=0), UsageError, "n_jobs"),
    ],
)
def test_bad_input(kwargs, error, match):
    y = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    if kwargs.get("mask") == "m":
        kwargs["mask"] = np.ones((2, 2, 2), bool)
    with pytest.raises(error, match=match):
        permutation_test(y, np.ones((10, 1)), [1.0], **kwargs)


def test_bad_design_and_exchangeability():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((8, 5)).astype(np.float32)
    g = np.r_[np.ones(4), np.zeros(4)]
    with pytest.raises(DataError, match="rank"):
        permutation_test(y, np.c_[g, 1 - g, np.ones(8)], [1.0, -1.0, 0.0])
    with pytest.raises(DataError, match="equal size"):
        permutation_test(
            y,
            np.c_[g, 1 - g],
            [1.0, -1.0],
            blocks=np.r_[0, 0, 0, 1, 1, 2, 2, 2],
            whole_blocks=True,
        )
    # group is constant within each block: within-block permutation cannot change the t
    with pytest.raises(UsageError, match="cannot support"):
        permutation_test(y, np.c_[g, 1 - g], [1.0, -1.0], blocks=np.r_[0, 0, 1, 1, 2, 2, 3, 3])
    with pytest.raises(DataError, match="NaN"):
        permutation_test(np.full((8, 5), np.nan, np.float32), np.ones((8, 1)), [1.0])
    with pytest.raises(UsageError, match="one row"):
        permutation_test(y, np.c_[g, 1 - g], np.eye(2))


@pytest.mark.parametrize("n_rank", [1, 2])
@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("write_out", [False, True])
@pytest.mark.parametrize("shift", [-3.0, 0.0])
def test_sign_flip_kernel_matches_numpy(n_rank, two_sided, write_out, shift):
    """The subset-sum-table kernel against float64 numpy, voxel by voxel and relabelling by
    relabelling: statistics, per-relabelling maxima (also when every value is negative: the
    identity with shift=-3) and exceedance counts, with a voxel count
    that is not a multiple of the tile and groups of unequal size."""
    from bids_group.inference import _kernels
    from bids_group.inference.permutation import _flip_codes, _table_bits

    rng = np.random.default_rng(3)
    n_rows, n_vox, n_batch = 21, 2 * _kernels._SUB + 37, 50
    x = np.c_[np.ones(n_rows), rng.standard_normal((n_rows, n_rank - 1))]
    basis = np.linalg.qr(x)[0] * np.sign(np.linalg.qr(x)[0][0, 0])
    resid = rng.standard_normal((n_rows, n_vox)) + shift
    resid -= basis[:, 1:] @ (basis[:, 1:].T @ resid)  # residuals of the nuisance-only model
    ss = (resid**2).sum(0)
    signs = np.where(rng.random((n_batch, n_rows)) < 0.5, -1.0, 1.0)
    signs[0] = 1.0  # the identity: with shift=-3, every voxel's t is negative
    # float64 reference: w = U' S E for every relabelling, t = w0 sqrt(dof / (ss - |w|^2))
    w = np.einsum("rk,br,rv->bkv", basis, signs, resid)
    dof = n_rows - n_rank
    t = w[:, 0] * np.sqrt(dof / (ss - (w**2).sum(1)))
    cmp = np.abs(t) if two_sided else t
    thr_t = np.quantile(cmp, 0.7, axis=0)
    v_of = lambda s: np.sign(s) * s**2 / dof  # noqa: E731
    n_bits = _table_bits(n_rows, n_batch, n_rank)
    codes = _flip_codes(signs, n_bits)
    out = np.zeros((n_batch, n_vox), np.float32) if write_out else np.empty((1, 1), np.float32)
    maxima = np.empty(n_batch)
    counts = np.zeros(n_vox, np.int64)
    rss_id = ((resid - basis @ (basis.T @ resid)) ** 2).sum(0).astype(np.float32)
    _kernels.flip_table_stats(
        np.ascontiguousarray(resid),
        np.ascontiguousarray(basis),
        codes,
        n_bits,
        rss_id,
        np.maximum(ss.astype(np.float32) * 1e-12, np.float32(1e-30)),
        1,
        float(dof),
        True,
        two_sided,
        v_of(thr_t).astype(np.float32),
        write_out,
        out,
        maxima,
        counts,
    )
    np.testing.assert_allclose(maxima, cmp.max(1), rtol=2e-5)
    if shift < 0 and not two_sided:
        assert maxima[0] < 0
    near = np.isclose(cmp, thr_t, rtol=1e-4).any(0)
    np.testing.assert_array_equal(counts[~near], (cmp >= thr_t).sum(0)[~near])
    if write_out:
        np.testing.assert_allclose(out, t, rtol=2e-5, atol=1e-5)


# A child process runs the kernels with a given numba cache folder and saves every output.
_KERNEL_RUN = """
import sys
import numpy as np
from bids_group.inference import _kernels
from bids_group.inference.permutation import _flip_codes, _table_bits

rng = np.random.default_rng(11)
n_rows, n_vox, n_batch = 14, 3 * _kernels._SUB + 5, 64
results = {}
for n_rank in (1, 2):
    basis = np.linalg.qr(np.c_[np.ones(n_rows), rng.standard_normal((n_rows, n_rank - 1))])[0]
    resid = rng.standard_normal((n_rows, n_vox))
    ss = (resid**2).sum(0).astype(np.float32)
    n_bits = _table_bits(n_rows, n_batch, n_rank)
    codes = _flip_codes(np.where(rng.random((n_batch, n_rows)) < 0.5, -1.0, 1.0), n_bits)
    out = np.zeros((n_batch, n_vox), np.float32)
    maxima = np.empty(n_batch)
    counts = np.zeros(n_vox, np.int64)
    _kernels.flip_table_stats(resid, basis, codes, n_bits, ss, ss * np.float32(1e-12), 1,
                              float(n_rows - n_rank), n_rank == 1, False,
                              np.full(n_vox, 0.2, np.float32), True, out, maxima, counts)
    results.update({f"flip_out{n_rank}": out, f"flip_max{n_rank}": maxima,
                    f"flip_counts{n_rank}": counts})
    w = rng.standard_normal((n_batch * n_rank, n_vox))
    out = np.zeros((n_batch, n_vox), np.float32)
    maxima = np.full(n_batch, -np.inf)
    counts = np.zeros(n_vox, np.int64)
    _kernels.fused_stat_max_counts(w, ss.astype(np.float64) + 30, np.full(n_vox, 1e-9), n_rank,
                                   1, 12.0, n_rank == 1, False, np.full(n_vox, 1.0), 0, out,
                                   maxima, counts)
    results.update({f"fused_out{n_rank}": out, f"fused_max{n_rank}": maxima,
                    f"fused_counts{n_rank}": counts})
stats = [_kernels.flip_table_stats.stats, _kernels.fused_stat_max_counts.stats]
hits = sum(sum(st.cache_hits.values()) for st in stats)
misses = sum(sum(st.cache_misses.values()) for st in stats)
np.savez(sys.argv[1], cache_hits_misses=np.array([hits, misses]), **results)
"""


def test_kernel_results_do_not_depend_on_how_numba_compiled_them(tmp_path):
    """A kernel compiled in this process and the same kernel loaded from numba's on-disk cache
    must round alike. With ``fastmath`` they did not (callees compiled in-process are inlined
    and re-optimised; cached ones are linked as object code): t maps 1-3 ulp apart, and two
    runs with the same seed wrote different null distributions."""
    import os
    import subprocess
    import sys

    script = tmp_path / "run_kernels.py"
    script.write_text(_KERNEL_RUN)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    saved = []
    for name in ("compiled", "cached"):  # the first run fills the empty cache, the second reads it
        out = tmp_path / f"{name}.npz"
        subprocess.run([sys.executable, str(script), str(out)], env=env, check=True)
        saved.append(np.load(out))
    compiled, cached = saved
    assert compiled["cache_hits_misses"].tolist() == [0, 2]  # both kernels compiled
    assert cached["cache_hits_misses"].tolist() == [2, 0]  # both loaded from the cache
    assert sorted(compiled.files) == sorted(cached.files)
    for key in compiled.files:
        if key != "cache_hits_misses":
            assert np.array_equal(compiled[key], cached[key]), key


def test_no_kernel_uses_fastmath():
    """Guard for the test above: fastmath makes rounding depend on the compilation path."""
    import numba

    from bids_group.inference import _kernels

    kernels = [
        f for f in vars(_kernels).values() if isinstance(f, numba.core.dispatcher.Dispatcher)
    ]
    assert len(kernels) > 10
    assert [f.__name__ for f in kernels if f.targetoptions.get("fastmath")] == []
