"""Permutation inference through the command line: files, exact p-values, nilearn parity,
reproducibility, the model file's keys, bad input, the progress bar and the report.

Oracles: exhaustive enumeration in numpy (sign flips, two-group relabellings, paired swaps), and
nilearn's ``non_parametric_inference`` (Monte-Carlo error bounds for random relabellings; exact
equality for the TFCE map of the nilearn preset).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import map_name, write_description, write_map, write_participants
from scipy import ndimage, stats
from test_report_run import _summary_rows

from bids_group.cli import main
from bids_group.config import resolve_inference
from bids_group.errors import UsageError
from bids_group.pipeline_permutation import critical_value
from bids_group.spec import load_spec

SHAPE = (8, 8, 8)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])


# --------------------------------------------------------------------------- helpers


def _dataset(root: Path, maps: dict, participants: dict | None = None) -> Path:
    """maps: (subject, contrast) -> 3-D array; written as a derivatives dataset."""
    write_description(root)
    for (sub, contrast), data in maps.items():
        name = map_name(sub, contrast=contrast)
        write_map(root / f"sub-{sub}" / "func" / name, data, AFFINE)
    subjects = sorted({s for s, _ in maps})
    columns = {"participant_id": [f"sub-{s}" for s in subjects], **(participants or {})}
    write_participants(root / "participants.tsv", columns)
    return root


def _smooth_noise(rng, n, shape=SHAPE, sigma=1.0):
    vols = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(n)])
    return vols / vols.std()


def _one_sample(root: Path, n: int = 10, seed: int = 0, effect: float = 0.0) -> Path:
    rng = np.random.default_rng(seed)
    vols = _smooth_noise(rng, n)
    vols[:, 2:5, 2:5, 2:5] += effect
    vols[:, 0, 0, 0] = np.abs(vols[:, 0, 0, 0]) + 0.1  # one voxel positive in every map
    return _dataset(root, {(f"{i + 1:02d}", "faces"): vols[i] for i in range(n)})


def _run(bids: Path, out: Path, *args: str) -> tuple[int, dict | None, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    logger = logging.getLogger("bids_group")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main([str(bids), str(out), "group", "--json", "-q", "--no-report", *args])
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    summary = json.loads(stdout.getvalue()) if code == 0 else None
    return code, summary, stderr.getvalue()


def _find(summary: dict, pattern: str) -> Path:
    hits = [Path(f) for f in summary["files"] if Path(f).name.endswith(pattern)]
    assert len(hits) == 1, (pattern, hits)
    return hits[0]


def _masked(path: Path, mask: np.ndarray) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)[mask]


def _mask(summary: dict) -> np.ndarray:
    return np.asarray(nib.load(_find(summary, "_mask.nii.gz")).dataobj) > 0


def _sign_flip_oracle(y: np.ndarray, *, two_sided: bool) -> tuple[np.ndarray, np.ndarray]:
    """All 2^n sign flips of a one-sample t: (uncorrected p, FWER p) per voxel."""
    n = y.shape[0]
    signs = np.array(list(itertools.product([1.0, -1.0], repeat=n)))
    flipped = signs[:, :, None] * y[None]
    t = flipped.mean(1) / (flipped.std(1, ddof=1) / np.sqrt(n))
    return _enumeration_p(np.abs(t) if two_sided else t)


def _enumeration_p(null: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """p = #{null >= observed} / N per voxel (row 0 observed), uncorrected and max-statistic."""
    obs = null[0]
    tol = 1e-5 * np.abs(obs)  # exact ties (e.g. +t and -t when two-sided) stay ties
    return (null >= obs - tol).mean(0), (null.max(1)[:, None] >= obs - tol).mean(0)


def _assert_p_equal(ours: np.ndarray, exact: np.ndarray, n: int, ties: int = 2) -> None:
    """Equal, except that the engine's float32 relabelled statistics may count a near tie
    (|stat - observed| ~ 1e-7) as a tie: that can only raise p, by ``ties``/N (the relabellings
    sharing one statistic: 2 for +-t, 6 for the label swaps of three groups), at a handful of
    voxels."""
    close = np.isclose(ours, exact, rtol=1e-5)
    assert close.mean() > 0.99
    excess = (ours - exact)[~close]
    assert np.all(excess > 0) and np.all(excess <= ties / n * (1 + 1e-4))


# --------------------------------------------------------------------------- exact tests


def test_exhaustive_sign_flips_give_exact_p_values(tmp_path):
    bids = _one_sample(tmp_path / "ds", n=10, effect=0.8)
    code, summary, err = _run(bids, tmp_path / "out", "--permutation", "voxel", "--n-perm",
                              "5000", "--one-sided")  # fmt: skip
    assert code == 0, err
    mask = _mask(summary)
    perm = summary["analyses"][0]["contrasts"][0]["permutation"]
    assert perm == {**perm, "relabellings": 1024, "exact": True, "scheme": "flip"}
    y = np.stack([np.asarray(nib.load(p).dataobj, dtype=np.float64)[mask] for p in _inputs(bids)])
    p_unc, p_fwe = _sign_flip_oracle(y, two_sided=False)
    ours_unc = 10 ** -_masked(_find(summary, "stat-logp_desc-permUncorrected_statmap.nii.gz"), mask)
    ours_fwe = 10 ** -_masked(_find(summary, "stat-logp_desc-permVoxel_statmap.nii.gz"), mask)
    _assert_p_equal(ours_unc, p_unc, 1024)
    _assert_p_equal(ours_fwe, p_fwe, 1024)
    # The all-positive voxel: only the identity reaches its t, p = 1/1024 exactly.
    corner = np.flatnonzero(mask)[0] == 0
    assert corner
    assert ours_unc[0] == pytest.approx(1 / 1024, rel=1e-6)
    null = pd.read_csv(_find(summary, "stat-t_nulldist.tsv"), sep="\t")
    assert len(null) == 1024 and list(null.columns) == ["relabelling", "max_stat"]
    t_map = _masked(_find(summary, "stat-t_statmap.nii.gz"), mask)
    assert null["max_stat"][0] == pytest.approx(t_map.max(), rel=1e-5)
    sidecar = json.loads(_find(summary, "stat-t_nulldist.json").read_text())
    assert sidecar["Exact"] is True and sidecar["Relabellings"] == 1024


def _inputs(bids: Path) -> list[Path]:
    return sorted(bids.glob("sub-*/func/*_statmap.nii.gz"))


def test_f_test_exhaustive_relabellings_match_enumeration(tmp_path):
    """Three groups of 3: all 9!/(3!3!3!) = 1680 labellings; F against scipy's f_oneway."""
    rng = np.random.default_rng(4)
    vols = _smooth_noise(rng, 9)
    vols[:3, 3:6, 3:6, 3:6] += 1.5
    groups = ["a", "a", "a", "b", "b", "b", "c", "c", "c"]
    bids = _dataset(tmp_path / "ds", {(f"{i + 1:02d}", "faces"): vols[i] for i in range(9)},
                    {"group": groups})  # fmt: skip
    model = tmp_path / "model.yaml"
    model.write_text(F_MODEL)
    code, summary, err = _run(bids, tmp_path / "out", "--model", str(model), "--permutation",
                              "voxel", "--n-perm", "5000")  # fmt: skip
    assert code == 0, err
    mask = _mask(summary)
    y = np.stack([np.asarray(nib.load(p).dataobj, dtype=np.float64)[mask] for p in _inputs(bids)])
    f_all = []
    for a in itertools.combinations(range(9), 3):
        rest = [i for i in range(9) if i not in a]
        for b in itertools.combinations(rest, 3):
            c = [i for i in rest if i not in b]
            f_all.append(stats.f_oneway(y[list(a)], y[list(b)], y[c]).statistic)
    f_all = np.array(f_all)
    obs = stats.f_oneway(y[:3], y[3:6], y[6:]).statistic
    assert f_all.shape[0] == 1680
    np.testing.assert_allclose(f_all[0], obs)  # the first labelling is the identity
    p_unc, p_fwe = _enumeration_p(f_all)
    f_map = _masked(_find(summary, "stat-F_statmap.nii.gz"), mask)
    np.testing.assert_allclose(f_map, obs, rtol=1e-5)
    ours_unc = 10 ** -_masked(_find(summary, "stat-logp_desc-permUncorrected_statmap.nii.gz"), mask)
    ours_fwe = 10 ** -_masked(_find(summary, "stat-logp_desc-permVoxel_statmap.nii.gz"), mask)
    _assert_p_equal(ours_unc, p_unc, 1680, ties=6)
    _assert_p_equal(ours_fwe, p_fwe, 1680, ties=6)
    null = pd.read_csv(_find(summary, "stat-F_nulldist.tsv"), sep="\t")
    assert len(null) == 1680


F_MODEL = """\
Name: threeGroups
BIDSModelVersion: "1.0.0"
Nodes:
  - Level: Dataset
    Name: anova
    GroupBy: []
    Transformations:
      Transformer: pybids-transforms-v1
      Instructions:
        - Name: Factor
          Input: [group]
    Model:
      Type: glm
      X: [group.a, group.b, group.c]
    Contrasts:
      - Name: groupEffect
        ConditionList: [group.a, group.b, group.c]
        Weights: [[1, -1, 0], [0, 1, -1]]
        Test: F
"""


PAIRED_MODEL = """\
Name: paired
BIDSModelVersion: "1.0.0"
Input:
  contrast: [faces, houses]
Nodes:
  - Level: Dataset
    Name: paired
    GroupBy: []
    Transformations:
      Transformer: pybids-transforms-v1
      Instructions:
        - Name: Factor
          Input: [contrast]
        - Name: Factor
          Input: [subject]
    Model:
      Type: glm
      X: [contrast.faces, "subject.*"]
      Software:
        bids-group:
          Inference:
            Permutation: voxel
            NPermutations: 5000
            ExchangeabilityBlocks: subject
            TwoSided: true
    Contrasts:
      - Name: facesGtHouses
        ConditionList: [contrast.faces]
        Weights: [1]
        Test: t
"""


def test_paired_within_subject_swaps_equal_sign_flips_of_differences(tmp_path):
    """Swapping faces/houses within each subject (blocks = subject) is flipping the sign of each
    subject's difference: 2^8 = 256 relabellings, p-values equal the one-sample enumeration."""
    rng = np.random.default_rng(7)
    n = 8
    maps = {}
    for i in range(n):
        base = 4.0 * rng.standard_normal()
        maps[f"{i + 1:02d}", "faces"] = base + _smooth_noise(rng, 1)[0] + 0.7
        maps[f"{i + 1:02d}", "houses"] = base + _smooth_noise(rng, 1)[0]
    bids = _dataset(tmp_path / "ds", maps)
    model = tmp_path / "model.yaml"
    model.write_text(PAIRED_MODEL)
    code, summary, err = _run(bids, tmp_path / "out", "--model", str(model))
    assert code == 0, err
    perm = summary["analyses"][0]["contrasts"][0]["permutation"]
    assert perm["relabellings"] == 256 and perm["exact"] and perm["scheme"] == "permute"
    mask = _mask(summary)
    diff = np.stack([(maps[f"{i + 1:02d}", "faces"] - maps[f"{i + 1:02d}", "houses"])[mask]
                     for i in range(n)])  # fmt: skip
    p_unc, p_fwe = _sign_flip_oracle(diff.astype(np.float32).astype(np.float64), two_sided=True)
    ours_unc = 10 ** -_masked(_find(summary, "stat-logp_desc-permUncorrected_statmap.nii.gz"), mask)
    ours_fwe = 10 ** -_masked(_find(summary, "stat-logp_desc-permVoxel_statmap.nii.gz"), mask)
    _assert_p_equal(ours_unc, p_unc, 256)
    _assert_p_equal(ours_fwe, p_fwe, 256)


# --------------------------------------------------------------------------- nilearn parity


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
    """One-sample, one-sided, n = 16 (65,536 flips: random), voxel + cluster + TFCE (nilearn
    preset), and nilearn's non_parametric_inference on the same maps and mask."""
    from nilearn.glm.second_level import non_parametric_inference

    tmp = tmp_path_factory.mktemp("parity")
    bids = _one_sample(tmp / "ds", n=16, seed=3, effect=0.9)
    n_perm = 2000
    code, summary, err = _run(bids, tmp / "out", "--permutation", "voxel", "cluster", "tfce",
                              "--n-perm", str(n_perm), "--one-sided", "--cluster-forming-p",
                              "0.01", "--tfce-integration", "nilearn", "--connectivity", "6",
                              "--seed", "11")  # fmt: skip
    assert code == 0, err
    mask_path = _find(summary, "_mask.nii.gz")
    design = pd.DataFrame({"intercept": np.ones(16)})
    theirs = non_parametric_inference(
        [str(p) for p in _inputs(bids)],
        design_matrix=design,
        mask=str(mask_path),
        n_perm=n_perm,
        two_sided_test=False,
        random_state=0,
        threshold=0.01,
        tfce=True,
        n_jobs=1,
    )
    return summary, theirs, n_perm


def _mc_tolerance(p: np.ndarray, n: int) -> np.ndarray:
    """4 Monte-Carlo standard errors of the difference of two independent estimates, plus the
    1/N granularity."""
    return 4 * np.sqrt(2 * p * (1 - p) / n) + 2 / n


def test_t_map_and_tfce_map_equal_nilearn(parity_run):
    summary, theirs, _ = parity_run
    mask = _mask(summary)
    t_ours = _masked(_find(summary, "stat-t_statmap.nii.gz"), mask)
    t_theirs = np.asarray(theirs["t"].dataobj, dtype=np.float64)[mask]
    np.testing.assert_allclose(t_ours, t_theirs, rtol=1e-5, atol=1e-6)
    tfce_ours = _masked(_find(summary, "stat-tfce_statmap.nii.gz"), mask)
    tfce_theirs = np.asarray(theirs["tfce"].dataobj, dtype=np.float64)[mask]
    np.testing.assert_allclose(tfce_ours, tfce_theirs, rtol=1e-5, atol=1e-6 * tfce_theirs.max())


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ("stat-logp_desc-permVoxel_statmap.nii.gz", "logp_max_t"),
        ("stat-logp_desc-permTfce_statmap.nii.gz", "logp_max_tfce"),
        ("stat-logp_desc-permClusterSize_statmap.nii.gz", "logp_max_size"),
        ("stat-logp_desc-permClusterMass_statmap.nii.gz", "logp_max_mass"),
    ],
)
def test_fwer_p_values_agree_with_nilearn_within_monte_carlo_error(parity_run, ours, theirs):
    summary, nilearn_maps, n_perm = parity_run
    mask = _mask(summary)
    p_ours = 10 ** -_masked(_find(summary, ours), mask)
    p_theirs = 10 ** -np.asarray(nilearn_maps[theirs].dataobj, dtype=np.float64)[mask]
    tolerance = _mc_tolerance(np.maximum(p_ours, p_theirs), n_perm)
    assert np.all(np.abs(p_ours - p_theirs) <= tolerance)
    assert (p_ours < 0.05).any()  # the effect is found, so the comparison is not all p = 1


def test_cluster_table_lists_each_cluster_with_its_fwer_p(parity_run):
    summary, _, _ = parity_run
    mask = _mask(summary)
    table = pd.read_csv(_find(summary, "stat-t_desc-permCluster_clusters.tsv"), sep="\t")
    size_p = 10 ** -_masked(_find(summary, "stat-logp_desc-permClusterSize_statmap.nii.gz"), mask)
    assert len(table) >= 1
    assert list(table["cluster_id"]) == list(range(1, len(table) + 1))
    assert table["size_voxels"].is_monotonic_decreasing
    # The smallest p of the map is the p of the largest cluster.
    assert size_p.min() == pytest.approx(table["p_fwe_size"].min(), rel=1e-5)
    null = pd.read_csv(_find(summary, "stat-t_nulldist.tsv"), sep="\t")
    n = len(null)
    largest = table["size_voxels"].max()
    assert table["p_fwe_size"][0] == pytest.approx((null["max_cluster_size"] >= largest).sum() / n)


# --------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("design", ["one-sample sign flips", "two-sample row permutations"])
def test_same_seed_same_files_whatever_n_jobs(tmp_path, design):
    """Bit-identical outputs for 1 and 2 threads, on a grid large enough (4,096 voxels) that
    both kernels split the voxels between threads (2 sign-flip work items, 8 chunks of the
    fused kernel), and with every method."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here: --n-jobs 2 would run as 1")
    rng = np.random.default_rng(5)
    vols = _smooth_noise(rng, 14, shape=(16, 16, 16))
    vols[:7, 4:9, 4:9, 4:9] += 0.8
    maps = {(f"{i + 1:02d}", "faces"): vols[i] for i in range(14)}
    extra: tuple[str, ...] = ()
    if design.startswith("two-sample"):
        bids = _dataset(tmp_path / "ds", maps, {"group": ["a"] * 7 + ["b"] * 7})
        model = tmp_path / "model.yaml"
        model.write_text(TWO_SAMPLE_MODEL)
        extra = ("--model", str(model))
    else:
        bids = _dataset(tmp_path / "ds", maps)
    args = (*extra, "--permutation", "voxel", "cluster", "tfce", "--n-perm", "300", "--seed", "42")
    outputs = []
    for jobs in ("1", "2"):
        code, summary, err = _run(bids, tmp_path / f"out{jobs}", *args, "--n-jobs", jobs)
        assert code == 0, err
        outputs.append(summary)
    files = [{Path(f).name: Path(f) for f in s["files"]} for s in outputs]
    assert files[0].keys() == files[1].keys()
    names = sorted(n for n in files[0] if n.endswith((".nii.gz", ".tsv")))
    assert any("permClusterMass" in n for n in names) and any("permTfce" in n for n in names)
    for name in names:
        if name.endswith(".nii.gz"):  # the voxels, bit for bit (gzip stores a time stamp)
            a, b = (np.asarray(nib.load(f[name]).dataobj) for f in files)
            assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()), name
        else:
            assert files[0][name].read_bytes() == files[1][name].read_bytes(), name
    if design.startswith("two-sample"):
        return
    code, other, _ = _run(bids, tmp_path / "out3", *args[:-1], "43")
    null_a = pd.read_csv(_find(outputs[0], "stat-t_nulldist.tsv"), sep="\t")
    null_b = pd.read_csv(_find(other, "stat-t_nulldist.tsv"), sep="\t")
    assert null_a["max_stat"][0] == null_b["max_stat"][0]  # the identity
    assert not null_a["max_stat"].equals(null_b["max_stat"])  # another seed, another null


# --------------------------------------------------------------------------- model file


def test_model_block_settings_and_command_line_override(tmp_path):
    bids = _one_sample(tmp_path / "ds", n=12, seed=1, effect=0.6)
    model = tmp_path / "model.yaml"
    model.write_text(ONE_SAMPLE_MODEL)
    code, summary, err = _run(bids, tmp_path / "out", "--model", str(model))
    assert code == 0, err
    sidecar = json.loads(_find(summary, "stat-t_nulldist.json").read_text())
    assert sidecar["Methods"] == ["cluster", "tfce"]
    assert sidecar["Relabellings"] == 201 and sidecar["Seed"] == 7
    assert sidecar["ClusterFormingThreshold"]["PValue"] == 0.02
    assert sidecar["TFCE"] == {**sidecar["TFCE"], "Integration": "fsl", "E": 0.6, "H": 2.0}
    names = {Path(f).name for f in summary["files"]}
    assert not any("permVoxel" in n for n in names)
    # The model as run (written to OUT_DIR) reads back with the same inference settings.
    written = load_spec(_find(summary, "_smdl.json"))
    assert written.inference == load_spec(model).inference
    assert any("permTfce01" in n for n in names)  # PermutationAlpha 0.01
    code, summary, err = _run(bids, tmp_path / "out2", "--model", str(model), "--permutation",
                              "none")  # fmt: skip
    assert code == 0, err
    assert not any("perm" in Path(f).name or "nulldist" in f for f in summary["files"])


ONE_SAMPLE_MODEL = """\
Name: oneSample
BIDSModelVersion: "1.0.0"
Nodes:
  - Level: Dataset
    Name: oneSample
    GroupBy: [contrast]
    Model:
      Type: glm
      X: [1]
      Software:
        bids-group:
          Inference:
            Permutation: [tfce, cluster]
            NPermutations: 200
            Seed: 7
            PermutationAlpha: 0.01
            ClusterFormingP: 0.02
            TFCE: {Integration: fsl, E: 0.6}
    DummyContrasts:
      Test: t
"""


def test_resolve_inference_merges_tfce_block_and_refuses_idle_settings():
    spec_block = load_spec_text(ONE_SAMPLE_MODEL).inference
    config = resolve_inference({"tfce_h": 3.0}, spec_block)
    assert (config.tfce_integration, config.tfce_e, config.tfce_h) == ("fsl", 0.6, 3.0)
    with pytest.raises(UsageError, match="--n-perm only applies"):
        resolve_inference({"n_perm": 100}, None)
    with pytest.raises(UsageError, match="--cluster-forming-p only applies.*cluster"):
        resolve_inference({"permutation": ("voxel",), "cluster_forming_p": 0.01}, None)


def load_spec_text(text: str):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.yaml"
        path.write_text(text)
        return load_spec(path)


def test_critical_value_is_where_fwer_p_reaches_alpha():
    rng = np.random.default_rng(0)
    null = rng.standard_normal(1000)
    null[0] = 2.5
    c = critical_value(null, 0.05)
    for obs in (c - 1e-9, c + 1e-9):
        p = (null >= obs).sum() / null.size if obs != null[0] else None
        assert (p <= 0.05) == (obs > c)
    assert critical_value(np.arange(10.0), 0.05) == float("inf")  # 0.05 x 10 < 1


# --------------------------------------------------------------------------- bad input


BAD_CASES = {
    "n-perm zero": (("--permutation", "voxel", "--n-perm", "0"), 64, "--n-perm"),
    "forming p as z": (("--permutation", "cluster", "--cluster-forming-p", "3.1"), 64,
                       "looks like a z or t height"),
    "forming p too big": (("--permutation", "cluster", "--cluster-forming-p", "0.7"), 64,
                          "> 0 and < 0.5"),
    "setting without method": (("--n-perm", "100",), 64, "add --permutation"),
    "tfce dh without fsl": (("--permutation", "tfce", "--tfce-dh", "0.1"), 64, "--tfce-dh"),
    "permute an intercept": (("--permutation", "voxel", "--perm-scheme", "permute"), 64,
                             "includes the mean"),
    "unknown blocks variable": (("--permutation", "voxel", "--exchangeability-blocks", "site"),
                                64, "'site'"),
    "blocks with a gap": (("--permutation", "voxel", "--exchangeability-blocks", "scanner"), 65,
                          "sub-04"),
    "whole blocks of unequal size": (("--permutation", "voxel", "--exchangeability-blocks",
                                      "group", "--whole-blocks", "--model", "TWO_SAMPLE"), 65,
                                     "equal size"),
    "blocks that cannot support the test": (("--permutation", "voxel", "--exchangeability-blocks",
                                             "group", "--model", "TWO_SAMPLE"), 64,
                                            "cannot support this test"),
    "whole blocks without blocks": (("--permutation", "voxel", "--whole-blocks"), 64,
                                    "--exchangeability-blocks"),
}  # fmt: skip


TWO_SAMPLE_MODEL = """\
Name: twoSample
BIDSModelVersion: "1.0.0"
Nodes:
  - Level: Dataset
    Name: twoSample
    GroupBy: [contrast]
    Transformations:
      Transformer: pybids-transforms-v1
      Instructions:
        - Name: Factor
          Input: [group]
    Model:
      Type: glm
      X: [group.a, group.b]
    Contrasts:
      - Name: aGtB
        ConditionList: [group.a, group.b]
        Weights: [1, -1]
        Test: t
"""


@pytest.fixture(scope="module")
def bad_input_dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(2)
    vols = _smooth_noise(rng, 6)
    participants = {"group": ["a", "a", "b", "b", "b", "b"],
                    "scanner": ["x", "x", "y", None, "y", "x"]}  # fmt: skip
    bids = _dataset(tmp / "ds", {(f"{i + 1:02d}", "faces"): vols[i] for i in range(6)},
                    participants)  # fmt: skip
    model = tmp / "two_sample.yaml"
    model.write_text(TWO_SAMPLE_MODEL)
    return bids, model


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_permutation_input_gets_a_clear_error(bad_input_dataset, tmp_path, case):
    bids, model = bad_input_dataset
    args, code, message = BAD_CASES[case]
    args = tuple(str(model) if a == "TWO_SAMPLE" else a for a in args)
    out = tmp_path / "out"
    result, summary, err = _run(bids, out, *args)
    assert result == code, err
    assert message in err
    assert "Traceback" not in err
    assert not out.exists()
    assert not list(tmp_path.glob(".out*"))  # no staging folder left


def test_bad_model_file_keys(tmp_path, bad_input_dataset):
    bids, _ = bad_input_dataset
    for key, value, message in [
        ("NPermutations", "0", "NPermutations == 0, must be an integer >= 1"),
        ("ClusterFormingP", "3.1", "looks like a z or t height"),
        ("Permutation", "[voxel, tcfe]", "did you mean 'tfce'"),
        ("TFCE", "{Integration: nilearn, dh: 0.1}", "dh is the fixed step"),
        ("PermutationScheme", "random", "auto, flip, permute"),
    ]:
        model = tmp_path / "model.yaml"
        text = ONE_SAMPLE_MODEL
        present = f"{key}:" in text
        text = _set_key(text, key, value) if present else text.replace("Seed: 7", f"{key}: {value}")
        model.write_text(text)
        code, _, err = _run(bids, tmp_path / "out", "--model", str(model))
        assert code == 64, (key, err)
        assert message in err and str(model.name) in err, (key, err)


def _set_key(text: str, key: str, value: str) -> str:
    lines = [
        f"{line.split(':')[0]}: {value}" if line.strip().startswith(f"{key}:") else line
        for line in text.splitlines()
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- progress bar


def _cli_in_terminal(args: list[str]) -> str:
    """Run the console script with stderr on a pseudo-terminal; return what it printed there."""
    main_fd, child_fd = pty.openpty()
    env = {**os.environ, "COLUMNS": "100"}
    command = [sys.executable, "-m", "bids_group", *args]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=child_fd, env=env)  # fmt: skip
    os.close(child_fd)
    chunks = []
    while True:
        try:
            data = os.read(main_fd, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout=120)
    os.close(main_fd)
    assert process.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_only(tmp_path):
    bids = _one_sample(tmp_path / "ds", n=14, seed=8)
    args = [str(bids), "", "group", "--permutation", "voxel", "--n-perm", "4000", "--no-report"]
    args[1] = str(tmp_path / "a")
    shown = _cli_in_terminal(args)
    assert "4001/4001" in shown and "100%" in shown
    args[1] = str(tmp_path / "b")
    quiet = _cli_in_terminal([*args, "-q"])
    assert "4001/4001" not in quiet and "%" not in quiet
    args[1] = str(tmp_path / "c")
    piped = subprocess.run([sys.executable, "-m", "bids_group", *args], capture_output=True,
                           text=True, check=True)  # fmt: skip
    assert "%" not in piped.stderr and "\r" not in piped.stderr


# --------------------------------------------------------------------------- report


def test_report_shows_each_method_with_its_null_distribution(tmp_path):
    bids = _one_sample(tmp_path / "ds", n=12, seed=9, effect=0.8)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(bids), str(tmp_path / "out"), "group", "-q", "--permutation", "voxel",
                     "cluster", "tfce", "--n-perm", "200"])  # fmt: skip
    assert code == 0, stderr.getvalue()
    report = next((tmp_path / "out").glob("*_report.html")).read_text()
    for title in ("permutation voxel-level FWE", "permutation cluster-size FWE",
                  "permutation cluster-mass FWE", "permutation TFCE FWE"):  # fmt: skip
        assert title in report
    assert report.count("Null distribution of the max") == 4
    assert "stat-t_nulldist.tsv" in report
    # the summary table: the height threshold and the four permutation methods, linked
    rows = _summary_rows(report)
    assert [cells[1] for _, cells in rows][1:] == [f"{t} p &lt;= 0.05" for t in (
        "permutation voxel-level FWE", "permutation cluster-size FWE",
        "permutation cluster-mass FWE", "permutation TFCE FWE")]  # fmt: skip
    assert {anchor for anchor, _ in rows} <= set(re.findall(r' id="([^"]+)"', report))
    node = tmp_path / "out" / "node-dataset"
    # voxel and TFCE peak tables carry the peak's FWER p: oracle, the -log10 p map of the method
    for key in ("permVoxel", "permTfce"):
        (tsv,) = node.glob(f"*_stat-z_desc-{key}05_clusters.tsv")
        (logp,) = node.glob(f"*_stat-logp_desc-{key}_statmap.nii.gz")
        table = pd.read_csv(tsv, sep="\t", dtype={"cluster_id": str})
        image = nib.load(logp)
        xyz = table[["peak_x", "peak_y", "peak_z"]].to_numpy()
        ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(image.affine), xyz)).astype(int)
        expected = 10.0 ** -np.asarray(image.dataobj, dtype=np.float64)[tuple(ijk.T)]
        assert len(table) and np.allclose(table["peak_p_fwe"], expected, rtol=1e-5)
        assert "peak_p_fwe: permutation" in report
    # the parametric clusters that the permutation formed identically get its size FWER p
    (param,) = node.glob("*_stat-z_desc-fpr001_clusters.tsv")
    (perm,) = node.glob("*_stat-t_desc-permCluster_clusters.tsv")
    param, perm = (pd.read_csv(f, sep="\t", dtype={"cluster_id": str}) for f in (param, perm))
    shown = re.search(r"<div class=\"fig-title\">Clusters</div>.*?</table>", report, re.S).group(0)
    assert "<th>p_fwe_size</th>" in shown and "p_fwe_size: cluster-size FWER p" in report
    for row in perm.itertuples():
        same = (param["size_voxels"] == row.size_voxels) & (param["peak_x"] == row.peak_x)
        same &= (param["peak_y"] == row.peak_y) & (param["peak_z"] == row.peak_z_mm)
        assert same.sum() == 1
        size = f"<td>{row.size_voxels}</td><td>{row.size_mm3:.0f}</td>"
        assert f"{size}<td>{row.p_fwe_size:.4g}</td>" in shown


# --------------------------------------------------------------------------- interrupt


def test_interrupt_during_permutations_stops_promptly_and_leaves_nothing(tmp_path):
    """Ctrl-C in the middle of a long permutation run: exit 130 within seconds, OUT_DIR absent,
    no staging folder left (the kernels return to Python between batches)."""
    import signal
    import time

    # n = 24: a million random relabellings of 2^24 (n = 14 would be 16,384, done in < 1 s)
    bids = _one_sample(tmp_path / "ds", n=24, seed=10)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "bids_group", str(bids), str(out), "group", "--permutation",
               "tfce", "--n-perm", "1000000", "--no-report"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "Permutation test:" in line:
            break
    time.sleep(1.0)  # well inside the million relabellings
    started = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.perf_counter() - started < 15
    assert proc.returncode == 130, "".join(seen) + stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert stdout == ""
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize(
    ("n_subjects", "n_perm", "hint", "wrong"),
    [(8, 9, "a larger --n-perm", "more maps"), (4, 100, "more maps", "--n-perm")],
)
def test_no_significance_possible_warning_names_the_limit(tmp_path, n_subjects, n_perm, hint,
                                                         wrong):  # fmt: skip
    """1/N > --perm-alpha: with 8 maps (256 sign flips) the limit is --n-perm 9, not the
    number of maps; with 4 maps all 16 flips are enumerated and only more maps help."""
    from clicheck import run_cli
    from conftest import make_bids_derivatives

    bids = make_bids_derivatives(tmp_path / "ds", n_subjects=n_subjects)
    code, _, err = run_cli(bids, tmp_path / "out", "--no-report", "--permutation", "voxel",
                           "--n-perm", str(n_perm))  # fmt: skip
    assert code == 0, err
    (line,) = [x for x in err.splitlines() if "no permutation result can be significant" in x]
    assert hint in line and wrong not in line, line
