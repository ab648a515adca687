"""One check for every scalar setting, from the command line or the model file.

In the spirit of scikit-learn's ``check_scalar``: a value is checked for its type, for being
finite, and for its range, and a refusal names the setting, the value and the accepted range::

    alpha == nan, must be a finite number > 0 and < 1

The ranges live in one table, :data:`SETTINGS` (keyed by the :class:`~bids_group.config.
InferenceConfig` field name), so the command line (``--alpha``), the model file
(``model.yaml: Nodes[0].Model.Software.bids-group.Inference.Alpha``) and the README agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bids_group.errors import UsageError
from bids_group.memory import MIN_BUDGET

#: Largest --n-perm: every permutation method keeps one float64 per relabelling and method in
#: memory and writes one row per relabelling to the null-distribution TSV; 10 million rows is
#: ~0.3 GB in memory and ~0.6 GB of TSV per contrast, and p-values gain nothing beyond that.
MAX_N_PERM = 10_000_000
#: Above this many relabellings a warning says the run may take very long (TFCE on a 2 mm brain
#: runs ~150 relabellings per second on 2 cores: a million is ~2 hours per contrast).
WARN_N_PERM = 1_000_000
#: Largest smoothing FWHM (mm). No brain is a metre wide; larger values are a unit mistake and
#: make scipy's Gaussian kernel as wide as memory allows (a crash, not an answer).
MAX_SMOOTHING_FWHM = 1000.0
#: Smallest --target-voxel-size: below it, a whole-brain grid has billions of voxels (the
#: images.target_grid check also caps the grid's voxel count).
MIN_TARGET_VOXEL_SIZE = 0.25
#: Largest seed: numpy's legacy RandomState and nilearn's random_state take seeds < 2**32.
MAX_SEED = 2**32 - 1
#: Largest cluster size threshold (voxels): the labelling code counts voxels in int32.
MAX_CLUSTER_THRESHOLD = 2**31 - 1
#: Largest TFCE exponent: e(h)**E and h**H overflow float64 for ordinary maps beyond it
#: (the literature uses E 0.5-1 and H 2-3).
MAX_TFCE_EXPONENT = 10.0


@dataclass(frozen=True)
class Bounds:
    """Type and range of a scalar setting.

    ``lo_open`` / ``hi_open``: the bound itself is excluded (``> 0`` rather than ``>= 0``).
    ``hint``: given the refused value, more advice for the message (or "").
    """

    integer: bool = False
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    unit: str = ""
    hint: Callable[[Any], str] | None = None

    def describe(self) -> str:
        """``a finite number > 0 and < 1`` (the accepted range, for messages and docs)."""
        text = "an integer" if self.integer else "a finite number"
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {_show(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {_show(self.hi)}")
        text += " " + " and ".join(parts) if parts else ""
        return text + (f" {self.unit}" if self.unit else "")

    def interval(self) -> str:
        """Compact form for ``--help``, in click's style: ``1e-10<=x<1``, ``x>=0``."""
        if self.hi is None:
            return "x" if self.lo is None else f"x{'>' if self.lo_open else '>='}{_show(self.lo)}"
        text = f"x{'<' if self.hi_open else '<='}{_show(self.hi)}"
        if self.lo is not None:
            text = f"{_show(self.lo)}{'<' if self.lo_open else '<='}{text}"
        return text

    def contains(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True


def _show(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


def _value_text(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


#: Contrast weights: 0, or an absolute value in [MIN_WEIGHT, MAX_WEIGHT] (see spec.py).
MIN_WEIGHT = 1e-10
MAX_WEIGHT = 1e10


def _z_hint(value: Any) -> str:
    """A cluster-forming p of 1 or more is a z or t height typed as a p-value."""
    if isinstance(value, int | float) and not isinstance(value, bool) and _finite(value):
        if value >= 1:
            return (
                "; it looks like a z or t height, but the cluster-forming threshold is a "
                "one-sided p-value: z = 3.1 is p = 0.00097"
            )
    return ""


#: Smallest alpha (height, ARI, permutation): the output names carry the digits of alpha
#: (``desc-fpr001``), so 1e-320 would make a 330-character file name (longer than file systems
#: allow); and no test needs a level below 1e-10 (z = 6.4).
MIN_ALPHA = 1e-10
_PROBABILITY = Bounds(lo=MIN_ALPHA, hi=1, hi_open=True)
_POSITIVE = Bounds(lo=0, lo_open=True)
_EXPONENT = Bounds(lo=0, lo_open=True, hi=MAX_TFCE_EXPONENT)

#: InferenceConfig field -> accepted type and range. The command-line option is ``--`` + the
#: field with ``-`` for ``_``; the model-file key is in :data:`bids_group.spec.INFERENCE_KEYS`.
SETTINGS: dict[str, Bounds] = {
    "alpha": _PROBABILITY,
    "threshold": Bounds(lo=0, unit="(z)"),
    "cluster_threshold": Bounds(integer=True, lo=0, hi=MAX_CLUSTER_THRESHOLD, unit="voxels"),
    "smoothing_fwhm": Bounds(lo=0, hi=MAX_SMOOTHING_FWHM, unit="mm"),
    "target_voxel_size": Bounds(lo=MIN_TARGET_VOXEL_SIZE, hi=MAX_SMOOTHING_FWHM, unit="mm"),
    "min_coverage": Bounds(lo=0, lo_open=True, unit="(fraction <= 1, or a count of maps)"),
    "ari_thresholds": Bounds(lo=0, lo_open=True, unit="(z)"),
    "ari_alpha": _PROBABILITY,
    "n_perm": Bounds(integer=True, lo=1, hi=MAX_N_PERM),
    "seed": Bounds(integer=True, lo=0, hi=MAX_SEED),
    "perm_alpha": _PROBABILITY,
    "cluster_forming_p": Bounds(lo=0, hi=0.5, lo_open=True, hi_open=True, hint=_z_hint),
    "tfce_e": _EXPONENT,
    "tfce_h": _EXPONENT,
    "tfce_dh": _POSITIVE,
    "n_jobs": Bounds(integer=True, lo=1),
    "mem_budget": Bounds(integer=True, lo=MIN_BUDGET, unit="bytes"),
}


def check_scalar(
    value: Any, name: str, bounds: Bounds, *, error: type[Exception] = UsageError
) -> int | float:
    """Return ``value`` as an int or float if it has the type and range of ``bounds``.

    Parameters
    ----------
    value : Any
        The value as given (a number; booleans are refused, strings too).
    name : str
        What to call it in the message: ``--alpha``, or ``model.yaml: ...Inference.Alpha``.
    bounds : Bounds
    error : exception class
        Raised on failure (:class:`~bids_group.errors.UsageError` for the command line,
        :class:`~bids_group.errors.SpecError` for the model file; both exit 64).

    Examples
    --------
    >>> check_scalar(0.05, "alpha", SETTINGS["alpha"])
    0.05
    >>> check_scalar(float("nan"), "alpha", SETTINGS["alpha"])
    Traceback (most recent call last):
    ...
    bids_group.errors.UsageError: alpha == nan, must be a finite number >= 1e-10 and < 1
    """
    ok_type = isinstance(value, int) if bounds.integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not _finite(value) or not bounds.contains(value):
        hint = bounds.hint(value) if bounds.hint else ""
        raise error(f"{name} == {_value_text(value)}, must be {bounds.describe()}{hint}")
    return int(value) if bounds.integer else float(value)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (e.g. 10**400)
        return False


def check_setting(value: Any, field: str, name: str | None = None, **kwargs: Any) -> int | float:
    """:func:`check_scalar` with the bounds of ``field`` (a key of :data:`SETTINGS`).

    ``name`` defaults to the command-line option, ``--`` + ``field`` with dashes.
    """
    return check_scalar(value, name or option_name(field), SETTINGS[field], **kwargs)


def option_name(field: str) -> str:
    """``n_perm`` -> ``--n-perm``."""
    return "--" + field.replace("_", "-")


def read_utf8(path: Path, error: type[Exception], what: str = "") -> str:
    """The text of ``path``, which must be UTF-8 (a byte-order mark is allowed and dropped).

    Raises ``error`` naming the file, the line and the column of the first byte that is not
    UTF-8 (e.g. a participants.tsv saved as Latin-1 or UTF-16 by a spreadsheet), and the way out.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise error(f"{path}{what}: cannot read it ({err.strerror or err})") from err
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        how = (
            " (from a spreadsheet: 'Save as' > tab-separated text, encoding UTF-8)"
            if Path(path).suffix == ".tsv"
            else ""
        )
        raise error(
            f"{path}{what}: line {line}, column {column} is not UTF-8 (byte "
            f"0x{data[err.start]:02x}); save the file as UTF-8{how}"
        ) from err
