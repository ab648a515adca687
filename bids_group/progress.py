"""Progress bars on stderr for long steps (permutations), through click.

Shown only when asked (the CLI asks when stderr is a terminal and ``-q`` is not given), so logs
redirected to a file or read by a pipeline never fill with carriage returns.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import click

ProgressCallback = Callable[[int, int], None]


class _Bar:
    """A ``progress(done, total)`` callback that opens a click bar on its first call."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(
                length=total,
                label=self.label,
                file=sys.stderr,
                show_eta=True,
                show_pos=True,
                show_percent=True,
            )
            self.bar.__enter__()
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@contextmanager
def progress_bar(label: str, *, enabled: bool):
    """Yield a ``progress(done, total)`` callback (None when not ``enabled``).

    >>> with progress_bar("permutations", enabled=False) as progress:
    ...     progress is None
    True
    """
    if not enabled:
        yield None
        return
    bar = _Bar(label)
    try:
        yield bar
    finally:
        bar.close()
