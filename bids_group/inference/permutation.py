"""Permutation inference for the voxelwise GLM: max-statistic FWER at voxel, cluster and TFCE level.

The method follows FSL randomise and PALM (Winkler et al. 2014, "Permutation inference for the
general linear model", NeuroImage 92:381-397; "W14" below):

1. The design is partitioned into effect of interest and nuisance by the contrast (W14 appendix
   A, after Beckmann et al. 2001): ``X_interest = X D C (C'DC)^-1``, ``Z = X D C_v (C_v'DC_v)^-1``
   with ``D = (X'X)^-1``, ``C_v = C_u - C (C'DC)^-1 C'D C_u`` and ``C_u`` a basis of null(C').
   ``[X_interest, Z]`` spans the columns of X, ``X_interest' Z = 0``, and the coefficient of
   ``X_interest`` is exactly ``C'beta``, so the unpermuted statistic is the parametric t or F for
   any columns (no "tested column times contrast" split, no special case for intercepts).
2. Freedman-Lane (W14 table 2): the data are replaced by the residuals of the nuisance-only
   model, ``E = R_Z Y``; each relabelling P (row permutation and/or sign flips) gives
   ``P E + H_Z Y``, refitted with the full model.
3. Computation: with ``U = [Q_interest, Q_Z]`` an orthonormal basis of the design, the full-model
   t (or F) of ``P E + H_Z Y`` depends only on ``W = U' P E`` and on ``||E||^2`` (P is
   orthogonal): ``t = W_1 / sigma``, ``F = ||W_1..q||^2 / q / sigma^2``, with
   ``sigma^2 = (||E||^2 - ||W||^2) / dof``. So each batch of relabellings is one matrix product
   ``(n_batch * rank, n) @ (n, n_voxels_tile)`` followed by a fused statistic/max kernel; nothing
   of size n_perm x n_voxels is ever held, and memory does not grow with n_perm.

p-values: ``p = #{null >= observed} / N`` where the null has N = 1 + n_perm entries, the first
being the unpermuted data (W14 eq. 5 with the identity counted: ``(1 + #{random >= obs}) /
(1 + n_perm)``). When ``1 + n_perm`` reaches the number of distinct relabellings, all of them are
enumerated instead (exact test) and N is that number.

Ties: the observed statistics are float64; every entry of the null distributions, the first
(unpermuted) one included, is what the engine computes (float32 statistic maps; sign flips from
subset-sum tables whose all-flipped entries are the exact negatives, row permutations from
float32 products, or float64 ones when the statistic is large, see PRODUCT_RTOL). A relabelling
that is an exact symmetry of the identity (flipping every sign, two-sided) therefore gives a
bit-equal entry, at any size of the statistic. An observed value is compared as the smaller of
its float64 value and the engine's value for the identity, less ``TIE_RTOL`` (relative), so
rounding can only make p larger. The engine's residual sum of squares stays accurate when the
fit is near perfect (large statistics), where ``ss - ||w||^2`` in float32 was rounding noise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numba
import numpy as np
from scipy import linalg

from bids_group.distributions import f_isf, t_isf
from bids_group.errors import DataError, OutputError, UsageError
from bids_group.inference import _kernels
from bids_group.inference import exchangeability as exch
from bids_group.inference import tfce as tfce_mod
from bids_group.memory import TILE_ALIGN, TiledMaps, aligned, aligned_matmul, iter_tiles

if TYPE_CHECKING:
    from bids_group.executor import Executor

log = logging.getLogger(__name__)

StatType = Literal["t", "F"]
#: The statistic a permutation result refers to: t or F (OLS), z (mixed effects).
NullStatType = Literal["t", "F", "z"]
ProgressCallback = Callable[[int, int], None]

#: Relative tolerance under which a permuted value counts as a tie with the observed one.
TIE_RTOL = 1e-5
#: Relabellings per batch: voxel-level only, and with spatial statistics (full maps held).
BATCH_VOXEL = 256
BATCH_SPATIAL = 32
#: Sign flips with spatial statistics: as many relabellings per batch as fit in this many bytes
#: of statistic maps (up to 256), so the subset-sum tables are built fewer times.
SPATIAL_FLIP_BYTES = 128 * 1024 * 1024
#: Sign flips go through subset-sum tables (no matrix product): the table cost is per batch, so
#: voxel-level batches are larger.
BATCH_FLIP_VOXEL = 4096
#: Largest subset-sum tables of one voxel tile (half of a 512 KiB L2 cache per core).
TABLE_BYTES = 384 * 1024
#: Target size in bytes of one (batch x voxel-tile) product (cache-sized).
TILE_BYTES = 4 << 20
#: Row permutations: bytes of each per-batch array whose size grows with the number of maps,
#: the projection (n_batch x rank x n_maps, float64, and its copy in the product type) and one
#: residual tile (n_maps x tile, in memory or read back from the scratch file). Batches and
#: tiles narrow at large N to stay within it (at N = 10,000 a batch of 256 relabellings made
#: a 92 MB projection and 55 MB residual tiles, 4x that at N = 40,000); below ~2,800 maps
#: nothing changes.
ROW_BYTES = 32 << 20
#: Row permutations: the products are float32 unless their rounding could reach half the tie
#: tolerance. The relative error of a permuted residual sum of squares ``ss - ||w||^2`` is about
#: eps * ss / rss (measured: <= 2 eps ss / rss over 1e5 voxel-permutations, 10 to 200 rows), so
#: that of t is <= ~eps * ss / rss, and ss / rss = 1 + t^2 / dof (1 + q F / dof) grows with the
#: statistic: 10 rows, t = 100 gives 1.5e-4 > TIE_RTOL (a group swap, t -> -t exactly, missed
#: its tie). The largest observed ratio decides (t > ~13 with 8 dof, > ~28 with 38).
PRODUCT_RTOL = TIE_RTOL / 2


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterInference:
    """Cluster-extent and cluster-mass FWER inference at one cluster-forming height.

    Attributes
    ----------
    forming_p : float
        Cluster-forming threshold as given (upper-tail p of the statistic; two-sided tests split
        it between the tails).
    height : float
        The same threshold on the statistic's scale (t or F); clusters are sets of connected
        voxels with ``stat > height`` (or ``stat < -height`` for the negative tail).
    labels : ndarray of shape (n_voxels,), int32
        0 outside clusters, k for the voxels of cluster k (1-based index into the arrays below).
    sizes : ndarray of shape (n_clusters,), int64
        Voxels per cluster.
    masses : ndarray of shape (n_clusters,), float64
        Sum over the cluster of ``|stat| - height`` (nilearn's definition).
    signs : ndarray of shape (n_clusters,), int8
        +1 for clusters of the positive tail, -1 for the negative tail.
    peaks : ndarray of shape (n_clusters,), int64
        Voxel index of each cluster's peak |stat|.
    p_fwe_size, p_fwe_mass : ndarray of shape (n_clusters,), float64
    null_max_size : ndarray of shape (n_relabellings,), int64
    null_max_mass : ndarray of shape (n_relabellings,), float64
        Maxima over the map for each relabelling (first = unpermuted).
    """

    forming_p: float
    height: float
    labels: np.ndarray
    sizes: np.ndarray
    masses: np.ndarray
    signs: np.ndarray
    peaks: np.ndarray
    p_fwe_size: np.ndarray
    p_fwe_mass: np.ndarray
    null_max_size: np.ndarray
    null_max_mass: np.ndarray

    def p_fwe_size_map(self) -> np.ndarray:
        """Per voxel: the size FWER p of its cluster, 1 outside clusters. (n_voxels,) float64."""
        return _cluster_map(self.labels, self.p_fwe_size)

    def p_fwe_mass_map(self) -> np.ndarray:
        """Per voxel: the mass FWER p of its cluster, 1 outside clusters. (n_voxels,) float64."""
        return _cluster_map(self.labels, self.p_fwe_mass)


def _cluster_map(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.concatenate([[1.0], values])[labels]


@dataclass(frozen=True)
class TfceInference:
    """TFCE map and its permutation p-values.

    Attributes
    ----------
    params : TfceParams
        As run (``dh`` resolved for the "fsl" preset).
    connectivity : int
    tfce : ndarray of shape (n_voxels,), float64
        TFCE of the observed statistic (negative tail negative when two-sided).
    p_uncorrected, p_fwe : ndarray of shape (n_voxels,), float64
    null_max : ndarray of shape (n_relabellings,), float64
        Max (of |TFCE| when two-sided) for each relabelling, first = unpermuted.
    """

    params: tfce_mod.TfceParams
    connectivity: int
    tfce: np.ndarray
    p_uncorrected: np.ndarray
    p_fwe: np.ndarray
    null_max: np.ndarray


@dataclass(frozen=True)
class PermutationResult:
    """Everything a permutation test of one contrast produced.

    Attributes
    ----------
    stat_type : {"t", "F", "z"}
    stat : ndarray of shape (n_voxels,), float64
        The observed statistic: equals the parametric t or F of the full model (z for mixed
        effects, see :mod:`bids_group.inference.mixed_permutation`).
    dof : tuple of float
        (dof,) for t, (q, dof) for F.
    two_sided : bool
        Whether p-values refer to |t| (t only).
    scheme : {"flip", "permute"}
    whole_blocks : bool
    n_relabellings : int
        N, the size of every null distribution (unpermuted data included).
    exhaustive : bool
        True when every distinct relabelling was used once (exact p-values).
    seed : int
        Seed of the random relabellings (the one drawn when none was given).
    p_uncorrected : ndarray of shape (n_voxels,), float64
        Voxelwise permutation p.
    p_fwe : ndarray of shape (n_voxels,), float64
        Voxel-level FWER p from the max statistic.
    null_max_stat : ndarray of shape (n_relabellings,), float64
        Max statistic (of |t| when two-sided) for each relabelling, first = unpermuted.
    clusters : ClusterInference or None
    tfce : TfceInference or None
    """

    stat_type: NullStatType
    stat: np.ndarray
    dof: tuple[float, ...]
    two_sided: bool
    scheme: exch.Scheme
    whole_blocks: bool
    n_relabellings: int
    exhaustive: bool
    seed: int
    p_uncorrected: np.ndarray
    p_fwe: np.ndarray
    null_max_stat: np.ndarray
    clusters: ClusterInference | None = None
    tfce: TfceInference | None = None


# ---------------------------------------------------------------------------------------------
# Design partition (W14 appendix A)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DesignPartition:
    """The design split into effect of interest and nuisance for one contrast.

    Attributes
    ----------
    interest : ndarray of shape (n_rows, q)
        ``X D C (C'DC)^-1``: its coefficient in ``[interest, nuisance]`` is ``C'beta``.
    nuisance : ndarray of shape (n_rows, rank - q)
        ``X D C_v (C_v'DC_v)^-1``, orthogonal to ``interest``.
    basis : ndarray of shape (n_rows, rank)
        Orthonormal; columns ``:q`` span ``interest`` (for t, column 0 is ``interest`` scaled to
        unit norm, same sign), columns ``q:`` span ``nuisance``.
    n_interest : int
        q.
    dof : int
        n_rows - rank.
    """

    interest: np.ndarray
    nuisance: np.ndarray
    basis: np.ndarray
    n_interest: int
    dof: int

    @property
    def nuisance_basis(self) -> np.ndarray:
        return self.basis[:, self.n_interest :]


def partition_design(design: np.ndarray, contrast: np.ndarray) -> DesignPartition:
    """Partition ``design`` by ``contrast`` (Beckmann et al. 2001; W14 appendix A).

    Parameters
    ----------
    design : ndarray of shape (n_rows, n_params)
        Full column rank.
    contrast : ndarray of shape (q, n_params)
        Linearly independent rows.

    Raises
    ------
    DataError
        Design not of full column rank, or no residual degrees of freedom.
    UsageError
        Contrast of the wrong width, or with dependent rows.
    """
    x = np.asarray(design, dtype=np.float64)
    c = np.atleast_2d(np.asarray(contrast, dtype=np.float64))
    n_rows, n_params = x.shape
    if c.shape[1] != n_params:
        raise UsageError(
            f"Contrast has {c.shape[1]} weights but the design has {n_params} columns."
        )
    if np.linalg.matrix_rank(c) < c.shape[0]:
        raise UsageError(f"Contrast rows are linearly dependent (shape {c.shape}); drop a row.")
    rank = np.linalg.matrix_rank(x)
    if rank < n_params:
        raise DataError(
            f"The design matrix has rank {rank} < {n_params} columns: some columns are linear "
            "combinations of others. Remove the redundant columns."
        )
    dof = n_rows - rank
    if dof < 1:
        raise DataError(f"No residual degrees of freedom: {n_rows} maps for {rank} parameters.")
    cc = c.T  # (p, q), W14 notation
    d = np.linalg.inv(x.T @ x)
    interest = x @ d @ cc @ np.linalg.inv(cc.T @ d @ cc)
    c_u = linalg.null_space(cc.T)  # (p, p - q)
    if c_u.shape[1]:
        c_v = c_u - cc @ np.linalg.inv(cc.T @ d @ cc) @ cc.T @ d @ c_u
        nuisance = x @ d @ c_v @ np.linalg.inv(c_v.T @ d @ c_v)
    else:
        nuisance = np.zeros((n_rows, 0))
    q_int, r_int = np.linalg.qr(interest)
    # orient so that column k of the basis has a positive coefficient on interest column k
    q_int = q_int * np.sign(np.diag(r_int))
    if nuisance.shape[1]:
        q_nui = np.linalg.qr(nuisance - q_int @ (q_int.T @ nuisance))[0]
    else:
        q_nui = np.zeros((n_rows, 0))
    basis = np.hstack([q_int, q_nui])
    return DesignPartition(interest, nuisance, basis, c.shape[0], dof)


#: Voxels per tile of :func:`parametric_stat`.
_PARAMETRIC_TILE = 4096


def parametric_stat(
    data: np.ndarray | TiledMaps, part: DesignPartition, stat_type: StatType
) -> np.ndarray:
    """The parametric t or F of the contrast, in float64, from the partition.

    Parameters
    ----------
    data : ndarray of shape (n_rows, n_voxels), or TiledMaps (read one tile at a time)

    Returns
    -------
    ndarray of shape (n_voxels,), float64
    """
    if not isinstance(data, TiledMaps):
        data = np.asarray(data)
    n_voxels = data.shape[1]
    coords = np.empty((part.basis.shape[1], n_voxels))
    rss = np.empty(n_voxels)
    # Column tiles: the float64 copy and the residuals of one tile stay in cache (one pass over
    # the whole array costs ~10x more on a 40 x 235,000 data set).
    for block, tile in iter_tiles(data, _PARAMETRIC_TILE):
        n = block.stop - block.start
        y = _padded(tile)
        c = aligned_matmul(part.basis.T, y)
        coords[:, block] = c[:, :n]
        fitted = aligned_matmul(part.basis, c)
        rss[block] = _sum_of_squares_in_place(np.subtract(y, fitted, out=y))[:n]
    sigma2 = rss / part.dof
    q = part.n_interest
    with np.errstate(divide="ignore", invalid="ignore"):
        if stat_type == "t":
            stat = coords[0] / np.sqrt(sigma2)
        else:
            stat = np.sum(coords[:q] ** 2, axis=0) / q / sigma2
    # voxels with zero residual variance: 0 if there is no effect either, else +-inf
    return np.where(np.isnan(stat), 0.0, stat)


def _padded(tile: np.ndarray) -> np.ndarray:
    """A float64 copy of a (n_rows, width) tile, zero-padded to a multiple of
    :data:`~bids_group.memory.TILE_ALIGN` columns, whose products
    (:func:`~bids_group.memory.aligned_matmul`) then give each voxel the same bits whatever the
    tile width, so data in the tiled store give the in-memory results."""
    out = np.zeros((tile.shape[0], aligned(tile.shape[1])), dtype=np.float64)
    out[:, : tile.shape[1]] = tile
    return out


def _residual_tiles(
    data: np.ndarray | TiledMaps, part: DesignPartition
) -> Iterator[tuple[slice, np.ndarray, np.ndarray, np.ndarray]]:
    """(voxels, Freedman-Lane residuals E (n_rows, len) float64, ||E||^2, and the residual sum
    of squares of the full model fitted to E) per voxel tile of ``data``."""
    q_z = part.nuisance_basis
    for block, tile in iter_tiles(data, _PARAMETRIC_TILE):
        n = block.stop - block.start
        resid = _padded(tile)
        if q_z.shape[1]:  # Freedman-Lane: residuals of the nuisance-only model
            resid -= aligned_matmul(q_z, aligned_matmul(q_z.T, resid))
        ss = np.einsum("rv,rv->v", resid, resid)[:n]
        fitted = aligned_matmul(part.basis, aligned_matmul(part.basis.T, resid))
        rss = _sum_of_squares_in_place(np.subtract(resid, fitted, out=fitted))[:n]
        del fitted
        yield block, resid[:, :n], ss, rss


def _sum_of_squares_in_place(values: np.ndarray) -> np.ndarray:
    """Column sums of ``values ** 2``, squaring ``values`` in place: the same bits as
    ``np.sum(values ** 2, axis=0)`` without a second temporary of the tile's size (the
    residuals of a store tile at N = 2,000 are 76 MB of float64)."""
    return np.sum(np.square(values, out=values), axis=0)


class _DiskTiles:
    """Residual tiles in a scratch file beside the tiled store, read back for every batch: the
    engine's residuals (n_rows x n_voxels) never sit in memory whole.

    The file is removed by :meth:`close`, or else when the object is garbage-collected or the
    interpreter exits. The engines of Dask workers read the client's file (:meth:`borrowed`).
    """

    def __init__(self, folder: Path | None, n_rows: int, dtype: type) -> None:
        fd, name = tempfile.mkstemp(prefix="residuals-", suffix=".bin", dir=folder)
        self.file = os.fdopen(fd, "w+b")
        self.path = Path(name)
        self.n_rows, self.dtype = n_rows, np.dtype(dtype)
        self.widths: list[int] = []
        self._remove = weakref.finalize(self, _remove_scratch, self.file, self.path)

    def append(self, tile: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(tile, dtype=self.dtype).tobytes())
        self.widths.append(tile.shape[1])

    def __len__(self) -> int:
        return len(self.widths)

    def __iter__(self) -> Iterator[np.ndarray]:
        self.file.flush()
        self.file.seek(0)
        for width in self.widths:
            tile = np.empty((self.n_rows, width), dtype=self.dtype)
            if self.file.readinto(memoryview(tile).cast("B")) != tile.nbytes:
                raise DataError(
                    f"the permutation residuals {self.path} are shorter than written (another "
                    "process truncated the work folder, or it is not shared whole): rerun"
                )
            yield tile

    def close(self) -> None:
        self._remove()

    def shared(self) -> SharedTiles:
        """What another process needs to read these tiles (:meth:`borrowed`): written through
        to the file system first (``fsync``), so that a worker on another node of a shared
        file system (NFS) reads the whole file."""
        self.file.flush()
        os.fsync(self.file.fileno())
        return SharedTiles(self.path, self.n_rows, self.dtype.str, tuple(self.widths))

    @classmethod
    def borrowed(cls, shared: SharedTiles) -> _DiskTiles:
        """The tiles another engine wrote, read-only (a Dask worker reading the client's file in
        the shared work folder); :meth:`close` closes the file and leaves it to its owner."""
        tiles = cls.__new__(cls)
        tiles.file = open(shared.path, "rb")  # closed by close() or the finalizer
        tiles.path = shared.path
        tiles.n_rows, tiles.dtype = shared.n_rows, np.dtype(shared.dtype)
        tiles.widths = list(shared.widths)
        tiles._remove = weakref.finalize(tiles, tiles.file.close)
        return tiles


@dataclass(frozen=True)
class SharedTiles:
    """A residual scratch file as the workers of a test read it: path, rows, dtype, tile widths."""

    path: Path
    n_rows: int
    dtype: str
    widths: tuple[int, ...]


def _scratch_error(exc: OSError, borrowed: SharedTiles | None, folder: Path | None) -> Exception:
    """The error of a residuals file that could not be written, or read by a worker."""
    why = (exc.strerror or str(exc)).lower()
    if borrowed is not None:  # a Dask worker that does not see the client's work folder
        return OutputError(
            f"a worker cannot read the permutation residuals {borrowed.path}: {why}; the work "
            "folder (-w) must be on a file system the workers share, at the same path, "
            "readable by their user"
        )
    return OutputError(
        f"cannot write the permutation residuals in {folder or 'the work folder'}: {why}; "
        "free space in the work folder (-w) or give a larger --mem-budget"
    )


def _remove_scratch(file: Any, path: Path) -> None:
    """Close and delete a scratch file (already gone with the store's folder: nothing to do);
    deleted even when closing fails (closing flushes: it fails again on a full disk)."""
    try:
        file.close()
    finally:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def design_exchangeability(
    design: np.ndarray,
    contrast: np.ndarray,
    *,
    scheme: exch.SchemeChoice = "auto",
    blocks: np.ndarray | None = None,
    whole_blocks: bool = False,
) -> tuple[DesignPartition, exch.Exchangeability]:
    """Partition the design for the contrast and validate the relabellings that will test it.

    Raises
    ------
    UsageError
        Row permutation of an effect that includes the mean, or no allowed relabelling that can
        change the statistic.
    DataError
        Bad blocks, rank-deficient design.
    """
    part = partition_design(design, contrast)
    ex = exch.make_exchangeability(design, part.basis[:, : part.n_interest], scheme=scheme,
                                   blocks=blocks, whole_blocks=whole_blocks)  # fmt: skip
    residual_maker = np.eye(design.shape[0]) - part.nuisance_basis @ part.nuisance_basis.T
    exch.check_supports_test(ex, part.basis, residual_maker)
    return part, ex


def relabelling_count(ex: exch.Exchangeability, n_perm: int) -> tuple[int, bool]:
    """(N, exhaustive): ``1 + n_perm``, or every distinct relabelling once when that is reached."""
    n_distinct = ex.n_distinct()
    exhaustive = 1 + n_perm >= n_distinct
    return (n_distinct if exhaustive else 1 + n_perm), exhaustive


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def permutation_test(
    data: np.ndarray,
    design: np.ndarray,
    contrast: np.ndarray,
    *,
    stat_type: StatType = "t",
    n_perm: int = 10_000,
    two_sided: bool = False,
    mask: np.ndarray | None = None,
    cluster_forming_p: float | None = None,
    tfce: bool = False,
    tfce_params: tfce_mod.TfceParams | None = None,
    connectivity: int = tfce_mod.DEFAULT_CONNECTIVITY,
    scheme: exch.SchemeChoice = "auto",
    blocks: np.ndarray | None = None,
    whole_blocks: bool = False,
    seed: int | None = None,
    n_jobs: int = 1,
    progress: ProgressCallback | None = None,
    executor: Executor | None = None,
) -> PermutationResult:
    """Permutation test of one contrast, with voxel, cluster and TFCE FWER correction.

    Parameters
    ----------
    data : ndarray of shape (n_rows, n_voxels), float, or TiledMaps
        One row per input map, columns in mask order (``numpy.flatnonzero(mask)``, C order).
        From the tiled store (:mod:`bids_group.store`), the residuals are computed one tile at a
        time and kept in a scratch file beside the store, read back for every batch; the
        results are the same bits as from the array in memory.
    design : ndarray of shape (n_rows, n_params)
    contrast : ndarray of shape (q, n_params) or (n_params,)
    stat_type : {"t", "F"}
        A t contrast has one row.
    n_perm : int
        Random relabellings (>= 1) beside the unpermuted data. If ``1 + n_perm`` reaches the
        number of distinct relabellings, all are enumerated instead.
    two_sided : bool
        Test |t| (t only). One-sided tests are upper-tailed (negate the contrast for lower).
    mask : ndarray of shape (nx, ny, nz), bool, optional
        Needed for clusters and TFCE.
    cluster_forming_p : float, optional
        Cluster-forming threshold as an uncorrected upper-tail p-value, 0 < p < 0.5 (halved per
        tail when two-sided). Enables cluster size and mass inference.
    tfce : bool
        Enable TFCE inference.
    tfce_params : TfceParams, optional
        E, H and integration (default: exact integral, E=0.5, H=2).
    connectivity : {6, 18, 26}
        Voxel adjacency for clusters and TFCE.
    scheme : {"auto", "flip", "permute"}
        See :mod:`bids_group.inference.exchangeability`.
    blocks : ndarray of shape (n_rows,), optional
        Exchangeability block labels (e.g. subject for repeated measures).
    whole_blocks : bool
        Permute (or flip) blocks as units instead of rows within blocks.
    seed : int, optional
        Seed of the relabellings; the same seed gives bit-identical results for any ``n_jobs``.
        None draws one (recorded in the result).
    n_jobs : int
        Threads for the compiled kernels (-1: all cores).
    progress : callable(done, total), optional
        Called after each batch with the number of relabellings done and the total.
    executor : Executor, optional
        Runs chunks of relabellings elsewhere (:mod:`bids_group.executor`, e.g. on Dask workers);
        the results are bit for bit those of the in-process run (None) with the same seed.

    Returns
    -------
    PermutationResult

    Raises
    ------
    UsageError
        Invalid option (n_perm < 1, threshold out of range, two-sided F, clusters/TFCE without
        mask, an exchangeability structure that cannot support the test, ...).
    DataError
        Non-finite data, shapes that disagree, rank-deficient design, bad blocks.
    """
    cfg = _validate(
        data,
        design,
        contrast,
        stat_type,
        n_perm,
        two_sided,
        mask,
        cluster_forming_p,
        tfce,
        tfce_params,
        connectivity,
        seed,
        n_jobs,
    )
    part, ex = design_exchangeability(
        cfg.design, cfg.contrast, scheme=scheme, blocks=blocks, whole_blocks=whole_blocks
    )
    n_total, exhaustive = relabelling_count(ex, n_perm)
    log.info(
        "Permutation test: %s, %d relabellings%s, %d voxels",
        ex.scheme,
        n_total,
        " (all distinct, exact)" if exhaustive else "",
        cfg.data.shape[1],
    )
    observed = _observed(cfg, part)
    make = partial(_Engine, cfg, part, observed, flip=ex.scheme == "flip")
    with numba_threads(cfg.n_jobs):
        return run_test(make, ex, exhaustive, n_total, cfg.seed, progress, executor)


@contextlib.contextmanager
def numba_threads(n_jobs: int) -> Iterator[None]:
    """Run the compiled kernels on ``n_jobs`` threads, then restore the former number."""
    threads = numba.get_num_threads()
    numba.set_num_threads(n_jobs)
    try:
        yield
    finally:
        numba.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    data: np.ndarray | TiledMaps
    design: np.ndarray
    contrast: np.ndarray
    stat_type: StatType
    two_sided: bool
    graph: tfce_mod.VoxelGraph | None
    cluster_forming_p: float | None
    tfce_params: tfce_mod.TfceParams | None
    seed: int
    n_jobs: int


def _validate(
    data,
    design,
    contrast,
    stat_type,
    n_perm,
    two_sided,
    mask,
    cluster_forming_p,
    tfce,
    tfce_params,
    connectivity,
    seed,
    n_jobs,
) -> _Config:
    if isinstance(n_perm, bool) or not isinstance(n_perm, (int, np.integer)) or n_perm < 1:
        raise UsageError(f"n_perm must be an integer >= 1, got {n_perm!r}.")
    if stat_type not in ("t", "F"):
        raise UsageError(f"stat_type must be 't' or 'F', got {stat_type!r}.")
    if two_sided and stat_type == "F":
        raise UsageError("two_sided applies to t contrasts only; an F test is one-sided.")
    y = data if isinstance(data, TiledMaps) else np.asarray(data)
    if len(y.shape) != 2:
        raise DataError(f"data must be 2-D (n_maps, n_voxels), got shape {y.shape}.")
    if not all(np.all(np.isfinite(tile)) for _, tile in iter_tiles(y)):
        raise DataError("data contain NaN or infinite values; mask them out first.")
    x = np.asarray(design, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise DataError(f"design has shape {x.shape} but data have {y.shape[0]} maps (rows).")
    if not np.all(np.isfinite(x)):
        raise DataError("design contains NaN or infinite values.")
    c = np.atleast_2d(np.asarray(contrast, dtype=np.float64))
    if stat_type == "t" and c.shape[0] != 1:
        raise UsageError(f"A t contrast has one row; got {c.shape[0]}. Use stat_type='F'.")
    spatial = tfce or cluster_forming_p is not None
    graph = None
    if spatial:
        if mask is None:
            raise UsageError("Cluster and TFCE inference need the 3-D mask (mask=...).")
        m = np.asarray(mask, dtype=bool)
        if m.ndim != 3 or int(m.sum()) != y.shape[1]:
            raise DataError(
                f"mask (shape {m.shape}, {int(m.sum())} voxels) does not match the "
                f"{y.shape[1]} data columns."
            )
        graph = tfce_mod.voxel_graph(m, connectivity)
    if cluster_forming_p is not None:
        p = float(cluster_forming_p)
        if not (0.0 < p < 0.5):
            raise UsageError(
                f"cluster_forming_p={cluster_forming_p!r} is not a p-value in (0, 0.5). It is "
                "the uncorrected upper-tail p of the cluster-forming threshold (e.g. 0.001); a "
                "height such as z = 3.1 must be converted (z = 3.1 is p = 0.00097)."
            )
        cluster_forming_p = p
    params = (tfce_params or tfce_mod.TfceParams()) if tfce else None
    if n_jobs == -1:
        n_jobs = numba.config.NUMBA_NUM_THREADS
    if not isinstance(n_jobs, (int, np.integer)) or n_jobs < 1:
        raise UsageError(f"n_jobs must be >= 1 or -1, got {n_jobs!r}.")
    n_jobs = min(int(n_jobs), numba.config.NUMBA_NUM_THREADS)
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**63))
    elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}.")
    return _Config(
        y, x, c, stat_type, bool(two_sided), graph, cluster_forming_p, params, int(seed), n_jobs
    )


# ---------------------------------------------------------------------------------------------
# Observed statistics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Observed:
    stat: np.ndarray
    height: float | None
    clusters: tuple | None  # (labels, sizes, masses, signs, peaks)
    tfce: np.ndarray | None
    tfce_params: tfce_mod.TfceParams | None


def _observed(cfg: _Config, part: DesignPartition) -> _Observed:
    stat = parametric_stat(cfg.data, part, cfg.stat_type)
    height = _cluster_height(cfg, part) if cfg.cluster_forming_p is not None else None
    return observed_maps(cfg, stat, height)


def observed_maps(cfg: _Config, stat: np.ndarray, height: float | None) -> _Observed:
    """The observed statistic's clusters (at ``height``, when given) and TFCE, as ``cfg`` asks."""
    clusters = tfce_map = params = None
    if height is not None:
        clusters = _observed_clusters(stat, height, cfg.two_sided, cfg.graph)
    if cfg.tfce_params is not None:
        params = cfg.tfce_params
        if params.integration == "fsl" and params.dh is None:
            params = replace(params, dh=tfce_mod.fsl_dh(stat, two_sided=cfg.two_sided))
        tfce_map = np.zeros((1, stat.shape[0]), dtype=np.float64)
        tfce_mod.batch_tfce(stat[None, :], params, cfg.two_sided, cfg.graph, tfce_map, np.zeros(1))
        tfce_map = tfce_map[0]
    return _Observed(stat, height, clusters, tfce_map, params)


def _cluster_height(cfg: _Config, part: DesignPartition) -> float:
    p = cfg.cluster_forming_p / (2.0 if cfg.two_sided else 1.0)
    if cfg.stat_type == "t":
        return t_isf(p, part.dof)
    return f_isf(p, part.n_interest, part.dof)


def _observed_clusters(stat, height, two_sided, graph):
    labels = np.zeros(stat.shape[0], dtype=np.int32)
    sizes, masses, signs, peaks = [], [], [], []
    parent = np.empty(stat.shape[0], dtype=np.int32)
    for sign in (1, -1) if two_sided else (1,):
        lab = _kernels.cluster_labels(sign * stat, height, graph.fwd_ptr, graph.fwd_idx, parent)
        n_lab = int(lab.max())
        if n_lab == 0:
            continue
        inside = lab > 0
        labels[inside] = lab[inside] + len(sizes)
        excess = sign * stat[inside] - height
        sizes.extend(np.bincount(lab[inside], minlength=n_lab + 1)[1:].tolist())
        masses.extend(np.bincount(lab[inside], weights=excess, minlength=n_lab + 1)[1:].tolist())
        signs.extend([sign] * n_lab)
        idx = np.flatnonzero(inside)
        order = np.lexsort((-excess, lab[inside]))  # by label, then decreasing value
        first = np.unique(lab[inside][order], return_index=True)[1]
        peaks.extend(idx[order][first].tolist())
    return (
        labels,
        np.asarray(sizes, dtype=np.int64),
        np.asarray(masses, dtype=np.float64),
        np.asarray(signs, dtype=np.int8),
        np.asarray(peaks, dtype=np.int64),
    )


# ---------------------------------------------------------------------------------------------
# Relabelling stream
# ---------------------------------------------------------------------------------------------


def _batches(ex, exhaustive, n_total, seed, batch_size):
    """Yield (n done including identity, Relabellings) for every non-identity relabelling.

    The stream depends only on the seed (never on n_jobs); the identity is handled apart.
    """
    yield from _range_batches(ex, exhaustive, seed, batch_size, 1, n_total)


def _range_batches(ex, exhaustive, seed, batch_size, start, stop):
    """The batches of relabellings ``start`` to ``stop - 1`` (0 is the identity): exactly those
    a single stream from ``seed`` gives them (the generator is advanced past the earlier draws,
    which :func:`~bids_group.inference.exchangeability.random_relabellings` consumes row by
    row, a fixed number of doubles per relabelling)."""
    if exhaustive:
        allr = exch.enumerate_relabellings(ex)
        for first in range(start, stop, batch_size):
            last = min(first + batch_size, stop)
            yield last, exch.Relabellings(allr.perm[first:last], allr.signs[first:last])
        return
    bit_generator = np.random.PCG64(seed)
    bit_generator.advance((start - 1) * (ex.n_blocks if ex.whole_blocks else ex.n_rows))
    rng = np.random.Generator(bit_generator)
    for first in range(start, stop, batch_size):
        last = min(first + batch_size, stop)
        yield last, exch.random_relabellings(ex, rng, last - first)


#: Relabellings per chunk of distributed work (rounded to whole batches).
CHUNK_RELABELLINGS = 1024


def run_test(make, ex, exhaustive, n_total, seed, progress, executor) -> PermutationResult:
    """The test of any engine: build it with ``make`` (it runs the identity), run every other
    relabelling (:func:`_run_engine`), return its result; its scratch files are removed."""
    engine = make()
    try:
        _run_engine(engine, make, ex, exhaustive, n_total, seed, progress, executor)
        return engine.result(ex, n_total, exhaustive)
    finally:
        engine.close()


def _run_engine(engine, make, ex, exhaustive, n_total, seed, progress, executor) -> None:
    """Every relabelling after the identity through ``engine``: in this process, or in chunks
    on ``executor`` (each chunk on a fresh engine from ``make``), merged in stream order."""
    if executor is None:
        for done, batch in _batches(ex, exhaustive, n_total, seed, engine.batch_size):
            engine.run_batch(batch)
            if progress is not None:
                progress(done, n_total)
        return
    ranges = chunk_ranges(n_total, engine.batch_size, _chunk_batches(engine, n_total, executor))
    items = [(ex, exhaustive, seed, start, stop) for start, stop in ranges]
    log.info("%d relabellings in %d tasks on the executor's workers", n_total - 1, len(items))
    chunks = executor.map_chunks(run_chunk, engine.for_workers(make), items)
    for (_, stop), chunk in zip(ranges, chunks, strict=True):
        engine.merge(chunk)
        if progress is not None:
            progress(stop, n_total)


#: Chunks per worker when there are few relabellings: every worker has work, and the last
#: chunks, whose lengths differ, leave the workers finishing within about one chunk of each
#: other. Cheap, as a worker reuses its engine across chunks (:func:`run_chunk`).
TASKS_PER_WORKER = 8


def _chunk_batches(engine, n_total: int, executor) -> int:
    """Batches per chunk: about :data:`CHUNK_RELABELLINGS` relabellings, fewer when that would
    leave workers idle (:data:`TASKS_PER_WORKER` chunks each). The size changes no result: chunks
    start on batch boundaries (see :func:`chunk_ranges`)."""
    n_batches = -(-(n_total - 1) // engine.batch_size)
    workers = max(1, int(getattr(executor, "n_workers", 1)))
    even = -(-n_batches // (TASKS_PER_WORKER * workers))
    return max(1, min(CHUNK_RELABELLINGS // engine.batch_size, even))


def chunk_ranges(n_total: int, batch_size: int, chunk_batches: int) -> list[tuple[int, int]]:
    """Relabellings ``1..n_total - 1`` cut into chunks of ``chunk_batches`` batches.

    A chunk (a unit of distributed work) starts on a batch boundary, so every relabelling is
    computed in the same batch as in one stream, whatever the chunk size: the results are bit
    for bit those of the in-process run.

    >>> chunk_ranges(11, 2, 2)
    [(1, 5), (5, 9), (9, 11)]
    """
    step = batch_size * max(1, int(chunk_batches))
    return [(first, min(first + step, n_total)) for first in range(1, n_total, step)]


@dataclass(frozen=True)
class ChunkNull:
    """What the relabellings of one chunk add to the null distributions (identity excluded)."""

    maxima: list
    counts: np.ndarray
    max_size: list
    max_mass: list
    tfce_max: list
    tfce_counts: np.ndarray | None


def run_chunk(
    make_engine: Callable[[], NullEngine], ex, exhaustive, seed, start, stop
) -> ChunkNull:
    """Run relabellings ``start..stop - 1`` on an engine of ``make_engine`` (it has run the
    identity): a task of :func:`permutation_test` with an executor. Deterministic: the same
    arguments give the same bits on any worker.

    The engine is built once per process and thread running chunks of the same
    ``make_engine`` (the worker's copy of the shared task), and set back to its state after
    the identity between chunks (:meth:`NullEngine.restart`): building it (residuals, the
    identity's statistic and TFCE, the batch buffers) costs about a fifth of a TFCE batch,
    which every chunk paid. With data in the tiled store, the engines read the residuals the
    client's engine wrote in the shared work folder (:meth:`NullEngine.for_workers`), and a
    worker reads the store once, not once per chunk.
    """
    engine = _borrow_engine(make_engine)
    try:
        for _, batch in _range_batches(ex, exhaustive, seed, engine.batch_size, start, stop):
            engine.run_batch(batch)
        null = engine.chunk_null()
    except BaseException:
        engine.close()
        raise
    engine.restart()
    with _IDLE_LOCK:
        _IDLE_ENGINES.setdefault(make_engine, []).append(engine)
    return null


#: Engines not running a chunk now, by the ``make_engine`` that built them (weakly: they go
#: when the worker drops the shared task). A list, so that two threads never share one.
_IDLE_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_IDLE_LOCK = threading.Lock()


def _borrow_engine(make_engine: Callable[[], NullEngine]) -> NullEngine:
    """An idle engine of ``make_engine``, or a new one."""
    with _IDLE_LOCK:
        idle = _IDLE_ENGINES.get(make_engine)
        if idle:
            return idle.pop()
    return make_engine()


# ---------------------------------------------------------------------------------------------
# The batch engine
# ---------------------------------------------------------------------------------------------


class NullEngine:
    """Accumulates null maxima and exceedance counts over batches of relabellings.

    The statistic maps of a batch come from :meth:`_stats`, which a subclass defines (the OLS
    engine below; the mixed-effects one in :mod:`bids_group.inference.mixed_permutation`);
    everything else (the identity, thresholds and ties, cluster and TFCE maxima, the result) is
    shared. Subclasses set ``cfg``, ``obs``, ``spatial`` and ``batch_size``, then call
    :meth:`_identity` once. Internal: not a value, not thread-safe.
    """

    cfg: _Config
    obs: _Observed
    spatial: bool
    batch_size: int
    threshold: np.ndarray

    def _stats(self, batch: exch.Relabellings, full, maxima, threshold, counts) -> None:
        """Statistic maps of ``batch``: fill ``maxima`` (n_batch,) with each map's max (of |.|
        when two-sided), add 1 to ``counts`` where a map's value is >= ``threshold`` and, when
        ``full`` (n_batch, n_voxels) float32 is given, write the maps into it."""
        raise NotImplementedError

    def _threshold_set(self) -> None:
        """Hook called once the comparison thresholds are known (after the identity)."""

    def _result_dof(self) -> tuple[float, ...]:
        raise NotImplementedError

    def _result_stat_type(self) -> NullStatType:
        return self.cfg.stat_type

    def close(self) -> None:
        """Release scratch files (none by default)."""

    def for_workers(self, make: Callable[[], NullEngine]) -> Callable[[], NullEngine]:
        """How the executor's workers build their engines (by default as this one was)."""
        return make

    def restart(self) -> None:
        """Back to the state just after the identity, for the next chunk: what
        :meth:`chunk_null` reports is dropped; thresholds and buffers stay (a batch writes its
        buffers whole before reading them)."""
        del self.maxima[1:]
        self.counts[:] = 1
        if self.obs.clusters is not None:
            del self.max_size[1:], self.max_mass[1:]
        if self.obs.tfce is not None:
            del self.tfce_max[1:]
            self.tfce_counts[:] = 1

    def chunk_null(self) -> ChunkNull:
        """What the batches run so far added after the identity (see :func:`run_chunk`)."""
        tfce = self.obs.tfce is not None
        return ChunkNull(
            maxima=self.maxima[1:],
            counts=self.counts - 1,
            max_size=self.max_size[1:] if self.obs.clusters is not None else [],
            max_mass=self.max_mass[1:] if self.obs.clusters is not None else [],
            tfce_max=self.tfce_max[1:] if tfce else [],
            tfce_counts=self.tfce_counts - 1 if tfce else None,
        )

    def merge(self, chunk: ChunkNull) -> None:
        """Add a chunk's relabellings, in stream order (integer counts: exact in any order)."""
        self.maxima.extend(chunk.maxima)
        self.counts += chunk.counts
        if self.obs.clusters is not None:
            self.max_size.extend(chunk.max_size)
            self.max_mass.extend(chunk.max_mass)
        if chunk.tfce_counts is not None:
            self.tfce_max.extend(chunk.tfce_max)
            self.tfce_counts += chunk.tfce_counts

    def _identity(self, cmp_obs: np.ndarray) -> None:
        """Run the identity through the engine, like any relabelling, and set the comparisons.

        Every entry of the null distributions, the first (unpermuted) included, is what the
        engine computes, so a relabelling that is an exact symmetry of the identity (flipping
        every sign, two-sided) gives a bit-equal entry whatever the size of the statistic. An
        observed value is compared as the smaller of its float64 value and the engine's value
        for the identity, less the tie tolerance: rounding can only make p larger.
        """
        cfg, obs = self.cfg, self.obs
        n_rows, n_vox = cfg.data.shape
        ident = exch.Relabellings(np.arange(n_rows, dtype=np.int64)[None, :], np.ones((1, n_rows)))
        stat = np.empty((1, n_vox), dtype=np.float32)
        maxima = np.full(1, -np.inf)
        no_threshold = np.full(n_vox, np.inf)
        self._stats(ident, stat, maxima, no_threshold, np.zeros(n_vox, np.int64))
        id_cmp = np.abs(stat[0], dtype=np.float64) if cfg.two_sided else stat[0].astype(np.float64)
        self.cmp_obs = np.minimum(cmp_obs, id_cmp)
        self.threshold = _tie_threshold(self.cmp_obs)
        self._threshold_set()
        self.counts = np.ones(n_vox, dtype=np.int64)  # the identity always counts
        self.maxima = maxima.tolist()
        if obs.clusters is not None:
            msize = np.zeros(1, dtype=np.int64)
            mmass = np.zeros(1, dtype=np.float64)
            g = cfg.graph
            _kernels.batch_cluster_max(
                stat, obs.height, cfg.two_sided, g.fwd_ptr, g.fwd_idx, msize, mmass
            )
            self.max_size, self.max_mass = msize.tolist(), mmass.tolist()
            _, sizes, masses, _, _ = obs.clusters
            self.size_cmp = np.minimum(sizes, msize[0]).astype(np.float64)
            self.mass_cmp = np.minimum(masses, mmass[0])
        if obs.tfce is not None:
            self.extent_pow = tfce_mod.extent_powers(n_vox, obs.tfce_params.e)
            tf = np.zeros((1, n_vox), dtype=np.float32)
            tmax = np.zeros(1)
            tfce_mod.batch_tfce(
                stat, obs.tfce_params, cfg.two_sided, cfg.graph, tf, tmax, self.extent_pow
            )
            # The FSL preset's steps are discontinuous: a voxel at the top step (h = 100 dh =
            # the map's max) counts or not depending on one rounding, so the float64 map and
            # the engine's (float32 statistic) can differ by a whole step there. Its written map
            # is then the engine's, which its null distribution was made with.
            self.tfce_map = (
                tf[0].astype(np.float64) if obs.tfce_params.integration == "fsl" else obs.tfce
            )
            t_obs = np.abs(self.tfce_map) if cfg.two_sided else self.tfce_map
            t_id = np.abs(tf[0], dtype=np.float64) if cfg.two_sided else tf[0].astype(np.float64)
            self.tfce_cmp = np.minimum(t_obs, t_id)
            self.tfce_threshold = _tie_threshold(self.tfce_cmp)
            self.tfce_counts = np.ones(n_vox, dtype=np.int64)
            self.tfce_max = tmax.tolist()

    def run_batch(self, batch: exch.Relabellings) -> None:
        n_b = len(batch)
        n_vox = self.cfg.data.shape[1]
        maxima = np.full(n_b, -np.inf)
        full = self._buffer("_full", n_b, n_vox) if self.spatial else None
        self._stats(batch, full, maxima, self.threshold, self.counts)
        self.maxima.extend(maxima.tolist())
        if full is not None:
            self._spatial(full)

    def _buffer(self, name: str, n_b: int, n_vox: int) -> np.ndarray:
        """A (n_b, n_vox) float32 scratch array, allocated once per run: a fresh array of
        ~100 MB per batch costs more in page faults than the statistics written into it."""
        buf = getattr(self, name, None)
        if buf is None or buf.shape[0] < n_b:
            buf = np.empty((max(n_b, self.batch_size), n_vox), dtype=np.float32)
            setattr(self, name, buf)
        return buf[:n_b]

    def _spatial(self, full: np.ndarray) -> None:
        cfg = self.cfg
        n_b, n_vox = full.shape
        g = cfg.graph
        if self.obs.height is not None:
            msize = np.zeros(n_b, dtype=np.int64)
            mmass = np.zeros(n_b, dtype=np.float64)
            _kernels.batch_cluster_max(
                full, self.obs.height, cfg.two_sided, g.fwd_ptr, g.fwd_idx, msize, mmass
            )
            self.max_size.extend(msize.tolist())
            self.max_mass.extend(mmass.tolist())
        if self.obs.tfce is not None:
            params = self.obs.tfce_params
            tf = self._buffer("_tf", n_b, n_vox)
            tmax = np.zeros(n_b)
            tfce_mod.batch_tfce(
                full,
                params,
                cfg.two_sided,
                g,
                tf,
                tmax,
                self.extent_pow,
                threshold=self.tfce_threshold,
                counts=self.tfce_counts,
            )
            self.tfce_max.extend(tmax.tolist())

    def result(self, ex: exch.Exchangeability, n_total: int, exhaustive: bool):
        cfg, obs = self.cfg, self.obs
        null_max = np.asarray(self.maxima)
        dof = self._result_dof()
        clusters = tfce_res = None
        if obs.clusters is not None:
            labels, sizes, masses, signs, peaks = obs.clusters
            null_size = np.asarray(self.max_size, dtype=np.int64)
            null_mass = np.asarray(self.max_mass)
            clusters = ClusterInference(
                forming_p=cfg.cluster_forming_p,
                height=obs.height,
                labels=labels,
                sizes=sizes,
                masses=masses,
                signs=signs,
                peaks=peaks,
                p_fwe_size=_fwe_p(self.size_cmp, null_size.astype(np.float64), 0.0),
                p_fwe_mass=_fwe_p(self.mass_cmp, null_mass, TIE_RTOL),
                null_max_size=null_size,
                null_max_mass=null_mass,
            )
        if obs.tfce is not None:
            null_tfce = np.asarray(self.tfce_max)
            tfce_res = TfceInference(
                params=obs.tfce_params,
                connectivity=cfg.graph.connectivity,
                tfce=self.tfce_map,
                p_uncorrected=self.tfce_counts / n_total,
                p_fwe=_fwe_p(self.tfce_cmp, null_tfce, TIE_RTOL),
                null_max=null_tfce,
            )
        return PermutationResult(
            stat_type=self._result_stat_type(),
            stat=obs.stat,
            dof=dof,
            two_sided=cfg.two_sided,
            scheme=ex.scheme,
            whole_blocks=ex.whole_blocks,
            n_relabellings=n_total,
            exhaustive=exhaustive,
            seed=cfg.seed,
            p_uncorrected=self.counts / n_total,
            p_fwe=_fwe_p(self.cmp_obs, null_max, TIE_RTOL),
            null_max_stat=null_max,
            clusters=clusters,
            tfce=tfce_res,
        )


class _Engine(NullEngine):
    """The OLS engine: Freedman-Lane residuals, projections and fused kernels."""

    def __init__(
        self,
        cfg: _Config,
        part: DesignPartition,
        obs: _Observed,
        *,
        flip: bool,
        residuals: SharedTiles | None = None,
    ):
        """``residuals``: the scratch file of the client's engine, which the engines of the
        workers read instead of writing their own (data in the tiled store only)."""
        self.cfg, self.part, self.obs = cfg, part, obs
        self.spatial = cfg.graph is not None
        self.flip = flip
        self.batch_size = BATCH_SPATIAL if self.spatial else BATCH_VOXEL
        n_vox = cfg.data.shape[1]
        n_rows = cfg.data.shape[0]
        rank = part.basis.shape[1]
        if flip and not self.spatial:
            self.batch_size = BATCH_FLIP_VOXEL
        elif flip:
            per_map = 4 * n_vox
            self.batch_size = int(np.clip(SPATIAL_FLIP_BYTES // per_map, BATCH_SPATIAL, 256))
        else:  # the projection, float64 and its copy, within ROW_BYTES
            fitting = ROW_BYTES // (rank * n_rows * 16)
            self.batch_size = int(np.clip(fitting, 1, self.batch_size))
        in_memory = isinstance(cfg.data, np.ndarray)
        resid = np.empty(cfg.data.shape) if in_memory else None
        self.ss, self.rss_id = np.empty(n_vox), np.empty(n_vox)
        for block, tile_resid, ss, rss in _residual_tiles(cfg.data, part):
            if resid is not None:
                resid[:, block] = tile_resid
            self.ss[block], self.rss_id[block] = ss, rss
        self.rss_floor = np.maximum(self.ss * 1e-12, np.finfo(np.float64).tiny)
        self.resid = resid
        self.basis = part.basis
        self.dtype = _product_dtype(self.ss, np.maximum(self.rss_id, self.rss_floor))
        itemsize = np.dtype(self.dtype).itemsize
        cache_tile = max(256, TILE_BYTES // (itemsize * self.batch_size * rank))
        row_tile = max(TILE_ALIGN, ROW_BYTES // (n_rows * itemsize))  # a residual tile
        self.tile = min(n_vox, cache_tile, row_tile)
        if flip:
            self._init_flip(n_rows)
        # contiguous voxel tiles of the residuals, so each product reads one dense block
        self.tile_starts = [] if flip else list(range(0, n_vox, self.tile))
        self.disk: _DiskTiles | None = None
        if resid is not None:
            self.resid_tiles: list[np.ndarray] | _DiskTiles = [
                np.ascontiguousarray(resid[:, s : s + self.tile], dtype=self.dtype)
                for s in self.tile_starts
            ]
        else:
            try:
                self.disk = (
                    self._write_disk_tiles(flip)
                    if residuals is None
                    else _DiskTiles.borrowed(residuals)
                )
            except OSError as exc:  # the scratch file lives beside the store, in -w
                raise _scratch_error(exc, residuals, getattr(cfg.data, "scratch", None)) from exc
            self.resid_tiles = [] if flip else self.disk
        del self.resid
        try:
            self._identity(np.abs(obs.stat) if cfg.two_sided else obs.stat)
        except BaseException:  # Ctrl-C included: the caller gets no engine to close
            self.close()
            raise

    def _threshold_set(self) -> None:
        if self.flip:
            self.v_threshold = _v_threshold(self.threshold, self.cfg.stat_type, self.part)

    def _result_dof(self) -> tuple[float, ...]:
        part = self.part
        if self.cfg.stat_type == "t":
            return (float(part.dof),)
        return (float(part.n_interest), float(part.dof))

    def _write_disk_tiles(self, flip: bool) -> _DiskTiles:
        """The residuals of data in the tiled store, computed again tile by tile (as for the
        sums above) and written to a scratch file: for sign flips in the store's tiles
        (float64), for row permutations in the engine's product tiles (``self.dtype``)."""
        scratch = getattr(self.cfg.data, "scratch", None)
        disk = _DiskTiles(scratch, self.cfg.data.shape[0], np.float64 if flip else self.dtype)
        try:
            self._fill_disk_tiles(disk, flip)
        except BaseException:  # a full disk or Ctrl-C: no partial file left in a kept store
            disk.close()
            raise
        return disk

    def _fill_disk_tiles(self, disk: _DiskTiles, flip: bool) -> None:
        """Append the residual tiles to ``disk`` (see :meth:`_write_disk_tiles`)."""
        cfg = self.cfg
        n_rows, n_vox = cfg.data.shape
        if flip:
            for _, resid, _, _ in _residual_tiles(cfg.data, self.part):
                disk.append(resid)
            return
        buf = np.empty((n_rows, self.tile), dtype=self.dtype)
        filled = 0
        for _, resid, _, _ in _residual_tiles(cfg.data, self.part):
            pos = 0
            while pos < resid.shape[1]:
                width = min(self.tile, n_vox - len(disk) * self.tile)  # the last is shorter
                take = min(width - filled, resid.shape[1] - pos)
                buf[:, filled : filled + take] = resid[:, pos : pos + take]
                filled, pos = filled + take, pos + take
                if filled == width:
                    disk.append(buf[:, :width])
                    filled = 0

    def close(self) -> None:
        """Remove the scratch file of the residuals (tiled store only)."""
        if self.disk is not None:
            self.disk.close()

    def for_workers(self, make: Callable[[], NullEngine]) -> Callable[[], NullEngine]:
        """With data in the tiled store, the workers' engines read this engine's residuals
        (written once, in the shared work folder) instead of each writing its own copy."""
        return make if self.disk is None else partial(make, residuals=self.disk.shared())

    def _init_flip(self, n_rows: int) -> None:
        """State of the subset-sum-table kernel (sign flips only; see ``_kernels``)."""
        # (n_rows, n_voxels) float64 in memory; from the tiled store, read tile by tile
        self.flip_resid = None if self.resid is None else np.ascontiguousarray(self.resid)
        self.flip_rss = self.rss_id.astype(np.float32)
        tiny = np.finfo(np.float32).tiny
        self.flip_floor = np.maximum(self.ss * 1e-12, tiny).astype(np.float32)
        self.n_bits = _table_bits(n_rows, self.batch_size, self.basis.shape[1])

    def _projection(self, batch: exch.Relabellings) -> np.ndarray:
        """(n_batch * rank, n_rows) matrix M (``self.dtype``) with M @ E = U' P E for each
        relabelling."""
        n_b, n = batch.perm.shape
        rank = self.basis.shape[1]
        m = np.zeros((n_b, rank, n))
        rows = np.arange(n_b)[:, None]
        m[rows, :, batch.perm] = batch.signs[:, :, None] * self.basis[None, :, :]
        return np.ascontiguousarray(m.reshape(n_b * rank, n), dtype=self.dtype)

    def _stats(self, batch: exch.Relabellings, full, maxima, threshold, counts) -> None:
        if self.flip:
            self._flip_stats(batch, full, maxima, threshold, counts)
        else:
            self._product_stats(batch, full, maxima, threshold, counts)

    def _flip_stats(self, batch: exch.Relabellings, full, maxima, threshold, counts) -> None:
        if threshold is getattr(self, "threshold", None):
            v_threshold = self.v_threshold
        else:
            v_threshold = _v_threshold(threshold, self.cfg.stat_type, self.part)
        if self.disk is None:
            self._flip_kernel(
                self.flip_resid, slice(None), batch, v_threshold, full, maxima, counts
            )
            return
        start = 0
        for resid in self.disk:
            block = slice(start, start + resid.shape[1])
            out = None if full is None else np.empty((len(batch), resid.shape[1]), np.float32)
            tile_max = np.full(len(batch), -np.inf)
            self._flip_kernel(resid, block, batch, v_threshold, out, tile_max, counts[block])
            np.maximum(maxima, tile_max, out=maxima)
            if full is not None:
                full[:, block] = out
            start = block.stop

    def _flip_kernel(self, resid, block, batch, v_threshold, full, maxima, counts) -> None:
        """The subset-sum kernel on the voxels ``block`` (whose residuals are ``resid``)."""
        _kernels.flip_table_stats(
            resid,
            np.ascontiguousarray(self.basis),
            _flip_codes(batch.signs, self.n_bits),
            self.n_bits,
            self.flip_rss[block],
            self.flip_floor[block],
            self.part.n_interest,
            float(self.part.dof),
            self.cfg.stat_type == "t",
            self.cfg.two_sided,
            v_threshold[block],
            full is not None,
            full if full is not None else np.empty((1, 1), np.float32),
            maxima,
            counts,
        )

    def _product_stats(self, batch: exch.Relabellings, full, maxima, threshold, counts) -> None:
        cfg, part = self.cfg, self.part
        n_b = len(batch)
        proj = self._projection(batch)
        rank = self.basis.shape[1]
        for start, tile in zip(self.tile_starts, self.resid_tiles, strict=True):
            stop = start + tile.shape[1]
            w = proj @ tile
            out = (
                full[:, start:stop]
                if full is not None
                else np.empty((n_b, stop - start), dtype=np.float32)
            )
            _kernels.fused_stat_max_counts(
                w,
                self.ss[start:stop],
                self.rss_floor[start:stop],
                rank,
                part.n_interest,
                float(part.dof),
                cfg.stat_type == "t",
                cfg.two_sided,
                threshold,
                start,
                out,
                maxima,
                counts,
            )


def _tie_threshold(observed: np.ndarray) -> np.ndarray:
    """Observed value less the tie tolerance: null values >= it count (TIE_RTOL, relative)."""
    return observed - TIE_RTOL * np.maximum(np.abs(observed), 1.0)


def _v_threshold(threshold: np.ndarray, stat_type: StatType, part: DesignPartition) -> np.ndarray:
    """Thresholds on the statistic mapped to the flip kernel's v scale, rounded down to float32.

    t = sign(v) sqrt(dof |v|) and F = (dof / q) v are increasing in v, so ``stat >= thr`` iff
    ``v >= v(thr)``; rounding down keeps ties counted (p can only grow). v is t^2 / dof, so
    the relative tolerance survives the mapping at any size (it did not on the former u =
    t^2 / (t^2 + dof) scale: for t >~ 100, u(thr) and u(obs) were the same float32).
    """
    thr = np.asarray(threshold, dtype=np.float64)
    dof = float(part.dof)
    with np.errstate(invalid="ignore", over="ignore"):
        if stat_type == "t":
            v = np.sign(thr) * (thr / dof) * thr
        else:
            v = thr * (part.n_interest / dof)
        v = np.where(np.isinf(thr), thr, v)
    v32 = v.astype(np.float32)
    return np.where(v32 > v, np.nextafter(v32, np.float32(-np.inf)), v32).astype(np.float32)


def _product_dtype(ss: np.ndarray, rss: np.ndarray) -> type:
    """float32 for the row-permutation products, unless rounding could reach PRODUCT_RTOL.

    >>> _product_dtype(np.array([2.0]), np.array([1.0])).__name__
    'float32'
    >>> _product_dtype(np.array([1e4]), np.array([1.0])).__name__  # t = 100 sqrt(dof)
    'float64'
    """
    fit = float(np.max(ss / rss, initial=1.0))
    return np.float64 if 2 * np.finfo(np.float32).eps * fit > PRODUCT_RTOL else np.float32


def _residual_ss(resid: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Residual sum of squares of the full model fitted to each column of ``resid`` (float64),
    from the residuals themselves (accurate however good the fit)."""
    out = np.empty(resid.shape[1])
    for start in range(0, resid.shape[1], _PARAMETRIC_TILE):
        y = resid[:, start : start + _PARAMETRIC_TILE]
        out[start : start + _PARAMETRIC_TILE] = np.sum((y - basis @ (basis.T @ y)) ** 2, axis=0)
    return out


def _flip_codes(signs: np.ndarray, n_bits: int) -> np.ndarray:
    """Sign flips as the table codes of ``_kernels.flip_table_stats``.

    ``signs`` (n_batch, n_rows) of +-1; returns (n_batch, ceil(n_rows / n_bits)) int64 whose
    bit j of column g is set when row ``g * n_bits + j`` is flipped (sign < 0).
    """
    n_batch, n_rows = signs.shape
    n_groups = -(-n_rows // n_bits)
    flipped = np.zeros((n_batch, n_groups * n_bits), dtype=np.int64)
    flipped[:, :n_rows] = signs < 0
    weights = np.left_shift(1, np.arange(n_bits, dtype=np.int64))
    return np.ascontiguousarray(flipped.reshape(n_batch, n_groups, n_bits) @ weights)


def _table_bits(n_rows: int, batch_size: int, n_rank: int = 1) -> int:
    """Rows per subset-sum table group.

    Minimises the work per tile, groups * (table rows to build + relabellings to sum), with the
    tables of one tile within ``TABLE_BYTES`` (they are read at random, so they must stay in the
    core's L2 cache).
    """
    row_bytes = _kernels._SUB * 4

    def fits(b: int) -> bool:
        return n_rank * -(-n_rows // b) * (1 << b) * row_bytes <= TABLE_BYTES

    cost = {
        b: -(-n_rows // b) * ((1 << b) + batch_size)
        for b in range(1, min(n_rows, 10) + 1)
        if fits(b) or b == 1
    }
    return min(cost, key=cost.get)


def _fwe_p(observed: np.ndarray, null_max: np.ndarray, rtol: float) -> np.ndarray:
    """#{null_max >= observed - tol} / N for each observed value (tol = rtol * max(|obs|, 1))."""
    srt = np.sort(null_max)
    thresh = observed - rtol * np.maximum(np.abs(observed), 1.0)
    n_ge = srt.size - np.searchsorted(srt, thresh, side="left")
    return n_ge / srt.size
