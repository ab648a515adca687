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


def test_help_lists_options_by_topic(capsys):
    """--help has one section per topic, in order, each option in exactly one of them."""
    import re

    import click

    from bids_group.cli import OPTION_GROUPS, OTHER_OPTIONS, cli

    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    headings = re.findall(r"^(\S[^:\n]*):$", out, re.M)
    assert headings == list(OPTION_GROUPS), headings
    assert OTHER_OPTIONS not in out
    tagged = [name for names in OPTION_GROUPS.values() for name in names]
    assert len(tagged) == len(set(tagged)), "an option is in two sections"
    options = [p.name for p in cli.params if isinstance(p, click.Option)]
    assert sorted(tagged) == sorted(options), "tag every option in cli.OPTION_GROUPS"
    # Each option is printed under its own heading (e.g. --tfce-e under Permutation inference).
    blocks = dict(zip(headings, re.split(r"^\S[^:\n]*:$", out, flags=re.M)[1:], strict=True))
    for title, names in OPTION_GROUPS.items():
        for param in (p for p in cli.params if p.name in names):
            assert param.opts[0] in blocks[title], (param.opts[0], title)
    assert "-h, --help" in blocks["Run"] and "-V, --version" in blocks["Run"]


def test_help_examples_are_valid_command_lines(capsys):
    """Every example of the --help epilogue parses with the real CLI to the values it shows."""
    import shlex
    from pathlib import Path

    from bids_group.cli import EXAMPLES, cli, expand_multi_value_options

    _, out, _ = run_main(capsys, "--help")
    assert 3 <= len(EXAMPLES) <= 5
    for _text, command in EXAMPLES:
        assert command in out
        argv = expand_multi_value_options(shlex.split(command)[1:])
        ctx = cli.make_context("bids-group", argv, resilient_parsing=False)
        assert ctx.params["analysis_level"] == "group"
        for option, value in zip(argv, argv[1:], strict=False):
            if option == "--n-perm":
                assert ctx.params["n_perm"] == int(value)
            if option == "--height-control":
                assert ctx.params["height_control"] == value
    root = Path(__file__).resolve().parents[1]
    first = shlex.split(EXAMPLES[0][1])  # the one that runs from a clone as it stands
    assert (root / first[1]).is_dir() and (root / first[first.index("--model") + 1]).is_file()


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
