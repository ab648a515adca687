"""Run the real CLI on a user mistake and check everything the brief promises about it.

:func:`check_failure` runs :func:`bids_group.cli.main` in-process and checks:

1. the exit code;
2. stdout is empty, stderr has no traceback and names every ``needle`` (the culprit);
3. OUT_DIR is exactly as before (absent, or the same bytes) and no staging folder is left;
4. every input named on the command line (each argument that is an existing path outside
   OUT_DIR: the dataset, the model, the mask, filter files, derivatives folders) keeps the
   bytes **and the modification times** of all its files.

Test modules import it: ``from clicheck import check_failure, snapshot``.
"""

from __future__ import annotations

from pathlib import Path

from bids_group.cli import main


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """Bytes of every file under ``folder`` (None when it does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def input_snapshot(paths: list[Path]) -> dict[str, tuple[bytes, int]]:
    """(bytes, mtime_ns) of every file in or at ``paths`` (symlinks not followed into loops)."""
    state: dict[str, tuple[bytes, int]] = {}
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            try:
                state[str(path)] = (path.read_bytes(), path.stat().st_mtime_ns)
            except OSError:  # a dangling link or a loop planted by the test itself
                state[str(path)] = (b"", -1)
    return state


def staging_leftovers(out_dir: Path) -> list[Path]:
    """Hidden staging or backup folders a failed run could have left beside or in OUT_DIR."""
    parent = out_dir.parent
    hidden = [p for p in parent.glob(".*") if "bids-group" in p.name] if parent.is_dir() else []
    if out_dir.is_dir():
        hidden += [p for p in out_dir.glob(".*") if "bids-group" in p.name]
    return hidden


def _inputs_of(argv: list[str], out_dir: Path) -> list[Path]:
    out = out_dir.resolve() if out_dir.exists() or out_dir.parent.exists() else out_dir
    found = []
    for token in argv:
        path = Path(token)
        try:
            if not path.exists():
                continue
            resolved = path.resolve()
        except (OSError, RuntimeError):
            continue
        if resolved == out or out in resolved.parents or resolved in out.parents:
            continue
        found.append(path)
    return found


def check_failure(capsys, argv: list, out_dir: Path, code: int, *needles: str) -> str:
    """Run the CLI on ``argv``; assert the failure is clean (see the module docstring).

    Returns stderr, for further checks.
    """
    argv = [str(a) for a in argv]
    inputs = _inputs_of(argv, out_dir)
    before_inputs = input_snapshot(inputs)
    before = snapshot(out_dir)
    exit_code = main(argv)
    captured = capsys.readouterr()
    assert exit_code == code, f"exit {exit_code}, stderr: {captured.err}"
    assert captured.out == ""
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in captured.err, f"{needle!r} not in {captured.err!r}"
    assert snapshot(out_dir) == before
    assert staging_leftovers(out_dir) == []
    assert input_snapshot(inputs) == before_inputs, "an input file was changed"
    return captured.err


def run_cli(bids: Path, out: Path, *args: str) -> tuple[int, str, str]:
    """Run ``bids-group BIDS OUT group --json -q ARGS`` in-process; (exit code, stdout, stderr).

    :func:`bids_group.cli.main` configures logging for a process; the caller's logging (pytest's
    caplog) is put back afterwards.
    """
    import contextlib
    import io
    import logging

    stdout, stderr = io.StringIO(), io.StringIO()
    logger = logging.getLogger("bids_group")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main([str(bids), str(out), "group", "--json", "-q", *map(str, args)])
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    return code, stdout.getvalue(), stderr.getvalue()


def run_ok(bids: Path, out: Path, *args: str) -> tuple[dict, str]:
    """:func:`run_cli` that must succeed; (the ``--json`` summary, stderr)."""
    import json

    code, stdout, stderr = run_cli(bids, out, *args)
    assert code == 0, stderr
    return json.loads(stdout), stderr
