"""Make the 2 mm MNI152 template shipped in ``bids_group/resources/templates/``.

Usage::

    python tools/make_mni_template.py SOURCE_DIR

``SOURCE_DIR`` holds ``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``: the ICBM 2009a
nonlinear symmetric T1 template, 1 mm, brain-extracted, 8-bit (nilearn ships it in
``nilearn/datasets/data/``). The script is run once by a developer; nilearn is not a dependency of
bids-group. Deterministic: the same input gives the same bytes (gzip mtime 0).

Output grid: the usual MNI 2 mm grid (FSL's ``MNI152_T1_2mm``: 91 x 109 x 91 voxels, voxel centres
at x = -90..90, y = -126..90, z = -72..108 mm), stored in RAS order.

* ``..._T1w.nii.gz``: the T1 intensity (uint8, 0 outside the brain mask).
* ``..._desc-brain_mask.nii.gz``: the brain mask (uint8 0/1): the non-zero voxels of the source
  (it is brain-extracted), holes filled, then more than half of each 2 mm voxel inside.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

SOURCE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
TARGET = Path(__file__).resolve().parents[1] / "bids_group" / "resources" / "templates"
T1_NAME = "tpl-MNI152NLin2009aSym_res-02_T1w.nii.gz"
MASK_NAME = "tpl-MNI152NLin2009aSym_res-02_desc-brain_mask.nii.gz"
AFFINE = np.array([[2.0, 0, 0, -90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])
SHAPE = (91, 109, 91)
#: A 2 mm voxel centred on a 1 mm voxel covers it fully and half of each neighbour.
KERNEL = np.array([0.25, 0.5, 0.25])


def downsample(volume: np.ndarray, source_affine: np.ndarray) -> np.ndarray:
    """Average of the 1 mm voxels under each 2 mm voxel of :data:`AFFINE` (separable kernel)."""
    if not np.allclose(source_affine[:3, :3], np.eye(3)):
        raise SystemExit("the source template must be on a 1 mm RAS grid")
    smooth = np.asarray(volume, dtype=np.float64)
    for axis in range(3):
        smooth = ndimage.convolve1d(smooth, KERNEL, axis=axis, mode="constant")
    start = np.rint(AFFINE[:3, 3] - source_affine[:3, 3]).astype(int)
    picks = tuple(slice(s, s + 2 * n, 2) for s, n in zip(start, SHAPE, strict=True))
    out = smooth[picks]
    if out.shape != SHAPE:
        raise SystemExit(f"the source grid does not cover the MNI 2 mm box: {out.shape}")
    return out


def save(data: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(data.astype(np.uint8), AFFINE)
    img.header.set_xyzt_units("mm")
    img.header.set_sform(AFFINE, code=4)  # 4: MNI152
    img.header.set_qform(AFFINE, code=4)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=9, mtime=0))


def main(source_dir: Path) -> None:
    img = nib.load(source_dir / SOURCE)
    t1 = np.asarray(img.dataobj, dtype=np.float64)
    brain = ndimage.binary_fill_holes(t1 > 0)
    mask = downsample(brain, img.affine) > 0.5
    # Averaging with the zeros outside the brain darkens the rim: divide by the brain fraction.
    fraction = downsample(brain, img.affine)
    mean_t1 = downsample(t1, img.affine) / np.where(fraction > 0, fraction, 1.0)
    save(np.where(mask, np.clip(np.rint(mean_t1), 1, 255), 0), TARGET / T1_NAME)
    save(mask, TARGET / MASK_NAME)
    print(TARGET / T1_NAME, TARGET / MASK_NAME, int(mask.sum()), "brain voxels")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
