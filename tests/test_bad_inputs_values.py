"""Bad values: every option and model value is checked for type, finiteness and range before any
image is read, and the message names the option (or the model file and key) and the accepted
range. Each case runs the real CLI through the shared harness (tests/clicheck.py): exit code,
culprit named, stdout empty, OUT_DIR absent, no staging left, inputs untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from clicheck import check_failure
from conftest import make_bids_derivatives

from bids_group.cli import main


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    return make_bids_derivatives(tmp_path / "ds", n_subjects=6)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "results"


# ---- command-line options ---------------------------------------------------------------------

PERM = ("--permutation", "voxel")
CLI_CASES: dict[str, tuple[tuple[str, ...], str]] = {
    # name: (arguments, what the message must say besides "must be")
    "alpha nan": (("--alpha", "nan"), "--alpha == nan"),
    "alpha inf": (("--alpha", "inf"), "--alpha == inf"),
    "alpha -inf": (("--alpha", "-inf"), "--alpha == -inf"),
    "alpha 0": (("--alpha", "0"), "--alpha == 0.0"),
    "alpha 1": (("--alpha", "1"), "< 1"),
    "alpha denormal": (("--alpha", "1e-320"), ">= 1e-10"),
    "alpha text": (("--alpha", "abc"), "--alpha == 'abc'"),
    "threshold inf": (("--height-control", "none", "--threshold", "inf"), "--threshold == inf"),
    "threshold nan": (("--height-control", "none", "--threshold", "nan"), "--threshold == nan"),
    "threshold negative": (("--height-control", "none", "--threshold", "-1"), ">= 0"),
    "fwhm inf": (("--smoothing-fwhm", "inf"), "--smoothing-fwhm == inf"),
    "fwhm nan": (("--smoothing-fwhm", "nan"), "--smoothing-fwhm == nan"),
    "fwhm 1e300": (("--smoothing-fwhm", "1e300"), "<= 1000 mm"),
    "fwhm negative": (("--smoothing-fwhm", "-4"), "--smoothing-fwhm == -4.0"),
    "cluster threshold huge": (("--cluster-threshold", str(10**20)), "<= 2147483647 voxels"),
    "cluster threshold float": (("--cluster-threshold", "2.5"), "an integer"),
    "cluster threshold negative": (("--cluster-threshold", "-1"), "--cluster-threshold == -1"),
    "ari thresholds nan": (("--ari", "--ari-thresholds", "nan"), "--ari-thresholds == nan"),
    "ari thresholds inf": (("--ari", "--ari-thresholds", "3", "inf"), "--ari-thresholds == inf"),
    "ari thresholds zero": (("--ari", "--ari-thresholds", "0"), "> 0 (z)"),
    "ari alpha nan": (("--ari", "--ari-alpha", "nan"), "--ari-alpha == nan"),
    "n-perm zero": ((*PERM, "--n-perm", "0"), "--n-perm == 0"),
    "n-perm 10**12": ((*PERM, "--n-perm", str(10**12)), "<= 10000000"),
    "n-perm text": ((*PERM, "--n-perm", "1e4"), "--n-perm == '1e4'"),
    "seed negative": ((*PERM, "--seed", "-1"), "--seed == -1"),
    "seed 2**32": ((*PERM, "--seed", str(2**32)), "<= 4294967295"),
    "perm alpha nan": ((*PERM, "--perm-alpha", "nan"), "--perm-alpha == nan"),
    "perm alpha 1": ((*PERM, "--perm-alpha", "1"), "--perm-alpha == 1.0"),
    "forming p nan": (("--permutation", "cluster", "--cluster-forming-p", "nan"), "== nan"),
    "forming p as z": (("--permutation", "cluster", "--cluster-forming-p", "3.1"), "z = 3.1"),
    "forming p 0.5": (("--permutation", "cluster", "--cluster-forming-p", "0.5"), "< 0.5"),
    "tfce e 1e300": (("--permutation", "tfce", "--tfce-e", "1e300"), "--tfce-e == 1e+300"),
    "tfce e nan": (("--permutation", "tfce", "--tfce-e", "nan"), "--tfce-e == nan"),
    "tfce e zero": (("--permutation", "tfce", "--tfce-e", "0"), "> 0 and <= 10"),
    "tfce h inf": (("--permutation", "tfce", "--tfce-h", "inf"), "--tfce-h == inf"),
    "tfce h negative": (("--permutation", "tfce", "--tfce-h", "-2"), "--tfce-h == -2.0"),
    "tfce dh nan": (
        ("--permutation", "tfce", "--tfce-integration", "fsl", "--tfce-dh", "nan"),
        "--tfce-dh == nan",
    ),
    "tfce dh zero": (
        ("--permutation", "tfce", "--tfce-integration", "fsl", "--tfce-dh", "0"),
        "--tfce-dh == 0.0",
    ),
    "n-jobs zero": (("--n-jobs", "0"), "--n-jobs == 0"),
    "n-jobs negative": (("--n-jobs", "-5"), "--n-jobs == -5"),
    "n-jobs nan": (("--n-jobs", "nan"), "--n-jobs == 'nan'"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES), ids=str)
def test_bad_option_value(capsys, ds, out, case):
    args, needle = CLI_CASES[case]
    check_failure(capsys, [ds, out, "group", "--no-report", *args], out, 64, needle, "must be")


def test_underscore_spelling_is_named_as_typed(capsys, ds, out):
    check_failure(capsys, [ds, out, "group", "--smoothing_fwhm", "inf"], out, 64, "--smoothing")


# ---- the model file's Inference block ---------------------------------------------------------

MODEL = """\
Name: values
BIDSModelVersion: 1.0.0
Nodes:
  - Level: Dataset
    Name: oneSample
    GroupBy: [contrast]
    Model:
      Type: glm
      X: [1]
      Software:
        bids-group:
          Inference: {INFERENCE}
    DummyContrasts: {Test: t}
"""

MODEL_CASES: dict[str, tuple[str, str]] = {
    # name: (Inference block, key named in the message)
    "Alpha nan": ("{Alpha: .nan}", "Inference.Alpha == nan"),
    "Alpha inf": ("{Alpha: .inf}", "Inference.Alpha == inf"),
    "Alpha string": ("{Alpha: '0.05'}", "Inference.Alpha == '0.05'"),
    "Threshold inf": ("{HeightControl: none, Threshold: .inf}", "Inference.Threshold == inf"),
    "SmoothingFWHM huge": ("{SmoothingFWHM: 1.0e+300}", "Inference.SmoothingFWHM == 1e+300"),
    "SmoothingFWHM nan": ("{SmoothingFWHM: .nan}", "Inference.SmoothingFWHM == nan"),
    "ClusterThreshold huge int": (f"{{ClusterThreshold: {10**400}}}", "ClusterThreshold =="),
    "ClusterThreshold bool": ("{ClusterThreshold: true}", "ClusterThreshold == True"),
    "ARIThresholds nan": ("{ARI: true, ARIThresholds: [3, .nan]}", "ARIThresholds[1] == nan"),
    "ARIAlpha -inf": ("{ARI: true, ARIAlpha: -.inf}", "Inference.ARIAlpha == -inf"),
    "NPermutations 10**12": (
        f"{{Permutation: voxel, NPermutations: {10**12}}}",
        "NPermutations == 1000000000000",
    ),
    "NPermutations float": ("{Permutation: voxel, NPermutations: 1.0e+4}", "NPermutations =="),
    "Seed 2**40": (f"{{Permutation: voxel, Seed: {2**40}}}", "Seed == 1099511627776"),
    "PermutationAlpha nan": ("{Permutation: voxel, PermutationAlpha: .nan}", "PermutationAlpha"),
    "ClusterFormingP as z": ("{Permutation: cluster, ClusterFormingP: 3.1}", "z = 3.1"),
    "TFCE E huge": ("{Permutation: tfce, TFCE: {E: 1.0e+300}}", "TFCE.E == 1e+300"),
    "TFCE H nan": ("{Permutation: tfce, TFCE: {H: .nan}}", "TFCE.H == nan"),
    "TFCE dh negative": (
        "{Permutation: tfce, TFCE: {Integration: fsl, dh: -1}}",
        "TFCE.dh == -1",
    ),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES), ids=str)
def test_bad_model_inference_value(capsys, ds, out, tmp_path, case):
    block, needle = MODEL_CASES[case]
    model = tmp_path / "model.yaml"
    model.write_text(MODEL.replace("{INFERENCE}", block))
    args = [ds, out, "group", "--no-report", "--model", model]
    check_failure(capsys, args, out, 64, "model.yaml", needle, "must be")


# ---- contrast weights -------------------------------------------------------------------------

WEIGHTS_MODEL = """\
Name: weights
BIDSModelVersion: 1.0.0
Nodes:
  - Level: Dataset
    Name: oneSample
    GroupBy: [contrast]
    Model: {Type: glm, X: [1]}
    Contrasts:
      - {Name: odd, ConditionList: [1], Weights: WEIGHTS, Test: TEST}
"""

#: Weights are refused (not normalised), see spec._check_weight_scale: the effect and variance
#: maps depend on the scale, and 1e308 / 1e-320 are typos.
WEIGHT_CASES: dict[str, tuple[str, str, str]] = {
    "overflowing 1e308": ("[1.0e+308]", "t", "weight 1e+308"),
    "denormal 1e-320": ("[1.0e-320]", "t", "weight 1e-320"),
    "tiny 1e-200": ("[1.0e-200]", "t", "weight 1e-200"),
    "nan": ("[.nan]", "t", "finite"),
    "inf": ("[.inf]", "t", "finite"),
    "F row denormal": ("[[1.0e-320]]", "F", "weight 1e-320"),
    "expression overflow": ("'1e400*intercept'", "t", "too large"),
    "expression product overflow": ("'1e200*1e200*intercept'", "t", "overflows"),
    "expression huge": ("'1e308*intercept'", "t", "weight 1e+308"),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_CASES), ids=str)
def test_bad_contrast_weights(capsys, ds, out, tmp_path, case):
    weights, test, needle = WEIGHT_CASES[case]
    model = tmp_path / "model.yaml"
    model.write_text(WEIGHTS_MODEL.replace("WEIGHTS", weights).replace("TEST", test))
    args = [ds, out, "group", "--no-report", "--model", model]
    check_failure(capsys, args, out, 64, "model.yaml", "Contrasts[0]", needle)


def test_weights_at_the_edges_of_the_range_run(capsys, ds, tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text(WEIGHTS_MODEL.replace("WEIGHTS", "[1.0e-10]").replace("TEST", "t"))
    assert main([str(ds), str(tmp_path / "o1"), "group", "--no-report", "--model", str(model)]) == 0
    capsys.readouterr()


# ---- valid but almost surely a mistake: a warning, and the run goes on -------------------------


def _run_warnings(capsys, args: list) -> str:
    """Run, expecting success; return stderr (where the CLI logs warnings)."""
    assert main([str(a) for a in args]) == 0
    return capsys.readouterr().err


def test_fwhm_wider_than_the_field_of_view_warns(capsys, ds, tmp_path):
    # the maps are 6 x 7 x 8 voxels of 2 mm: a field of view of at most 16 mm
    err = _run_warnings(capsys, [ds, tmp_path / "o", "group", "--no-report",
                                 "--smoothing-fwhm", "500", "-q"])  # fmt: skip
    assert "WARNING: smoothing FWHM 500 mm is wider than the field of view" in err


def test_cluster_threshold_larger_than_the_mask_warns(capsys, ds, tmp_path):
    err = _run_warnings(capsys, [ds, tmp_path / "o", "group", "--no-report",
                                 "--cluster-threshold", "100000", "-q"])  # fmt: skip
    assert "WARNING: cluster threshold 100000 voxels > the mask's" in err


# ---- missing values spelled otherwise than n/a --------------------------------------------------

AGE_MODEL = """\
Name: age
BIDSModelVersion: 1.0.0
Nodes:
  - Level: Dataset
    Name: ageEffect
    GroupBy: [contrast]
    TRANSFORMATIONS
    Model: {Type: glm, X: [1, age]}
    DummyContrasts: {Test: t}
"""
DEMEAN = "Transformations: {Instructions: [{Name: Demean, Input: [age]}]}"


def _participants(ds: Path, cell: str) -> None:
    rows = ["participant_id\tage\tgroup"]
    for i in range(1, 7):
        age = cell if i in (2, 5) else str(20 + i)
        rows.append(f"sub-0{i}\t{age}\t{'patient' if i % 2 else 'control'}")
    (ds / "participants.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")


@pytest.mark.parametrize("spelling", ["NA", "nan", "NaN", "N/A", "null", "NULL", "None", "-", "."])
@pytest.mark.parametrize("transform", [False, True], ids=["in X", "in Demean"])
def test_missing_value_spelled_otherwise(capsys, ds, out, tmp_path, spelling, transform):
    _participants(ds, spelling)
    model = tmp_path / "model.yaml"
    model.write_text(AGE_MODEL.replace("TRANSFORMATIONS", DEMEAN if transform else ""))
    args = [ds, out, "group", "--no-report", "--model", model]
    err = check_failure(capsys, args, out, 65, f"holds {spelling!r}", "sub-02, sub-05",
                        "BIDS spells a missing value n/a", "'age'")  # fmt: skip
    assert "Factor" not in err  # the old, wrong advice


@pytest.mark.parametrize("cell", ["", " ", "n/a ", " n/a"])
def test_blank_and_padded_n_a_are_missing_values(capsys, ds, out, tmp_path, cell):
    _participants(ds, cell)
    model = tmp_path / "model.yaml"
    model.write_text(AGE_MODEL.replace("TRANSFORMATIONS", ""))
    args = [ds, out, "group", "--no-report", "--model", model]
    check_failure(capsys, args, out, 65, "missing or non-finite values in 'age'", "sub-02")


# ---- encodings ---------------------------------------------------------------------------------


def test_participants_not_utf8(capsys, ds, out):
    (ds / "participants.tsv").write_bytes(
        "participant_id\tsite\nsub-01\tZürich\n".encode("latin-1")
    )
    check_failure(capsys, [ds, out, "group", "--no-report"], out, 65, "participants.tsv",
                  "line 2, column 9 is not UTF-8", "byte 0xfc")  # fmt: skip


def test_participants_utf16(capsys, ds, out):
    (ds / "participants.tsv").write_bytes("participant_id\tage\nsub-01\t20\n".encode("utf-16"))
    check_failure(capsys, [ds, out, "group", "--no-report"], out, 65, "participants.tsv",
                  "line 1, column 1 is not UTF-8")  # fmt: skip


def test_participants_with_byte_order_mark_is_read(capsys, ds, tmp_path):
    text = (ds / "participants.tsv").read_text()
    (ds / "participants.tsv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert main([str(ds), str(tmp_path / "o"), "group", "--no-report", "-q"]) == 0
    capsys.readouterr()


def test_model_not_utf8(capsys, ds, out, tmp_path):
    model = tmp_path / "model.yaml"
    model.write_bytes(MODEL.replace("{INFERENCE}", "{}").encode() + b"# caf\xe9\n")
    check_failure(capsys, [ds, out, "group", "--model", model], out, 64, "model.yaml",
                  "line 14, column 6 is not UTF-8")  # fmt: skip


def test_model_utf16(capsys, ds, out, tmp_path):
    """Found by the fuzzer: a model saved as UTF-16 was exit 1 (UnicodeDecodeError)."""
    model = tmp_path / "model.yaml"
    model.write_bytes(MODEL.replace("{INFERENCE}", "{}").encode("utf-16"))
    check_failure(capsys, [ds, out, "group", "--model", model], out, 64, "model.yaml",
                  "line 1, column 1 is not UTF-8 (byte 0xff)")  # fmt: skip


def test_model_cut_utf8_sequence(capsys, ds, out, tmp_path):
    """Found by the fuzzer: a multi-byte character cut in two (exit 1 before)."""
    model = tmp_path / "model.yaml"
    model.write_bytes(MODEL.replace("{INFERENCE}", "{}").encode() + "# é".encode()[:-1])
    check_failure(capsys, [ds, out, "group", "--model", model], out, 64, "model.yaml",
                  "line 14, column 3 is not UTF-8")  # fmt: skip


def test_filter_file_not_utf8(capsys, ds, out, tmp_path):
    path = tmp_path / "filter.json"
    path.write_bytes(b'{"task": "f\xe4ces"}')
    check_failure(capsys, [ds, out, "group", "--bids-filter-file", path], out, 64, "filter.json",
                  "line 1, column 12 is not UTF-8")  # fmt: skip


def test_participants_ragged_rows(capsys, ds, out):
    (ds / "participants.tsv").write_text("participant_id\tage\nsub-01\t20\t3\t4\n")
    check_failure(capsys, [ds, out, "group", "--no-report"], out, 65, "participants.tsv",
                  "line 2 has 4 tab-separated cells but the header has 2")  # fmt: skip


def test_participants_empty_file(capsys, ds, out):
    (ds / "participants.tsv").write_text("")
    check_failure(capsys, [ds, out, "group", "--no-report"], out, 65, "participants.tsv",
                  "is empty")  # fmt: skip


# ---- maps not named as BIDS statistical derivatives -------------------------------------------


def _foreign_layout(root: Path, names: list[str]) -> Path:
    src = next(make_bids_derivatives(root.parent / "src", n_subjects=1).rglob("*.nii.gz"))
    root.mkdir()
    (root / "dataset_description.json").write_text(
        '{"Name": "x", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}'
    )
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(src.read_bytes())
    return root


@pytest.mark.parametrize(
    "names",
    [["sub-01/con_0001.nii", "sub-02/con_0001.nii"], ["sub-01/sub-01_cope1.nii.gz"]],
    ids=["SPM", "FSL"],
)
def test_spm_or_fsl_names_point_to_the_readme(capsys, tmp_path, out, names):
    root = _foreign_layout(tmp_path / "maps", names)
    needles = (names[0], "stat-effect_statmap.nii.gz", "Bringing your own first-level maps")
    err = check_failure(capsys, [root, out, "group"], out, 18, *needles)
    assert "Change the model Input" not in err  # renaming is the answer, not a filter


def test_no_nifti_at_all_reads_cleanly(capsys, tmp_path, out):
    root = _foreign_layout(tmp_path / "maps", [])
    err = check_failure(capsys, [root, out, "group"], out, 18, "no file has extension",
                        "Bringing your own first-level maps")  # fmt: skip
    assert "with  has" not in err


def test_t_maps_only_says_effect_maps_are_fitted(capsys, tmp_path, out):
    names = ["sub-01/func/sub-01_task-faces_contrast-faces_stat-t_statmap.nii.gz"]
    root = _foreign_layout(tmp_path / "maps", names)
    check_failure(capsys, [root, out, "group"], out, 18, "stat values present: t",
                  "fits effect maps", '{"stat": "t"}')  # fmt: skip


def test_participants_duplicate_column(capsys, ds, out):
    (ds / "participants.tsv").write_text("participant_id\tage\tage\nsub-01\t20\t21\n")
    check_failure(capsys, [ds, out, "group", "--no-report"], out, 65, "participants.tsv",
                  "'age' appear more than once")  # fmt: skip


def test_millions_of_relabellings_warn(tmp_path, caplog):
    """More than 10^6 relabellings (not an exhaustive enumeration) is a warning, logged when the
    permutations are planned, before any image is read (no kernel runs here)."""
    from bids_group.config import resolve_inference
    from bids_group.inputs import collect_inputs
    from bids_group.pipeline import plan_analyses
    from bids_group.pipeline_permutation import plan_permutations
    from bids_group.spec import default_spec

    ds = make_bids_derivatives(tmp_path / "big", n_subjects=21, shape=(2, 2, 2))
    spec = default_spec()
    inputs = collect_inputs(ds, input_filters=spec.input_filters, group_by=spec.group_by)
    analyses = plan_analyses(spec, inputs.maps, inputs.participants)
    for n_perm, warned in ((2_000_000, True), (10_000, False)):
        caplog.clear()
        inference = resolve_inference({"permutation": ("voxel",), "n_perm": n_perm}, None)
        with caplog.at_level(logging.WARNING, logger="bids_group"):
            plan_permutations(analyses, inference)
        assert ("2000001 relabellings: the run may take hours" in caplog.text) == warned


def test_decimal_comma_is_named(capsys, ds, out, tmp_path):
    _participants(ds, "23,5")
    model = tmp_path / "model.yaml"
    model.write_text(AGE_MODEL.replace("TRANSFORMATIONS", ""))
    args = [ds, out, "group", "--no-report", "--model", model]
    err = check_failure(capsys, args, out, 65, "decimal comma", "'23,5'", "sub-02, sub-05")
    assert "Factor" not in err


def test_dataset_description_not_utf8(capsys, ds, out):
    (ds / "dataset_description.json").write_bytes(b'{"Name": "caf\xe9", "BIDSVersion": "1.9.0"}')
    check_failure(capsys, [ds, out, "group"], out, 16, "dataset_description.json",
                  "line 1, column 14 is not UTF-8")  # fmt: skip


@pytest.mark.parametrize("separator", [",", ";"])
def test_participants_comma_separated(capsys, ds, out, separator):
    (ds / "participants.tsv").write_text(f"participant_id{separator}age\nsub-01{separator}20\n")
    check_failure(capsys, [ds, out, "group", "--no-report"], out, 65, "participants.tsv",
                  f"separated by {separator!r}, not tabs")  # fmt: skip


def test_factor_level_that_looks_missing_warns(capsys, ds, tmp_path):
    text = (ds / "participants.tsv").read_text().replace("patient", "NA", 1)
    (ds / "participants.tsv").write_text(text)
    model = tmp_path / "model.yaml"
    model.write_text(
        "Name: groups\nBIDSModelVersion: 1.0.0\nNodes:\n  - Level: Dataset\n    Name: groups\n"
        "    GroupBy: [contrast]\n"
        "    Transformations: {Instructions: [{Name: Factor, Input: [group]}]}\n"
        "    Model: {Type: glm, X: ['group.*']}\n    DummyContrasts: {Test: t}\n"
    )
    err = _run_warnings(capsys, [ds, tmp_path / "o", "group", "--no-report", "-q",
                                 "--model", model])  # fmt: skip
    assert "Transformations.Instructions[0]: Factor(group) makes a level of 'NA' (sub-02)" in err
    assert "BIDS spells a missing value n/a" in err


def test_model_with_a_control_character(capsys, ds, out, tmp_path):
    """Found by the fuzzer: PyYAML's message for a control character spans two lines."""
    model = tmp_path / "model.yaml"
    model.write_bytes(b"\x1fnull\n...\n")
    err = check_failure(capsys, [ds, out, "group", "--model", model], out, 64, "model.yaml",
                        "line 1, column 1: the character U+001F is not allowed")  # fmt: skip
    assert len(err.splitlines()) == 1
