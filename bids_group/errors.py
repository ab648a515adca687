"""Every error bids-group raises on purpose, each with the exit code the CLI returns.

The core raises these without knowing about click; only :mod:`bids_group.cli` catches them,
prints one line to stderr and exits with ``exit_code``. Exit codes follow the BIDS-Apps
execution specification and ``sysexits.h``. :data:`EXIT_CODES` feeds the README and tests.
"""

from __future__ import annotations


class BidsGroupError(Exception):
    """Base class: a problem the user can fix. The message says what and how."""

    exit_code: int = 1


class BidsDatasetError(BidsGroupError):
    """The BIDS dataset is malformed or unreadable (no dataset_description.json, ...)."""

    exit_code = 16


class UnknownLevelError(BidsGroupError):
    """The analysis level is not ``group`` (or its alias ``dataset``)."""

    exit_code = 17


class EmptySelectionError(BidsGroupError):
    """Filters (participant labels, model Input, --bids-filter-file) selected no map."""

    exit_code = 18


class UsageError(BidsGroupError):
    """Command-line options or the model specification are invalid or contradictory."""

    exit_code = 64


class SpecError(UsageError):
    """The model file is invalid (syntax, unknown key, bad contrast, ...)."""


class DataError(BidsGroupError):
    """The input data are bad: missing covariate, mismatched grids, rank-deficient design..."""

    exit_code = 65


class MissingInputError(BidsGroupError):
    """A file or folder given by the user does not exist."""

    exit_code = 66


class ServiceError(BidsGroupError):
    """A service the run was told to use (a Dask scheduler) cannot be reached."""

    exit_code = 69


class OutputError(BidsGroupError):
    """The output folder cannot be created or written, or would overwrite results."""

    exit_code = 73


#: Exit code -> (name, meaning). The README's exit-code table is checked against this
#: (tests/test_readme.py), and ``--help`` prints it.
EXIT_CODES: dict[int, tuple[str, str]] = {
    0: ("success", "the analysis ran and every output was written"),
    1: ("unexpected error", "a bug: please report it with the output of `-v`"),
    16: ("BIDS problem", "the dataset is not valid BIDS (e.g. no dataset_description.json)"),
    17: ("unknown level", "the analysis level is not `group` (or `dataset`)"),
    18: ("empty selection", "filters selected no input map"),
    64: (
        "usage error",
        "bad command-line option, invalid model file, or OUT_DIR / -w inside an input",
    ),
    65: ("bad data", "inputs unusable: missing covariate, grid mismatch, non-estimable design"),
    66: (
        "missing input",
        "a file or folder named on the command line is missing or the wrong kind",
    ),
    69: (
        "service unavailable",
        "the Dask scheduler given by --dask-scheduler / --scheduler-file cannot be reached, "
        "or has no worker",
    ),
    73: (
        "cannot create output",
        "OUT_DIR or -w not writable (full, read-only, no permission...), or results exist "
        "without --overwrite",
    ),
    130: ("interrupted", "stopped by Ctrl-C or SIGTERM; nothing was written to OUT_DIR"),
}
