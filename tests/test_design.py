"""Tests for bids_group.design: variables, design matrix and contrasts.

Oracles: nilearn's ``make_second_level_design_matrix`` and ``expression_to_contrast_vector``,
pybids' transformations, and designs built by hand with numpy/pandas.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from bids_group.design import (
    Design,
    build_design,
    resolve_contrasts,
    variables_for_maps,
)
from bids_group.errors import DataError, SpecError
from bids_group.spec import load_spec, parse_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LOCALIZER = (
    Path(__file__).resolve().parents[2]
    / "shared" / "data" / "real" / "localizer-metadata" / "localizer_participants.tsv"
)  # fmt: skip


def _participants() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "participant_id": [f"sub-{i:02d}" for i in range(1, 9)],
            "group": ["patient", "control"] * 4,
            "age": ["31", "25", "n/a", "40", "22", "35", "52", "28"],
            "sex": ["F", "M", "M", "F", "F", "M", "F", "M"],
            "tiv": [1.4, 1.6, 1.5, 1.3, 1.45, 1.7, 1.35, 1.55],
        }
    ).set_index("participant_id")


def _entities(subjects: list[str], contrast: str = "faces", **extra: Any) -> list[dict]:
    return [{"subject": s, "contrast": contrast, "task": "loc", **extra} for s in subjects]


def _spec(x: list, contrasts: list | None = None, instructions: list | None = None,
          dummy: Any = None, group_by: list | None = None):  # fmt: skip
    node: dict[str, Any] = {
        "Level": "Dataset", "Name": "n", "GroupBy": group_by if group_by is not None else [],
        "Model": {"Type": "glm", "X": x},
    }  # fmt: skip
    if instructions:
        node["Transformations"] = {"Transformer": "pybids-transforms-v1",
                                   "Instructions": instructions}  # fmt: skip
    if contrasts:
        node["Contrasts"] = contrasts
    node["DummyContrasts"] = dummy if dummy is not None else not contrasts
    model = {"Name": "m", "BIDSModelVersion": "1.0.0", "Nodes": [node]}
    return parse_spec(copy.deepcopy(model), source="model.yaml")


SUBJECTS = ["01", "02", "04", "05", "06", "07", "08"]  # 03 has no age


# ----------------------------------------------------------------------------------------------
# variables_for_maps


def test_variables_one_row_per_map_with_participant_columns_and_entities() -> None:
    ents = _entities(["02", "01"], session="1") + _entities(["sub-02"], contrast="houses")
    v = variables_for_maps(ents, _participants())
    assert list(v.columns) == ["group", "age", "sex", "tiv", "subject", "contrast", "task",
                               "session"]  # fmt: skip
    assert list(v["subject"]) == ["02", "01", "02"]  # prefix removed, leading zero kept
    assert list(v["group"]) == ["control", "patient", "control"]
    assert pd.api.types.is_numeric_dtype(v["age"]) and list(v["age"]) == [25.0, 31.0, 25.0]
    assert v.loc[0, "session"] == "1" and pd.isna(v.loc[2, "session"])


def test_variables_absent_subject_gets_nan_and_na_strings_are_missing() -> None:
    v = variables_for_maps(_entities(["03", "99"]), _participants())
    assert pd.isna(v.loc[0, "age"])  # "n/a" in participants.tsv
    assert v.loc[1, ["group", "age", "sex", "tiv"]].isna().all()


def test_variables_index_without_prefix_and_without_participants() -> None:
    part = _participants().set_axis([f"{i:02d}" for i in range(1, 9)], axis=0)
    v = variables_for_maps(_entities(["01"]), part)
    assert v.loc[0, "sex"] == "F"
    empty = variables_for_maps(_entities(["01"], run=2), pd.DataFrame(index=pd.Index([])))
    assert list(empty.columns) == ["subject", "contrast", "task", "run"]
    assert empty.loc[0, "run"] == 2


def test_variables_errors() -> None:
    with pytest.raises(DataError, match="no 'subject' entity"):
        variables_for_maps([{"contrast": "x"}], _participants())
    dup = pd.concat([_participants(), _participants().iloc[:1]])
    with pytest.raises(DataError, match="sub-01|01 more than once"):
        variables_for_maps(_entities(["01"]), dup)


# ----------------------------------------------------------------------------------------------
# Designs against oracles


def test_one_sample_with_covariates_matches_nilearn() -> None:
    pytest.importorskip("nilearn")
    from nilearn.glm.second_level import make_second_level_design_matrix

    part = _participants()
    variables = variables_for_maps(_entities(SUBJECTS), part)
    design = build_design(_spec(["age", "tiv", 1]), variables)
    confounds = pd.DataFrame({"subject_label": SUBJECTS,
                              "age": variables["age"], "tiv": variables["tiv"]})  # fmt: skip
    expected = make_second_level_design_matrix(SUBJECTS, confounds)
    assert design.columns == tuple(expected.columns)
    np.testing.assert_array_equal(design.matrix, expected.to_numpy())
    assert design.matrix.dtype == np.float64 and design.matrix.flags.c_contiguous


@pytest.mark.skipif(not LOCALIZER.exists(), reason="shared localizer metadata not available")
def test_real_localizer_participants_design_matches_nilearn() -> None:
    pytest.importorskip("nilearn")
    from nilearn.glm.second_level import make_second_level_design_matrix

    part = pd.read_csv(LOCALIZER, sep="\t", dtype=str).set_index("participant_id")
    subjects = list(part.index[:30])
    spec = _spec([1, "age", "sex.M"],
                 instructions=[{"Name": "Factor", "Input": "sex"},
                               {"Name": "Demean", "Input": "age"}])  # fmt: skip
    design = build_design(spec, variables_for_maps(_entities(subjects), part))
    age = part.loc[subjects, "age"].astype(float)
    confounds = pd.DataFrame(
        {
            "subject_label": subjects,
            "age": (age - age.mean()).to_numpy(),
            "sex.M": (part.loc[subjects, "sex"] == "M").astype(float).to_numpy(),
        }
    )
    expected = make_second_level_design_matrix(subjects, confounds)[["intercept", "age", "sex.M"]]
    np.testing.assert_allclose(design.matrix, expected.to_numpy(), atol=1e-12)


def test_two_sample_with_demeaned_age_config_matches_hand_built() -> None:
    spec = load_spec(CONFIGS / "two_sample_age.yaml")
    part = _participants()
    design = build_design(spec, variables_for_maps(_entities(SUBJECTS), part))
    sel = part.loc[[f"sub-{s}" for s in SUBJECTS]]
    age = sel["age"].astype(float).to_numpy()
    patient = (sel["group"] == "patient").to_numpy(float)
    expected = np.column_stack([1 - patient, patient, age - age.mean()])
    assert design.columns == ("group.control", "group.patient", "age")
    np.testing.assert_allclose(design.matrix, expected)
    contrasts = {c.name: c for c in resolve_contrasts(spec, design)}
    np.testing.assert_array_equal(contrasts["patientGtControl"].weights, [[-1, 1, 0]])
    np.testing.assert_array_equal(contrasts["age"].weights, [[0, 0, 1]])
    assert [c.test for c in contrasts.values()] == ["t", "t", "t"]


def test_paired_config_matches_hand_built_paired_design() -> None:
    """nilearn's paired example: a condition column plus one indicator per subject."""
    spec = load_spec(CONFIGS / "paired.yaml")
    subjects = ["03", "01", "02"]
    ents = _entities(subjects, "faces") + _entities(subjects, "houses")
    design = build_design(spec, variables_for_maps(ents, pd.DataFrame(index=pd.Index([]))))
    assert design.columns == ("contrast.faces", "subject.01", "subject.02", "subject.03")
    condition = np.repeat([1.0, 0.0], 3)
    subject_dummies = np.vstack([np.eye(3)[[2, 0, 1]]] * 2)
    np.testing.assert_array_equal(design.matrix, np.column_stack([condition, subject_dummies]))
    (contrast,) = resolve_contrasts(spec, design)
    assert contrast.label == "facesGtHouses"
    np.testing.assert_array_equal(contrast.weights, [[1, 0, 0, 0]])


def test_f_test_config_three_groups() -> None:
    spec = load_spec(CONFIGS / "f_test_three_groups.yaml")
    part = pd.DataFrame({"group": list("abcabcab")}, index=[f"sub-{i}" for i in range(8)])
    design = build_design(spec, variables_for_maps(_entities([str(i) for i in range(8)]), part))
    assert design.columns == ("group.a", "group.b", "group.c")
    f, t = resolve_contrasts(spec, design)
    assert f.test == "F" and f.weights.shape == (2, 3)
    np.testing.assert_allclose(t.weights, [[1, -0.5, -0.5]])


def test_vbm_config() -> None:
    spec = load_spec(CONFIGS / "vbm_gray_matter.yaml")
    part = _participants()
    design = build_design(spec, variables_for_maps(_entities(SUBJECTS), part))
    assert design.columns == ("intercept", "age", "sex.M", "tiv")
    (contrast,) = resolve_contrasts(spec, design)
    np.testing.assert_array_equal(contrast.weights, [[0, -1, 0, 0]])


def test_expression_contrasts_match_nilearn_expression_to_contrast_vector() -> None:
    pytest.importorskip("nilearn")
    from nilearn.glm.contrasts import expression_to_contrast_vector

    columns = ["control", "patient", "age_z", "intercept_b"]
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(12, 4))
    design = Design(matrix, tuple(columns), pd.DataFrame(index=range(12)))
    expressions = ["patient - control", "(patient + control)/2", "2*age_z - 0.5*intercept_b",
                   "-(control - patient) / 3", "age_z"]  # fmt: skip
    spec = _spec(columns, [{"Name": f"c{i}", "Weights": e, "Test": "t"}
                           for i, e in enumerate(expressions)])  # fmt: skip
    for contrast, text in zip(resolve_contrasts(spec, design), expressions, strict=True):
        expected = expression_to_contrast_vector(text, columns)
        np.testing.assert_allclose(contrast.weights[0], expected, err_msg=text)


def test_expression_config_labels() -> None:
    spec = load_spec(CONFIGS / "expression_contrast.yaml")
    design = build_design(spec, variables_for_maps(_entities(SUBJECTS), _participants()))
    contrasts = resolve_contrasts(spec, design)
    assert [c.label for c in contrasts] == ["groupPatientMinusGroupControl", "meanOfGroups",
                                            "groupsOrAge"]  # fmt: skip
    np.testing.assert_array_equal(contrasts[2].weights, [[-1, 1, 0], [0, 0, 1]])
    # Scale = z-score with the sample standard deviation (ddof=1), as pybids
    age = design.matrix[:, 2]
    assert age.mean() == pytest.approx(0) and age.std(ddof=1) == pytest.approx(1)


def test_default_spec_design_is_intercept_only() -> None:
    from bids_group.spec import default_spec

    design = build_design(default_spec(), variables_for_maps(_entities(SUBJECTS), _participants()))
    assert design.columns == ("intercept",)
    np.testing.assert_array_equal(design.matrix, np.ones((len(SUBJECTS), 1)))
    (contrast,) = resolve_contrasts(default_spec(), design)
    assert (contrast.name, contrast.label, contrast.test) == ("intercept", "intercept", "t")


# ----------------------------------------------------------------------------------------------
# Design errors


def _variables(subjects: list[str] = SUBJECTS) -> pd.DataFrame:
    return variables_for_maps(_entities(subjects), _participants())


def test_missing_covariate_names_column_and_subjects_and_is_never_zero_filled() -> None:
    with pytest.raises(DataError) as info:
        build_design(_spec([1, "age"]), _variables(["01", "02", "03", "04", "99"]))
    message = str(info.value)
    assert "'age'" in message and "sub-03" in message and "sub-99" in message
    assert "sub-01" not in message and "never fills covariates with 0" in message
    assert info.value.exit_code == 65


def test_missing_factor_level_is_an_error_not_a_reference_group() -> None:
    spec = _spec(["group.*"], instructions=[{"Name": "Factor", "Input": "group"}])
    with pytest.raises(DataError, match=r"'group.control' for sub-99"):
        build_design(spec, _variables(["01", "02", "04", "99"]))


def test_unknown_column_in_x_suggests_nearest_and_lists_available() -> None:
    with pytest.raises(SpecError) as info:
        build_design(_spec([1, "agee"]), _variables())
    message = str(info.value)
    assert "no column named 'agee'" in message and "did you mean 'age'" in message
    assert "'tiv'" in message  # available columns listed


def test_unmatched_wildcard() -> None:
    with pytest.raises(SpecError, match=r"no column matches 'subject\.\*'"):
        build_design(_spec(["subject.*"]), _variables())


def test_non_numeric_column_suggests_factor() -> None:
    with pytest.raises(SpecError, match=r"'group' is not numeric.*Factor"):
        build_design(_spec([1, "group"]), _variables())


def test_rank_deficient_design_names_the_dependent_columns() -> None:
    spec = _spec([1, "group.*"], instructions=[{"Name": "Factor", "Input": "group"}])
    with pytest.raises(DataError) as info:
        build_design(spec, _variables())
    message = str(info.value)
    assert "rank deficient (rank 2 < 3 columns)" in message
    assert "'intercept', 'group.control', 'group.patient' are linearly dependent" in message
    assert "intercept = group.control + group.patient" in message


def test_scaled_copy_is_rank_deficient() -> None:
    spec = _spec(["age", "age2"], instructions=[
        {"Name": "Copy", "Input": "age", "Output": "age2"},
        {"Name": "Scale", "Input": "age2", "Demean": False}])  # fmt: skip
    with pytest.raises(
        DataError, match=r"'age', 'age2' are linearly dependent \(age = [0-9.]+\*age2"
    ):
        build_design(spec, _variables())


def test_too_few_maps_says_how_many_are_needed() -> None:
    with pytest.raises(DataError, match=r"2 map\(s\) for 2 parameter\(s\).*at least 3 maps"):
        build_design(_spec([1, "tiv"]), _variables(["01", "02"]))


def test_zero_column() -> None:
    spec = _spec([1, "z"], instructions=[{"Name": "Constant", "Output": "z", "Value": 0}])
    with pytest.raises(DataError, match=r"'z' are zero for every selected map"):
        build_design(spec, _variables())


def test_transformation_of_missing_column() -> None:
    spec = _spec([1], instructions=[{"Name": "Demean", "Input": "weight"}])
    with pytest.raises(SpecError, match=r"Instructions\[0\]\.Input: no column named 'weight'"):
        build_design(spec, _variables())


# ----------------------------------------------------------------------------------------------
# Contrast errors


def test_contrast_on_unknown_column() -> None:
    spec = _spec([1, "age"], [{"Name": "c", "ConditionList": ["ages"], "Weights": [1],
                               "Test": "t"}])  # fmt: skip
    design = build_design(spec, _variables())
    with pytest.raises(SpecError, match=r"'ages' is not a design column \(did you mean 'age'"):
        resolve_contrasts(spec, design)


def test_non_estimable_contrast() -> None:
    matrix = np.column_stack([np.ones(6), np.repeat([1.0, 0.0], 3), np.repeat([0.0, 1.0], 3)])
    design = Design(matrix, ("intercept", "a", "b"), pd.DataFrame(index=range(6)))
    spec = _spec(["intercept", "a", "b"], [
        {"Name": "ok", "Weights": "a - b", "Test": "t"},
        {"Name": "bad", "Weights": "a", "Test": "t"}])  # fmt: skip
    with pytest.raises(DataError, match=r"Contrasts\[1\] \('bad'\).*not estimable"):
        resolve_contrasts(spec, design)
    ok_only = _spec(["intercept", "a", "b"], [{"Name": "ok", "Weights": "a - b", "Test": "t"}])
    (ok,) = resolve_contrasts(ok_only, design)
    np.testing.assert_array_equal(ok.weights, [[0, 1, -1]])


def test_dependent_f_rows() -> None:
    spec = _spec([1, "age"], [{"Name": "f", "ConditionList": ["age"], "Weights": [[1], [2]],
                               "Test": "F"}])  # fmt: skip
    with pytest.raises(SpecError, match="linearly dependent"):
        resolve_contrasts(spec, build_design(spec, _variables()))


def test_dummy_wildcard_name_clash_with_explicit_contrast() -> None:
    spec = _spec(["group.*"],
                 [{"Name": "group.patient", "Weights": "group.patient", "Test": "t"}],
                 instructions=[{"Name": "Factor", "Input": "group"}],
                 dummy={"Test": "t", "Contrasts": ["group.*"]})  # fmt: skip
    design = build_design(spec, _variables())
    with pytest.raises(SpecError, match="two contrasts are named 'group.patient'"):
        resolve_contrasts(spec, design)


def test_dummy_wildcards_expand_over_design_columns() -> None:
    spec = _spec(["group.*", "age"], instructions=[{"Name": "Factor", "Input": "group"}],
                 dummy={"Test": "t", "Contrasts": ["group.*"]})  # fmt: skip
    contrasts = resolve_contrasts(spec, build_design(spec, _variables()))
    names = [(c.name, c.label) for c in contrasts]
    assert names == [("group.control", "groupControl"), ("group.patient", "groupPatient")]
    np.testing.assert_array_equal(np.vstack([c.weights for c in contrasts]), np.eye(3)[:2])


def test_resolved_model_with_expanded_columns_reproduces_the_design() -> None:
    from bids_group.spec import resolved_model_dict

    spec = load_spec(CONFIGS / "paired.yaml")
    ents = _entities(["01", "02"], "faces") + _entities(["01", "02"], "houses")
    variables = variables_for_maps(ents, pd.DataFrame(index=pd.Index([])))
    design = build_design(spec, variables)
    resolved = resolved_model_dict(spec, x_columns=design.columns)
    assert resolved["Nodes"][0]["Model"]["X"] == ["contrast.faces", "subject.01", "subject.02"]
    again = parse_spec(resolved, source="model-paired_smdl.json")
    np.testing.assert_array_equal(build_design(again, variables).matrix, design.matrix)
