"""Design figure (valid SVG, no pyplot) and design diagnostics against closed forms."""

from __future__ import annotations

import doctest
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from bids_group.outputs import figures
from bids_group.outputs.figures import design_summary, plot_design_matrix

SVG = "{http://www.w3.org/2000/svg}"


def test_doctests():
    assert doctest.testmod(figures).failed == 0


@pytest.fixture
def design():
    rng = np.random.default_rng(1)
    n = 12
    matrix = np.column_stack([np.ones(n), rng.normal(40, 10, n), np.arange(n) % 2])
    return matrix, ["intercept", "age", "groupPatient"], [f"sub-{i:02d}" for i in range(n)]


def svg_texts(path):
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    return root, [t.text or "".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def test_svg_is_valid_and_labelled(tmp_path, design):
    matrix, columns, rows = design
    path = plot_design_matrix(matrix, columns, rows, tmp_path / "design.svg", title="faces")
    root, texts = svg_texts(path)
    for label in [*columns, *rows, "faces"]:
        assert label in texts
    assert root.find(f".//{SVG}image") is not None  # the matrix itself


def test_many_rows_are_not_labelled(tmp_path):
    n = figures.MAX_ROW_LABELS + 1
    matrix = np.column_stack([np.ones(n), np.arange(n)])
    path = plot_design_matrix(matrix, ["a", "b"], [f"r{i}x" for i in range(n)], tmp_path / "d.svg")
    _, texts = svg_texts(path)
    assert not any(t and t.startswith("r") and t.endswith("x") for t in texts)


def test_reproducible_bytes(tmp_path, design):
    first = plot_design_matrix(*design, tmp_path / "a.svg").read_bytes()
    second = plot_design_matrix(*design, tmp_path / "b.svg").read_bytes()
    assert first == second


def test_does_not_import_pyplot_or_change_rcparams(tmp_path):
    # (reading rcParams["backend"] itself imports pyplot, so compare only the keys we set)
    code = (
        "import sys, matplotlib, numpy as np\n"
        "keys = ['svg.hashsalt', 'svg.fonttype']\n"
        "before = [matplotlib.rcParams[k] for k in keys]\n"
        "from bids_group.outputs.figures import plot_design_matrix\n"
        f"plot_design_matrix(np.eye(3), list('abc'), list('xyz'), r'{tmp_path / 'x.svg'}')\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "assert [matplotlib.rcParams[k] for k in keys] == before\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shape_errors(tmp_path, design):
    matrix, columns, rows = design
    with pytest.raises(ValueError, match="column names"):
        plot_design_matrix(matrix, columns[:2], rows, tmp_path / "x.svg")
    with pytest.raises(ValueError, match="row labels"):
        plot_design_matrix(matrix, columns, rows[:-1], tmp_path / "x.svg")


def test_summary_against_closed_forms(design):
    matrix, columns, _ = design
    summary = design_summary(matrix, columns)
    assert summary["rank"] == 3
    np.testing.assert_allclose(summary["condition_number"], np.linalg.cond(matrix))
    corr = np.array(summary["correlation"], dtype=float)
    np.testing.assert_allclose(corr[1:, 1:], np.corrcoef(matrix[:, 1:].T))
    assert np.isnan(corr[0]).all()  # the intercept is constant
    # with an intercept, VIFs of the other columns are the diagonal of the inverse correlation
    expected = np.diag(np.linalg.inv(np.corrcoef(matrix[:, 1:].T)))
    np.testing.assert_allclose([summary["vif"]["age"], summary["vif"]["groupPatient"]], expected)


def test_summary_vif_by_explicit_regression_without_intercept():
    rng = np.random.default_rng(2)
    matrix = rng.normal(size=(30, 3)) + 1.0
    summary = design_summary(matrix, ["a", "b", "c"])
    for j, name in enumerate("abc"):
        others = np.delete(matrix, j, axis=1)
        fitted = others @ np.linalg.lstsq(others, matrix[:, j], rcond=None)[0]
        r2 = 1 - np.sum((matrix[:, j] - fitted) ** 2) / np.sum(matrix[:, j] ** 2)  # uncentred
        np.testing.assert_allclose(summary["vif"][name], 1 / (1 - r2))


def test_summary_rank_deficient():
    matrix = np.column_stack([np.ones(6), np.arange(6), 2 * np.arange(6)])
    summary = design_summary(matrix, ["intercept", "x", "x2"])
    assert summary["rank"] == 2
    assert summary["condition_number"] == np.inf
    assert summary["vif"]["x"] == np.inf and summary["vif"]["x2"] == np.inf
