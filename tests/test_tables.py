"""TSV tables: n/a for missing, %.6g floats, and a JSON sidecar describing every column."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pandas as pd
import pytest

from bids_group.outputs import tables
from bids_group.outputs.tables import write_table


def test_doctests():
    assert doctest.testmod(tables).failed == 0


def test_round_trip_with_pandas(tmp_path):
    df = pd.DataFrame(
        {
            "Cluster ID": ["1", "1a", "2"],
            "X": [-42.0, -40.123456789, np.nan],
            "Peak Stat": [5.123456789, 1e-300, np.inf],
            "Cluster Size (voxels)": [120, 120, 3],
            "note": ["a", None, "c"],
        }
    )
    path = write_table(tmp_path / "t_clusters.tsv", df, {"Threshold": {"Value": 3.1}})
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == list(df.columns)
    assert lines[1].split("\t") == ["1", "-42", "5.12346", "120", "a"]
    assert lines[2].split("\t") == ["1a", "-40.1235", "1e-300", "120", "n/a"]
    assert lines[3].split("\t") == ["2", "n/a", "inf", "3", "c"]
    back = pd.read_csv(
        path, sep="\t", na_values="n/a", keep_default_na=False, dtype={"Cluster ID": str}
    )
    np.testing.assert_allclose(back["X"], df["X"], rtol=1e-5)
    assert back["note"].isna().tolist() == [False, True, False]
    sidecar = json.loads((tmp_path / "t_clusters.json").read_text())
    assert list(sidecar)[: len(df.columns)] == list(df.columns)
    assert sidecar["X"] == {"Description": "x coordinate of the peak", "Units": "mm"}
    assert sidecar["note"]["Description"].startswith("Column note")
    assert sidecar["Threshold"] == {"Value": 3.1}


def test_caller_column_entries_win(tmp_path):
    df = pd.DataFrame({"X": [1.0]})
    write_table(tmp_path / "a.tsv", df, {"X": {"Description": "mine", "Units": "voxels"}})
    assert json.loads((tmp_path / "a.json").read_text())["X"] == {
        "Description": "mine",
        "Units": "voxels",
    }


def test_empty_table_keeps_header(tmp_path):
    df = pd.DataFrame({"Cluster ID": pd.Series([], dtype=str), "X": pd.Series([], dtype=float)})
    path = write_table(tmp_path / "e.tsv", df)
    assert path.read_text() == "Cluster ID\tX\n"


def test_rejects_bad_path_and_duplicate_columns(tmp_path):
    with pytest.raises(ValueError, match=".tsv"):
        write_table(tmp_path / "a.csv", pd.DataFrame({"a": [1]}))
    with pytest.raises(ValueError, match="duplicate"):
        write_table(tmp_path / "a.tsv", pd.DataFrame([[1, 2]], columns=["a", "a"]))
