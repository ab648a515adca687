"""The default path stays light: a run without a report or permutations imports neither
matplotlib (report figures) nor numba (permutation and mixed-effects kernels) nor scipy.stats.

Together they cost ~1.5 s at every start (imports, numba's target initialisation, matplotlib's
font scan), more than the whole OLS fit of a typical study; the mixed-effects benchmark
(``benchmarks/bench_mixed.py``) counts every one of them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("matplotlib", "numba", "scipy.stats")

RUN = """
import sys
from bids_group.cli import main
code = main({argv!r})
assert code == 0, code
print(sorted(m for m in {heavy!r} if m in sys.modules))
"""


def _imported_after(argv: list[str]) -> str:
    code = RUN.format(argv=argv, heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_ols_run_without_report_imports_none_of_the_heavy_modules(tmp_path):
    argv = [str(ROOT / "examples" / "ds-faces"), str(tmp_path / "out"), "group", "--model",
            str(ROOT / "configs" / "two_sample_age.yaml"), "--no-report", "-q"]  # fmt: skip
    assert _imported_after(argv) == "[]"


def test_a_report_imports_matplotlib_only_then(tmp_path):
    argv = [str(ROOT / "examples" / "ds-faces"), str(tmp_path / "out"), "group", "--model",
            str(ROOT / "configs" / "two_sample_age.yaml"), "-q"]  # fmt: skip
    assert _imported_after(argv) == "['matplotlib']"


PRELOAD = """
import numpy as np
from bids_group import mixed_effects as me
me.preload_kernels()
before = len(me.kern.fit_voxels.overloads)
rng = np.random.default_rng(0)
for p in (1, 2):
    for n_vox in (10, me._BLOCK_VOXELS + 10):
        y = rng.standard_normal((6, n_vox)).astype(np.float32)
        x = np.column_stack([np.ones(6), np.arange(6.0)])[:, :p]
        me.fit_mixed(y, np.ones_like(y), x, "reml")
print(before, len(me.kern.fit_voxels.overloads))
"""


def test_preloaded_kernel_is_the_one_every_fit_uses():
    """The pipeline loads the mixed-effects kernel in a background thread while it reads the
    maps; the signatures it loads must be those the fit then calls (one or two design
    columns, one block of voxels or several), or the fit would load or compile another."""
    done = subprocess.run([sys.executable, "-c", PRELOAD], capture_output=True, text=True,
                          check=True)  # fmt: skip
    before, after = done.stdout.split()
    assert before == after == "2"


VERSION = """
import sys
from bids_group.cli import main
code = main(["--version"])
assert code == 0, code
print(sorted(m for m in ("pandas", "scipy.ndimage", "scipy.special", "bids") if m in sys.modules))
"""


def test_version_and_help_import_no_analysis_library():
    """``--version``, ``--help`` and usage errors answer before any analysis library loads
    (their defaults live in :mod:`bids_group.inference.defaults`): scipy.ndimage alone took
    ~0.2 s of the ~0.5 s of ``bids-group --version``."""
    done = subprocess.run([sys.executable, "-c", VERSION], capture_output=True, text=True,
                          check=True)  # fmt: skip
    imported = done.stdout.strip().splitlines()[-1]
    assert "scipy" not in imported and "'bids'" not in imported, imported
