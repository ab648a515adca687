"""Generate ``examples/ds-faces``: a small synthetic BIDS derivatives dataset of first-level maps.

Usage::

    python examples/make_example_dataset.py [OUT_DIR]   # default: examples/ds-faces

Deterministic: the same numpy / zlib versions give the same bytes (fixed seed, gzip mtime 0).
The ground truth written into the maps is in :data:`EFFECTS` and in the dataset's README.md.
"""

from __future__ import annotations

import gzip
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from bids_group.templates import TEMPLATE_SPACE, template_on_grid

SEED = 20240601
N_SUBJECTS = 20
TASK = "faces"
SPACE = "MNI152NLin2009cAsym"
CONTRASTS = ("faces", "scrambled")
#: 4 mm grid: every other voxel of the 2 mm MNI grid of the template shipped with bids-group
#: (RAS, voxel centres at x = -90..86, y = -126..86, z = -72..104 mm).
SHAPE = (45, 54, 45)
AFFINE = np.array([[4.0, 0, 0, -90.0], [0, 4.0, 0, -126.0], [0, 0, 4.0, -72.0], [0, 0, 0, 1.0]])
#: Noise: white noise smoothed with a Gaussian of this FWHM, then scaled to unit SD.
NOISE_FWHM_MM = 10.0
NOISE_SD = 1.0
#: Blobs are Gaussians of this FWHM (peak value = amplitude).
BLOB_FWHM_MM = 16.0
#: Values keep 11 significant bits (relative truncation error < 1e-3) so the maps compress.
KEPT_MANTISSA_BITS = 11


@dataclass(frozen=True)
class Effect:
    """A true effect: ``amplitude * covariate`` in a Gaussian blob centred at ``center_mm``."""

    name: str
    contrasts: tuple[str, ...]
    center_mm: tuple[float, float, float]
    amplitude: float
    covariate: str  # "1" (group mean), "patient" (1 for patients, 0 for controls), "age_c"


EFFECTS: tuple[Effect, ...] = (
    Effect("early visual cortex", ("faces", "scrambled"), (0.0, -90.0, 2.0), 1.5, "1"),
    Effect("left fusiform face area", ("faces",), (-40.0, -54.0, -20.0), 1.2, "1"),
    Effect("right fusiform face area", ("faces",), (40.0, -54.0, -20.0), 1.5, "1"),
    Effect("right amygdala, patients > controls", ("faces",), (24.0, -4.0, -18.0), 3.0, "patient"),
    Effect("medial prefrontal, per year of age", CONTRASTS, (0.0, 50.0, 10.0), -0.09, "age_c"),
)


def participants(rng: np.random.Generator) -> list[dict[str, object]]:
    """20 subjects: age 20-65, sex, group (10 patients, 10 controls)."""
    ages = rng.integers(20, 66, N_SUBJECTS)
    sexes = rng.permutation(np.array(["F", "M"] * (N_SUBJECTS // 2)))
    groups = rng.permutation(np.array(["control", "patient"] * (N_SUBJECTS // 2)))
    return [
        {
            "participant_id": f"sub-{i + 1:02d}",
            "age": int(ages[i]),
            "sex": str(sexes[i]),
            "group": str(groups[i]),
        }
        for i in range(N_SUBJECTS)
    ]


def _world_coordinates() -> np.ndarray:
    ijk = np.indices(SHAPE, dtype=np.float64).reshape(3, -1)
    xyz = AFFINE[:3, :3] @ ijk + AFFINE[:3, 3:]
    return xyz.reshape(3, *SHAPE)


def brain_mask() -> np.ndarray:
    """The brain mask of the shipped MNI152 template on the grid (zeros outside it)."""
    return template_on_grid(AFFINE, SHAPE)[1]


def blob(center_mm: tuple[float, float, float]) -> np.ndarray:
    """Gaussian of FWHM :data:`BLOB_FWHM_MM`, peak 1, on the grid."""
    xyz = _world_coordinates()
    sigma = BLOB_FWHM_MM / np.sqrt(8 * np.log(2))
    d2 = sum((xyz[a] - center_mm[a]) ** 2 for a in range(3))
    return np.exp(-d2 / (2 * sigma**2))


def smooth_noise(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    white = rng.standard_normal(SHAPE)
    sigma_vox = NOISE_FWHM_MM / np.sqrt(8 * np.log(2)) / AFFINE[0, 0]
    noise = ndimage.gaussian_filter(white, sigma_vox, mode="constant")
    return noise / noise[mask].std() * NOISE_SD


def truncate_mantissa(values: np.ndarray) -> np.ndarray:
    """Zero the low mantissa bits of float32 values (never turns a non-zero into zero)."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    keep = np.uint32((0xFFFFFFFF << (23 - KEPT_MANTISSA_BITS + 1)) & 0xFFFFFFFF)
    return (bits & keep).view(np.float32)


def write_nifti_gz(path: Path, data: np.ndarray) -> None:
    img = nib.Nifti1Image(data.astype(np.float32), AFFINE)
    img.header.set_xyzt_units("mm")
    img.header.set_sform(AFFINE, code=4)  # 4: MNI152
    img.header.set_qform(AFFINE, code=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=9, mtime=0))


def subject_maps(
    rng: np.random.Generator, people: list[dict[str, object]]
) -> dict[tuple[str, str], np.ndarray]:
    mask = brain_mask()
    mean_age = float(np.mean([p["age"] for p in people]))
    blobs = {e.name: blob(e.center_mm) for e in EFFECTS}
    maps = {}
    for person in people:
        label = str(person["participant_id"])[4:]
        covariates = {
            "1": 1.0,
            "patient": float(person["group"] == "patient"),
            "age_c": float(person["age"]) - mean_age,
        }
        for contrast in CONTRASTS:
            signal = sum(
                e.amplitude * covariates[e.covariate] * blobs[e.name]
                for e in EFFECTS
                if contrast in e.contrasts
            )
            values = truncate_mantissa(signal + smooth_noise(rng, mask))
            values[~mask] = 0.0
            maps[(label, contrast)] = values
    return maps


def map_path(root: Path, subject: str, contrast: str) -> Path:
    name = f"sub-{subject}_task-{TASK}_space-{SPACE}_contrast-{contrast}_stat-effect_statmap.nii.gz"
    return root / f"sub-{subject}" / "func" / name


def make_dataset(root: Path) -> None:
    """Write the whole dataset under ``root`` (created; existing files overwritten)."""
    rng = np.random.default_rng(SEED)
    people = participants(rng)
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / "dataset_description.json", DESCRIPTION)
    columns = ["participant_id", "age", "sex", "group"]
    rows = ["\t".join(columns)] + ["\t".join(str(p[c]) for c in columns) for p in people]
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    _write_json(root / "participants.json", PARTICIPANTS_SIDECAR)
    for (subject, contrast), values in subject_maps(rng, people).items():
        write_nifti_gz(map_path(root, subject, contrast), values)
    (root / "README.md").write_text(readme(people))


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


DESCRIPTION = {
    "Name": "ds-faces: synthetic first-level maps for bids-group examples and tests",
    "BIDSVersion": "1.9.0",
    "DatasetType": "derivative",
    "License": "CC0",
    "GeneratedBy": [
        {
            "Name": "bids-group make_example_dataset.py",
            "Description": "Synthetic subject-level effect maps with known group effects",
            "CodeURL": "https://github.com/bids-group/bids-group",
        }
    ],
}

PARTICIPANTS_SIDECAR = {
    "age": {"Description": "age at scan", "Units": "year"},
    "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
    "group": {
        "Description": "diagnostic group",
        "Levels": {"control": "healthy control", "patient": "patient"},
    },
}


def readme(people: list[dict[str, object]]) -> str:
    n_patients = sum(p["group"] == "patient" for p in people)
    mean_age = np.mean([p["age"] for p in people])
    effect_rows = "\n".join(
        f"| {e.name} | {', '.join(e.contrasts)} | ({', '.join(f'{c:g}' for c in e.center_mm)}) "
        f"| {e.amplitude:g} | {COVARIATE_TEXT[e.covariate]} |"
        for e in EFFECTS
    )
    return f"""# ds-faces: synthetic first-level maps (bids-group example)

Made by `examples/make_example_dataset.py` (seed {SEED}); re-running it rewrites the same bytes.
**Synthetic**: no real subject was scanned. Licence CC0.

## Contents
* `participants.tsv`: {N_SUBJECTS} subjects, `age` (years, mean {mean_age:.2f}), `sex` (F/M),
  `group` ({n_patients} `patient`, {N_SUBJECTS - n_patients} `control`); no missing values.
* `sub-XX/func/sub-XX_task-{TASK}_space-{SPACE}_contrast-<c>_stat-effect_statmap.nii.gz`:
  one effect (beta) map per subject and contrast, `<c>` in {{{", ".join(CONTRASTS)}}}.
* Grid: {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} voxels of 4 mm, RAS, origin (-90, -126, -72) mm: every
  other voxel of the 2 mm MNI grid.
* Support: the brain mask of the MNI152 template shipped with bids-group ({TEMPLATE_SPACE}, ICBM
  2009a nonlinear symmetric; its licence is in bids-group's NOTICE) sampled on that grid,
  {int(brain_mask().sum())} voxels; exactly 0 outside. The space label {SPACE} names the
  template family the coordinates below refer to (the 2009a and 2009c templates differ by a few
  millimetres at most).

## How the maps were made
value = sum of true effects + noise, where the noise is white Gaussian noise smoothed with a
{NOISE_FWHM_MM:g} mm FWHM Gaussian and scaled to SD {NOISE_SD:g} inside the brain mask
(independent per subject and contrast). Values keep {KEPT_MANTISSA_BITS} significant bits
(truncated: relative error < 1e-3) so the files compress. Every effect is a Gaussian blob of
{BLOB_FWHM_MM:g} mm FWHM whose peak value is `amplitude x covariate`:

| region | contrasts | centre (mm) | amplitude | covariate |
|---|---|---|---|---|
{effect_rows}

The fusiform and amygdala centres lie in the template's grey matter; the midline centres (early
visual, medial prefrontal) lie between the two medial walls, so each of those blobs covers the
grey matter of both hemispheres. Signal and noise are 0 outside the brain mask.

So a one-sample t-test of `faces` finds early visual cortex and both fusiform areas; the
`patient - control` contrast finds the right amygdala (faces only); `age` (centred) finds a
negative effect in medial prefrontal cortex in both contrasts; `faces - scrambled` finds
the fusiform areas (and the amygdala group effect) but not early visual cortex. In a
one-sample test (no group regressor) the amygdala shows half the patient effect, since half
of the subjects are patients.
"""


COVARIATE_TEXT = {
    "1": "1 (every subject)",
    "patient": "1 for patients, 0 for controls",
    "age_c": "age - mean age (years)",
}


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "ds-faces"
    make_dataset(target)
    print(target)
