"""Command-line parsing: options, spellings, exit codes for usage errors. No analysis runs here."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bids_group import __version__
from bids_group.cli import main


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_version(capsys):
    code, out, _ = run_main(capsys, "--version")
    assert code == 0 and __version__ in out


def test_help_lists_exit_codes(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    assert "Exit codes" in out and "65" in out and "--participant-label" in out


@pytest.mark.parametrize("level", ["participant", "session", "GROUP"])
def test_unknown_level_exits_17(capsys, tmp_path, level):
    code, out, err = run_main(capsys, str(tmp_path), str(tmp_path / "out"), level)
    assert code == 17
    assert out == ""
    assert level in err and "group" in err
    assert not (tmp_path / "out").exists()


def test_unknown_option_is_usage_error(capsys, tmp_path):
    code, out, err = run_main(capsys, str(tmp_path), str(tmp_path / "o"), "group", "--frobnicate")
    assert code == 64 and out == ""
    assert "--frobnicate" in err


def test_bad_choice_is_usage_error(capsys, tmp_path):
    code, _, err = run_main(
        capsys, str(tmp_path), str(tmp_path / "o"), "group", "--height-control", "fwe"
    )
    assert code == 64 and "fwe" in err


@pytest.mark.parametrize("label", ["sub-01", "01"])
@pytest.mark.parametrize("spelling", ["--participant-label", "--participant_label"])
def test_participant_label_spellings(label, spelling, tmp_path):
    from bids_group.cli import cli

    ctx = cli.make_context(
        "bids-group", [str(tmp_path), str(tmp_path / "o"), "group", spelling, label], obj={}
    )
    assert ctx.params["participant_labels"] == ("01",)


def test_bad_participant_label(capsys, tmp_path):
    code, _, err = run_main(
        capsys, str(tmp_path), str(tmp_path / "o"), "group", "--participant-label", "sub-0_1"
    )
    assert code == 64 and "sub-0_1" in err


def test_missing_bids_dir_exits_66(capsys, tmp_path):
    code, _, err = run_main(capsys, str(tmp_path / "nope"), str(tmp_path / "o"), "group")
    assert code == 66 and "nope" in err and "Traceback" not in err


def test_console_script_runs_as_a_process(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from bids_group.cli import console_main; console_main()",
            str(tmp_path / "nope"),
            str(tmp_path / "o"),
            "participant",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 17
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr


def test_space_separated_participant_labels(tmp_path):
    from bids_group.cli import cli, expand_multi_value_options

    argv = [
        str(tmp_path),
        str(tmp_path / "o"),
        "group",
        "--participant-label",
        "sub-01",
        "02",
        "-q",
    ]
    ctx = cli.make_context("bids-group", expand_multi_value_options(argv), obj={})
    assert ctx.params["participant_labels"] == ("01", "02")
    assert ctx.params["quiet"] == 1


def test_participant_label_without_value_is_usage_error(capsys, tmp_path):
    code, _, err = run_main(
        capsys, str(tmp_path), str(tmp_path / "o"), "group", "--participant-label"
    )
    assert code == 64 and "--participant-label" in err
