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
