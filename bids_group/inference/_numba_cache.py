"""Where numba keeps the compiled permutation kernels.

The kernels are compiled once (~30 s) and cached on disk (``cache=True``). numba writes that
cache in ``NUMBA_CACHE_DIR`` if set, else beside the source (``__pycache__``) or, when the install
is read-only, in the user's cache folder under HOME; when none is writable it refuses to import
the module at all ("cannot cache function ...: no locator available"). That is the usual state
of a container or an HPC software module: a read-only install and no writable home (Apptainer
``--containall``, ``docker run --user``). :func:`ensure_writable_cache` runs before the kernels
are defined and, only in that case, points numba at a folder that is writable.

The fallback is private: numba's cache holds pickles and machine code that are loaded and run,
so a folder that another user could have created, replaced or written is never used.

An image can ship the kernels pre-compiled: ``BIDS_GROUP_NUMBA_SEED`` names a read-only folder
laid out as a ``NUMBA_CACHE_DIR`` (the Dockerfile fills it at build time). numba does not read
a folder it cannot write, so when the cache folder in use holds no kernels of this install yet,
the seed's are copied into it; only a seed that no one but root or this user can change is used.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
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


def _uid() -> int | None:
    return os.getuid() if hasattr(os, "getuid") else None  # None: no POSIX owners (Windows)


def _trusted_parent(folder: Path) -> bool:
    """Nobody else can replace entries of ``folder``: it is owned by this user or root, and
    either nobody else may write in it or it has the sticky bit (as /tmp)."""
    uid = _uid()
    if uid is None:
        return True
    try:
        st = folder.stat()
    except OSError:
        return False
    shared = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    return st.st_uid in (uid, 0) and (not shared or bool(st.st_mode & stat.S_ISVTX))


def _private(folder: Path) -> bool:
    """``folder`` is a real folder (no symlink) owned by this user, nobody else may write in it,
    and no folder above it lets anyone else swap it (see ``_trusted_parent``)."""
    uid = _uid()
    if uid is None:
        return folder.is_dir() and not folder.is_symlink()
    try:
        st = folder.lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == uid
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        and all(_trusted_parent(parent) for parent in folder.absolute().parents)
    )


def _make_private(folder: Path) -> bool:
    """Create ``folder`` (mode 0700) if missing; whether it is private and writable."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    return _private(folder) and _writable(folder)


def _user_cache_home() -> Path | None:
    """``$XDG_CACHE_HOME`` (absolute only, as the XDG specification says) or ``~/.cache``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(base):
        return Path(base)
    try:
        return Path.home() / ".cache"
    except RuntimeError:  # HOME unset and no password-database entry
        return None


def _fallback_folder() -> Path:
    """A folder for numba's cache that is writable and private to this user."""
    home = _user_cache_home()
    if home is not None and _make_private(home / "bids-group" / "numba"):
        return home / "bids-group" / "numba"
    # Kept between runs, so that the kernels are compiled once per user and machine.
    shared = Path(tempfile.gettempdir()) / f"bids-group-numba-{_uid() or 0}"
    if _make_private(shared):
        return shared
    run_only = Path(tempfile.mkdtemp(prefix="bids-group-numba-"))
    atexit.register(shutil.rmtree, run_only, ignore_errors=True)
    log.warning(
        "No private writable folder for the compiled permutation kernels (%s is not private "
        "to you), so they are compiled again in every run (~30 s). Set NUMBA_CACHE_DIR to a "
        "folder of your own to keep them.",
        shared,
    )
    return run_only


SEED_ENV = "BIDS_GROUP_NUMBA_SEED"


def _unchangeable_by_others(path: Path, directory: bool) -> bool:
    """``path`` is a real folder/regular file owned by root or this user that nobody else
    may write."""
    try:
        st = path.lstat()
    except OSError:
        return False
    kind = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    return kind and st.st_uid in (_uid(), 0) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _copy_seed(cache_dir: Path, source_file: str) -> None:
    """Copy the pre-compiled kernels of ``source_file`` from ``$BIDS_GROUP_NUMBA_SEED`` into
    ``cache_dir`` when it has none yet (see the module docstring)."""
    seed = os.environ.get(SEED_ENV, "")
    if not seed or _uid() is None or not os.path.isabs(seed):
        return
    try:
        from numba.core.caching import _CacheLocator
    except ImportError:  # numba reorganised: no copy, the kernels are compiled as before
        return
    subpath = _CacheLocator.get_suitable_cache_subpath(source_file)  # as numba names it
    source, target = Path(seed) / subpath, cache_dir / subpath
    if any(target.glob("*.nbi")):
        return  # the user's own cache: never overwritten
    if not (
        _unchangeable_by_others(source, directory=True)
        and _unchangeable_by_others(Path(seed), directory=True)
        and all(_trusted_parent(parent) for parent in Path(seed).absolute().parents)
    ):
        log.debug("%s=%s ignored: it is not a folder only root or you can change", SEED_ENV, seed)
        return
    try:
        files = [
            p
            for p in sorted(source.iterdir())
            if p.suffix in (".nbi", ".nbc") and _unchangeable_by_others(p, directory=False)
        ]
        target.mkdir(mode=0o700, exist_ok=True)
        for p in sorted(files, key=lambda p: p.suffix == ".nbi"):  # data first, then indexes
            with tempfile.NamedTemporaryFile(dir=target, delete=False) as copy:
                try:
                    copy.write(p.read_bytes())
                except OSError:
                    os.unlink(copy.name)
                    raise
            os.replace(copy.name, target / p.name)
    except OSError as exc:  # e.g. an unreadable seed: the kernels are compiled as before
        log.debug("could not copy the pre-compiled kernels from %s: %s", source, exc)
        return
    log.debug("copied %d pre-compiled kernel files from %s to %s", len(files), source, target)


def ensure_writable_cache(source_file: str) -> None:
    """Make sure numba can cache the kernels of ``source_file``; see the module docstring.

    Does nothing when numba's own choice works: a writable ``NUMBA_CACHE_DIR``, else a writable
    ``__pycache__`` beside the source. Call before any ``@njit(cache=True)`` of that file runs.
    """
    chosen = numba.config.CACHE_DIR
    if chosen and _writable(Path(chosen)):
        _copy_seed(Path(chosen), source_file)
        return
    if _writable(Path(source_file).parent / "__pycache__"):
        return
    folder = _fallback_folder()
    if chosen:
        log.warning("NUMBA_CACHE_DIR=%s cannot be written; using %s instead.", chosen, folder)
    else:
        log.debug("the install is read-only: numba caches the compiled kernels in %s", folder)
    numba.config.CACHE_DIR = str(folder)
    _copy_seed(folder, source_file)
