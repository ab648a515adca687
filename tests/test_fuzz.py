"""Property-based fuzzing (hypothesis) of the two documents users write by hand: the model file
(bids_group/spec.py load_spec) and participants.tsv (bids_group/inputs.py read_participants).

For any generated document, the real CLI (``bids_group.cli.main``, in-process, on a tiny
dataset, ``--no-report``) either runs (exit 0) or exits with a documented code
(``bids_group.errors.EXIT_CODES``) other than 1 ("unexpected error": a bug) and prints exactly
one error line: never a traceback.

Reproducible: ``derandomize=True`` (the examples depend only on the code), no example database,
and a bounded number of examples (the file runs in well under a minute on a loaded 2-core machine).
Permutation inference is left out of the generated models: its numba kernels take ~30 s to compile
on a cold cache, and its settings are validated when the file is read whether or not it runs.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import make_bids_derivatives
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bids_group.cli import main
from bids_group.errors import EXIT_CODES

#: 60 model files (most fail fast) and 40 participants.tsv (more of them run the whole pipeline):
#: ~14 s of CPU in all; under a minute of wall time with a load average of 7 on 2 cores.
FUZZ_SETTINGS = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

N_SUBJECTS = 6
VALID_MODEL: dict[str, Any] = {
    "Name": "fuzz",
    "BIDSModelVersion": "1.0.0",
    "Input": {"task": "faces"},
    "Nodes": [
        {
            "Level": "Dataset",
            "Name": "groupDiff",
            "GroupBy": ["contrast"],
            "Transformations": {
                "Transformer": "pybids-transforms-v1",
                "Instructions": [
                    {"Name": "Factor", "Input": ["group"]},
                    {"Name": "Demean", "Input": ["age"]},
                ],
            },
            "Model": {
                "Type": "glm",
                "X": ["group.control", "group.patient", "age"],
                "Software": {
                    "bids-group": {
                        "Inference": {"HeightControl": "fdr", "Alpha": 0.05, "ClusterThreshold": 2}
                    }
                },
            },
            "Contrasts": [
                {
                    "Name": "patientGtControl",
                    "ConditionList": ["group.patient", "group.control"],
                    "Weights": [1, -1],
                    "Test": "t",
                },
                {"Name": "anyGroup", "Weights": ["group.patient", "group.control"], "Test": "F"},
            ],
            "DummyContrasts": {"Test": "t", "Contrasts": ["age"]},
        }
    ],
}

#: Inference keys the fuzzer may add (Permutation is left out, see the module docstring).
INFERENCE_KEYS = [
    "HeightControl", "Alpha", "Threshold", "ClusterThreshold", "TwoSided", "Connectivity",
    "SmoothingFWHM", "ARI", "ARIThresholds", "ARIAlpha", "NPermutations", "Seed",
    "PermutationAlpha", "ClusterFormingP", "TFCE", "PermutationScheme", "ExchangeabilityBlocks",
    "WholeBlocks",
]  # fmt: skip
KEYS = [
    "Name", "BIDSModelVersion", "Input", "Nodes", "Level", "GroupBy", "Model", "Type", "X",
    "Contrasts", "ConditionList", "Weights", "Test", "DummyContrasts", "Transformations",
    "Instructions", "Software", "bids-group", "Inference", "Description", "Edges", "Formula",
    "Options", *INFERENCE_KEYS, "task", "subject", "contrast", "E", "H", "dh", "Integration",
]  # fmt: skip

# ---- value strategies --------------------------------------------------------------------------

SPECIAL_FLOATS = [float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 1e-320, 5e-324, 0.0,
                  -0.0, 1e-10, 0.05, 0.5, 1.0, 3.1, 1e10, 1e300]  # fmt: skip
SPECIAL_INTS = [0, 1, -1, 2, 6, 18, 26, 10**7, 2**31, 2**32, 2**63, 10**12, 10**30, 10**400]
SPECIAL_STRINGS = ["", " ", "1", "0", "t", "F", "fdr", "none", "voxel", "tfce", "exact", "fsl",
                   "auto", "subject", "group", "age", "group.patient", "group.control",
                   "group.patient - group.control", "1e400*group.patient", "intercept", "1/0",
                   "-1/3", "a*b", "((", "sub-01", "Dataset", "glm", "contrast", "n/a", "NA",
                   "ünïcödé", "日本語", "\u202e", "\x00", "\t", "*", "group.*", "[", "{",
                   "1" * 400, "nan", "inf", "pybids-transforms-v1", "Factor", "Demean"]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(SPECIAL_INTS),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.sampled_from(SPECIAL_FLOATS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(SPECIAL_STRINGS),
    st.text(max_size=12),
)
junk = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children,
                        max_size=4),
    ),
    max_leaves=12,
)  # fmt: skip


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indices) into a nested dict/list, the root included."""
    out = [prefix]
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out += _paths(value, (*prefix, i))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for key in path:
        obj = obj[key]
    return obj


@st.composite
def mutated_models(draw: st.DrawFn) -> Any:
    """The valid model with 1-4 mutations: replace, delete, add a key, or add an inference key."""
    model = copy.deepcopy(VALID_MODEL)
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(model)
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "delete", "add", "inference", "inference"]))
        if action == "inference":  # the numeric settings get the most attention
            try:
                block = model["Nodes"][0]["Model"]["Software"]["bids-group"]["Inference"]
            except (KeyError, IndexError, TypeError):
                continue
            if isinstance(block, dict):
                special = st.sampled_from(SPECIAL_INTS + SPECIAL_FLOATS)
                value = draw(st.one_of(special, scalars, junk))
                block[draw(st.sampled_from(INFERENCE_KEYS))] = value
            continue
        if not path:
            if action == "replace":
                model = draw(junk)
            continue
        parent = _get(model, path[:-1])
        if action == "replace":
            parent[path[-1]] = draw(junk)
        elif action == "delete":
            del parent[path[-1]]
        else:
            target = _get(model, path)
            if isinstance(target, dict):
                target[draw(st.sampled_from(KEYS))] = draw(junk)
            elif isinstance(target, list):
                target.append(draw(junk))
    return model


def _serialise(model: Any, form: str) -> bytes:
    if form == "json":
        return json.dumps(model, ensure_ascii=False).encode()
    return yaml.safe_dump(model, allow_unicode=True, sort_keys=False).encode()


@st.composite
def model_documents(draw: st.DrawFn) -> bytes:
    """A mutated model as YAML or JSON, sometimes with its text damaged or re-encoded."""
    text = _serialise(draw(mutated_models()), draw(st.sampled_from(["yaml", "json"])))
    damage = draw(st.sampled_from(["none", "none", "none", "cut", "insert", "encoding"]))
    if damage == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif damage == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=5)).encode("utf-8", "surrogatepass") + text[at:]
    elif damage == "encoding":
        codec = draw(st.sampled_from(["utf-16", "latin-1", "utf-8-sig"]))
        text = text.decode("utf-8", "surrogatepass").encode(codec, "replace")
    return text


# ---- participants.tsv --------------------------------------------------------------------------

CELLS = ["20", "35.5", "-1", "0", "1e999", "inf", "-inf", "nan", "NA", "n/a", "N/A", "", " ",
         "null", "patient", "control", "ünï", '"', '"quoted\tcell"', "1,5", "0x10", "1_000",
         "\u00a0", "sub-01", "#", "=1+1", "9" * 400]  # fmt: skip
IDS = [f"sub-0{i}" for i in range(1, N_SUBJECTS + 1)] + ["01", "sub-99", "", "n/a", "sub-", "ü"]
HEADERS = ["participant_id", "age", "group", "sex", "", " age", "participant_id ", "ÄGE", "age"]


@st.composite
def participants_documents(draw: st.DrawFn) -> bytes:
    columns = ["participant_id"] + draw(st.lists(st.sampled_from(HEADERS[1:]), max_size=3))
    if draw(st.booleans()):
        columns = draw(st.permutations(columns + ["age", "group"]))
    columns = [draw(st.one_of(st.just(c), st.text(max_size=6))) if draw(st.integers(0, 9)) == 0
               else c for c in columns]  # fmt: skip
    rows = []
    for i in range(draw(st.integers(0, N_SUBJECTS + 2))):
        cells = []
        for column in columns:
            if column.strip() == "participant_id":
                default = f"sub-0{i % N_SUBJECTS + 1}"
                cells.append(draw(st.one_of(st.just(default), st.sampled_from(IDS))))
            else:
                cells.append(draw(st.one_of(st.sampled_from(CELLS), st.text(max_size=6))))
        if draw(st.integers(0, 9)) == 0:  # a ragged row
            cells = cells[:-1] if draw(st.booleans()) else [*cells, draw(st.sampled_from(CELLS))]
        rows.append(cells)
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = newline.join("\t".join(r) for r in [columns, *rows]) + newline
    codec = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1"]))
    return text.encode(codec, "surrogatepass" if codec.startswith("utf-8") else "replace")


#: Models run against the fuzzed participants.tsv: none, a covariate, a factor.
TSV_MODELS = {
    "default": None,
    "covariate": {**VALID_MODEL},
    "factor": {
        **VALID_MODEL,
        "Nodes": [
            {
                "Level": "Dataset",
                "Name": "groups",
                "GroupBy": ["contrast"],
                "Transformations": {"Instructions": [{"Name": "Factor", "Input": ["group"]}]},
                "Model": {"Type": "glm", "X": ["group.*"]},
                "DummyContrasts": {"Test": "t"},
            }
        ],
    },
}


# ---- the property ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "ds"
    return make_bids_derivatives(root, n_subjects=N_SUBJECTS, shape=(4, 5, 4))


def _check_run(capsys, args: list[str], out: Path) -> int:
    try:
        code = main(args + ["--no-report", "-q"])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    assert code in EXIT_CODES and code != 1, (code, captured.err)
    lines = captured.err.splitlines()
    # one line per message: every line is a log record or click's usage line
    assert all(line.startswith(("bids-group", "Usage:")) for line in lines), captured.err
    errors = [line for line in lines if line.startswith("bids-group: error")]
    if code == 0:
        assert errors == [], captured.err
    else:
        assert captured.out == "", captured.out
        assert len(errors) == 1, captured.err
    return code


def _with_inference(key: str, value: Any) -> dict[str, Any]:
    model = copy.deepcopy(VALID_MODEL)
    model["Nodes"][0]["Model"]["Software"]["bids-group"]["Inference"][key] = value
    return model


#: What the fuzzer found (each was exit 1, "unexpected error"), replayed on every run.
MODEL_FINDINGS = [
    _serialise(VALID_MODEL, "yaml").decode().encode("utf-16"),  # UnicodeDecodeError
    _serialise(VALID_MODEL, "json")[:-3] + b"\xf0\x9f" + b"}]}",  # a cut UTF-8 sequence
    _serialise(_with_inference("Alpha", 10**400), "yaml"),  # OverflowError in math.isfinite
    _serialise(_with_inference("NPermutations", 10**400), "json"),
    b"\x1fnull\n...\n",  # a control character: PyYAML's message spanned two lines
]


@FUZZ_SETTINGS
@given(document=model_documents())
@example(document=MODEL_FINDINGS[0])
@example(document=MODEL_FINDINGS[1])
@example(document=MODEL_FINDINGS[2])
@example(document=MODEL_FINDINGS[3])
@example(document=MODEL_FINDINGS[4])
def test_any_model_file_runs_or_fails_cleanly(capsys, dataset, tmp_path, document):
    model = tmp_path / "model.yaml"
    model.write_bytes(document)
    out = tmp_path / "out"
    _check_run(capsys, [str(dataset), str(out), "group", "--model", str(model)], out)


@settings(FUZZ_SETTINGS, max_examples=40)
@given(document=participants_documents(), model_name=st.sampled_from(sorted(TSV_MODELS)))
def test_any_participants_tsv_runs_or_fails_cleanly(
    capsys, dataset, tmp_path, document, model_name
):
    (dataset / "participants.tsv").write_bytes(document)
    args = [str(dataset), str(tmp_path / "out"), "group"]
    if TSV_MODELS[model_name] is not None:
        model = tmp_path / "model.json"
        model.write_text(json.dumps(TSV_MODELS[model_name]))
        args += ["--model", str(model)]
    _check_run(capsys, args, tmp_path / "out")
