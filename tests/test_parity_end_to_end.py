"""Parity of the whole ``bids-group`` command with nilearn 0.14 (the oracle).

Each test builds a BIDS derivatives dataset in ``tmp_path`` (smooth noise plus known effects),
runs ``bids_group.cli.main`` on it, reads the maps and tables *we wrote*, and compares them with
nilearn's SecondLevelModel fitted on the same input files with the mask we wrote and a design
built here by hand in pandas (never with bids-group code). So everything between the command
line and the files is covered: pybids selection, participants.tsv, transformations, design,
masking, fit, contrasts, thresholds, cluster tables and NIfTI writing.

Our maps are stored as float32 (nilearn computes in float64) and are NaN outside the mask, so
maps are compared in-mask with the tolerances of the brief: |z| 1e-4, effect 1e-5 relative.
The largest errors seen are collected in :data:`MAX_ERRORS` and printed at the end of the
module (``pytest -s``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import map_name, write_description, write_map, write_participants
from scipy import ndimage
from scipy.linalg import sqrtm

from bids_group.cli import cli, main

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
SPM_FACES = REAL / "spm-faces16-words14" / "visual_stimulation"

SHAPE = (16, 18, 16)
AFFINE = np.array(
    [[2.0, 0, 0, -15.0], [0, 2.0, 0, -17.0], [0, 0, 2.0, -15.0], [0, 0, 0, 1]], dtype=float
)
Z_ATOL = 1e-4
EFFECT_RTOL = 1e-5
THRESHOLD_ATOL = 1e-6
MIN_DISTANCE_MM = 8.0
#: The HTML report is not under test here and costs time: leave it out where the CLI can.
NO_REPORT = ["--no-report"] if any(p.name == "report" for p in cli.params) else []

#: Largest error seen per quantity, over every test of the module (printed at the end).
MAX_ERRORS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_errors():
    yield
    if MAX_ERRORS:
        print("\nmax errors vs nilearn:")
        for key, value in sorted(MAX_ERRORS.items()):
            print(f"  {key:<32s} {value:.3g}")


def _record(key: str, value: float) -> float:
    MAX_ERRORS[key] = max(MAX_ERRORS.get(key, 0.0), float(value))
    return float(value)


def _quiet(func, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- synthetic data


def _support() -> np.ndarray:
    """An ellipsoid filling most of the grid: maps are exactly 0 outside it."""
    ii, jj, kk = np.indices(SHAPE, dtype=float)
    centre = (np.array(SHAPE) - 1) / 2
    radii = np.array(SHAPE) / 2 - 0.3
    return ((ii - centre[0]) / radii[0]) ** 2 + ((jj - centre[1]) / radii[1]) ** 2 + (
        (kk - centre[2]) / radii[2]
    ) ** 2 <= 1.0


SUPPORT = _support()


def _blob(centre: Sequence[int], sigma: float = 1.6) -> np.ndarray:
    """Gaussian blob of peak 1 centred on a voxel."""
    ii, jj, kk = np.indices(SHAPE, dtype=float)
    d2 = (ii - centre[0]) ** 2 + (jj - centre[1]) ** 2 + (kk - centre[2]) ** 2
    return np.exp(-d2 / (2 * sigma**2))


#: Effect locations (voxel indices), away from the support's border.
POS = _blob((5, 6, 6))
NEG = _blob((10, 12, 9))
SMALL = _blob((11, 5, 11), sigma=0.9)


def _noise(rng: np.random.Generator) -> np.ndarray:
    """Smooth (about 2.8 voxels FWHM) Gaussian noise of unit SD."""
    smooth = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 1.2)
    return smooth / smooth.std()


def _write_dataset(
    root: Path,
    maps: Mapping[tuple[str, str], np.ndarray],
    participants: Mapping[str, Sequence[Any]] | None = None,
    affine: np.ndarray = AFFINE,
) -> dict[tuple[str, str], Path]:
    """Write ``{(subject, contrast): volume}`` as BIDS statmaps under ``root``.

    Returns the written paths, keyed like ``maps`` (the order nilearn gets them in).
    """
    write_description(root)
    paths = {}
    for (sub, contrast), data in maps.items():
        path = root / f"sub-{sub}" / "func" / map_name(sub, contrast=contrast)
        paths[sub, contrast] = write_map(path, data, affine)
    if participants is not None:
        write_participants(root / "participants.tsv", participants)
    return paths


def _write_model(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- running


def _run(bids: Path, out: Path, *args: str) -> dict[str, Any]:
    """Run the command line in-process; return its JSON summary."""
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(bids), str(out), "group", "--json", "-qq", *NO_REPORT, *args])
    assert code == 0, f"bids-group exited {code}: {stderr.getvalue()}"
    summary = json.loads(stdout.getvalue())
    for path in summary["files"]:
        assert Path(path).is_file(), path
    return summary


def _file(summary: Mapping[str, Any], ending: str) -> Path:
    """The single written file whose name ends with ``ending``."""
    found = [Path(p) for p in summary["files"] if Path(p).name.endswith(ending)]
    assert len(found) == 1, (ending, found)
    return found[0]


def _contrast_summary(summary: Mapping[str, Any], label: str) -> dict[str, Any]:
    found = [c for a in summary["analyses"] for c in a["contrasts"] if c["label"] == label]
    assert len(found) == 1, (label, found)
    return found[0]


def _volume(path: Path) -> np.ndarray:
    img = nib.load(path)
    assert np.allclose(img.affine, nib.load(path).affine)
    return np.asarray(img.dataobj, dtype=np.float64)


def _mask(summary: Mapping[str, Any], label: str | None = None) -> tuple[Path, np.ndarray]:
    ending = f"contrast-{label}_mask.nii.gz" if label else "_mask.nii.gz"
    path = _file(summary, ending)
    return path, _volume(path) > 0


# --------------------------------------------------------------------------- the oracle


def _nilearn_fit(paths: Sequence[Path], design: pd.DataFrame, mask_path: Path):
    from nilearn.glm.second_level import SecondLevelModel

    model = SecondLevelModel(mask_img=str(mask_path), minimize_memory=False)
    return _quiet(model.fit, [str(p) for p in paths], design_matrix=design)


def _nilearn_contrast(model, weights, stat_type: str = "t") -> dict[str, nib.Nifti1Image]:
    return _quiet(
        model.compute_contrast,
        np.asarray(weights, dtype=float),
        second_level_stat_type=stat_type,
        output_type="all",
    )


# --------------------------------------------------------------------------- comparisons


def _compare_maps(
    out_dir_files: Mapping[str, Any],
    label: str,
    theirs: Mapping[str, nib.Nifti1Image],
    mask: np.ndarray,
    *,
    stat: str = "t",
) -> np.ndarray:
    """Our effect / stat / z maps vs nilearn's, in-mask; NaN outside. Returns our z volume."""
    z_ours = _volume(_file(out_dir_files, f"contrast-{label}_stat-z_statmap.nii.gz"))
    z_theirs = np.asarray(theirs["z_score"].dataobj, dtype=np.float64)
    assert np.isfinite(z_ours[mask]).all()
    assert np.isnan(z_ours[~mask]).all()  # documented: NaN outside the mask
    err = _record("z (abs)", np.abs(z_ours[mask] - z_theirs[mask]).max())
    assert err <= Z_ATOL
    stat_ours = _volume(_file(out_dir_files, f"contrast-{label}_stat-{stat}_statmap.nii.gz"))
    stat_theirs = np.asarray(theirs["stat"].dataobj, dtype=np.float64)
    rel = np.abs(stat_ours[mask] - stat_theirs[mask]).max() / np.abs(stat_theirs[mask]).max()
    assert _record(f"{stat} (rel. to max)", rel) <= EFFECT_RTOL
    if stat == "t":
        eff_ours = _volume(_file(out_dir_files, f"contrast-{label}_stat-effect_statmap.nii.gz"))
        eff_theirs = np.asarray(theirs["effect_size"].dataobj, dtype=np.float64)
        scale = np.abs(eff_theirs[mask]).max()
        rel = np.abs(eff_ours[mask] - eff_theirs[mask]).max() / scale
        assert _record("effect (rel. to max)", rel) <= EFFECT_RTOL
        np.testing.assert_allclose(
            eff_ours[mask], eff_theirs[mask], rtol=EFFECT_RTOL, atol=1e-3 * EFFECT_RTOL * scale
        )
        var_ours = _volume(_file(out_dir_files, f"contrast-{label}_stat-variance_statmap.nii.gz"))
        var_theirs = np.asarray(theirs["effect_variance"].dataobj, dtype=np.float64)
        rel = np.abs(var_ours[mask] / var_theirs[mask] - 1).max()
        assert _record("variance (rel.)", rel) <= EFFECT_RTOL
    return z_ours


def _compare_threshold(
    summary: Mapping[str, Any],
    label: str,
    desc: str,
    theirs_z: nib.Nifti1Image,
    mask_path: Path,
    *,
    method: str,
    alpha: float,
    two_sided: bool,
    cluster_threshold: int = 0,
) -> tuple[float, int]:
    """Our threshold and thresholded map vs threshold_stats_img; returns (threshold, count)."""
    from nilearn.glm import threshold_stats_img

    thr_img, thr = _quiet(
        threshold_stats_img,
        theirs_z,
        str(mask_path),
        alpha=alpha,
        height_control=method,
        two_sided=two_sided,
        cluster_threshold=cluster_threshold,
    )
    ours = _contrast_summary(summary, label)
    assert ours["z_threshold"] is not None
    _record("z threshold (abs)", abs(ours["z_threshold"] - thr))
    assert ours["z_threshold"] == pytest.approx(thr, abs=THRESHOLD_ATOL)
    kept_path = _file(summary, f"contrast-{label}_stat-z_desc-{desc}_statmap.nii.gz")
    kept = np.nan_to_num(_volume(kept_path))
    kept_theirs = np.asarray(thr_img.dataobj)
    np.testing.assert_array_equal(kept != 0, kept_theirs != 0)
    assert ours["surviving_voxels"] == np.count_nonzero(kept_theirs)
    sidecar = json.loads(
        kept_path.with_name(kept_path.name.replace(".nii.gz", ".json")).read_text()
    )
    assert sidecar["Threshold"]["Value"] == pytest.approx(thr, abs=THRESHOLD_ATOL)
    assert sidecar["Threshold"]["TwoSided"] is two_sided
    return thr, int(np.count_nonzero(kept_theirs))


def _read_clusters(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype={"cluster_id": str}, na_values="n/a")


def _main_rows(table: pd.DataFrame, id_column: str) -> pd.DataFrame:
    ids = table[id_column].astype(str)
    return table[ids.str.fullmatch(r"\d+")]


def _compare_clusters(
    summary: Mapping[str, Any],
    label: str,
    desc: str,
    theirs_z: nib.Nifti1Image,
    threshold: float,
    *,
    two_sided: bool,
    cluster_threshold: int = 0,
    n_surviving: int | None = None,
) -> pd.DataFrame:
    """Main (cluster-level) rows of our table vs get_clusters_table; returns our table.

    nilearn keeps ``z > threshold`` in get_clusters_table but ``z >= threshold`` in
    threshold_stats_img, so with a data-driven threshold (FDR: the z of a voxel) its table drops
    that voxel; we give it the threshold lowered by 1e-6 so both sides keep ``z >= threshold``.
    Its negative-cluster ids and subpeak spacing have known issues, so main rows are compared as
    a set (sorted by peak z); our subpeaks are checked for the minimum distance separately.
    """
    from nilearn.reporting import get_clusters_table

    ours = _read_clusters(_file(summary, f"contrast-{label}_stat-z_desc-{desc}_clusters.tsv"))
    theirs = _quiet(
        get_clusters_table,
        theirs_z,
        threshold - 1e-6,
        cluster_threshold=cluster_threshold,
        two_sided=two_sided,
        min_distance=MIN_DISTANCE_MM,
    )
    main_ours = _main_rows(ours, "cluster_id").sort_values("peak_stat", ascending=False)
    main_theirs = _main_rows(theirs, "Cluster ID").copy()
    main_theirs["Peak Stat"] = main_theirs["Peak Stat"].astype(float)
    main_theirs = main_theirs.sort_values("Peak Stat", ascending=False)
    assert len(main_ours) == len(main_theirs)
    np.testing.assert_array_equal(
        main_ours[["peak_x", "peak_y", "peak_z"]].to_numpy(float),
        main_theirs[["X", "Y", "Z"]].to_numpy(float),
    )
    np.testing.assert_array_equal(
        np.floor(main_ours["size_mm3"].to_numpy(float) + 1e-9),
        main_theirs["Cluster Size (mm3)"].to_numpy(float),
    )
    if len(main_ours):
        err = np.abs(main_ours["peak_stat"].to_numpy() - main_theirs["Peak Stat"].to_numpy())
        assert _record("cluster peak z (abs)", err.max()) <= Z_ATOL
    # Our ids: 1..n, positive clusters first then negative ones, each by decreasing |peak|.
    ids = main_ours.sort_values("cluster")["cluster"].to_numpy()
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    by_id = _main_rows(ours, "cluster_id").sort_values("cluster")
    signs = np.sign(by_id["peak_stat"].to_numpy())
    assert (np.diff(signs) <= 0).all()  # positives, then negatives
    for sign in (1, -1):
        peaks = np.abs(by_id["peak_stat"].to_numpy()[signs == sign])
        assert (np.diff(peaks) <= 0).all()
    _check_subpeaks(ours)
    if n_surviving is not None:
        assert ours["size_voxels"].sum() == n_surviving
    return ours


def _compare_thresholded(
    summary: Mapping[str, Any],
    label: str,
    desc: str,
    theirs_z: nib.Nifti1Image,
    mask_path: Path,
    *,
    method: str,
    alpha: float,
    two_sided: bool,
    cluster_threshold: int = 0,
) -> tuple[int, pd.DataFrame]:
    """Threshold (threshold_stats_img) then cluster table (get_clusters_table) comparisons.

    Returns (surviving voxel count, our cluster table).
    """
    thr, count = _compare_threshold(
        summary,
        label,
        desc,
        theirs_z,
        mask_path,
        method=method,
        alpha=alpha,
        two_sided=two_sided,
        cluster_threshold=cluster_threshold,
    )
    table = _compare_clusters(
        summary,
        label,
        desc,
        theirs_z,
        thr,
        two_sided=two_sided,
        cluster_threshold=cluster_threshold,
        n_surviving=count,
    )
    return count, table


def _check_subpeaks(table: pd.DataFrame) -> None:
    """Within a cluster, peaks are at least MIN_DISTANCE_MM apart and |z| decreases."""
    for _, rows in table.groupby("cluster"):
        xyz = rows[["peak_x", "peak_y", "peak_z"]].to_numpy(float)
        for i in range(len(xyz)):
            for j in range(i + 1, len(xyz)):
                assert np.linalg.norm(xyz[i] - xyz[j]) >= MIN_DISTANCE_MM - 1e-9
        assert (np.diff(np.abs(rows["peak_stat"].to_numpy())) <= 0).all()


# --------------------------------------------------------------------------- 1. one-sample


N_ONE = 16


@pytest.fixture(scope="module")
def one_sample(tmp_path_factory):
    """16 subjects, one contrast: positive and negative blobs; nilearn fitted once."""
    root = tmp_path_factory.mktemp("one") / "ds"
    rng = np.random.default_rng(11)
    maps = {}
    for i in range(N_ONE):
        amp = 1.0 + 0.3 * rng.standard_normal()
        data = _noise(rng) + amp * 1.4 * POS - 1.5 * NEG + 0.9 * SMALL + 0.2
        maps[f"{i + 1:02d}", "faces"] = data * SUPPORT
    paths = _write_dataset(
        root, maps, {"participant_id": [f"sub-{i + 1:02d}" for i in range(N_ONE)]}
    )
    out = tmp_path_factory.mktemp("one_out") / "default"
    summary = _run(root, out)
    mask_path, mask = _mask(summary, "faces")
    design = pd.DataFrame({"intercept": np.ones(N_ONE)})
    model = _nilearn_fit(list(paths.values()), design, mask_path)
    theirs = _nilearn_contrast(model, [1.0])
    return {
        "root": root,
        "summary": summary,
        "mask_path": mask_path,
        "mask": mask,
        "theirs": theirs,
    }


def test_one_sample_default_model(one_sample):
    summary, mask = one_sample["summary"], one_sample["mask"]
    np.testing.assert_array_equal(mask, SUPPORT)  # automatic mask: non-zero in every map
    assert summary["analyses"][0]["dof"] == N_ONE - 1
    assert summary["analyses"][0]["columns"] == ["intercept"]
    z = _compare_maps(summary, "faces", one_sample["theirs"], mask)
    assert np.nanmax(z) > 5 and np.nanmin(z) < -4  # effects of both signs, far tails exercised
    # Default inference: fpr 0.001 two-sided, no extent threshold.
    assert summary["inference"]["height_control"] == "fpr"
    count, _ = _compare_thresholded(
        summary,
        "faces",
        "fpr001",
        one_sample["theirs"]["z_score"],
        one_sample["mask_path"],
        method="fpr",
        alpha=0.001,
        two_sided=True,
    )
    assert count > 0


@pytest.mark.parametrize("method", ["fdr", "bonferroni"])
@pytest.mark.parametrize("two_sided", [True, False])
@pytest.mark.parametrize("k", [0, 5])
def test_one_sample_height_controls(one_sample, tmp_path, method, two_sided, k):
    out = tmp_path / "out"
    args = ["--height-control", method, "--alpha", "0.05", "--cluster-threshold", str(k)]
    args += ["--two-sided" if two_sided else "--one-sided"]
    summary = _run(one_sample["root"], out, *args)
    desc = f"{method}05" + (f"K{k}" if k else "")
    theirs_z = one_sample["theirs"]["z_score"]
    count, table = _compare_thresholded(
        summary,
        "faces",
        desc,
        theirs_z,
        one_sample["mask_path"],
        method=method,
        alpha=0.05,
        two_sided=two_sided,
        cluster_threshold=k,
    )
    assert count > 0
    if not two_sided:
        assert (table["peak_stat"] > 0).all()  # the negative blob only counts when two-sided


# --------------------------------------------------------------------------- 2. and 5. two groups

N_TWO = 20


@pytest.fixture(scope="module")
def two_groups(tmp_path_factory):
    """20 subjects, group (patient/control) effect in POS, age effect in NEG."""
    root = tmp_path_factory.mktemp("two") / "ds"
    rng = np.random.default_rng(22)
    group = np.array(["patient", "control"] * (N_TWO // 2))
    rng.shuffle(group)
    age = np.round(rng.uniform(20, 65, N_TWO), 1)
    maps = {}
    for i in range(N_TWO):
        patient = float(group[i] == "patient")
        data = _noise(rng) + 2.5 * patient * POS + 0.14 * (age[i] - 40) * NEG + 1.0
        maps[f"{i + 1:02d}", "faces"] = data * SUPPORT
    participants = {
        "participant_id": [f"sub-{i + 1:02d}" for i in range(N_TWO)],
        "age": list(age),
        "group": list(group),
    }
    paths = _write_dataset(root, maps, participants)
    # The oracle's design, by hand: two group columns and age minus its mean.
    design = pd.DataFrame(
        {
            "control": (group == "control").astype(float),
            "patient": (group == "patient").astype(float),
            "age": age - age.mean(),
        }
    )
    return {"root": root, "paths": list(paths.values()), "design": design}


TWO_SAMPLE_MODEL = """\
Name: two_sample_age
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
      Software:
        bids-group:
          Inference:
            HeightControl: fdr
            Alpha: 0.05
            TwoSided: true
    Contrasts:
      - Name: patientGtControl
        ConditionList: [group.patient, group.control]
        Weights: [1, -1]
        Test: t
    DummyContrasts:
      Test: t
      Contrasts: [age]
"""


def test_two_sample_with_demeaned_age(two_groups, tmp_path):
    model = _write_model(tmp_path / "model.yaml", TWO_SAMPLE_MODEL)
    summary = _run(two_groups["root"], tmp_path / "out", "--model", str(model))
    analysis = summary["analyses"][0]
    assert analysis["columns"] == ["group.control", "group.patient", "age"]
    assert analysis["dof"] == N_TWO - 3
    mask_path, mask = _mask(summary, "faces")
    fitted = _nilearn_fit(two_groups["paths"], two_groups["design"], mask_path)
    for label, weights in [("facesPatientGtControl", [-1, 1, 0]), ("facesAge", [0, 0, 1])]:
        theirs = _nilearn_contrast(fitted, weights)
        z = _compare_maps(summary, label, theirs, mask)
        assert np.nanmax(np.abs(z)) > 4
        count, _ = _compare_thresholded(
            summary,
            label,
            "fdr05",
            theirs["z_score"],
            mask_path,
            method="fdr",
            alpha=0.05,
            two_sided=True,
        )
        assert count > 0


EXPRESSION_MODEL = """\
Name: expressions
BIDSModelVersion: "1.0.0"
Nodes:
  - Level: Dataset
    Name: expressions
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
      - Name: patientMinusControl
        Weights: "group.patient - group.control"
        Test: t
      - Name: meanOfGroups
        Weights: "(group.control + group.patient) / 2"
        Test: t
"""

EXPRESSION_F_MODEL = (
    EXPRESSION_MODEL
    + """\
      - Name: patientOrAge
        Weights: ["group.patient - group.control", "age"]
        Test: F
"""
)


def test_expression_contrasts(two_groups, tmp_path):
    model = _write_model(tmp_path / "model.yaml", EXPRESSION_MODEL)
    summary = _run(
        two_groups["root"], tmp_path / "out", "--model", str(model), "--height-control", "fdr"
    )
    mask_path, mask = _mask(summary, "faces")
    fitted = _nilearn_fit(two_groups["paths"], two_groups["design"], mask_path)
    for label, weights in [
        ("facesPatientMinusControl", [-1.0, 1.0, 0.0]),
        ("facesMeanOfGroups", [0.5, 0.5, 0.0]),
    ]:
        sidecar = _file(summary, f"contrast-{label}_stat-t_statmap.json")
        assert json.loads(sidecar.read_text())["ContrastWeights"] == [weights]
        _compare_maps(summary, label, _nilearn_contrast(fitted, weights), mask)


def test_expression_f_contrast(two_groups, tmp_path):
    model = _write_model(tmp_path / "model.yaml", EXPRESSION_F_MODEL)
    summary = _run(two_groups["root"], tmp_path / "out", "--model", str(model))
    mask_path, mask = _mask(summary, "faces")
    fitted = _nilearn_fit(two_groups["paths"], two_groups["design"], mask_path)
    theirs = _nilearn_contrast(fitted, [[-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], "F")
    z = _compare_maps(summary, "facesPatientOrAge", theirs, mask, stat="F")
    assert np.nanmax(z) > 4


# --------------------------------------------------------------------------- 3. paired


PAIRED_MODEL = """\
Name: paired
BIDSModelVersion: "1.0.0"
Input:
  contrast: [faces, houses]
Nodes:
  - Level: Dataset
    Name: paired
    GroupBy: []
    Transformations:
      Transformer: pybids-transforms-v1
      Instructions:
        - Name: Factor
          Input: [contrast]
        - Name: Factor
          Input: [subject]
    Model:
      Type: glm
      X: [contrast.faces, "subject.*"]
      Software:
        bids-group:
          Inference:
            HeightControl: bonferroni
            Alpha: 0.05
            TwoSided: true
    Contrasts:
      - Name: facesGtHouses
        ConditionList: [contrast.faces]
        Weights: [1]
        Test: t
"""


def test_paired_with_subject_columns(tmp_path):
    n_sub = 14
    rng = np.random.default_rng(33)
    maps = {}
    for i in range(n_sub):
        # A large subject-specific offset that only the subject columns can absorb.
        subject_mean = 3.0 * rng.standard_normal() * (1 + POS)
        maps[f"{i + 1:02d}", "faces"] = (subject_mean + _noise(rng) * 0.6 + 2.2 * POS) * SUPPORT
        maps[f"{i + 1:02d}", "houses"] = (subject_mean + _noise(rng) * 0.6 + 2.2 * NEG) * SUPPORT
    # A third contrast the model's Input must leave out.
    for i in range(n_sub):
        maps[f"{i + 1:02d}", "scrambled"] = (_noise(rng) + 5.0) * SUPPORT
    paths = _write_dataset(tmp_path / "ds", maps)
    model = _write_model(tmp_path / "model.yaml", PAIRED_MODEL)
    summary = _run(tmp_path / "ds", tmp_path / "out", "--model", str(model))
    analysis = summary["analyses"][0]
    assert analysis["n_maps"] == 2 * n_sub
    assert analysis["columns"] == ["contrast.faces"] + [
        f"subject.{i + 1:02d}" for i in range(n_sub)
    ]
    assert analysis["dof"] == n_sub - 1
    mask_path, mask = _mask(summary)
    files, rows = [], []
    for i in range(n_sub):
        for contrast in ("faces", "houses"):
            files.append(paths[f"{i + 1:02d}", contrast])
            row = {"faces": float(contrast == "faces")}
            row |= {f"s{j:02d}": float(j == i) for j in range(n_sub)}
            rows.append(row)
    design = pd.DataFrame(rows)
    theirs = _nilearn_contrast(_nilearn_fit(files, design, mask_path), [1.0] + [0.0] * n_sub)
    z = _compare_maps(summary, "facesGtHouses", theirs, mask)
    assert np.nanmax(z) > 5 and np.nanmin(z) < -5
    _compare_thresholded(
        summary,
        "facesGtHouses",
        "bonferroni05",
        theirs["z_score"],
        mask_path,
        method="bonferroni",
        alpha=0.05,
        two_sided=True,
    )


# --------------------------------------------------------------------------- 4. F, three groups


F_MODEL = """\
Name: three_groups
BIDSModelVersion: "1.0.0"
Nodes:
  - Level: Dataset
    Name: anova
    GroupBy: [contrast]
    Transformations:
      Transformer: pybids-transforms-v1
      Instructions:
        - Name: Factor
          Input: [group]
    Model:
      Type: glm
      X: ["group.*"]
      Software:
        bids-group:
          Inference:
            HeightControl: fdr
            Alpha: 0.05
    Contrasts:
      - Name: groupEffect
        ConditionList: [group.a, group.b, group.c]
        Weights:
          - [1, -1, 0]
          - [0, 1, -1]
        Test: F
"""


def test_f_contrast_three_groups(tmp_path):
    n_sub = 18
    rng = np.random.default_rng(44)
    groups = np.array(["a", "b", "c"] * (n_sub // 3))
    rng.shuffle(groups)
    level = {"a": 0.0, "b": 2.0, "c": -1.5}
    maps = {
        (f"{i + 1:02d}", "faces"): (_noise(rng) + level[g] * POS + 2.0) * SUPPORT
        for i, g in enumerate(groups)
    }
    participants = {
        "participant_id": [f"sub-{i + 1:02d}" for i in range(n_sub)],
        "group": list(groups),
    }
    paths = _write_dataset(tmp_path / "ds", maps, participants)
    model = _write_model(tmp_path / "model.yaml", F_MODEL)
    summary = _run(tmp_path / "ds", tmp_path / "out", "--model", str(model))
    mask_path, mask = _mask(summary, "faces")
    design = pd.DataFrame({g: (groups == g).astype(float) for g in "abc"})
    weights = [[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]]
    theirs = _nilearn_contrast(_nilearn_fit(list(paths.values()), design, mask_path), weights, "F")
    label = "facesGroupEffect"
    z = _compare_maps(summary, label, theirs, mask, stat="F")
    assert np.nanmax(z) > 4
    sidecar = json.loads(_file(summary, f"contrast-{label}_stat-F_statmap.json").read_text())
    assert sidecar["DegreesOfFreedom"] == [2, n_sub - 3]
    # Our F effect is the raw C @ beta, one volume per row (4-D); nilearn's is whitened by
    # sqrtm((C (X'X)^-1 C')^-1), so whiten ours the same way before comparing.
    effect = _volume(_file(summary, f"contrast-{label}_stat-effect_statmap.nii.gz"))
    assert effect.shape == (*SHAPE, 2)
    c = np.asarray(weights)
    x = design.to_numpy()
    whitening = np.real(sqrtm(np.linalg.inv(c @ np.linalg.inv(x.T @ x) @ c.T)))
    whitened = effect[mask] @ whitening.T
    eff_theirs = np.asarray(theirs["effect_size"].dataobj, dtype=np.float64)[mask]
    rel = np.abs(whitened - eff_theirs).max() / np.abs(eff_theirs).max()
    assert _record("F effect, whitened (rel.)", rel) <= EFFECT_RTOL
    # The F test is one-sided by nature, even though the default asks for two-sided tests.
    count, _ = _compare_thresholded(
        summary,
        label,
        "fdr05",
        theirs["z_score"],
        mask_path,
        method="fdr",
        alpha=0.05,
        two_sided=False,
    )
    assert count > 0


# --------------------------------------------------------------------------- 6. NaN borders


def test_nan_outside_subject_masks_gives_intersection_mask(tmp_path):
    n_sub = 15
    rng = np.random.default_rng(55)
    maps = {}
    expected = SUPPORT.copy()
    for i in range(n_sub):
        data = ((_noise(rng) + 1.2 * POS - 0.8 * NEG) * SUPPORT).astype(np.float32)
        data[~SUPPORT] = np.nan  # NaN, not 0, outside the brain (SPM style)
        # A different border slab per subject is NaN too.
        axis, side = rng.integers(3), rng.integers(2)
        depth = int(rng.integers(1, 4))
        index = [slice(None)] * 3
        index[axis] = slice(0, depth) if side == 0 else slice(SHAPE[axis] - depth, None)
        data[tuple(index)] = np.nan
        expected[tuple(index)] = False
        maps[f"{i + 1:02d}", "faces"] = data
    paths = _write_dataset(tmp_path / "ds", maps)
    summary = _run(tmp_path / "ds", tmp_path / "out")
    mask_path, mask = _mask(summary, "faces")
    np.testing.assert_array_equal(mask, expected)
    assert mask.sum() < SUPPORT.sum() - 100  # the slabs did cut the mask
    design = pd.DataFrame({"intercept": np.ones(n_sub)})
    theirs = _nilearn_contrast(_nilearn_fit(list(paths.values()), design, mask_path), [1.0])
    _compare_maps(summary, "faces", theirs, mask)


def test_smoothing_matches_nilearn(tmp_path):
    """--smoothing-fwhm vs SecondLevelModel(smoothing_fwhm): NaN become 0 before smoothing and
    the mask comes from the unsmoothed maps (nilearn smooths whole images, then masks)."""
    n_sub = 12
    rng = np.random.default_rng(66)
    maps = {}
    for i in range(n_sub):
        data = ((_noise(rng) + 1.0 * POS + 0.3) * SUPPORT).astype(np.float32)
        data[~SUPPORT] = np.nan
        data[: 1 + i % 3] = np.nan
        maps[f"{i + 1:02d}", "faces"] = data
    paths = _write_dataset(tmp_path / "ds", maps)
    summary = _run(tmp_path / "ds", tmp_path / "out", "--smoothing-fwhm", "6")
    mask_path, mask = _mask(summary, "faces")
    expected = SUPPORT.copy()
    expected[:3] = False
    np.testing.assert_array_equal(mask, expected)
    from nilearn.glm.second_level import SecondLevelModel

    model = SecondLevelModel(mask_img=str(mask_path), smoothing_fwhm=6, minimize_memory=False)
    design = pd.DataFrame({"intercept": np.ones(n_sub)})
    model = _quiet(model.fit, [str(p) for p in paths.values()], design_matrix=design)
    _compare_maps(summary, "faces", _nilearn_contrast(model, [1.0]), mask)


# --------------------------------------------------------------------------- 7. real data


@pytest.mark.skipif(not SPM_FACES.is_dir(), reason="shared data absent")
def test_real_spm_faces(tmp_path):
    """16 SPM con images (Analyze-style .hdr/.img NIfTI pairs, NaN outside subject masks)."""
    sources = sorted(SPM_FACES.glob("subject_*/con_0006.hdr"))
    assert len(sources) == 16
    root = tmp_path / "ds"
    write_description(root)
    paths = []
    for i, source in enumerate(sources):
        img = nib.load(source)  # a real conversion: read the pair, write .nii.gz
        sub = f"{i + 1:02d}"
        name = f"sub-{sub}_task-faces_contrast-facesGtScrambled_stat-effect_statmap.nii.gz"
        path = root / f"sub-{sub}" / "func" / name
        path.parent.mkdir(parents=True)
        nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine).to_filename(path)
        paths.append(path)
    summary = _run(root, tmp_path / "out", "--height-control", "fdr", "--alpha", "0.05")
    mask_path, mask = _mask(summary, "facesGtScrambled")
    finite = np.all([np.isfinite(np.asarray(nib.load(p).dataobj)) for p in paths], axis=0)
    nonzero = np.all([np.asarray(nib.load(p).dataobj) != 0 for p in paths], axis=0)
    np.testing.assert_array_equal(mask, finite & nonzero)
    design = pd.DataFrame({"intercept": np.ones(len(paths))})
    theirs = _nilearn_contrast(_nilearn_fit(paths, design, mask_path), [1.0])
    label = "facesGtScrambled"
    z = _compare_maps(summary, label, theirs, mask)
    assert np.nanmax(z) == pytest.approx(5.24, abs=0.01)  # README: nilearn peak z 5.24
    count, table = _compare_thresholded(
        summary,
        label,
        "fdr05",
        theirs["z_score"],
        mask_path,
        method="fdr",
        alpha=0.05,
        two_sided=True,
    )
    assert count > 0
    top = table.iloc[0]
    assert (top.peak_x, top.peak_y, top.peak_z) == (-39.0, -85.0, -14.0)  # README's MNI peak
