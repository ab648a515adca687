"""Report figures and HTML: pure-function checks, self-containment, and a headless-browser test.

Run ``python tests/test_report.py OUT.html`` to write the synthetic demo report and look at it.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from scipy import ndimage

from bids_group.errors import DataError, OutputError
from bids_group.inference.ari import ari_clusters
from bids_group.outputs.figures import plot_design_matrix
from bids_group.report import (
    ReportContent,
    ReportFigure,
    ReportSection,
    ReportTable,
    ResultSummary,
    glass_brain_png,
    mask_png,
    null_distribution_png,
    render_report,
    signed_mip,
    slices_png,
    write_report,
)
from bids_group.report.raster import MIN_TEXT_PX, png_bytes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# --------------------------------------------------------------------------- synthetic data


def synthetic_brain(shape=(50, 60, 50), voxel=3.5):
    """An ellipsoid 'brain' in MNI-like world space, a background and a z map with blobs."""
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = [-voxel * (shape[0] - 1) / 2, -126.0, -72.0]
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = (ijk @ affine[:3, :3].T + affine[:3, 3]).reshape(*shape, 3)
    x, y, z = xyz[..., 0], xyz[..., 1] + 18, xyz[..., 2] - 10
    radius = np.sqrt((x / 68) ** 2 + (y / 88) ** 2 + (z / 62) ** 2)
    mask = radius < 1.0
    rng = np.random.default_rng(7)
    anatomy = np.where(mask, 600 + 300 * np.cos(radius * 9) ** 2, 0.0)
    anatomy[(np.abs(x) < 10) & (np.abs(y) < 25) & (np.abs(z) < 15)] *= 0.3  # "ventricles"
    anatomy = ndimage.gaussian_filter(anatomy + 40 * rng.standard_normal(shape) * mask, 1.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    stat = noise / noise.std()

    def blob(cx, cy, cz, amp, width=8.0):
        return amp * np.exp(
            -((xyz[..., 0] - cx) ** 2 + (xyz[..., 1] - cy) ** 2 + (xyz[..., 2] - cz) ** 2)
            / (2 * width**2)
        )

    stat += blob(-38, -70, 5, 7.0) + blob(40, -72, 2, 6.0) + blob(-2, 40, 30, -5.5, 10)
    stat = np.where(mask, stat, 0.0)
    return stat, mask, anatomy, affine


def build_demo_content(tmp_dir: Path) -> ReportContent:
    """A full report from synthetic volumes, exercising every section the pipeline fills."""
    stat, mask, anatomy, affine = synthetic_brain()
    rng = np.random.default_rng(1)
    n = 24
    design = np.column_stack([np.ones(n), rng.normal(30, 8, n), rng.integers(0, 2, n)])
    names = ["intercept", "age", "sex"]
    subjects = [f"sub-{i:02d}" for i in range(1, n + 1)]
    design_svg = plot_design_matrix(design, names, subjects, tmp_dir / "design.svg").read_bytes()
    ari = ari_clusters(stat, mask, affine=affine, thresholds=[3.09, 4.0], alpha=0.05)
    null = np.abs(rng.standard_normal((1000, 200))).max(axis=1) + 0.5
    critical = float(np.quantile(null, 0.95))
    figs_parametric = (
        ReportFigure(
            "Orthogonal slices",
            slices_png(
                stat,
                affine,
                background_vol=anatomy,
                threshold=3.09,
                title="faces > houses · FDR q < 0.05",
                colorbar_label="z",
            ),  # fmt: skip
            caption="z map thresholded at |z| > 3.09 (FDR q < 0.05).",
            filename="contrast-faces_stat-z_desc-fdr_slices.png",
            text_px=MIN_TEXT_PX,
        ),
        ReportFigure(
            "Glass brain",
            glass_brain_png(
                stat,
                affine,
                threshold=3.09,
                outline_vol=mask,
                title="faces > houses · FDR q < 0.05",
            ),  # fmt: skip
            caption="Maximum-intensity projection of |z| > 3.09.",
            filename="contrast-faces_stat-z_desc-fdr_glassbrain.png",
            text_px=MIN_TEXT_PX,
        ),
    )
    table = ReportTable.from_dataframe(
        ari.table, title="ARI clusters", caption="TDP: lower bound at alpha = 0.05."
    )
    perm = ReportSection(
        "Permutation (FWE, max statistic)",
        facts=(("threshold", f"|z| > {critical:.3f}"), ("permutations", "1000")),
        figures=(
            ReportFigure(
                "Null distribution of the maximum",
                null_distribution_png(
                    null, float(np.abs(stat).max()), critical, stat_label="max |z|"
                ),  # fmt: skip
                caption="Observed maximum (red) and the 95% critical value (dashed).",
                text_px=MIN_TEXT_PX,
            ),
            ReportFigure(
                "ARI TDP map",
                slices_png(
                    ari.tdp_map,
                    affine,
                    background_vol=anatomy,
                    threshold=0.0,
                    colorbar_label="TDP",
                    title="ARI true discovery proportion",
                ),
                text_px=MIN_TEXT_PX,
            ),  # fmt: skip
        ),
        tables=(table,),
        warnings=("Only 1000 permutations: p-values below 0.001 are not resolved.",),
    )
    contrasts = tuple(
        ReportSection(
            f"Contrast: {label}",
            text=(" ".join(f"{w:+g}·{c}" for w, c in zip(weights, names, strict=True)),),
            subsections=(
                ReportSection("FDR (q < 0.05)", figures=figs_parametric),
                perm,
            ),
        )
        for label, weights in (("faces > houses", [1.0, 0, 0]), ("age", [0, 1.0, 0]))
    )
    model = json.dumps({"Name": "demo", "Nodes": [{"Level": "Dataset", "Model": {"X": names}}]},
                       indent=2)  # fmt: skip
    return ReportContent(
        title="bids-group report · node-groupLevel · model-demo <script>",
        command="bids-group /data/bids /data/out group --model model.json --mask 'a&b'",
        created="2024-01-01 12:00:00 UTC",
        versions=(("bids-group", "0.1.0"), ("numpy", np.__version__), ("python", "3.x")),
        summary=(("input maps", str(n)), ("mask voxels", f"{int(mask.sum()):,}")),
        sections=(
            ReportSection("Model as run", code=model),
            ReportSection(
                "Design",
                facts=(("condition number", f"{np.linalg.cond(design):.3g}"),),
                figures=(ReportFigure("Design matrix", design_svg, "image/svg+xml"),),
            ),
            ReportSection(
                "Mask",
                text=(f"{int(mask.sum()):,} voxels in the analysis mask.",),
                figures=(
                    ReportFigure(
                        "Mask outline",
                        mask_png(mask, anatomy, affine, title="mask"),
                        text_px=MIN_TEXT_PX,
                    ),
                ),  # fmt: skip
            ),
            *contrasts,
        ),
        warnings=("3 voxels had zero variance and were excluded.", "a <b> & c"),
    )


# --------------------------------------------------------------------------- figure tests


def _png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(io.BytesIO(data))


@pytest.fixture(scope="module")
def brain():
    return synthetic_brain(shape=(30, 36, 30), voxel=5.5)


def test_signed_mip_keeps_sign_of_largest_magnitude():
    values = np.zeros((3, 3, 3))
    values[0, 1, 2] = -5.0
    values[2, 1, 2] = 4.0
    values[1, 0, 0] = np.nan
    projection = signed_mip(values, axis=0)
    assert projection[1, 2] == -5.0 and projection[0, 0] == 0.0
    np.testing.assert_array_equal(signed_mip(values, 2)[:, 1], [-5.0, 0.0, 4.0])


def _changed_column_groups(image: np.ndarray, base: np.ndarray) -> list[float]:
    """Mean column of each horizontal group of pixels that differ from ``base``."""
    columns = np.flatnonzero(np.abs(image - base).sum(axis=(0, 2)) > 0.05)
    groups = np.split(columns, np.flatnonzero(np.diff(columns) > 20) + 1)
    return [float(g.mean()) for g in groups if g.size]


def test_brain_figures_are_pngs_and_neurological(brain):
    stat, mask, anatomy, affine = brain
    # One voxel on the subject's left (x < 0), one mirrored on the right: in the coronal and
    # axial panels the left one must be drawn further left (neurological convention); in the
    # sagittal panel both land on the same spot.
    i_left, i_right = 4, stat.shape[0] - 1 - 4
    assert (affine @ [i_left, 0, 0, 1])[0] < 0 < (affine @ [i_right, 0, 0, 1])[0]

    def draw(i=None):
        vol = np.zeros_like(stat)
        if i is not None:
            vol[i, 18, 15] = 9.0
        return _png(glass_brain_png(vol, affine, threshold=3.0, outline_vol=mask, vmax=10.0))

    blank = draw()
    image = draw(i_left)
    left = _changed_column_groups(image, blank)
    right = _changed_column_groups(draw(i_right), blank)
    assert len(left) == len(right) == 3, (left, right)
    assert left[0] == pytest.approx(right[0], abs=1.0)  # sagittal
    assert left[1] < right[1] and left[2] < right[2]  # coronal, axial
    # The same figure mirrored (flip the x axis of the affine) must look the same: display is
    # in world space, not voxel order.
    flipped = affine.copy()
    flipped[0, 0] *= -1
    flipped[0, 3] = -affine[0, 3]
    lateral = np.zeros_like(stat)
    lateral[i_left, 18, 15] = 9.0
    mirror = _png(
        glass_brain_png(lateral[::-1], flipped, threshold=3.0, outline_vol=mask[::-1], vmax=10.0)
    )
    np.testing.assert_allclose(mirror, image, atol=1e-6)
    for data in (
        slices_png(stat, affine, background_vol=anatomy, threshold=3.0, title="t"),
        slices_png(np.abs(stat), affine, background_vol=None, threshold=2.0, cut_coords=(0, 0, 0)),
        mask_png(mask, anatomy, affine, title="mask"),
        mask_png(mask, None, affine),
    ):
        assert 500 < _png(data).shape[1] <= 1000


def test_nothing_above_threshold_still_renders(brain):
    stat, mask, anatomy, affine = brain
    assert _png(slices_png(stat, affine, background_vol=anatomy, threshold=99.0)).size
    assert _png(glass_brain_png(stat, affine, threshold=99.0, outline_vol=mask)).size


def test_null_distribution_bars_and_lines_are_where_the_values_are():
    # 90 relabellings at 1.0 and 10 at 2.0: two bars, the first 9 times as tall; the critical
    # value (dashed orange) and the observed maximum (red) drawn at their x positions.
    null = np.r_[np.full(90, 1.0), np.full(10, 2.0)]
    image = _png(null_distribution_png(null, 3.0, 2.5, alpha=0.05, stat_label="max |z|"))
    plot = image[:280]  # above the axis labels and the legend (whose box has the bar colour)
    bars = np.all(np.abs(plot[..., :3] - np.array([143, 168, 200]) / 255) < 0.01, axis=2)
    columns = np.flatnonzero(bars.sum(axis=0) > 20)
    groups = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
    assert len(groups) == 2
    heights = [bars[:, g].sum(axis=0).max() for g in groups]
    assert heights[0] / heights[1] == pytest.approx(9.0, rel=0.03)
    red = np.flatnonzero(((image[..., 0] > 0.7) & (image[..., 1] < 0.1)).sum(axis=0) > 50)
    orange = np.flatnonzero(((image[..., 0] > 0.75) & (np.abs(image[..., 1] - 0.5) < 0.02)
                             & (image[..., 2] < 0.05)).sum(axis=0) > 50)  # fmt: skip
    # 10 bins of 0.1 from 1 to 2: the two bars are centred at 1.05 and 1.95 (0.9 apart), and
    # columns are linear in the value
    per_unit = (groups[1].mean() - groups[0].mean()) / 0.9
    assert red.mean() - orange.mean() == pytest.approx(0.5 * per_unit, abs=3)
    assert orange.mean() > groups[1].max() and red.mean() > orange.mean()


def test_figure_errors_name_the_problem(brain):
    stat, mask, anatomy, affine = brain
    with pytest.raises(DataError, match="background"):
        slices_png(stat, affine, background_vol=anatomy[:-1], threshold=3.0)
    with pytest.raises(DataError, match="empty"):
        mask_png(np.zeros_like(mask), None, affine)
    with pytest.raises(DataError, match="null"):
        null_distribution_png(np.array([]), 1.0, 1.0)


# --------------------------------------------------------------------------- HTML tests


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.ids: list[str] = []
        self.hrefs: list[str] = []
        self.scripts = 0
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "script":
            self.scripts += 1
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "a":
            self.hrefs.append(attrs["href"])
        if tag not in {"img", "meta", "br", "hr", "input", "link"}:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    content = build_demo_content(tmp_path_factory.mktemp("demo"))
    return content, render_report(content)


def _all_figures(sections):
    for section in sections:
        yield from section.figures
        yield from _all_figures(section.subsections)


def test_html_is_self_contained_and_well_formed(demo):
    content, page = demo
    parser = _Collector()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    figures = list(_all_figures(content.sections))
    assert len(parser.images) == len(figures) > 8
    for src, figure in zip(parser.images, figures, strict=True):
        assert src.startswith(f"data:{figure.mime};base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == figure.data
    assert parser.scripts == 0
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:|//)", page)
    assert "http://" not in page and "https://" not in page and "@import" not in page
    assert "url(" not in page
    # every navigation link points to an anchor on the page; anchors are unique
    assert len(parser.ids) == len(set(parser.ids))
    assert {h[1:] for h in parser.hrefs} <= set(parser.ids)


def test_html_escapes_text_and_shows_run_information(demo):
    content, page = demo
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "a &lt;b&gt; &amp; c" in page
    assert "--mask &#x27;a&amp;b&#x27;" in page
    for name, version in content.versions:
        assert name in page and version in page
    assert "Warnings raised during the run" in page
    assert page.count('class="warn"') >= 2


def test_table_from_dataframe_formats_cells():
    frame = pd.DataFrame({"id": [1, 2], "tdp": [0.123456, np.nan], "x": [-12.0, 3.5]})
    table = ReportTable.from_dataframe(frame, title="t")
    page = render_report(
        ReportContent("r", "cmd", "now", sections=(ReportSection("s", tables=(table,)),))
    )
    assert "<td>0.1235</td><td>-12</td>" in page and "<td>2</td><td></td><td>3.5</td>" in page
    empty = ReportTable("empty", ("a",), ())
    assert "none" in render_report(
        ReportContent("r", "c", "n", sections=(ReportSection("s", tables=(empty,)),))
    )


def test_summary_table_rows_link_to_their_method_sections():
    found = ResultSummary("faces", "FDR q < 0.05", 1234, 3, -5.125, (-40.0, -62.0, 8.0))
    none = ResultSummary("houses", "FDR q < 0.05", 0, 0)
    contrasts = tuple(
        ReportSection(f"Contrast {r.contrast}", subsections=(ReportSection(r.method, result=r),))
        for r in (found, none)
    )
    page = render_report(ReportContent("r", "cmd", "now", sections=contrasts))
    summary = page[page.index('<section id="summary"') : page.index("</table>")]
    assert summary.count("<tr") == 3  # header + one row per method
    assert (
        '<td>faces</td><td><a href="#contrast-faces--fdr-q-0-05">FDR q &lt; 0.05</a></td>'
        "<td>1,234</td><td>3</td><td>-5.12</td><td>-40, -62, 8</td>" in summary
    )
    assert '<a href="#contrast-houses--fdr-q-0-05">' in summary
    assert '<td colspan="4">nothing survives</td>' in summary
    assert 'id="contrast-faces--fdr-q-0-05"' in page and 'id="contrast-houses--fdr-q-0-05"' in page
    assert '<a href="#summary">Summary of results</a>' in page  # in the contents
    no_results = render_report(ReportContent("r", "c", "n", sections=(ReportSection("s"),)))
    assert 'id="summary"' not in no_results


def test_figures_are_never_shown_below_legible_size():
    png = png_bytes(np.zeros((30, 850, 3), np.uint8))
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="300pt" height="100pt"></svg>'
    figures = (ReportFigure("raster", png, text_px=17.0), ReportFigure("svg", svg, "image/svg+xml"))
    page = render_report(
        ReportContent("r", "c", "n", sections=(ReportSection("s", figures=figures),))
    )
    # 850 px with 17 px text: shrinks to 850 * 12 / 17 = 600 px at most; the SVG (12 px text at
    # its natural 300 pt = 400 px) not at all
    assert 'style="width:850px;min-width:600px" data-text-px="17"' in page
    assert 'style="width:400px;min-width:400px" data-text-px="12"' in page


def test_write_report_is_atomic_and_checked(tmp_path):
    content = ReportContent("r", "cmd", "now", sections=(ReportSection("s", text=("hello",)),))
    out = write_report(tmp_path / "report.html", content)
    assert out.read_text(encoding="utf-8") == render_report(content)
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    with pytest.raises(OutputError, match="does not exist"):
        write_report(tmp_path / "missing" / "report.html", content)


# --------------------------------------------------------------------------- browser test

_PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push('error: ' + e.message));
document.addEventListener('securitypolicyviolation',
  e => window.__errors.push('csp: ' + e.blockedURI));
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const net = performance.getEntriesByType('resource').map(r => r.name);
  // smallest computed font size of any visible text, and of any figure's text as shown
  let minFont = 1e9, minFontAt = '';
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const el = walker.currentNode.parentElement;
    const box = el.getBoundingClientRect();
    if (!walker.currentNode.textContent.trim() || box.width === 0) continue;
    const size = parseFloat(getComputedStyle(el).fontSize);
    if (size < minFont) { minFont = size; minFontAt = el.tagName + ': ' + el.textContent; }
  }
  const figureText = imgs.map(i => i.getBoundingClientRect().width / i.naturalWidth
                                     * parseFloat(i.dataset.textPx || '0'));
  // the summary table: its rows, and links that lead nowhere
  const summaryLinks = Array.from(document.querySelectorAll('#summary tbody a'));
  const deadLinks = summaryLinks.filter(a => !document.getElementById(a.hash.slice(1))).length;
  // sections where nothing survives: one line, no image or table (the permutation null excepted)
  const empty = Array.from(document.querySelectorAll('section.sub'))
    .filter(s => s.querySelector(':scope > p') &&
                 s.querySelector(':scope > p').textContent.startsWith('Nothing survives'));
  const emptyImages = empty.map(s => Array.from(s.querySelectorAll('img'))
    .filter(i => i.alt !== 'Permutation null distribution').length
    + s.querySelectorAll('table').length);
  const probe = document.createElement('pre');
  probe.id = 'probe';
  probe.textContent = 'PROBE' + JSON.stringify({images: imgs.length, broken: bad,
    errors: window.__errors, resources: net, minFont: minFont, minFontAt: minFontAt,
    figureText: figureText, pageWidth: document.documentElement.scrollWidth,
    windowWidth: window.innerWidth, summaryRows: summaryLinks.length, deadLinks: deadLinks,
    emptySections: empty.length, emptyImages: emptyImages}) + 'END';
  document.body.appendChild(probe);
});
</script>"""


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


def probe_page(page: str, tmp_path: Path, width: int) -> dict:
    """Load a copy of ``page`` with the probe script in headless Chromium ``width`` px wide."""
    # The CSP is relaxed only in this copy, to let the probe itself run.
    probed = page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
    probed = probed.replace("</body>", _PROBE + "</body>")
    path = tmp_path / f"probed{width}.html"
    path.write_text(probed, encoding="utf-8")
    result = _chromium(
        [f"--window-size={width},3000", "--virtual-time-budget=10000", "--dump-dom",
         path.as_uri()], tmp_path / "profile",
    )  # fmt: skip
    match = re.search(r"PROBE(.*?)END", result.stdout)
    assert match, f"no probe output; stderr:\n{result.stderr[-2000:]}"
    assert [line for line in result.stderr.splitlines() if "CONSOLE" in line] == []
    return json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def check_legible(probe: dict, width: int) -> None:
    """Text >= 12 CSS px, in the page and in every figure as shown; no sideways page scroll."""
    assert probe["minFont"] >= 12.0, probe["minFontAt"]
    assert probe["figureText"] and min(probe["figureText"]) >= 12.0 - 1e-6, probe["figureText"]
    assert probe["windowWidth"] == width and probe["pageWidth"] <= width


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(demo, tmp_path):
    _, page = demo
    report = tmp_path / "report.html"
    report.write_text(page, encoding="utf-8")
    for width in (1400, 800):
        probe = probe_page(page, tmp_path, width)
        assert probe["images"] == page.count("<img ") and probe["images"] > 8
        assert probe["broken"] == 0
        assert probe["errors"] == []
        assert [r for r in probe["resources"] if not r.startswith("data:")] == []
        check_legible(probe, width)
    # The untouched report: a screenshot to look at (kept under tmp_path).
    shot = tmp_path / "report.png"
    result = _chromium(
        ["--window-size=1400,2000", f"--screenshot={shot}", report.as_uri()], tmp_path / "profile"
    )
    assert shot.exists(), result.stderr[-2000:]
    pixels = _png(shot.read_bytes())
    assert pixels.shape[:2] == (2000, 1400) and pixels.std() > 0.05
    assert [line for line in result.stderr.splitlines() if "CONSOLE" in line] == []


if __name__ == "__main__":  # python tests/test_report.py demo.html
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "report_demo.html")
    print(write_report(target, build_demo_content(target.parent)))
