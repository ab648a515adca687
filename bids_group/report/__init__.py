"""Figures and the self-contained HTML report.

Pure functions from arrays to figure bytes (PNG or SVG), plus the report content model and its
renderer. Nothing here knows about the pipeline; :func:`write_report` is the only writer.
"""

from bids_group.report._common import CONVENTION, MIME_TYPES
from bids_group.report.glassbrain import glass_brain, signed_mip
from bids_group.report.html import (
    ReportContent,
    ReportFigure,
    ReportSection,
    ReportTable,
    ResultSummary,
    render_report,
    write_report,
)
from bids_group.report.plots import (
    DesignSummary,
    contrast_weights_plot,
    design_matrix_plot,
    design_summary,
    null_distribution_plot,
)
from bids_group.report.slices import mask_outline, orthogonal_slices

__all__ = [
    "CONVENTION",
    "MIME_TYPES",
    "DesignSummary",
    "ReportContent",
    "ReportFigure",
    "ReportSection",
    "ReportTable",
    "ResultSummary",
    "contrast_weights_plot",
    "design_matrix_plot",
    "design_summary",
    "glass_brain",
    "mask_outline",
    "null_distribution_plot",
    "orthogonal_slices",
    "render_report",
    "signed_mip",
    "write_report",
]
