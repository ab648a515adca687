"""OLS streamed from the decoded maps (no store): its sums against an exact least-squares
oracle and the in-memory fit, and the real CLI with a tiny --mem-budget against the run with
the data in memory (every map, every table), for designs with and without the constant, a badly
scaled covariate, data of large mean and tiny spread, and non-finite values."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from clicheck import check_failure, run_ok
from conftest import make_bids_derivatives
from test_store import INFERENCE, MODEL, N_SUBJECTS, SHAPE, TINY, _dataset, _maps, _slab_mask

from bids_group.contrasts import compute_contrast
from bids_group.data_checks import check_masked_data
from bids_group.errors import DataError
from bids_group.glm import fit_ols
from bids_group.report.build import background_volume
from bids_group.store import STORE_FOLDER
from bids_group.streamed_fit import OlsAccumulator, batch_maps

#: Streamed against in-memory float64 statistics (relative on t, R^2 and the residual variance;
#: absolute on z).
T_RTOL = 1e-10
#: ... but with data of mean 1000 and spread 1e-3 every float64 fit loses ~6 digits of the
#: effects to the mean (pinv(X) 1 is (0, 0, 1e-17)-ish, not exactly 0, on a slope or a group
#: difference): the streamed and in-memory t each differ from the oracle's by up to ~1e-9
#: (measured: 7e-10 and 9e-10; 7e-9 and 8e-9 with a rank-deficient design).
T_ATOL_LARGE_MEAN = 3e-8
#: Written maps are float32: a value may round to a neighbouring float32 (4 float32 epsilons),
#: and one near 0 in a map of larger values (an effect, R^2) may differ by float64 rounding of
#: the larger ones (1e-7 of the map's largest |value|: float32's own resolution there).
MAP_RTOL, MAP_ATOL_OF_MAX = 4 * float(np.finfo(np.float32).eps), 1e-7
STREAMED = "OLS fit streamed from the decoded maps (no store)"

N_MAPS = 103
_RNG = np.random.default_rng(11)
_GROUP = np.arange(N_MAPS) % 2
_AGE = _RNG.normal(40.0, 10.0, N_MAPS)
DESIGNS = {
    "groups+age": np.column_stack([_GROUP, 1 - _GROUP, _AGE - _AGE.mean()]),
    "intercept+age-in-days": np.column_stack([np.ones(N_MAPS), 365.25 * _AGE]),
    "no-constant": np.column_stack([365.25 * _AGE, _GROUP]),
    "rank-deficient": np.column_stack([np.ones(N_MAPS), _GROUP, 1 - _GROUP]),
}


def _data(kind: str, n_voxels: int = 3_000) -> np.ndarray:
    rng = np.random.default_rng(5)
    noise = rng.standard_normal((N_MAPS, n_voxels)) + 0.5 * _GROUP[:, None]
    if kind == "large-mean-tiny-spread":  # float32 resolves 6e-5 at 1000: ~16 levels
        return (1000.0 + 1e-3 * noise).astype(np.float32)
    return noise.astype(np.float32)


def _streamed(design: np.ndarray, data: np.ndarray, batch: int = 7):
    fit = OlsAccumulator(design, data.shape[1], batch=batch)
    for i, row in enumerate(data):
        fit.add(i, row)
    return fit.finish(np.arange(data.shape[1]))


def _oracle(design: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(beta, RSS) by numpy's least squares with explicit residuals, on the data less its
    first map's value at each voxel when the design spans the constant (exact in float64 for
    float32 data near it, and then the fit of the rest loses no digits): float64 accurate."""
    y = data.astype(np.float64)
    ones = np.ones(len(y))
    spans = np.allclose(design @ np.linalg.lstsq(design, ones, rcond=None)[0], ones)
    shift = y[0] if spans else np.zeros(y.shape[1])
    beta = np.linalg.lstsq(design, y - shift, rcond=None)[0]
    residuals = (y - shift) - design @ beta
    if spans:
        beta += np.linalg.pinv(design) @ np.outer(ones, shift)
    return beta, np.einsum("ij,ij->j", residuals, residuals)


@pytest.mark.parametrize("kind", ["standard", "large-mean-tiny-spread"])
@pytest.mark.parametrize("name", sorted(DESIGNS))
def test_streamed_sums_match_an_exact_oracle_and_the_in_memory_fit(name, kind):
    design, data = DESIGNS[name], _data(kind)
    streamed = _streamed(design, data)
    fit = streamed.fit
    beta, rss = _oracle(design, data)
    dof = N_MAPS - np.linalg.matrix_rank(design)
    # within the bound it states (against the float64-accurate oracle)
    assert 0 < streamed.rss_bound < 1e-11
    np.testing.assert_allclose(fit.residual_variance, rss / dof, rtol=streamed.rss_bound + 1e-14)
    # within 1e-9 standard errors, or some float64 ulps of beta (a mean of 1000 is stored
    # to 1e-13, 1e-9 of its standard error of 1e-4; an intercept of 1000 beside age in days
    # moves the age slope by ~1e-17 in both fits, 2e-10 of its standard error)
    scale = np.sqrt(np.outer(np.diag(fit.xtx_inv), fit.residual_variance))
    assert np.all(np.abs(fit.beta - beta) <= 1e-9 * scale + 32 * np.spacing(np.abs(beta)))
    # against the in-memory fit: t of every estimable contrast, R^2, residual variance
    whole = fit_ols(data, design)
    assert fit.dof == whole.dof and fit.rank == whole.rank
    assert fit.centred_r_squared == whole.centred_r_squared == (name != "no-constant")
    np.testing.assert_allclose(fit.residual_variance, whole.residual_variance, rtol=T_RTOL)
    np.testing.assert_allclose(fit.r_squared, whole.r_squared, rtol=0, atol=T_RTOL)
    atol = T_ATOL_LARGE_MEAN if kind == "large-mean-tiny-spread" else 1e-12
    weights = np.zeros((1, design.shape[1]))
    weights[0, -1] = 1.0
    if name == "rank-deficient":
        weights[0, 1:] = [1.0, -1.0]  # estimable: the group difference
    ours, theirs = compute_contrast(fit, weights, "t"), compute_contrast(whole, weights, "t")
    np.testing.assert_allclose(ours.stat, theirs.stat, rtol=T_RTOL, atol=atol)
    np.testing.assert_allclose(ours.z, theirs.z, rtol=0, atol=max(atol, T_RTOL))


def test_the_shift_is_what_saves_the_digits():
    """Without the shift (sums of Y^2 and X'Y), data of mean 1000 and spread 1e-3 lose ~14 of
    the 16 digits of RSS; with it the streamed fit is as accurate as the oracle."""
    design, data = DESIGNS["groups+age"], _data("large-mean-tiny-spread")
    _, rss = _oracle(design, data)
    y = data.astype(np.float64)
    basis = np.linalg.svd(design, full_matrices=False)[0]  # full rank: 3 columns
    projected = basis.T @ y
    naive = np.einsum("ij,ij->j", y, y) - np.einsum("ij,ij->j", projected, projected)
    naive_error = np.max(np.abs(naive / rss - 1))
    rss_streamed = _streamed(design, data).fit.residual_variance * (N_MAPS - 3)
    assert naive_error > 1e-6
    assert np.max(np.abs(rss_streamed / rss - 1)) < 1e-13


@pytest.mark.parametrize("name", ["groups+age", "no-constant"])
def test_data_checks_find_what_the_in_memory_checks_find(name):
    data = _data("standard", 500)
    data[10] *= 1e5  # an outlier map
    data[20] = 0.0  # a map that is zero everywhere
    data[:, 3] = 2.5  # constant
    data[:, 7] = 0.0  # zero in every map
    fit = OlsAccumulator(DESIGNS[name], data.shape[1], batch=7, background=True)
    for i, row in enumerate(data):
        fit.add(i, row)
    streamed = fit.finish(np.arange(data.shape[1]))
    assert streamed.findings == check_masked_data(data)
    assert streamed.findings.constant_voxels == 1 and streamed.findings.all_zero_voxels == 1
    # the report's background: mean |map| (summed map by map, in float64)
    expected = np.abs(data.astype(np.float64)).mean(axis=0)
    np.testing.assert_allclose(streamed.mean_abs, expected, rtol=1e-12)
    mask = np.ones((5, 10, 10), dtype=bool)
    volumes = background_volume(streamed, mask), background_volume(data, mask)  # float32
    np.testing.assert_allclose(*volumes, rtol=MAP_RTOL)


def test_batches_and_voxel_steps_are_fixed_by_sizes_alone():
    assert batch_maps(235_375, 4 * 1000**3) == 35  # 32 MiB of float32 rows
    assert batch_maps(8_000, 10**6) == 7  # within a quarter of a 1 MB budget
    design, data = DESIGNS["groups+age"], _data("standard", 50_000)
    a, b = _streamed(design, data, batch=7), _streamed(design, data, batch=7)
    assert np.array_equal(a.fit.beta, b.fit.beta)
    with pytest.raises(ValueError, match="came before"):
        OlsAccumulator(design, 10, batch=3).add(1, data[0, :10])
    with pytest.raises(DataError, match="no residual degrees of freedom"):
        OlsAccumulator(np.eye(4), 10, batch=3)


# --- The real CLI ---------------------------------------------------------------------------

DAYS_MODEL = """\
Name: age in days
BIDSModelVersion: "1.0.0"
Nodes:
  - Level: Dataset
    Name: days
    GroupBy: [contrast]
    Model:
      Type: glm
      X: [{columns}]
    DummyContrasts:
      Test: t
      Contrasts: [age]
"""


def _assert_close_outputs(a: Path, b: Path, *, at_least: int = 8) -> None:
    """Every map within :data:`MAP_RTOL` and :data:`MAP_ATOL_OF_MAX` (thresholded maps: the
    same survivors), every table the same bytes."""
    maps_a, maps_b = _maps(a), _maps(b)
    assert maps_a.keys() == maps_b.keys() and len(maps_a) >= at_least
    for name in maps_a:
        x, y = maps_a[name], maps_b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(np.isfinite(x), np.isfinite(y)), name
        if "_desc-" in name:  # thresholded: the same voxels survive
            assert np.array_equal(x != 0, y != 0), name
        finite = np.isfinite(x)
        atol = MAP_ATOL_OF_MAX * float(np.max(np.abs(x[finite]), initial=0.0))
        if "stat-rsquared" in name:  # in [0, 1]; 1e-16 either side of 0 for an intercept alone
            atol = max(atol, 1e-12)
        np.testing.assert_allclose(y[finite], x[finite], rtol=MAP_RTOL, atol=atol, err_msg=name)
    tables = sorted(p.relative_to(a) for p in a.rglob("*.tsv"))
    assert tables == sorted(p.relative_to(b) for p in b.rglob("*.tsv"))
    for name in tables:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _streamed_and_in_memory(bids: Path, tmp_path: Path, *args: str) -> tuple[str, str]:
    common = [*args, "--no-report", "-v"]
    _, in_memory = run_ok(bids, tmp_path / "memory", *common, "--mem-budget", "1GB")
    work = tmp_path / "work"
    _, streamed = run_ok(bids, tmp_path / "streamed", *common, "--mem-budget", TINY,
                         "-w", str(work))  # fmt: skip
    assert STREAMED not in in_memory and STREAMED in streamed
    assert "voxel-tiled store" not in streamed and not (work / STORE_FOLDER).exists()
    _assert_close_outputs(tmp_path / "memory", tmp_path / "streamed")
    return in_memory, streamed


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _dataset(tmp_path_factory.mktemp("streamed") / "ds")


def test_two_groups_and_age_streamed_equal_in_memory(dataset, tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text(MODEL)
    _, streamed = _streamed_and_in_memory(dataset, tmp_path, *INFERENCE, "--model", str(model))
    assert "7 maps at a time" in streamed and "least coverage" in streamed  # mask narrowed
    names = " ".join(_maps(tmp_path / "streamed"))
    for stat in ("stat-z", "stat-p", "stat-effect", "stat-variance", "stat-t", "stat-F",
                 "stat-rsquared", "stat-residualvariance", "desc-fdr", "tdp"):  # fmt: skip
        assert stat in names, stat


def _days_dataset(root: Path, *, mean: float = 0.0, spread: float = 1.0) -> Path:
    """24 subjects with age in days (7,300 to 32,500), maps ``mean + spread * (noise + an age
    effect in a blob)``."""
    days = [365.25 * (20 + 3 * i) + 17 * (i % 5) for i in range(N_SUBJECTS)]
    group = ["patient" if i % 2 else "control" for i in range(N_SUBJECTS)]
    bids = make_bids_derivatives(root, n_subjects=N_SUBJECTS, shape=SHAPE, seed=8,
                                 participants={"age": days, "group": group})  # fmt: skip
    for i, path in enumerate(sorted(bids.rglob("*_statmap.nii.gz"))):
        image = nib.load(path)
        values = np.asarray(image.dataobj, dtype=np.float64)
        values[5:12, 5:12, 5:12] += 3.0 * days[i] / days[-1]
        nib.Nifti1Image((mean + spread * values).astype(np.float32), image.affine).to_filename(path)
    return bids


@pytest.mark.parametrize("columns", ["1, age", "age"], ids=["intercept", "no-constant"])
def test_age_in_days_with_and_without_the_constant(columns, tmp_path):
    bids = _days_dataset(tmp_path / "ds")
    model = tmp_path / "model.yaml"
    model.write_text(DAYS_MODEL.format(columns=columns))
    _streamed_and_in_memory(bids, tmp_path, *INFERENCE, "--model", str(model))
    (rsquared,) = (tmp_path / "streamed").rglob("*stat-rsquared*.json")
    centred = "centred on the voxel's mean" in rsquared.read_text()
    assert centred == (columns != "age")


def test_large_mean_and_tiny_spread(tmp_path):
    """1000 + 1e-3 x (noise + effect): float32 keeps ~16 levels of the spread; the sums of the
    streamed fit are shifted by the first batch's mean and lose nothing to the 1000."""
    bids = _days_dataset(tmp_path / "ds", mean=1000.0, spread=1e-3)
    model = tmp_path / "model.yaml"
    model.write_text(DAYS_MODEL.format(columns="1, age"))
    _streamed_and_in_memory(bids, tmp_path, *INFERENCE, "--model", str(model))


def test_non_finite_values_drop_the_same_voxels(dataset, tmp_path):
    """A user mask across one map's NaN slab: the same voxels dropped, named the same way."""
    mask_path = _slab_mask(dataset, tmp_path / "mask.nii.gz")
    in_memory, streamed = _streamed_and_in_memory(dataset, tmp_path, "--mask", str(mask_path))
    dropped = [line.split("] ", 1)[-1] for line in in_memory.splitlines() if "Dropped" in line]
    assert dropped and all(any(d in line for line in streamed.splitlines()) for d in dropped)


def test_an_all_nan_map_fails_the_same_way(capsys, tmp_path):
    bids = make_bids_derivatives(tmp_path / "ds", n_subjects=N_SUBJECTS, shape=SHAPE)
    victim = sorted(bids.rglob("*_statmap.nii.gz"))[9]
    image = nib.load(victim)
    nib.Nifti1Image(np.full(SHAPE, np.nan, np.float32), image.affine).to_filename(victim)
    messages = []
    for budget in ("1GB", TINY):
        argv = [bids, tmp_path / f"out{budget}", "group", "--mem-budget", budget, "--no-report"]
        err = check_failure(capsys, argv, tmp_path / f"out{budget}", 65, "automatic mask is empty")
        messages.append(err.strip().splitlines()[-1])
    assert messages[0] == messages[1]


def test_same_bits_for_any_number_of_threads(dataset, tmp_path):
    common = [*INFERENCE, "--no-report", "--mem-budget", TINY]
    for n_jobs in ("1", "2"):
        run_ok(dataset, tmp_path / n_jobs, *common, "--n-jobs", n_jobs)
    one, two = _maps(tmp_path / "1"), _maps(tmp_path / "2")
    assert one.keys() == two.keys() and len(one) >= 8
    for name in one:
        assert np.array_equal(one[name], two[name], equal_nan=True), name


@pytest.mark.parametrize("space", ["MNI152NLin2009cAsym", None], ids=["mni", "no-space"])
def test_report_of_a_streamed_run(space, tmp_path):
    """With the report: maps in an MNI space but on a grid outside the template (the mask is the
    background, the caption says why), or in no named space (the mean |map|, summed while
    streaming, as with the data in memory)."""
    far = np.diag([2.0, 2.0, 2.0, 1.0])
    far[:3, 3] = 400.0  # 40 cm from the template's brain
    bids = make_bids_derivatives(tmp_path / "ds", n_subjects=N_SUBJECTS, shape=SHAPE,
                                 space=space, affine=far if space else None)  # fmt: skip
    _, stderr = run_ok(bids, tmp_path / "out", "-v", "--mem-budget", TINY)
    _, in_memory = run_ok(bids, tmp_path / "memory", "-v")
    assert STREAMED in stderr
    (html,) = (tmp_path / "out").rglob("*.html")
    if space:
        assert "the fit was streamed" in html.read_text()
    else:
        mean = "report background: mean |input maps|"
        assert mean in stderr and mean in in_memory
        assert "the fit was streamed" not in html.read_text()


SPM_FACES = (Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
             / "spm-faces16-words14" / "visual_stimulation")  # fmt: skip


@pytest.mark.skipif(not SPM_FACES.is_dir(), reason="shared data absent")
def test_real_spm_faces_streamed_equal_in_memory(tmp_path):
    """16 real SPM con images (NaN outside each subject's mask: the automatic mask narrows as
    maps arrive), one-sample t, FDR, clusters and ARI: streamed against in memory."""
    sources = sorted(SPM_FACES.glob("subject_*/con_0006.hdr"))
    assert len(sources) == 16
    bids = make_bids_derivatives(tmp_path / "ds", n_subjects=16, shape=(2, 2, 2),
                                 participants=None)  # fmt: skip
    for source, target in zip(sources, sorted(bids.rglob("*_statmap.nii.gz")), strict=True):
        image = nib.load(source)  # the real maps replace the generated ones
        nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), image.affine).to_filename(
            target
        )
    _, streamed = _streamed_and_in_memory(bids, tmp_path, *INFERENCE)
    assert "least coverage" in streamed  # subject masks differ
    assert any((tmp_path / "streamed").rglob("*clusters*.tsv"))


def test_a_truncated_map_stops_a_streamed_run_naming_it(capsys, tmp_path):
    """Found mid-stream (map 15 of 24, after two batches were summed): exit 65 naming the file,
    as with the data in memory, and nothing left in the work folder but pybids' saved index."""
    bids = make_bids_derivatives(tmp_path / "ds", n_subjects=N_SUBJECTS, shape=SHAPE)
    bad = sorted(bids.rglob("*_statmap.nii.gz"))[15]
    bad.write_bytes(bad.read_bytes()[:-4000])
    work = tmp_path / "work"
    for budget in ("1GB", TINY):
        out = tmp_path / f"out{budget}"
        argv = [bids, out, "group", "--mem-budget", budget, "-w", work, "--no-report"]
        check_failure(capsys, argv, out, 65, bad.name, "truncated")  # (-v adds a traceback)
    # the same maps, intact, are streamed with the tiny budget
    bad.unlink()
    _, stderr = run_ok(bids, tmp_path / "ok", "--mem-budget", TINY, "--no-report", "-v")
    assert STREAMED in stderr
    assert not [p for p in work.rglob("*") if p.is_file() and "pybids" not in str(p)]


def test_a_first_batch_of_nearly_collinear_rows_keeps_the_shift_bounded():
    """No constant in the design, and the first batch's three rows nearly proportional: a
    least-squares shift blew up along the ill-determined direction and the residual variance
    came out 100% off (the sums dwarfed the residuals); the ridge shift keeps it at rounding."""
    from bids_group.glm import fit_ols
    from bids_group.streamed_fit import OlsAccumulator

    rng = np.random.default_rng(0)
    n, n_vox = 40, 50
    x1 = rng.normal(5, 1, n)
    x2 = x1 + rng.normal(0, 1, n)
    x2[:3] = x1[:3] * (1 + 1e-9 * np.arange(3))
    design = np.column_stack([x1, x2])
    y = design @ rng.normal(size=(2, n_vox)) + rng.normal(0, 0.01, (n, n_vox)) + 100
    y = y.astype(np.float32)
    reference = fit_ols(y, design)
    for batch in (3, 40):
        fit = OlsAccumulator(design, n_vox, batch=batch)
        for i, row in enumerate(y):
            fit.add(i, row)
        got = fit.finish(np.arange(n_vox))
        assert got.rss_bound < 1e-10
        np.testing.assert_allclose(got.fit.residual_variance, reference.residual_variance,
                                   rtol=1e-10)  # fmt: skip
        np.testing.assert_allclose(got.fit.beta, reference.beta, rtol=1e-10, atol=1e-10)
