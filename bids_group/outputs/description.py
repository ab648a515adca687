"""JSON writing: sidecars and the derivative's ``dataset_description.json``.

:func:`write_json` is the one JSON writer of the package: numpy scalars and arrays, tuples and
paths are converted, and non-finite floats become ``null`` (JSON has no NaN / Infinity, and a
file containing them is rejected by strict parsers such as the BIDS validator).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bids_group.outputs.naming import BIDSIGNORE, BIDSIGNORE_PATTERNS, DATASET_DESCRIPTION, README

log = logging.getLogger(__name__)

BIDS_VERSION = "1.10.0"
DERIVATIVE_NAME = "bids-group group-level statistics"
PIPELINE_NAME = "bids-group"

#: Environment variables a container image sets so the description records it.
CONTAINER_TYPE_ENV = "BIDS_GROUP_CONTAINER_TYPE"
CONTAINER_TAG_ENV = "BIDS_GROUP_CONTAINER_TAG"

_SOURCE_KEYS = frozenset({"DOI", "URL", "Version"})


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` recursively into plain JSON types.

    numpy scalars -> Python scalars, arrays and tuples -> lists, paths -> str, non-finite
    floats -> None, mapping keys -> str.

    >>> to_jsonable({"a": np.float32(0.5), "b": (np.int64(1), float("nan")), "c": np.eye(2)})
    {'a': 0.5, 'b': [1, None], 'c': [[1.0, 0.0], [0.0, 1.0]]}
    """
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(item) for item in items]
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise TypeError(f"cannot write {type(obj).__name__} to JSON: {obj!r}")


def write_json(path: Path, obj: Any, *, sort_keys: bool = False) -> Path:
    """Write ``obj`` as readable JSON (indent 2, UTF-8, trailing newline).

    Parameters
    ----------
    path : Path
    obj : JSON-like
        Converted with :func:`to_jsonable`.
    sort_keys : bool
        Keys keep the caller's order by default (``Name`` first reads better than sorted).

    Returns
    -------
    Path
        ``path``.
    """
    text = json.dumps(
        to_jsonable(obj), indent=2, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False
    )
    path = Path(path)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def write_dataset_description(
    out_dir: Path,
    *,
    source_datasets: Sequence[str | Path | Mapping[str, str]],
    pipeline_version: str,
    code_url: str,
    command: str | Sequence[str] | None = None,
    name: str = DERIVATIVE_NAME,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """Write ``out_dir/dataset_description.json`` for a BIDS derivative.

    Parameters
    ----------
    out_dir : Path
        Folder to write into (the staging folder during a run).
    source_datasets : sequence
        Each a URL (``https://...``), a DOI (``doi:...``), a local path (recorded as a
        ``file://`` URL, with its ``DatasetDOI``/``Version`` when its own description has
        them), or a mapping with keys among ``DOI``, ``URL``, ``Version``.
    pipeline_version : str
    code_url : str
    command : str or sequence of str or None
        The command line that ran, recorded in ``GeneratedBy[0].Description``.
    name : str
        The derivative dataset's ``Name``.
    environ : mapping or None
        Where to look for :data:`CONTAINER_TYPE_ENV` / :data:`CONTAINER_TAG_ENV`
        (default ``os.environ``); when set, ``GeneratedBy[0].Container`` records them.

    Returns
    -------
    Path
        The written file.
    """
    description = {
        "Name": name,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [_generated_by(pipeline_version, code_url, command, environ)],
        "SourceDatasets": [_source_entry(source) for source in source_datasets],
    }
    return write_json(Path(out_dir) / DATASET_DESCRIPTION, description)


def _generated_by(
    version: str,
    code_url: str,
    command: str | Sequence[str] | None,
    environ: Mapping[str, str] | None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {"Name": PIPELINE_NAME, "Version": version, "CodeURL": code_url}
    if command is not None:
        line = command if isinstance(command, str) else shlex.join(map(str, command))
        entry["Description"] = f"Group-level GLM. Command: {line}"
    env = os.environ if environ is None else environ
    container_type = env.get(CONTAINER_TYPE_ENV)
    if container_type:
        entry["Container"] = {"Type": container_type}
        if env.get(CONTAINER_TAG_ENV):
            entry["Container"]["Tag"] = env[CONTAINER_TAG_ENV]
    return entry


def _source_entry(source: str | Path | Mapping[str, str]) -> dict[str, str]:
    """One ``SourceDatasets`` item from a URL, DOI, local path or ready mapping."""
    if isinstance(source, Mapping):
        unknown = set(source) - _SOURCE_KEYS
        if unknown:
            raise ValueError(f"SourceDatasets keys {sorted(unknown)} not in {sorted(_SOURCE_KEYS)}")
        return {str(k): str(v) for k, v in source.items()}
    text = str(source)
    if text.lower().startswith("doi:"):
        return {"DOI": text}
    if "://" in text:
        return {"URL": text}
    path = Path(text).resolve()
    entry = {"URL": path.as_uri()}
    entry.update(_doi_and_version(path))
    return entry


def _doi_and_version(dataset: Path) -> dict[str, str]:
    """``DOI``/``Version`` from a source dataset's own description, if it has them."""
    try:
        description = json.loads((dataset / DATASET_DESCRIPTION).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # provenance is best effort; the inputs stage validates the dataset itself
    if not isinstance(description, dict):
        return {}
    found = {}
    if isinstance(description.get("DatasetDOI"), str):
        found["DOI"] = description["DatasetDOI"]
    if isinstance(description.get("Version"), str):
        found["Version"] = description["Version"]
    return found


def write_bidsignore(out_dir: Path) -> Path:
    """Write ``out_dir/.bidsignore`` listing :data:`~bids_group.outputs.naming.BIDSIGNORE_PATTERNS`.

    The group-level statistical derivatives layout (``node-<Node>/contrast-<c>_stat-<s>_statmap``,
    ``model-<m>_smdl.json``) is the BIDS Stats Models derivatives proposal (BEP041), not yet part
    of the BIDS specification, so the BIDS validator reports every such file as ``NOT_INCLUDED``
    (an error). ``.bidsignore`` is the specification's mechanism for files it does not cover
    yet; the validator then checks ``dataset_description.json`` and the README.

    >>> import tempfile
    >>> print(write_bidsignore(Path(tempfile.mkdtemp())).read_text(), end="")
    # Group-level statistical derivatives (BIDS Stats Models derivatives, BEP041): not yet in the
    # BIDS specification, so the BIDS validator is told to skip them.
    /node-*
    /model-*_smdl.json
    /model-*_report.html
    """
    lines = [
        "# Group-level statistical derivatives (BIDS Stats Models derivatives, BEP041): not yet in"
        " the",
        "# BIDS specification, so the BIDS validator is told to skip them.",
        *BIDSIGNORE_PATTERNS,
    ]
    path = Path(out_dir) / BIDSIGNORE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_readme(
    out_dir: Path,
    *,
    model_file: str,
    pipeline_version: str,
    code_url: str,
    command: str | Sequence[str] | None = None,
) -> Path:
    """Write ``out_dir/README.md``: what the folder holds and how it was made.

    A dataset without a README gets a ``README_FILE_MISSING`` warning from the BIDS validator.

    Parameters
    ----------
    out_dir : Path
    model_file : str
        Name of the resolved model file (``model-<label>_smdl.json``).
    pipeline_version, code_url : str
    command : str or sequence of str or None
        The command line that ran.
    """
    lines = [
        "# Group-level statistics by bids-group",
        "",
        f"Made by bids-group {pipeline_version} ({code_url}).",
    ]
    if command is not None:
        line = command if isinstance(command, str) else shlex.join(map(str, command))
        lines += ["", "Command:", "", f"    {line}"]
    lines += [
        "",
        f"- `{model_file}`: the BIDS Stats Model as run (contrast weights explicit).",
        "- `node-<Node>/`: per contrast, statistical maps "
        "`[task-<t>_][space-<s>_]contrast-<c>_stat-<stat>[_desc-<d>]_statmap.nii.gz` with JSON "
        "sidecars (`stat-effect`, `variance`, `t`/`F`, `z`, `p`; thresholded maps carry "
        "`desc-<method>`), cluster tables (`_clusters.tsv`), design matrices and analysis masks.",
        "- `model-<name>_report.html`: the HTML report, when it was written.",
        "",
        "`.bidsignore` lists these files for the BIDS validator: their layout (BIDS Stats Models "
        "derivatives, BEP041) is not yet part of the BIDS specification.",
    ]
    path = Path(out_dir) / README
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
