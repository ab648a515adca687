"""``bids-group-import``: SPM and FSL first-level outputs laid out as a BIDS derivatives dataset.

The real SPM maps of ``../shared/data/real/spm-faces16-words14`` (skipped when absent) are laid
out and analysed with the real ``bids-group`` command: the peak z of faces (hdr/img pairs) is the
5.24 at MNI (-39, -85, -14) that nilearn gets (that folder's README), and words (.nii, linked)
5.00 at (54, 12, -12). FSL-style input is tested on tiny synthetic cope/varcope files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_group.cli import main as bids_group
from bids_group.import_maps import main

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "spm-faces16-words14"
SPACE = "MNI152NLin2009cAsym"


def _run(capsys, *args) -> tuple[int, list[str], str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def _peak(out_dir: Path, contrast: str) -> tuple[float, tuple[float, ...]]:
    (path,) = out_dir.glob(f"node-*/*contrast-{contrast}_stat-z_statmap.nii.gz")
    img = nib.load(path)
    z = img.get_fdata()
    index = np.unravel_index(np.nanargmax(z), z.shape)
    return float(np.nanmax(z)), tuple(nib.affines.apply_affine(img.affine, index))


def _analyse(capsys, ds: Path, out: Path) -> None:
    assert bids_group([str(ds), str(out), "group", "--no-report", "-qq"]) == 0
    capsys.readouterr()


# --------------------------------------------------------------------------- real SPM maps


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/real/spm-faces16-words14 absent")
def test_real_spm_hdr_img_pairs_then_bids_group(capsys, tmp_path):
    ds = tmp_path / "faces"
    code, out, err = _run(capsys, "spm", REAL / "visual_stimulation", ds, "--contrast", "faces",
                          "--space", SPACE)  # fmt: skip
    assert code == 0, err
    maps = sorted(ds.glob("sub-*/func/*_statmap.nii.gz"))
    assert len(maps) == 16 and [str(p) for p in maps] == out[2:]
    assert maps[0].name == f"sub-01_space-{SPACE}_contrast-faces_stat-effect_statmap.nii.gz"
    assert not any(p.is_symlink() for p in maps)  # converted, not linked
    source = nib.load(REAL / "visual_stimulation" / "subject_01" / "con_0006.hdr")
    converted = nib.load(maps[0])
    np.testing.assert_array_equal(converted.affine, source.affine)
    np.testing.assert_array_equal(np.asarray(converted.dataobj), np.asarray(source.dataobj))
    assert (ds / "participants.tsv").read_text().splitlines() == [
        "participant_id",
        *(f"sub-{i:02d}" for i in range(1, 17)),
    ]
    description = json.loads((ds / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "bids-group-import"
    _analyse(capsys, ds, tmp_path / "out")
    z, xyz = _peak(tmp_path / "out", "faces")
    assert z == pytest.approx(5.24, abs=0.01)
    np.testing.assert_allclose(xyz, (-39, -85, -14))


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/real/spm-faces16-words14 absent")
def test_real_spm_nii_by_glob_linked_then_bids_group(capsys, tmp_path):
    ds = tmp_path / "words"
    pattern = str(REAL / "auditory_stimulation" / "*" / "Words_*.nii")
    code, out, err = _run(capsys, "spm", pattern, ds, "--contrast", "words", "--task", "auditory",
                          "--subject-regex", r"subject_(\d+)")  # fmt: skip
    assert code == 0, err
    maps = sorted(ds.glob("sub-*/func/*_statmap.nii"))
    assert len(maps) == 14 and not (ds / "sub-05").exists()
    assert maps[0].name == "sub-01_task-auditory_contrast-words_stat-effect_statmap.nii"
    assert all(p.is_symlink() for p in maps)
    assert maps[0].resolve() == (REAL / "auditory_stimulation" / "subject_01" / "Words_1.nii")
    _analyse(capsys, ds, tmp_path / "out")
    z, xyz = _peak(tmp_path / "out", "words")
    assert z == pytest.approx(5.00, abs=0.01)
    np.testing.assert_allclose(xyz, (54, 12, -12), atol=1.01)  # auditory grid: 1 mm offsets


# --------------------------------------------------------------------------- synthetic inputs

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _fsl_tree(root: Path, n: int = 5, copes: int = 1) -> Path:
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        stats = root / f"sub{i:02d}.feat" / "stats"
        stats.mkdir(parents=True)
        for c in range(1, copes + 1):
            data = rng.standard_normal((5, 6, 5)).astype(np.float32) + 1
            nib.Nifti1Image(data, AFFINE).to_filename(stats / f"cope{c}.nii.gz")
            nib.Nifti1Image(np.abs(data) + 0.1, AFFINE).to_filename(stats / f"varcope{c}.nii.gz")
    return root


def test_fsl_cope_and_varcope(capsys, tmp_path):
    src = _fsl_tree(tmp_path / "feat")
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    ds = tmp_path / "ds"
    code, out, err = _run(capsys, "fsl", src, ds, "--contrast", "faces", "--task", "faces")
    assert code == 0, err
    effect = sorted(ds.glob("sub-*/func/*_stat-effect_statmap.nii.gz"))
    variance = sorted(ds.glob("sub-*/func/*_stat-variance_statmap.nii.gz"))
    assert len(effect) == len(variance) == 5
    assert variance[2].name == "sub-03_task-faces_contrast-faces_stat-variance_statmap.nii.gz"
    assert variance[2].resolve() == src / "sub03.feat" / "stats" / "varcope1.nii.gz"
    assert effect[2].resolve() == src / "sub03.feat" / "stats" / "cope1.nii.gz"
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before  # source untouched
    assert len(out) == 2 + 10
    _analyse(capsys, ds, tmp_path / "out")
    assert list((tmp_path / "out").glob("node-*/task-faces_contrast-faces_stat-z_statmap.nii.gz"))


def test_fsl_copy_and_glob_selecting_one_cope(capsys, tmp_path):
    src = _fsl_tree(tmp_path / "feat", n=3, copes=2)
    ds = tmp_path / "ds"
    code, _, err = _run(capsys, "fsl", src, ds, "--contrast", "x")
    assert code == 65 and "several maps" in err and not ds.exists()
    code, _, err = _run(capsys, "fsl", f"{src}/*/stats/cope2.nii.gz", ds, "--contrast", "x",
                        "--copy")  # fmt: skip
    assert code == 0, err
    files = sorted(ds.glob("sub-*/func/*.nii.gz"))
    assert len(files) == 6 and not any(p.is_symlink() for p in files)
    assert files[0].read_bytes() == (src / "sub01.feat" / "stats" / "cope2.nii.gz").read_bytes()


def test_spm_analyze_pair_converted(capsys, tmp_path):
    src = tmp_path / "spm"
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    data[0, 0, 0] = np.nan
    affine = np.array([[-3.0, 0, 0, 78], [0, 3, 0, -112], [0, 0, 3, -50], [0, 0, 0, 1]])
    for sub in ("01", "02"):
        (src / f"subject_{sub}").mkdir(parents=True)
        nib.Nifti1Pair(data, affine).to_filename(src / f"subject_{sub}" / "con_0001.img")
    ds = tmp_path / "ds"
    code, _, err = _run(capsys, "spm", src, ds, "--contrast", "faces")
    assert code == 0, err
    img = nib.load(ds / "sub-02" / "func" / "sub-02_contrast-faces_stat-effect_statmap.nii.gz")
    np.testing.assert_array_equal(img.affine, affine)
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), data)
    assert img.get_data_dtype() == np.float32


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("out not empty", 73, "not an empty folder"),
        ("missing source", 66, "does not exist"),
        ("nothing matched", 18, "selects no SPM map"),
        ("regex no match", 64, "does not match"),
        ("label not alnum", 64, "not alphanumeric"),
        ("out inside source", 64, "never writes into"),
        ("bad contrast", 64, "--contrast"),
        ("no contrast", 64, "--contrast"),
        ("hdr without img", 65, "no con_0001.img"),
        ("bad regex", 64, "not a regular expression"),
    ],
)
def test_errors(capsys, tmp_path, case, code, message):
    src = tmp_path / "spm"
    for sub in ("01", "02"):
        folder = src / f"subject_{sub}"
        folder.mkdir(parents=True)
        nib.Nifti1Image(np.ones((2, 2, 2), np.float32), AFFINE).to_filename(folder / "con_0001.nii")
    ds = tmp_path / "ds"
    args = ["spm", src, ds, "--contrast", "faces"]
    if case == "out not empty":
        ds.mkdir()
        (ds / "keep.txt").write_text("x")
    elif case == "missing source":
        args[1] = tmp_path / "nope"
    elif case == "nothing matched":
        args[1] = f"{src}/*/spmT_*.nii"
    elif case == "regex no match":
        args += ["--subject-regex", r"participant(\d+)"]
    elif case == "label not alnum":
        args += ["--subject-regex", r"(subject_\d+)"]
    elif case == "out inside source":
        args[2] = src / "bids"
    elif case == "bad contrast":
        args[4] = "faces-houses"
    elif case == "no contrast":
        args = args[:3]
    elif case == "hdr without img":
        nib.Nifti1Pair(np.ones((2, 2, 2), np.float32), AFFINE).to_filename(src / "x.img")
        (src / "subject_03").mkdir()
        os.replace(src / "x.hdr", src / "subject_03" / "con_0001.hdr")
    elif case == "bad regex":
        args += ["--subject-regex", "(unclosed"]
    before = sorted(str(p) for p in src.rglob("*"))
    got, out, err = _run(capsys, *args)
    assert got == code, err
    assert message in err and err.startswith("bids-group-import: error:")
    assert out == []
    assert sorted(str(p) for p in src.rglob("*")) == before
    if case != "out not empty":
        assert not ds.exists()
