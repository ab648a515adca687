"""Figures and the self-contained HTML report.

Pure functions from arrays to PNG bytes (:mod:`~bids_group.report.raster`, the one renderer,
and :mod:`~bids_group.report.histogram`), the report content model and its renderer
(:mod:`~bids_group.report.html`), and the assembly of a run's report
(:mod:`~bids_group.report.build`). :func:`write_report` is the only writer of the page.
"""

from bids_group.report._common import CONVENTION
from bids_group.report.histogram import null_distribution_png
from bids_group.report.html import (
    ReportContent,
    ReportFigure,
    ReportSection,
    ReportTable,
    ResultSummary,
    render_report,
    write_report,
)
from bids_group.report.raster import glass_brain_png, mask_png, signed_mip, slices_png

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
