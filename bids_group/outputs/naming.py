"""Output file and folder names: entity order, allowed values, and pure name builders.

Every name bids-group writes is built here, so the layout has one home::

    OUT_DIR/dataset_description.json
    OUT_DIR/README.md
    OUT_DIR/.bidsignore
    OUT_DIR/model-<label>_smdl.json
    OUT_DIR/model-<label>_report.html
    OUT_DIR/node-<Node>/[task-<t>_][space-<s>_]contrast-<c>_stat-<stat>[_desc-<d>]_statmap.nii.gz
    OUT_DIR/node-<Node>/[task-<t>_][space-<s>_]contrast-<c>_stat-<stat>[_desc-<d>]_clusters.tsv
    OUT_DIR/node-<Node>/[task-<t>_][space-<s>_]contrast-<c>_stat-<t|F>_nulldist.tsv
    OUT_DIR/node-<Node>/[task-<t>_][space-<s>_]contrast-<c>_stat-<stat>_desc-<d>_slices.png
    OUT_DIR/node-<Node>/[task-<t>_][space-<s>_]contrast-<c>_stat-<stat>_desc-<d>_glassbrain.png
    OUT_DIR/node-<Node>/[task-<t>_][space-<s>_][contrast-<in>_]design.tsv / design.svg
    OUT_DIR/node-<Node>/[task-<t>_][space-<s>_][contrast-<in>_]mask.nii.gz / mask.png

Every file with a JSON sidecar has it beside it with the same stem (:func:`sidecar_name`).

Entity values must be alphanumeric (``[A-Za-z0-9]+``). Turning free text into such a label is
done upstream (contrast and node names); here a non-alphanumeric value is a programming error
and raises ``ValueError``.

Statistics (``stat-<stat>``), see :data:`STATS`:

====================  =================================================================
``effect``            contrast estimate ``c @ beta`` (t contrasts)
``variance``          variance of the contrast estimate (t contrasts)
``t``                 Student t statistic
``F``                 Fisher F statistic
``z``                 z score with the same upper-tail p as the t / F statistic
``p``                 one-sided upper-tail p of the t / F statistic
``logp``              ``-log10(p)`` (permutation inference)
``tfce``              threshold-free cluster enhancement score
``tdp``               ARI lower bound of the true discovery proportion of the voxel's cluster
``rsquared``          R^2 of the model (model-level map, no group contrast)
``residualvariance``  residual variance ``RSS / dof`` of the model (model-level map)
``errorts``           residuals, one volume per input map (``--write-residuals``; nilearn's name)
``predicted``         fitted values, one volume per input map (``--write-residuals``)
``tau2``              between-subject variance of a mixed-effects model (model-level map)
``dof``               residual degrees of freedom per voxel, where they differ (model-level)
``nmaps``             input maps with data at the voxel (``--min-coverage``; model-level)
====================  =================================================================

``desc`` labels of thresholded maps, built by :func:`desc_label` (``method`` -> label):

=======================  =======================  ================================================
method                   desc label               meaning
=======================  =======================  ================================================
``fpr``                  ``fpr``                  uncorrected: p < alpha per voxel
``fdr``                  ``fdr``                  Benjamini-Hochberg false discovery rate < alpha
``bonferroni``           ``bonferroni``           Bonferroni family-wise error < alpha
``none``                 ``uncorrected``          a z threshold given directly by the user
``permVoxel``            ``permVoxel``            permutation max-statistic (voxel) FWE
``permUncorrected``      ``permUncorrected``      permutation voxelwise p, uncorrected
``permCluster``          ``permCluster``          permutation cluster table (size and mass FWE)
``permClusterSize``      ``permClusterSize``      permutation cluster-size FWE
``permClusterMass``      ``permClusterMass``      permutation cluster-mass FWE
``permTfce``             ``permTfce``             permutation TFCE FWE
``permTfceUncorrected``  ``permTfceUncorrected``  permutation TFCE p, uncorrected
``ari``                  ``ari``                  all-resolutions inference (true discovery prop.)
=======================  =======================  ================================================

When ``alpha`` is passed, its decimal digits after ``0.`` are appended (``fdr`` at 0.05 ->
``fdr05``, ``fpr`` at 0.001 -> ``fpr001``); when ``cluster_threshold`` > 0, ``K<k>`` is appended
(``fpr001K10``: clusters of at least 10 voxels). The exact settings are always in the sidecar.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

#: Order of the entities in every file name (BIDS: entities in a fixed order, suffix last).
ENTITY_ORDER: tuple[str, ...] = ("task", "space", "contrast", "stat", "desc")

#: ``stat-`` values and what they mean. Add new statistics here (and only here).
STATS: Mapping[str, str] = {
    "effect": "contrast estimate (c @ beta)",
    "variance": "variance of the contrast estimate",
    "t": "Student t statistic",
    "F": "Fisher F statistic",
    "z": "z score with the same upper-tail p as the t or F statistic",
    "p": "one-sided upper-tail p-value of the t or F statistic",
    "logp": "-log10 of the p-value",
    "tfce": "threshold-free cluster enhancement score",
    "tdp": "lower bound of the true discovery proportion of the voxel's cluster (ARI)",
    "rsquared": "coefficient of determination R^2 of the model",
    "residualvariance": "residual variance of the model (RSS / residual degrees of freedom)",
    "errorts": "residuals of the model, one volume per input map",
    "predicted": "fitted values of the model, one volume per input map",
    "tau2": "between-subject variance tau^2 of a mixed-effects model",
    "dof": "residual degrees of freedom per voxel",
    "nmaps": "number of input maps with data at the voxel (per-voxel missing data)",
}

#: ``desc-`` labels of thresholded maps (see the module docstring for the table).
DESC_LABELS: Mapping[str, str] = {
    "fpr": "fpr",
    "fdr": "fdr",
    "bonferroni": "bonferroni",
    "none": "uncorrected",
    "permVoxel": "permVoxel",
    "permUncorrected": "permUncorrected",
    "permCluster": "permCluster",
    "permClusterSize": "permClusterSize",
    "permClusterMass": "permClusterMass",
    "permTfce": "permTfce",
    "permTfceUncorrected": "permTfceUncorrected",
    "ari": "ari",
}

#: Methods whose threshold is set by a level ``alpha`` (the others take a raw threshold).
_ALPHA_FREE_METHODS = frozenset({"none"})

STATMAP_SUFFIX = "statmap"
CLUSTERS_SUFFIX = "clusters"
NULL_DISTRIBUTION_SUFFIX = "nulldist"
DESIGN_SUFFIX = "design"
MASK_SUFFIX = "mask"
MODEL_SUFFIX = "smdl"
REPORT_SUFFIX = "report"
#: Suffixes of the figures written beside a thresholded map (one PNG each).
FIGURE_SUFFIXES: tuple[str, ...] = ("slices", "glassbrain")
DATASET_DESCRIPTION = "dataset_description.json"
#: The derivative's README (the BIDS validator warns when a dataset has none).
README = "README.md"
#: Files the BIDS validator must skip: the statistical-derivatives layout (BEP041) is not yet in
#: the BIDS specification, see :data:`BIDSIGNORE_PATTERNS`.
BIDSIGNORE = ".bidsignore"
#: What ``.bidsignore`` lists: every name above except ``dataset_description.json`` and the README.
BIDSIGNORE_PATTERNS: tuple[str, ...] = (
    "/node-*",
    f"/model-*_{MODEL_SUFFIX}.json",
    f"/model-*_{REPORT_SUFFIX}.html",
)

_LABEL_RE = re.compile(r"[A-Za-z0-9]+")
_EXTENSION_RE = re.compile(r"(\.[A-Za-z0-9]+)+")


def is_label(value: str) -> bool:
    """Whether ``value`` is a valid BIDS label (non-empty, alphanumeric).

    >>> is_label("faceGtHouse"), is_label("face-house"), is_label("")
    (True, False, False)
    """
    return isinstance(value, str) and _LABEL_RE.fullmatch(value) is not None


def _check_label(entity: str, value: str) -> str:
    if not is_label(value):
        raise ValueError(
            f"{entity} label {value!r} is not alphanumeric; BIDS entity values must match "
            "[A-Za-z0-9]+ (make the label BIDS-safe before building file names)"
        )
    return value


def _check_extension(extension: str) -> str:
    if not isinstance(extension, str) or _EXTENSION_RE.fullmatch(extension) is None:
        raise ValueError(f"extension {extension!r} must look like '.tsv' or '.nii.gz'")
    return extension


def _check_stat(stat: str) -> str:
    if stat not in STATS:
        raise ValueError(f"stat {stat!r} is not one of {sorted(STATS)}")
    return stat


def _build(entities: Mapping[str, str | None], suffix: str, extension: str) -> str:
    """Join the given entities in :data:`ENTITY_ORDER`, then the suffix and extension."""
    unknown = set(entities) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(f"unknown entities {sorted(unknown)}; known: {ENTITY_ORDER}")
    parts = [
        f"{key}-{_check_label(key, entities[key])}"
        for key in ENTITY_ORDER
        if entities.get(key) is not None
    ]
    return "_".join([*parts, suffix]) + _check_extension(extension)


def statmap_name(
    *,
    contrast: str | None,
    stat: str,
    task: str | None = None,
    space: str | None = None,
    desc: str | None = None,
    extension: str = ".nii.gz",
) -> str:
    """Name of a statistical map.

    Parameters
    ----------
    contrast, stat : str
        Contrast label (alphanumeric; None for a model-level map of a model fitted to every
        input contrast at once) and one of :data:`STATS`.
    task, space, desc : str or None
        Optional entities; left out when None.
    extension : str
        ``.nii.gz`` for the image, ``.json`` for its sidecar.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        A label is not alphanumeric or ``stat`` is unknown.

    Examples
    --------
    >>> statmap_name(contrast="faces", stat="t")
    'contrast-faces_stat-t_statmap.nii.gz'
    >>> statmap_name(task="rest", space="MNI152NLin2009cAsym", contrast="ageGt", stat="z",
    ...              desc="fdr05")
    'task-rest_space-MNI152NLin2009cAsym_contrast-ageGt_stat-z_desc-fdr05_statmap.nii.gz'
    """
    entities = {"task": task, "space": space, "contrast": contrast, "stat": _check_stat(stat)}
    return _build({**entities, "desc": desc}, STATMAP_SUFFIX, extension)


def clusters_name(
    *,
    contrast: str,
    stat: str = "z",
    task: str | None = None,
    space: str | None = None,
    desc: str | None = None,
    extension: str = ".tsv",
) -> str:
    """Name of a cluster table (same entities as the thresholded map it describes).

    >>> clusters_name(contrast="faces", stat="z", desc="fpr001K10")
    'contrast-faces_stat-z_desc-fpr001K10_clusters.tsv'
    """
    entities = {"task": task, "space": space, "contrast": contrast, "stat": _check_stat(stat)}
    return _build({**entities, "desc": desc}, CLUSTERS_SUFFIX, extension)


def null_distribution_name(
    *,
    contrast: str,
    stat: str,
    task: str | None = None,
    space: str | None = None,
    extension: str = ".tsv",
) -> str:
    """Name of the table of permutation null maxima of one contrast (``stat``: ``t`` or ``F``).

    >>> null_distribution_name(contrast="faces", stat="t")
    'contrast-faces_stat-t_nulldist.tsv'
    """
    entities = {"task": task, "space": space, "contrast": contrast, "stat": _check_stat(stat)}
    return _build(entities, NULL_DISTRIBUTION_SUFFIX, extension)


def figure_name(
    *,
    contrast: str,
    stat: str,
    kind: str,
    task: str | None = None,
    space: str | None = None,
    desc: str | None = None,
    extension: str = ".png",
) -> str:
    """Name of a figure of a statistical map (``kind`` one of :data:`FIGURE_SUFFIXES`).

    >>> figure_name(contrast="faces", stat="z", desc="fdr05", kind="glassbrain")
    'contrast-faces_stat-z_desc-fdr05_glassbrain.png'
    """
    if kind not in FIGURE_SUFFIXES:
        raise ValueError(f"figure kind {kind!r} is not one of {FIGURE_SUFFIXES}")
    entities = {"task": task, "space": space, "contrast": contrast, "stat": _check_stat(stat)}
    return _build({**entities, "desc": desc}, kind, extension)


def design_name(
    *,
    contrast: str | None = None,
    task: str | None = None,
    space: str | None = None,
    extension: str = ".tsv",
) -> str:
    """Name of the design matrix table of one model fit.

    ``contrast`` is the *input* (first-level) contrast when the node groups by contrast, so
    each fit has its own design; None when one design serves the whole node.

    >>> design_name(contrast="faces")
    'contrast-faces_design.tsv'
    >>> design_name()
    'design.tsv'
    """
    return _build({"task": task, "space": space, "contrast": contrast}, DESIGN_SUFFIX, extension)


def design_figure_name(
    *,
    contrast: str | None = None,
    task: str | None = None,
    space: str | None = None,
    extension: str = ".svg",
) -> str:
    """Name of the design matrix figure.

    >>> design_figure_name(contrast="faces")
    'contrast-faces_design.svg'
    """
    return design_name(contrast=contrast, task=task, space=space, extension=extension)


def mask_name(
    *,
    contrast: str | None = None,
    task: str | None = None,
    space: str | None = None,
    extension: str = ".nii.gz",
) -> str:
    """Name of the analysis mask (per input contrast when fits differ in their inputs).

    >>> mask_name(space="MNI152NLin2009cAsym")
    'space-MNI152NLin2009cAsym_mask.nii.gz'
    """
    return _build({"task": task, "space": space, "contrast": contrast}, MASK_SUFFIX, extension)


def node_dir(node_name: str) -> str:
    """Folder of one node's outputs.

    >>> node_dir("dataLevel")
    'node-dataLevel'
    """
    return f"node-{_check_label('node', node_name)}"


def model_name(model_name: str) -> str:
    """File name of the resolved model as run.

    >>> model_name("faceLocalizer")
    'model-faceLocalizer_smdl.json'
    """
    return f"model-{_check_label('model', model_name)}_{MODEL_SUFFIX}.json"


def report_name(model_label: str) -> str:
    """File name of the run's HTML report (top level of OUT_DIR, beside the model file).

    >>> report_name("faceLocalizer")
    'model-faceLocalizer_report.html'
    """
    return f"model-{_check_label('model', model_label)}_{REPORT_SUFFIX}.html"


def sidecar_name(filename: str) -> str:
    """JSON sidecar name of a data file: same stem, ``.json`` (double extensions handled).

    >>> sidecar_name("contrast-a_stat-t_statmap.nii.gz")
    'contrast-a_stat-t_statmap.json'
    >>> sidecar_name("contrast-a_stat-z_clusters.tsv")
    'contrast-a_stat-z_clusters.json'
    """
    stem = filename.split(".", 1)[0]
    if not stem:
        raise ValueError(f"cannot derive a sidecar name from {filename!r}")
    return stem + ".json"


def desc_label(method: str, *, alpha: float | None = None, cluster_threshold: int = 0) -> str:
    """``desc`` label of a thresholded map (table in the module docstring).

    Parameters
    ----------
    method : str
        A key of :data:`DESC_LABELS`.
    alpha : float or None
        Level in (0, 1); when given, its digits after ``0.`` are appended. Must be None for
        ``method="none"`` (that threshold is a z value, not a level).
    cluster_threshold : int
        Minimum cluster size in voxels; ``K<k>`` is appended when > 0.

    Returns
    -------
    str
        Alphanumeric camelCase label.

    Raises
    ------
    ValueError
        Unknown method, alpha outside (0, 1), alpha with ``none``, negative cluster threshold.

    Examples
    --------
    >>> desc_label("fdr")
    'fdr'
    >>> desc_label("fdr", alpha=0.05)
    'fdr05'
    >>> desc_label("fpr", alpha=0.001, cluster_threshold=10)
    'fpr001K10'
    >>> desc_label("none", cluster_threshold=5)
    'uncorrectedK5'
    """
    if method not in DESC_LABELS:
        raise ValueError(f"method {method!r} is not one of {sorted(DESC_LABELS)}")
    cluster_threshold = int(cluster_threshold)
    if cluster_threshold < 0:
        raise ValueError(f"cluster_threshold == {cluster_threshold}, must be >= 0")
    label = DESC_LABELS[method]
    if alpha is not None:
        if method in _ALPHA_FREE_METHODS:
            raise ValueError(f"method {method!r} takes no alpha (its threshold is a z value)")
        label += _alpha_digits(alpha)
    if cluster_threshold > 0:
        label += f"K{cluster_threshold}"
    return label


def _alpha_digits(alpha: float) -> str:
    """Digits of ``alpha`` after ``0.``: 0.05 -> '05' (exact decimal, never exponent form)."""
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha == {alpha}, must be in (0, 1)")
    text = np.format_float_positional(alpha, trim="-")
    return text.split(".", 1)[1]
