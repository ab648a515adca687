"""The shipped MNI152 template: its grid and anatomy, its display resampling, and the report rule.

Oracles: nilearn's own copy of the 1 mm ICBM 2009a template (the source) resampled by nilearn onto
our grid, nilearn's ``resample_to_img`` for the display resampling, and the published extent of
the MNI brain in millimetres.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from clicheck import run_ok

from bids_group.report.build import background_volume, report_background
from bids_group.templates import load_template, mni_space, resample, template_on_grid

MNI_2MM = np.array([[2.0, 0, 0, -90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])


def _voxel_mm(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def test_template_grid_and_values():
    tpl = load_template()
    assert tpl.t1.shape == tpl.mask.shape == (91, 109, 91)
    np.testing.assert_array_equal(tpl.affine, MNI_2MM)
    assert tpl.t1.dtype == np.float32 and tpl.mask.dtype == bool
    assert np.all(tpl.t1[~tpl.mask] == 0) and np.all(tpl.t1[tpl.mask] > 0)
    assert tpl.t1.max() <= 1.0
    # an adult brain (with cerebellum and brain stem cut at z = -72): about 1.9 litres
    assert 1.7e6 < tpl.mask.sum() * 8 < 2.1e6


def test_template_brain_extent_is_the_mni_brain():
    """The brain spans about x -72..72, y -106..72, z up to +82 mm in MNI space (any atlas)."""
    tpl = load_template()
    xyz = _voxel_mm(tpl.affine, np.argwhere(tpl.mask))
    low, high = xyz.min(axis=0), xyz.max(axis=0)
    np.testing.assert_allclose(low[:2], [-72, -106], atol=4)
    np.testing.assert_allclose(high, [72, 72, 82], atol=4)
    assert abs(xyz[:, 0].mean()) < 1.0  # a symmetric template


def test_template_matches_its_source_resampled_by_nilearn():
    datasets = pytest.importorskip("nilearn.datasets")
    from nilearn.image import resample_to_img

    tpl = load_template()
    target = nib.Nifti1Image(tpl.t1, tpl.affine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = resample_to_img(datasets.load_mni152_template(resolution=1), target,
                                 interpolation="linear", force_resample=True,
                                 copy_header=True)  # fmt: skip
    theirs = source.get_fdata()[tpl.mask]
    ours = tpl.t1[tpl.mask]
    # ours averages the 1 mm voxels under each 2 mm voxel; theirs samples them
    assert np.corrcoef(ours, theirs)[0, 1] > 0.97
    assert np.median(np.abs(ours - theirs)) < 0.03


def test_resample_puts_a_template_point_at_its_mm_coordinate():
    """On a flipped (LAS), shifted 4 mm grid, the voxel at a given mm point has its value."""
    tpl = load_template()
    point = np.array([24.0, -4.0, -18.0])  # right amygdala, a template voxel centre
    src = tuple(np.rint((point - tpl.affine[:3, 3]) / 2).astype(int))
    affine = np.array([[-4.0, 0, 0, 80], [0, 4, 0, -100], [0, 0, 4, -50], [0, 0, 0, 1]])
    shape = (40, 45, 35)
    t1, brain = template_on_grid(affine, shape)
    dst = tuple(np.rint(np.linalg.solve(affine[:3, :3], point - affine[:3, 3])).astype(int))
    np.testing.assert_allclose(_voxel_mm(affine, np.array(dst)), point)
    assert t1[dst] == pytest.approx(tpl.t1[src], abs=1e-6)
    assert brain[dst]
    # the top of the brain is still at z = 82 mm, within a voxel, and left stays left
    xyz = _voxel_mm(affine, np.argwhere(brain))
    assert abs(xyz[:, 2].max() - 82) <= 4
    left = _voxel_mm(affine, np.argwhere(brain & (t1 > 0)))[:, 0] < 0
    assert 0.4 < left.mean() < 0.6


def _oblique() -> np.ndarray:
    angle = np.deg2rad(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                         [0, 0, 1]])  # fmt: skip
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([3.0, -3.0, 3.5])
    affine[:3, 3] = [-85, 100, -60]
    return affine


GRIDS = {
    # interpolated: rotated, anisotropic, y flipped
    "oblique": (_oblique(), (60, 70, 45)),
    # on template voxel centres (indexed, not interpolated): FSL's LAS 2 mm grid...
    "fsl-2mm": (
        np.array([[-2.0, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]]),
        (91, 109, 91),
    ),  # fmt: skip
    # ... and a 4 mm grid reaching beyond the template on every side
    "wide-4mm": (
        np.array([[4.0, 0, 0, -110], [0, 4, 0, -150], [0, 0, -4, 130], [0, 0, 0, 1]]),
        (57, 68, 60),
    ),  # fmt: skip
    # axis-aligned but between template voxel centres (interpolated)
    "shifted-3mm": (
        np.array([[3.0, 0, 0, -91], [0, 3, 0, -125.5], [0, 0, 3, -70], [0, 0, 0, 1]]),
        (60, 72, 60),
    ),  # fmt: skip
}


@pytest.mark.parametrize("grid", list(GRIDS))
def test_resample_matches_nilearn(grid):
    image = pytest.importorskip("nilearn.image")
    tpl = load_template()
    affine, shape = GRIDS[grid]
    target = nib.Nifti1Image(np.zeros(shape, np.float32), affine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = image.resample_to_img(nib.Nifti1Image(tpl.t1, tpl.affine), target,
                                       interpolation="linear", force_resample=True,
                                       copy_header=True).get_fdata()  # fmt: skip
    ours = resample(tpl.t1, tpl.affine, affine, shape)
    assert np.abs(ours).sum() > 1e4  # the grid does cover the brain
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_mni_space_rule():
    assert mni_space("MNI152NLin2009cAsym") and mni_space("MNI152NLin6Asym")
    assert not any(mni_space(s) for s in (None, "", "T1w", "fsaverage", "MNI305", "mni152"))


def _toy(affine: np.ndarray, shape=(20, 24, 20)):
    rng = np.random.default_rng(0)
    mask = np.zeros(shape, bool)
    mask[3:-3, 3:-3, 3:-3] = True
    return rng.standard_normal((5, int(mask.sum()))), mask, affine


def test_report_background_uses_the_template_in_mni_space():
    data, mask, affine = _toy(np.array([[4.0, 0, 0, -40], [0, 4, 0, -60], [0, 0, 4, -20],
                                        [0, 0, 0, 1]]))  # fmt: skip
    bg = report_background(data, mask, affine, space="MNI152NLin2009cAsym")
    t1, brain = template_on_grid(affine, mask.shape)
    np.testing.assert_array_equal(bg.volume, t1)
    np.testing.assert_array_equal(bg.outline, brain)
    assert (
        bg.note.startswith("Background: the MNI152 template") and "MNI152NLin2009cAsym" in bg.note
    )
    assert "template" in bg.outline_note


@pytest.mark.parametrize(
    ("space", "shift", "why"),
    [
        (None, 0.0, "no MNI152 space"),
        ("T1w", 0.0, "space T1w is not an MNI152 space"),
        ("MNI152NLin6Asym", 400.0, "only 0% of the analysis mask"),
    ],
)
def test_report_background_falls_back_to_the_data(space, shift, why):
    affine = np.array([[4.0, 0, 0, -40 + shift], [0, 4, 0, -60], [0, 0, 4, -20], [0, 0, 0, 1]])
    data, mask, affine = _toy(affine)
    bg = report_background(data, mask, affine, space=space)
    np.testing.assert_array_equal(bg.volume, background_volume(data, mask))
    np.testing.assert_array_equal(bg.outline, mask)
    assert bg.note.startswith("Background: mean of |input maps|") and why in bg.note
    assert bg.outline_note == "Silhouette: the analysis mask."


def _captions(page: str) -> set[str]:
    return set(re.findall(r"Background: [^<]*", page))


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ("MNI152NLin2009cAsym", "Background: the MNI152 template (MNI152NLin2009aSym"),
        (None, "Background: mean of |input maps| over the analysis mask, since the maps name no"),
    ],
)
def test_cli_report_caption_names_the_background(bids_derivatives, tmp_path, space, expected):
    affine = np.array([[3.0, 0, 0, -30], [0, 3, 0, -40], [0, 0, 3, -10], [0, 0, 0, 1]])
    ds = bids_derivatives(n_subjects=6, shape=(20, 24, 20), space=space, affine=affine)
    summary, _ = run_ok(ds, tmp_path / "out", "--height-control", "none", "--threshold", "1")
    page = Path(summary["report"]).read_text(encoding="utf-8").replace("&#x27;", "'")
    captions = _captions(page)
    assert len(captions) == 1, captions
    assert captions.pop().startswith(expected)
    silhouette = "the MNI152 template's brain" if space else "the analysis mask"
    assert f"Silhouette: {silhouette}." in page


REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real"


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        # FSL's MNI 2 mm brain mask (6th generation): mostly in the 2009a template's brain
        ("pain21", "Background: the MNI152 template"),
        # NiMARE's 10-voxel crop keeps the full-grid affine: it sits at the corner of the box
        ("nimare-pain-crop", "only 0% of the analysis mask lies in the MNI152 template's brain"),
    ],
)
def test_real_masks_in_mni_space(folder, expected):
    path = REAL / folder / "mask.nii.gz"
    if not path.is_file():
        pytest.skip(f"real data absent: {path}")
    img = nib.load(path)
    mask = np.asarray(img.dataobj).reshape(img.shape[:3]) > 0
    data = np.ones((2, int(mask.sum())))
    background = report_background(data, mask, img.affine, space="MNI152NLin6Asym")
    assert expected in background.note
