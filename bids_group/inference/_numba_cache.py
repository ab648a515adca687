"""Where numba keeps the compiled permutation kernels.

The kernels are compiled once (~30 s) and cached on disk (``cache=True``). numba writes that
cache beside the source (``__pycache__``) or, when the install is read-only, in the user's
cache folder under HOME; when neither is writable it refuses to import the module at all
("cannot cache function ...: no locator available"). That is the usual state of a container
or an HPC software module: a read-only install and no writable home (Apptainer
``--containall``, ``docker run --user``). :func:`ensure_writable_cache` runs before the kernels
are defined and, only in that case, points numba at a folder that is writable.

The fallback is private: numba's cache holds pickles and machine code that are loaded and run,
so a folder another user could have created or written is never used.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from pathlib import Path

import numba

log = logging.getLogger(__name__)


def _writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (created if missing), as numba checks."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


def _private(folder: Path) -> bool:
    """``folder`` exists, is a real folder owned by this user and nobody else may write in it."""
    try:
        st = folder.lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.getuid()
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def _user_cache_home() -> Path | None:
    """``$XDG_CACHE_HOME`` or ``~/.cache``, or None when there is no usable home."""
    base = os.environ.get("XDG_CACHE_HOME")
    if base:
        return Path(base)
    try:
        return Path.home() / ".cache"
    except RuntimeError:  # HOME unset and no password-database entry
        return None


def _fallback_folder() -> Path:
    """A writable folder for numba's cache, private to this user."""
    home = _user_cache_home()
    if home is not None and _writable(home / "bids-group" / "numba"):
        return home / "bids-group" / "numba"
    # Kept between runs (so the kernels are compiled once per user and machine), but only if
    # this user owns it and nobody else can write there.
    shared = Path(tempfile.gettempdir()) / f"bids-group-numba-{os.getuid()}"
    try:
        shared.mkdir(mode=0o700)
    except OSError:
        pass
    if _private(shared) and _writable(shared):
        return shared
    return Path(tempfile.mkdtemp(prefix="bids-group-numba-"))  # this run only


def ensure_writable_cache(source_file: str) -> None:
    """Make sure numba can cache the kernels of ``source_file``; see the module docstring.

    Does nothing when the user set ``NUMBA_CACHE_DIR`` or when numba's own choice (the
    ``__pycache__`` beside the source) is writable. Call before any ``@njit(cache=True)`` of
    that file runs.
    """
    if numba.config.CACHE_DIR or _writable(Path(source_file).parent / "__pycache__"):
        return
    folder = _fallback_folder()
    numba.config.CACHE_DIR = str(folder)
    log.debug("the install is read-only: numba caches the compiled kernels in %s", folder)
