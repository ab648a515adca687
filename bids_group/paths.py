"""Where a run reads and where it writes: the paths of the command line, checked before any input
is read.

Rules
-----
* Inputs are read-only. OUT_DIR and the work folder (``-w``) may not be, or lie inside, a dataset
  whose files are read: a derivatives BIDS_DIR or a ``--derivatives`` folder. Inside a *raw*
  BIDS_DIR only its ``derivatives/`` folder is allowed (the BIDS convention
  ``<bids_dir>/derivatives/bids-group``): pybids never indexes it, so a later run does not take
  the results for inputs. OUT_DIR may not be a parent of a dataset either.
* The work folder may not be OUT_DIR or lie inside it (OUT_DIR is unchanged by a failed run).
* Each path has the expected kind: files for ``--model``, ``--mask``, ``--bids-filter-file``,
  folders for BIDS_DIR, ``--derivatives`` and ``-w``; OUT_DIR and ``-w`` must be creatable (no
  component that is a file, no name too long).

:func:`disk_error` turns an :class:`OSError` met while writing into the one-line
:class:`~bids_group.errors.OutputError` (exit 73) that every writer raises.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bids_group.errors import MissingInputError, OutputError, UsageError

#: Longest file name (bytes) of common file systems (ext4, xfs, tmpfs, NTFS in UTF-16 units).
_NAME_MAX = 255
#: errno -> (cause, advice) of the messages of :func:`disk_error`.
_CAUSES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", "free space or choose another {what}"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose another {what}"),
    errno.EFBIG: ("file too large for the file system", "choose another {what}"),
    errno.EROFS: ("read-only file system", "choose a writable {what}"),
    errno.EACCES: ("permission denied", "choose a writable {what}"),
    errno.EPERM: ("operation not permitted", "choose a writable {what}"),
    errno.ENOTDIR: ("a component of the path is a file, not a folder", "choose another {what}"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter {what}"),
    errno.ELOOP: ("too many levels of symbolic links", "choose another {what}"),
}


def disk_error(exc: OSError, folder: Path, what: str = "OUT_DIR") -> OutputError:
    """The :class:`OutputError` (exit 73) for ``exc``, raised while writing in ``folder``.

    Parameters
    ----------
    exc : OSError
        The error (ENOSPC, EDQUOT, EROFS, EACCES, ENOTDIR, ENAMETOOLONG, ...).
    folder : Path
        The folder the user chose (OUT_DIR, the work folder), never a staging folder.
    what : str
        How the user names that folder in the advice: ``OUT_DIR``, ``work folder (-w)``...

    Returns
    -------
    OutputError
        E.g. "cannot write in /x: no space left on device; free space or choose another
        OUT_DIR". Raise it ``from exc``.
    """
    cause, advice = _CAUSES.get(
        exc.errno or 0, ((exc.strerror or str(exc)).lower(), "choose another {what}")
    )
    name = Path(str(exc.filename)).name if exc.filename else ""
    if exc.errno == errno.ENAMETOOLONG and len(os.fsencode(name)) > _NAME_MAX:
        # The folder is not to blame: one file name (made of the model's, node's or
        # contrast's names) is longer than a file system allows.
        return OutputError(
            f"cannot write in {folder}: the output file name {name[:60]}... is "
            f"{len(os.fsencode(name))} bytes, more than the {_NAME_MAX} a file system allows; "
            "shorten the model, node or contrast names in the model file"
        )
    return OutputError(f"cannot write in {folder}: {cause}; {advice.format(what=what)}")


def traceback_files(exc: BaseException) -> list[str]:
    """Source files of the frames of ``exc``'s traceback, outermost first."""
    files = []
    tb = exc.__traceback__
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return files


def scratch_disk_error(exc: OSError) -> OutputError | None:
    """The :class:`OutputError` (73) for a write failure in a scratch folder, else None.

    The scratch folders are numba's cache of the compiled permutation kernels, matplotlib's
    folder (``MPLCONFIGDIR``) and ``TMPDIR``. ``write()`` errors name no file: those raised
    inside numba or matplotlib are theirs. Failures in OUT_DIR are mapped by the staging.
    """
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        return None  # only a write raises these: never a problem with an input
    folders = [("TMPDIR", Path(tempfile.gettempdir()), None)]
    if os.environ.get("MPLCONFIGDIR"):
        mpl = Path(os.environ["MPLCONFIGDIR"])
        folders.append(("work folder (-w) or MPLCONFIGDIR", mpl, "matplotlib"))
    numba_cache = _numba_cache_folder()
    if numba_cache is not None:
        folders.append(("NUMBA_CACHE_DIR", numba_cache, "numba"))
    named = [n for n in (exc.filename, exc.filename2) if isinstance(n, (str, Path))]
    for name in named:
        path = Path(os.path.abspath(name))
        for what, folder, _ in reversed(folders):  # the most specific first
            if path.is_relative_to(folder):
                return disk_error(exc, folder, what)
    if named:
        return None
    files = traceback_files(exc)
    for what, folder, package in folders:
        if package and any(f"{os.sep}{package}{os.sep}" in f for f in files):
            return disk_error(exc, folder, what)
    return None


def _numba_cache_folder() -> Path | None:
    """Where numba caches the permutation kernels, if they were loaded."""
    if "bids_group.inference._kernels" not in sys.modules:
        return None
    chosen = sys.modules["numba"].config.CACHE_DIR
    if chosen:
        return Path(chosen)
    return Path(sys.modules["bids_group.inference._kernels"].__file__).parent / "__pycache__"


def check_creatable(path: Path, what: str) -> None:
    """Raise :class:`OutputError` (73) when the folder ``path`` could never be created.

    That is when a component of it is a file (ENOTDIR) or a name is too long (ENAMETOOLONG);
    the message names the component. A missing ``path`` or missing parents are fine.
    """
    try:
        os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            blocker = next(p for p in reversed(path.parents) if p.is_file())
            raise OutputError(
                f"cannot create {what} {path}: {blocker} is a file, not a folder; "
                f"choose another {what}"
            ) from exc
        if exc.errno == errno.ENAMETOOLONG:
            longest = max(path.parts, key=lambda part: len(os.fsencode(part)))
            raise OutputError(
                f"cannot create {what} {path}: the name {longest[:40]}... is too long "
                f"({len(os.fsencode(longest))} bytes); choose a shorter {what}"
            ) from exc
        raise disk_error(exc, path, what) from exc


@dataclass(frozen=True)
class RunPaths:
    """The paths of a run, absolute and resolved (symbolic links followed)."""

    bids_dir: Path
    out_dir: Path
    derivatives: tuple[Path, ...] = ()
    model: Path | None = None
    mask: Path | None = None
    work_dir: Path | None = None
    filter_file: Path | None = None

    @property
    def input_files(self) -> tuple[Path, ...]:
        """Files read besides the datasets: no output may replace them."""
        return tuple(p for p in (self.model, self.mask, self.filter_file) if p is not None)


def check_run_paths(
    bids_dir: Path,
    out_dir: Path,
    *,
    derivatives: Sequence[Path] = (),
    model: Path | None = None,
    mask: Path | None = None,
    work_dir: Path | None = None,
    filter_file: Path | None = None,
) -> RunPaths:
    """Resolve the paths of the command line and check them; see the module docstring.

    Returns
    -------
    RunPaths

    Raises
    ------
    MissingInputError (66)
        An input does not exist or has the wrong kind (a folder given as ``--model``...).
    UsageError (64)
        OUT_DIR or the work folder overlaps a dataset that is read, or the work folder
        overlaps OUT_DIR; the message names both paths.
    OutputError (73)
        OUT_DIR or the work folder cannot be created (a component is a file, a name too long).
    """
    bids = _resolve(bids_dir, "BIDS_DIR")
    if not bids.exists():
        raise MissingInputError(f"BIDS_DIR {bids} does not exist")
    if not bids.is_dir():
        raise MissingInputError(f"BIDS_DIR {bids} is a file; expected the folder of a dataset")
    files = {
        "--model": (model, "a model file (JSON or YAML)"),
        "--mask": (mask, "a NIfTI image file"),
        "--bids-filter-file": (filter_file, "a JSON file"),
    }
    resolved_files = {name: _input_file(path, name, kind) for name, (path, kind) in files.items()}
    derivs = tuple(_resolve(p, "--derivatives") for p in derivatives)
    for path in derivs:
        if not path.exists():
            raise MissingInputError(f"--derivatives {path}: no such folder")
        if not path.is_dir():
            raise MissingInputError(
                f"--derivatives {path} is a file; expected a folder (a BIDS derivatives dataset)"
            )
    out = _resolve(out_dir, "OUT_DIR", output=True)
    work = _resolve(work_dir, "-w", output=True) if work_dir is not None else None
    read = _read_datasets(bids, derivs)
    _check_apart(out, "OUT_DIR", read, bids)
    check_creatable(out, "OUT_DIR")
    if work is not None:
        check_creatable(work, "work folder (-w)")
        if work.exists() and not work.is_dir():
            raise OutputError(
                f"work folder (-w) {work} is a file; expected a folder (created if missing)"
            )
        _check_apart(work, "the work folder (-w)", read, bids, parents_ok=True)
        if work == out or out in work.parents:
            raise UsageError(
                f"the work folder (-w) {work} is inside OUT_DIR {out}: OUT_DIR holds only "
                "results; choose a work folder elsewhere"
            )
    return RunPaths(
        bids_dir=bids,
        out_dir=out,
        derivatives=derivs,
        model=resolved_files["--model"],
        mask=resolved_files["--mask"],
        work_dir=work,
        filter_file=resolved_files["--bids-filter-file"],
    )


def _resolve(path: Path, option: str, *, output: bool = False) -> Path:
    """Absolute path with links followed; a link loop is the user's, named (not a crash:
    ``Path.resolve`` raises RuntimeError on Python < 3.13, OSError ELOOP after)."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as err:
        error = OutputError if output else MissingInputError
        raise error(
            f"{option} {path}: cannot follow its symbolic links ({err}); a link points back "
            "to itself or to a folder above it"
        ) from None


def _input_file(path: Path | None, option: str, kind: str) -> Path | None:
    if path is None:
        return None
    resolved = _resolve(path, option)
    if resolved.is_dir():
        raise MissingInputError(f"{option} {path} is a folder; expected {kind}")
    if not resolved.is_file():
        raise MissingInputError(f"{option} {path}: no such file")
    return resolved


def _read_datasets(bids_dir: Path, derivatives: Sequence[Path]) -> list[tuple[str, Path, bool]]:
    """(option, folder, raw) of each dataset whose files are read."""
    datasets = [("BIDS_DIR", bids_dir, _is_raw(bids_dir))]
    return datasets + [("--derivatives", path, False) for path in derivatives]


def _is_raw(dataset: Path) -> bool:
    """Whether ``dataset`` says it is raw (DatasetType "raw", the BIDS default when absent).

    A missing or unreadable description counts as a derivative (the strict case); the inputs
    stage reports it."""
    try:
        description = json.loads((dataset / "dataset_description.json").read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(description, dict) and description.get("DatasetType", "raw") == "raw"


def _check_apart(
    path: Path,
    what: str,
    datasets: Sequence[tuple[str, Path, bool]],
    bids_dir: Path,
    *,
    parents_ok: bool = False,
) -> None:
    """Refuse ``path`` equal to, inside (or, unless ``parents_ok``, a parent of) a dataset."""
    overlap = _overlap(path, datasets, parents_ok=parents_ok)
    if overlap is not None:
        raise UsageError(
            f"{what} {path} {overlap}, whose files are read: bids-group never writes into its "
            f"inputs; choose e.g. {_suggestion(datasets, bids_dir)}"
        )


def _overlap(
    path: Path, datasets: Sequence[tuple[str, Path, bool]], *, parents_ok: bool = False
) -> str | None:
    """How ``path`` overlaps the first dataset it overlaps ("is inside BIDS_DIR /x"), or None."""
    for option, dataset, raw in datasets:
        inside = path == dataset or dataset in path.parents
        if inside and raw and (dataset / "derivatives") in path.parents:
            continue  # <raw>/derivatives/<name>: never indexed
        if inside or (not parents_ok and path in dataset.parents):
            relation = "is" if path == dataset else "is inside" if inside else "contains"
            return f"{relation} {option} {dataset}"
    return None


def _suggestion(datasets: Sequence[tuple[str, Path, bool]], bids_dir: Path) -> Path:
    """An OUT_DIR that overlaps none of ``datasets``."""
    candidates = []
    if datasets[0][2]:
        candidates.append(bids_dir / "derivatives" / "bids-group")
    for _, dataset, _ in datasets:
        if dataset.parent.name == "derivatives":
            candidates.append(dataset.parent / "bids-group")
        candidates.append(dataset.parent / f"{dataset.name}-bids-group")
    for candidate in candidates:
        if _overlap(candidate, datasets) is None:
            return candidate
    return Path.home() / "bids-group-results"


def isolate_caches(work_dir: Path | None) -> None:
    """Point matplotlib's config and cache at a scratch folder (HOME may be read-only, and a run
    writes nothing outside OUT_DIR and the work folder but a private temporary folder).

    The folder is ``<work_dir>/bids-group-mplconfig``, else a private folder of this run
    (``mkdtemp``: mode 0700) removed at exit. Call before matplotlib is imported; does nothing
    when ``MPLCONFIGDIR`` is set.

    Raises
    ------
    OutputError (73)
        The folder cannot be created or written.
    """
    if "MPLCONFIGDIR" in os.environ:
        return
    try:
        if work_dir is not None:
            target = work_dir / "bids-group-mplconfig"
            target.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=target).close()
        else:
            target = Path(tempfile.mkdtemp(prefix="bids-group-mpl-"))
            atexit.register(shutil.rmtree, target, ignore_errors=True)
    except OSError as exc:
        if work_dir is not None:
            raise disk_error(exc, work_dir, "work folder (-w)") from exc
        raise disk_error(exc, Path(tempfile.gettempdir()), "TMPDIR") from exc
    os.environ["MPLCONFIGDIR"] = str(target)
