"""Behaviour of a whole ``bids-group`` run on small real files.

What a user and a workflow engine rely on: stdout lists exactly what was written, logs go to
stderr, the output is a valid BIDS derivative dataset, the input is never touched, re-runs are
refused unless ``--overwrite``, an interrupted run leaves nothing behind, and the options change
what they claim to change. The statistics themselves are checked against nilearn in
test_parity_end_to_end.py.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import make_bids_derivatives, map_name, write_description, write_map

from bids_group import __version__
from bids_group.cli import cli, main
from bids_group.outputs.staging import TMP_MARKER
from bids_group.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "ds-faces"
SHAPE = (10, 12, 10)
#: The HTML report is tested elsewhere and costs time: leave it out where the CLI can.
NO_REPORT = ["--no-report"] if any(p.name == "report" for p in cli.params) else []

TWO_SAMPLE_MODEL = """\
Name: two sample age
BIDSModelVersion: "1.0.0"
Nodes:
  - Level: Dataset
    Name: groups
    GroupBy: [contrast]
    Transformations:
      Transformer: pybids-transforms-v1
      Instructions:
        - Name: Factor
          Input: [group]
        - Name: Demean
          Input: [age]
    Model:
      Type: glm
      X: [group.control, group.patient, age]
    Contrasts:
      - Name: patientGtControl
        ConditionList: [group.patient, group.control]
        Weights: [1, -1]
        Test: t
    DummyContrasts:
      Test: t
      Contrasts: [age]
"""


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def _snapshot(folder: Path, *, dir_mtimes: bool = True) -> dict[str, tuple[str, int]]:
    """Every entry under ``folder``: content hash (files) and mtime in ns.

    ``dir_mtimes=False`` ignores folders' mtimes, which change when an entry is created and
    removed again (a staging folder inside an existing OUT_DIR).
    """
    state = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            state[str(path.relative_to(folder))] = (
                hashlib.sha256(path.read_bytes()).hexdigest(),
                path.stat().st_mtime_ns,
            )
        else:
            state[str(path.relative_to(folder))] = ("dir", path.stat().st_mtime_ns * dir_mtimes)
    return state


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """8 subjects (age, group), one contrast, 10x12x10 voxels."""
    return make_bids_derivatives(tmp_path / "ds", n_subjects=8, shape=SHAPE)


@pytest.fixture
def two_sample_model(tmp_path: Path) -> Path:
    path = tmp_path / "two_sample.yaml"
    path.write_text(TWO_SAMPLE_MODEL)
    return path


# --------------------------------------------------------------------------- stdout / stderr


def test_stdout_lists_exactly_the_written_files(capsys, dataset, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = _run(capsys, dataset, out_dir, "group")
    assert code == 0, err
    listed = [Path(line) for line in out.splitlines()]
    assert all(p.is_absolute() and p.is_file() for p in listed)
    assert len(listed) == len(set(listed))
    assert set(listed) == _files_under(out_dir)  # nothing written goes unlisted
    assert "INFO" in err and "INFO" not in out  # logs on stderr only
    assert err.splitlines()[0].startswith("bids-group INFO:")


def test_json_summary(capsys, dataset, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = _run(capsys, dataset, out_dir, "group", "--json", *NO_REPORT)
    assert code == 0, err
    summary = json.loads(out)  # stdout is one JSON document and nothing else
    files = {Path(p) for p in summary["files"]}
    assert files == _files_under(out_dir)
    assert summary["version"] == __version__
    (analysis,) = summary["analyses"]
    assert analysis["n_maps"] == 8 and analysis["columns"] == ["intercept"]
    assert analysis["dof"] == 7
    assert analysis["contrasts"][0]["label"] == "faces"


def test_quiet_silences_info(capsys, dataset, tmp_path):
    code, out, err = _run(capsys, dataset, tmp_path / "out", "group", "-q", *NO_REPORT)
    assert code == 0
    assert "INFO" not in err
    assert out.strip()  # the list of files is still printed


# --------------------------------------------------------------------------- BIDS outputs


def test_dataset_description(capsys, dataset, tmp_path):
    out_dir = tmp_path / "out"
    assert _run(capsys, dataset, out_dir, "group", *NO_REPORT)[0] == 0
    description = json.loads((out_dir / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["BIDSVersion"]
    (generated,) = description["GeneratedBy"]
    assert generated["Name"] == "bids-group"
    assert generated["Version"] == __version__
    assert generated["CodeURL"].startswith("https://")
    sources = description["SourceDatasets"]
    assert any(str(dataset) in json.dumps(s) for s in sources)


def test_model_file_reloads(capsys, dataset, tmp_path, two_sample_model):
    out_dir = tmp_path / "out"
    assert _run(capsys, dataset, out_dir, "group", "-m", two_sample_model, *NO_REPORT)[0] == 0
    (path,) = out_dir.glob("model-*_smdl.json")
    assert path.name == "model-twoSampleAge_smdl.json"
    model = json.loads(path.read_text())
    assert model["BIDSModelVersion"]
    spec = load_spec(path)
    original = load_spec(two_sample_model)
    assert spec.name == original.name
    assert spec.x == original.x == ("group.control", "group.patient", "age")
    assert spec.group_by == original.group_by
    assert [c.name for c in spec.contrasts] == [c.name for c in original.contrasts]
    for ours, theirs in zip(spec.contrasts, original.contrasts, strict=True):
        assert ours.test == theirs.test
        weights = dict(zip(ours.condition_list, np.atleast_2d(ours.weights)[0], strict=True))
        expected = dict(zip(theirs.condition_list, np.atleast_2d(theirs.weights)[0], strict=True))
        assert {k: v for k, v in weights.items() if v} == {k: v for k, v in expected.items() if v}


def test_statmap_sidecars(capsys, dataset, tmp_path, two_sample_model):
    out_dir = tmp_path / "out"
    code, out, _ = _run(capsys, dataset, out_dir, "group", "-m", two_sample_model, *NO_REPORT)
    assert code == 0
    maps = sorted(out_dir.rglob("*_statmap.nii.gz"))
    assert len(maps) >= 2 * 6
    for path in maps:
        sidecar_path = path.with_name(path.name.replace(".nii.gz", ".json"))
        assert str(sidecar_path) in out.splitlines()
        sidecar = json.loads(sidecar_path.read_text())
        assert sidecar["DesignColumns"] == ["group.control", "group.patient", "age"]
        assert sidecar["DegreesOfFreedom"] == [5]
        assert sidecar["Software"]["Version"] == __version__
        assert sidecar["Software"]["Name"] == "bids-group"
        if "_stat-rsquared_" in path.name or "_stat-residualvariance_" in path.name:
            assert "ContrastWeights" not in sidecar  # model-level maps: no group contrast
            continue
        weights = np.asarray(sidecar["ContrastWeights"], dtype=float)
        if "PatientGtControl" in path.name:
            np.testing.assert_array_equal(weights, [[-1, 1, 0]])
        else:
            np.testing.assert_array_equal(weights, [[0, 0, 1]])
        img = nib.load(path)
        assert img.shape == SHAPE
        assert np.allclose(img.affine, np.diag([2.0, 2.0, 2.0, 1.0]))


def test_design_table_matches_model(capsys, dataset, tmp_path, two_sample_model):
    out_dir = tmp_path / "out"
    assert _run(capsys, dataset, out_dir, "group", "-m", two_sample_model, *NO_REPORT)[0] == 0
    (design_path,) = out_dir.rglob("*_design.tsv")
    design = pd.read_csv(design_path, sep="\t")
    assert list(design.columns) == ["subject", "path", "group.control", "group.patient", "age"]
    participants = pd.read_csv(dataset / "participants.tsv", sep="\t")
    merged = design.merge(participants, left_on="subject", right_on="participant_id")
    assert len(merged) == len(design) == 8
    np.testing.assert_array_equal(merged["group.patient"], merged["group"] == "patient")
    np.testing.assert_array_equal(merged["group.control"], merged["group"] == "control")
    np.testing.assert_allclose(merged["age_x"], merged["age_y"] - merged["age_y"].mean())
    for subject, name in zip(design["subject"], design["path"], strict=True):
        assert name.startswith(f"{subject}_") and name.endswith("_statmap.nii.gz")


# --------------------------------------------------------------------------- safety


def test_input_folder_unchanged(capsys, dataset, tmp_path, two_sample_model):
    before = _snapshot(dataset)
    time.sleep(0.01)  # so a rewrite would show in the mtimes
    assert _run(capsys, dataset, tmp_path / "out", "group", "-m", two_sample_model)[0] == 0
    assert _snapshot(dataset) == before


def test_rerun_needs_overwrite(capsys, dataset, tmp_path):
    out_dir = tmp_path / "out"
    assert _run(capsys, dataset, out_dir, "group", *NO_REPORT)[0] == 0
    first = _snapshot(out_dir, dir_mtimes=False)
    code, out, err = _run(capsys, dataset, out_dir, "group", *NO_REPORT)
    assert code == 73
    assert out == "" and "--overwrite" in err and "Traceback" not in err
    assert _snapshot(out_dir, dir_mtimes=False) == first  # a refused run changes nothing

    user_file = out_dir / "my-notes.txt"
    user_file.write_text("keep me")
    stale = next(out_dir.glob("node-*")) / "stale_statmap.nii.gz"
    stale.write_bytes(b"old")
    args = ["--participant-label", "01", "--participant-label", "02", "--participant-label", "03"]
    before = _snapshot(out_dir, dir_mtimes=False)
    code, out, err = _run(capsys, dataset, out_dir, "group", "--overwrite", *args, *NO_REPORT)
    assert code == 73 and "would delete 1 file" in err and "stale_statmap" in err
    assert _snapshot(out_dir, dir_mtimes=False) == before  # --overwrite deletes nothing else
    stale.unlink()
    code, out, err = _run(capsys, dataset, out_dir, "group", "--overwrite", *args, *NO_REPORT)
    assert code == 0, err
    assert user_file.read_text() == "keep me"  # unrelated files are left alone
    (design_path,) = out_dir.rglob("*_design.tsv")
    assert list(pd.read_csv(design_path, sep="\t")["subject"]) == ["sub-01", "sub-02", "sub-03"]
    assert {Path(p) for p in out.splitlines()} == _files_under(out_dir) - {user_file}


def _interrupt_dataset(root: Path) -> Path:
    """Three contrasts of 16 subjects: the run outlasts the interrupt by seconds."""
    return make_bids_derivatives(
        root, n_subjects=16, contrasts=("a", "b", "c"), shape=(28, 32, 28), seed=3
    )


@pytest.mark.parametrize(
    ("signum", "existing"),
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGINT", "SIGTERM", "SIGINT-overwrite"],
)
def test_interrupted_run_leaves_nothing(capsys, tmp_path, signum, existing):
    dataset = _interrupt_dataset(tmp_path / "ds")
    out_dir = tmp_path / "results" / "out"
    out_dir.parent.mkdir()
    if existing:  # earlier results that an interrupted --overwrite run must leave as they were
        labels = ["--participant-label", "01", "--participant-label", "02", *NO_REPORT]
        assert _run(capsys, dataset, out_dir, "group", *labels)[0] == 0
    before = _snapshot(out_dir.parent, dir_mtimes=False)
    command = [sys.executable, "-c", "from bids_group.cli import console_main; console_main()"]
    proc = subprocess.Popen(
        [*command, str(dataset), str(out_dir), "group", *(["--overwrite"] if existing else [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Wait until the first model is being fitted (inside the staged output), then interrupt.
    # Stop the child first and queue the signal, so that it lands while seconds of work remain
    # however fast this machine is (a plain sleep-then-signal races with a fast run).
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "model for" in line:
            break
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signum)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    err = "".join(seen) + err
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert out == ""  # nothing is announced as written
    # OUT_DIR absent (or as before), and no hidden staging folder beside or inside it.
    assert _snapshot(out_dir.parent, dir_mtimes=False) == before
    assert out_dir.exists() == existing
    assert not [p for p in tmp_path.rglob("*") if TMP_MARKER in p.name]


# --------------------------------------------------------------------------- options


def test_participant_label_restricts_subjects(capsys, dataset, tmp_path):
    out_dir = tmp_path / "out"
    args = ["--participant-label", "sub-02", "--participant-label", "05", "--json", *NO_REPORT]
    code, out, err = _run(capsys, dataset, out_dir, "group", *args)
    assert code == 0, err
    (analysis,) = json.loads(out)["analyses"]
    assert analysis["subjects"] == ["02", "05"] and analysis["dof"] == 1
    (design_path,) = out_dir.rglob("*_design.tsv")
    assert list(pd.read_csv(design_path, sep="\t")["subject"]) == ["sub-02", "sub-05"]


def test_dataset_is_an_alias_of_group(capsys, dataset, tmp_path):
    code_group, out_group, _ = _run(capsys, dataset, tmp_path / "a", "group", *NO_REPORT)
    code_dataset, out_dataset, _ = _run(capsys, dataset, tmp_path / "b", "dataset", *NO_REPORT)
    assert code_group == code_dataset == 0
    names = sorted(Path(p).relative_to(tmp_path / "a") for p in out_group.splitlines())
    assert names == sorted(Path(p).relative_to(tmp_path / "b") for p in out_dataset.splitlines())
    z_name = next(n for n in names if n.name.endswith("_stat-z_statmap.nii.gz"))
    np.testing.assert_array_equal(
        nib.load(tmp_path / "a" / z_name).get_fdata(), nib.load(tmp_path / "b" / z_name).get_fdata()
    )


def _z_map(folder: Path) -> np.ndarray:
    (path,) = folder.rglob("*_stat-z_statmap.nii.gz")
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


def test_smoothing_changes_results(capsys, dataset, tmp_path):
    assert _run(capsys, dataset, tmp_path / "raw", "group", *NO_REPORT)[0] == 0
    code, out, _ = _run(
        capsys, dataset, tmp_path / "smooth", "group", "--smoothing-fwhm", "6", "--json", *NO_REPORT
    )
    assert code == 0
    assert json.loads(out)["inference"]["smoothing_fwhm"] == 6
    raw, smooth = _z_map(tmp_path / "raw"), _z_map(tmp_path / "smooth")
    inside = np.isfinite(raw) & np.isfinite(smooth)
    assert inside.sum() > 0.5 * raw.size
    assert np.abs(raw[inside] - smooth[inside]).max() > 0.5
    # White noise smoothed at 6 mm (3 voxels) varies much less from voxel to voxel.
    assert (
        np.abs(np.diff(smooth, axis=0))[inside[1:] & inside[:-1]].mean()
        < 0.5 * np.abs(np.diff(raw, axis=0))[inside[1:] & inside[:-1]].mean()
    )


def _two_blob_dataset(root: Path) -> Path:
    """A large (125 voxels) and a small (4 voxels) strong effect on zero-mean noise."""
    shape = (16, 16, 16)
    rng = np.random.default_rng(7)
    big = np.zeros(shape)
    big[3:8, 3:8, 3:8] = 1.0
    small = np.zeros(shape)
    small[11:13, 11:13, 11:12] = 1.0  # 4 voxels
    write_description(root)
    for i in range(12):
        sub = f"{i + 1:02d}"
        data = rng.standard_normal(shape) * 0.5 + 3.0 * (big + small)
        write_map(root / f"sub-{sub}" / "func" / map_name(sub), data)
    return root


def test_cluster_threshold_removes_small_clusters(capsys, tmp_path):
    dataset = _two_blob_dataset(tmp_path / "ds")

    def run(k: int) -> tuple[np.ndarray, pd.DataFrame]:
        out_dir = tmp_path / f"k{k}"
        args = ["--height-control", "none", "--threshold", "5", "--cluster-threshold", str(k)]
        code, _, err = _run(capsys, dataset, out_dir, "group", *args, *NO_REPORT)
        assert code == 0, err
        (thresholded,) = out_dir.rglob(f"*_desc-uncorrected{f'K{k}' if k else ''}_statmap.nii.gz")
        (table,) = out_dir.rglob("*_clusters.tsv")
        return np.nan_to_num(nib.load(thresholded).get_fdata()), pd.read_csv(table, sep="\t")

    kept_all, table_all = run(0)
    kept_big, table_big = run(10)
    main_all = table_all[table_all["cluster_id"].astype(str).str.fullmatch(r"\d+")]
    main_big = table_big[table_big["cluster_id"].astype(str).str.fullmatch(r"\d+")]
    assert sorted(main_all["size_voxels"]) == [4, 125]
    assert list(main_big["size_voxels"]) == [125]
    assert np.count_nonzero(kept_all) == 129
    assert np.count_nonzero(kept_big) == 125
    assert not kept_big[11:13, 11:13, 11].any() and kept_all[11:13, 11:13, 11].all()
    np.testing.assert_array_equal(kept_big[3:8, 3:8, 3:8], kept_all[3:8, 3:8, 3:8])


# --------------------------------------------------------------------------- example dataset


@pytest.mark.skipif(not EXAMPLE.is_dir(), reason="example dataset absent")
def test_example_dataset_finds_the_amygdala_group_effect(capsys, tmp_path):
    before = _snapshot(EXAMPLE)
    out_dir = tmp_path / "out"
    model = REPO / "configs" / "two_sample_age.yaml"
    code, out, err = _run(capsys, EXAMPLE, out_dir, "group", "--model", model, *NO_REPORT)
    assert code == 0, err
    assert _snapshot(EXAMPLE) == before
    node = out_dir / "node-groupComparison"
    amygdala = np.array([24.0, -4.0, -18.0])  # README: right amygdala, patients > controls
    table = pd.read_csv(
        next(node.glob("*contrast-facesPatientGtControl_stat-z_desc-*_clusters.tsv")), sep="\t"
    )
    top = table.iloc[0]
    assert top["peak_stat"] > 3.09
    peak = np.array([top["peak_x"], top["peak_y"], top["peak_z"]])
    assert np.linalg.norm(peak - amygdala) <= 8.0  # within two 4 mm voxels of the truth
    # And the z map is high at the true centre itself.
    z_img = nib.load(next(node.glob("*contrast-facesPatientGtControl_stat-z_statmap.nii.gz")))
    ijk = np.rint(np.linalg.solve(z_img.affine, [*amygdala, 1.0])[:3]).astype(int)
    assert np.asarray(z_img.dataobj)[tuple(ijk)] > 3.09
    # Faces only: no patient effect survives for the scrambled contrast.
    scrambled = pd.read_csv(
        next(node.glob("*contrast-scrambledPatientGtControl_stat-z_desc-*_clusters.tsv")),
        sep="\t",
    )
    assert len(scrambled) == 0
