"""The MNI152 template shipped with bids-group, and its resampling onto a data grid for display.

The package carries the ICBM 2009a nonlinear symmetric template (McConnell Brain Imaging Centre;
Fonov et al. 2009, 2011) at 2 mm on the usual MNI grid, brain-extracted, as 8-bit intensities, with
its brain mask (``bids_group/resources/templates/``, made by ``tools/make_mni_template.py``; the
licence is in the NOTICE file beside it). The report draws the maps over it when they are in an
MNI152 space (:func:`mni_space`): nothing is downloaded. It is never used in the statistics.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import nibabel as nib
import numpy as np
from scipy import ndimage

#: Name of the shipped template, as a BIDS space label (templateflow's spelling).
TEMPLATE_SPACE = "MNI152NLin2009aSym"
#: Maps whose ``space`` entity starts with this are taken to be in the template's world space.
MNI_SPACE_PREFIX = "MNI152"
_FOLDER = ("resources", "templates")
T1_FILE = f"tpl-{TEMPLATE_SPACE}_res-02_T1w.nii.gz"
MASK_FILE = f"tpl-{TEMPLATE_SPACE}_res-02_desc-brain_mask.nii.gz"


@dataclass(frozen=True)
class Template:
    """The T1 template and its brain mask on one grid.

    Attributes
    ----------
    t1 : ndarray of shape (nx, ny, nz), float32
        Intensity scaled to 0-1, 0 outside the brain.
    mask : ndarray of shape (nx, ny, nz), bool
        The brain.
    affine : ndarray of shape (4, 4)
        Voxel to MNI millimetres.
    """

    t1: np.ndarray
    mask: np.ndarray
    affine: np.ndarray


def _read(name: str) -> nib.Nifti1Image:
    packaged = resources.files("bids_group").joinpath(*_FOLDER, name)
    return nib.Nifti1Image.from_bytes(gzip.decompress(packaged.read_bytes()))


@lru_cache(maxsize=1)
def load_template() -> Template:
    """The shipped 2 mm template (91 x 109 x 91, RAS, origin (-90, -126, -72) mm); cached.

    >>> tpl = load_template()
    >>> tpl.t1.shape, tpl.mask.dtype, float(tpl.affine[0, 0])
    ((91, 109, 91), dtype('bool'), 2.0)
    """
    t1 = _read(T1_FILE)
    mask = _read(MASK_FILE)
    values = np.asarray(t1.dataobj, dtype=np.float32) / 255.0
    return Template(values, np.asarray(mask.dataobj) > 0, t1.affine.copy())


def mni_space(space: str | None) -> bool:
    """Whether a BIDS ``space`` label names an MNI152 space (any of its templates).

    The MNI152 templates (linear, nonlinear 6th generation, 2009a/b/c) differ by a few
    millimetres at most, which is immaterial for a background.

    >>> mni_space("MNI152NLin2009cAsym"), mni_space("MNI152NLin6Asym"), mni_space("T1w")
    (True, True, False)
    >>> mni_space(None), mni_space("MNI305")
    (False, False)
    """
    return bool(space) and str(space).startswith(MNI_SPACE_PREFIX)


def resample(
    volume: np.ndarray,
    source_affine: np.ndarray,
    target_affine: np.ndarray,
    shape: tuple[int, ...],
    *,
    order: int = 1,
) -> np.ndarray:
    """Values of ``volume`` at the voxel centres of a target grid (0 outside the source).

    Parameters
    ----------
    volume : ndarray of shape (nx, ny, nz)
    source_affine, target_affine : ndarray of shape (4, 4)
        Voxel to world millimetres, of the source volume and of the target grid.
    shape : tuple of int
        The target grid's first three dimensions.
    order : int
        Spline order: 0 nearest neighbour, 1 trilinear.

    Returns
    -------
    ndarray of shape shape[:3], float64

    >>> vol = np.arange(8.0).reshape(2, 2, 2)
    >>> shifted = np.eye(4); shifted[0, 3] = 0.5
    >>> resample(vol, np.eye(4), shifted, (1, 2, 2))[0]
    array([[2., 3.],
           [4., 5.]])
    """
    # target voxel -> world -> source voxel
    to_source = np.linalg.inv(np.asarray(source_affine, float)) @ np.asarray(target_affine, float)
    shape = tuple(int(n) for n in shape[:3])
    picks = _voxel_picks(to_source, shape)
    if picks is not None:
        return _take(np.asarray(volume, dtype=np.float64), picks, shape)
    return ndimage.affine_transform(
        np.asarray(volume, dtype=np.float64),
        to_source[:3, :3],
        offset=to_source[:3, 3],
        output_shape=shape,
        order=order,
        mode="constant",
        cval=0.0,
    )


def _voxel_picks(to_source: np.ndarray, shape: tuple[int, int, int]) -> list[np.ndarray] | None:
    """Source index of each target index along each axis, when every target voxel centre is a
    source voxel centre on an axis-aligned grid (the MNI 2 mm grid in any axis order of signs,
    or a subsampling of it); else None."""
    linear = to_source[:3, :3]
    scale, offset = np.diag(linear), to_source[:3, 3]
    aligned = np.allclose(linear, np.diag(scale), atol=1e-6)
    if not aligned or not np.allclose(
        np.r_[scale, offset], np.rint(np.r_[scale, offset]), atol=1e-6
    ):
        return None
    return [np.rint(scale[a] * np.arange(shape[a]) + offset[a]).astype(int) for a in range(3)]


def _take(volume: np.ndarray, picks: list[np.ndarray], shape: tuple[int, int, int]) -> np.ndarray:
    """``volume`` at the picked indices, 0 where a pick falls outside it (exact trilinear values
    at voxel centres, without interpolating: the common MNI grids cost an index, not a spline)."""
    inside = [(p >= 0) & (p < n) for p, n in zip(picks, volume.shape, strict=True)]
    out = np.zeros(shape, dtype=np.float64)
    out[np.ix_(*inside)] = volume[np.ix_(*[p[k] for p, k in zip(picks, inside, strict=True)])]
    return out


def template_on_grid(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The template's T1 (trilinear) and brain mask (more than half inside) on a data grid.

    For display only: a grid coarser than 2 mm samples the template without averaging.

    Returns
    -------
    (ndarray of float64, ndarray of bool), each of shape ``shape[:3]``
    """
    tpl = load_template()
    t1 = resample(tpl.t1, tpl.affine, affine, shape)
    inside = resample(tpl.mask.astype(np.float64), tpl.affine, affine, shape) > 0.5
    return np.where(inside, t1, 0.0), inside
