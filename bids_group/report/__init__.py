"""Figures and the self-contained HTML report.

Pure functions from arrays to PNG bytes (:mod:`~bids_group.report.raster`, the one renderer,
and :mod:`~bids_group.report.histogram`), the report content model and its renderer
(:mod:`~bids_group.report.html`), and the assembly of a run's report
(:mod:`~bids_group.report.build`). :func:`write_report` is the only writer of the page.
"""

from bids_group.report._common import CONVENTION
from bids_group.report.html import (
    ReportContent,
    ReportFigure,
    ReportSection,
    ReportTable,
    ResultSummary,
    render_report,
    write_report,
)

__all__ = [
    "CONVENTION",
    "ReportContent",
    "ReportFigure",
    "ReportSection",
    "ReportTable",
    "ResultSummary",
    "glass_brain_png",
    "mask_png",
    "null_distribution_png",
    "render_report",
    "signed_mip",
    "slices_png",
    "write_report",
]

#: The renderers import matplotlib (FreeType, colour maps): loaded on first use, so that a run
#: without a report never imports it.
_LAZY = {
    "glass_brain_png": "raster",
    "mask_png": "raster",
    "signed_mip": "raster",
    "slices_png": "raster",
    "null_distribution_png": "histogram",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"bids_group.report.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
