"""Load the maps into a masked data matrix: grid checks, optional resampling, mask, smoothing.

This is the only module (with :mod:`bids_group.outputs`) that reads NIfTI.

Speed: decompressing gzip is the floor. A ``.nii.gz`` is read whole and inflated with one
call, by ISA-L (the ``isal`` package, the ``fast`` extra: about 1.7x less CPU than zlib for the
same bytes) when installed, else by :mod:`zlib`; both release the GIL, so ``n_jobs`` threads
inflate files in parallel. The header is parsed by nibabel from the inflated bytes and the
voxels are viewed, not copied, as float32 when stored so. Each volume is masked as soon as it
is read, so memory stays about ``n_maps x n_voxels`` float32 plus ``n_jobs`` full volumes.
"""

from __future__ import annotations

import io
import logging
import mmap
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from bids_group.errors import DataError, MissingInputError, UsageError
from bids_group.memory import TiledMaps

if TYPE_CHECKING:  # streamed_fit imports glm; only for the annotation
    from bids_group.streamed_fit import StreamedOls

log = logging.getLogger(__name__)

#: Grids are the same when shapes are equal and affines agree to this (mm), element-wise.
AFFINE_ATOL = 1e-4
#: Spline order used to resample maps (3 = cubic, what nilearn calls "continuous").
MAP_RESAMPLING_ORDER = 3
#: How many offending files an error or warning lists.
_MAX_LISTED_COVERAGE = 3
#: Largest grid --target-voxel-size may make: 100 million voxels is 400 MB per float32 map.
MAX_TARGET_VOXELS = 100_000_000
_MAX_LISTED = 5
_FWHM_TO_SIGMA = np.sqrt(8.0 * np.log(2.0))


@dataclass(frozen=True)
class MaskedData:
    """The data matrix the GLM sees.

    Attributes
    ----------
    data : ndarray of shape (n_maps, n_voxels), float32, TiledMaps, or StreamedOls
        In-mask values, finite everywhere, rows in the order of the input paths; in memory,
        or in the voxel-tiled store of :mod:`bids_group.store` when they do not fit in the
        memory budget (``data.shape`` is the same; read it with
        :func:`bids_group.memory.iter_tiles`); or, when they do not fit and the run needs
        them only for an OLS fit, that fit alone (:mod:`bids_group.streamed_fit`).
    mask : ndarray of shape (nx, ny, nz), bool
        ``mask.sum() == n_voxels``; column ``j`` of ``data`` is the ``j``-th True voxel of
        ``mask`` in C order (``data[:, j] == volume[mask][j]``).
    affine : ndarray of shape (4, 4), float64
    voxel_size : tuple of float
        Voxel sizes in mm (norms of the affine's columns).
    n_dropped : int
        Automatic mask: voxels finite and non-zero in at least one map but not in all of them.
        User mask: voxels of the mask dropped because some map is non-finite there.
    """

    data: np.ndarray | TiledMaps | StreamedOls
    mask: np.ndarray
    affine: np.ndarray
    voxel_size: tuple[float, float, float]
    n_dropped: int = 0

    def restricted(self, keep: np.ndarray) -> MaskedData:
        """The same data on the voxels where ``keep`` is True; the others leave the mask
        (and count as dropped)."""
        if not isinstance(self.data, np.ndarray):
            raise TypeError("restricted() needs the data in memory, not in the tiled store")
        keep = np.asarray(keep, dtype=bool)
        mask = self.mask.copy()
        mask[mask] = keep
        return replace(
            self,
            data=np.ascontiguousarray(self.data[:, keep]),
            mask=mask,
            n_dropped=self.n_dropped + int(np.count_nonzero(~keep)),
        )


@dataclass(frozen=True)
class _Grid:
    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        return _voxel_size(self.affine)

    def same_as(self, other: _Grid) -> bool:
        return self.shape == other.shape and np.allclose(
            self.affine, other.affine, rtol=0, atol=AFFINE_ATOL
        )

    def describe(self) -> str:
        size = "x".join(f"{v:g}" for v in np.round(self.voxel_size, 3))
        origin = ", ".join(f"{v:g}" for v in np.round(self.affine[:3, 3], 2))
        return f"shape {self.shape}, voxel {size} mm, origin ({origin})"


def load_masked_data(
    paths: Sequence[Path],
    *,
    mask_path: Path | None = None,
    resample: bool = False,
    smoothing_fwhm: float | None = None,
    n_jobs: int = 1,
    target_voxel_size: float | None = None,
    min_maps: int | None = None,
) -> MaskedData:
    """Read maps as float32, check/resample grids, build the mask, smooth, and mask.

    Order of operations per map: read -> resample (only with ``resample=True`` and a map off
    the target grid) -> support (finite and non-zero voxels) -> smooth -> mask.

    * Grid: all maps must share the shape and affine (``atol`` 1e-4 mm) of the target grid,
      which is the mask's grid when ``mask_path`` is given, else the first map's.
      ``resample=True`` resamples maps off that grid with cubic splines (order 3, nilearn's
      "continuous"); their support (finite and non-zero voxels) is resampled with nearest
      neighbour, so NaN regions (SPM) and the field of view stay excluded.
    * Mask: without ``mask_path``, voxels finite and non-zero in every map. With ``mask_path``,
      voxels of the mask > 0, less those non-finite in some map (dropped with a warning).
    * Smoothing (``smoothing_fwhm`` mm, isotropic) equals ``nilearn.image.smooth_img``:
      non-finite values set to 0, then a 1-D Gaussian (scipy, mode "reflect", truncate 4) along
      each axis with sigma = fwhm / (sqrt(8 ln 2) * voxel size). It is applied to the whole
      volume before masking, so zeros outside a map's support bleed in near its edge, as in
      nilearn. The mask is computed from the unsmoothed maps.

    Parameters
    ----------
    paths : sequence of Path
        NIfTI-1/2 maps (``.nii``, ``.nii.gz``, or other formats nibabel reads), 3-D or 4-D with
        one volume.
    mask_path : Path, optional
        Binary mask image (values > 0 are in).
    resample : bool
        Resample maps off the target grid instead of stopping.
    smoothing_fwhm : float, optional
        Gaussian FWHM in mm; None or 0: no smoothing.
    n_jobs : int
        Threads reading maps (>= 1).
    target_voxel_size : float, optional
        Resample every map (and the mask, nearest neighbour) to a grid of this isotropic voxel
        size in mm before anything else, as nilearn's ``target_affine``/``target_shape``: the
        grid keeps the reference grid's orientation, origin and field of view
        (:func:`target_grid`). Maps are resampled as with ``resample`` (cubic splines).
    min_maps : int, optional
        Per-voxel missing data (coverage): the mask is the voxels (of ``mask_path``, or of any
        map) where at least ``min_maps`` maps have data (finite and non-zero; finite with
        ``mask_path``), and a map without data at a mask voxel is NaN there. None: every map
        must have data at every mask voxel (the intersection; today's default).

    Returns
    -------
    MaskedData

    Raises
    ------
    DataError (65)
        Unreadable / non-NIfTI / non-3-D map, grid mismatch without ``resample``, non-binary or
        empty mask.
    MissingInputError (66)
        A map or the mask file does not exist.
    """
    return stack_volumes(
        open_volumes(
            paths,
            mask_path=mask_path,
            resample=resample,
            smoothing_fwhm=smoothing_fwhm,
            n_jobs=n_jobs,
            target_voxel_size=target_voxel_size,
        ),
        min_maps=min_maps,
    )


@dataclass(frozen=True)
class VolumeStream:
    """Maps being decoded one at a time, on their target grid (see :func:`open_volumes`).

    Attributes
    ----------
    paths : list of Path
    target : grid of every volume (shape and affine)
    user_mask : ndarray of shape target.shape, bool, or None (automatic mask)
    mask_path : Path or None
    volumes : iterator of volumes in input order (``index``, ``support``, ``finite``, ``data``
        flattened in Fortran order)
    grids : grid of each map as read (before resampling)
    sigma : smoothing sigma per axis in voxels, or None
        With ``grids``, what decodes any run of maps anywhere (:meth:`decode_maps`), e.g. in a
        Dask task.
    decode : the same decoding, as a function of ``after`` (see :func:`_iter_volumes`), for a
        caller that does per-map work in the decoding threads (use one of the two)
    """

    paths: list[Path]
    target: _Grid
    user_mask: np.ndarray | None
    mask_path: Path | None
    volumes: Iterator[_Volume]
    grids: Sequence[_Grid] = ()
    sigma: np.ndarray | None = None
    decode: Callable[..., Iterator[Any]] | None = None

    def decode_maps(self, start: int, stop: int, n_jobs: int = 1) -> Iterator[_Volume]:
        """Maps ``start .. stop - 1`` decoded by ``n_jobs`` threads, in order, exactly as
        :attr:`volumes` yields them."""
        paths, grids = self.paths[start:stop], self.grids[start:stop]
        for volume in _iter_volumes(paths, grids, self.target, sigma=self.sigma, n_jobs=n_jobs):
            yield replace(volume, index=start + volume.index)


def open_volumes(
    paths: Sequence[Path],
    *,
    mask_path: Path | None = None,
    resample: bool = False,
    smoothing_fwhm: float | None = None,
    n_jobs: int = 1,
    target_voxel_size: float | None = None,
) -> VolumeStream:
    """Check the grids and the mask, and start decoding: the first half of
    :func:`load_masked_data` (same parameters), whose volumes the caller stacks (in memory with
    :func:`stack_volumes`, or into the tiled store of :mod:`bids_group.store`). The volumes are
    decoded lazily: nothing is read until the first is asked for."""
    if not paths:
        raise DataError("No map to load")
    paths = [Path(p) for p in paths]
    grids = [_read_grid(p) for p in paths]
    user_mask = None
    if mask_path is not None:
        user_mask, target = _read_mask(Path(mask_path))
    else:
        target = grids[0]
    if target_voxel_size is not None:
        reference = target
        target = target_grid(reference, target_voxel_size)
        log.info("Target grid: %s (from %s)", target.describe(), reference.describe())
        if user_mask is not None:
            user_mask = _resample_mask(user_mask, reference, target)
        resample = True
    _check_grids(paths, grids, target, resample=resample, mask_path=mask_path)

    sigma = _sigma(target.affine, smoothing_fwhm, target.shape)
    decode = partial(_iter_volumes, paths, grids, target, sigma=sigma, n_jobs=n_jobs)
    return VolumeStream(
        paths=paths,
        target=target,
        user_mask=user_mask,
        mask_path=None if mask_path is None else Path(mask_path),
        volumes=decode(),  # a generator: nothing is decoded unless it is read
        decode=decode,
        grids=grids,
        sigma=sigma,
    )


def stack_volumes(stream: VolumeStream, *, min_maps: int | None = None) -> MaskedData:
    """The masked data matrix of every volume of ``stream``, in memory (``min_maps``: see
    :func:`load_masked_data`)."""
    paths, target = stream.paths, stream.target
    if min_maps is not None:
        data, mask, n_dropped = _stack_coverage(stream.volumes, target.shape, len(paths),
                                                min_maps, stream.user_mask)  # fmt: skip
    elif stream.user_mask is None:
        decode = stream.decode or partial(_after_in_caller, stream.volumes)
        data, mask, n_dropped, coverage = _stack_auto_mask(decode, target.shape, len(paths))
        _log_auto_mask(int(mask.sum()), n_dropped, coverage, paths)
    else:
        data, mask, n_dropped = _stack_user_mask(
            stream.volumes, stream.user_mask, paths, stream.mask_path
        )
    if not mask.any():
        raise DataError(_empty_mask_message(paths, stream.mask_path))
    return MaskedData(
        data=data,
        mask=mask,
        affine=target.affine,
        voxel_size=target.voxel_size,
        n_dropped=n_dropped,
    )


def load_on_mask(
    paths: Sequence[Path],
    data: MaskedData,
    *,
    n_jobs: int = 1,
    what: str = "map",
) -> np.ndarray:
    """Read more maps at the voxels of an existing mask, e.g. the variances of the effects.

    The maps must be on the grid of ``data`` (they are not resampled: an interpolated variance
    is not the variance of the interpolated effect). Nothing is dropped: non-finite values are
    returned as they are, for the caller's policy.

    Parameters
    ----------
    paths : sequence of Path
        One map per row of ``data.data``, in the same order.
    data : MaskedData
        Gives the grid and the mask.
    what : str
        What the maps are, for messages ("variance map").

    Returns
    -------
    ndarray of shape (len(paths), n_voxels), float32
    """
    paths = [Path(p) for p in paths]
    target = _Grid(tuple(int(n) for n in data.mask.shape), data.affine)
    grids = [_read_grid(p) for p in paths]
    off = [p for p, g in zip(paths, grids, strict=True) if not g.same_as(target)]
    if off:
        raise DataError(
            f"{len(off)} {what}(s) are not on the grid of the effect maps ({target.describe()}), "
            f"e.g. {off[0]}: each must be on the grid of its effect map"
        )
    indices = _fortran_indices_in_c_order(data.mask)
    out = _empty_matrix(len(paths), indices.size)  # no huge-page stall (see there)
    for volume in _iter_volumes(paths, grids, target, sigma=None, n_jobs=n_jobs):
        np.take(volume.data, indices, out=out[volume.index])
    return out


def unmask(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Put masked values back on the grid.

    Parameters
    ----------
    values : ndarray of shape (n_voxels,) or (n_maps, n_voxels)
    mask : ndarray of shape (nx, ny, nz), bool

    Returns
    -------
    ndarray of shape (nx, ny, nz) or (nx, ny, nz, n_maps), float32
        0 outside the mask.

    Examples
    --------
    >>> mask = np.array([[[True, False], [False, True]]])
    >>> unmask(np.array([1.0, 2.0]), mask)[0]
    array([[1., 0.],
           [0., 2.]], dtype=float32)
    """
    values = np.asarray(values)
    mask = np.asarray(mask, dtype=bool)
    if values.shape[-1] != mask.sum() or values.ndim not in (1, 2):
        raise ValueError(
            f"values of shape {values.shape} do not fit a mask of {int(mask.sum())} voxels"
        )
    if values.ndim == 1:
        out = np.zeros(mask.shape, dtype=np.float32)
        out[mask] = values
        return out
    out = np.zeros((*mask.shape, values.shape[0]), dtype=np.float32)
    out[mask] = values.T
    return out


# --- Reading --------------------------------------------------------------------------------------


def _voxel_size(affine: np.ndarray) -> tuple[float, float, float]:
    sizes = np.sqrt(np.sum(np.asarray(affine)[:3, :3] ** 2, axis=0))
    return (float(sizes[0]), float(sizes[1]), float(sizes[2]))


def _load_image(path: Path) -> nib.spatialimages.SpatialImage:
    """nib.load with our errors (header only: the data stay on disk)."""
    if not path.exists():
        raise MissingInputError(f"{path} does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path} is empty (0 bytes): re-create or exclude it")
    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises many types for bad files; say which file.
        raise DataError(
            f"Cannot read {path} as a NIfTI image ({err}); re-create or exclude it"
        ) from err


def _spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """3-D shape, accepting trailing singleton dimensions (one 4-D volume)."""
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        raise DataError(
            f"{path} has shape {tuple(shape)}: each map must be one 3-D volume (a 4-D image "
            "with one volume is accepted); split multi-volume images into one file per map"
        )
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def _read_grid(path: Path) -> _Grid:
    header = _single_file_nifti_header(path)
    if header is not None:  # the common case, without nib.load's format sniffing (~1 ms a file)
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
        return _Grid(_spatial_shape(header.get_data_shape(), path), affine)
    img = _load_image(path)
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image | nib.Nifti1Pair | nib.Nifti2Pair):
        log.warning("%s is a %s, not NIfTI; reading it anyway", path, type(img).__name__)
    return _Grid(_spatial_shape(img.shape, path), np.asarray(img.affine, dtype=np.float64))


#: Bytes of a .nii.gz read to find its header: the gzip header (with a file name) and the
#: deflated 540-byte NIfTI header fit in far less.
_HEADER_READ = 16384


def _single_file_nifti_header(path: Path) -> nib.Nifti1Header | nib.Nifti2Header | None:
    """The header of a plain single-file NIfTI-1/2 (``.nii``, ``.nii.gz``, no extension), from
    its first bytes; None for anything else or anything odd, which nib.load then reads (and
    words the errors of), so the result is always what nib.load gives."""
    name = path.name
    if not name.endswith((".nii", ".nii.gz")):
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER_READ)
        if name.endswith(".gz"):
            head = zlib.decompressobj(wbits=31).decompress(head, 544)
    except (OSError, zlib.error):
        return None
    if len(head) >= 348 and head[344:348] == b"n+1\0":
        header_class, size = nib.Nifti1Header, 348
    elif len(head) >= 544 and head[4:12] == b"n+2\0\r\n\x1a\n":
        header_class, size = nib.Nifti2Header, 540
    else:
        return None
    if head[size : size + 4].strip(b"\0"):  # extensions follow: let nib.load read them
        return None
    try:
        return header_class.from_fileobj(io.BytesIO(head[:size]))
    except Exception:  # nibabel raises many types for bad headers; nib.load will say which
        return None


def _read_array(path: Path) -> np.ndarray:
    """Voxels of ``path`` as float32, spatial shape (scaling applied); may be read-only."""
    try:
        if path.name.endswith(".nii.gz"):
            data = _nifti_gz_array(path)
        else:
            img = nib.load(path)
            data = np.asanyarray(img.dataobj)
    except DataError:
        raise
    except Exception as err:  # a truncated / corrupt file fails here, after its header was read
        raise DataError(
            f"Cannot read the voxels of {path} ({err}); re-create or exclude it"
        ) from err
    data = data.reshape(_spatial_shape(data.shape, path), order="A")
    return data if data.dtype == np.float32 else data.astype(np.float32)


def _nifti_gz_array(path: Path) -> np.ndarray:
    """Inflate a .nii.gz in one call (GIL released) and view its voxels without a copy;
    scaled maps come back in float64, as nibabel reads them."""
    raw = _gunzip(path.read_bytes(), path)
    if len(raw) < 348:
        raise DataError(f"{path} inflates to {len(raw)} bytes: not a NIfTI image")
    nifti2 = int.from_bytes(raw[:4], "little") in (540, 540 << 24)
    header_class = nib.Nifti2Header if nifti2 else nib.Nifti1Header
    header = header_class.from_fileobj(io.BytesIO(raw))
    shape = header.get_data_shape()
    dtype = header.get_data_dtype()
    count = int(np.prod(shape))
    offset = int(header.get_data_offset())
    if offset + count * dtype.itemsize > len(raw):
        raise DataError(
            f"{path} is truncated: its header announces {count} voxels of {dtype} from byte "
            f"{offset}, but it holds {len(raw)} bytes; re-create it"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")
    slope, inter = header.get_slope_inter()
    slope = 1.0 if slope is None else slope
    inter = 0.0 if inter is None else inter
    if slope == 1.0 and inter == 0.0:
        return data
    # As nibabel's read, so that .nii.gz, .nii and nibabel agree bit for bit: in float64, each
    # step skipped when neutral (-0.0 stays -0.0), rounded to float32 once by the caller.
    scaled = data.astype(np.float64)
    if slope != 1.0:
        scaled *= slope
    if inter != 0.0:
        scaled += inter
    return scaled


def _inflate_module() -> ModuleType:
    """ISA-L's drop-in zlib when the ``fast`` extra is installed, else :mod:`zlib`.

    Inflating is exact whichever library does it (the tests compare the arrays); ISA-L's igzip
    is only faster. Both check the gzip CRC-32 and length, and report a truncated stream the
    same way (``eof`` False).
    """
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib
    return isal_zlib


#: The module that inflates .nii.gz files: ``isal.isal_zlib`` or ``zlib``.
INFLATE = _inflate_module()


def _gunzip(compressed: bytes, path: Path, inflate: ModuleType | None = None) -> bytes:
    """Inflate every gzip member of ``compressed`` with ``inflate`` (default :data:`INFLATE`)."""
    inflate = INFLATE if inflate is None else inflate
    out = []
    while compressed:
        inflater = inflate.decompressobj(wbits=31)
        try:
            out.append(inflater.decompress(compressed))
        except (zlib.error, inflate.error) as err:
            raise DataError(f"{path} is not a valid gzip file ({err}); re-create it") from err
        if not inflater.eof:
            raise DataError(f"{path} is truncated (gzip stream ends early); re-create it")
        compressed = inflater.unused_data
    return b"".join(out)


# --- Grids and resampling -------------------------------------------------------------------------


def _read_mask(path: Path) -> tuple[np.ndarray, _Grid]:
    if not path.exists():
        raise MissingInputError(f"Mask {path} does not exist: check the --mask path")
    img = _load_image(path)
    grid = _Grid(_spatial_shape(img.shape, path), np.asarray(img.affine, dtype=np.float64))
    values = np.asarray(img.dataobj).reshape(grid.shape)
    finite = values[np.isfinite(values)]
    levels = np.unique(finite)
    integral = bool(np.all(levels == np.round(levels))) and bool(np.all(levels >= 0))
    if not (integral or len(levels) <= 2):
        raise DataError(
            f"Mask {path} is not binary ({len(levels)} distinct values from {levels.min():g} to "
            f"{levels.max():g}); threshold and binarise it first (values > 0 are in the mask)"
        )
    mask = np.isfinite(values) & (values > 0)
    if not mask.any():
        raise DataError(f"Mask {path} has no voxel > 0: give a non-empty mask")
    return mask, grid


def _check_grids(
    paths: Sequence[Path],
    grids: Sequence[_Grid],
    target: _Grid,
    *,
    resample: bool,
    mask_path: Path | None,
) -> None:
    off = [(p, g) for p, g in zip(paths, grids, strict=True) if not g.same_as(target)]
    if not off or resample:
        if off:
            log.info("Resampling %d of %d maps to %s", len(off), len(paths), target.describe())
        return
    reference = f"the mask {mask_path}" if mask_path is not None else f"the first map {paths[0]}"
    listed = "; ".join(f"{p} ({g.describe()})" for p, g in off[:_MAX_LISTED])
    more = f" and {len(off) - _MAX_LISTED} more" if len(off) > _MAX_LISTED else ""
    raise DataError(
        f"{len(off)} map(s) are not on the grid of {reference} ({target.describe()}): "
        f"{listed}{more}. Use --resample to resample them to that grid"
    )


def target_grid(reference: _Grid, voxel_size: float) -> _Grid:
    """An isotropic grid of ``voxel_size`` mm over the field of view of ``reference``.

    Same axis directions and the same first voxel centre (the affine's origin); the shape
    covers the reference's extent: ``ceil(shape * old size / new size)`` voxels per axis.

    >>> ref = _Grid((10, 10, 10), np.diag([2.0, 2.0, 2.0, 1.0]))
    >>> grid = target_grid(ref, 3.0)
    >>> grid.shape, np.diag(grid.affine).tolist()
    ((7, 7, 7), [3.0, 3.0, 3.0, 1.0])
    """
    if not (np.isfinite(voxel_size) and voxel_size > 0):
        raise UsageError(f"target voxel size == {voxel_size}, must be a finite number > 0 mm")
    old_sizes = np.asarray(reference.voxel_size)
    directions = reference.affine[:3, :3] / old_sizes  # unit column vectors
    affine = np.eye(4)
    affine[:3, :3] = directions * voxel_size
    affine[:3, 3] = reference.affine[:3, 3]
    shape = np.ceil(np.asarray(reference.shape) * old_sizes / voxel_size - 1e-9).astype(int)
    shape = np.maximum(shape, 1)
    if np.prod(shape.astype(float)) > MAX_TARGET_VOXELS:
        raise UsageError(
            f"--target-voxel-size {voxel_size:g} mm makes a grid of "
            f"{' x '.join(str(n) for n in shape)} voxels over {reference.describe()}: more than "
            f"{MAX_TARGET_VOXELS:,} voxels per map; choose a larger voxel size"
        )
    return _Grid(tuple(int(n) for n in shape), affine)


def _resample_mask(mask: np.ndarray, source: _Grid, target: _Grid) -> np.ndarray:
    """Nearest-neighbour resampling of a boolean mask."""
    transform = np.linalg.solve(source.affine, target.affine)
    return ndimage.affine_transform(
        mask.astype(np.uint8), transform[:3, :3], offset=transform[:3, 3],
        output_shape=target.shape, order=0, mode="constant", cval=0,
    ).astype(bool)  # fmt: skip


def _resample(data: np.ndarray, source: _Grid, target: _Grid) -> np.ndarray:
    """Cubic-spline resampling of ``data`` onto ``target``; NaN where the source had no data."""
    # target voxel -> source voxel: inv(A_source) @ A_target
    transform = np.linalg.solve(source.affine, target.affine)
    support = np.isfinite(data) & (data != 0)
    filled = np.where(support, data, 0).astype(np.float32, copy=False)
    values = ndimage.affine_transform(
        filled,
        transform[:3, :3],
        offset=transform[:3, 3],
        output_shape=target.shape,
        order=MAP_RESAMPLING_ORDER,
        mode="constant",
        cval=0.0,
        output=np.float32,
    )
    kept = ndimage.affine_transform(
        support.astype(np.uint8),
        transform[:3, :3],
        offset=transform[:3, 3],
        output_shape=target.shape,
        order=0,
        mode="constant",
        cval=0,
    ).astype(bool)
    values[~kept] = np.nan
    return values


# --- Smoothing --------------------------------------------------------------------------------


def _sigma(
    affine: np.ndarray, fwhm: float | None, shape: tuple[int, ...] | None = None
) -> np.ndarray | None:
    """Per-axis Gaussian sigma in voxels, as nilearn.image.smooth_img computes it.

    A FWHM wider than the field of view (``shape`` x voxel size, on every axis) is valid but
    almost surely a mistake (mm vs voxels?): it is smoothed as asked, with a warning.
    """
    if fwhm is None or fwhm == 0:
        return None
    if not np.isfinite(fwhm) or fwhm < 0:
        raise DataError(f"smoothing FWHM == {fwhm}, must be a finite number >= 0 mm")
    voxel = np.asarray(_voxel_size(affine))
    if shape is not None:
        field = np.asarray(shape[:3]) * voxel
        if fwhm > field.max():
            log.warning(
                "smoothing FWHM %g mm is wider than the field of view of the maps (%s mm): "
                "every map becomes almost flat; was it meant in voxels, or smaller?",
                fwhm, " x ".join(f"{f:g}" for f in field),
            )  # fmt: skip
    return fwhm / (_FWHM_TO_SIGMA * voxel)


def smooth_volume(data: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Gaussian smoothing in place of a float32 3-D volume (non-finite values set to 0 first).

    Parameters
    ----------
    data : ndarray of shape (nx, ny, nz), float32
        Modified in place.
    sigma : ndarray of shape (3,)
        Standard deviation in voxels along each axis (0: no smoothing on that axis).

    Returns
    -------
    ndarray of shape (nx, ny, nz), float32
        ``data``, smoothed.
    """
    data[~np.isfinite(data)] = 0
    for axis, s in enumerate(sigma):
        if s > 0:
            ndimage.gaussian_filter1d(data, s, output=data, axis=axis)
    return data


# --- Masking --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Volume:
    """One map after reading (and resampling), flattened in Fortran (NIfTI) order.

    Flat Fortran order is a free view of what nibabel reads, whereas C order would copy.
    """

    index: int
    support: np.ndarray  # bool (n_grid,): finite and non-zero before smoothing
    finite: np.ndarray  # bool (n_grid,): finite before smoothing
    data: np.ndarray  # float32 (n_grid,), possibly smoothed


def _prepare(
    index: int, path: Path, grid: _Grid, target: _Grid, sigma: np.ndarray | None
) -> _Volume:
    data = _read_array(path)
    if not grid.same_as(target):
        data = _resample(data, grid, target)
    data = np.asfortranarray(data)
    finite = np.isfinite(data)
    support = finite & (data != 0)
    if sigma is not None:
        data = smooth_volume(data if data.flags.writeable else data.copy(order="F"), sigma)
    return _Volume(
        index=index,
        support=support.ravel(order="F"),
        finite=finite.ravel(order="F"),
        data=data.ravel(order="F"),
    )


def _iter_volumes(
    paths: Sequence[Path],
    grids: Sequence[_Grid],
    target: _Grid,
    *,
    sigma: np.ndarray | None,
    n_jobs: int,
    after: Callable[[_Volume], Any] | None = None,
) -> Iterator[Any]:
    """Volumes in input order; at most about ``2 * n_jobs`` are in memory at once.

    With ``after``, the first volume is decoded alone and yielded as it is; for every other
    one, ``after(volume)`` runs in the decoding thread (while the volume is in that core's
    cache) and its result is yielded instead. The caller sets up what ``after`` needs from
    the first volume before asking for the second.
    """
    items = list(zip(range(len(paths)), paths, grids, strict=True))
    if after is not None and items:
        yield _prepare(*items[0], target, sigma)
        items = items[1:]

    def work(i: int, path: Path, grid: _Grid) -> Any:
        volume = _prepare(i, path, grid, target, sigma)
        return volume if after is None else after(volume)

    if n_jobs <= 1:
        for item in items:
            yield work(*item)
        return
    window = 2 * n_jobs
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        pending = [pool.submit(work, *item) for item in items[:window]]
        next_item = window
        while pending:
            volume = pending.pop(0).result()
            if next_item < len(items):
                pending.append(pool.submit(work, *items[next_item]))
                next_item += 1
            yield volume


def _fortran_indices_in_c_order(mask: np.ndarray) -> np.ndarray:
    """Fortran-order flat indices of the True voxels of ``mask``, listed in C order."""
    return np.ravel_multi_index(np.nonzero(mask), mask.shape, order="F")


def _mask_from_fortran_indices(indices: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    flat = np.zeros(int(np.prod(shape)), dtype=bool)
    flat[indices] = True
    return np.ascontiguousarray(flat.reshape(shape, order="F"))


def _log_auto_mask(
    n_kept: int, n_dropped: int, coverage: np.ndarray, paths: Sequence[Path]
) -> None:
    """INFO when every map covers the same voxels; else a WARNING that counts the voxels
    dropped and names the maps that cover least (often one subject's cropped field of view)."""
    text = (
        f"Automatic mask: {n_kept} voxels finite and non-zero in all {len(paths)} maps "
        f"({n_dropped} more voxels excluded because some map is zero or non-finite there)"
    )
    if not n_dropped:
        log.info(text)
        return
    if np.ptp(coverage) < 1e-3:  # same coverage everywhere: no map to single out
        where = f"every map covers {np.min(coverage):.1%} of the voxels any map covers"
    else:
        worst = np.argsort(coverage, kind="stable")[:_MAX_LISTED_COVERAGE]
        listed = ", ".join(f"{paths[i].name} ({coverage[i]:.1%})" for i in worst)
        where = f"least coverage of the voxels any map covers: {listed}"
    log.warning("%s; %s. Give --mask to choose the voxels yourself", text, where)


def _after_in_caller(volumes: Iterator[_Volume], after: Callable[[_Volume], Any]) -> Iterator[Any]:
    """What :func:`_iter_volumes` yields with ``after``, for a stream built without ``decode``:
    ``after`` runs in the calling thread."""
    for k, volume in enumerate(volumes):
        yield volume if k == 0 else after(volume)


#: Matrices from this size on get an anonymous mapping of their own (:func:`_empty_matrix`).
_OWN_MAPPING_BYTES = 64 * 1024**2


def _empty_matrix(n_rows: int, n_cols: int) -> np.ndarray:
    """An uninitialised C-contiguous float32 ``(n_rows, n_cols)`` matrix for the masked data.

    A large one is an anonymous mapping of its own rather than ``np.empty``: numpy advises the
    kernel to back large arrays with huge pages, and with transparent huge pages in ``madvise``
    mode (a common default) the kernel then compacts memory synchronously while the matrix is
    first written: 2.5-2.9 s of system time for the 0.94 GB of N = 1,000 maps on the 2 mm grid,
    1.0 s with ordinary pages (the fit and the checks that read it were no slower), 0.6 s with
    them all mapped at once (``MAP_POPULATE``) rather than faulted in one by one. The mapping
    is returned to the system with the last array using it.
    """
    nbytes = n_rows * n_cols * 4
    if nbytes < _OWN_MAPPING_BYTES:
        return np.empty((n_rows, n_cols), dtype=np.float32)
    if hasattr(mmap, "MAP_POPULATE"):  # Linux: all pages at once, not one fault per 4 KB
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
        mapping = mmap.mmap(-1, nbytes, flags=flags)
    else:
        mapping = mmap.mmap(-1, nbytes)
    return np.frombuffer(mapping, dtype=np.float32).reshape(n_rows, n_cols)


@dataclass(frozen=True)
class _AutoMaskRow:
    """What a decoding thread reports of one map (its values went into the data buffer)."""

    index: int
    support: np.ndarray  # bool (n_grid,), Fortran order
    inside: np.ndarray  # bool (n_candidates,): its support at the candidate voxels


def _stack_auto_mask(
    decode: Callable[..., Iterator[Any]], shape: tuple[int, int, int], n_maps: int
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Mask = support of every map; values kept only inside it.

    The candidates are the first map's support, listed in C order (the column order of the
    data): each decoding thread copies its map's values there into its row of one buffer and
    reports its support, while its map is in that core's cache. The columns of the voxels some
    later map does not cover are dropped at the end (rows move down in place: one allocation of
    the data's size; a list of per-map arrays doubled the peak memory, as glibc cannot give
    back a heap fragmented by a thousand 1 MB arrays).

    Returns the data, the mask, the number of voxels some but not every map covers, and each
    map's coverage (its support over the union of the supports).
    """
    volumes = decode(after=lambda volume: _gather_row(volume, candidates, buffer))
    first = next(volumes)
    # Fortran flat indices of the first map's support, listed in C order
    candidates = _fortran_indices_in_c_order(first.support.reshape(shape, order="F"))
    width = candidates.size
    buffer = _empty_matrix(n_maps, width)
    np.take(first.data, candidates, out=buffer[first.index])
    union = first.support.copy()
    valid = np.ones(width, dtype=bool)
    support_sizes = np.zeros(n_maps, dtype=np.int64)
    support_sizes[first.index] = width
    for row in volumes:
        union |= row.support
        support_sizes[row.index] = np.count_nonzero(row.support)
        valid &= row.inside
    n = int(np.count_nonzero(valid))
    mask = _mask_from_fortran_indices(candidates[valid], shape)
    data = buffer
    if n < width:
        flat = buffer.reshape(-1)
        for i in range(n_maps):  # rows move down only: nothing unread is overwritten
            flat[i * n : (i + 1) * n] = buffer[i, valid]
        data = flat[: n_maps * n].reshape(n_maps, n)
        if data.size < 0.75 * buffer.size:  # a much smaller mask: do not hold the rest
            data = data.copy()
    n_union = int(np.count_nonzero(union))
    coverage = support_sizes / max(n_union, 1)
    return data, mask, n_union - n, coverage


def _gather_row(volume: _Volume, candidates: np.ndarray, buffer: np.ndarray) -> _AutoMaskRow:
    """In a decoding thread: the map's values at the candidate voxels into its row."""
    np.take(volume.data, candidates, out=buffer[volume.index])
    return _AutoMaskRow(volume.index, volume.support, volume.support[candidates])


#: Values per chunk of :class:`_ValueChunks` (16 MB of float32).
_CHUNK_VALUES = 4 * 1024**2


class _ValueChunks:
    """float32 values appended map by map and read back once, in the same order.

    Held in chunks of :data:`_CHUNK_VALUES` (one allocation per 16 MB, not one per map: a
    thousand per-map arrays fragment the heap, see :func:`_stack_auto_mask`); a chunk is freed
    as soon as it has been read, so the matrix filled from them grows as they shrink.
    """

    def __init__(self) -> None:
        self.chunks: list[np.ndarray | None] = []
        self.written = _CHUNK_VALUES  # values in the last chunk (full: start a new one)
        self.read_chunk = 0
        self.read_at = 0

    def append(self, values: np.ndarray) -> None:
        done = 0
        while done < values.size:
            if self.written == _CHUNK_VALUES:
                self.chunks.append(np.empty(_CHUNK_VALUES, dtype=np.float32))
                self.written = 0
            take = min(_CHUNK_VALUES - self.written, values.size - done)
            last = self.chunks[-1]
            assert last is not None
            last[self.written : self.written + take] = values[done : done + take]
            self.written += take
            done += take

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` values (in the order appended)."""
        out = np.empty(n, dtype=np.float32)
        done = 0
        while done < n:
            chunk = self.chunks[self.read_chunk]
            assert chunk is not None
            take = min(_CHUNK_VALUES - self.read_at, n - done)
            out[done : done + take] = chunk[self.read_at : self.read_at + take]
            self.read_at += take
            done += take
            if self.read_at == _CHUNK_VALUES:
                self.chunks[self.read_chunk] = None  # read: free it
                self.read_chunk += 1
                self.read_at = 0
        return out


def _stack_coverage(
    volumes: Iterator[_Volume],
    shape: tuple[int, int, int],
    n_maps: int,
    min_maps: int,
    user_mask: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Mask = voxels where at least ``min_maps`` maps have data; NaN where a map has none.

    Returns the data, the mask, and the number of voxels with data in some map (inside
    ``user_mask`` when given) but fewer than ``min_maps``.

    Until the mask is known, each map is kept as a packed bit mask of its voxels with data
    (1 bit per grid voxel) and its values there (:class:`_ValueChunks`): about the size of the
    data, where int64 indices and a values array per map made ~3x the data, plus the matrix.
    """
    allowed = None if user_mask is None else user_mask.ravel(order="F")
    n_grid = int(np.prod(shape))
    counts = np.zeros(n_grid, dtype=np.int32)
    bits = np.zeros((n_maps, -(-n_grid // 8)), dtype=np.uint8)
    values = _ValueChunks()
    order: list[int] = []  # map index of each appended row
    for volume in volumes:
        valid = volume.support if allowed is None else volume.finite & allowed
        counts += valid
        bits[volume.index] = np.packbits(valid)
        values.append(volume.data[valid])
        order.append(volume.index)
    mask = _mask_from_fortran_indices(np.flatnonzero(counts >= min_maps), shape)
    in_c_order = _fortran_indices_in_c_order(mask)
    column = np.full(n_grid, -1, dtype=np.int64)
    column[in_c_order] = np.arange(in_c_order.size)
    # np.empty, filled row by row: its pages are touched as the chunks are freed
    data = np.empty((n_maps, in_c_order.size), dtype=np.float32)
    for row in order:
        where = np.flatnonzero(np.unpackbits(bits[row], count=n_grid))
        row_values = values.take(where.size)
        cols = column[where]
        inside = cols >= 0
        data[row].fill(np.nan)
        data[row, cols[inside]] = row_values[inside]
    some = counts > 0 if allowed is None else allowed
    n_dropped = int(np.count_nonzero(some)) - in_c_order.size
    n_partial = int(np.count_nonzero(counts[in_c_order] < n_maps))  # NaN in some map
    log.info(
        "Coverage mask: %d voxels where at least %d of the %d maps have data (%d of them miss "
        "some map and are fitted on the maps they have; %d voxels with fewer maps excluded)",
        in_c_order.size, min_maps, n_maps, n_partial, n_dropped,
    )  # fmt: skip
    return data, mask, n_dropped


def _stack_user_mask(
    volumes: Iterator[_Volume], mask: np.ndarray, paths: Sequence[Path], mask_path: Path | None
) -> tuple[np.ndarray, np.ndarray, int]:
    indices = _fortran_indices_in_c_order(mask)
    n_in = indices.size
    data = _empty_matrix(len(paths), n_in)
    finite_all = np.ones(n_in, dtype=bool)
    culprits: list[tuple[Path, int]] = []
    for volume in volumes:
        np.take(volume.data, indices, out=data[volume.index])
        finite = volume.finite[indices]
        if not finite.all():
            culprits.append((paths[volume.index], int((~finite).sum())))
            finite_all &= finite
    new_mask, n_dropped = finish_user_mask(mask, finite_all, culprits, mask_path)
    if n_dropped:
        data = np.ascontiguousarray(data[:, finite_all])
    log.info("Mask %s: %d voxels analysed", mask_path, data.shape[1])
    return data, new_mask, n_dropped


def finish_user_mask(
    mask: np.ndarray,
    finite_all: np.ndarray,
    culprits: Sequence[tuple[Path, int]],
    mask_path: Path | None,
) -> tuple[np.ndarray, int]:
    """The user mask less its voxels non-finite in some map (``finite_all`` False), and how
    many were dropped; a WARNING names the maps (``culprits``: (path, voxels)) when any were."""
    n_dropped = int((~finite_all).sum())
    if not n_dropped:
        return mask, 0
    listed = ", ".join(f"{p.name} ({n})" for p, n in culprits[:_MAX_LISTED])
    more = f" and {len(culprits) - _MAX_LISTED} more" if len(culprits) > _MAX_LISTED else ""
    log.warning(
        "Dropped %d of %d voxels of the mask %s: non-finite (NaN/Inf) in %d map(s): %s%s",
        n_dropped,
        finite_all.size,
        mask_path,
        len(culprits),
        listed,
        more,
    )
    mask = mask.copy()
    mask[mask] = finite_all
    return mask, n_dropped


def _empty_mask_message(paths: Sequence[Path], mask_path: Path | None) -> str:
    if mask_path is None:
        return (
            f"The automatic mask is empty: no voxel is finite and non-zero in all {len(paths)} "
            "maps. Check the maps (one may be all zero or NaN) or give --mask"
        )
    return (
        f"No voxel of the mask {mask_path} is finite in all {len(paths)} maps: check that the "
        "mask and the maps are in the same space"
    )
