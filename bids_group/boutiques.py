"""Boutiques descriptor of the ``bids-group`` command, generated from its click definition.

`Boutiques <https://boutiques.github.io>`_ describes a command-line tool in JSON (inputs,
outputs, container image, exit codes) for platforms such as CBRAIN and the BIDS-Apps registry.
The descriptor is built from :data:`bids_group.cli.cli`'s parameters, so it cannot drift from the
CLI; ``boutiques/bids-group.json`` is the committed copy and ``tests/test_boutiques.py`` checks
that it is current and that ``bosh validate`` accepts it. Regenerate it after changing an option::

    python -m bids_group.boutiques boutiques/bids-group.json

How click parameters map to Boutiques inputs:

* arguments: ``BIDS_DIR`` a File (a folder), ``OUT_DIR`` a String (it is created),
  ``ANALYSIS_LEVEL`` a String with value choices;
* a path that is read (``--model``, ``--mask``, ``--derivatives``, ``--bids-filter-file``) is a
  File; a path that is written (``--work-dir``) is a String;
* ints and floats are Numbers (``integer``, ``minimum`` from click ranges), choices are Strings with
  ``value-choices``;
* ``--x/--no-x`` pairs: a Flag for the spelling that changes the default (``--resample``,
  ``--no-report``); a pair without a default (the model file decides) is a String whose choices
  are the two spellings;
* an option taking several values after one flag (``--participant-label 01 02``) is a list;
  other repeatable options (``--derivatives``) take one value here (Boutiques writes a list
  after a single flag, which click reads only for the former);
* ``--version`` and ``--help`` are left out. Defaults are not copied into ``default-value``
  (Boutiques would then always pass them, overriding the model file); the descriptions say them.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import click

from bids_group import __version__
from bids_group.config import ANALYSIS_LEVELS
from bids_group.errors import EXIT_CODES
from bids_group.validation import SETTINGS

#: The container image the Dockerfile builds (``docker build -t bids-group .``).
CONTAINER_IMAGE = "bids-group"
CODE_URL = "https://github.com/bids-group/bids-group"
SCHEMA_VERSION = "0.5"
#: Paths the command writes (Strings, not Files: Boutiques Files are inputs that must exist).
_WRITTEN_PATHS = frozenset({"out_dir", "work_dir"})


def build_descriptor(command: click.Command | None = None) -> dict[str, Any]:
    """The Boutiques descriptor (a JSON-ready dict) of ``command`` (default: ``bids-group``)."""
    if command is None:
        from bids_group.cli import cli as command
    from bids_group.cli import _MULTI_VALUE_OPTIONS

    inputs = []
    sections: dict[str, str] = {}  # input id -> its --help section
    for param in command.params:
        if not param.expose_value or getattr(param, "hidden", False):
            continue  # --version (and --help, which is not in params)
        inputs.append(_input(param, command.help or "", set(_MULTI_VALUE_OPTIONS)))
        sections[inputs[-1]["id"]] = _section_of(param.name or "")
    out = "[OUT_DIR]"
    return {
        "name": "bids-group",
        "tool-version": __version__,
        "description": _first_line(command.help or ""),
        "author": "bids-group developers",
        "url": CODE_URL,
        "command-line": " ".join(["bids-group", *(i["value-key"] for i in inputs)]),
        "schema-version": SCHEMA_VERSION,
        "container-image": {"type": "docker", "image": CONTAINER_IMAGE},
        "inputs": inputs,
        "groups": _groups(sections),
        "output-files": [
            {
                "id": "results_dir",
                "name": "Results folder",
                "description": "The BIDS derivative dataset of results: node-<Node>/ holds the "
                "statistical maps (_statmap.nii.gz + .json), cluster tables (_clusters.tsv), "
                "design matrices, masks and figures.",
                "path-template": out,
            },
            {
                "id": "dataset_description_file",
                "name": "Dataset description",
                "description": "BIDS dataset_description.json (DatasetType derivative).",
                "path-template": f"{out}/dataset_description.json",
            },
            {
                "id": "model_file",
                "name": "Resolved model",
                "description": "The BIDS Stats Model as run (model-<name>_smdl.json).",
                "path-template": f"{out}/model-*_smdl.json",
            },
            {
                "id": "report_file",
                "name": "HTML report",
                "description": "The report of the run (not written with --no-report).",
                "path-template": f"{out}/model-*_report.html",
                "optional": True,
            },
        ],
        "error-codes": [
            {"code": code, "description": f"{name}: {meaning}"}
            for code, (name, meaning) in EXIT_CODES.items()
            if code != 0
        ],
        "tags": {"domain": ["neuroimaging", "fmri", "statistics", "bids-app"]},
    }


def _section_of(name: str) -> str:
    """The ``--help`` section of a parameter (:data:`bids_group.cli.OPTION_GROUPS`);
    arguments go to "Arguments"."""
    from bids_group.cli import OPTION_GROUPS, OTHER_OPTIONS

    if name in ("bids_dir", "out_dir", "analysis_level"):
        return "Arguments"
    return next((t for t, names in OPTION_GROUPS.items() if name in names), OTHER_OPTIONS)


def _groups(sections: dict[str, str]) -> list[dict[str, Any]]:
    """Boutiques ``groups``: the inputs in the sections of ``--help``, in its order."""
    from bids_group.cli import OPTION_GROUPS

    order = ["Arguments", *OPTION_GROUPS]
    titles = sorted(set(sections.values()), key=lambda t: order.index(t) if t in order else 99)
    return [
        {  # ids share the inputs' namespace (an input is named "model"): suffixed
            "id": re.sub(r"\W+", "_", title.lower()).strip("_") + "_group",
            "name": title,
            "members": [ident for ident, t in sections.items() if t == title],
        }
        for title in titles
    ]


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else ""


def _argument_help(name: str, command_help: str) -> str:
    """An argument's line in the command's docstring (``BIDS_DIR   the dataset ...``)."""
    match = re.search(rf"^\s*{re.escape(name.upper())}\s+(.+)$", command_help, re.M)
    return match.group(1).strip() if match else name.upper()


def _input(param: click.Parameter, command_help: str, multi_value: set[str]) -> dict[str, Any]:
    ident = param.name
    entry: dict[str, Any] = {"id": ident}
    if isinstance(param, click.Argument):
        entry["name"] = ident.upper()
        entry["description"] = _argument_help(ident, command_help)
        entry["optional"] = False
        if ident == "analysis_level":
            entry["type"] = "String"
            entry["value-choices"] = list(ANALYSIS_LEVELS)
        else:
            entry["type"] = "String" if ident in _WRITTEN_PATHS else "File"
        entry["value-key"] = f"[{ident.upper()}]"
        return {key: entry[key] for key in _KEY_ORDER if key in entry}
    assert isinstance(param, click.Option)
    long_names = [o for o in param.opts if o.startswith("--")] or list(param.opts)
    flag = long_names[0]
    entry["name"] = flag.lstrip("-").replace("-", " ").capitalize()
    entry["description"] = param.help or ""
    entry["optional"] = not param.required
    entry["value-key"] = f"[{ident.upper()}]"
    if param.count or (param.is_flag and not param.secondary_opts):
        entry.update(type="Flag", **{"command-line-flag": flag})
    elif param.is_flag:  # --x/--no-x
        secondary = [o for o in param.secondary_opts if o.startswith("--")][0]
        if param.default is None:
            entry.update(type="String", **{"value-choices": [flag, secondary]})
            entry["description"] += f" Give {flag} or {secondary}; neither: the model file decides."
        elif param.default:
            entry.update(id=f"no_{ident}", type="Flag", **{"command-line-flag": secondary})
            entry["name"] = secondary.lstrip("-").replace("-", " ").capitalize()
            entry["value-key"] = f"[NO_{ident.upper()}]"
        else:
            entry.update(type="Flag", **{"command-line-flag": flag})
    else:
        entry["command-line-flag"] = flag
        entry.update(_value_type(param))
        if param.multiple and flag in multi_value:
            entry["list"] = True
        elif param.multiple:
            entry["description"] += " (One value here: Boutiques gives a list after one flag.)"
    return {key: entry[key] for key in _KEY_ORDER if key in entry}


_KEY_ORDER = (
    "id",
    "name",
    "type",
    "description",
    "value-key",
    "command-line-flag",
    "optional",
    "list",
    "value-choices",
    "integer",
    "minimum",
    "exclusive-minimum",
    "maximum",
    "exclusive-maximum",
)


def _number(integer: bool, lo, hi, lo_open: bool, hi_open: bool) -> dict[str, Any]:
    """A Boutiques Number with its bounds."""
    out: dict[str, Any] = {"type": "Number"}
    if integer:
        out["integer"] = True
    if lo is not None:
        out["minimum"] = lo
        if lo_open:
            out["exclusive-minimum"] = True
    if hi is not None:
        out["maximum"] = hi
        if hi_open:
            out["exclusive-maximum"] = True
    return out


def _value_type(param: click.Option) -> dict[str, Any]:
    kind = param.type
    if isinstance(kind, click.Choice):
        return {"type": "String", "value-choices": [str(c) for c in kind.choices]}
    bounds = SETTINGS.get(getattr(kind, "field", None) or "")
    if bounds is not None:  # cli.Setting: a number checked by bids_group.validation
        return _number(bounds.integer, bounds.lo, bounds.hi, bounds.lo_open, bounds.hi_open)
    if isinstance(kind, (click.types.IntParamType, click.types.FloatParamType)):
        integer = isinstance(kind, click.types.IntParamType)
        if isinstance(kind, click.types._NumberRangeBase):
            return _number(integer, kind.min, kind.max, kind.min_open, kind.max_open)
        return _number(integer, None, None, False, False)
    is_path = isinstance(kind, click.Path) or kind.name.upper() == "FILE"
    if is_path and param.name not in _WRITTEN_PATHS:
        return {"type": "File"}
    return {"type": "String"}


def descriptor_text(command: click.Command | None = None) -> str:
    """The descriptor as written to ``boutiques/bids-group.json`` (indent 2, newline at end)."""
    return json.dumps(build_descriptor(command), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m bids_group.boutiques [PATH]``: write the descriptor to PATH (or stdout)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv in ([], ["-"]):
        sys.stdout.write(descriptor_text())
    elif len(argv) == 1 and not argv[0].startswith("-"):
        Path(argv[0]).write_text(descriptor_text(), encoding="utf-8")
    else:
        print("usage: python -m bids_group.boutiques [PATH]", file=sys.stderr)
        return 64
    return 0


if __name__ == "__main__":
    sys.exit(main())
