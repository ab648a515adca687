"""A Ctrl-C whose KeyboardInterrupt a library swallows still stops the run before its results
reach OUT_DIR.

Found by interrupting real runs: a SIGINT that arrived while numba compiled a kernel was raised
inside llvmlite's ctypes callback, ctypes printed "Exception ignored" and the run finished with
exit 0. Here the same real mechanism (a ctypes callback, a real SIGINT) is reproduced on
purpose around the real staging of the outputs, and through the CLI's own handlers.
"""

from __future__ import annotations

import ctypes
import signal

import pytest

from bids_group import interrupts
from bids_group.cli import main
from bids_group.outputs.staging import staged_output


def _swallowed_sigint() -> None:
    """SIGINT raised inside a ctypes callback: its KeyboardInterrupt is lost there."""
    callback = ctypes.CFUNCTYPE(None)(lambda: signal.raise_signal(signal.SIGINT))
    callback()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowing
def test_a_swallowed_interrupt_still_stops_the_commit(tmp_path):
    out = tmp_path / "out"
    previous = interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            with staged_output(out, overwrite=False) as stage:
                (stage / "dataset_description.json").write_text("{}")
                _swallowed_sigint()  # carries on, as the numba compile did
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir()] == []  # no staging folder left either
    finally:
        interrupts.restore(previous)


def test_the_cli_puts_back_the_signal_handlers(tmp_path):
    before = {sig: signal.getsignal(sig) for sig in interrupts.SIGNALS}
    assert main([str(tmp_path / "missing"), str(tmp_path / "out"), "group", "-q"]) == 66
    assert {sig: signal.getsignal(sig) for sig in interrupts.SIGNALS} == before
