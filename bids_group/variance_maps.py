"""First-level variances for mixed-effects models: find each effect map's sibling and
turn its values into variances.

A first-level tool writes, beside each effect (``stat-effect``, FSL ``cope``, SPM ``con``), its
variance (``stat-variance``, FSL ``varcope``), a standard error (``stat-se``) or a t map
(``stat-t``). The sibling has the same BIDS name but for its ``stat-`` entity; the model file's
``VarianceFrom`` says which one to use.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bids_group.errors import DataError
from bids_group.inputs import InputMap, listing

_STAT_RE = re.compile(r"(^|_)stat-[A-Za-z0-9]+(_)")
_NIFTI_EXTENSIONS = (".nii.gz", ".nii")


def sibling_name(name: str, stat: str) -> str:
    """The file name of ``name`` with its ``stat-`` entity set to ``stat``.

    >>> sibling_name("sub-01_task-x_contrast-faces_stat-effect_statmap.nii.gz", "variance")
    'sub-01_task-x_contrast-faces_stat-variance_statmap.nii.gz'
    """
    if _STAT_RE.search(name) is None:
        raise ValueError(f"{name} has no stat- entity")
    return _STAT_RE.sub(lambda m: f"{m.group(1)}stat-{stat}{m.group(2)}", name, count=1)


def sibling_paths(maps: Sequence[InputMap], stat: str) -> tuple[Path, ...]:
    """The ``stat-<stat>`` sibling of every map (``.nii.gz`` or ``.nii``).

    Raises
    ------
    DataError
        A map has no ``stat-`` entity, or siblings are missing (the message names the
        subjects and the first expected file), or a map has both a ``.nii.gz`` and a ``.nii``
        sibling.
    """
    found: list[Path] = []
    missing: list[tuple[InputMap, Path]] = []
    doubled: list[tuple[Path, ...]] = []
    for input_map in maps:
        path = Path(input_map.path)
        try:
            name = sibling_name(path.name, stat)
        except ValueError:
            raise DataError(
                f"{path}: a mixed-effects model pairs each effect map with its stat-{stat} "
                "sibling by name, but this map has no stat- entity"
            ) from None
        stem = name
        for extension in _NIFTI_EXTENSIONS:
            stem = stem.removesuffix(extension)
        candidates = [path.with_name(stem + ext) for ext in _NIFTI_EXTENSIONS]
        existing = [c for c in candidates if c.is_file()]
        if len(existing) > 1:  # which one is meant is unknown, as for two effect maps
            doubled.append(tuple(existing))
        elif existing:
            found.append(existing[0])
        else:
            missing.append((input_map, candidates[0]))
    if doubled:
        raise DataError(
            f"{len(doubled)} effect map(s) have two stat-{stat} siblings, e.g. "
            f"{'; '.join(map(str, doubled[0]))}: keep one of them"
        )
    if missing:
        subjects = listing([f"sub-{m.entities['subject']}" for m, _ in missing])
        raise DataError(
            f"no stat-{stat} map beside the effect map of {subjects}: expected e.g. "
            f"{missing[0][1]}. A mixed-effects model needs each map's first-level variance "
            "(VarianceFrom: variance, se or t in the model's Software.bids-group block)"
        )
    return tuple(found)


def to_variance(values: np.ndarray, effects: np.ndarray, source: str) -> np.ndarray:
    """Variances from the sibling values: as they are, squared standard errors, or
    ``(effect / t)^2`` (AFNI 3dMEMA's conversion). Non-finite results (t = 0, a negative
    standard error) are non-finite for the fit's input policy, which excludes and counts them.

    >>> to_variance(np.array([[2.0, 0.0]]), np.array([[4.0, 1.0]]), "t")
    array([[ 4., inf]])
    """
    values = np.asarray(values)
    if source == "variance":  # as read (float32 maps stay float32: the fit converts a block of
        # voxels at a time to float64, exactly; a float64 copy of all would double the memory)
        return values if values.dtype.kind == "f" else values.astype(np.float64)
    values = values.astype(np.float64)
    if source == "se":  # a negative standard error is broken: excluded like a bad variance
        return np.where(values >= 0, values**2, np.nan)
    if source == "t":
        with np.errstate(divide="ignore", invalid="ignore"):
            return (np.asarray(effects, dtype=np.float64) / values) ** 2
    raise ValueError(f"unknown variance source {source!r}")
