"""NIfTI maps: real round trips through nibabel (values, NaN outside mask, affine, intent)."""

from __future__ import annotations

import gzip
import json
import threading

import nibabel as nib
import numpy as np
import pytest

from bids_group.outputs import maps
from bids_group.outputs.maps import MapWriter, fill_volume, write_mask, write_statmap


@pytest.fixture
def grid():
    rng = np.random.default_rng(0)
    mask = rng.random((7, 8, 9)) > 0.4
    affine = np.array(
        [[-2.0, 0.1, 0, 90], [0, 2.5, 0.2, -126], [0, 0, 3.0, -72], [0, 0, 0, 1]], dtype=float
    )
    values = rng.standard_normal(mask.sum())
    return mask, affine, values


def test_round_trip_values_affine_intent_and_sidecar(tmp_path, grid):
    mask, affine, values = grid
    path = tmp_path / "contrast-a_stat-t_statmap.nii.gz"
    out = write_statmap(
        path,
        values,
        mask=mask,
        affine=affine,
        sidecar={"Dof": np.float64(12)},
        stat="t",
        dof=(12.0,),
    )
    assert out == path
    img = nib.load(path)
    assert img.get_data_dtype() == np.float32
    data = img.get_fdata(dtype=np.float64)
    np.testing.assert_array_equal(data[mask], values.astype(np.float32))
    assert np.isnan(data[~mask]).all()
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    assert int(img.header["sform_code"]) == 2
    assert int(img.header["qform_code"]) == 2
    np.testing.assert_allclose(img.header.get_zooms(), np.sqrt((affine[:3, :3] ** 2).sum(0)))
    assert img.header.get_intent() == ("t test", (12.0,), "t")
    assert img.header["descrip"].tobytes().rstrip(b"\0") == b"bids-group stat-t"
    assert json.loads((tmp_path / "contrast-a_stat-t_statmap.json").read_text()) == {"Dof": 12.0}


@pytest.mark.parametrize(
    ("stat", "dof", "intent"),
    [
        ("F", (2.0, 30.0), ("f test", (2.0, 30.0), "F")),
        ("z", (30.0,), ("z score", (), "z")),  # dof of the contrast ignored for z
        ("p", (), ("p value", (), "p")),
        ("effect", (30.0,), ("estimate", (), "effect")),
        ("variance", (30.0,), ("none", (), "")),
        ("logp", (), ("none", (), "")),
    ],
)
def test_intent_codes(tmp_path, grid, stat, dof, intent):
    mask, affine, values = grid
    path = tmp_path / f"contrast-a_stat-{stat}_statmap.nii.gz"
    write_statmap(path, values, mask=mask, affine=affine, sidecar={}, stat=stat, dof=dof)
    assert nib.load(path).header.get_intent() == intent


def test_t_and_f_need_their_dofs(tmp_path, grid):
    mask, affine, values = grid
    with pytest.raises(ValueError, match="degrees of freedom"):
        write_statmap(
            tmp_path / "x.nii.gz",
            values,
            mask=mask,
            affine=affine,
            sidecar={},
            stat="F",
            dof=(3.0,),
        )
    with pytest.raises(ValueError, match="degrees of freedom"):
        write_statmap(tmp_path / "x.nii.gz", values, mask=mask, affine=affine, sidecar={}, stat="t")


def test_bytes_identical_to_nibabel_writer(tmp_path, grid):
    """Our fast path writes exactly what nibabel writes for the same header and data."""
    mask, affine, values = grid
    ours = tmp_path / "ours.nii.gz"
    write_statmap(ours, values, mask=mask, affine=affine, sidecar={}, stat="t", dof=(9.0,))
    header = maps.nifti_header(
        mask.shape, affine, stat="t", dof=(9.0,), description="bids-group stat-t"
    )
    theirs = tmp_path / "theirs.nii.gz"
    nib.Nifti1Image(fill_volume(values, mask), None, header).to_filename(theirs)
    assert gzip.decompress(ours.read_bytes()) == gzip.decompress(theirs.read_bytes())
    plain = tmp_path / "plain.nii"
    write_statmap(plain, values, mask=mask, affine=affine, sidecar={}, stat="t", dof=(9.0,))
    assert plain.read_bytes() == gzip.decompress(ours.read_bytes())


def test_volume_input_still_masked_and_nonfinite_kept(tmp_path, grid):
    mask, affine, _ = grid
    volume = np.full(mask.shape, 5.0)
    volume[np.argwhere(mask)[0][0], np.argwhere(mask)[0][1], np.argwhere(mask)[0][2]] = np.inf
    path = tmp_path / "v.nii.gz"
    write_statmap(path, volume, mask=mask, affine=affine, sidecar={}, stat="F", dof=(1, 2))
    data = np.asanyarray(nib.load(path).dataobj)
    assert np.isnan(data[~mask]).all()
    assert np.isposinf(data[mask]).sum() == 1
    assert (data[mask][1:] == 5).all()


def test_shape_and_mask_errors(tmp_path, grid):
    mask, affine, values = grid
    with pytest.raises(ValueError, match="in-mask voxels"):
        write_statmap(tmp_path / "x.nii.gz", values[:-1], mask=mask, affine=affine, sidecar={})
    with pytest.raises(ValueError, match="boolean"):
        write_statmap(
            tmp_path / "x.nii.gz", values, mask=mask.astype(int), affine=affine, sidecar={}
        )
    with pytest.raises(ValueError, match="4x4"):
        write_statmap(tmp_path / "x.nii.gz", values, mask=mask, affine=affine[:3], sidecar={})


def test_qform_matches_a_shear_free_affine(tmp_path, grid):
    mask, _, values = grid
    affine = np.array([[-2.0, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])
    path = tmp_path / "x.nii.gz"
    write_statmap(path, values, mask=mask, affine=affine, sidecar={})
    header = nib.load(path).header
    np.testing.assert_allclose(header.get_qform(), affine, atol=1e-6)
    np.testing.assert_allclose(header.get_sform(), affine)


def test_outside_mask_nan_is_an_all_ones_byte_run_and_fill_can_be_zero(tmp_path, grid):
    mask, affine, values = grid
    write_statmap(tmp_path / "n.nii.gz", values, mask=mask, affine=affine, sidecar={})
    raw = np.asanyarray(nib.load(tmp_path / "n.nii.gz").dataobj)
    assert (raw[~mask].view(np.uint32) == 0xFFFFFFFF).all()
    write_statmap(tmp_path / "z.nii.gz", values, mask=mask, affine=affine, sidecar={}, fill=0.0)
    data = np.asanyarray(nib.load(tmp_path / "z.nii.gz").dataobj)
    assert (data[~mask] == 0).all()
    np.testing.assert_array_equal(data[mask], values.astype(np.float32))


def test_input_xform_codes_kept(tmp_path, grid):
    mask, affine, values = grid
    path = tmp_path / "x.nii.gz"
    write_statmap(path, values, mask=mask, affine=affine, sidecar={}, xform_codes=(1, 4))
    header = nib.load(path).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 4)


def test_write_mask_uint8(tmp_path, grid):
    mask, affine, _ = grid
    path = write_mask(tmp_path / "mask.nii.gz", mask, affine, sidecar={"Type": "Brain"})
    img = nib.load(path)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), mask.astype(np.uint8))
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    assert json.loads((tmp_path / "mask.json").read_text()) == {"Type": "Brain"}


def test_map_writer_parallel_round_trip(tmp_path, grid):
    mask, affine, values = grid
    with MapWriter(n_jobs=3) as writer:
        futures = [
            writer.submit(
                tmp_path / f"m{i}.nii.gz", values * i, mask=mask, affine=affine, sidecar={"i": i}
            )
            for i in range(6)
        ]
        writer.submit_mask(tmp_path / "mask.nii.gz", mask, affine)
    assert all(f.done() for f in futures)
    for i in range(6):
        data = nib.load(tmp_path / f"m{i}.nii.gz").get_fdata()
        np.testing.assert_array_equal(data[mask], (values * i).astype(np.float32))


def test_map_writer_close_raises_first_error_in_submission_order(tmp_path, grid):
    mask, affine, values = grid
    writer = MapWriter(n_jobs=2)
    writer.submit(tmp_path / "ok.nii.gz", values, mask=mask, affine=affine, sidecar={})
    writer.submit(tmp_path / "no" / "first.nii.gz", values, mask=mask, affine=affine, sidecar={})
    writer.submit(tmp_path / "bad.nii.gz", values[:2], mask=mask, affine=affine, sidecar={})
    with pytest.raises(FileNotFoundError, match="first"):
        writer.close()
    assert (tmp_path / "ok.nii.gz").exists()
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(tmp_path / "late.nii.gz", values, mask=mask, affine=affine, sidecar={})


def test_map_writer_block_error_wins_and_pool_stops(tmp_path, grid):
    mask, affine, values = grid
    with pytest.raises(KeyError):
        with MapWriter(n_jobs=1) as writer:
            writer.submit(
                tmp_path / "no" / "x.nii.gz", values, mask=mask, affine=affine, sidecar={}
            )
            raise KeyError("from the block")
    assert not any(t.name.startswith("mapwriter") for t in threading.enumerate())


def test_map_writer_rejects_zero_jobs():
    with pytest.raises(ValueError, match="n_jobs"):
        MapWriter(n_jobs=0)


def test_several_rows_make_a_4d_map(tmp_path):
    """An F contrast's effect has one row per contrast row: written as one volume per row."""
    mask = np.zeros((3, 4, 5), bool)
    mask[1:, 1:3, 2:] = True
    rows = np.arange(2 * mask.sum(), dtype=np.float32).reshape(2, -1)
    path = write_statmap(
        tmp_path / "contrast-x_stat-effect_statmap.nii.gz",
        rows,
        mask=mask,
        affine=np.eye(4),
        sidecar={},
        stat="effect",
    )
    data = np.asarray(nib.load(path).dataobj)
    assert data.shape == (3, 4, 5, 2)
    for k in range(2):
        np.testing.assert_array_equal(data[..., k][mask], rows[k])
        assert np.isnan(data[..., k][~mask]).all()
