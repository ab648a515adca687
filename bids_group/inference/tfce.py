"""Threshold-free cluster enhancement (Smith & Nichols 2009) and the voxel graph it runs on.

TFCE(v) = integral from 0 to stat(v) of e(h)^E h^H dh, where e(h) is the size (in voxels) of the
cluster containing v when the map is thresholded at h. Three ways to evaluate it are offered
(:class:`TfceParams.integration`):

``"exact"`` (default)
    The integral itself. e(h) is piecewise constant between the distinct voxel values, so the
    integral is a finite sum: sum over those intervals of e^E ((h_hi^(H+1) - h_lo^(H+1)) / (H+1)).
    No step size, so no dependence on the map's maximum (which differs between permutations).
``"fsl"``
    FSL ``randomise -T``: a Riemann sum on fixed steps h_k = k dh, k >= 1, where a voxel
    counts at h_k when strictly above it, and the sum is *not* multiplied by dh (as in fslmaths).
    dh = (max of the unpermuted map) / 100 and stays fixed for every permutation; the TFCE values
    are therefore ~1/dh times the exact integral.
``"nilearn"``
    nilearn ``non_parametric_inference(tfce=True)``: 100 steps per map,
    ``numpy.linspace(0, max, 101)[1:]`` where max is that map's own maximum (of |stat| when
    two-sided, shared by both tails), a voxel counts when >= the step, no dh factor. Each
    permuted map uses its own steps.

All three use the same union-find over voxels sorted by value (every threshold's clusters in
one pass; :mod:`bids_group.inference._kernels`). Two-sided TFCE enhances the positive and the
negative parts separately and returns the latter negated.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numba
import numpy as np

from bids_group.errors import UsageError
from bids_group.inference import _kernels
from bids_group.inference.clusters import DEFAULT_CONNECTIVITY

Integration = Literal["exact", "fsl", "nilearn"]
Connectivity = Literal[6, 18, 26]

#: Default extent and height exponents (Smith & Nichols 2009, 3-D).
DEFAULT_E = 0.5
DEFAULT_H = 2.0
#: Number of steps of the "fsl" and "nilearn" presets.
PRESET_STEPS = 100

_MODES = {
    "exact": _kernels.MODE_EXACT,
    "nilearn": _kernels.MODE_STEPS_PER_MAP,
    "fsl": _kernels.MODE_FIXED_DH,
}


@dataclass(frozen=True)
class TfceParams:
    """How TFCE is computed.

    Attributes
    ----------
    e : float
        Extent exponent E (> 0).
    h : float
        Height exponent H (> 0).
    integration : {"exact", "fsl", "nilearn"}
        See the module docstring.
    dh : float or None
        Step for ``"fsl"``; None means (max of the unpermuted map) / 100.
    """

    e: float = DEFAULT_E
    h: float = DEFAULT_H
    integration: Integration = "exact"
    dh: float | None = None

    def __post_init__(self) -> None:
        if not (np.isfinite(self.e) and self.e > 0):
            raise UsageError(f"TFCE extent exponent E must be > 0, got {self.e!r}.")
        if not (np.isfinite(self.h) and self.h > 0):
            raise UsageError(f"TFCE height exponent H must be > 0, got {self.h!r}.")
        if self.integration not in _MODES:
            raise UsageError(
                f"TFCE integration must be one of {sorted(_MODES)}, got {self.integration!r}."
            )
        if self.dh is not None:
            if self.integration != "fsl":
                raise UsageError(
                    f"TFCE dh={self.dh!r} only applies to integration='fsl' "
                    f"(got {self.integration!r}: 'exact' has no step, 'nilearn' uses 100 per map)."
                )
            if not (np.isfinite(self.dh) and self.dh > 0):
                raise UsageError(f"TFCE dh must be > 0, got {self.dh!r}.")


@dataclass(frozen=True)
class VoxelGraph:
    """Adjacency of in-mask voxels (indices follow ``numpy.flatnonzero(mask)``, C order).

    Attributes
    ----------
    ptr, idx : ndarray of int64
        CSR lists of all neighbours: neighbours of voxel i are ``idx[ptr[i]:ptr[i+1]]``.
    fwd_ptr, fwd_idx : ndarray of int64
        The same, keeping only neighbours with a larger index (each edge once).
    connectivity : {6, 18, 26}
    grid_pos : ndarray of shape (n_voxels,), int64
        Flat (C order) index of each voxel in the mask's grid padded by one voxel on each side.
    grid_off : ndarray of int64
        Flat offsets of the neighbours in that padded grid, increasing (so a voxel's
        neighbours come in the order of ``idx``); the TFCE kernel reads neighbours this way.
    grid_size : int
        Number of cells of the padded grid.
    """

    ptr: np.ndarray
    idx: np.ndarray
    fwd_ptr: np.ndarray
    fwd_idx: np.ndarray
    connectivity: int
    grid_pos: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    grid_off: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    grid_size: int = 0

    @property
    def n_voxels(self) -> int:
        return self.ptr.shape[0] - 1


def voxel_graph(mask: np.ndarray, connectivity: int = DEFAULT_CONNECTIVITY) -> VoxelGraph:
    """Neighbour lists of the voxels of a 3-D mask.

    Parameters
    ----------
    mask : ndarray of shape (nx, ny, nz), bool
    connectivity : {6, 18, 26}
        Faces; faces and edges; faces, edges and corners.

    Raises
    ------
    UsageError
        Connectivity not 6, 18 or 26, or ``mask`` not 3-D.

    Examples
    --------
    >>> g = voxel_graph(np.ones((2, 1, 1), bool), 6)
    >>> g.idx.tolist(), g.fwd_idx.tolist()
    ([1, 0], [1])
    """
    if connectivity not in (6, 18, 26):
        raise UsageError(f"connectivity must be 6, 18 or 26, got {connectivity!r}.")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise UsageError(f"mask must be 3-D, got shape {mask.shape}.")
    index = np.full(mask.shape, -1, dtype=np.int64)
    coords = np.nonzero(mask)
    n_vox = coords[0].size
    index[coords] = np.arange(n_vox)
    offsets = [
        (dx, dy, dz)
        for dx in (-1, 0, 1)
        for dy in (-1, 0, 1)
        for dz in (-1, 0, 1)
        if 0 < dx * dx + dy * dy + dz * dz <= {6: 1, 18: 2, 26: 3}[connectivity]
    ]
    src_all, dst_all = [], []
    shape = np.array(mask.shape)
    for off in offsets:
        nb = [coords[a] + off[a] for a in range(3)]
        inside = np.all([(nb[a] >= 0) & (nb[a] < shape[a]) for a in range(3)], axis=0)
        dst = np.full(n_vox, -1, dtype=np.int64)
        dst[inside] = index[nb[0][inside], nb[1][inside], nb[2][inside]]
        keep = dst >= 0
        src_all.append(np.flatnonzero(keep))
        dst_all.append(dst[keep])
    src = np.concatenate(src_all) if src_all else np.empty(0, np.int64)
    dst = np.concatenate(dst_all) if dst_all else np.empty(0, np.int64)
    ptr, idx = _csr(src, dst, n_vox)
    fwd = dst > src
    fwd_ptr, fwd_idx = _csr(src[fwd], dst[fwd], n_vox)
    padded = shape + 2
    strides = np.array([padded[1] * padded[2], padded[2], 1])
    grid_pos = sum((coords[a] + 1) * strides[a] for a in range(3)).astype(np.int64)
    grid_off = np.array([np.dot(off, strides) for off in offsets], dtype=np.int64)
    return VoxelGraph(
        ptr, idx, fwd_ptr, fwd_idx, int(connectivity), grid_pos, grid_off, int(np.prod(padded))
    )


def _csr(src: np.ndarray, dst: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((dst, src))
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=ptr[1:])
    return ptr, dst[order].astype(np.int64)


def extent_powers(n_voxels: int, e: float) -> np.ndarray:
    """``s ** e`` for s = 0..n_voxels (float64), the table the TFCE kernel looks up."""
    return np.arange(n_voxels + 1, dtype=np.float64) ** e


def fsl_dh(observed: np.ndarray, *, two_sided: bool) -> float:
    """The FSL preset's fixed step: max of the unpermuted map (of |stat| if two-sided) / 100.

    Raises
    ------
    UsageError
        If that maximum is not positive (there is nothing to enhance).
    """
    top = float(np.max(np.abs(observed) if two_sided else observed))
    if not top > 0:
        raise UsageError(
            "TFCE integration='fsl' takes dh = max(statistic)/100 from the unpermuted map, "
            f"but its maximum is {top:g}; give TfceParams(dh=...) or use integration='exact'."
        )
    return top / PRESET_STEPS


def tfce(
    stat: np.ndarray,
    mask: np.ndarray,
    *,
    params: TfceParams = TfceParams(),  # noqa: B008 - frozen, immutable default
    connectivity: int = DEFAULT_CONNECTIVITY,
    two_sided: bool = False,
    graph: VoxelGraph | None = None,
) -> np.ndarray:
    """TFCE of one statistic map.

    Parameters
    ----------
    stat : ndarray of shape (n_voxels,) or mask.shape, float
        Statistic in mask order (``stat[mask]`` for a 3-D array).
    mask : ndarray of shape (nx, ny, nz), bool
    params : TfceParams
    connectivity : {6, 18, 26}
    two_sided : bool
        Enhance both tails (the negative tail comes back negative); else only ``stat > 0``.
    graph : VoxelGraph, optional
        Precomputed :func:`voxel_graph` of ``mask`` (saves time in loops).

    Returns
    -------
    ndarray of shape (n_voxels,), float64
    """
    mask = np.asarray(mask, dtype=bool)
    stat = np.asarray(stat, dtype=np.float64)
    if stat.shape == mask.shape:
        stat = stat[mask]
    n_vox = int(mask.sum())
    if stat.shape != (n_vox,):
        raise UsageError(
            f"stat has shape {stat.shape}; expected ({n_vox},) (in-mask voxels) or {mask.shape}."
        )
    if not np.all(np.isfinite(stat)):
        raise UsageError("stat contains NaN or infinite values; TFCE needs finite values.")
    if graph is None:
        graph = voxel_graph(mask, connectivity)
    dh = 0.0
    if params.integration == "fsl":
        dh = params.dh if params.dh is not None else fsl_dh(stat, two_sided=two_sided)
    params = replace(params, dh=dh) if params.integration == "fsl" else params
    out = np.zeros((1, n_vox), dtype=np.float64)
    batch_tfce(stat[None, :], params, two_sided, graph, out, np.zeros(1))
    return out[0]


def batch_tfce(
    rows: np.ndarray,
    params: TfceParams,
    two_sided: bool,
    graph: VoxelGraph,
    out: np.ndarray,
    maxima: np.ndarray,
    extent_pow: np.ndarray | None = None,
    *,
    threshold: np.ndarray | None = None,
    counts: np.ndarray | None = None,
) -> None:
    """TFCE of each row of ``rows`` (n_maps, n_voxels) into ``out`` (same shape, float32/64).

    ``maxima`` (n_maps,) receives each map's max |TFCE|. ``params.dh`` must be resolved for
    the "fsl" preset. ``extent_pow`` is :func:`extent_powers` (computed if not given). Runs in
    parallel over rows (numba threads); the result does not depend on their number.
    With ``threshold`` (n_voxels,) float64, ``counts`` (n_voxels,) int64 gains for each voxel
    the number of rows whose |TFCE| (float value as stored in ``out``) is >= it.
    """
    if params.integration == "fsl" and params.dh is None:
        raise UsageError("batch_tfce: the 'fsl' preset needs a resolved dh (see fsl_dh).")
    if (threshold is None) != (counts is None):
        raise UsageError("batch_tfce: give both threshold and counts, or neither.")
    if graph.grid_pos.shape != (graph.n_voxels,):
        raise UsageError("batch_tfce: the graph has no padded grid; build it with voxel_graph.")
    if extent_pow is None:
        extent_pow = extent_powers(graph.n_voxels, params.e)
    _kernels.batch_tfce(
        rows,
        two_sided,
        _MODES[params.integration],
        float(params.h),
        float(params.dh or 0.0),
        PRESET_STEPS,
        graph.grid_pos,
        graph.grid_off,
        graph.grid_size,
        extent_pow,
        numba.get_num_threads(),
        out,
        maxima,
        threshold is not None,
        threshold if threshold is not None else np.empty(0),
        counts if counts is not None else np.empty(0, np.int64),
    )
