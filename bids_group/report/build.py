"""Assemble the report of a run: figures of each thresholded map, sections, the whole content.

Pure functions from the run's arrays and settings to :class:`~bids_group.report.html.ReportSection`
objects; the pipeline calls them as results come and hands the sections to
:func:`report_content`. The only writers are :func:`write_figures` (the PNG files beside the
maps) and :func:`bids_group.report.html.write_report`.

Background of the brain figures (:func:`report_background`): the MNI152 template shipped with the
package (:mod:`bids_group.templates`) when the maps are in an MNI152 space and the analysis mask
lies in the template's brain; otherwise the **mean of the absolute values of the input maps** over
the mask (:func:`background_volume`), which shows the analysed volume itself (the signed mean is
useless as a background since positive and negative effects cancel). Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import logging
import platform
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bids_group.images import unmask
from bids_group.inference.clusters import label_clusters
from bids_group.memory import TiledMaps, iter_tiles
from bids_group.report._common import MIN_TEXT_PX
from bids_group.report.html import (
    ReportContent,
    ReportFigure,
    ReportSection,
    ReportTable,
    ResultSummary,
)
from bids_group.streamed_fit import StreamedOls
from bids_group.templates import TEMPLATE_SPACE, mni_space, template_on_grid

log = logging.getLogger(__name__)

#: The template is the background only if at least this share of the analysis mask lies in its
#: brain (a space label alone does not prove that the grid is in MNI millimetres).
MIN_MASK_IN_TEMPLATE = 0.5
#: Cluster tables longer than this are cut in the report (the TSV has every row).
MAX_TABLE_ROWS = 40
#: Packages whose versions the report lists.
_PACKAGES = ("bids-group", "numpy", "scipy", "pandas", "nibabel", "pybids", "matplotlib", "click")


# --------------------------------------------------------------------------- run-level helpers


class _WarningRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # a malformed record must not break the run
            self.handleError(record)


@contextlib.contextmanager
def collect_warnings(loggers: Sequence[str] = ("bids_group", "py.warnings")) -> Iterator[list[str]]:
    """Collect the WARNING (and worse) messages logged during the block, in order.

    Yields
    ------
    list of str
        Filled while the block runs; the handler is removed on exit.
    """
    handler = _WarningRecords()
    targets = [logging.getLogger(name) for name in loggers]
    for target in targets:
        target.addHandler(handler)
    try:
        yield handler.messages
    finally:
        for target in targets:
            target.removeHandler(handler)


def software_versions() -> tuple[tuple[str, str], ...]:
    """(name, version) of Python and the packages bids-group uses."""
    versions = [("python", platform.python_version())]
    for name in _PACKAGES:
        try:
            versions.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    return tuple(versions)


def now_utc() -> str:
    """Current UTC date and time, e.g. ``2024-05-01 12:00 UTC``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def background_volume(data: np.ndarray | TiledMaps | StreamedOls, mask: np.ndarray) -> np.ndarray:
    """Mean of ``|maps|`` over the maps, on the grid (0 outside the mask).

    Parameters
    ----------
    data : ndarray of shape (n_maps, n_voxels), float, TiledMaps or StreamedOls
        In-mask values (``MaskedData.data``), read one voxel tile at a time; or a streamed
        fit's mean (summed while the maps were decoded).
    mask : ndarray of shape (nx, ny, nz), bool

    Returns
    -------
    ndarray of shape mask.shape, float32
    """
    if isinstance(data, StreamedOls):
        if data.mean_abs is None:
            raise ValueError("the streamed fit did not sum |maps| (StreamPlan.background)")
        return unmask(data.mean_abs, mask)
    mean = np.empty(data.shape[1], dtype=np.float64)
    for block, tile in iter_tiles(data):
        mean[block] = np.nanmean(np.abs(tile), axis=0, dtype=np.float64)  # NaN: no data
    return unmask(mean, mask)


@dataclass(frozen=True)
class Background:
    """What the brain figures of one analysis are drawn over, and the caption that says so.

    Attributes
    ----------
    volume : ndarray of shape (nx, ny, nz)
        Grey levels of the slices and mask figures, on the data grid (0: black).
    outline : ndarray of shape (nx, ny, nz), bool
        The glass brain's silhouette.
    note : str
        The caption's sentence on the background, e.g. ``"Background: the MNI152 template ..."``.
    outline_note : str
        The glass-brain caption's sentence on the silhouette.
    """

    volume: np.ndarray
    outline: np.ndarray
    note: str
    outline_note: str


def report_background(
    data: np.ndarray | TiledMaps | StreamedOls,
    mask: np.ndarray,
    affine: np.ndarray,
    *,
    space: str | None,
) -> Background:
    """The MNI152 template on the data grid if the maps are in MNI space, else the data's own.

    The template is used when ``space`` names an MNI152 space
    (:func:`bids_group.templates.mni_space`) and at least :data:`MIN_MASK_IN_TEMPLATE` of the
    analysis mask falls in the template's brain once the template is resampled to the data grid
    through the maps' affine. Otherwise the background is :func:`background_volume` and the
    silhouette is the mask, and the caption says why.

    Parameters
    ----------
    data : ndarray of shape (n_maps, n_voxels), TiledMaps or StreamedOls
        In-mask values (``MaskedData.data``). A streamed fit of maps in an MNI152 space sums
        no ``|maps|``: should the mask fall outside the template, the mask is the background.
    mask : ndarray of shape (nx, ny, nz), bool
    affine : ndarray of shape (4, 4)
    space : str or None
        The ``space`` entity shared by the maps (None when absent or mixed).

    Returns
    -------
    Background
    """
    if mni_space(space):
        t1, brain = template_on_grid(affine, mask.shape)
        share = float(brain[mask].mean()) if mask.any() else 0.0
        if share >= MIN_MASK_IN_TEMPLATE:
            note = (f"Background: the MNI152 template ({TEMPLATE_SPACE}, ICBM 2009a nonlinear "
                    f"symmetric, 2 mm, shipped with bids-group), since the maps are in space "
                    f"{space}.")  # fmt: skip
            return Background(t1, brain, note, "Silhouette: the MNI152 template's brain.")
        why = f"only {share:.0%} of the analysis mask lies in the MNI152 template's brain"
    elif space:
        why = f"the maps' space {space} is not an MNI152 space"
    else:
        why = "the maps name no MNI152 space (no shared space-MNI152... entity)"
    if isinstance(data, StreamedOls) and data.mean_abs is None:  # maps in MNI space: not summed
        note = f"Background: the analysis mask, since {why} (the fit was streamed)."
        return Background(mask.astype(np.float32), mask, note, "Silhouette: the analysis mask.")
    log.info("report background: mean |input maps|, since %s", why)
    note = f"Background: mean of |input maps| over the analysis mask, since {why}."
    return Background(background_volume(data, mask), mask, note, "Silhouette: the analysis mask.")


def write_figures(folder: Path, figures: Sequence[ReportFigure]) -> list[Path]:
    """Write each figure's bytes to ``folder / figure.filename``; return the paths."""
    paths = []
    for figure in figures:
        path = Path(folder) / figure.filename
        path.write_bytes(figure.data)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- figures


def map_figures(
    volume: np.ndarray,
    affine: np.ndarray,
    *,
    mask: np.ndarray,
    background: Background,
    threshold: float | None,
    label: str,
    title: str,
    filenames: tuple[str, str],
    vmax: float | None = None,
    shown: str | None = None,
) -> tuple[ReportFigure, ReportFigure]:
    """Orthogonal slices and glass brain of a thresholded map.

    Parameters
    ----------
    volume : ndarray of shape (nx, ny, nz)
        The thresholded map (0 below threshold, NaN or 0 outside the mask).
    affine : ndarray of shape (4, 4)
    mask : ndarray of shape (nx, ny, nz), bool
    background : Background
    threshold : float or None
        In the units of ``label`` (e.g. z); None shows every non-zero voxel.
    label : str
        Units of the map (``"z"``, ``"TDP"``).
    title : str
    filenames : (str, str)
        Names of the slices and glass-brain files.
    vmax : float, optional
    shown : str, optional
        What is shown, for the captions (e.g. ``"|z| > 3.09"``); default ``label > threshold``.

    Returns
    -------
    (ReportFigure, ReportFigure)
    """
    from bids_group.report.raster import glass_brain_png, slices_png  # matplotlib: only here

    clean = np.where(mask, np.nan_to_num(volume), 0.0)
    units = shown or (f"{label} > {threshold:.3g}" if threshold is not None else f"{label} > 0")
    slices = slices_png(clean, affine, background_vol=background.volume, threshold=threshold,
                        title=title, colorbar_label=label, vmax=vmax)  # fmt: skip
    glass = glass_brain_png(clean, affine, threshold=threshold, outline_vol=background.outline,
                            title=title, colorbar_label=label, vmax=vmax)  # fmt: skip
    return (
        ReportFigure(
            "Orthogonal slices at the peak",
            slices,
            "image/png",
            f"Shown: {units}. {background.note}",
            filenames[0],
            MIN_TEXT_PX,
        ),  # fmt: skip
        ReportFigure(
            "Glass brain (maximum-intensity projection)",
            glass,
            "image/png",
            f"Shown: {units}. {background.outline_note}",
            filenames[1],
            MIN_TEXT_PX,
        ),  # fmt: skip
    )


def unthresholded_figure(
    volume: np.ndarray,
    affine: np.ndarray,
    *,
    mask: np.ndarray,
    background: Background,
    label: str,
    cut: tuple[float, float, float],
    title: str,
    filename: str,
    caption: str,
) -> ReportFigure:
    """Orthogonal slices of a map with no threshold (every voxel of the mask coloured).

    ``cut``: the slices' world coordinates (mm), e.g. the peak ``|z|``, so the z and effect
    figures of a contrast show the same place.
    """
    from bids_group.report.raster import slices_png

    clean = np.where(mask, np.nan_to_num(volume), 0.0)
    data = slices_png(clean, affine, background_vol=background.volume, threshold=None,
                      title=title, colorbar_label=label, cut_coords=cut)  # fmt: skip
    return ReportFigure(f"{label} map, unthresholded", data, "image/png",
                        f"{caption} {background.note}", filename, MIN_TEXT_PX)  # fmt: skip


def null_figure(
    null_max: np.ndarray,
    observed_max: float,
    critical: float,
    *,
    alpha: float,
    stat_label: str,
    title: str,
    source: str,
) -> ReportFigure:
    """The permutation null distribution of a maximum, with the observed and critical values.

    ``source`` names the TSV holding the same null (so readers can audit or merge it).
    """
    from bids_group.report.histogram import null_distribution_png

    data = null_distribution_png(null_max, observed_max, critical, alpha=alpha,
                                 stat_label=stat_label, title=title)  # fmt: skip
    caption = (
        f"Null distribution of the {stat_label} over {np.asarray(null_max).size:,} relabellings "
        f"(the unpermuted data included). Results above the critical value have FWER p <= "
        f"{alpha:g}. Values: {source}"
    )
    return ReportFigure(
        "Permutation null distribution", data, "image/png", caption, "", MIN_TEXT_PX
    )


def mask_figure(mask: np.ndarray, background: Background, affine: np.ndarray, *, filename: str):
    """The analysis mask outlined over the background, titled with its voxel count."""
    from bids_group.report.raster import mask_png

    n_voxels = int(np.count_nonzero(mask))
    data = mask_png(mask, background.volume, affine, title=f"Analysis mask: {n_voxels:,} voxels")
    return ReportFigure("Analysis mask", data, "image/png",
                        f"Red: outline of the {n_voxels:,} voxels analysed. {background.note}",
                        filename, MIN_TEXT_PX)  # fmt: skip


# --------------------------------------------------------------------------- tables


def _table(frame: pd.DataFrame, *, title: str, caption: str, drop=()) -> ReportTable:
    frame = frame.drop(columns=[c for c in drop if c in frame.columns])
    if len(frame) > MAX_TABLE_ROWS:
        caption += f" First {MAX_TABLE_ROWS} of {len(frame)} rows (all in the TSV file)."
        frame = frame.iloc[:MAX_TABLE_ROWS]
    return ReportTable.from_dataframe(frame, title=title, caption=caption)


def cluster_report_table(
    table: pd.DataFrame,
    *,
    filename: str,
    permutation: pd.DataFrame | None = None,
    p_fwe: str | None = None,
) -> ReportTable:
    """The cluster table (peaks and subpeaks) for the report, with what p-values it can have.

    Parameters
    ----------
    table : DataFrame
        :func:`bids_group.inference.clusters.cluster_table`.
    filename : str
    permutation : DataFrame, optional
        The permutation clusters of the same contrast
        (:func:`bids_group.outputs.permutation.cluster_inference_table`): a cluster of ``table``
        with the same size and peak gets its ``p_fwe_size`` (the permutation null of the largest
        cluster applies to it, as it is the same cluster).
    p_fwe : str, optional
        Permutation peak tables: the method of their ``peak_p_fwe`` column.
    """
    caption = "Peak coordinates in mm; peak_p uncorrected."
    if p_fwe is not None:
        caption += f" peak_p_fwe: {p_fwe} p at the peak."
    elif permutation is not None:
        table = table.assign(p_fwe_size=_permutation_cluster_p(table, permutation))
        caption += (
            " p_fwe_size: cluster-size FWER p from the permutation test of this contrast, for "
            "the clusters it formed identically (blank: the permutation's cluster-forming "
            "threshold made another cluster)."
        )
    else:
        caption += (
            " No cluster-level p-value: bids-group computes no random-field theory p; "
            "--permutation cluster gives cluster-size FWER p-values."
        )
    return _table(table, title="Clusters", caption=f"{caption} File: {filename}", drop=("cluster",))


def _permutation_cluster_p(table: pd.DataFrame, permutation: pd.DataFrame) -> list:
    """``p_fwe_size`` of the permutation cluster with the same size and peak, per cluster row."""

    def key(x, y, z, size):
        return (round(float(x), 3), round(float(y), 3), round(float(z), 3), int(size))

    found = {
        key(r.peak_x, r.peak_y, r.peak_z_mm, r.size_voxels): r.p_fwe_size
        for r in permutation.itertuples()
    }
    return [
        None
        if pd.isna(r.size_voxels)
        else found.get(key(r.peak_x, r.peak_y, r.peak_z, r.size_voxels))
        for r in table.itertuples()
    ]


def permutation_cluster_report_table(table: pd.DataFrame, *, filename: str) -> ReportTable:
    """Clusters above the cluster-forming height with their size and mass FWER p-values."""
    caption = (
        "Every cluster above the cluster-forming height, largest first; p_fwe_size and "
        f"p_fwe_mass are family-wise error corrected by permutation. Coordinates in mm. "
        f"File: {filename}"
    )
    return _table(table, title="Permutation clusters", caption=caption)


def ari_report_table(table: pd.DataFrame, *, alpha: float, filename: str) -> ReportTable:
    """The ARI table: per threshold and cluster, the lower bounds of true discoveries and TDP."""
    caption = (
        f"true_discoveries and tdp are lower bounds holding simultaneously for all clusters, "
        f"with {1 - alpha:.0%} confidence (alpha = {alpha:g}). Coordinates in mm. File: {filename}"
    )
    return _table(table, title="ARI clusters", caption=caption)


def weights_table(weights: np.ndarray, columns: Sequence[str], test: str) -> ReportTable:
    """Contrast weights, one row per row of the contrast (F: several)."""
    rows = np.atleast_2d(weights)
    frame = pd.DataFrame(rows, columns=list(columns))
    frame.insert(0, "row", [f"{test} row {i + 1}" for i in range(len(rows))] if len(rows) > 1
                 else [test])  # fmt: skip
    return ReportTable.from_dataframe(frame, title="Weights")


def design_tables(summary: Mapping[str, Any]) -> tuple[ReportTable, ...]:
    """Correlation of the design columns and their variance inflation factors."""
    columns = list(summary["columns"])
    corr = pd.DataFrame(np.asarray(summary["correlation"], dtype=float), columns=columns)
    corr.insert(0, "column", columns)
    vif = pd.DataFrame({"column": columns, "VIF": [summary["vif"][c] for c in columns]})
    return (
        ReportTable.from_dataframe(corr, title="Correlation of the design columns",
                                   caption="Pearson correlation (blank: constant column).",
                                   float_digits=3),  # fmt: skip
        ReportTable.from_dataframe(vif, title="Variance inflation factors", float_digits=3,
                                   caption="1 / (1 - R²) of each column on the others; "
                                   "above 10 the column is nearly collinear with the others."),
    )  # fmt: skip


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class MethodReport:
    """One correction method of one contrast, as the report shows it.

    Attributes
    ----------
    title : str
        E.g. ``"uncorrected |z| > 3.09, clusters >= 20 voxels"``.
    facts : tuple of (str, str)
        Threshold (with its units), alpha, surviving voxels...
    figures : tuple of ReportFigure
    table : ReportTable or None
    null : ReportFigure or None
        Permutation methods: the null distribution of the maximum with the observed value and
        the critical threshold (:func:`bids_group.report.histogram.null_distribution_png`). The
        hook for permutation inference: set it and the figure appears first in the section.
    """

    title: str
    facts: tuple[tuple[str, str], ...] = ()
    figures: tuple[ReportFigure, ...] = ()
    table: ReportTable | None = None
    null: ReportFigure | None = None
    #: When nothing survives: one line saying so (see :func:`nothing_survives`), shown instead
    #: of empty map figures.
    empty: str | None = None
    #: What survives (:func:`survivors`), for the summary table at the top of the report.
    survivors: Survivors | None = None

    def section(self, contrast: str = "") -> ReportSection:
        """This method's part of the contrast section (with its summary row when known)."""
        figures = ((self.null,) if self.null is not None else ()) + self.figures
        tables = (self.table,) if self.table is not None else ()
        text = (self.empty,) if self.empty else ()
        result = None
        if self.survivors is not None:
            s = self.survivors
            result = ResultSummary(contrast, self.title, s.voxels, s.clusters, s.peak_z, s.peak_mm)
        return ReportSection(
            self.title, text=text, facts=self.facts, figures=figures, tables=tables, result=result
        )


@dataclass(frozen=True)
class Survivors:
    """Surviving voxels of one method: count, clusters and the peak (see :func:`survivors`)."""

    voxels: int
    clusters: int
    peak_z: float | None
    peak_mm: tuple[float, float, float] | None


def survivors(z_vol: np.ndarray, affine: np.ndarray, *, connectivity: int) -> Survivors:
    """Count and locate the surviving voxels of a method.

    Parameters
    ----------
    z_vol : ndarray of shape (nx, ny, nz), float
        z at the surviving voxels, 0 (or NaN) elsewhere.
    affine : ndarray of shape (4, 4)
    connectivity : {6, 18, 26}
        Clusters are the connected components of the positive and of the negative survivors.

    Returns
    -------
    Survivors
        Peak: the survivor of largest ``|z|`` (first in voxel order on ties), in mm.

    >>> vol = np.zeros((4, 1, 1)); vol[0, 0, 0], vol[1, 0, 0], vol[3, 0, 0] = 3.5, -4.0, 3.2
    >>> survivors(vol, np.eye(4), connectivity=26)
    Survivors(voxels=3, clusters=3, peak_z=-4.0, peak_mm=(1.0, 0.0, 0.0))
    """
    z = np.nan_to_num(np.asarray(z_vol, dtype=np.float64))
    n_voxels = int(np.count_nonzero(z))
    if not n_voxels:
        return Survivors(0, 0, None, None)
    n_clusters = sum(label_clusters(side, connectivity)[1] for side in (z > 0, z < 0))
    ijk = np.unravel_index(int(np.argmax(np.abs(z))), z.shape)
    xyz = np.asarray(affine, dtype=np.float64)[:3] @ np.array([*ijk, 1.0])
    mm = tuple(float(c) + 0.0 for c in xyz)
    return Survivors(n_voxels, int(n_clusters), float(z[ijk]), mm)


def peak_text(
    values: np.ndarray, mask: np.ndarray, affine: np.ndarray, *, two_sided: bool, label: str = "z"
) -> str:
    """Where the (unthresholded) map peaks, e.g. ``"peak |z| 2.71 at (-40, -62, -14) mm"``.

    Parameters
    ----------
    values : ndarray of shape (n_voxels,)
        In-mask values, in the order of ``mask``'s True voxels.
    mask : ndarray of shape (nx, ny, nz), bool
    affine : ndarray of shape (4, 4)
    two_sided : bool
        Peak of ``|values|`` (the signed value is printed) or of ``values``.

    >>> mask = np.zeros((2, 2, 2), bool); mask[0, 0, :] = True
    >>> peak_text(np.array([1.5, -2.25]), mask, np.eye(4), two_sided=True)
    'peak |z| 2.25 (z = -2.25) at (0, 0, 1) mm'
    >>> peak_text(np.array([1.5, -2.25]), mask, np.eye(4), two_sided=False)
    'peak z 1.5 at (0, 0, 0) mm'
    """
    values = np.asarray(values, dtype=np.float64)
    finite = np.where(np.isfinite(values), values, np.nan)
    if values.size == 0 or np.all(np.isnan(finite)):
        return f"no finite {label} value in the mask"
    index = int(np.nanargmax(np.abs(finite) if two_sided else finite))
    voxel = np.argwhere(mask)[index]
    xyz = affine[:3, :3] @ voxel + affine[:3, 3]
    where = "(" + ", ".join(f"{c:.0f}" for c in xyz + 0.0) + ") mm"
    value = values[index]
    if two_sided:
        sign = f" ({label} = {value:.3g})" if value < 0 else ""
        return f"peak |{label}| {abs(value):.3g}{sign} at {where}"
    return f"peak {label} {value:.3g} at {where}"


def nothing_survives(criterion: str, peak: str) -> str:
    """The one line a method gets in the report when no voxel passes it.

    >>> nothing_survives("|z| > 3.09", "peak |z| 2.7 (z = -2.7) at (0, 0, 0) mm")
    'Nothing survives |z| > 3.09; peak |z| 2.7 (z = -2.7) at (0, 0, 0) mm.'
    """
    return f"Nothing survives {criterion}; {peak}."


def contrast_section(
    label: str,
    *,
    name: str,
    weights: np.ndarray,
    columns: Sequence[str],
    test: str,
    dof: Sequence[float],
    methods: Sequence[MethodReport],
    figures: Sequence[ReportFigure] = (),
) -> ReportSection:
    """A contrast: its weights, its unthresholded maps, then one sub-part per method."""
    dof_text = ", ".join(f"{d:g}" for d in dof)
    parts = [m.section(label) for m in methods]
    return ReportSection(
        f"Contrast {label}",
        facts=(("name in the model", name), ("test", f"{test} ({dof_text} degrees of freedom)")),
        tables=(weights_table(weights, columns, test),),
        figures=tuple(figures),
        subsections=tuple(parts),
    )


def analysis_sections(
    title: str,
    *,
    facts: Sequence[tuple[str, str]],
    design_svg: bytes,
    design_filename: str,
    design_summary: Mapping[str, Any],
    mask: ReportFigure,
    contrasts: Sequence[ReportSection],
    participants: Sequence[str] = (),
    figures: Sequence[ReportFigure] = (),
    notes: Sequence[str] = (),
) -> tuple[ReportSection, ...]:
    """The model of one GroupBy group (design, mask) followed by its contrasts' sections.

    The contrasts come as top-level sections (so each has its own entry in the contents).
    ``participants``: the subjects whose maps the model used (listed in full); ``figures``: more
    figures of the model (e.g. the tau² map of a mixed-effects model); ``notes``: lines of text
    (e.g. instead of an empty figure).
    """
    cond = design_summary["condition_number"]
    design_facts = (
        ("condition number", f"{cond:.3g}" if np.isfinite(cond) else "inf (rank deficient)"),
        ("rank", f"{design_summary['rank']} of {design_summary['n_columns']} columns"),
    )
    design = ReportFigure("Design matrix", design_svg, "image/svg+xml",
                          "Each column scaled to max |value| = 1.", design_filename)  # fmt: skip
    listed = ", ".join(participants)
    text = (f"Participants ({len(participants)}): {listed}.",) if participants else ()
    text += tuple(notes)
    model = ReportSection(
        title,
        text=text,
        facts=(*facts, *design_facts),
        figures=(design, mask, *figures),
        tables=design_tables(design_summary),
    )
    return (model, *contrasts)


def inference_facts(inference: Any) -> tuple[tuple[str, str], ...]:
    """The run's inference settings as (name, value) pairs."""
    settings = vars(inference)
    facts = [
        ("height control", str(settings["height_control"])),
        ("alpha", "—" if settings["height_control"] == "none" else f"{settings['alpha']:g}"),
    ]
    if settings.get("threshold") is not None:
        facts.append(("threshold", f"z > {settings['threshold']:g}"))
    facts += [
        ("cluster extent", f"{settings['cluster_threshold']} voxels"),
        ("sides", "two-sided (t contrasts)" if settings["two_sided"] else "one-sided"),
        ("connectivity", str(settings["connectivity"])),
    ]
    if settings.get("smoothing_fwhm"):
        facts.append(("smoothing", f"{settings['smoothing_fwhm']:g} mm FWHM"))
    if settings.get("ari"):
        thresholds = ", ".join(f"{t:g}" for t in settings["ari_thresholds"])
        facts.append(("ARI", f"z thresholds {thresholds}; alpha {settings['ari_alpha']:g}"))
    return tuple(facts)


def report_content(
    *,
    title: str,
    command: str,
    summary: Sequence[tuple[str, str]],
    model_json: str,
    inference: Any,
    sections: Sequence[ReportSection],
    warnings: Sequence[str],
    created: str | None = None,
) -> ReportContent:
    """The whole report: run facts, model as run, inference settings, every analysis."""
    head = (
        ReportSection("Model as run", code=model_json),
        ReportSection("Inference settings", facts=inference_facts(inference)),
    )
    return ReportContent(
        title=title,
        command=command,
        created=created or now_utc(),
        versions=software_versions(),
        summary=tuple(summary),
        sections=(*head, *sections),
        warnings=tuple(warnings),
    )
