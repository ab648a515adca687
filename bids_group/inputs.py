"""Find the first-level maps with pybids and read participants.tsv.

This is the only module that talks to pybids.

The maps are looked for in the derivatives folders given with ``--derivatives`` when there are
any, else in ``bids_dir`` itself (which is then usually a derivatives dataset). Only those
folders are indexed (the raw dataset is never indexed: we need nothing from it but
``participants.tsv``), with an in-memory pybids database, no validation and no metadata
indexing, so nothing is written into the (possibly read-only) input folders. With a work
folder (``-w``) the index is also saved there and reused by a later run while no file under the
dataset has changed (see :func:`_index`): 10,000 maps take ~9 s to index, ~3 s to reload.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bids_group.errors import (
    BidsDatasetError,
    DataError,
    EmptySelectionError,
    MissingInputError,
    UsageError,
)
from bids_group.validation import read_utf8

log = logging.getLogger(__name__)

#: pybids config shipped with the package: adds the statistical-derivatives entities
#: ``contrast`` and ``stat`` to pybids' bundled ``bids`` and ``derivatives`` configs.
CONFIG_NAME = "bids-group.json"
#: Extensions read by default (single-file NIfTI, compressed or not).
NIFTI_EXTENSIONS: tuple[str, ...] = (".nii", ".nii.gz")
#: Default suffix and stat when the filters name no suffix (BIDS statistical derivatives).
DEFAULT_SUFFIX = "statmap"
DEFAULT_STAT = "effect"
#: Entities that always tell maps apart (one subject can have one map per session).
#: Entities that always make two maps of one subject different measurements (repeated measures).
KEY_ENTITIES: tuple[str, ...] = ("subject", "session", "run")
#: With ``GroupBy: []`` the user pools maps on purpose (e.g. a paired design over two contrasts), so
#: these also tell maps apart; with a non-empty GroupBy, maps of one group that differ in them
#: (e.g. the same contrast from two tasks) would be pooled silently, so they are ambiguous.
POOLED_KEY_ENTITIES: tuple[str, ...] = ("task", "contrast")
#: How many values / files an error message lists before "...".
_MAX_LISTED = 10


@dataclass(frozen=True)
class InputMap:
    """One first-level map: its path and its BIDS entities (``subject`` without ``sub-``)."""

    path: Path
    entities: Mapping[str, Any]


@dataclass(frozen=True)
class InputSet:
    """Everything the later stages need from the dataset.

    Attributes
    ----------
    maps : tuple of InputMap
        Sorted by (subject, session, other entities).
    participants : DataFrame
        participants.tsv, indexed by subject label without ``sub-`` (index name
        ``participant_id``; the ``participant_id`` column itself is dropped); ``n/a`` and empty
        cells are NaN and columns whose values all parse as numbers are numeric. Empty (but
        indexed by the subjects of ``maps``) when the file is absent. Subjects of ``maps`` absent
        from the table are allowed here; the design stage decides whether that is an error.
    dataset_root : Path
        Folder holding the maps (the first derivatives folder holding a selected map when
        ``--derivatives`` is used).
    participants_path : Path or None
    source_datasets : tuple of str
        For dataset_description.json ``SourceDatasets`` (``file://`` URIs of the dataset
        folders read, bids_dir first).
    """

    maps: tuple[InputMap, ...]
    participants: pd.DataFrame
    dataset_root: Path
    participants_path: Path | None
    source_datasets: tuple[str, ...]


def collect_inputs(
    bids_dir: Path,
    *,
    derivatives: Sequence[Path] = (),
    input_filters: Mapping[str, Any] | None = None,
    participant_labels: Sequence[str] | None = None,
    bids_filters: Mapping[str, Any] | None = None,
    group_by: Sequence[str] = ("contrast",),
    index_cache: Path | None = None,
) -> InputSet:
    """Index the dataset and select maps.

    Selection rule: a map is kept when it matches every filter of ``input_filters`` (the
    model's ``Input``), every filter of ``bids_filters`` (``--bids-filter-file``; when both
    name the same entity the allowed values are intersected) and the participant labels.
    Only ``.nii`` / ``.nii.gz`` files are considered unless a filter names ``extension``.
    When **neither** filter mapping names ``suffix``, ``suffix=statmap`` is added, and then
    also ``stat=effect`` unless a filter names ``stat`` (so by default: ``*_stat-effect_statmap``
    maps). When a filter names ``suffix`` (e.g. ``{"suffix": "probseg", "label": "GM"}`` for
    VBM), no default is added.

    Filter values are a string, a number, a list of those, or ``None`` (JSON ``null``),
    meaning "the entity is absent". ``subject`` values may carry the ``sub-`` prefix.

    Parameters
    ----------
    bids_dir : Path
        BIDS dataset root (raw or derivative); must hold dataset_description.json.
    derivatives : sequence of Path
        Derivatives datasets holding the maps; when given, the maps are looked for only there.
    input_filters, bids_filters : mapping of str to value or list, optional
        Flat mappings of pybids entity name to allowed value(s).
    participant_labels : sequence of str, optional
        Subjects to keep, with or without ``sub-``. Every label must have a selected map.
    group_by : sequence of str
        Entities that may differ between maps of one subject (the model's ``GroupBy``, besides
        ``subject`` and ``session``). Two selected maps that agree on subject, session and these
        entities are duplicates.
    index_cache : Path, optional
        Folder (in the work folder) where each dataset's pybids index is saved and reused while
        nothing under the dataset changed; None: index in memory only.

    Returns
    -------
    InputSet

    Raises
    ------
    MissingInputError (66)
        ``bids_dir`` or a derivatives folder does not exist.
    BidsDatasetError (16)
        dataset_description.json missing or not valid JSON.
    UsageError (64)
        A filter names an unknown entity or is not a flat mapping.
    EmptySelectionError (18)
        Nothing selected, or a participant label has no selected map; the message lists the
        values present for the entity whose filter emptied the selection.
    DataError (65)
        Duplicate maps for one subject and group; participants.tsv without ``participant_id``
        or with duplicate ids.
    """
    bids_dir = _check_dataset_dir(Path(bids_dir), what="bids_dir")
    deriv_dirs = tuple(_check_dataset_dir(Path(d), what="--derivatives") for d in derivatives)
    map_roots = deriv_dirs or (bids_dir,)

    filters = _merge_filters(_normalise_filters(input_filters), _normalise_filters(bids_filters))
    filters = _add_defaults(filters)
    labels = _normalise_labels(participant_labels)

    selected: list[InputMap] = []
    dataset_root: Path | None = None
    diagnostics: list[str] = []
    _check_entities(filters)
    for root in map_roots:
        layout = _index(root, index_cache)
        query = dict(filters)
        if labels is not None:
            query["subject"] = _intersect(query.get("subject"), labels)
        found = _select(layout, query)
        if not found:
            diagnostics.append(_explain_empty(layout, query, root))
            continue
        dataset_root = dataset_root or root
        selected.extend(found)
    if not selected:
        raise EmptySelectionError(
            "No input map selected. "
            + " ".join(diagnostics)
            + _hint_derivatives(bids_dir, deriv_dirs)
        )
    assert dataset_root is not None
    maps = tuple(sorted(selected, key=_sort_key))
    _check_labels_have_maps(labels, maps)
    _check_duplicates(maps, group_by)

    participants_path = _find_participants(bids_dir, map_roots)
    if participants_path is None:
        subjects = sorted({m.entities["subject"] for m in maps})
        participants = pd.DataFrame(index=pd.Index(subjects, name="participant_id"))
        log.info("No participants.tsv in %s: no participant variables", bids_dir)
    else:
        participants = read_participants(participants_path)
        _warn_unmatched_participants(maps, participants, participants_path, labels)
    sources = tuple(dict.fromkeys(p.as_uri() for p in (bids_dir, *deriv_dirs)))
    log.info(
        "Selected %d maps of %d subjects from %s",
        len(maps),
        len({m.entities["subject"] for m in maps}),
        dataset_root,
    )
    return InputSet(
        maps=maps,
        participants=participants,
        dataset_root=dataset_root,
        participants_path=participants_path,
        source_datasets=sources,
    )


# --- Input validation ---------------------------------------------------------------------------


def _check_dataset_dir(path: Path, *, what: str) -> Path:
    """Resolve ``path`` and check it is a folder with a readable dataset_description.json."""
    if not path.exists():
        raise MissingInputError(f"{what} {path} does not exist: give the path of a BIDS dataset")
    if not path.is_dir():
        raise MissingInputError(f"{what} {path} is not a folder: give the path of a BIDS dataset")
    path = path.resolve()
    description = path / "dataset_description.json"
    if not description.is_file():
        raise BidsDatasetError(
            f"{what} {path} has no dataset_description.json: it is not a BIDS dataset. Add one "
            '(e.g. {"Name": "my study", "BIDSVersion": "1.9.0", "DatasetType": "derivative"})'
        )
    try:
        content = json.loads(read_utf8(description, BidsDatasetError))
    except json.JSONDecodeError as err:
        raise BidsDatasetError(f"{description} is not valid JSON ({err}): fix the file") from err
    if not isinstance(content, dict):
        raise BidsDatasetError(
            f"{description} must hold a JSON object, not {type(content).__name__}"
        )
    return path


def _normalise_filters(filters: Mapping[str, Any] | None) -> dict[str, tuple[Any, ...]]:
    """Flat mapping entity -> tuple of allowed values (``None`` for "absent")."""
    out: dict[str, tuple[Any, ...]] = {}
    for key, value in (filters or {}).items():
        values = tuple(value) if isinstance(value, list | tuple) else (value,)
        for v in values:
            if v is not None and not isinstance(v, str | int | float):
                raise UsageError(
                    f"Filter {key!r}: value {v!r} is not a string, number or null; filters are a "
                    'flat mapping of entity to value(s), e.g. {"task": "faces", "space": '
                    '"MNI152NLin2009cAsym"}'
                )
        if key == "subject":
            values = tuple(_strip_sub(v) for v in values)
        if key == "extension":
            values = tuple(v if v is None or str(v).startswith(".") else f".{v}" for v in values)
        out[str(key)] = tuple(dict.fromkeys(values))
    return out


def _merge_filters(
    first: dict[str, tuple[Any, ...]], second: dict[str, tuple[Any, ...]]
) -> dict[str, tuple[Any, ...]]:
    """Both filter sets must hold: intersect the values of entities named in both."""
    merged = dict(first)
    for key, values in second.items():
        merged[key] = _intersect(merged.get(key), values) if key in merged else values
        if not merged[key]:
            raise EmptySelectionError(
                f"The model Input selects {key} in {list(first[key])} but --bids-filter-file "
                f"selects {key} in {list(values)}: no value satisfies both; change one of them"
            )
    return merged


def _add_defaults(filters: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    """Add the default extension, suffix and stat (see :func:`collect_inputs`)."""
    out = dict(filters)
    out.setdefault("extension", NIFTI_EXTENSIONS)
    if "suffix" not in filters:
        out["suffix"] = (DEFAULT_SUFFIX,)
        out.setdefault("stat", (DEFAULT_STAT,))
    return out


def _normalise_labels(labels: Sequence[str] | None) -> tuple[str, ...] | None:
    if labels is None:
        return None
    return tuple(dict.fromkeys(_strip_sub(str(label)) for label in labels))


def _strip_sub(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("sub-"):
        return value[4:]
    return value


def _intersect(allowed: Iterable[Any] | None, values: Iterable[Any]) -> tuple[Any, ...]:
    values = tuple(values)
    if allowed is None:
        return values
    allowed_keys = {_value_key(v) for v in allowed}
    return tuple(v for v in values if _value_key(v) in allowed_keys)


def _value_key(value: Any) -> Any:
    """Compare ``1``, ``"1"`` and ``"01"`` equal (pybids stores run/echo as padded ints)."""
    if value is None:
        return None
    text = str(value)
    return int(text) if text.isdigit() else text


def valid_entities() -> tuple[str, ...]:
    """Entity names pybids knows with our config (bids + derivatives + bids-group), sorted."""
    from bids.layout.models import Config

    with resources.as_file(resources.files("bids_group") / "resources" / CONFIG_NAME) as path:
        configs = [Config.load(name) for name in ("bids", "derivatives", str(path))]
    return tuple(sorted({name for config in configs for name in config.entities}))


def _check_entities(filters: Mapping[str, Any]) -> None:
    valid = valid_entities()
    unknown = sorted(set(filters) - set(valid))
    if unknown:
        raise UsageError(
            f"Unknown BIDS entit{'y' if len(unknown) == 1 else 'ies'} {unknown} in the filters "
            f"(model Input or --bids-filter-file); valid entities: {', '.join(sorted(valid))}"
        )


# --- pybids -------------------------------------------------------------------------------------


def _index(root: Path, cache: Path | None = None) -> Any:
    """Index ``root`` with pybids: in memory, no validation, no metadata; reuse or save the index
    in ``cache`` when given (the inputs are never written)."""
    from bids.layout import BIDSLayout, BIDSLayoutIndexer

    _check_no_link_loop(root)
    saved = _saved_index(root, cache) if cache is not None else None
    if saved is not None and _is_saved_index(saved):
        try:
            # validate=False as when it was built: pybids' derivatives check (GeneratedBy)
            # would reject an index of a dataset that README's recipe describes
            layout = BIDSLayout(root, database_path=saved, validate=False)
        except Exception as exc:  # a damaged or foreign database: index again
            log.warning("Cannot reuse the pybids index %s (%s); indexing again", saved, exc)
        else:
            log.info("Reused the pybids index of %s saved in %s", root, saved)
            return layout

    config = resources.files("bids_group") / "resources" / CONFIG_NAME
    with resources.as_file(config) as config_path:
        layout = BIDSLayout(
            root,
            validate=False,
            config=["bids", "derivatives", str(config_path)],
            database_path=None,
            indexer=BIDSLayoutIndexer(validate=False, index_metadata=False),
        )
    log.debug("Indexed %s", root)
    if saved is not None:
        _save_index(layout, saved)
    return layout


def _is_saved_index(folder: Path) -> bool:
    # pybids would index into a folder without its database file, with its own configuration
    return (folder / _PYBIDS_DATABASE).is_file()


def _saved_index(root: Path, cache: Path) -> Path:
    """Where the index of ``root`` in its present state is saved: the folder name holds a hash
    of the dataset's path and one of everything the index depends on (:func:`_tree_state`)."""
    import bids

    where = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    state = hashlib.sha256()
    config = resources.files("bids_group") / "resources" / CONFIG_NAME
    state.update(f"{bids.__version__}\n".encode() + config.read_bytes())
    for line in _tree_state(root):
        state.update(line.encode("utf-8", "surrogateescape"))
    return cache / f"pybids-{where}-{state.hexdigest()[:24]}"


def _tree_state(root: Path) -> Iterable[str]:
    """One line per entry pybids indexes (not hidden, not in the root's unindexed folders,
    symbolic links followed as pybids does): relative path, size and mtime. The names decide
    the index; sizes and mtimes also catch an edited dataset_description.json."""
    for folder, dirs, files in os.walk(root, followlinks=True):
        top = Path(folder) == root
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and not (top and d in _NOT_INDEXED)
        )
        rel = os.path.relpath(folder, root)
        yield f"d {rel}\n"
        for name in sorted(f for f in files if not f.startswith(".")):
            try:
                st = os.stat(os.path.join(folder, name))
            except OSError:  # a dangling link: its name still counts
                yield f"f {rel}/{name} -\n"
                continue
            yield f"f {rel}/{name} {st.st_size} {st.st_mtime_ns}\n"


def _save_index(layout: Any, saved: Path) -> None:
    """Save the index as ``saved`` (written beside, then renamed: a concurrent run sees a whole
    index or none) and remove the saved indexes of earlier states of the same dataset."""
    import sqlite3

    from sqlalchemy.exc import SQLAlchemyError

    prefix = saved.name.rsplit("-", 1)[0] + "-"
    try:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=saved.parent))
        try:
            layout.save(tmp / "db", replace_connection=False)
            os.rename(tmp / "db", saved)
        except (OSError, sqlite3.Error, SQLAlchemyError):
            if not _is_saved_index(saved):  # else another run saved the same state first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in saved.parent.glob(prefix + "*"):
            if old != saved:
                shutil.rmtree(old, ignore_errors=True)
    # the saved index is only a speed-up: go on without it (a full disk raises sqlite3's error)
    except (OSError, sqlite3.Error, SQLAlchemyError) as exc:
        log.warning("Cannot save the pybids index in %s (%s)", saved.parent, exc)
    else:
        log.info("Saved the pybids index of %s in %s", layout.root, saved)


#: The file pybids writes in a saved index folder.
_PYBIDS_DATABASE = "layout_index.sqlite"
#: Folders at the root of a dataset that pybids does not index (hidden ones neither).
_NOT_INDEXED = frozenset({"code", "derivatives", "models", "sourcedata", "stimuli"})


def _check_no_link_loop(root: Path) -> None:
    """Raise :class:`BidsDatasetError` if a symbolic link under ``root`` leads to a folder above
    it (pybids would follow it about 40 levels deep and index every map again at each level).

    Walks the folders pybids indexes, following links, and tracks the (device, inode) of the
    folders on the current path.
    """
    stack = [(root, frozenset({_folder_id(root)}))]
    while stack:
        folder, above = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # unreadable: pybids reports it, or skips it
        for entry in entries:
            if entry.name.startswith(".") or (folder == root and entry.name in _NOT_INDEXED):
                continue
            try:
                if not entry.is_dir():
                    continue
                ident = _folder_id(Path(entry.path))
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # a link to itself, or a chain of links in a ring
                    raise _loop_error(root, entry, "is a ring of symbolic links") from exc
                continue
            if ident in above:
                raise _loop_error(root, entry, "leads back to a folder above it")
            stack.append((Path(entry.path), above | {ident}))


def _folder_id(folder: Path) -> tuple[int, int]:
    st = folder.stat()
    return st.st_dev, st.st_ino


def _loop_error(root: Path, entry: os.DirEntry, what: str) -> BidsDatasetError:
    target = os.readlink(entry.path) if entry.is_symlink() else "(a mount)"
    return BidsDatasetError(
        f"symbolic link loop in {root}: {entry.path} -> {target} {what}; remove or fix the link"
    )


def _query_args(query: Mapping[str, tuple[Any, ...]]) -> dict[str, Any]:
    from bids.layout import Query

    args: dict[str, Any] = {}
    for key, values in query.items():
        args[key] = Query.NONE if values == (None,) else list(values)
    return args


def _select(layout: Any, query: Mapping[str, tuple[Any, ...]]) -> list[InputMap]:
    """Run the query; entities come back with ``subject`` without ``sub-``."""
    files = _get(layout, query)
    entities = _entities(files)
    maps = [InputMap(path=Path(f.path), entities=entities[f.path]) for f in files]
    # files without a subject (e.g. group-level results at the root) are not first-level maps
    without = [m.path for m in maps if "subject" not in m.entities]
    if without:
        log.info(
            "Ignored %d selected file(s) without a sub- entity, e.g. %s", len(without), without[0]
        )
    return [m for m in maps if "subject" in m.entities]


def _get(layout: Any, query: Mapping[str, tuple[Any, ...]]) -> list[Any]:
    # pybids cannot say "absent or one of these": such filters are applied here in Python.
    plain = {k: v for k, v in query.items() if None not in v or v == (None,)}
    files = layout.get(return_type="object", **_query_args(plain))
    mixed = {k: v for k, v in query.items() if k not in plain}
    for key, values in mixed.items():
        keys = {_value_key(v) for v in values}
        files = [f for f in files if _value_key(f.get_entities().get(key)) in keys]
    return [f for f in files if not Path(f.path).is_dir()]


#: Paths per SQL query in :func:`_entities` (SQLite allows 999 parameters before 3.32).
_PATHS_PER_QUERY = 500


def _entities(files: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """``f.get_entities()`` of every file, keyed by path, in one query per 500 files.

    pybids' ``get_entities`` runs one query per file: 10,000 maps took ~20 s that way.
    """
    if not files:
        return {}
    from bids.layout.models import Tag
    from sqlalchemy.orm import object_session

    try:  # recent pybids orders the entities (bids_sort) in get_entities
        from bids.utils import bids_sort
    except ImportError:  # older pybids returns them in query order

        def bids_sort(tags: dict[str, Any]) -> dict[str, Any]:
            return tags

    session = object_session(files[0])
    found: dict[str, dict[str, Any]] = {f.path: {} for f in files}
    paths = list(found)
    for start in range(0, len(paths), _PATHS_PER_QUERY):
        chunk = paths[start : start + _PATHS_PER_QUERY]
        # the filters of get_entities(metadata=False): the file's tags that are not metadata
        tags = session.query(Tag).filter(Tag.file_path.in_(chunk), Tag.is_metadata.is_(False))
        for tag in tags:
            found[tag.file_path][tag.entity_name] = tag.value
    return {path: dict(bids_sort(tags)) for path, tags in found.items()}


#: README section on naming SPM / FSL maps as BIDS statistical derivatives.
LAYOUT_HELP = (
    "name each map sub-<label>/[func/]sub-<label>_[task-<t>_][space-<s>_]contrast-<c>_"
    "stat-effect_statmap.nii.gz (SPM con_*.nii and FSL cope*.nii.gz are effect maps); "
    "README section 'Bringing your own first-level maps' shows how"
)


def _explain_empty(layout: Any, query: Mapping[str, tuple[Any, ...]], root: Path) -> str:
    """Name the first filter that empties the selection and the values present before it."""
    applied: dict[str, tuple[Any, ...]] = {}
    order = ["extension", "suffix"] + [k for k in query if k not in ("extension", "suffix")]
    for key in order:
        if key not in query:
            continue
        before = _get(layout, applied)
        applied[key] = query[key]
        if _get(layout, applied):
            continue
        present = sorted({str(f.get_entities()[key]) for f in before if key in f.get_entities()})
        context = ", ".join(f"{k}={_show(v)}" for k, v in applied.items() if k != key)
        wanted = _show(query[key])
        if not before:
            return f"{root} holds no file at all: {LAYOUT_HELP}."
        where = f"In {root}, no file" + (f" with {context}" if context else "")
        if not present:
            return f"{where} has the entity {key!r} (wanted {key}={wanted})." + _advice(
                key, query, before, root
            )
        return f"{where} has {key}={wanted} ({_plural(key)} present: {listing(present)})." + (
            _advice(key, query, before, root)
        )
    return f"In {root}, the filters together select nothing."


def _advice(key: str, query: Mapping[str, tuple[Any, ...]], before: list[Any], root: Path) -> str:
    """What to do: rename the files (default selection) or change a filter."""
    default_selection = query.get("suffix") == (DEFAULT_SUFFIX,)
    if key in ("extension", "suffix") and default_selection:
        others = [Path(f.path) for f in before if not f.path.endswith((".json", ".tsv"))]
        found = ""
        if others:
            shown = others[0].relative_to(root) if others[0].is_relative_to(root) else others[0]
            found = f" (found e.g. {shown}, which is not one)"
        return (
            f" bids-group reads BIDS statistical maps{found}: {LAYOUT_HELP}. Other maps (e.g. "
            "VBM) are selected with a suffix in the model Input or --bids-filter-file."
        )
    if key == "stat" and default_selection and query.get("stat") == (DEFAULT_STAT,):
        return (
            " bids-group fits effect maps (stat-effect: SPM con_*, FSL cope*); to fit the maps "
            "present instead, set stat in the model Input or --bids-filter-file (e.g. "
            '{"stat": "t"}).'
        )
    return " Change the model Input / --bids-filter-file / --participant-label accordingly."


def _hint_derivatives(bids_dir: Path, deriv_dirs: Sequence[Path]) -> str:
    if deriv_dirs or not (bids_dir / "derivatives").is_dir():
        return ""
    found = sorted(p.name for p in (bids_dir / "derivatives").iterdir() if p.is_dir())
    return (
        f" The maps may be in a derivatives folder: pass --derivatives "
        f"{bids_dir / 'derivatives'}/<name> (found: {listing(found)})."
    )


def _show(values: tuple[Any, ...]) -> str:
    shown = ["<absent>" if v is None else str(v) for v in values]
    return shown[0] if len(shown) == 1 else "[" + ", ".join(shown) + "]"


def _plural(entity: str) -> str:
    return {"subject": "subjects", "suffix": "suffixes", "extension": "extensions"}.get(
        entity, f"{entity} values"
    )


def listing(values: Sequence[str]) -> str:
    """``a, b, c``, cut after the first ten: ``a, ..., j, ... (12 in all)`` (for messages)."""
    values = list(values)
    head = ", ".join(values[:_MAX_LISTED])
    return head + (f", ... ({len(values)} in all)" if len(values) > _MAX_LISTED else "")


# --- Consistency checks -------------------------------------------------------------------------


def _sort_key(m: InputMap) -> tuple[Any, ...]:
    e = m.entities
    rest = tuple(sorted((k, str(v)) for k, v in e.items() if k not in KEY_ENTITIES))
    return (str(e.get("subject")), str(e.get("session", "")), rest, str(m.path))


def _check_labels_have_maps(labels: tuple[str, ...] | None, maps: Sequence[InputMap]) -> None:
    if labels is None:
        return
    have = {m.entities["subject"] for m in maps}
    missing = [label for label in labels if label not in have]
    if missing:
        raise EmptySelectionError(
            f"--participant-label {', '.join(missing)}: no selected map for "
            f"{'this subject' if len(missing) == 1 else 'these subjects'} (subjects with maps: "
            f"{listing(sorted(have))}); remove the label(s) or check the filters"
        )


def _check_duplicates(maps: Sequence[InputMap], group_by: Sequence[str]) -> None:
    """Two maps agreeing on the key entities (see :data:`KEY_ENTITIES`) are ambiguous."""
    pooled = () if group_by else POOLED_KEY_ENTITIES
    key_entities = tuple(dict.fromkeys((*KEY_ENTITIES, *pooled, *group_by)))
    groups: dict[tuple[Any, ...], list[InputMap]] = {}
    for m in maps:
        groups.setdefault(tuple(m.entities.get(k) for k in key_entities), []).append(m)
    for key, members in groups.items():
        if len(members) < 2:
            continue
        differing = _differing_entities(members)
        where = ", ".join(
            f"{k} {v}" for k, v in zip(key_entities, key, strict=True) if v is not None
        )
        files = "; ".join(str(m.path) for m in members[:_MAX_LISTED])
        hint = (
            f"they differ by {', '.join(differing)}: add a filter on "
            f"{' or '.join(differing)} (model Input or --bids-filter-file) to keep one"
            if differing
            else "they differ only by path: remove one"
        )
        raise DataError(f"{len(members)} maps for {where}: {files}; {hint}")


def _differing_entities(members: Sequence[InputMap]) -> list[str]:
    names = sorted(set().union(*(m.entities for m in members)))
    return [n for n in names if len({str(m.entities.get(n)) for m in members}) > 1]


# --- participants.tsv ---------------------------------------------------------------------------


def _warn_unmatched_participants(
    maps: Sequence[InputMap],
    participants: pd.DataFrame,
    path: Path,
    labels: tuple[str, ...] | None,
) -> None:
    """Warn about maps without a participants.tsv row and rows without a selected map.

    Neither stops the run (a one-sample model needs no participant variable, and a filter may
    leave participants out on purpose), but neither may pass unnoticed.
    """
    with_maps = {str(m.entities["subject"]) for m in maps}
    rows = {str(i).removeprefix("sub-") for i in participants.index}
    no_row = sorted(with_maps - rows)
    if no_row:
        log.warning(
            "%s has no row for %d of the %d subjects with maps (%s): their participant "
            "variables are n/a; add a row per subject (n/a for unknown values)",
            path, len(no_row), len(with_maps), listing([f"sub-{s}" for s in no_row]),
        )  # fmt: skip
    wanted = rows if labels is None else rows & set(labels)
    no_map = sorted(wanted - with_maps)
    if no_map:
        log.warning(
            "%d participant(s) of %s have no selected map and are not analysed: %s",
            len(no_map), path, listing([f"sub-{s}" for s in no_map]),
        )  # fmt: skip


def _find_participants(bids_dir: Path, map_roots: Sequence[Path]) -> Path | None:
    for root in (bids_dir, *map_roots):
        candidate = root / "participants.tsv"
        if candidate.is_file():
            return candidate
    return None


def read_participants(path: Path) -> pd.DataFrame:
    """Read participants.tsv.

    Parameters
    ----------
    path : Path

    Returns
    -------
    DataFrame
        Indexed by subject label without ``sub-`` (index name ``participant_id``); ``n/a`` and
        empty cells are NaN; a column is float64 when all its other values parse as numbers,
        else object (str). Integer columns without NaN stay int64.

    Raises
    ------
    DataError (65)
        No ``participant_id`` column, duplicate ids, or unreadable file.
    """
    text = read_utf8(path, DataError)
    if not text.strip():
        raise DataError(
            f"{path} is empty: its first line must be the header, starting with participant_id"
        )
    # Only real line ends: str.splitlines also splits on U+2028, \x0b, \x1c... inside cells.
    lines = re.split(r"\r\n|\r|\n", text.removesuffix("\n").removesuffix("\r"))
    width = lines[0].count("\t")
    separator = next((sep for sep in (",", ";") if width == 0 and sep in lines[0]), None)
    if separator is not None:
        raise DataError(
            f"{path}: the header (line 1) is separated by {separator!r}, not tabs; BIDS "
            "participants.tsv is tab-separated (save as tab-separated text)"
        )
    header = [cell.strip() for cell in lines[0].split("\t")]
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise DataError(
            f"{path}: column(s) {', '.join(map(repr, twice))} appear more than once in the "
            "header (line 1); give every column its own name"
        )
    for number, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        if len(cells) > width + 1 and not "".join(cells[width + 1 :]).strip():
            lines[number - 1] = "\t".join(cells[: width + 1])  # trailing empty cells: dropped
        elif line.strip() and len(cells) != width + 1:
            raise DataError(
                f"{path}: line {number} has {line.count(chr(9)) + 1} tab-separated cells but the "
                f"header has {width + 1}; every line needs one cell per column (n/a when missing)"
            )
    try:
        table = pd.read_csv(
            io.StringIO("\n".join(lines)),
            sep="\t",
            dtype=str,
            keep_default_na=False,
            index_col=False,
            quoting=csv.QUOTE_NONE,  # BIDS TSV has no quoting: a '"' is a character
        )
    except (pd.errors.ParserError, ValueError) as err:
        detail = str(err).strip().replace("\n", " ")
        raise DataError(
            f"{path} is not a valid tab-separated table ({detail}): every line needs as many "
            "tab-separated cells as the header"
        ) from err
    # Cells padded with spaces ("n/a ", " 23") mean what they say without the spaces.
    table = table.apply(lambda column: column.str.strip()).replace({"n/a": np.nan, "": np.nan})
    table.columns = [str(c).strip() for c in table.columns]
    if "participant_id" not in table.columns:
        raise DataError(
            f"{path} has no participant_id column (columns: {', '.join(table.columns)}); "
            "the first column must be participant_id with values like sub-01"
        )
    ids = table.pop("participant_id")
    if ids.isna().any():
        rows = [int(i) + 2 for i in np.flatnonzero(ids.isna().to_numpy())]
        raise DataError(f"{path}: empty participant_id on line(s) {rows}; fill them in")
    labels = ids.str.strip().map(_strip_sub)
    duplicated = sorted(set(labels[labels.duplicated()]))
    if duplicated:
        raise DataError(
            f"{path}: participant_id {', '.join('sub-' + d for d in duplicated)} appear(s) more "
            "than once; keep one row per subject"
        )
    table.index = pd.Index(labels, name="participant_id")
    return table.apply(_to_numeric_if_possible)


#: Other spellings of a missing value (compared stripped and lower-case). BIDS writes ``n/a``;
#: these are what spreadsheets, R, pandas and databases write instead.
MISSING_SPELLINGS = frozenset(
    {"na", "nan", "n/a", "n.a.", "n.a", "null", "none", "nil", "missing", "-", "--", ".", "?",
     "#n/a", "#na", "nat", "<na>", "undefined", "unknown"}
)  # fmt: skip


def _who(rows: Any, index: Iterable[Any]) -> str:
    """``sub-01, sub-03``: the participants of ``rows`` at ``index``, once each."""
    labels = dict.fromkeys(str(rows[i]) for i in index)
    return ", ".join(label if label.startswith("sub-") else f"sub-{label}" for label in labels)


def explain_missing_spellings(values: pd.Series, column: str, rows: pd.Series) -> str | None:
    """Say so when the non-numeric cells of a column meant to be numeric are missing values
    spelled otherwise than BIDS's ``n/a`` (``NA``, ``nan``, ``null``...) or numbers written
    with a decimal comma (``23,5``); else None (the caller then says the column is not numeric).

    ``rows``: the participant label of each cell (same index as ``values``), for the message.
    """
    text = values.dropna().astype(str)
    numeric = pd.to_numeric(text, errors="coerce")
    odd = text[numeric.isna() | text.str.strip().str.lower().isin(MISSING_SPELLINGS)]
    comma = odd.str.fullmatch(r"\s*[-+]?\d+,\d+\s*")
    if (
        not odd.empty
        and comma.any()
        and (comma | odd.str.strip().str.lower().isin(MISSING_SPELLINGS)).all()
    ):
        examples = ", ".join(repr(v) for v in dict.fromkeys(odd[comma]))
        who = _who(rows, odd[comma].index)
        return (
            f"column {column!r} of participants.tsv writes numbers with a decimal comma "
            f"({examples}, for {who}): write a decimal point (1.5, not 1,5)"
        )
    if odd.empty or not odd.str.strip().str.lower().isin(MISSING_SPELLINGS).all():
        return None
    spellings = ", ".join(repr(v) for v in dict.fromkeys(odd))
    who = _who(rows, odd.index)
    return (
        f"column {column!r} of participants.tsv holds {spellings} for {who}: BIDS spells a "
        "missing value n/a (and bids-group never fills covariates in). Write n/a, then fill in "
        "the values or leave these participants out (--participant-label)"
    )


def _to_numeric_if_possible(column: pd.Series) -> pd.Series:
    converted = pd.to_numeric(column, errors="coerce")
    if converted.isna().equals(column.isna()):
        return converted
    return column
