"""Shared test helpers: tiny BIDS derivative datasets built in ``tmp_path``.

Use the ``bids_derivatives`` fixture (a factory bound to ``tmp_path``) or import
:func:`make_bids_derivatives` directly (``from conftest import make_bids_derivatives``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

SPACE = "MNI152NLin2009cAsym"


def map_name(
    subject: str,
    *,
    task: str | None = "faces",
    space: str | None = SPACE,
    contrast: str = "faces",
    stat: str = "effect",
    session: str | None = None,
    desc: str | None = None,
    extension: str = ".nii.gz",
) -> str:
    """BIDS statistical-derivative file name, e.g. ``sub-01_task-faces_..._statmap.nii.gz``."""
    parts = [f"sub-{subject}"]
    parts += [f"ses-{session}"] if session else []
    parts += [f"task-{task}"] if task else []
    parts += [f"space-{space}"] if space else []
    parts += [f"contrast-{contrast}", f"stat-{stat}"]
    parts += [f"desc-{desc}"] if desc else []
    return "_".join(parts) + f"_statmap{extension}"


def write_map(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``data`` as float32 NIfTI-1 (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine).to_filename(path)
    return path


def write_description(root: Path, *, derivative: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    description: dict[str, Any] = {"Name": "test", "BIDSVersion": "1.9.0"}
    if derivative:
        description |= {"DatasetType": "derivative", "GeneratedBy": [{"Name": "tests"}]}
    else:
        description |= {"DatasetType": "raw"}
    (root / "dataset_description.json").write_text(json.dumps(description))


def write_participants(path: Path, columns: Mapping[str, Sequence[Any]]) -> Path:
    """Write a TSV; ``None``/NaN cells are written ``n/a``."""
    names = list(columns)
    n_rows = len(columns[names[0]])
    lines = ["\t".join(names)]
    for i in range(n_rows):
        cells = []
        for name in names:
            v = columns[name][i]
            cells.append("n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
        lines.append("\t".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def make_bids_derivatives(
    root: Path,
    *,
    n_subjects: int = 4,
    contrasts: Sequence[str] = ("faces",),
    shape: tuple[int, int, int] = (6, 7, 8),
    participants: Mapping[str, Sequence[Any]] | None | bool = True,
    task: str | None = "faces",
    space: str | None = SPACE,
    stats: Sequence[str] = ("effect",),
    sessions: Sequence[str] = (),
    affine: np.ndarray | None = None,
    extension: str = ".nii.gz",
    raw: bool = False,
    name: str = "firstlevel",
    seed: int = 0,
) -> Path:
    """Build a tiny BIDS derivatives dataset of first-level statmaps and return its root.

    Maps are ``sub-XX/[ses-YY/]func/sub-XX_[ses-YY_]task-<task>_space-<space>_contrast-<c>_
    stat-<s>_statmap<extension>``, float32 standard-normal noise plus ``1 + index of the
    contrast``, on ``shape`` at 2 mm (or ``affine``).

    Parameters
    ----------
    root : Path
        Folder to create (e.g. ``tmp_path / "ds"``).
    participants : mapping, True, or None
        participants.tsv columns besides ``participant_id`` (``True``: ``age`` and ``group``;
        ``None``/``False``: no file).
    raw : bool
        If True, ``root`` is a raw dataset (dataset_description DatasetType raw, participants.tsv
        at its root) and the maps go to ``root/derivatives/<name>``, which is returned.

    Returns
    -------
    Path
        The folder holding the maps (``root``, or ``root/derivatives/<name>`` when ``raw``).
    """
    rng = np.random.default_rng(seed)
    subjects = [f"{i + 1:02d}" for i in range(n_subjects)]
    maps_root = root / "derivatives" / name if raw else root
    if raw:
        write_description(root, derivative=False)
    write_description(maps_root, derivative=True)
    for sub in subjects:
        for ses in sessions or (None,):
            folder = maps_root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "func"
            for k, contrast in enumerate(contrasts):
                for stat in stats:
                    data = rng.standard_normal(shape).astype(np.float32) + 1.0 + k
                    if stat == "variance":
                        data = np.abs(data) + 0.5
                    fname = map_name(
                        sub,
                        session=ses,
                        task=task,
                        space=space,
                        contrast=contrast,
                        stat=stat,
                        extension=extension,
                    )
                    write_map(folder / fname, data, affine)
    if participants is True:
        participants = {
            "age": [20 + 3 * i for i in range(n_subjects)],
            "group": ["patient" if i % 2 else "control" for i in range(n_subjects)],
        }
    if participants:
        columns = {"participant_id": [f"sub-{s}" for s in subjects], **participants}
        write_participants(root / "participants.tsv", columns)
    return maps_root


@pytest.fixture
def bids_derivatives(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``bids_derivatives(**kwargs)`` builds a dataset under a fresh tmp folder."""
    counter = iter(range(1000))

    def factory(**kwargs: Any) -> Path:
        return make_bids_derivatives(tmp_path / f"ds{next(counter)}", **kwargs)

    return factory
