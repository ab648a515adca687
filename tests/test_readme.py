"""The README tells the truth: CI runs its test command, and its tables match the code."""

from __future__ import annotations

import re
from pathlib import Path

from bids_group.errors import EXIT_CODES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _command(number: int) -> str:
    match = re.search(rf"\*\*{number}\. [^\n]*\*\*[^\n]*\n\n    ([^\n]+)\n", README)
    assert match, f"README has no command {number}"
    return match.group(1).strip()


def test_ci_runs_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _command(2) in ci


def test_readme_first_command_runs_the_shipped_example():
    command = _command(1)
    assert "pip install ." in command and "bids-group examples/" in command
    dataset = re.search(r"bids-group (examples/\S+)", command).group(1)
    assert (ROOT / dataset / "dataset_description.json").is_file()
    model = re.search(r"--model (\S+)", command).group(1)
    assert (ROOT / model).is_file()


def test_exit_code_table_matches_errors_module():
    for code, (name, _meaning) in EXIT_CODES.items():
        assert re.search(rf"^\| `?{code}`? \| {re.escape(name)} \|", README, re.M), (
            f"exit code {code} ({name}) missing from the README table"
        )


def test_usage_block_is_the_current_help(monkeypatch):
    """The README's Usage block is `bids-group --help` (up to the exit-code epilog)."""
    import contextlib
    import io

    from bids_group.cli import main

    monkeypatch.setenv("COLUMNS", "200")  # the width is capped at 100 by the CLI
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--help"]) == 0
    help_text = out.getvalue().split("\n  Exit codes:")[0].rstrip()
    usage = re.search(r"```\n(Usage: bids-group.*?)\n```", README, re.S).group(1).rstrip()
    assert usage == help_text, "README Usage block is stale: paste `COLUMNS=200 bids-group --help`"


def test_every_model_inference_key_is_documented():
    from bids_group.spec import INFERENCE_KEYS

    for key in INFERENCE_KEYS:
        assert f"`{key}`" in README, f"model-file key {key} missing from the README"
