"""The report of a real run, tested as a user meets it: files, stdout, and a headless browser.

Run on the example dataset of README command 1 (with ARI on), so this is the report we polish.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from test_ari_run import ROOT, _run
from test_report import CHROMIUM, _chromium, check_legible, probe_page

from bids_group.report.build import collect_warnings
from bids_group.report.raster import MIN_TEXT_PX, _draw_text, png_bytes

MODEL = ROOT / "configs" / "two_sample_age.yaml"


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    code, summary, err = _run(out, "--model", str(MODEL), "--ari", "--ari-thresholds", "3", "3.5")
    assert code == 0, err
    return out, summary


def test_report_is_written_listed_and_self_contained(example_run):
    out, summary = example_run
    report = Path(summary["report"])
    assert report == out / "model-twoSampleAge_report.html" and report.is_file()
    assert summary["files"][-1] == str(report)  # listed with the written files
    page = report.read_text(encoding="utf-8")
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert 'src="data:image/' in page and 'src="http' not in page
    # every contrast x method has its slices and glass brain written beside the maps
    pngs = sorted(p for p in map(Path, summary["files"]) if p.suffix == ".png")
    kinds = {re.sub(r".*_(\w+)\.png$", r"\1", p.name) for p in pngs}
    assert kinds == {"slices", "glassbrain", "mask"}
    # a method where nothing survives gets one line in the report, no empty figures
    contrasts = [c for a in summary["analyses"] for c in a["contrasts"]]
    n_shown = sum(c["surviving_voxels"] > 0 for c in contrasts)
    n_shown += sum(c["ari"]["true_discoveries"] > 0 for c in contrasts)
    assert 0 < n_shown < 2 * len(contrasts)  # the example has both kinds
    assert len([p for p in pngs if re.search(r"_desc-\w+_slices\.png$", p.name)]) == n_shown
    # every contrast: its unthresholded z map and effect size (t contrasts), as slices
    for contrast in contrasts:
        for stat in ("z", "effect"):
            assert [p for p in pngs if p.name.endswith(f"contrast-{contrast['label']}_stat-"
                                                       f"{stat}_slices.png")]  # fmt: skip
    for title in ("z map, unthresholded", "effect map, unthresholded"):
        assert page.count(f'alt="{title}"') == len(contrasts)
    # no cluster p-value without a permutation test, and the table says why
    assert "No cluster-level p-value: bids-group computes no random-field theory p" in page
    assert page.count("Nothing survives") == 2 * len(contrasts) - n_shown
    for png in pngs:
        assert imread(io.BytesIO(png.read_bytes())).shape[1] > 300
        assert png.name in page  # the report names the file of each figure
    # the content a reader needs
    for text in ("two_sample_age", "patientGtControl", "condition number", "29,472 voxels",
                 "|z| &gt; 3.09", "true_discoveries", "Model as run", "numpy"):  # fmt: skip
        assert text in page, text
    assert page.count("<img ") == len(pngs) + len(summary["analyses"])  # + design SVGs


def _summary_rows(page: str) -> list[tuple[str, list[str]]]:
    """(anchor, cell texts) of each row of the summary table."""
    table = re.search(r'<section id="summary".*?</table>', page, re.S)
    assert table, "no summary table"
    rows = re.findall(r"<tr[^>]*><td>(.*?)</td><td><a href=\"#([^\"]+)\">(.*?)</a></td>(.*?)</tr>",
                      table.group(0))  # fmt: skip
    return [(anchor, [c, m, *re.findall(r"<td[^>]*>(.*?)</td>", rest)])
            for c, anchor, m, rest in rows]  # fmt: skip


def test_summary_table_lists_every_method_and_links_to_it(example_run):
    out, summary = example_run
    page = Path(summary["report"]).read_text(encoding="utf-8")
    rows = _summary_rows(page)
    contrasts = [c for a in summary["analyses"] for c in a["contrasts"]]
    assert len(rows) == 2 * len(contrasts)  # height control and ARI for each contrast
    ids = set(re.findall(r' id="([^"]+)"', page))
    assert {anchor for anchor, _ in rows} <= ids
    assert page.index('id="summary"') < page.index('id="model-as-run"')  # at the top
    node = out / "node-groupComparison"
    for contrast in contrasts:
        label = contrast["label"]
        height = [cells for _, cells in rows if cells[0] == label and "ARI" not in cells[1]]
        assert len(height) == 1
        cells = height[0]
        if not contrast["surviving_voxels"]:
            assert cells[2:] == ["nothing survives"]
            continue
        # the oracle: the cluster table written beside the maps
        (tsv,) = node.glob(f"*contrast-{label}_stat-z_desc-uncorrectedK20_clusters.tsv")
        table = pd.read_csv(tsv, sep="\t", dtype={"cluster_id": str})
        clusters = table[table["cluster_id"].str.isdigit()]
        assert cells[2] == f"{contrast['surviving_voxels']:,}"
        assert int(cells[3]) == len(clusters) and clusters["size_voxels"].sum() == int(cells[2])
        top = table.loc[table["peak_stat"].abs().idxmax()]
        assert float(cells[4]) == pytest.approx(top["peak_stat"], abs=0.005)
        assert cells[5] == f"{top['peak_x']:.0f}, {top['peak_y']:.0f}, {top['peak_z']:.0f}"
    assert any(cells[2:] == ["nothing survives"] for _, cells in rows)


def test_no_report_writes_neither_html_nor_figures(tmp_path):
    code, summary, err = _run(tmp_path / "out", "--model", str(MODEL), "--no-report")
    assert code == 0, err
    assert "report" not in summary
    assert not [p for p in summary["files"] if p.endswith((".html", ".png"))]


def test_warnings_of_the_run_are_collected():
    log = logging.getLogger("bids_group.images")
    with collect_warnings() as messages:
        log.info("not a warning")
        log.warning("Dropped %d voxels", 3)
    log.warning("after the block")
    assert messages == ["Dropped 3 voxels"]


def test_figure_text_has_the_pixel_height_asked_and_no_less_than_the_minimum():
    # DejaVu Sans capitals are 0.729 em high: "H" at MIN_TEXT_PX px has a cap height of ~12 px
    canvas = np.zeros((60, 60, 3), np.uint8)
    _draw_text(canvas, "H", 5, 5, (255, 255, 255), MIN_TEXT_PX)
    rows = np.flatnonzero(canvas[..., 0].max(axis=1) > 128)
    assert rows.size == pytest.approx(0.729 * MIN_TEXT_PX, abs=1.0)
    with pytest.raises(ValueError, match="below the minimum"):
        _draw_text(canvas, "H", 5, 5, (255, 255, 255), MIN_TEXT_PX - 1)


def test_png_encoder_round_trips():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    decoded = imread(io.BytesIO(png_bytes(rgb)))  # PIL decodes it: the oracle
    np.testing.assert_array_equal((decoded[..., :3] * 255).round().astype(np.uint8), rgb)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(example_run, tmp_path):
    _, summary = example_run
    page = Path(summary["report"]).read_text(encoding="utf-8")
    for width in (1400, 800):
        probe = probe_page(page, tmp_path, width)
        assert probe["images"] == page.count("<img ") > 10
        assert probe["broken"] == 0 and probe["errors"] == []
        assert [r for r in probe["resources"] if not r.startswith("data:")] == []
        check_legible(probe, width)
        # the summary table: one row per contrast and method, each leading to its section
        contrasts = [c for a in summary["analyses"] for c in a["contrasts"]]
        assert probe["summaryRows"] == 2 * len(contrasts) and probe["deadLinks"] == 0
        # empty results collapse to one line without figures
        assert probe["emptySections"] == page.count("Nothing survives") > 0
        assert set(probe["emptyImages"]) == {0}
    shot = tmp_path / "report.png"
    result = _chromium(
        ["--window-size=1400,2400", f"--screenshot={shot}", Path(summary["report"]).as_uri()],
        tmp_path / "profile",
    )
    assert shot.exists(), result.stderr[-2000:]
    assert imread(str(shot)).std() > 0.05
