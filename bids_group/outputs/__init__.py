"""Everything bids-group writes: names, atomic staging, maps, tables, figures, descriptions.

Nothing else in the package writes files. :mod:`bids_group.pipeline` drives these modules.
"""

from bids_group.outputs.description import write_dataset_description, write_json
from bids_group.outputs.figures import design_summary, plot_design_matrix
from bids_group.outputs.maps import MapWriter, write_mask, write_statmap
from bids_group.outputs.staging import StagedOutput, check_writable, staged_output
from bids_group.outputs.tables import write_table

__all__ = [
    "MapWriter",
    "StagedOutput",
    "check_writable",
    "design_summary",
    "plot_design_matrix",
    "staged_output",
    "write_dataset_description",
    "write_json",
    "write_mask",
    "write_statmap",
    "write_table",
]
