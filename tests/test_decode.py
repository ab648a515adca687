"""Decoding maps: threads and the inflate library change nothing, bit for bit.

The oracle is nibabel's own read (``np.asanyarray(nib.load(path).dataobj)``) of real NIfTI files
written by nibabel, and Python's :mod:`gzip` for the inflated bytes.
"""

from __future__ import annotations

import gzip
import importlib.util
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_group import images
from bids_group.errors import DataError
from bids_group.images import load_masked_data, load_on_mask

SHAPE = (23, 27, 21)  # big enough for several deflate blocks per file
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
HAS_ISAL = importlib.util.find_spec("isal") is not None
INFLATERS = ["zlib", pytest.param("isal", marks=pytest.mark.skipif(not HAS_ISAL, reason="no isal"))]


def _module(name: str):
    if name == "zlib":
        return zlib
    from isal import isal_zlib

    return isal_zlib


def _smooth_noise(rng: np.random.Generator, shape=SHAPE) -> np.ndarray:
    """Values that compress somewhat (like real maps), zero at the borders, NaN in a corner."""
    data = rng.standard_normal(shape).cumsum(axis=0) + 3.0
    data[:2] = 0.0
    return data


def _write_kinds(folder: Path, n_each: int = 2, seed: int = 0) -> list[Path]:
    """float32, float64 big-endian, int16 with scl_slope/scl_inter, uint8, a 4-D single volume,
    NIfTI-2 and an uncompressed .nii: every storage nibabel writes that bids-group reads."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n_each):
        base = _smooth_noise(rng)
        with_nan = base.astype(np.float32)
        with_nan[-1, -1, :] = np.nan
        images_ = {
            f"f32-{i}.nii.gz": nib.Nifti1Image(with_nan, AFFINE),
            f"f64be-{i}.nii.gz": nib.Nifti1Image(base.astype(">f8"), AFFINE),
            f"u8-{i}.nii.gz": nib.Nifti1Image(np.clip(base * 20, 0, 255).astype(np.uint8), AFFINE),
            f"4d-{i}.nii.gz": nib.Nifti1Image(base[..., None].astype(np.float32), AFFINE),
            f"two-{i}.nii.gz": nib.Nifti2Image(base.astype(np.float32), AFFINE),
            f"plain-{i}.nii": nib.Nifti1Image(base.astype(np.float32), AFFINE),
        }
        scaled = nib.Nifti1Image(np.round(base * 100).astype(np.int16), AFFINE)
        scaled.header.set_slope_inter(0.01, -0.5)
        images_[f"i16-{i}.nii.gz"] = scaled
        for name, img in images_.items():
            img.to_filename(folder / name)
            paths.append(folder / name)
    return paths


def _nibabel_read(path: Path) -> np.ndarray:
    """nibabel's normal read as float32 on the 3-D grid (what bids-group promises to return)."""
    return np.asanyarray(nib.load(path).dataobj).reshape(SHAPE).astype(np.float32)


def _bits(a: np.ndarray) -> np.ndarray:
    """The float32 bit patterns (NaN payloads included), for bit-for-bit comparisons."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("inflater", INFLATERS)
def test_every_storage_decodes_as_nibabel_reads_it(tmp_path, monkeypatch, inflater):
    monkeypatch.setattr(images, "INFLATE", _module(inflater))
    for path in _write_kinds(tmp_path, n_each=1):
        ours = images._read_array(path)
        assert ours.dtype == np.float32 and ours.shape == SHAPE
        np.testing.assert_array_equal(_bits(ours), _bits(_nibabel_read(path)), err_msg=path.name)


@pytest.mark.parametrize("inflater", INFLATERS)
def test_parallel_decode_equals_serial_bit_for_bit(tmp_path, monkeypatch, inflater):
    monkeypatch.setattr(images, "INFLATE", _module(inflater))
    paths = _write_kinds(tmp_path)
    serial = load_masked_data(paths, n_jobs=1)
    parallel = load_masked_data(paths, n_jobs=4)
    assert serial.data.shape == (len(paths), serial.mask.sum()) and serial.mask.sum() > 1000
    np.testing.assert_array_equal(_bits(parallel.data), _bits(serial.data))
    np.testing.assert_array_equal(parallel.mask, serial.mask)
    expected = np.stack([_nibabel_read(p)[serial.mask] for p in paths])
    np.testing.assert_array_equal(_bits(serial.data), _bits(expected))
    # load_on_mask keeps non-finite values: NaN payloads must survive too
    with_nan = [p for p in paths if p.name.startswith("f32")] * 3
    on_mask = load_masked_data(with_nan[:1], n_jobs=1)
    full = type(on_mask)(
        data=on_mask.data,
        mask=np.ones(SHAPE, dtype=bool),
        affine=on_mask.affine,
        voxel_size=on_mask.voxel_size,
    )
    one = load_on_mask(with_nan, full, n_jobs=1)
    three = load_on_mask(with_nan, full, n_jobs=3)
    assert np.isnan(one).any()
    np.testing.assert_array_equal(_bits(one), _bits(three))
    np.testing.assert_array_equal(_bits(one[0]), _bits(_nibabel_read(with_nan[0]).ravel()))


@pytest.mark.parametrize("inflater", INFLATERS)
def test_gunzip_equals_python_gzip_including_several_members(tmp_path, inflater):
    rng = np.random.default_rng(5)
    raw = _smooth_noise(rng).astype(np.float32).tobytes()
    for blob in (
        gzip.compress(raw, compresslevel=1),
        gzip.compress(raw, compresslevel=9),
        gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]),  # two members, as `cat a.gz b.gz`
    ):
        assert images._gunzip(blob, tmp_path / "x.nii.gz", _module(inflater)) == raw


@pytest.mark.parametrize("inflater", INFLATERS)
def test_corrupt_gzip_is_named_whichever_inflater(tmp_path, inflater):
    blob = gzip.compress(np.arange(5000, dtype=np.float32).tobytes())
    bad_crc = blob[:-8] + bytes([blob[-8] ^ 1]) + blob[-7:]
    for what, data in (("truncated", blob[:-3]), ("not a valid gzip", bad_crc)):
        with pytest.raises(DataError, match=f"bad.nii.gz is {what}"):
            images._gunzip(data, Path("bad.nii.gz"), _module(inflater))


@pytest.mark.skipif(not HAS_ISAL, reason="no isal (the 'fast' extra)")
def test_isal_is_used_when_installed():
    from isal import isal_zlib

    assert images.INFLATE is isal_zlib


def _odd_headers(folder: Path) -> dict[str, Path]:
    """Headers nibabel reads in other ways: qform only, no orientation code, an extension, a
    NIfTI pair, a gzip member with a long file name in its header."""
    rng = np.random.default_rng(9)
    data = rng.standard_normal(SHAPE).astype(np.float32)
    rotated = np.array([[0, -2.0, 0, 10], [2.5, 0, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    qform = nib.Nifti1Image(data, None)
    qform.set_qform(rotated, code=1)
    qform.set_sform(np.eye(4), code=0)
    bare = nib.Nifti1Image(data, None)
    bare.set_qform(None, code=0)
    bare.set_sform(None, code=0)
    extended = nib.Nifti1Image(data, rotated)
    extended.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"a comment"))
    out = {}
    for name, img in {
        "qform.nii.gz": qform,
        "bare.nii": bare,
        "extended.nii.gz": extended,
        "pair.img": nib.Nifti1Pair(data, rotated),
        "two-be.nii.gz": nib.Nifti2Image(data.astype(">f4"), rotated),
    }.items():
        img.to_filename(folder / name)
        out[name] = folder / name
    raw = gzip.decompress((folder / "qform.nii.gz").read_bytes())
    named = folder / "named.nii.gz"
    with gzip.GzipFile(filename="x" * 3000, mode="wb", fileobj=named.open("wb")) as f:
        f.write(raw)
    out["named.nii.gz"] = named
    return out


def test_grid_from_the_header_equals_nib_load(tmp_path):
    paths = _write_kinds(tmp_path, n_each=1)
    odd = _odd_headers(tmp_path)
    for path in [*paths, *odd.values()]:
        img = nib.load(path)
        grid = images._read_grid(path)
        assert grid.shape == img.shape[:3], path.name
        np.testing.assert_array_equal(grid.affine, img.affine, err_msg=path.name)
    # the fast path reads plain files, and leaves extensions and pairs to nib.load
    assert all(images._single_file_nifti_header(p) is not None for p in paths)
    assert images._single_file_nifti_header(odd["named.nii.gz"]) is not None
    assert images._single_file_nifti_header(odd["extended.nii.gz"]) is None
    assert images._single_file_nifti_header(odd["pair.img"]) is None
