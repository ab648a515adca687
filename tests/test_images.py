"""load_masked_data: reading, grids, masks, smoothing (nilearn parity), errors."""

from __future__ import annotations

import dataclasses
import gzip
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_map
from nilearn.image import resample_img, smooth_img

from bids_group import images
from bids_group.errors import DataError, MissingInputError
from bids_group.images import load_masked_data, unmask

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
SHAPE = (9, 10, 11)
AFFINE = np.array([[-3.0, 0, 0, 30], [0, 3, 0, -40], [0, 0, 3, -20], [0, 0, 0, 1]])


def _brain(shape=SHAPE, shrink=0.0):
    x, y, z = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = [(n - 1) / 2 for n in shape]
    r = [(n / 2 - 0.5) * (1 - shrink) for n in shape]
    return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1


def _maps(tmp_path, n=5, seed=0, nan_outside=False, affine=AFFINE, shape=SHAPE, ext=".nii.gz"):
    rng = np.random.default_rng(seed)
    paths, arrays = [], []
    for i in range(n):
        data = rng.standard_normal(shape).astype(np.float32) + 2.0
        brain = _brain(shape, shrink=0.1 * (i % 2))
        data[~brain] = np.nan if nan_outside else 0.0
        paths.append(write_map(tmp_path / f"map{i}{ext}", data, affine))
        arrays.append(data)
    return paths, arrays


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_auto_mask_matches_numpy(tmp_path, ext):
    paths, arrays = _maps(tmp_path, ext=ext)
    out = load_masked_data(paths)
    expected_mask = np.all([np.isfinite(a) & (a != 0) for a in arrays], axis=0)
    np.testing.assert_array_equal(out.mask, expected_mask)
    assert out.mask.sum() < _brain().sum()  # the shrunken brains narrowed it
    np.testing.assert_array_equal(out.data, np.stack([a[expected_mask] for a in arrays]))
    assert out.data.dtype == np.float32 and out.data.flags.c_contiguous
    union = np.any([a != 0 for a in arrays], axis=0)
    assert out.n_dropped == union.sum() - expected_mask.sum()
    np.testing.assert_allclose(out.affine, AFFINE)
    assert out.voxel_size == (3.0, 3.0, 3.0)


def test_nan_outside_brain_is_excluded(tmp_path):
    paths, arrays = _maps(tmp_path, nan_outside=True)
    out = load_masked_data(paths)
    expected = np.all([np.isfinite(a) for a in arrays], axis=0)
    np.testing.assert_array_equal(out.mask, expected)
    assert np.isfinite(out.data).all()


def test_threads_give_the_same_result(tmp_path):
    paths, _ = _maps(tmp_path, n=7)
    one = load_masked_data(paths, n_jobs=1)
    three = load_masked_data(paths, n_jobs=3)
    np.testing.assert_array_equal(one.data, three.data)
    np.testing.assert_array_equal(one.mask, three.mask)


def test_first_map_narrowest_and_later_maps_narrower(tmp_path):
    """Rows stored before the mask shrank are cut down correctly."""
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(4)]
    arrays[1][0, :, :] = 0
    arrays[3][:, 2, :] = np.nan
    paths = [write_map(tmp_path / f"m{i}.nii.gz", a, AFFINE) for i, a in enumerate(arrays)]
    out = load_masked_data(paths)
    expected = np.all([np.isfinite(a) & (a != 0) for a in arrays], axis=0)
    np.testing.assert_array_equal(out.data, np.stack([a[expected] for a in arrays]))


def test_scaled_integer_and_big_endian_and_nifti2(tmp_path):
    rng = np.random.default_rng(1)
    ints = rng.integers(1, 1000, SHAPE).astype(np.int16)
    img = nib.Nifti1Image(ints, AFFINE)
    img.header.set_slope_inter(0.5, -3.0)
    img.to_filename(tmp_path / "scaled.nii.gz")
    floats = rng.standard_normal(SHAPE).astype(">f4")
    big = nib.Nifti1Image(floats, AFFINE)
    big.to_filename(tmp_path / "big.nii.gz")
    nib.Nifti2Image(floats.astype(np.float32), AFFINE).to_filename(tmp_path / "two.nii.gz")
    paths = [tmp_path / n for n in ("scaled.nii.gz", "big.nii.gz", "two.nii.gz")]
    out = load_masked_data(paths)
    for row, path in zip(out.data, paths, strict=True):
        np.testing.assert_allclose(row, nib.load(path).get_fdata()[out.mask], rtol=1e-6)


def test_singleton_4d_ok_true_4d_and_2d_fail(tmp_path):
    data = np.random.default_rng(0).standard_normal((*SHAPE, 1)).astype(np.float32)
    ok = write_map(tmp_path / "a.nii.gz", data, AFFINE)
    assert load_masked_data([ok]).data.shape == (1, np.prod(SHAPE))
    four = write_map(tmp_path / "b.nii.gz", np.ones((*SHAPE, 2)), AFFINE)
    with pytest.raises(DataError, match=r"b\.nii\.gz has shape \(9, 10, 11, 2\)"):
        load_masked_data([ok, four])
    two = write_map(tmp_path / "c.nii.gz", np.ones((4, 5)), np.eye(4))
    with pytest.raises(DataError, match=r"c\.nii\.gz has shape \(4, 5\)"):
        load_masked_data([two])


def test_grid_mismatch_names_files_and_suggests_resample(tmp_path):
    paths, _ = _maps(tmp_path, n=3)
    shifted = AFFINE.copy()
    shifted[1, 3] += 1.0
    off = write_map(tmp_path / "shifted.nii.gz", np.ones(SHAPE), shifted)
    bigger = write_map(tmp_path / "bigger.nii.gz", np.ones((10, 10, 11)), AFFINE)
    with pytest.raises(DataError, match=r"2 map\(s\).*shifted\.nii\.gz.*bigger.*--resample") as e:
        load_masked_data([*paths, off, bigger])
    assert "voxel 3x3x3 mm" in str(e.value)


def test_tiny_affine_difference_is_the_same_grid(tmp_path):
    paths, _ = _maps(tmp_path, n=2)
    nudged = AFFINE.copy()
    nudged[0, 3] += 5e-5
    other = write_map(tmp_path / "nudged.nii.gz", np.ones(SHAPE), nudged)
    assert load_masked_data([*paths, other]).data.shape[0] == 3


def test_resample_matches_nilearn_continuous(tmp_path):
    """Cubic resampling of a smooth field equals nilearn's resample_img (continuous)."""
    x, y, z = np.meshgrid(*[np.linspace(0, 1, n) for n in SHAPE], indexing="ij")
    field = (np.sin(3 * x) + np.cos(2 * y) * z + 3).astype(np.float32)
    ref = write_map(tmp_path / "ref.nii.gz", field, AFFINE)
    other_affine = np.array([[2.0, 0, 0, -10], [0, 2.5, 0, -30], [0, 0, 2, -14], [0, 0, 0, 1]])
    moved = write_map(tmp_path / "moved.nii.gz", field, other_affine)
    out = load_masked_data([ref, moved], resample=True)
    oracle = resample_img(
        nib.load(moved),
        target_affine=AFFINE,
        target_shape=SHAPE,
        interpolation="continuous",
        force_resample=True,
        copy_header=True,
    ).get_fdata()
    np.testing.assert_allclose(out.data[1], oracle[out.mask], rtol=1e-5, atol=1e-5)
    assert out.mask.sum() < np.prod(SHAPE)  # outside the moved field of view is excluded


def test_smoothing_matches_nilearn(tmp_path):
    paths, _ = _maps(tmp_path, n=3, nan_outside=True)
    out = load_masked_data(paths, smoothing_fwhm=7.0)
    for row, path in zip(out.data, paths, strict=True):
        oracle = smooth_img(str(path), fwhm=7.0).get_fdata()
        np.testing.assert_allclose(row, oracle[out.mask], rtol=1e-6, atol=1e-6)
    unsmoothed = load_masked_data(paths)
    np.testing.assert_array_equal(out.mask, unsmoothed.mask)


def test_smoothing_anisotropic_voxels_matches_nilearn(tmp_path):
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    paths, _ = _maps(tmp_path, n=2, affine=affine)
    out = load_masked_data(paths, smoothing_fwhm=6.0, n_jobs=2)
    for row, path in zip(out.data, paths, strict=True):
        oracle = smooth_img(str(path), fwhm=6.0).get_fdata()
        np.testing.assert_allclose(row, oracle[out.mask], rtol=1e-6, atol=1e-6)


def test_user_mask_drops_non_finite_voxels_with_warning(tmp_path, caplog):
    paths, arrays = _maps(tmp_path, n=3)
    arrays[2][4, 5, 5] = np.nan
    paths[2] = write_map(tmp_path / "nan.nii.gz", arrays[2], AFFINE)
    mask = _brain(shrink=0.2)
    mask_path = write_map(tmp_path / "mask.nii.gz", mask.astype(np.uint8), AFFINE)
    with caplog.at_level(logging.WARNING, logger="bids_group.images"):
        out = load_masked_data(paths, mask_path=mask_path)
    assert "Dropped 1 of" in caplog.text and "nan.nii.gz (1)" in caplog.text
    expected = mask.copy()
    expected[4, 5, 5] = False
    np.testing.assert_array_equal(out.mask, expected)
    np.testing.assert_array_equal(out.data, np.stack([a[expected] for a in arrays]))
    assert out.n_dropped == 1


def test_user_mask_on_other_grid_needs_resample(tmp_path):
    paths, arrays = _maps(tmp_path, n=2)
    other = np.diag([2.0, 2.0, 2.0, 1.0])
    other[:3, 3] = [10, -36, -16]
    mask_path = write_map(tmp_path / "mask.nii.gz", np.ones((8, 8, 8), np.uint8), other)
    with pytest.raises(DataError, match=r"not on the grid of the mask .*mask\.nii\.gz"):
        load_masked_data(paths, mask_path=mask_path)
    out = load_masked_data(paths, mask_path=mask_path, resample=True)
    assert out.mask.shape == (8, 8, 8)
    np.testing.assert_allclose(out.affine, other)


def test_mask_errors(tmp_path):
    paths, _ = _maps(tmp_path, n=2)
    with pytest.raises(MissingInputError, match="nomask"):
        load_masked_data(paths, mask_path=tmp_path / "nomask.nii.gz")
    empty = write_map(tmp_path / "empty_mask.nii.gz", np.zeros(SHAPE), AFFINE)
    with pytest.raises(DataError, match="no voxel > 0"):
        load_masked_data(paths, mask_path=empty)
    prob = np.random.default_rng(0).uniform(0, 1, SHAPE)
    prob_path = write_map(tmp_path / "prob.nii.gz", prob, AFFINE)
    with pytest.raises(DataError, match="not binary"):
        load_masked_data(paths, mask_path=prob_path)
    labels = write_map(tmp_path / "labels.nii.gz", (prob > 0.5) * 255, AFFINE)
    assert load_masked_data(paths, mask_path=labels).data.shape[0] == 2
    # A mask outside every map's support is empty once non-finite voxels are dropped.
    nan_paths, _ = _maps(tmp_path / "nan", n=2, nan_outside=True)
    corner = np.zeros(SHAPE)
    corner[0, 0, 0] = 1
    corner_path = write_map(tmp_path / "corner.nii.gz", corner, AFFINE)
    with pytest.raises(DataError, match="same space"):
        load_masked_data(nan_paths, mask_path=corner_path)


def test_empty_auto_mask(tmp_path):
    paths, _ = _maps(tmp_path, n=2)
    zero = write_map(tmp_path / "zero.nii.gz", np.zeros(SHAPE), AFFINE)
    with pytest.raises(DataError, match="automatic mask is empty"):
        load_masked_data([*paths, zero])


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.nii.gz", b""),
        ("text.nii", b"hello, this is not an image" * 20),
        ("notgzip.nii.gz", b"\x00" * 400),
    ],
)
def test_unreadable_files_are_named(tmp_path, name, content):
    paths, _ = _maps(tmp_path, n=1)
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        load_masked_data([*paths, bad])


def test_truncated_gzip_is_named(tmp_path):
    paths, _ = _maps(tmp_path, n=2)
    raw = gzip.decompress(paths[1].read_bytes())
    bad = tmp_path / "truncated.nii.gz"
    compressed = gzip.compress(raw)
    bad.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DataError, match=r"truncated\.nii\.gz"):
        load_masked_data([paths[0], bad])
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(DataError, match=r"short\.nii\.gz"):
        load_masked_data([paths[0], short])


def test_missing_map(tmp_path):
    with pytest.raises(MissingInputError, match="gone"):
        load_masked_data([tmp_path / "gone.nii.gz"])


def test_unmask_roundtrip():
    rng = np.random.default_rng(0)
    mask = rng.uniform(size=SHAPE) > 0.5
    values = rng.standard_normal((3, int(mask.sum()))).astype(np.float32)
    volumes = unmask(values, mask)
    assert volumes.shape == (*SHAPE, 3) and volumes.dtype == np.float32
    np.testing.assert_array_equal(volumes[mask].T, values)
    assert np.all(volumes[~mask] == 0)
    np.testing.assert_array_equal(unmask(values[0], mask)[mask], values[0])
    with pytest.raises(ValueError, match="do not fit"):
        unmask(values[:, :-1], mask)


@pytest.mark.skipif(not (REAL / "spm-faces16-words14").is_dir(), reason="real data absent")
def test_real_spm_pairs_with_nan_outside_mask():
    folder = REAL / "spm-faces16-words14" / "visual_stimulation"
    paths = sorted(folder.glob("subject_*/con_0006.img"))[:4]
    out = load_masked_data(paths, n_jobs=2)
    arrays = [nib.load(p).get_fdata(dtype=np.float32) for p in paths]
    expected = np.all([np.isfinite(a) & (a != 0) for a in arrays], axis=0)
    np.testing.assert_array_equal(out.mask, expected)
    np.testing.assert_array_equal(out.data, np.stack([a[expected] for a in arrays]))
    words = sorted((REAL / "spm-faces16-words14" / "auditory_stimulation").glob("*/Words_*.nii"))
    with pytest.raises(DataError, match="--resample"):
        load_masked_data([paths[0], words[0]])


@pytest.mark.parametrize("own_mapping", [False, True], ids=["np.empty", "own-mapping"])
@pytest.mark.parametrize("n_jobs", [1, 2])
def test_auto_mask_stacking_equals_the_naive_stack(tmp_path, n_jobs, own_mapping, monkeypatch):
    """Supports that shrink map after map (zeros, NaN slices): the data equal the naive
    ``stack[:, intersection]`` (the stacking compacts one buffer in place), whether the buffer
    is a numpy array or, as large ones are, an anonymous mapping of its own."""
    if own_mapping:
        monkeypatch.setattr(images, "_OWN_MAPPING_BYTES", 0)
    rng = np.random.default_rng(0)
    paths, volumes = [], []
    for i in range(30):
        volume = rng.normal(size=(9, 8, 7)).astype(np.float32)
        volume[rng.random(volume.shape) < 0.05] = 0
        if i % 7 == 3:
            volume[:, :, i % 7] = np.nan
        path = tmp_path / f"m{i}.nii.gz"
        nib.Nifti1Image(volume, np.eye(4)).to_filename(path)
        paths.append(path)
        volumes.append(volume)
    loaded = load_masked_data(paths, n_jobs=n_jobs)
    stack = np.stack(volumes)
    inside = (np.isfinite(stack) & (stack != 0)).all(axis=0)
    np.testing.assert_array_equal(loaded.mask, inside)
    np.testing.assert_array_equal(loaded.data, stack[:, inside])
    assert loaded.data.flags["C_CONTIGUOUS"] and loaded.data.flags["WRITEABLE"]
    assert loaded.data.dtype == np.float32


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_data_in_an_own_mapping_equal_the_naive_stack(tmp_path, n_jobs, monkeypatch):
    """Large data matrices live in an anonymous mapping of their own (no huge-page advice):
    kept as they are when no voxel drops (automatic mask) and filled in place with a user
    mask, they equal the naive stack and are an ordinary writeable float32 matrix."""
    monkeypatch.setattr(images, "_OWN_MAPPING_BYTES", 0)
    rng = np.random.default_rng(4)
    volumes = [rng.uniform(1, 2, SHAPE).astype(np.float32) for _ in range(6)]
    paths = [write_map(tmp_path / f"m{i}.nii.gz", v, AFFINE) for i, v in enumerate(volumes)]
    loaded = load_masked_data(paths, n_jobs=n_jobs)
    assert loaded.mask.all() and loaded.n_dropped == 0
    np.testing.assert_array_equal(loaded.data, np.stack([v.ravel() for v in volumes]))
    mask = _brain(shrink=0.2)
    mask_path = write_map(tmp_path / "mask.nii.gz", mask.astype(np.uint8), AFFINE)
    masked = load_masked_data(paths, mask_path=mask_path, n_jobs=n_jobs)
    np.testing.assert_array_equal(masked.data, np.stack([v[mask] for v in volumes]))
    for data in (loaded.data, masked.data):
        assert data.dtype == np.float32 and data.flags["C_CONTIGUOUS"]
        data[0, 0] = 7.0  # writeable, as np.empty's


def test_a_stream_without_decode_stacks_the_same(tmp_path):
    """A VolumeStream built without ``decode`` (only its ``volumes``) gives the same data: the
    per-map work then runs in the caller's thread."""
    paths, arrays = _maps(tmp_path, n=4)
    stream = images.open_volumes(paths, n_jobs=2)
    plain = images.stack_volumes(dataclasses.replace(stream, decode=None))
    threaded = images.stack_volumes(images.open_volumes(paths, n_jobs=2))
    np.testing.assert_array_equal(plain.data, threaded.data)
    np.testing.assert_array_equal(plain.mask, threaded.mask)
    assert plain.n_dropped == threaded.n_dropped
