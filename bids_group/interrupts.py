"""Ctrl-C and SIGTERM that no library can swallow.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread runs Python code,
and that can be inside a callback whose caller drops exceptions: numba's compiler calls back
into Python through ctypes (llvmlite's object cache), and ctypes prints "Exception ignored"
and carries on. A run interrupted there used to finish and exit 0 with its results written.
The handlers installed here also record the signal, and the staging of the outputs checks the
record before it moves anything into OUT_DIR (:func:`raise_if_received`).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

_RECEIVED = threading.Event()

#: The signals handled: Ctrl-C, and SIGTERM (a batch system stopping the job).
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _handle(signum: int, frame: Any) -> None:
    _RECEIVED.set()
    raise KeyboardInterrupt


def install() -> dict[int, Any]:
    """Handle :data:`SIGNALS` (main thread only); return the previous handlers."""
    _RECEIVED.clear()
    return {sig: signal.signal(sig, _handle) for sig in SIGNALS}


def restore(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`install` returned."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def raise_if_received() -> None:
    """Raise KeyboardInterrupt if a handled signal arrived since :func:`install`, even when the
    exception it raised then was lost."""
    if _RECEIVED.is_set():
        raise KeyboardInterrupt
