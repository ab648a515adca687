"""Exact ties stay ties at any size of the statistic (issue 12, item 7).

Ten subjects, every value positive and little spread: the only relabellings that reach the
observed statistic are the identity and, two-sided, the one that flips every sign (t -> -t,
|t| equal). With t ~ 244 the engine used to compute the latter 3e-5 below the identity (13% at
t ~ 1e4): the residual sum of squares was ``ss - ||w||^2`` in float32, rounding noise when the
fit is near perfect, and two-sided exhaustive runs gave FWER p = 1/1024 instead of 2/1024.

Oracle: every relabelling that the run used (all 1024 sign flips, or the seeded random draws,
which do not depend on batching), refitted in float64 numpy (t = mean / (sd / sqrt(n)), exactly
odd under a global sign flip), with scipy.ndimage clusters and the float64 TFCE of each map.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from clicheck import run_ok
from conftest import map_name, write_description, write_map, write_participants
from scipy import ndimage, stats

from bids_group.inference import exchangeability as exch
from bids_group.inference import tfce as tfce_mod
from bids_group.inference.permutation import design_exchangeability, permutation_test

N_SUB = 10
SHAPE = (5, 5, 4)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
FORMING_P = 0.001
#: Random runs: this seed draws the all-flipped relabelling once and the identity once among
#: its 700 draws (asserted below), so both must tie with the unpermuted entry.
SEED, N_RANDOM = 6, 700
T_LEVELS = [10.0, 100.0, 1e3, 1e4]


def _volumes(t: float, seed: int = 0, n: int = N_SUB, positive: bool = True) -> np.ndarray:
    """(n, *SHAPE) float32 maps, positive everywhere, one-sample t from 0.9 t to t."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, *SHAPE))
    z -= z.mean(0)
    z /= z.std(0, ddof=1)
    target = t * (1.0 - 0.1 * rng.random(SHAPE))
    vols = (z + target / np.sqrt(n)).astype(np.float32)
    assert vols.min() > 0 or not positive
    return vols


def _dataset(root: Path, vols: np.ndarray) -> Path:
    write_description(root)
    subjects = [f"{i + 1:02d}" for i in range(N_SUB)]
    for sub, vol in zip(subjects, vols, strict=True):
        write_map(root / f"sub-{sub}" / "func" / map_name(sub), vol, AFFINE)
    write_participants(
        root / "participants.tsv", {"participant_id": [f"sub-{s}" for s in subjects]}
    )
    return root


def _run(bids: Path, out: Path, *args: str) -> dict:
    return run_ok(bids, out, "--no-report", *args)[0]


def _find(summary: dict, suffix: str) -> Path:
    hits = [Path(f) for f in summary["files"] if Path(f).name.endswith(suffix)]
    assert len(hits) == 1, (suffix, hits)
    return hits[0]


def _signs(exhaustive: bool) -> np.ndarray:
    """The relabellings a run uses, the identity first (as the engine orders them)."""
    _, ex = design_exchangeability(np.ones((N_SUB, 1)), [1.0])
    if exhaustive:
        return exch.enumerate_relabellings(ex).signs
    drawn = exch.random_relabellings(ex, np.random.default_rng(SEED), N_RANDOM).signs
    return np.r_[np.ones((1, N_SUB)), drawn]


def _oracle(y: np.ndarray, mask: np.ndarray, signs: np.ndarray, two_sided: bool) -> dict:
    """Exceedance counts (not p) of every kind, from float64 refits of every relabelling."""
    flipped = signs[:, :, None] * y[None]
    t = flipped.mean(1) / (flipped.std(1, ddof=1) / np.sqrt(N_SUB))  # (N, V)
    cmp = np.abs(t) if two_sided else t
    obs = cmp[0]
    ge = lambda null, o: null >= o - 1e-5 * np.maximum(np.abs(o), 1.0)  # noqa: E731
    height = stats.t.isf(FORMING_P / (2 if two_sided else 1), N_SUB - 1)
    structure = ndimage.generate_binary_structure(3, 1)
    max_size, max_mass = [], []
    for row in t:
        vol = np.zeros(SHAPE)
        vol[mask] = row
        sizes, masses = [0], [0.0]
        for sign in (1, -1) if two_sided else (1,):
            lab, n_lab = ndimage.label(sign * vol > height, structure)
            if n_lab:
                idx = np.arange(1, n_lab + 1)
                sizes += ndimage.sum_labels(np.ones(SHAPE), lab, idx).tolist()
                masses += ndimage.sum_labels(sign * vol - height, lab, idx).tolist()
        max_size.append(max(sizes))
        max_mass.append(max(masses))
    tf = np.zeros_like(t)
    max_tfce = np.zeros(len(t))
    graph = tfce_mod.voxel_graph(mask, 6)
    tfce_mod.batch_tfce(t, tfce_mod.TfceParams(), two_sided, graph, tf, max_tfce)
    tf = np.abs(tf) if two_sided else tf
    return {
        "stat": t,
        "unc": ge(cmp, obs).sum(0),
        "fwe": ge(cmp.max(1)[:, None], obs).sum(0),
        "size": int((np.array(max_size) >= max_size[0]).sum()),
        "mass": int(ge(np.array(max_mass), max_mass[0]).sum()),
        "tfce_unc": ge(tf, tf[0]).sum(0),
        "tfce_fwe": ge(max_tfce[:, None], tf[0]).sum(0),
    }


@pytest.mark.parametrize("exhaustive", [True, False], ids=["exhaustive", "random"])
@pytest.mark.parametrize("two_sided", [True, False], ids=["two-sided", "one-sided"])
@pytest.mark.parametrize("t", T_LEVELS)
def test_symmetric_relabellings_tie_and_p_are_exact_counts(tmp_path, t, two_sided, exhaustive):
    """Through the command line: voxel (uncorrected and FWER), cluster size and mass, TFCE.
    The all-flipped (and any drawn identity) rows of the null table equal the unpermuted row,
    and every p is the oracle's count / N: 2/1024 two-sided, 1/1024 one-sided, exhaustive."""
    vols = _volumes(t)
    bids = _dataset(tmp_path / "ds", vols)
    n_perm = "1023" if exhaustive else str(N_RANDOM)
    args = ["--permutation", "voxel", "cluster", "tfce", "--n-perm", n_perm, "--seed", str(SEED),
            "--cluster-forming-p", str(FORMING_P), "--connectivity", "6"]  # fmt: skip
    summary = _run(bids, tmp_path / "out", *args, *([] if two_sided else ["--one-sided"]))
    perm = summary["analyses"][0]["contrasts"][0]["permutation"]
    n_total = 1024 if exhaustive else N_RANDOM + 1
    assert perm["relabellings"] == n_total and perm["exact"] is exhaustive

    mask = np.asarray(nib.load(_find(summary, "_mask.nii.gz")).dataobj) > 0
    assert mask.all()
    y = vols[:, mask].astype(np.float64)
    signs = _signs(exhaustive)
    assert len(signs) == n_total
    oracle = _oracle(y, mask, signs, two_sided)
    t_map = np.asarray(nib.load(_find(summary, "stat-t_statmap.nii.gz")).dataobj)[mask]
    np.testing.assert_allclose(t_map, oracle["stat"][0], rtol=1e-6)
    assert 0.85 * t < t_map.min() and t_map.max() < 1.05 * t

    def counts(desc: str) -> np.ndarray:
        logp = np.asarray(nib.load(_find(summary, f"stat-logp_desc-{desc}_statmap.nii.gz")).dataobj)
        n = 10 ** -logp[mask].astype(np.float64) * n_total
        np.testing.assert_allclose(n, np.round(n), atol=1e-3)
        return np.round(n).astype(int)

    # the relabellings that reach the observed statistic: the identity (each time it is
    # drawn) and, two-sided, the all-flipped one; nothing else comes near
    symmetric = (signs == 1).all(1) | (two_sided & (signs == -1).all(1))
    n_sym = int(symmetric.sum())
    assert n_sym == (1 if exhaustive else 2) + two_sided  # the seed draws each once
    for desc, key in [("permUncorrected", "unc"), ("permVoxel", "fwe"), ("permTfce", "tfce_fwe")]:
        np.testing.assert_array_equal(counts(desc), oracle[key], err_msg=desc)
    for key in ("unc", "fwe", "tfce_fwe", "tfce_unc"):
        np.testing.assert_array_equal(oracle[key], n_sym, err_msg=key)
    table = pd.read_csv(_find(summary, "stat-t_desc-permCluster_clusters.tsv"), sep="\t")
    assert len(table) == 1 and table["size_voxels"][0] == mask.sum()
    assert round(table["p_fwe_size"][0] * n_total) == oracle["size"]
    assert round(table["p_fwe_mass"][0] * n_total) == oracle["mass"]
    assert oracle["mass"] == n_sym
    if t >= 100:  # at t = 10, single flips still exceed the height everywhere
        assert oracle["size"] == n_sym

    null = pd.read_csv(_find(summary, "stat-t_nulldist.tsv"), sep="\t")
    assert len(null) == n_total
    columns = ["max_stat", "max_cluster_size", "max_cluster_mass", "max_tfce"]
    first = null.loc[0, columns].to_numpy(dtype=np.float64)
    for row in np.flatnonzero(symmetric):
        np.testing.assert_array_equal(null.loc[row, columns].to_numpy(np.float64), first)
    others = null.loc[~symmetric, "max_stat"].to_numpy()
    if t >= 100:
        assert np.all(others < 0.5 * first[0])


@pytest.mark.parametrize("t", T_LEVELS)
@pytest.mark.parametrize("integration", ["exact", "fsl", "nilearn"])
def test_all_flipped_is_bit_equal_to_identity(t, integration):
    """The engine's entries for the identity and the all-flipped relabelling are the same
    float64 values (not just within the tolerance), for every statistic and TFCE preset, and the
    uncorrected p of every voxel is exactly 2/1024."""
    vols = _volumes(t, seed=1)
    mask = np.ones(SHAPE, bool)
    res = permutation_test(
        vols[:, mask],
        np.ones((N_SUB, 1)),
        [1.0],
        n_perm=1023,
        two_sided=True,
        mask=mask,
        cluster_forming_p=FORMING_P,
        tfce=True,
        tfce_params=tfce_mod.TfceParams(integration=integration),
        seed=0,
    )
    assert res.exhaustive and res.n_relabellings == 1024
    last = int(np.flatnonzero((_signs(True) == -1).all(1))[0])
    nulls = [res.null_max_stat, res.clusters.null_max_size, res.clusters.null_max_mass]
    for null in [*nulls, res.tfce.null_max]:
        assert null[last] == null[0]
    for null in [res.null_max_stat, res.clusters.null_max_mass, res.tfce.null_max]:
        assert np.sum(null >= null[0]) == 2
    for p in (res.p_uncorrected, res.p_fwe, res.tfce.p_uncorrected, res.tfce.p_fwe):
        np.testing.assert_array_equal(p, 2 / 1024)
    assert res.clusters.p_fwe_mass.tolist() == [2 / 1024]
    # the unpermuted entries are the engine's own, within float32 rounding of the float64 ones
    assert res.null_max_stat[0] == pytest.approx(np.abs(res.stat).max(), rel=1e-6)
    if integration == "exact":  # the presets' steps are not continuous in the map
        assert res.tfce.null_max[0] == pytest.approx(np.abs(res.tfce.tfce).max(), rel=1e-6)


@pytest.mark.parametrize("t", T_LEVELS)
def test_group_swap_ties_with_row_permutations(t):
    """Row permutations (two groups of 5, all C(10, 5) = 252 labellings): swapping the groups
    maps t to -t; two-sided p = 2/252 at every voxel, the two null entries within 5e-6 (float32
    products up to t ~ 13 here, float64 beyond)."""
    rng = np.random.default_rng(2)
    g = np.repeat([1.0, -1.0], 5)
    z = rng.standard_normal((N_SUB, 40))
    for grp in (g > 0, g < 0):
        z[grp] -= z[grp].mean(0)
    z /= np.sqrt((z**2).sum(0) / (N_SUB - 2))
    data = (5.0 + z + g[:, None] * t / np.sqrt(N_SUB)).astype(np.float32)
    res = permutation_test(
        data, np.c_[np.ones(N_SUB), g], [0.0, 1.0], n_perm=5000, two_sided=True, seed=0
    )
    assert res.exhaustive and res.n_relabellings == 252 and res.scheme == "permute"
    assert 0.9 * t < np.abs(res.stat).min()
    np.testing.assert_array_equal(res.p_uncorrected, 2 / 252)
    np.testing.assert_array_equal(res.p_fwe, 2 / 252)
    top = np.sort(res.null_max_stat)[::-1]
    assert top[1] == pytest.approx(top[0], rel=5e-6) and top[2] < 0.5 * top[0]


@pytest.mark.parametrize("t", T_LEVELS)
@pytest.mark.parametrize("design", ["t", "F", "t-covariate", "F-covariate"])
def test_all_flipped_ties_voxel_level_only(t, design):
    """Voxel level only, where the kernel writes no map (t: its fast path; F or a nuisance
    covariate: the general one): the all-flipped entry is the identity's, bit for bit, and
    p = 2/1024 at every voxel (F = t^2 is unchanged by flipping every sign)."""
    vols = _volumes(t, seed=2)
    x = np.ones((N_SUB, 1))
    contrast = [[1.0]]
    if design.endswith("covariate"):
        x = np.c_[x, np.linspace(-1.0, 1.0, N_SUB)]
        contrast = [[1.0, 0.0]]
    stat_type = design[0]
    res = permutation_test(
        vols.reshape(N_SUB, -1),
        x,
        contrast,
        stat_type=stat_type,
        n_perm=1023,
        two_sided=stat_type == "t",
        seed=0,
    )
    assert res.exhaustive and res.n_relabellings == 1024
    last = int(np.flatnonzero((_signs(True) == -1).all(1))[0])
    null = res.null_max_stat
    assert null[last] == null[0]
    assert np.sum(null >= null[0]) == 2
    np.testing.assert_array_equal(res.p_uncorrected, 2 / 1024)
    np.testing.assert_array_equal(res.p_fwe, 2 / 1024)


@pytest.mark.parametrize("t", T_LEVELS)
@pytest.mark.parametrize("n_rank", [1, 2])
def test_flip_kernel_paths_sum_alike(t, n_rank):
    """The engine runs the identity with its map written (the kernel's general path) and, at
    voxel level only, the other sign flips without (for t with no nuisance: the fast path).
    With 40 rows in 8 table groups, both paths must add the groups in the same order: the
    all-flipped maximum equals the identity's bit for bit either way, and its map is exactly
    the negated map."""
    from bids_group.inference import _kernels
    from bids_group.inference.permutation import _flip_codes, _residual_ss

    n_rows, n_bits = 40, 5
    vols = _volumes(t, seed=3, n=n_rows, positive=False).reshape(n_rows, -1).astype(np.float64)
    x = np.c_[np.ones(n_rows), np.linspace(-1.0, 1.0, n_rows)][:, :n_rank]
    q = np.linalg.qr(x)[0]
    basis = np.ascontiguousarray(q * np.sign(q[0]))
    resid = vols - basis[:, 1:] @ (basis[:, 1:].T @ vols)  # Freedman-Lane residuals
    rss_id = _residual_ss(resid, basis).astype(np.float32)
    floor = np.maximum((resid**2).sum(0) * 1e-12, 1e-30).astype(np.float32)
    codes = _flip_codes(np.array([np.ones(n_rows), -np.ones(n_rows)]), n_bits)
    assert codes.shape == (2, 8)
    maxima = {}
    for write_out in (True, False):
        out = np.zeros((2, resid.shape[1]), np.float32)
        maxima[write_out] = np.empty(2)
        no_count = np.full(resid.shape[1], np.inf, np.float32)
        _kernels.flip_table_stats(resid, basis, codes, n_bits, rss_id, floor, 1,
                                  float(n_rows - n_rank), True, True, no_count, write_out, out,
                                  maxima[write_out], np.zeros(out.shape[1], np.int64))  # fmt: skip
        if write_out:
            np.testing.assert_array_equal(out[1], -out[0])
    assert len({*maxima[True].tolist(), *maxima[False].tolist()}) == 1, maxima
