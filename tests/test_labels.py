"""Tests for bids_group.labels: deterministic BIDS-safe contrast labels."""

from __future__ import annotations

import doctest
import random
import re
import string

import pytest

from bids_group import labels
from bids_group.labels import group_contrast_label, to_label


def test_doctests() -> None:
    result = doctest.testmod(labels)
    assert result.attempted > 5 and result.failed == 0


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("group.patient - group.control", "groupPatientMinusGroupControl"),
        ("faces > scrambled", "facesGtScrambled"),
        ("faces<scrambled", "facesLtScrambled"),
        ("a + b", "aPlusB"),
        ("2 * age", "2TimesAge"),
        ("a / 2", "aOver2"),
        ("age_z score", "ageZScore"),
        ("subject.01", "subject01"),
        ("FacesVsScrambled", "FacesVsScrambled"),  # already alphanumeric: kept as written
        ("1", "intercept"),
        (1, "intercept"),
        ("intercept", "intercept"),
        ("INTERCEPT", "intercept"),
        ("  padded  ", "padded"),
        ("(a + b)/2", "aPlusBOver2"),
    ],
)
def test_to_label_examples(name: str, label: str) -> None:
    assert to_label(name) == label


def test_to_label_rejects_names_without_letters() -> None:
    with pytest.raises(ValueError, match="no letter or digit"):
        to_label("...")


def test_to_label_is_alphanumeric_and_deterministic_on_random_names() -> None:
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + " ._-+*/<>()"
    for _ in range(500):
        name = "a" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        label = to_label(name)
        assert re.fullmatch(r"[A-Za-z0-9]+", label), (name, label)
        assert to_label(name) == label


def test_distinct_operators_give_distinct_labels() -> None:
    names = ["a - b", "a + b", "a > b", "a < b", "a * b", "a / b", "a b"]
    assert len({to_label(n) for n in names}) == len(names)


@pytest.mark.parametrize(
    ("input_contrast", "name", "label"),
    [
        ("faces", "intercept", "faces"),
        ("faces", "1", "faces"),
        ("faces", "group.patient - group.control", "facesGroupPatientMinusGroupControl"),
        ("faces", "age", "facesAge"),
        ("FacesGtScrambled", "patientGtControl", "FacesGtScrambledPatientGtControl"),
        (None, "age", "age"),
        (None, "intercept", "intercept"),
        ("", "ageNegative", "ageNegative"),
    ],
)
def test_group_contrast_label(input_contrast: str | None, name: str, label: str) -> None:
    assert group_contrast_label(input_contrast, name) == label
