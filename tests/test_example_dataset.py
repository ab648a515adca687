"""The shipped example dataset is what its generator makes, and bids-group can read it."""

from __future__ import annotations

import gzip
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from bids_group.images import load_masked_data
from bids_group.inputs import collect_inputs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DATASET = EXAMPLES / "ds-faces"


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_example_dataset", EXAMPLES / "make_example_dataset.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator():
    return _generator()


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_shipped_dataset_is_what_the_generator_makes(tmp_path, generator):
    generator.make_dataset(tmp_path / "ds")
    assert _files(tmp_path / "ds") == _files(DATASET)
    for rel in _files(DATASET):
        shipped, fresh = (DATASET / rel).read_bytes(), (tmp_path / "ds" / rel).read_bytes()
        if rel.name.endswith(".gz"):
            # compare the NIfTI bytes: compressed bytes may vary with the zlib version
            shipped, fresh = gzip.decompress(shipped), gzip.decompress(fresh)
        assert shipped == fresh, rel


def test_dataset_is_small():
    assert sum((DATASET / p).stat().st_size for p in _files(DATASET)) < 4_000_000


def test_readable_by_collect_inputs_and_load_masked_data(generator):
    inputs = collect_inputs(DATASET)
    assert len(inputs.maps) == 2 * generator.N_SUBJECTS
    assert {m.entities["contrast"] for m in inputs.maps} == set(generator.CONTRASTS)
    assert inputs.participants.shape == (generator.N_SUBJECTS, 3)
    assert inputs.participants["age"].dtype.kind in "if"
    assert sorted(inputs.participants["group"].unique()) == ["control", "patient"]
    faces = [m for m in inputs.maps if m.entities["contrast"] == "faces"]
    data = load_masked_data([m.path for m in faces])
    np.testing.assert_array_equal(data.mask, generator.brain_mask())
    np.testing.assert_allclose(data.affine, generator.AFFINE)
    assert data.n_dropped == 0


def test_true_effects_are_recovered(generator):
    """OLS estimates at the blob centres are near the amplitudes written in the README."""
    inputs = collect_inputs(DATASET, input_filters={"contrast": "faces"})
    data = load_masked_data([m.path for m in inputs.maps])
    table = inputs.participants.loc[[m.entities["subject"] for m in inputs.maps]]
    design = np.column_stack(
        [
            np.ones(len(table)),
            (table["group"] == "patient").to_numpy(float),
            table["age"].to_numpy(float) - table["age"].mean(),
        ]
    )
    beta, *_ = np.linalg.lstsq(design, data.data.astype(np.float64), rcond=None)
    voxels = np.argwhere(data.mask)
    column = {"1": 0, "patient": 1, "age_c": 2}
    for effect in generator.EFFECTS:
        ijk = np.round(np.linalg.solve(generator.AFFINE, [*effect.center_mm, 1.0])[:3])
        j = int(np.flatnonzero((voxels == ijk).all(axis=1))[0])
        estimate = beta[column[effect.covariate], j]
        # noise SD 1: SE of the mean ~0.23, of the group difference ~0.46, of the slope ~0.02
        tolerance = {"1": 0.8, "patient": 1.5, "age_c": 0.06}[effect.covariate]
        assert abs(estimate - effect.amplitude) < tolerance, effect.name


def test_support_is_the_mni_brain_and_effects_sit_in_grey_matter(generator):
    """Oracle: nilearn's own copies of the ICBM 2009a brain and grey-matter templates (1 mm)."""
    datasets = pytest.importorskip("nilearn.datasets")
    import warnings

    import nibabel as nib
    from nilearn.image import resample_to_img

    target = nib.Nifti1Image(np.zeros(generator.SHAPE, np.float32), generator.AFFINE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        brain = resample_to_img(datasets.load_mni152_brain_mask(resolution=1), target,
                                interpolation="nearest", force_resample=True,
                                copy_header=True).get_fdata() > 0  # fmt: skip
        grey = datasets.load_mni152_gm_template(resolution=1)
    ours = generator.brain_mask()
    assert np.mean(ours == brain) > 0.99 and (ours & brain).sum() > 0.95 * brain.sum()
    gm = np.asarray(grey.dataobj, dtype=np.float64)
    offsets = np.indices((13, 13, 13)).reshape(3, -1).T - 6  # 1 mm voxels within 6 mm
    offsets = offsets[np.linalg.norm(offsets, axis=1) <= 6]
    for effect in generator.EFFECTS:
        centre = np.linalg.solve(grey.affine, [*effect.center_mm, 1.0])[:3].round().astype(int)
        near = tuple((centre + offsets).T)
        # midline centres lie between the medial walls: grey matter within 6 mm
        assert gm[near].max() > 0.7, effect.name
