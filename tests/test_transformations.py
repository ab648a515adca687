"""Tests for bids_group.transformations, with pybids' own transformations as the oracle."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bids_group.errors import DataError, SpecError
from bids_group.transformations import apply_transformations, normalise_instruction

pytest.importorskip("bids.modeling.transformations")
from bids.modeling.transformations import TransformerManager  # noqa: E402
from bids.variables import BIDSVariableCollection, SimpleVariable  # noqa: E402


def _table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "subject": ["01", "02", "03", "04", "05", "06"],
            "group": ["patient", "control", "patient", "control", "other", "patient"],
            "age": [20.0, 30.0, 25.0, 41.0, 33.0, 58.0],
            "score": [1.5, -2.0, 0.0, 4.0, 3.0, -1.0],
            "level": [1, 2, 2, 3, 1, 3],
        }
    )


def _pybids(table: pd.DataFrame, instructions: list[dict]) -> pd.DataFrame:
    """Run pybids' TransformerManager on the same table (one SimpleVariable per column)."""
    variables = [
        SimpleVariable(c, table[["subject"]].assign(amplitude=table[c]), "participants")
        for c in table.columns
        if c != "subject"
    ]
    collection = BIDSVariableCollection(variables)
    TransformerManager().transform(collection, instructions)
    return collection.to_df().set_index("subject").sort_index()


def _ours(table: pd.DataFrame, instructions: list[dict]) -> pd.DataFrame:
    return apply_transformations(table, instructions).set_index("subject").sort_index()


@pytest.mark.parametrize(
    "instructions",
    [
        [{"Name": "Factor", "Input": ["group"]}],
        [{"Name": "Factor", "Input": ["level"]}],
        [{"Name": "Factor", "Input": ["group"], "Constraint": "drop_one"}],
        [{"Name": "Factor", "Input": ["group"], "Constraint": "mean_zero"}],
        [{"Name": "Factor", "Input": ["group"], "Constraint": "drop_one", "RefLevel": "patient"}],
        [{"Name": "Scale", "Input": ["age", "score"]}],
        [{"Name": "Scale", "Input": ["age"], "Demean": False}],
        [{"Name": "Scale", "Input": ["age"], "Rescale": False}],
        [{"Name": "Demean", "Input": ["age"]}],
        [{"Name": "Threshold", "Input": ["score"], "Threshold": 1.0}],
        [{"Name": "Threshold", "Input": ["score"], "Threshold": 1.0, "Binarize": True}],
        [{"Name": "Threshold", "Input": ["score"], "Threshold": 1.5, "Signed": False}],
        [{"Name": "Threshold", "Input": ["score"], "Threshold": 0.5, "Above": False}],
        [{"Name": "Product", "Input": ["age", "score"], "Output": "age_x_score"}],
        [{"Name": "Sum", "Input": ["age", "score"], "Weights": [1, -2], "Output": "s"}],
        [{"Name": "Copy", "Input": ["age"], "Output": ["age2"]}],
        [{"Name": "Rename", "Input": ["age"], "Output": ["years"]}],
        [{"Name": "Scale", "Input": ["age"], "Output": ["age_z"]}],
        [
            {"Name": "Factor", "Input": ["group"]},
            {"Name": "Product", "Input": ["group.patient", "age"], "Output": "patient_age"},
        ],  # fmt: skip
    ],
)
def test_matches_pybids(instructions: list[dict]) -> None:
    expected = _pybids(_table(), [dict(i) for i in instructions])
    got = _ours(_table(), instructions)
    assert sorted(got.columns) == sorted(expected.columns)
    for column in expected.columns:
        if not pd.api.types.is_numeric_dtype(expected[column]):
            assert list(got[column]) == list(expected[column])
            continue
        np.testing.assert_allclose(
            got[column].to_numpy(float), expected[column].to_numpy(float), atol=1e-12,
            err_msg=column,
        )  # fmt: skip


def test_factor_levels_sorted_named_as_data_and_placed_where_the_column_was() -> None:
    out = apply_transformations(_table(), [{"Name": "Factor", "Input": "group"}])
    assert list(out.columns) == [
        "subject", "group.control", "group.other", "group.patient", "age", "score", "level",
    ]  # fmt: skip
    np.testing.assert_array_equal(out["group.patient"], [1, 0, 1, 0, 0, 1])


def test_factor_of_subject_for_paired_designs() -> None:
    table = pd.DataFrame({"subject": ["02", "01", "02", "01"], "contrast": ["a", "a", "b", "b"]})
    out = apply_transformations(table, [{"Name": "Factor", "Input": ["subject", "contrast"]}])
    assert [c for c in out.columns if c.startswith("subject.")] == ["subject.01", "subject.02"]
    np.testing.assert_array_equal(out["subject.01"], [0, 1, 0, 1])
    np.testing.assert_array_equal(out["contrast.b"], [0, 0, 1, 1])


def test_factor_keeps_missing_values_missing_not_zero() -> None:
    table = pd.DataFrame({"subject": ["1", "2", "3"], "group": ["a", None, "b"]})
    out = apply_transformations(table, [{"Name": "Factor", "Input": ["group"]}])
    assert list(out.columns) == ["subject", "group.a", "group.b"]
    assert out.loc[1, ["group.a", "group.b"]].isna().all()


def test_factor_integer_valued_floats_named_as_integers() -> None:
    table = pd.DataFrame({"subject": ["1", "2", "3"], "site": [1.0, 2.0, np.nan]})
    out = apply_transformations(table, [{"Name": "Factor", "Input": ["site"]}])
    assert [c for c in out.columns if c.startswith("site")] == ["site.1", "site.2"]


def test_wildcard_input_and_constant() -> None:
    out = apply_transformations(
        _table(),
        [
            {"Name": "Factor", "Input": ["group"]},
            {"Name": "Demean", "Input": ["group.*"]},
            {"Name": "Constant", "Output": "ones", "Value": 2},
        ],
    )
    np.testing.assert_allclose(
        out[["group.control", "group.other", "group.patient"]].sum(), 0, atol=1e-12
    )
    np.testing.assert_array_equal(out["ones"], 2.0)


def test_input_is_not_modified() -> None:
    table = _table()
    before = table.copy()
    apply_transformations(table, [{"Name": "Scale", "Input": ["age"]}])
    pd.testing.assert_frame_equal(table, before)


@pytest.mark.parametrize(
    ("instruction", "error", "message"),
    [
        ({"Name": "Factr", "Input": "group"}, SpecError, "did you mean 'Factor'"),
        ({"Name": "scale", "Input": "age"}, SpecError, "did you mean 'Scale'"),
        ({"Name": "Convolve", "Input": "age"}, SpecError, "first level only"),
        ({"Name": "Scale", "Input": "age", "Demaen": False}, SpecError, "did you mean 'Demean'"),
        ({"Name": "Copy", "Input": "age"}, SpecError, "needs 'Output'"),
        ({"Name": "Scale"}, SpecError, "needs 'Input'"),
        ({"Name": "Rename", "Input": ["a", "b"], "Output": "c"}, SpecError, "needs 2 output"),
        ({"Name": "Factor", "Input": "g", "Output": "x"}, SpecError, "unknown option 'Output'"),
        ({"Input": "age"}, SpecError, "missing 'Name'"),
        ("Factor", SpecError, "must be a mapping"),
    ],
)
def test_instruction_errors(instruction, error, message) -> None:
    with pytest.raises(error, match=message):
        normalise_instruction(instruction, "model.yaml: Instructions[0]")


@pytest.mark.parametrize(
    ("instructions", "error", "message"),
    [
        ([{"Name": "Demean", "Input": "agee"}], SpecError, "no column named 'agee'.*'age'"),
        ([{"Name": "Demean", "Input": "grp.*"}], SpecError, "no column matches 'grp.*'"),
        ([{"Name": "Demean", "Input": "group"}], DataError, "not numeric.*Factor"),
        ([{"Name": "Constant", "Output": "c"}, {"Name": "Scale", "Input": "c"}], DataError,
         "constant value"),
        ([{"Name": "Factor", "Input": "group", "Constraint": "sum"}], SpecError, "drop_one"),
        ([{"Name": "Factor", "Input": "group", "Constraint": "drop_one", "RefLevel": "x"}],
         SpecError, "not a level"),
    ],
)  # fmt: skip
def test_apply_errors(instructions, error, message) -> None:
    with pytest.raises(error, match=message):
        apply_transformations(_table(), instructions)


def test_scale_of_constant_with_replace_na_after_matches_pybids() -> None:
    table = _table().assign(c=[np.nan, 1.0, 1.0, 1.0, 1.0, 1.0])
    instructions = [{"Name": "Scale", "Input": ["score"], "ReplaceNa": "after"}]
    np.testing.assert_allclose(
        _ours(table, instructions)["score"], _pybids(table, instructions)["score"]
    )
