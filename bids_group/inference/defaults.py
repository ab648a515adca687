"""Default settings of inference, in a module without heavy imports.

The command line and the run configuration need these values before any analysis starts: kept
here, ``bids-group --help``, ``--version`` and usage errors do not import pandas or scipy.
"""

from __future__ import annotations

#: Default error rate per voxel-level height control.
DEFAULT_ALPHA: dict[str, float] = {"fpr": 0.001, "fdr": 0.05, "bonferroni": 0.05}
#: Default for every cluster and TFCE computation: faces only, as nilearn and scipy.ndimage.label
#: (FSL's cluster uses 26: pass ``connectivity=26``).
DEFAULT_CONNECTIVITY = 6
