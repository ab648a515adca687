"""dataset_description.json and JSON writing (numpy types, strict JSON)."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import numpy as np
import pytest

from bids_group.outputs import description
from bids_group.outputs.description import write_dataset_description, write_json


def test_doctests():
    assert doctest.testmod(description).failed == 0


def test_write_json_converts_numpy_and_is_strict(tmp_path):
    obj = {
        "b": np.float32(0.25),
        "a": [np.int64(3), np.bool_(True), np.nan, np.inf],
        "arr": np.arange(3),
        "path": Path("/x/y"),
        "tuple": (1, 2),
        "nested": {1: {"z": np.float64(-np.inf)}},
    }
    path = write_json(tmp_path / "x.json", obj)
    text = path.read_text()
    assert text.endswith("\n") and "\n  " in text  # indent 2
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
    assert loaded == {
        "b": 0.25,
        "a": [3, True, None, None],
        "arr": [0, 1, 2],
        "path": "/x/y",
        "tuple": [1, 2],
        "nested": {"1": {"z": None}},
    }
    assert list(loaded) == ["b", "a", "arr", "path", "tuple", "nested"]  # caller's order kept
    write_json(tmp_path / "s.json", obj, sort_keys=True)
    assert list(json.loads((tmp_path / "s.json").read_text()))[0] == "a"


def test_write_json_rejects_unknown_objects(tmp_path):
    with pytest.raises(TypeError, match="object"):
        write_json(tmp_path / "x.json", {"a": object()})


def test_dataset_description_fields(tmp_path):
    source = tmp_path / "bids"
    source.mkdir()
    (source / "dataset_description.json").write_text(
        json.dumps({"Name": "src", "BIDSVersion": "1.8.0", "DatasetDOI": "doi:10.1/x"})
    )
    out = tmp_path / "out"
    out.mkdir()
    path = write_dataset_description(
        out,
        source_datasets=[
            source,
            "https://openneuro.org/datasets/ds000001",
            "doi:10.2/y",
            {"URL": "s3://b", "Version": "2"},
        ],
        pipeline_version="0.1.0",
        code_url="https://github.com/bids-group/bids-group",
        command=["bids-group", "/data/my bids", "/out", "group"],
        environ={},
    )
    assert path == out / "dataset_description.json"
    desc = json.loads(path.read_text())
    assert desc["Name"] and desc["BIDSVersion"] == "1.10.0"
    assert desc["DatasetType"] == "derivative"
    (generated,) = desc["GeneratedBy"]
    assert generated["Name"] == "bids-group" and generated["Version"] == "0.1.0"
    assert generated["CodeURL"] == "https://github.com/bids-group/bids-group"
    assert "'/data/my bids'" in generated["Description"]  # shell-quoted, re-runnable
    assert "Container" not in generated
    assert desc["SourceDatasets"] == [
        {"URL": source.resolve().as_uri(), "DOI": "doi:10.1/x"},
        {"URL": "https://openneuro.org/datasets/ds000001"},
        {"DOI": "doi:10.2/y"},
        {"URL": "s3://b", "Version": "2"},
    ]


def test_container_from_environment(tmp_path):
    env = {description.CONTAINER_TYPE_ENV: "docker", description.CONTAINER_TAG_ENV: "bg:0.1"}
    path = write_dataset_description(
        tmp_path, source_datasets=[], pipeline_version="1", code_url="u", command="x", environ=env
    )
    (generated,) = json.loads(path.read_text())["GeneratedBy"]
    assert generated["Container"] == {"Type": "docker", "Tag": "bg:0.1"}


def test_bad_source_mapping(tmp_path):
    with pytest.raises(ValueError, match="Name"):
        write_dataset_description(
            tmp_path, source_datasets=[{"Name": "x"}], pipeline_version="1", code_url="u"
        )
