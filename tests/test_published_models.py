"""Published BIDS Stats Models files (``tests/data/models/``, see its README) run their Dataset
nodes through the real CLI.

The first-level maps are made here as the upstream (Run / Subject) node of each file would name
them: ``contrast-<label>`` of each of its contrast names. Every statistic is checked against an
independent computation (scipy's one-sample t-test; an F test by numpy least squares) on the
maps the node should receive, which is what shows that the edge ``Filter`` selected them.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from clicheck import check_failure, run_cli, run_ok
from conftest import make_bids_derivatives
from scipy import stats

from bids_group.errors import SpecError, UsageError
from bids_group.labels import first_level_labels, node_label
from bids_group.spec import load_specs, parse_specs

MODELS = Path(__file__).resolve().parent / "data" / "models"
DS003 = MODELS / "fitlins_ds000003_model-001_smdl.json"
EXAMPLE = MODELS / "stats-models_model-example_smdl.json"
WALKTHROUGH = MODELS / "stats-models_model-walkthrough_smdl.json"
DRAFT = MODELS / "fitlins_ds000117_model-001_smdl.json"
#: The contrasts ds000003's Run node writes (its Contrasts and DummyContrasts), plus one more.
DS003_CONTRASTS = ("word_gt_pseudo", "task_vs_baseline", "trial_type.word",
                   "trial_type.pseudoword", "other")  # fmt: skip


def _dataset(root: Path, names: tuple[str, ...], task: str, n_subjects: int = 6) -> Path:
    labels = tuple(first_level_labels(n)[0] for n in names)
    return make_bids_derivatives(root, n_subjects=n_subjects, contrasts=labels, task=task,
                                 shape=(4, 5, 4))  # fmt: skip


def _maps(ds: Path, label: str) -> np.ndarray:
    """The effect maps of one contrast, subject order, shape (n_subjects, n_voxels)."""
    paths = sorted(ds.rglob(f"*_contrast-{label}_stat-effect_statmap.nii.gz"))
    return np.stack([np.asarray(nib.load(p).dataobj).ravel() for p in paths])


def _stat(out: Path, node: str, label: str, stat: str) -> np.ndarray:
    pattern = f"*contrast-{label}_stat-{stat}_statmap.nii.gz"
    (path,) = (out / f"node-{node_label(node)}").glob(pattern)
    return np.asarray(nib.load(path).dataobj).ravel()


@pytest.fixture(scope="module")
def ds003(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _dataset(tmp_path_factory.mktemp("ds003") / "ds", DS003_CONTRASTS, "rhymejudgment")


def test_every_published_file_parses() -> None:
    t_test, f_test = load_specs(DS003)
    assert (t_test.node_name, f_test.node_name) == ("t-test", "F-test")
    assert t_test.edge_filter == {"contrast": ("task_vs_baseline", "word_gt_pseudo")}
    assert t_test.map_filters == {"task": "rhymejudgment",
                                  "contrast": ["taskVsBaseline", "wordGtPseudo"]}  # fmt: skip
    assert f_test.group_by == () and f_test.x == ("trial_type.word", "trial_type.pseudoword")
    assert f_test.contrasts[0].test == "F" and f_test.contrasts[0].weights.shape == (2, 2)
    (example,) = load_specs(EXAMPLE)
    assert example.node_name == "dataset" and example.edge_filter == {}
    (walkthrough,) = load_specs(WALKTHROUGH)
    assert walkthrough.input_filters == {"subject": ["01", "02", "03"], "task": "simon"}


def test_fitlins_leniencies_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="bids_group"):
        load_specs(DS003)
    assert "Nodes[1].Level: 'dataset' read as 'Dataset'" in caplog.text
    assert "Input.task: 'rhymejudgment' read as the list ['rhymejudgment']" in caplog.text
    assert "skipping Run-level node 'subject'" in caplog.text
    data = json.loads(EXAMPLE.read_text())
    data["Nodes"][2]["GroupBy"] = "contrast"
    data["Nodes"][2]["Model"]["X"] = 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bids_group"):
        (spec,) = parse_specs(data, source="example.json")
    assert spec.group_by == ("contrast",) and spec.x == ("intercept",)
    assert "GroupBy: 'contrast' read as the list ['contrast']" in caplog.text
    assert "Model.X: 1 read as the list [1]" in caplog.text


def test_ds000003_runs_both_dataset_nodes_on_their_filtered_maps(ds003: Path, tmp_path: Path):
    """t-test: one model per filtered contrast (scipy's t); F-test: the two trial types in one
    model with an indicator column each (numpy's F)."""
    out = tmp_path / "out"
    summary, _ = run_ok(ds003, out, "--model", DS003, "--no-report")
    assert summary["nodes"] == ["t-test", "F-test"]
    t_runs = [a for a in summary["analyses"] if a["node"] == "t-test"]
    assert sorted(a["group"]["contrast"] for a in t_runs) == ["taskVsBaseline", "wordGtPseudo"]
    for label in ("taskVsBaseline", "wordGtPseudo"):
        y = _maps(ds003, label)
        expected = stats.ttest_1samp(y, 0.0).statistic
        np.testing.assert_allclose(_stat(out, "t-test", label, "t"), expected, rtol=1e-4, atol=1e-4)
    (f_run,) = [a for a in summary["analyses"] if a["node"] == "F-test"]
    assert f_run["n_maps"] == 12
    assert f_run["columns"] == ["trial_type.word", "trial_type.pseudoword"]
    y = np.vstack([_maps(ds003, "trialTypeWord"), _maps(ds003, "trialTypePseudoword")])
    x = np.kron(np.eye(2), np.ones((6, 1)))  # indicator of each trial type
    rss1 = ((y - x @ np.linalg.lstsq(x, y, rcond=None)[0]) ** 2).sum(axis=0)
    expected_f = ((y**2).sum(axis=0) - rss1) / 2 / (rss1 / (12 - 2))
    np.testing.assert_allclose(_stat(out, "F-test", "anyWords", "F"), expected_f, rtol=1e-4)
    assert not list((out / "node-tTest").glob("*contrast-trialType*"))
    assert not list(out.rglob("*contrast-other*"))


def test_edge_filter_changes_the_maps_a_node_receives(ds003: Path, tmp_path: Path) -> None:
    """The same file without the Filters: the t-test node gets every contrast, and the F-test
    model every map (the other contrasts are rows of zeros in its indicator columns)."""
    data = json.loads(DS003.read_text())
    for edge in data["Edges"]:
        del edge["Filter"]
    model = tmp_path / "unfiltered_smdl.json"
    model.write_text(json.dumps(data))
    summary, _ = run_ok(ds003, tmp_path / "out", "--model", model, "--no-report")
    t_runs = [a for a in summary["analyses"] if a["node"] == "t-test"]
    assert len(t_runs) == len(DS003_CONTRASTS)
    (f_run,) = [a for a in summary["analyses"] if a["node"] == "F-test"]
    assert f_run["n_maps"] == 6 * len(DS003_CONTRASTS)


def test_filter_naming_a_contrast_without_maps_warns(ds003: Path, tmp_path: Path) -> None:
    data = json.loads(DS003.read_text())
    data["Edges"][0]["Filter"]["contrast"].append("words_minus_rest")
    model = tmp_path / "typo_smdl.json"
    model.write_text(json.dumps(data))
    code, _, err = run_cli(ds003, tmp_path / "out", "--model", model, "--no-report")
    assert code == 0, err
    assert "Edges[0].Filter: no map has contrast contrast-wordsMinusRest" in err


def test_fitlins_labels_are_matched(tmp_path: Path) -> None:
    """A contrast named ``faces-scrambled`` reaches the node whether its maps were labelled by
    bids-group's rule (facesMinusScrambled) or by fitlins' (facesScrambled)."""
    ds = make_bids_derivatives(tmp_path / "ds", n_subjects=5, contrasts=("facesScrambled", "x"),
                               task="stroop", shape=(3, 4, 3))  # fmt: skip
    data = json.loads(EXAMPLE.read_text())
    data["Edges"][1]["Filter"] = {"contrast": "faces-scrambled"}  # a scalar: read as a list
    model = tmp_path / "m_smdl.json"
    model.write_text(json.dumps(data))
    summary, _ = run_ok(ds, tmp_path / "out", "--model", model, "--no-report")
    assert [a["group"]["contrast"] for a in summary["analyses"]] == ["facesScrambled"]


def test_stats_models_examples_run(tmp_path: Path) -> None:
    """The specification's examples: the Subject node's contrast reaches the Dataset node (all
    maps: no Filter); the walkthrough's Input keeps subjects 01-03 of six."""
    ds = _dataset(tmp_path / "a", ("incongruent_vs_congruent",), "stroop")
    summary, _ = run_ok(ds, tmp_path / "out_a", "--model", EXAMPLE)
    (run,) = summary["analyses"]
    assert run["group"] == {"contrast": "incongruentVsCongruent"} and run["n_maps"] == 6
    expected = stats.ttest_1samp(_maps(ds, "incongruentVsCongruent"), 0.0).statistic
    got = _stat(tmp_path / "out_a", "dataset", "incongruentVsCongruent", "t")
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    ds = _dataset(tmp_path / "b", ("IvC",), "simon")
    summary, _ = run_ok(ds, tmp_path / "out_b", "--model", WALKTHROUGH, "--no-report")
    (run,) = summary["analyses"]
    assert run["subjects"] == ["01", "02", "03"] and run["node"] == "one-sample_dataset"
    expected = stats.ttest_1samp(_maps(ds, "IvC")[:3], 0.0).statistic
    got = _stat(tmp_path / "out_b", "one-sample_dataset", "IvC", "t")
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_written_model_validates_and_reads_back(ds003: Path, tmp_path: Path) -> None:
    """The resolved model of a two-node file (the edge Filters kept in Software.bids-group)
    is a valid BIDS Stats Model and reads back to the same nodes and filters."""
    bsm = pytest.importorskip("bsmschema.models", reason="bsmschema is not installed")
    run_ok(ds003, tmp_path / "out", "--model", DS003, "--no-report")
    (path,) = (tmp_path / "out").glob("model-*_smdl.json")
    written = json.loads(path.read_text())
    bsm.BIDSStatsModel.model_validate(written)
    assert [n["Name"] for n in written["Nodes"]] == ["t-test", "F-test"]
    again = parse_specs(written, source=path)
    for before, after in zip(load_specs(DS003), again, strict=True):
        assert after.edge_filter == before.edge_filter and after.x == before.x
        # Input is written with lists (the specification's form): the same selection.
        listed = {k: v if isinstance(v, list) else [v] for k, v in before.map_filters.items()}
        assert after.map_filters == listed


def _edited(tmp_path: Path, source: Path, edit) -> Path:
    data = json.loads(source.read_text())
    edit(data)
    path = tmp_path / f"edited_{source.name}"
    path.write_text(json.dumps(data))
    return path


def _chain(data: dict) -> None:
    """A second Dataset node fed by the first."""
    node = copy.deepcopy(data["Nodes"][2])
    node["Name"] = "second"
    data["Nodes"].append(node)
    data["Edges"].append({"Source": "dataset", "Destination": "second"})


def _two_edges(data: dict) -> None:
    data["Edges"].append({"Source": "run", "Destination": "dataset"})


def _group_by_variable(data: dict) -> None:
    data["Nodes"][2]["GroupBy"] = ["contrast", "group"]  # as NARPS: not supported


def _bad_filter(data: dict) -> None:
    data["Edges"][1]["Filter"] = {"contrast": {"name": "x"}}


UNSUPPORTED = {
    "draft Steps format": (None, ["Steps", "draft (pre-1.0)", "rename Steps to Nodes"]),
    "Dataset to Dataset edge": (_chain, ["Edges[2]", "'dataset'", "'second'", "does not feed"]),
    "two edges into a node": (_two_edges, ["Edges[2]", "second edge into Dataset node"]),
    "GroupBy a participants column": (_group_by_variable, ["node 'dataset'", "GroupBy 'group'"]),
    "Filter of a mapping": (_bad_filter, ["Edges[1].Filter.contrast", "must be"]),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_constructs_are_one_clear_error(ds003: Path, tmp_path: Path, capsys, case):
    edit, needles = UNSUPPORTED[case]
    model = DRAFT if edit is None else _edited(tmp_path, EXAMPLE, edit)
    ds = ds003 if edit is None else _dataset(tmp_path / "ds", ("incongruent_vs_congruent",),
                                             "stroop")  # fmt: skip
    argv = [ds, tmp_path / "out", "group", "--model", model]
    code = SpecError.exit_code if case != "GroupBy a participants column" else UsageError.exit_code
    err = check_failure(capsys, argv, tmp_path / "out", code, *needles)
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err


def _ds003_with(edit) -> dict:
    data = json.loads(DS003.read_text())
    edit(data)
    return data


def _recorded_and_edge_filter(data: dict) -> None:
    software = {"bids-group": {"Filter": {"contrast": ["word_gt_pseudo"]}}}
    data["Nodes"][1]["Model"]["Software"] = software


def _other_inference(data: dict) -> None:
    software = {"bids-group": {"Inference": {"HeightControl": "fdr"}}}
    data["Nodes"][2]["Model"]["Software"] = software


def _same_folder(data: dict) -> None:
    data["Nodes"][2]["Name"] = "t_test"
    data["Edges"][1]["Destination"] = "t_test"


def _input_and_filter_disagree(data: dict) -> None:
    data["Input"]["contrast"] = ["other"]


SPEC_ERRORS = {
    "Filter recorded and on the edge": (_recorded_and_edge_filter,
                                        ["Nodes[1].Model.Software.bids-group.Filter", "keep one"]),
    "different inference": (_other_inference, ["'t-test' and 'F-test'", "Inference"]),
    "same output folder": (_same_folder, ["'t-test' and 't_test'", "node-tTest/"]),
    "Input and Filter disagree": (_input_and_filter_disagree,
                                  ["Edges[0].Filter.contrast", "Input selects ['other']"]),
}  # fmt: skip


@pytest.mark.parametrize("case", SPEC_ERRORS)
def test_nodes_that_cannot_run_together_are_refused(case: str) -> None:
    edit, needles = SPEC_ERRORS[case]
    with pytest.raises(SpecError) as info:
        parse_specs(_ds003_with(edit), source="ds003.json")
    for needle in needles:
        assert needle in str(info.value), str(info.value)
