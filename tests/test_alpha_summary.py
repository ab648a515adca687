"""The ``--json`` summary and the HTML report state the same alpha for every height control.

With ``--height-control none`` the threshold is a z given by the user, chosen without an error
rate: alpha is null in the JSON summary and "—" in the report (the p the z corresponds to is the
thresholded map's ``PValueThreshold``). With fpr, fdr and bonferroni both give the alpha used.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
from clicheck import check_failure, run_ok
from conftest import make_bids_derivatives

from bids_group.errors import UsageError

CASES = [
    (["--height-control", "none", "--threshold", "3.09"], None),
    (["--height-control", "fpr"], 0.001),
    (["--height-control", "fpr", "--alpha", "0.01"], 0.01),
    (["--height-control", "fdr"], 0.05),
    (["--height-control", "bonferroni", "--alpha", "0.1"], 0.1),
]


def _report_alpha(report: Path) -> str:
    """The value the report's inference facts give for alpha (``<dt>alpha</dt><dd>...</dd>``)."""
    found = re.findall(r"<dt>alpha</dt><dd>([^<]*)</dd>", report.read_text(encoding="utf-8"))
    assert found, "no alpha fact in the report"
    assert len(set(found)) == 1, found
    return html.unescape(found[0])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bids_derivatives(tmp_path_factory.mktemp("alpha") / "ds", n_subjects=6)


@pytest.mark.parametrize(("args", "alpha"), CASES)
def test_json_and_report_agree(dataset: Path, tmp_path: Path, args: list[str], alpha) -> None:
    summary, _ = run_ok(dataset, tmp_path / "out", *args)
    assert summary["inference"]["alpha"] == alpha
    shown = _report_alpha(Path(summary["report"]))
    assert shown == ("—" if alpha is None else f"{alpha:g}")
    # The thresholded map records the same alpha, and with none the p its z corresponds to.
    sidecars = sorted((tmp_path / "out").rglob("*_stat-z_desc-*_statmap.json"))
    assert sidecars
    threshold = json.loads(sidecars[0].read_text())["Threshold"]
    assert threshold["Alpha"] == alpha
    if alpha is None:
        assert threshold["Value"] == 3.09 and 0.0019 < threshold["PValueThreshold"] < 0.0021


def test_model_file_none_with_command_line_alpha_refused(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Threshold from the model file (HeightControl none) plus --alpha: alpha would do nothing."""
    model = tmp_path / "model.yaml"
    model.write_text(
        "Name: m\nBIDSModelVersion: '1.0.0'\nNodes:\n  - Level: Dataset\n    Name: n\n"
        "    GroupBy: [contrast]\n    Model:\n      Type: glm\n      X: [1]\n      Software:\n"
        "        bids-group:\n          Inference: {HeightControl: none, Threshold: 3.09}\n"
        "    DummyContrasts: {Test: t}\n"
    )
    argv = [dataset, tmp_path / "out", "group", "--model", model, "--alpha", "0.01"]
    check_failure(capsys, argv, tmp_path / "out", UsageError.exit_code, "--alpha 0.01", "none")
