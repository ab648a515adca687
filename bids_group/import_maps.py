"""``bids-group-import``: lay out SPM or FSL first-level maps as a BIDS derivatives dataset.

::

    bids-group-import spm 'study/subject_*/con_0006.hdr' ds-faces --contrast faces \\
        --subject-regex 'subject_(\\d+)' --task faces --space MNI152NLin2009cAsym
    bids-group ds-faces results group

SOURCE is a folder (searched recursively for ``con_*.nii[.gz]`` / ``con_*.hdr`` with spm,
``cope*.nii.gz`` with fsl) or a quoted glob pattern. Each map becomes::

    OUT_DIR/sub-<label>/func/sub-<label>_[task-<t>_][space-<s>_]contrast-<c>_stat-effect_statmap.nii.gz

and with fsl the ``varcope<N>.nii.gz`` beside each ``cope<N>.nii.gz`` becomes ``stat-variance``.
The subject label is the first group of ``--subject-regex`` searched in the path relative to
SOURCE (the folder, or the part of the pattern before its first wildcard). Single-file NIfTI maps
are symbolic links to the sources (``--copy``: copies); SPM/Analyze ``.hdr``/``.img`` pairs are
converted to ``.nii.gz`` with nibabel (data, affine and header kept). ``dataset_description.json``
(DatasetType derivative, GeneratedBy) and a ``participants.tsv`` stub (``participant_id`` only;
add your covariates as columns) are written.

The source is never written to; OUT_DIR must not exist or be empty, and appears complete or not
at all. Errors print one line and exit with the codes of :mod:`bids_group.errors` (64 usage, 65
bad data, 66 missing source, 18 nothing matched, 73 OUT_DIR not empty).
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from bids_group import __version__
from bids_group.errors import (
    BidsGroupError,
    DataError,
    EmptySelectionError,
    MissingInputError,
    OutputError,
    UsageError,
)

log = logging.getLogger("bids_group.import")

CODE_URL = "https://github.com/bids-group/bids-group"
DEFAULT_SUBJECT_REGEX = r"sub(?:ject)?[-_]?([A-Za-z0-9]+)"
#: Files a SOURCE folder is searched for, per format.
FOLDER_PATTERNS = {
    "spm": ("con_*.nii", "con_*.nii.gz", "con_*.hdr"),
    "fsl": ("cope*.nii.gz", "cope*.nii"),
}
_LABEL_RE = re.compile(r"[A-Za-z0-9]+")


@dataclass(frozen=True)
class SourceMap:
    """One first-level map to lay out: its subject and the files of each ``stat``."""

    subject: str
    files: dict[str, Path]  # stat -> source file (effect, and variance for FSL)


def find_sources(fmt: str, source: str, subject_regex: str) -> tuple[Path, list[SourceMap]]:
    """The base folder of SOURCE (a folder or a glob) and the maps it selects, one per subject,
    sorted by subject.

    Raises
    ------
    MissingInputError, EmptySelectionError, UsageError, DataError
    """
    try:
        regex = re.compile(subject_regex)
    except re.error as err:
        raise UsageError(
            f"--subject-regex {subject_regex!r} is not a regular expression: {err}"
        ) from None
    base, files = _list_files(fmt, source)
    by_subject: dict[str, list[Path]] = {}
    for path in files:
        relative = path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)
        match = regex.search(relative)
        if match is None:
            raise UsageError(
                f"--subject-regex {subject_regex!r} does not match {relative!r} (path relative "
                f"to {base}); give one whose first group is the subject label"
            )
        label = match.group(1) if regex.groups else match.group(0)
        label = label[4:] if label.startswith("sub-") else label
        if not label or not _LABEL_RE.fullmatch(label):
            raise UsageError(
                f"subject label {label!r} from {relative!r} is not alphanumeric; adjust "
                "--subject-regex so that its first group captures only letters and digits"
            )
        by_subject.setdefault(label, []).append(path)
    clashes = {s: p for s, p in by_subject.items() if len(p) > 1}
    if clashes:
        subject, paths = next(iter(sorted(clashes.items())))
        raise DataError(
            f"{len(clashes)} subject(s) have several maps, e.g. sub-{subject}: "
            f"{', '.join(str(p) for p in paths)}; select one contrast with a glob such as "
            f"'{base}/*/{paths[0].name}', or fix --subject-regex"
        )
    return base, [_source_map(fmt, s, p[0]) for s, p in sorted(by_subject.items())]


def _list_files(fmt: str, source: str) -> tuple[Path, list[Path]]:
    """The base folder of SOURCE and the primary files it selects (``.hdr`` for pairs)."""
    if glob.has_magic(source):
        parts = Path(source).parts
        first = next(i for i, p in enumerate(parts) if glob.has_magic(p))
        base = Path(*parts[:first]) if first else Path(".")
        if not base.is_dir():
            raise MissingInputError(f"SOURCE {source}: folder {base} does not exist")
        found = [Path(p) for p in glob.glob(source, recursive=True)]
    else:
        base = Path(source)
        if not base.exists():
            raise MissingInputError(f"SOURCE {source} does not exist")
        if base.is_file():
            found, base = [base], base.parent
        else:
            found = [p for pattern in FOLDER_PATTERNS[fmt] for p in base.rglob(pattern)]
    files: set[Path] = set()
    for path in found:
        name = path.name
        if not path.is_file() or (fmt == "fsl" and name.startswith("varcope")):
            continue  # a varcope is paired with its cope below
        if name.endswith(".img"):
            path = path.with_suffix(".hdr")
        if not (name.endswith((".nii", ".nii.gz", ".hdr", ".img"))):
            continue
        files.add(path.absolute())
    if not files:
        patterns = " ".join(FOLDER_PATTERNS[fmt])
        raise EmptySelectionError(
            f"SOURCE {source} selects no {fmt.upper()} map (a folder is searched for {patterns}; "
            "give a quoted glob for other names)"
        )
    return base.absolute(), sorted(files)


def _source_map(fmt: str, subject: str, path: Path) -> SourceMap:
    files = {"effect": path}
    if path.suffix == ".hdr" and not path.with_suffix(".img").is_file():
        raise DataError(f"{path} has no {path.with_suffix('.img').name} beside it")
    if fmt == "fsl":
        variance = path.with_name("var" + path.name)
        if variance.is_file():
            files["variance"] = variance
        else:
            log.warning("no %s beside %s: only stat-effect is laid out", variance.name, path)
    return SourceMap(subject, files)


def map_name(subject: str, *, contrast: str, stat: str, task: str | None, space: str | None,
             extension: str) -> str:  # fmt: skip
    """``sub-<s>_[task-<t>_][space-<s>_]contrast-<c>_stat-<stat>_statmap<ext>``.

    >>> map_name("01", contrast="faces", stat="effect", task=None, space="MNI152NLin2009cAsym",
    ...          extension=".nii.gz")
    'sub-01_space-MNI152NLin2009cAsym_contrast-faces_stat-effect_statmap.nii.gz'
    """
    parts = [f"sub-{subject}"]
    parts += [f"task-{task}"] if task else []
    parts += [f"space-{space}"] if space else []
    parts += [f"contrast-{contrast}", f"stat-{stat}", "statmap"]
    return "_".join(parts) + extension


def import_maps(
    fmt: str,
    source: str,
    out_dir: Path,
    *,
    contrast: str,
    subject_regex: str = DEFAULT_SUBJECT_REGEX,
    task: str | None = None,
    space: str | None = None,
    copy: bool = False,
    command: str | None = None,
) -> list[Path]:
    """Lay out the maps SOURCE selects in ``out_dir`` (see the module docstring).

    Returns the written files (in ``out_dir``), dataset_description.json and participants.tsv
    first.
    """
    from bids_group.outputs.staging import staged_output

    if fmt not in FOLDER_PATTERNS:
        raise UsageError(f"format {fmt!r} is not one of {sorted(FOLDER_PATTERNS)}")
    for name, value in (("--contrast", contrast), ("--task", task), ("--space", space)):
        if value is not None and not _LABEL_RE.fullmatch(value):
            raise UsageError(f"{name} {value!r} must be a BIDS label (letters and digits only)")
    out_dir = Path(out_dir).absolute()
    _check_out_dir(out_dir, source)
    base, maps = find_sources(fmt, source, subject_regex)
    written: list[Path] = []
    with staged_output(out_dir, overwrite=False) as stage:
        written.append(_write_description(stage, fmt, base, command))
        participants = stage / "participants.tsv"
        lines = ["participant_id", *(f"sub-{m.subject}" for m in maps)]
        participants.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(participants)
        for item in maps:
            folder = stage / f"sub-{item.subject}" / "func"
            folder.mkdir(parents=True)
            for stat, path in item.files.items():
                written.append(
                    _place(path, folder, item.subject, stat, contrast, task, space, copy)
                )
    return [out_dir / p.relative_to(stage) for p in written]


def _check_out_dir(out_dir: Path, source: str) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputError(f"OUT_DIR {out_dir} exists and is not an empty folder; choose another")
    if not out_dir.parent.is_dir():
        raise OutputError(f"the parent of OUT_DIR {out_dir} does not exist")
    magic = [i for i, p in enumerate(Path(source).parts) if glob.has_magic(p)]
    root = Path(*Path(source).parts[: magic[0]]) if magic else Path(source)
    try:
        root, resolved = root.resolve(), out_dir.resolve()
    except (RuntimeError, OSError) as err:  # a link loop (RuntimeError before Python 3.13)
        message = f"cannot follow the links of {source} or {out_dir}: {err}"
        raise MissingInputError(message) from None
    if resolved == root or root in resolved.parents:
        raise UsageError(
            f"OUT_DIR {out_dir} lies inside SOURCE {root}: bids-group-import never writes into "
            f"its source; choose e.g. {root.parent / (root.name + '-bids')}"
        )


def _place(path: Path, folder: Path, subject: str, stat: str, contrast: str,
           task: str | None, space: str | None, copy: bool) -> Path:  # fmt: skip
    """Link, copy or convert one source file into ``folder``; returns the new path."""
    if path.suffix in (".hdr", ".img"):
        import nibabel as nib

        target = folder / map_name(subject, contrast=contrast, stat=stat, task=task,
                                   space=space, extension=".nii.gz")  # fmt: skip
        try:
            image = nib.Nifti1Image.from_image(nib.load(path))
            image.get_fdata()  # read now: a read error is the source's, not the disk's
        except Exception as err:  # nibabel raises many types for unreadable images
            raise DataError(f"cannot convert {path} to NIfTI: {err}") from err
        image.to_filename(target)  # a write error (full disk) stays an OSError: exit 73
        return target
    extension = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    target = folder / map_name(subject, contrast=contrast, stat=stat, task=task, space=space,
                               extension=extension)  # fmt: skip
    if copy:
        shutil.copyfile(path, target)
    else:
        os.symlink(path.resolve(), target)
    return target


def _write_description(stage: Path, fmt: str, base: Path, command: str | None) -> Path:
    from bids_group.outputs.description import BIDS_VERSION, write_json

    software = {"spm": "SPM", "fsl": "FSL"}[fmt]
    generated: dict[str, Any] = {"Name": "bids-group-import", "Version": __version__,
                                 "CodeURL": CODE_URL}  # fmt: skip
    description = f"{software} first-level maps laid out as BIDS statistical maps"
    generated["Description"] = description + (f". Command: {command}" if command else "")
    return write_json(
        stage / "dataset_description.json",
        {
            "Name": f"{software} first-level maps",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [generated],
            "SourceDatasets": [{"URL": base.resolve().as_uri()}],
        },
    )


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("fmt", metavar="{spm,fsl}", type=click.Choice(sorted(FOLDER_PATTERNS)))
@click.argument("source")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option(
    "--contrast", required=True, metavar="LABEL", help="Contrast label of the maps, e.g. faces."
)
@click.option(
    "--subject-regex",
    metavar="REGEX",
    default=DEFAULT_SUBJECT_REGEX,
    show_default=True,
    help="Regular expression searched in each path (relative to SOURCE); its first group is the "
    "subject label, e.g. 'subject_(\\d+)'.",
)
@click.option("--task", metavar="LABEL", help="Task label added to the names (task-<t>).")
@click.option(
    "--space", metavar="LABEL", help="Space label added to the names, e.g. MNI152NLin2009cAsym."
)
@click.option("--copy", is_flag=True, help="Copy the NIfTI files instead of linking to them.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only on stderr.")
@click.version_option(__version__, "--version", "-V", prog_name="bids-group-import")
def cli(fmt: str, source: str, out_dir: Path, **options: Any) -> None:
    """Lay out SPM or FSL first-level maps as a BIDS derivatives dataset for bids-group.

    \b
    SOURCE   a folder (searched for con_*.nii / con_*.hdr with spm, cope*.nii.gz with fsl)
             or a quoted glob such as 'study/subject_*/con_0006.hdr'
    OUT_DIR  the dataset to create (must not exist, or be empty)

    The written files are printed on stdout, one per line. Example:

    \b
      bids-group-import spm 'study/subject_*/con_0006.hdr' ds --contrast faces \\
          --subject-regex 'subject_(\\d+)' --space MNI152NLin2009cAsym
      bids-group ds results group
    """
    log.setLevel(logging.WARNING if options.pop("quiet") else logging.INFO)
    command = click.get_current_context().obj
    written = import_maps(fmt, source, out_dir, command=command, **options)
    subjects = {p.parent.parent.name for p in written if p.name.startswith("sub-")}
    log.info("%d subject(s) laid out in %s", len(subjects), out_dir)
    for path in written:
        click.echo(str(path))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bids-group-import``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("bids-group-import %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    command = shlex.join(["bids-group-import", *argv])
    try:
        cli.main(args=argv, prog_name="bids-group-import", standalone_mode=False, obj=command)
        return 0
    except click.exceptions.Exit as stop:
        return stop.exit_code
    except click.UsageError as err:
        click.echo(f"bids-group-import: error: {err.format_message()}", err=True)
        return UsageError.exit_code
    except click.Abort:
        return 130
    except BidsGroupError as err:
        click.echo(f"bids-group-import: error: {err}", err=True)
        return err.exit_code
    except OSError as err:
        if err.errno not in _WRITE_ERRNOS:
            return _unexpected(err)
        where = f" ({err.filename})" if err.filename else ""
        click.echo(
            f"bids-group-import: error: cannot write{where}: {os.strerror(err.errno)}; free "
            "space or choose another OUT_DIR (nothing was left behind)",
            err=True,
        )
        return OutputError.exit_code
    except Exception as err:  # a bug: one line, not a traceback
        return _unexpected(err)
    finally:
        log.removeHandler(handler)


#: errno values that only a write raises: the disk's fault, not the user's input (exit 73).
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES)


def _unexpected(err: Exception) -> int:
    click.echo(
        f"bids-group-import: unexpected error ({type(err).__name__}: {err}). This is a bug; "
        "please report it.",
        err=True,
    )
    return 1


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
