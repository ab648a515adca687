"""One self-contained HTML report per run: content dataclasses, a renderer and the one writer.

The pipeline fills a :class:`ReportContent`; :func:`render_report` turns it into a single HTML
string with inline CSS, every image as a base64 ``data:`` URI, tables as HTML and all text
escaped. There is no JavaScript, no web font and no network reference; a Content-Security-Policy
in the page forbids loading anything that is not inline. :func:`write_report` is the only
function that touches the disk.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from bids_group.errors import OutputError

log = logging.getLogger(__name__)

Mime = Literal["image/png", "image/svg+xml"]

#: Forbid everything that is not inline: the report must open offline, identically, forever.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
#: Smallest text on the page and in its figures, in CSS pixels.
MIN_TEXT_PX = 12.0
#: Anchor of the summary table of results.
SUMMARY_ID = "summary"


@dataclass(frozen=True)
class ReportFigure:
    """One encoded figure.

    Attributes
    ----------
    title : str
        Short heading shown above the image and used as its ``alt`` text.
    data : bytes
        PNG or SVG bytes, e.g. from :func:`bids_group.report.raster.slices_png`.
    mime : {"image/png", "image/svg+xml"}
    caption : str
        Sentence under the figure (what is shown, threshold and its units).
    filename : str
        Name of the same figure written beside the maps (shown so readers can find the file).
    text_px : float
        Height of the smallest text in the image, in its own pixels (SVG: CSS pixels at its
        natural size). The page never shows the figure smaller than ``MIN_TEXT_PX / text_px``
        of its natural size (a narrow window scrolls it instead), so its text stays legible.
    """

    title: str
    data: bytes
    mime: Mime = "image/png"
    caption: str = ""
    filename: str = ""
    text_px: float = 12.0

    def data_uri(self) -> str:
        """``data:<mime>;base64,...`` for an ``<img src>``."""
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"

    def natural_width(self) -> float | None:
        """Width in CSS pixels at 100% (PNG: pixels; SVG: its width attribute), if known."""
        if self.mime == "image/png" and self.data[12:16] == b"IHDR":
            return float(int.from_bytes(self.data[16:20], "big"))
        match = re.search(rb"<svg[^>]*?\swidth=\"([0-9.]+)(pt|px)?\"", self.data[:2000])
        if self.mime == "image/svg+xml" and match:
            return float(match.group(1)) * (4 / 3 if match.group(2) == b"pt" else 1.0)
        return None


@dataclass(frozen=True)
class ReportTable:
    """A small table (cluster table, contrast weights...).

    Attributes
    ----------
    title : str
    columns : tuple of str
    rows : tuple of tuple
        Cells: str, int, float (formatted with ``float_digits`` significant digits), None (blank).
    caption : str
    float_digits : int
    """

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[object, ...], ...]
    caption: str = ""
    float_digits: int = 4

    @classmethod
    def from_dataframe(cls, frame, *, title: str, caption: str = "", float_digits: int = 4):
        """Build from a pandas DataFrame (its index is dropped)."""
        rows = tuple(tuple(_python_scalar(v) for v in row) for row in frame.itertuples(False))
        return cls(title, tuple(str(c) for c in frame.columns), rows, caption, float_digits)


@dataclass(frozen=True)
class ResultSummary:
    """What survives one correction method of one contrast: a row of the summary table.

    Attributes
    ----------
    contrast : str
    method : str
    voxels : int
        Surviving voxels.
    clusters : int
        Connected components of the surviving voxels (positive and negative apart).
    peak_z : float or None
        z of largest magnitude among the survivors (None when nothing survives).
    peak_mm : (float, float, float) or None
        Its world (MNI) coordinates in mm.
    """

    contrast: str
    method: str
    voxels: int
    clusters: int
    peak_z: float | None = None
    peak_mm: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class ReportSection:
    """A titled part of the report; sub-sections nest one level in the navigation.

    Attributes
    ----------
    title : str
    text : tuple of str
        Paragraphs (plain text, escaped).
    facts : tuple of (str, str)
        Key-value pairs shown as a compact list (e.g. ("threshold", "z > 3.09")).
    code : str
        Preformatted text, e.g. the model as run (JSON).
    figures : tuple of ReportFigure
    tables : tuple of ReportTable
    warnings : tuple of str
        Shown prominently at the top of the section.
    subsections : tuple of ReportSection
    result : ResultSummary or None
        Set on the section of one correction method: its row of the summary table at the top of
        the report, which links to this section.
    """

    title: str
    text: tuple[str, ...] = ()
    facts: tuple[tuple[str, str], ...] = ()
    code: str = ""
    figures: tuple[ReportFigure, ...] = ()
    tables: tuple[ReportTable, ...] = ()
    warnings: tuple[str, ...] = ()
    subsections: tuple[ReportSection, ...] = ()
    result: ResultSummary | None = None


@dataclass(frozen=True)
class ReportContent:
    """Everything one run's report shows.

    Attributes
    ----------
    title : str
        E.g. ``"bids-group: node-GroupLevel, model-faces"``.
    command : str
        The command line as run.
    created : str
        Date/time string (the pipeline passes it, so rendering is deterministic).
    versions : tuple of (str, str)
        Software name and version.
    summary : tuple of (str, str)
        Key facts shown in the header (inputs, n maps, mask voxels...).
    sections : tuple of ReportSection
    warnings : tuple of str
        Warnings raised during the run, listed in their own section.
    """

    title: str
    command: str
    created: str
    versions: tuple[tuple[str, str], ...] = ()
    summary: tuple[tuple[str, str], ...] = ()
    sections: tuple[ReportSection, ...] = ()
    warnings: tuple[str, ...] = field(default=())


# --------------------------------------------------------------------------- helpers


def _python_scalar(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else value


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _format_cell(value: object, digits: int) -> str:
    value = _python_scalar(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool) or isinstance(value, int):
        return _e(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e6:
            return _e(f"{value:.0f}" if abs(value) >= 10**digits else f"{value:.{digits}g}")
        return _e(f"{value:.{digits}g}")
    return _e(value)


def _slug(title: str, used: set[str], parent: str = "") -> str:
    base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
    base = f"{parent}--{base}" if parent else base
    slug, n = base, 2
    while slug in used:
        slug, n = f"{base}-{n}", n + 1
    used.add(slug)
    return slug


def _assign_ids(sections: Sequence[ReportSection], used: set[str], parent: str = "") -> list:
    """(section, id, [(subsection, id, [...]), ...]) with unique, stable anchors.

    A sub-section's anchor starts with its parent's (``contrast-faces--fdr-q-0-05``), so the
    same method under several contrasts gets readable, distinct anchors.
    """
    nodes = []
    for section in sections:
        anchor = _slug(section.title, used, parent)
        nodes.append((section, anchor, _assign_ids(section.subsections, used, anchor)))
    return nodes


# --------------------------------------------------------------------------- rendering


def _render_facts(facts: Sequence[tuple[str, str]], css: str = "facts") -> str:
    if not facts:
        return ""
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    return f'<dl class="{css}">{items}</dl>'


def _figure_size(fig: ReportFigure) -> str:
    """Inline style: natural width, shrinking with the window down to legible text, no less."""
    width = fig.natural_width()
    if width is None:
        return ""
    smallest = min(width, width * MIN_TEXT_PX / fig.text_px)
    # data-text-px: the smallest text in image pixels, for tests that check legibility.
    return (
        f' style="width:{width:.0f}px;min-width:{math.ceil(smallest)}px"'
        f' data-text-px="{fig.text_px:g}"'
    )


def _render_figure(fig: ReportFigure) -> str:
    file_note = f'<span class="file">{_e(fig.filename)}</span>' if fig.filename else ""
    caption = f"<figcaption>{_e(fig.caption)}{file_note}</figcaption>"
    return (
        f'<figure><div class="fig-title">{_e(fig.title)}</div><div class="scroll">'
        f'<img src="{fig.data_uri()}" alt="{_e(fig.title)}"{_figure_size(fig)} loading="eager">'
        f"</div>{caption}</figure>"
    )


def _render_table(table: ReportTable) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in table.columns)
    if table.rows:
        body = "".join(
            "<tr>" + "".join(f"<td>{_format_cell(v, table.float_digits)}</td>" for v in r) + "</tr>"
            for r in table.rows
        )
    else:
        body = f'<tr><td class="empty" colspan="{len(table.columns)}">none</td></tr>'
    caption = f'<p class="caption">{_e(table.caption)}</p>' if table.caption else ""
    return (
        f'<div class="table"><div class="fig-title">{_e(table.title)}</div>'
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
        f"</table></div>{caption}</div>"
    )


def _render_warnings(warnings: Sequence[str]) -> str:
    if not warnings:
        return ""
    items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    return f'<div class="warn" role="note"><strong>Warnings</strong><ul>{items}</ul></div>'


def _render_section(node: tuple, level: int) -> str:
    section, anchor, children = node
    parts = [_render_warnings(section.warnings)]
    parts += [f"<p>{_e(t)}</p>" for t in section.text]
    parts.append(_render_facts(section.facts))
    if section.code:
        parts.append(f"<pre>{_e(section.code)}</pre>")
    parts += [_render_figure(f) for f in section.figures]
    parts += [_render_table(t) for t in section.tables]
    parts += [_render_section(child, level + 1) for child in children]
    tag = f"h{min(level + 1, 6)}"
    css = "card" if level == 1 else "sub"
    return (
        f'<section id="{anchor}" class="{css}"><{tag}>{_e(section.title)}</{tag}>'
        + "".join(parts)
        + "</section>"
    )


def _results(nodes: list[tuple]) -> list[tuple[ResultSummary, str]]:
    """(result, anchor) of every section with a result, in page order."""
    found = []
    for section, anchor, children in nodes:
        if section.result is not None:
            found.append((section.result, anchor))
        found += _results(children)
    return found


def _summary_row(result: ResultSummary, anchor: str) -> str:
    link = f'<a href="#{anchor}">{_e(result.method)}</a>'
    cells = f"<td>{_e(result.contrast)}</td><td>{link}</td>"
    if not result.voxels:
        return f'<tr class="none">{cells}<td colspan="4">nothing survives</td></tr>'
    peak = "" if result.peak_z is None else f"{result.peak_z:.2f}"
    where = "" if result.peak_mm is None else ", ".join(f"{c:.0f}" for c in result.peak_mm)
    return (
        f"<tr>{cells}<td>{result.voxels:,}</td><td>{result.clusters:,}</td>"
        f"<td>{_e(peak)}</td><td>{_e(where)}</td></tr>"
    )


def _render_summary(results: list[tuple[ResultSummary, str]]) -> str:
    """The table at the top: every contrast x method, what survives, linked to its section."""
    if not results:
        return ""
    head = "".join(
        f"<th>{name}</th>"
        for name in ("contrast", "method", "voxels", "clusters", "peak z", "peak x, y, z (mm)")
    )
    body = "".join(_summary_row(result, anchor) for result, anchor in results)
    return (
        f'<section id="{SUMMARY_ID}" class="card"><h2>Summary of results</h2>'
        f'<div class="scroll"><table class="summary"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
        '<p class="caption">Surviving voxels and clusters (connected components, positive and '
        "negative apart) of each correction method; peak: the surviving voxel of largest |z|, "
        "in world (MNI) millimetres. Each method links to its section.</p></section>"
    )


def _render_nav(nodes: list[tuple], has_warnings: bool, has_summary: bool) -> str:
    items = [f'<li><a href="#{SUMMARY_ID}">Summary of results</a></li>'] if has_summary else []
    for section, anchor, children in nodes:
        sub = "".join(f'<li><a href="#{a}">{_e(s.title)}</a></li>' for s, a, _ in children)
        sub = f"<ul>{sub}</ul>" if sub else ""
        items.append(f'<li><a href="#{anchor}">{_e(section.title)}</a>{sub}</li>')
    if has_warnings:
        items.append('<li><a class="warn-link" href="#run-warnings">Warnings</a></li>')
    title = '<div class="nav-title">Contents</div>'
    return f'<nav aria-label="Contents">{title}<ul>{"".join(items)}</ul></nav>'


def render_report(content: ReportContent) -> str:
    """Render the report as one self-contained HTML document.

    Parameters
    ----------
    content : ReportContent

    Returns
    -------
    str
        A complete HTML5 document; images are base64 data URIs and all text is escaped.
    """
    nodes = _assign_ids(content.sections, {"run-warnings", "top", SUMMARY_ID})
    results = _results(nodes)
    versions = "".join(
        f'<span class="chip">{_e(name)} <b>{_e(version)}</b></span>'
        for name, version in content.versions
    )
    header = (
        f'<header id="top"><h1>{_e(content.title)}</h1>'
        f'<div class="meta">Generated {_e(content.created)}</div>'
        f'<pre class="command">{_e(content.command)}</pre>'
        f'<div class="chips">{versions}</div>{_render_facts(content.summary, "summary")}</header>'
    )
    body = _render_summary(results) + "".join(_render_section(node, 1) for node in nodes)
    if content.warnings:
        items = "".join(f"<li>{_e(w)}</li>" for w in content.warnings)
        body += (
            '<section id="run-warnings" class="card"><h2>Warnings raised during the run</h2>'
            f'<div class="warn"><ul>{items}</ul></div></section>'
        )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(content.title)}</title><style>{_CSS}</style></head>"
        f'<body><div class="layout">{_render_nav(nodes, bool(content.warnings), bool(results))}'
        f"<main>{header}{body}<footer>Self-contained report: no network access is needed "
        "to view it.</footer></main></div></body></html>\n"
    )


def write_report(path: Path | str, content: ReportContent) -> Path:
    """Render ``content`` and write it atomically to ``path`` (UTF-8).

    Parameters
    ----------
    path : path-like
        Destination ``.html`` file; its folder must exist.
    content : ReportContent

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    OutputError
        If the folder does not exist or the file cannot be written.
    """
    path = Path(path)
    text = render_report(content)
    if not path.parent.is_dir():
        raise OutputError(f"Cannot write the report {path}: folder {path.parent} does not exist.")
    # Write beside the target then rename, so a crash never leaves half a report.
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise OutputError(f"Cannot write the report {path}: {error}") from error
    log.info("report written to %s (%.1f MB)", path, len(text.encode()) / 1e6)
    return path


_CSS = """
:root{--ink:#1d2330;--muted:#5b6475;--line:#e3e7ee;--bg:#f5f7fa;--card:#fff;--accent:#2f5da8;
--warn-bg:#fff6e0;--warn-line:#e0a400}
*{box-sizing:border-box}
html{scroll-behavior:smooth}
body{margin:0;background:var(--bg);color:var(--ink);
font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
.layout{display:flex;align-items:flex-start}
nav{position:sticky;top:0;flex:0 0 250px;height:100vh;overflow-y:auto;padding:20px 14px;
background:#1f2a3c;color:#dfe6f2;font-size:13.5px}
nav .nav-title{font-weight:700;text-transform:uppercase;letter-spacing:.08em;font-size:12px;
color:#9fb0c8;margin-bottom:8px}
nav ul{list-style:none;margin:0;padding:0}
nav li{margin:2px 0}
nav ul ul{margin:2px 0 6px 12px;border-left:1px solid #3a4a63;padding-left:8px;font-size:12.5px}
nav a{color:#dfe6f2;text-decoration:none;display:block;padding:2px 4px;border-radius:4px}
nav a:hover{background:#2f3e57}
nav a.warn-link{color:#ffcf5c}
main{flex:1;min-width:0;max-width:1180px;padding:24px 32px 40px}
header{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:20px 24px;
margin-bottom:20px;box-shadow:0 1px 2px rgba(0,0,0,.04)}
h1{margin:0 0 4px;font-size:24px}
h2{margin:0 0 12px;font-size:20px;border-bottom:2px solid var(--line);padding-bottom:6px}
h3{margin:22px 0 10px;font-size:17px;color:var(--accent)}
h4,h5,h6{margin:16px 0 8px;font-size:15px}
.meta{color:var(--muted);font-size:13px;margin-bottom:10px}
pre{background:#f0f2f6;border:1px solid var(--line);border-radius:6px;padding:10px 12px;
overflow-x:auto;font:12.5px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
white-space:pre-wrap;word-break:break-word;max-height:420px}
pre.command{background:#1f2a3c;color:#e8eef8;border:none}
.chips{display:flex;flex-wrap:wrap;gap:6px;margin:10px 0}
.chip{background:#eef2f9;border:1px solid #d6deeb;border-radius:999px;padding:2px 10px;
font-size:12.5px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:3px 16px;margin:10px 0;font-size:14px}
dt{color:var(--muted)}
dd{margin:0;font-variant-numeric:tabular-nums}
dl.summary{border-top:1px solid var(--line);padding-top:10px}
section.card{background:var(--card);border:1px solid var(--line);border-radius:10px;
padding:18px 24px;margin-bottom:20px;box-shadow:0 1px 2px rgba(0,0,0,.04);scroll-margin-top:12px}
section.sub{border-top:1px dashed var(--line);margin-top:18px;scroll-margin-top:12px}
figure{margin:14px 0 18px}
figure img{display:block;max-width:100%;height:auto;border-radius:6px;border:1px solid var(--line)}
.fig-title{font-weight:600;font-size:14px;margin-bottom:6px}
figcaption,.caption{color:var(--muted);font-size:13px;margin-top:6px}
.file{display:block;font:12px ui-monospace,Menlo,Consolas,monospace;color:#7a8394}
.table{margin:14px 0 18px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:13.5px;font-variant-numeric:tabular-nums;min-width:50%}
th{background:#eef2f9;text-align:right;padding:6px 10px;border-bottom:2px solid #cdd6e4;
white-space:nowrap}
td{text-align:right;padding:4px 10px;border-bottom:1px solid var(--line)}
th:first-child,td:first-child{text-align:left}
tbody tr:nth-child(even){background:#fafbfd}
td.empty{text-align:center;color:var(--muted);font-style:italic}
table.summary td:nth-child(2),table.summary th:nth-child(2){text-align:left;white-space:normal}
tr.none td:last-child{text-align:left;color:var(--muted);font-style:italic}
.warn{background:var(--warn-bg);border-left:4px solid var(--warn-line);border-radius:6px;
padding:8px 14px;margin:10px 0;font-size:14px}
.warn ul{margin:4px 0 2px;padding-left:20px}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:24px}
@media (max-width:900px){.layout{display:block}nav{position:static;height:auto;width:auto}
main{padding:12px}header,section.card{padding:14px 12px}}
@media print{nav{display:none}section.card{break-inside:avoid-page}}
"""
