"""Tests for bids_group.spec: loading, validation messages, inference block, round trip."""

from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from bids_group.errors import MissingInputError, SpecError
from bids_group.expression import ExpressionError, parse_constant, parse_linear
from bids_group.spec import (
    INFERENCE_KEYS,
    InferenceDefaults,
    default_spec,
    load_spec,
    parse_spec,
    resolved_model_dict,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _model() -> dict[str, Any]:
    """A small valid two-group model to mutate."""
    return {
        "Name": "test",
        "BIDSModelVersion": "1.0.0",
        "Input": {"task": "faces", "subject": ["01", "02"]},
        "Nodes": [
            {
                "Level": "Dataset",
                "Name": "groups",
                "GroupBy": ["contrast"],
                "Transformations": {
                    "Transformer": "pybids-transforms-v1",
                    "Instructions": [{"Name": "Factor", "Input": ["group"]}],
                },
                "Model": {"Type": "glm", "X": ["group.control", "group.patient"]},
                "Contrasts": [
                    {
                        "Name": "patientGtControl",
                        "ConditionList": ["group.patient", "group.control"],
                        "Weights": [1, -1],
                        "Test": "t",
                    }
                ],
            }
        ],
    }


def _write(tmp_path: Path, data: Any, name: str = "model.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------
# Valid files


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads_and_round_trips(path: Path) -> None:
    spec = load_spec(path)
    assert spec.source == path
    assert spec.contrasts or spec.dummy_contrasts
    again = parse_spec(resolved_model_dict(spec), source="resolved.json")
    assert again.x == spec.x and again.group_by == spec.group_by
    assert again.transformations == spec.transformations
    assert again.inference == spec.inference
    for a, b in zip(again.contrasts, spec.contrasts, strict=True):
        assert (a.name, a.condition_list, a.test) == (b.name, b.condition_list, b.test)
        np.testing.assert_array_equal(a.weights, b.weights)


def test_example_configs_cover_the_documented_designs() -> None:
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert {"one_sample", "two_sample_age", "paired", "f_test_three_groups",
            "expression_contrast", "vbm_gray_matter"} <= names  # fmt: skip
    vbm = load_spec(CONFIGS / "vbm_gray_matter.yaml")
    assert vbm.input_filters == {"space": "MNI152NLin2009cAsym", "label": "GM", "suffix": "probseg"}
    assert vbm.inference.smoothing_fwhm == 8.0


def test_default_spec() -> None:
    spec = default_spec()
    assert spec.group_by == ("contrast",)
    assert spec.x == ("intercept",)
    assert spec.dummy_contrasts == ("intercept",)
    assert spec.contrasts == () and spec.transformations == ()
    assert spec.source is None
    resolved = resolved_model_dict(spec)
    assert resolved["Nodes"][0]["Model"]["X"] == [1]
    json.dumps(resolved)


def test_valid_model_normalised(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, _model()))
    assert spec.name == "test" and spec.node_name == "groups"
    assert spec.input_filters == {"task": "faces", "subject": ["01", "02"]}
    assert spec.transformations == ({"Name": "Factor", "Input": ["group"]},)
    (contrast,) = spec.contrasts
    assert contrast.weights.shape == (1, 2) and contrast.weights.dtype == np.float64
    assert spec.dummy_contrasts is None


def test_json_with_tabs_and_lowercase_level_and_other_nodes_ignored(tmp_path, caplog) -> None:
    model = _model()
    model["Nodes"].insert(0, {"Level": "Subject", "Name": "subj", "GroupBy": ["subject"],
                              "Model": {"Type": "glm", "X": [1]}})  # fmt: skip
    model["Nodes"][1]["Level"] = "dataset"
    model["Edges"] = [{"Source": "subj", "Destination": "groups"}]
    path = _write(tmp_path, json.dumps(model, indent="\t"), "model.json")
    with caplog.at_level("INFO"):
        spec = load_spec(path)
    assert spec.node_name == "groups"
    assert "skipping Subject-level node" in caplog.text


def test_bare_transformation_list_and_intercept_forms(tmp_path: Path) -> None:
    model = _model()
    node = model["Nodes"][0]
    node["Transformations"] = [{"Name": "Demean", "Input": "age"}]
    node["Model"]["X"] = [1, "age"]
    node["Contrasts"] = [{"Name": "age", "ConditionList": ["age"], "Weights": [1], "Test": "t"}]
    node["DummyContrasts"] = {"Test": "t", "Contrasts": [1]}
    spec = parse_spec(model)
    assert spec.transformations == ({"Name": "Demean", "Input": ["age"]},)
    assert spec.x == ("intercept", "age") and spec.dummy_contrasts == ("intercept",)


def test_f_contrast_and_fraction_strings() -> None:
    model = _model()
    model["Nodes"][0]["Contrasts"] = [
        {"Name": "F", "ConditionList": ["group.control", "group.patient"],
         "Weights": [[1, 0], [0, "1/3"]], "Test": "F"},
        {"Name": "F1", "ConditionList": ["group.control"], "Weights": [1], "Test": "F"},
    ]  # fmt: skip
    f2, f1 = parse_spec(model).contrasts
    np.testing.assert_allclose(f2.weights, [[1, 0], [0, 1 / 3]])
    assert f1.weights.shape == (1, 1)


def test_expression_contrasts() -> None:
    model = _model()
    model["Nodes"][0]["Contrasts"] = [
        {"Name": "diff", "Weights": "group.patient - group.control", "Test": "t"},
        {"Name": "mean", "Weights": "(group.patient + group.control)/2", "Test": "t",
         "ConditionList": ["group.control", "group.patient"]},
        {"Name": "F", "Weights": ["group.patient", "group.control"], "Test": "F"},
    ]  # fmt: skip
    diff, mean, f = parse_spec(model).contrasts
    assert diff.condition_list == ("group.patient", "group.control")
    np.testing.assert_array_equal(diff.weights, [[1, -1]])
    assert diff.expression == "group.patient - group.control"
    assert mean.condition_list == ("group.control", "group.patient")
    np.testing.assert_array_equal(mean.weights, [[0.5, 0.5]])
    np.testing.assert_array_equal(f.weights, [[1, 0], [0, 1]])


def test_dummy_contrasts_true_means_every_x_entry() -> None:
    model = _model()
    model["Nodes"][0]["DummyContrasts"] = True
    assert parse_spec(model).dummy_contrasts == ("group.control", "group.patient")


def test_inference_block() -> None:
    model = _model()
    model["Nodes"][0]["Model"]["Software"] = {
        "SPM": {"Whatever": 1},  # other software: ignored
        "bids-group": {"Inference": {"HeightControl": "FDR", "Alpha": 0.01, "TwoSided": True,
                                     "ClusterThreshold": 5, "Connectivity": 18,
                                     "SmoothingFWHM": 6}},
    }  # fmt: skip
    inference = parse_spec(model).inference
    assert inference == InferenceDefaults(
        height_control="fdr", alpha=0.01, two_sided=True, cluster_threshold=5, connectivity=18,
        smoothing_fwhm=6.0,
    )  # fmt: skip


def test_inference_keys_table_is_the_single_place_to_extend(monkeypatch) -> None:
    monkeypatch.setitem(INFERENCE_KEYS, "AriAlpha", ("ari_alpha", lambda v, where: float(v)))
    model = _model()
    model["Nodes"][0]["Model"]["Software"] = {"bids-group": {"Inference": {"AriAlpha": 0.1}}}
    assert parse_spec(model).inference.extra == {"ari_alpha": 0.1}


# ----------------------------------------------------------------------------------------------
# Malformed models: (mutation, message fragments). Every one is a SpecError naming the field.


def _set(path: tuple, value: Any):
    def mutate(model: dict) -> dict:
        target = model
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return model

    return mutate


_DELETE = object()
N0 = ("Nodes", 0)
C0 = (*N0, "Contrasts", 0)

MALFORMED = {
    "missing Name": (_set(("Name",), _DELETE), ["model.yaml: ", "missing required key 'Name'"]),
    "missing version": (_set(("BIDSModelVersion",), _DELETE), ["'BIDSModelVersion'"]),
    "unknown top key": (_set(("Node",), []), ["unknown key 'Node'", "did you mean 'Nodes'"]),
    "lowercase key": (_set(("name",), "x"), ["unknown key 'name'", "did you mean 'Name'"]),
    "no dataset node": (_set((*N0, "Level"), "Subject"), ["no node has Level: Dataset"]),
    "bad level": (_set((*N0, "Level"), "Datset"), ["Nodes[0].Level", "did you mean 'Dataset'"]),
    "unknown node key": (_set((*N0, "Contrast"), []), ["Nodes[0]: unknown key 'Contrast'",
                                                       "did you mean 'Contrasts'"]),
    # A scalar string is read as a one-item list, as fitlins does (tests/test_published_models).
    "GroupBy mapping": (_set((*N0, "GroupBy"), {"contrast": 1}),
                        ["GroupBy must be a list of entity names, got {'contrast': 1}"]),
    "GroupBy typo": (_set((*N0, "GroupBy"), ["contrasts"]), ["did you mean 'contrast'"]),
    "X not list": (_set((*N0, "Model", "X"), {"age": 1}), ["Model.X", "must be a list"]),
    "X empty": (_set((*N0, "Model", "X"), []), ["X is empty"]),
    "X duplicate": (_set((*N0, "Model", "X"), ["a", "a"]), ["'a' more than once"]),
    "X zero": (_set((*N0, "Model", "X"), [0, "a"]), ["Model.X[0]", "leave out 1"]),
    "model type": (_set((*N0, "Model", "Type"), "glmm"), ["use glm", "or meta"]),
    "formula": (_set((*N0, "Model", "Formula"), "y ~ 1"), ["formulas are not supported"]),
    "model key typo": (_set((*N0, "Model", "Softwear"), {}), ["did you mean 'Software'"]),
    "weights length": (_set((*C0, "Weights"), [1, -1, 0]),
                       ["Contrasts[0].Weights", "3 weight(s)", "ConditionList has 2"]),
    "test value": (_set((*C0, "Test"), "T"), ["Contrasts[0].Test", "did you mean 't'"]),
    "test pass": (_set((*C0, "Test"), "pass"), ["'pass' is not supported"]),
    "t with 2-D": (_set((*C0, "Weights"), [[1, 0], [0, 1]]),
                   ["a t contrast takes one row", "2 rows", "Test: F"]),
    "F ragged": (_set((*C0,), {"Name": "f", "ConditionList": ["a", "b"], "Test": "F",
                               "Weights": [[1, 0], [1]]}), ["Weights[1]", "1 weight(s)"]),
    "F mixed": (_set((*C0,), {"Name": "f", "ConditionList": ["a", "b"], "Test": "F",
                              "Weights": [[1, 0], 1]}), ["mixes numbers and lists"]),
    "weight not number": (_set((*C0, "Weights"), [1, True]), ["Weights[1]", "must be numbers"]),
    "zero weights": (_set((*C0, "Weights"), [0, 0]), ["all weights are zero"]),
    "no ConditionList": (_set((*C0, "ConditionList"), _DELETE), ["missing 'ConditionList'"]),
    "contrast key typo": (_set((*C0, "Weigths"), [1]), ["did you mean 'Weights'"]),
    "duplicate contrast": (lambda m: (m["Nodes"][0]["Contrasts"].append(
        dict(m["Nodes"][0]["Contrasts"][0])) or m), ["'patientGtControl' is used twice"]),
    "same label": (lambda m: (m["Nodes"][0]["Contrasts"].extend([
        {"Name": "a-b", "ConditionList": ["group.patient"], "Weights": [1], "Test": "t"},
        {"Name": "a - b", "ConditionList": ["group.patient"], "Weights": [1], "Test": "t"}])
        or m), ["both get the file label 'aMinusB'"]),
    "no contrasts": (_set((*N0, "Contrasts"), []), ["defines no contrast"]),
    "expression unknown op": (_set((*C0, "Weights"), "a ^ b"), ["unexpected character '^'"]),
    "expression nonlinear": (_set((*C0, "Weights"), "a * b"), ["not linear"]),
    "expression constant": (_set((*C0, "Weights"), "a - b + 1"), ["constant term"]),
    "expression outside ConditionList": (_set((*C0, "Weights"), "group.patient - age"),
                                         ["uses 'age'", "not in ConditionList"]),
    "dummy not in X": (_set((*N0, "DummyContrasts"), {"Test": "t", "Contrasts": ["age"]}),
                       ["DummyContrasts.Contrasts[0]", "'age' is not in Model.X"]),
    "dummy F": (_set((*N0, "DummyContrasts"), {"Test": "F"}), ["supports only 't'"]),
    "unknown transform": (_set((*N0, "Transformations", "Instructions", 0, "Name"), "Demaen"),
                          ["Instructions[0].Name", "did you mean 'Demean'"]),
    "transformer": (_set((*N0, "Transformations", "Transformer"), "fsl"),
                    ["only 'pybids-transforms-v1'"]),
    "input entity typo": (_set(("Input", "taks"), "x"), ["unknown entity 'taks'",
                                                         "did you mean 'task'"]),
    "input subject number": (_set(("Input", "subject"), [1, 2]), ["read as a number",
                                                                  "quote it"]),
    "edge unknown node": (_set(("Edges",), [{"Source": "x", "Destination": "groups"}]),
                          ["Edges[0].Source", "no node named 'x'"]),
    "node name path": (_set((*N0, "Name"), "../x"), ["cannot name an output folder"]),
    "node name no letter": (_set((*N0, "Name"), "--"), ["'--' cannot name an output folder"]),
    "options mask": (_set((*N0, "Model", "Options"), {"Mask": {"desc": "brain"}}),
                     ["Mask not supported"]),
    "software typo": (_set((*N0, "Model", "Software"), {"bids_group": {}}),
                      ["did you mean 'bids-group'"]),
    "inference key typo": (_set((*N0, "Model", "Software"),
                                {"bids-group": {"Inference": {"HeightControll": "fdr"}}}),
                           ["Inference: unknown key", "did you mean 'HeightControl'"]),
    "height control": (_set((*N0, "Model", "Software"),
                            {"bids-group": {"Inference": {"HeightControl": "fwe"}}}),
                       ["HeightControl: must be one of fpr, fdr, bonferroni, none"]),
    "alpha range": (_set((*N0, "Model", "Software"),
                         {"bids-group": {"Inference": {"Alpha": 1.5}}}), ["Alpha == 1.5, must"]),
    "connectivity": (_set((*N0, "Model", "Software"),
                          {"bids-group": {"Inference": {"Connectivity": 8}}}),
                     ["Connectivity: must be 6 (faces), 18 (edges) or 26"]),
    "cluster threshold": (_set((*N0, "Model", "Software"),
                               {"bids-group": {"Inference": {"ClusterThreshold": 2.5}}}),
                          ["ClusterThreshold == 2.5, must be an integer >= 0"]),
    "threshold with fdr": (_set((*N0, "Model", "Software"), {"bids-group": {"Inference": {
        "HeightControl": "fdr", "Threshold": 3.1}}}), ["Threshold is a z threshold"]),
    "two sided string": (_set((*N0, "Model", "Software"),
                              {"bids-group": {"Inference": {"TwoSided": "yes please"}}}),
                         ["TwoSided: must be true or false"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED), ids=str)
def test_malformed_models(case: str, tmp_path: Path) -> None:
    mutate, fragments = MALFORMED[case]
    path = _write(tmp_path, mutate(copy.deepcopy(_model())))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.exit_code == 64
    message = str(info.value)
    assert message.startswith("model.yaml: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_there_are_at_least_15_malformed_cases() -> None:
    assert len(MALFORMED) >= 15


def test_missing_file_is_missing_input(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="does not exist") as info:
        load_spec(tmp_path / "nope.yaml")
    assert info.value.exit_code == 66


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("Name: x\nNodes: [\n  - a\n", ["YAML syntax error at line", "column"]),
        ("Name: x\n  Nodes: 1\n", ["YAML syntax error at line 2, column"]),
        ('{"Name": "x",\n "Nodes": }', ["JSON syntax error at line 2, column 11"]),
        ("- just\n- a list\n", ["top level must be a mapping", "got a list"]),
        ("Name: a\nName: b\nBIDSModelVersion: '1'\n", ["duplicate key 'Name'", "line 2"]),
        ('{"Name": "a", "Name": "b"}', ["duplicate key(s) 'Name'"]),
        ("", ["the file is empty"]),
    ],
)
def test_syntax_errors(tmp_path: Path, text: str, fragments: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(_write(tmp_path, text))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


# ----------------------------------------------------------------------------------------------
# Expression parser: property-style checks against a reference evaluation


def test_random_linear_expressions_parse_to_their_coefficients() -> None:
    rng = random.Random(1)
    names = ["a", "group.patient", "subject.01", "x_1", "B.c.d"]
    for _ in range(300):
        coefs = {n: rng.choice([-3, -1, -0.5, 0.25, 1, 2]) for n in rng.sample(names, 3)}
        terms = []
        for name, w in coefs.items():
            form = rng.choice(["{w}*{n}", "{n}*{w}", "({w})*({n})", "{n}/{inv}"])
            terms.append(form.format(w=w, n=name, inv=1 / w))
        text = " + ".join(terms)
        parsed = parse_linear(text)
        assert parsed.constant == 0
        for name, w in coefs.items():
            assert parsed.coefs[name] == pytest.approx(w), text


def test_expression_is_linear_in_its_terms() -> None:
    """parse(k*(e1) - (e2)) == k*parse(e1) - parse(e2) for random expressions."""
    rng = random.Random(2)
    atoms = ["a", "b", "c.d", "2", "0.5"]

    def random_expr(depth: int) -> str:
        if depth == 0:
            return rng.choice(atoms)
        op = rng.choice(["+", "-", "*"])
        left, right = random_expr(depth - 1), random_expr(0)
        if op == "*":
            right = rng.choice(["2", "3", "-1"])
        return f"({left} {op} {right})"

    for _ in range(200):
        e1, e2, k = random_expr(3), random_expr(2), rng.choice([2.0, -1.5, 4.0])
        p1, p2 = parse_linear(e1), parse_linear(e2)
        combined = parse_linear(f"{k}*{e1} - {e2}")
        for name in set(p1.coefs) | set(p2.coefs):
            expected = k * p1.coefs.get(name, 0) - p2.coefs.get(name, 0)
            assert combined.coefs.get(name, 0) == pytest.approx(expected)
        assert combined.constant == pytest.approx(k * p1.constant - p2.constant)


@pytest.mark.parametrize(
    ("text", "value"), [("1/3", 1 / 3), ("-2", -2.0), ("(1+2)*-3", -9.0), ("1e-2", 0.01)]
)
def test_constants(text: str, value: float) -> None:
    assert parse_constant(text) == pytest.approx(value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("a -", "at the end"),
        ("(a - b", "expected ')'"),
        ("a - b)", "unexpected ')'"),
        ("a / b", "divides by a column"),
        ("a / 0", "divides by zero"),
        ("a * (b + 1)", "not linear"),
        ("2a", "unexpected 'a'"),
        ("a $ b", "unexpected character '$' at position 3"),
        ("__import__('os')", "unexpected character"),
    ],
)
def test_expression_errors(text: str, message: str) -> None:
    with pytest.raises(ExpressionError, match=re.escape(message)):
        parse_linear(text)


def test_doctests_of_spec_and_expression_modules() -> None:
    import doctest

    from bids_group import expression, spec

    for module in (expression, spec):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
