"""Every threshold method, through the real CLI, on data where nothing survives and where
something does, with the report on and off, one- and two-sided.

A crash on ``--height-control fdr`` whenever nothing survived once passed the whole suite: the
report formatted a p threshold that does not exist when FDR rejects nothing. Here each method
must give a normal result either way: exit 0, the thresholded maps (all zero when nothing
survives), cluster tables with their header, and a report that says "Nothing survives ..."
instead of empty figures.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from clicheck import run_cli
from conftest import map_name, write_description, write_map, write_participants

N_SUBJECTS = 10
SHAPE = (10, 10, 10)
#: (name, extra options). The permutation methods share one run (one relabelling set).
METHODS = {
    "fpr": [],
    "fdr": ["--height-control", "fdr"],
    "bonferroni": ["--height-control", "bonferroni"],
    "none": ["--height-control", "none", "--threshold", "3.5"],
    "extent": ["--cluster-threshold", "5"],
    "ari": ["--ari", "--ari-thresholds", "3", "4"],
    "permutation": ["--permutation", "voxel", "cluster", "tfce", "--n-perm", "199"],
}


def _dataset(root: Path, *, effect: float) -> Path:
    """Ten subjects of noise; ``effect`` added in a 3 x 3 x 3 cube (0: nothing to find).

    Without an effect, each voxel's mean over subjects is shrunk to a tenth, so that |t| < 1
    everywhere and nothing can survive any method (deterministically, whatever the seed).
    """
    rng = np.random.default_rng(7)
    data = rng.standard_normal((N_SUBJECTS, *SHAPE)).astype(np.float64)
    data -= 0.9 * data.mean(axis=0)
    data[:, 3:6, 3:6, 3:6] += effect
    write_description(root)
    for i in range(N_SUBJECTS):
        name = map_name(f"{i + 1:02d}")
        write_map(root / f"sub-{i + 1:02d}" / "func" / name, data[i])
    subjects = [f"sub-{i + 1:02d}" for i in range(N_SUBJECTS)]
    write_participants(root / "participants.tsv", {"participant_id": subjects})
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("survive")
    return {
        "nothing": _dataset(base / "nothing", effect=0.0),
        "something": _dataset(base / "something", effect=4.0),
    }


def _thresholded_maps(files: list[Path]) -> list[Path]:
    """The maps that hold only what survived: thresholded z maps and the ARI TDP map."""
    return [
        p
        for p in files
        if p.name.endswith("_statmap.nii.gz")
        and "_desc-" in p.name
        and ("_stat-z_" in p.name or "_stat-tdp_" in p.name)
    ]


@pytest.mark.parametrize("sided", ["two-sided", "one-sided"])
@pytest.mark.parametrize("report", ["report", "no-report"])
@pytest.mark.parametrize("truth", ["nothing", "something"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_gives_a_normal_result(datasets, tmp_path, method, truth, report, sided):
    out = tmp_path / "out"
    args = [*METHODS[method], f"--{report}", f"--{sided}"]
    code, stdout, stderr = run_cli(datasets[truth], out, *args)
    assert code == 0, stderr
    assert "Traceback" not in stderr and "unexpected error" not in stderr
    summary = json.loads(stdout)
    files = [Path(p) for p in summary["files"]]
    assert files and all(p.is_file() for p in files)

    maps = _thresholded_maps(files)
    assert maps, "no thresholded map was written"
    surviving = {p.name: int(np.count_nonzero(nib.load(p).get_fdata())) for p in maps}
    if truth == "nothing":
        assert not any(surviving.values()), surviving
    else:
        # The FWER / FDR / height maps find the cube; uncorrected permutation maps may
        # find more. Every method's main map is non-empty.
        assert all(n > 0 for name, n in surviving.items() if "Uncorrected" not in name), surviving

    tables = [p for p in files if p.name.endswith("_clusters.tsv")]
    assert tables, "no cluster table was written"
    for table in tables:
        lines = table.read_text().splitlines()
        assert lines and "\t" in lines[0], f"{table.name} has no header"
        if truth == "nothing":
            assert len(lines) == 1, f"{table.name} lists clusters where nothing survives"

    html = [p for p in files if p.suffix == ".html"]
    pngs = [p for p in files if p.suffix == ".png"]
    if report == "no-report":
        assert not html and not pngs
        return
    assert len(html) == 1 and summary["report"] == str(html[0])
    page = html[0].read_text(encoding="utf-8")
    if truth == "nothing":
        assert "Nothing survives" in page
        # no empty map figures: only the mask figure and the unthresholded z and effect maps
        # (nothing for the thresholded maps)
        kinds = {re.sub(r".*?_(stat-\w+_slices|mask)\.png$", r"\1", p.name) for p in pngs}
        assert kinds == {"mask", "stat-z_slices", "stat-effect_slices"}, kinds
    else:
        assert "Nothing survives" not in page
        assert any(p.name.endswith("_glassbrain.png") for p in pngs)


def test_nothing_survives_line_names_the_criterion_and_the_peak(datasets, tmp_path):
    code, stdout, stderr = run_cli(datasets["nothing"], tmp_path / "out", "--height-control", "fdr")
    assert code == 0, stderr
    page = Path(json.loads(stdout)["report"]).read_text(encoding="utf-8")
    line = page.split("Nothing survives", 1)[1].split("</p>", 1)[0]
    assert line.startswith(" FDR q &lt; 0.05; peak |z| "), line
    assert line.endswith(" mm."), line
    assert "no voxel passes FDR at 0.05" in page  # the p threshold that does not exist
