"""Atomic output: results appear in OUT_DIR only when the whole run succeeded.

Use :func:`check_writable` before the analysis starts (it fails fast, exit code 73), then write
everything into the folder yielded by :func:`staged_output`::

    check_writable(out_dir, overwrite=overwrite, entries=planned_top_level_names)
    ...  # the analysis
    with staged_output(out_dir, overwrite=overwrite) as stage:
        write_json(stage / "dataset_description.json", ...)
        (stage / "node-dataLevel").mkdir()
        ...

Semantics
---------
* OUT_DIR does not exist: everything is written into a hidden sibling
  ``.<name>.bids-group-tmp-<random>`` which is renamed to OUT_DIR at the end: one atomic
  ``rename``. The parent folder must exist (it is not created).
* OUT_DIR exists: everything is written into a hidden folder inside OUT_DIR (same file system,
  so moves are renames); at the end each top-level entry of the stage is moved into OUT_DIR.
  An entry that already exists is refused (:class:`~bids_group.errors.OutputError`) unless
  ``overwrite``, in which case it is replaced as a whole (a ``node-X`` folder from an earlier
  run is replaced, not merged, so no stale map survives). Entries of OUT_DIR that the run does
  not write are never touched.
* On any exception inside the block (including ``KeyboardInterrupt`` and ``SystemExit``), or a
  failure while moving entries into place, the stage is deleted, entries already moved are
  put back, and OUT_DIR is exactly as before.
* A failure of the disk while writing in the stage (no space left, quota, read-only, name too
  long...) becomes one :class:`~bids_group.errors.OutputError` naming OUT_DIR and the cause.
* Log lines emitted inside the block name final paths: the stage folder is written as OUT_DIR.
* No output replaces an input file: :func:`check_writable` refuses an OUT_DIR entry the run
  would write that is, or holds, one of ``inputs`` (:class:`~bids_group.errors.UsageError`).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from bids_group import interrupts
from bids_group.errors import OutputError, UsageError
from bids_group.paths import disk_error, traceback_files

log = logging.getLogger(__name__)

TMP_MARKER = ".bids-group-tmp-"
_PROBE_MARKER = ".bids-group-probe-"
#: Characters of OUT_DIR's name kept in the hidden names beside it (a name may be 255 bytes).
_NAME_KEPT = 64
#: errnos that only a write can raise: attributed to OUT_DIR even without a file name.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def check_writable(
    out_dir: Path,
    *,
    overwrite: bool,
    entries: Iterable[str] | None = None,
    inputs: Iterable[Path] = (),
) -> None:
    """Fail before any work if the results could not be written to ``out_dir``.

    Parameters
    ----------
    out_dir : Path
    overwrite : bool
        Whether existing entries of the same names may be replaced.
    entries : iterable of str or None
        Top-level names the run will write (``dataset_description.json``,
        ``model-<label>_smdl.json``, ``node-<Node>``). None means "any": an existing non-empty
        ``out_dir`` is then refused without ``overwrite``.
    inputs : iterable of Path
        Input files (resolved): none may be, or lie inside, an entry the run writes, even with
        ``overwrite``.

    Raises
    ------
    OutputError
        The parent is missing or not a folder, ``out_dir`` is not a folder, the folder that
        would hold the stage cannot be written, or entries exist and ``overwrite`` is False.
    UsageError
        An entry the run writes would replace an input file.
    """
    out_dir = Path(out_dir)
    entries = None if entries is None else list(entries)
    _check_inputs_kept(out_dir, entries, inputs)
    if _lexists(out_dir):
        if not out_dir.is_dir():
            raise OutputError(f"output path {out_dir} exists and is not a folder; choose another")
        _probe(out_dir, out_dir)
        if not overwrite:
            clashes = _existing(out_dir, entries)
            if clashes:
                raise OutputError(
                    f"output folder {out_dir} already contains {', '.join(clashes)}; "
                    "use --overwrite to replace them, or choose another output folder"
                )
        return
    parent = out_dir.parent
    if not parent.is_dir():
        what = "does not exist" if not parent.exists() else "is not a folder"
        raise OutputError(
            f"cannot create output folder {out_dir}: its parent {parent} {what}; "
            "create the parent first"
        )
    _probe(parent, out_dir)


def _check_inputs_kept(out_dir: Path, entries: list[str] | None, inputs: Iterable[Path]) -> None:
    """Refuse a run whose outputs would replace (or, for a folder, remove) an input file."""
    targets = [out_dir] if entries is None else [out_dir / name for name in entries]
    for path in inputs:
        for target in targets:
            if path == target or target in path.parents:
                raise UsageError(
                    f"the input file {path} lies in OUT_DIR {out_dir}, where the result "
                    f"{target.name} would replace it: bids-group never writes into its inputs; "
                    "move the input out of OUT_DIR or choose another OUT_DIR"
                )


def _lexists(path: Path) -> bool:
    """Whether ``path`` exists, counting a dangling symbolic link as existing."""
    return os.path.lexists(path)


def _existing(out_dir: Path, entries: Iterable[str] | None) -> list[str]:
    """Entries of ``out_dir`` that the run would write (visible ones, if ``entries`` is None)."""
    if entries is None:
        return sorted(p.name for p in out_dir.iterdir() if TMP_MARKER not in p.name)
    return sorted(name for name in entries if _lexists(out_dir / name))


def _probe(folder: Path, out_dir: Path) -> None:
    """Create and remove a hidden folder: the only reliable test (root ignores modes)."""
    try:
        probe = tempfile.mkdtemp(prefix=f".{out_dir.name[:_NAME_KEPT]}{_PROBE_MARKER}", dir=folder)
        os.rmdir(probe)
    except OSError as exc:
        raise disk_error(exc, folder) from exc


class StagedOutput:
    """Context manager yielding a staging folder that is committed to ``out_dir`` on success.

    Parameters
    ----------
    out_dir : Path
    overwrite : bool

    Attributes
    ----------
    written : tuple of Path
        Final paths of the top-level entries moved into ``out_dir`` (after a successful exit).
    """

    def __init__(self, out_dir: Path, *, overwrite: bool) -> None:
        self.out_dir = Path(out_dir).absolute()
        self.overwrite = overwrite
        self.written: tuple[Path, ...] = ()
        self._stage: Path | None = None
        self._fresh = False
        self._final_paths: _FinalPaths | None = None

    def __enter__(self) -> Path:
        check_writable(self.out_dir, overwrite=True)  # entries are checked again at commit
        self._fresh = not self.out_dir.exists()
        if self._fresh:
            name = f".{self.out_dir.name[:_NAME_KEPT]}{TMP_MARKER}{secrets.token_hex(4)}"
            self._stage = self.out_dir.parent / name
        else:
            self._stage = self.out_dir / f"{TMP_MARKER}{secrets.token_hex(4)}"
        try:
            self._stage.mkdir()
        except OSError as exc:
            raise disk_error(exc, self.out_dir) from exc
        log.debug("staging outputs in %s", self._stage)
        self._final_paths = _FinalPaths(self._stage, self.out_dir)
        self._final_paths.install()
        return self._stage

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._stage is not None, "__exit__ without __enter__"
        stage = self._stage
        try:
            if exc is not None:
                self._discard()
                error = self._disk_error(exc, stage)
                if error is not None:
                    raise error from exc
                return  # the exception propagates
            try:
                interrupts.raise_if_received()  # a Ctrl-C a library swallowed still counts
                self._commit()
            except BaseException as failure:
                self._discard()
                error = self._disk_error(failure, stage)
                if error is not None:
                    raise error from failure
                raise
        finally:
            if self._final_paths is not None:
                self._final_paths.remove()

    def _disk_error(self, exc: BaseException, stage: Path) -> OutputError | None:
        """The :class:`OutputError` for a failure of the disk while writing in the stage or
        OUT_DIR (``exc``, or the cause of a writer's OutputError); None for anything else."""
        cause = exc.__cause__ if isinstance(exc, OutputError) else exc
        if not isinstance(cause, OSError):
            return None
        names = [n for n in (cause.filename, cause.filename2) if isinstance(n, (str, Path))]
        if names:
            here = (stage, self.out_dir)
            if not any(Path(os.path.abspath(n)).is_relative_to(f) for n in names for f in here):
                return None  # e.g. an input that cannot be read
        elif cause.errno not in _WRITE_ERRNOS or not _raised_by_a_writer(cause):
            return None  # e.g. numba saving compiled kernels in its cache: see cli.main
        return disk_error(cause, self.out_dir)

    def _discard(self) -> None:
        if self._stage is not None and self._stage.exists():
            shutil.rmtree(self._stage, ignore_errors=True)
            log.debug("removed staging folder %s", self._stage)

    def _commit(self) -> None:
        assert self._stage is not None
        names = sorted(p.name for p in self._stage.iterdir())
        if self._fresh:
            try:
                os.rename(self._stage, self.out_dir)
            except OSError as exc:
                # Someone created out_dir meanwhile (rename onto a non-empty folder fails).
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not self.out_dir.is_dir():
                    raise OutputError(f"cannot create {self.out_dir}: {exc}") from exc
                self._fresh = False
                self._merge_from(self._stage, names)
            else:
                self._stage = None
        else:
            self._merge_from(self._stage, names)
        self.written = tuple(self.out_dir / name for name in names)

    def _merge_from(self, stage: Path, names: list[str]) -> None:
        """Move each staged entry into ``out_dir``; undo every move if one fails."""
        clashes = [
            n for n in names if (self.out_dir / n).exists() or (self.out_dir / n).is_symlink()
        ]
        if clashes and not self.overwrite:
            raise OutputError(
                f"output folder {self.out_dir} already contains {', '.join(clashes)}; "
                "use --overwrite to replace them"
            )
        _check_nothing_else_lost(stage, self.out_dir, clashes)
        backup = stage / f"{TMP_MARKER}old"  # inside the stage: deleted with it on failure
        backup.mkdir()
        done: list[str] = []
        try:
            for name in names:
                target = self.out_dir / name
                if name in clashes:
                    os.rename(target, backup / name)
                done.append(name)
                os.rename(stage / name, target)
        except BaseException:
            self._undo(stage, backup, done, clashes)
            raise
        shutil.rmtree(stage)
        self._stage = None

    def _undo(self, stage: Path, backup: Path, done: list[str], clashes: list[str]) -> None:
        """Put back what :meth:`_merge_from` moved, newest first."""
        for name in reversed(done):
            target = self.out_dir / name
            if _lexists(target) and not _lexists(stage / name):
                os.rename(target, stage / name)
            if name in clashes and (backup / name).exists():
                os.rename(backup / name, target)


def _check_nothing_else_lost(stage: Path, out_dir: Path, clashes: list[str]) -> None:
    """--overwrite replaces results of the same names, nothing else: a folder being replaced
    (``node-<Node>``) may not hold files the new run does not write (a user's notes, another
    model's results, results of contrasts no longer in the model), which would be deleted."""
    lost: list[str] = []
    for name in clashes:
        old, new = out_dir / name, stage / name
        if old.is_dir() and not old.is_symlink():
            kept = {p.relative_to(new) for p in new.rglob("*")} if new.is_dir() else set()
            lost += [
                str(Path(name) / p.relative_to(old))
                for p in sorted(old.rglob("*"))
                if not p.is_dir() and p.relative_to(old) not in kept
            ]
    if lost:
        shown = ", ".join(lost[:5]) + (f", ... ({len(lost)} in all)" if len(lost) > 5 else "")
        raise OutputError(
            f"--overwrite would delete {len(lost)} file(s) in {out_dir} that this run does not "
            f"write: {shown}. Move them away or choose another OUT_DIR; nothing was changed"
        )


def _raised_by_a_writer(exc: BaseException) -> bool:
    """Whether the innermost bids_group frame of ``exc``'s traceback is a writer of results
    (:mod:`bids_group.outputs`, :mod:`bids_group.report`): ``write()`` errors name no file."""
    package = Path(__file__).resolve().parents[1]
    ours = [Path(f) for f in traceback_files(exc) if Path(f).is_relative_to(package)]
    return bool(ours) and ours[-1].parent.name in ("outputs", "report")


class _FinalPaths(logging.Filter):
    """Rewrites log records so that they name OUT_DIR instead of the staging folder.

    Installed on the handlers of the ``bids_group`` logger and of its ancestors (those that see
    the records of every module of the package) while the stage is open.
    """

    def __init__(self, stage: Path, out_dir: Path) -> None:
        super().__init__()
        self.stage, self.out_dir = str(stage), str(out_dir)
        self._handlers: list[logging.Handler] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.stage in message:
            record.msg, record.args = message.replace(self.stage, self.out_dir), ()
        return True

    def install(self) -> None:
        logger: logging.Logger | None = logging.getLogger("bids_group")
        while logger is not None:
            self._handlers += logger.handlers
            logger = logger.parent if logger.propagate else None
        for handler in self._handlers:
            handler.addFilter(self)

    def remove(self) -> None:
        for handler in self._handlers:
            handler.removeFilter(self)
        self._handlers = []


def staged_output(out_dir: Path, *, overwrite: bool) -> StagedOutput:
    """Stage outputs for ``out_dir``; ``with staged_output(...) as stage:`` yields the folder.

    See the module docstring for the semantics. Raises :class:`OutputError` (73).
    """
    return StagedOutput(out_dir, overwrite=overwrite)
