"""The node graph of a BIDS Stats Models file: which nodes bids-group runs, and what each receives.

bids-group runs every ``Level: Dataset`` node on first-level maps that already exist (the
outputs of the Run / Session / Subject nodes, which it does not run). A node's inputs are the
maps the model's ``Input`` selects, narrowed by the ``Filter`` of the edge into it: published
models (fitlins, the BIDS model zoo) send some contrasts of the Subject node to one Dataset node
and others to another (``{"contrast": ["task_vs_baseline", "word_gt_pseudo"]}``). Filter values
of ``contrast`` are contrast *names* of the upstream node; the maps carry their labels
(:func:`bids_group.labels.first_level_labels`).

What cannot be honoured is refused with the field named: an edge from one Dataset node into
another (bids-group does not chain its own outputs), several edges into one Dataset node, the
pre-1.0 ``Steps`` format. What fitlins accepts beyond the specification is accepted with a log
line (see :func:`as_list`, :func:`level`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bids_group.errors import SpecError
from bids_group.labels import first_level_labels
from bids_group.transformations import nearest

log = logging.getLogger(__name__)

#: Node levels of the specification, in order.
LEVELS = ("Run", "Session", "Subject", "Dataset")


@dataclass(frozen=True)
class DatasetNode:
    """One ``Level: Dataset`` node and the ``Filter`` of the edge into it.

    Attributes
    ----------
    index : int
        Its position in ``Nodes``.
    node : mapping
        The node as written.
    edge_filter : mapping of str to tuple of str
        The incoming edge's ``Filter`` (entity -> values as written, e.g. contrast *names*);
        empty when no edge (or an edge without Filter) leads to the node.
    filter_where : str or None
        Where that Filter is in the file (``model.json: Edges[1].Filter``), for messages.
    """

    index: int
    node: Mapping[str, Any]
    edge_filter: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    filter_where: str | None = None


def as_list(value: Any, where: str) -> Any:
    """``value``, or ``[value]`` when it is a scalar where the specification wants a list.

    fitlins (through pybids) accepts ``"GroupBy": "contrast"``, ``"task": "faces"`` and
    ``"X": 1``; so does bids-group, with a log line saying how it was read.
    """
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        log.info("%s: %r read as the list [%r] (the specification asks for a list)", where,
                 value, value)  # fmt: skip
        return [value]
    return value


def level(value: Any, where: str, *, note: bool = True) -> str:
    """The canonical ``Level`` (``Dataset``); other cases (fitlins' ``dataset``) with a note."""
    canonical = {name.lower(): name for name in LEVELS}.get(str(value).lower())
    if not isinstance(value, str) or canonical is None:
        raise SpecError(
            f"{where}: must be one of {', '.join(LEVELS)}, got {value!r}"
            f"{nearest(str(value), LEVELS)}"
        )
    if value != canonical and note:
        log.info("%s: %r read as %r (the specification capitalises levels)", where, value,
                 canonical)  # fmt: skip
    return canonical


def check_not_draft(data: Mapping[str, Any], fname: str) -> None:
    """Refuse the pre-1.0 draft format (``Steps``, as in fitlins' older examples)."""
    if "Steps" in data and "Nodes" not in data:
        raise SpecError(
            f"{fname}: Steps: this is the draft (pre-1.0) BIDS Stats Models format, which "
            "bids-group does not read; in BIDSModelVersion 1.0 rename Steps to Nodes, give "
            "each node a Name, GroupBy and Model.Type, and connect them with Edges"
        )


def dataset_nodes(
    nodes: Sequence[Mapping[str, Any]], edges: Sequence[Mapping[str, Any]], fname: str
) -> tuple[DatasetNode, ...]:
    """Every ``Level: Dataset`` node, with the Filter of the edge into it.

    ``nodes`` and ``edges`` have been checked as mappings with valid ``Level``, ``Name``,
    ``Source`` and ``Destination``.

    Raises
    ------
    SpecError
        No Dataset node; an edge into a Dataset node from another Dataset node; several edges
        into one Dataset node; a Filter that is not entity -> value(s).
    """
    levels = {str(n["Name"]): level(n["Level"], f"{fname}: Nodes[{i}].Level", note=False)
              for i, n in enumerate(nodes)}  # fmt: skip
    found = []
    for i, node in enumerate(nodes):
        name = str(node["Name"])
        if levels[name] != "Dataset":
            log.info(
                "%s: Nodes[%d]: skipping %s-level node %r (bids-group runs the Dataset nodes; "
                "their inputs are its maps)", fname, i, levels[name], name,
            )  # fmt: skip
            continue
        incoming = [(k, e) for k, e in enumerate(edges) if e["Destination"] == name]
        if len(incoming) > 1:
            raise SpecError(
                f"{fname}: Edges[{incoming[1][0]}]: a second edge into Dataset node {name!r} "
                f"(the first is Edges[{incoming[0][0]}]); bids-group reads one input per node: "
                "merge their Filters into one edge"
            )
        if not incoming:
            found.append(DatasetNode(i, node))
            continue
        k, edge = incoming[0]
        if levels[str(edge["Source"])] == "Dataset":
            raise SpecError(
                f"{fname}: Edges[{k}]: from Dataset node {edge['Source']!r} to Dataset node "
                f"{name!r}: bids-group runs Dataset nodes on first-level maps and does not feed "
                "one node's results to another; run the second model on its own"
            )
        where = f"{fname}: Edges[{k}].Filter"
        edge_filter = parse_filter(edge.get("Filter"), where)
        found.append(DatasetNode(i, node, edge_filter, where if edge_filter else None))
    if not found:
        raise SpecError(f"{fname}: Nodes: no node has Level: Dataset; bids-group runs those")
    return tuple(found)


def parse_filter(raw: Any, where: str) -> dict[str, tuple[str, ...]]:
    """An edge ``Filter``: entity -> value or list of values (strings or numbers)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SpecError(f"{where}: must map entities to values, e.g. {{contrast: [faces]}}, "
                        f"got {raw!r}")  # fmt: skip
    out: dict[str, tuple[str, ...]] = {}
    for key, value in raw.items():
        values = as_list(value, f"{where}.{key}")
        if not isinstance(values, list) or not values:
            raise SpecError(f"{where}.{key}: must be a value or a non-empty list, got {value!r}")
        for item in values:
            if isinstance(item, bool) or not isinstance(item, str | int):
                raise SpecError(f"{where}.{key}: values must be strings, got {item!r}")
        out[str(key)] = tuple(str(v) for v in values)
    return out


def map_filters(
    input_filters: Mapping[str, Any], edge_filter: Mapping[str, Sequence[str]], where: str | None
) -> dict[str, Any]:
    """The entity filters of a node's maps: the model's ``Input`` and its edge's ``Filter``.

    ``contrast`` values of the Filter are contrast names, matched to every label a map of that
    contrast may carry (:func:`~bids_group.labels.first_level_labels`); other entities are
    labels already. An entity in both keeps the values in both.

    Examples
    --------
    >>> map_filters({"task": "faces"}, {"contrast": ("faces_vs_scrambled",)}, "m: Edges[0]")
    {'task': 'faces', 'contrast': ['facesVsScrambled']}
    """
    merged: dict[str, Any] = dict(input_filters)
    for key, values in edge_filter.items():
        wanted = [label for v in values for label in first_level_labels(v)] if key == "contrast" \
            else list(values)  # fmt: skip
        wanted = list(dict.fromkeys(wanted))
        if key in merged:
            given = merged[key] if isinstance(merged[key], list) else [merged[key]]
            both = [v for v in wanted if v in {str(g) for g in given}]
            if not both:
                raise SpecError(
                    f"{where}.{key}: selects {key} in {wanted} but Input selects {given}: no map "
                    "can satisfy both; change one of them"
                )
            wanted = both
        merged[key] = wanted
    return merged
