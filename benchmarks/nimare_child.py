"""NiMARE end to end on pain21, one estimator: the child of ``bench_mixed.py --part end-to-end``.

Runs under NiMARE's own interpreter (NiMARE 0.22.1 needs nilearn 0.13, bids-group pins 0.14),
so it imports nothing from bids-group and only the standard library before the clock starts.
Steps, each timed: import NiMARE; build a :class:`nimare.dataset.Dataset` of the 21 studies
(``beta`` = ``contrast_pain_NN``, ``varcope`` = ``var_pain_NN``, pain21's own mask); fit the
estimator (NiMARE loads, masks and checks the images here); write every result map
(``MetaResult.save_maps``, as bids-group writes all its maps). The last line of stdout is a
JSON object: the step times, this process's peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``)
and the number of variance values NiMARE's warning says it set to NaN.

Run: ``/work/nimare-venv/bin/python benchmarks/nimare_child.py PAIN21_DIR ESTIMATOR OUT_DIR``
with ESTIMATOR one of fe, dl, hedges, ml, reml.
"""

from __future__ import annotations

import json
import logging
import re
import resource
import sys
import time
import warnings
from pathlib import Path

START = time.perf_counter()


class _InvalidCount(logging.Handler):
    """Adds up NiMARE's 'Found N non-finite, non-positive, or tiny varcope values' warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        found = re.match(r"Found (\d+) non-finite", record.getMessage())
        if found:
            self.count += int(found.group(1))


def _estimator(ibma, name: str):
    """NiMARE 0.22.1's estimator for our name, each on its own defaults (small-sample
    correction: Knapp-Hartung where tau^2 is estimated, Wald for WLS; liberal mask)."""
    if name == "fe":
        return ibma.WeightedLeastSquares()  # tau2 = 0: fixed effects
    if name == "dl":
        return ibma.DerSimonianLaird()
    if name == "hedges":
        return ibma.Hedges()
    return ibma.VarianceBasedLikelihood(method=name)  # "ml" or "reml"


def _source(folder: Path) -> dict:
    """The Dataset dictionary: one study, one contrast per pain21 map pair."""
    return {
        f"pain{i:02d}": {
            "contrasts": {
                "pain": {
                    "images": {
                        "beta": str(folder / f"contrast_pain_{i:02d}.nii.gz"),
                        "varcope": str(folder / f"var_pain_{i:02d}.nii.gz"),
                    }
                }
            }
        }
        for i in range(1, 22)
    }


def main(folder: Path, name: str, out: Path) -> dict:
    """Run one estimator end to end; return the step times and peak RSS."""
    counter = _InvalidCount()
    logging.getLogger("nimare").addHandler(counter)
    warnings.simplefilter("ignore")  # Dataset's deprecation notice, PyMARE's numeric warnings
    from nimare.dataset import Dataset
    from nimare.meta import ibma

    t_import = time.perf_counter()
    dataset = Dataset(_source(folder), target="mni152_2mm", mask=str(folder / "mask.nii.gz"))
    t_dataset = time.perf_counter()
    result = _estimator(ibma, name).fit(dataset)
    t_fit = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    result.save_maps(output_dir=str(out))
    t_save = time.perf_counter()
    return {
        "import_s": t_import - START,
        "dataset_s": t_dataset - t_import,
        "fit_s": t_fit - t_dataset,
        "save_s": t_save - t_fit,
        "total_s": t_save - START,
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "invalid_variances": counter.count,
        "maps": sorted(p.name for p in out.glob("*.nii.gz")),
    }


if __name__ == "__main__":
    report = main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
    print(json.dumps(report))
