"""The voxel-tiled store: masked data that do not fit in the memory budget, on disk.

:func:`load_data` decides, after decoding the first map, whether the masked data
(``n_maps x n_voxels`` float32) fit in their share of the budget
(:func:`bids_group.memory.data_fits`). If they do, every map is stacked in memory as before
(:func:`bids_group.images.stack_volumes`). If not, each map is decoded once (the same per-map
decode, :func:`bids_group.images.open_volumes`) and written to an uncompressed store in the
work folder, which the fit and the data checks then read one voxel tile of all maps at a time.

Layout (one folder per set of inputs, ``<work>/bids-group-store/<key>/``):

* ``tiles.f32``: float32, C order, shape ``(n_tiles, n_maps, tile_voxels)``: one tile of
  voxels for every map is one contiguous read. The last tile is padded with zeros.
  Voxel ``j`` of the mask (C order, as :class:`~bids_group.images.MaskedData`) is column
  ``j % tile_voxels`` of tile ``j // tile_voxels``.
* ``mask.npy``: the mask on the grid (bool).
* ``manifest.json``: every input's path, size and modification time, the loading settings,
  the shape, the grid and the mask statistics. Written last: a store without it is incomplete
  and never reused.

A plain binary file read with ``readinto`` rather than ``numpy.memmap`` or zarr: the resident
memory is then only the tile being read (the pages of a memory map count in the resident set
until unmapped, which defeats a budget), there is no compression to pay for (the maps were
decoded once; the store is read as fast as the disk or page cache allows), and no dependency.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from bids_group.decoding import (
    DecodePlan,
    RowBook,
    candidates_of,
    decode_rows,
    decode_task,
    map_chunks,
    rows_file,
    write_rows,
)
from bids_group.errors import DataError, OutputError, UsageError
from bids_group.executor import Executor, InProcessExecutor
from bids_group.images import (
    MaskedData,
    VolumeStream,
    _empty_mask_message,
    _log_auto_mask,
    _mask_from_fortran_indices,
    _Volume,
    _voxel_size,
    finish_user_mask,
    open_volumes,
    stack_volumes,
)
from bids_group.memory import DATA_FRACTION, data_fits, format_size, tile_voxels, work_bytes
from bids_group.paths import disk_error
from bids_group.streamed_fit import OlsAccumulator, StreamPlan, batch_maps

log = logging.getLogger(__name__)
#: A streamed fit whose rounding bound (relative error of the residual variance) exceeds this
#: is said in a warning: t is then good to fewer than about six digits at some voxel.
STREAMED_BOUND_WARNING = 1e-6

#: Folder of the stores inside the work folder.
STORE_FOLDER = "bids-group-store"
#: Version of the layout; a manifest of another version is not reused.
STORE_FORMAT = 1
_TILES = "tiles.f32"
_MASK = "mask.npy"
_MANIFEST = "manifest.json"
_TEMPORARY = "bids-group-store-"  # prefix of the temporary folder used without -w
_FLOAT = np.dtype(np.float32)


@dataclass(frozen=True)
class VoxelStore:
    """Masked data on disk, read one tile of voxels (all maps) at a time.

    Implements :class:`bids_group.memory.TiledMaps`.

    Attributes
    ----------
    folder : Path
    n_maps, n_voxels : int
    tile_voxels : int
        Voxels per tile (a multiple of :data:`bids_group.memory.TILE_ALIGN`).
    """

    folder: Path
    n_maps: int
    n_voxels: int
    tile_voxels: int
    #: The store's lock (descriptor, file; :func:`_lock_store`) while this run uses it.
    lock: tuple[int, Path] | None = field(default=None, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(n_maps, n_voxels), as the in-memory matrix."""
        return (self.n_maps, self.n_voxels)

    @property
    def scratch(self) -> Path:
        """Folder for temporary files of the steps that read the store (removed with it)."""
        return self.folder

    @property
    def n_tiles(self) -> int:
        return -(-self.n_voxels // self.tile_voxels)

    @property
    def nbytes(self) -> int:
        """Bytes of the masked data (float32), as the in-memory matrix would hold."""
        return _FLOAT.itemsize * self.n_maps * self.n_voxels

    def tiles(self) -> Iterator[tuple[slice, np.ndarray]]:
        """(voxel slice, float32 array (n_maps, slice length)) for each tile, in order."""
        width = self.tile_voxels
        with open(self.folder / _TILES, "rb", buffering=0) as f:
            for t in range(self.n_tiles):
                tile = np.empty((self.n_maps, width), dtype=_FLOAT)
                f.seek(t * tile.nbytes)
                if f.readinto(memoryview(tile).cast("B")) != tile.nbytes:
                    raise DataError(f"{self.folder / _TILES} is truncated: delete {self.folder}")
                stop = min((t + 1) * width, self.n_voxels)
                yield slice(t * width, stop), tile[:, : stop - t * width]


def load_data(
    paths: Sequence[Path],
    *,
    budget: int,
    work_dir: Path | None,
    mask_path: Path | None = None,
    resample: bool = False,
    smoothing_fwhm: float | None = None,
    n_jobs: int = 1,
    target_voxel_size: float | None = None,
    unsupported: str = "",
    bytes_per_cell: int = 4,
    min_maps: int | None = None,
    executor: Executor | None = None,
    stream_fit: StreamPlan | None = None,
) -> MaskedData:
    """The masked data of ``paths``, in memory if they fit in the budget, else in a store
    (or, with ``stream_fit``, only the OLS fit of them).

    Parameters are those of :func:`bids_group.images.load_masked_data`, plus the ``budget``
    (bytes), the work folder (None: a temporary folder), and what the run needs that the store
    cannot do yet (``unsupported``, e.g. "permutation inference"): if not empty and the data
    do not fit, a UsageError says so as soon as the first map is read. ``bytes_per_cell``: what
    the run holds in memory per map and voxel with the data in memory (4: the float32 data;
    more with permutations, :data:`bids_group.memory.PERMUTATION_BYTES_PER_CELL`), which decides
    whether they fit. A complete store of the same
    inputs (path, size and modification time of every map and of the mask, same settings)
    left in the work folder by ``--keep-store`` is reused instead of decoding again.
    ``min_maps`` (per-voxel missing data) is only read in memory (pass it in ``unsupported``).
    ``executor`` (a Dask cluster, :mod:`bids_group.executor`): the maps are decoded by its
    workers, in chunks (:func:`bids_group.decoding.decode_task`), and the store, if any, is
    written by them into the work folder, which they must share; this process decodes only the
    first map (the candidate voxels) and keeps the books. The result is the same bits.
    ``stream_fit`` (a run that needs the data only for an OLS fit of its ``design``; not with
    ``executor``): data that do not fit are not stored but fitted while they are decoded
    (:mod:`bids_group.streamed_fit`); a kept store of the same inputs is still reused.

    Returns
    -------
    MaskedData
        ``data`` is an array, a :class:`VoxelStore`, or (``stream_fit``) a
        :class:`~bids_group.streamed_fit.StreamedOls`; pass the result to :func:`release`
        when done.
    """
    paths = [Path(p) for p in paths]
    settings = {
        "mask": None if mask_path is None else str(Path(mask_path).resolve()),
        "resample": bool(resample),
        "smoothing_fwhm": smoothing_fwhm or None,
        "target_voxel_size": target_voxel_size,
    }
    folder = None if work_dir is None else _folder(paths, settings, Path(work_dir))
    lock = None if folder is None else _lock_store(folder)
    try:
        data = _load(paths, settings, folder, budget, mask_path, resample, smoothing_fwhm,
                     n_jobs, target_voxel_size, unsupported, bytes_per_cell, min_maps,
                     executor, stream_fit)  # fmt: skip
    except BaseException:
        _unlock(lock)
        raise
    if not isinstance(data.data, VoxelStore):
        _unlock(lock)
        return data
    return replace(data, data=replace(data.data, lock=lock))


def _lock_store(folder: Path) -> tuple[int, Path]:
    """Hold ``<work>/bids-group-store-<key>.lock`` (an exclusive ``flock``) until
    :func:`release`: two runs with
    the same work folder and inputs share one store folder, which a run builds, reads and
    removes; the second waits for the first (said in the log) rather than read a half-written
    or vanishing store. The lock goes with the process, however it ends; the file is removed
    by its holder, so a run that got the lock of a removed file tries again."""
    import fcntl

    # beside the stores' folder, not in it: a refused run leaves no store folder behind
    work_dir = folder.parent.parent
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / f"{folder.parent.name}-{folder.name}.lock"
    said = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not said:
                log.warning("waiting for another bids-group run that uses the tiled store %s",
                            folder)  # fmt: skip
                said = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd, path
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed that file when done: lock the current one


def _unlock(lock: tuple[int, Path] | None) -> None:
    if lock is not None:
        fd, path = lock
        path.unlink(missing_ok=True)  # while held: a waiting run then retries on a new file
        os.close(fd)  # releases the flock


def _load(
    paths: list[Path],
    settings: dict[str, Any],
    folder: Path | None,
    budget: int,
    mask_path: Path | None,
    resample: bool,
    smoothing_fwhm: float | None,
    n_jobs: int,
    target_voxel_size: float | None,
    unsupported: str,
    bytes_per_cell: int,
    min_maps: int | None,
    executor: Executor | None,
    plan: StreamPlan | None = None,
) -> MaskedData:
    """:func:`load_data` once the store folder (if any) is locked."""
    if folder is not None and not unsupported:
        reused = _reuse(folder, paths, mask_path, settings, budget)
        if reused is not None:
            return reused
    if min_maps is not None:
        executor = None  # coverage is stacked in memory here (never with permutations)
    stream = open_volumes(
        paths,
        mask_path=mask_path,
        resample=resample,
        smoothing_fwhm=smoothing_fwhm,
        n_jobs=n_jobs if executor is None else 1,  # the workers decode all but this first map
        target_voxel_size=target_voxel_size,
    )
    first = next(stream.volumes)
    rest = chain([first], stream.volumes)
    n_candidates = int(
        np.count_nonzero(first.support) if stream.user_mask is None else stream.user_mask.sum()
    )
    if data_fits(len(paths), n_candidates, budget, bytes_per_cell):
        if executor is not None:
            return _gather(stream, first, executor)
        return stack_volumes(replace(stream, volumes=rest), min_maps=min_maps)
    if unsupported:
        raise UsageError(
            f"the masked data ({len(paths)} maps x up to {n_candidates} voxels) do not fit in "
            f"half the memory budget ({format_size(budget)}), and {unsupported} cannot yet read "
            f"them tile by tile from the store: give --mem-budget "
            f"{format_size(bytes_per_cell * len(paths) * n_candidates / DATA_FRACTION * 1.05)} "
            "or more (if the machine has it), or fewer maps per model"
        )
    if plan is not None and executor is None:
        return _stream_fit(replace(stream, volumes=rest), first, plan, budget)
    width = tile_voxels(len(paths), budget)
    if folder is None:  # no -w: a private temporary folder, removed by release()
        folder = Path(tempfile.mkdtemp(prefix=_TEMPORARY)) / "store"
    log.info(
        "the masked data (%d maps x up to %d voxels, %s as float32) exceed half the memory "
        "budget: decoding them once into a voxel-tiled store in %s (tiles of %d voxels)",
        len(paths), n_candidates, format_size(4 * len(paths) * n_candidates), folder, width,
    )  # fmt: skip
    try:
        return _build(replace(stream, volumes=rest), first, folder, width, settings, mask_path,
                      budget, executor)  # fmt: skip
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise disk_error(exc, folder.parent, "work folder (-w)") from exc
    except BaseException:  # a bad map found by a worker, an interrupt: no half store left
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _stream_fit(stream: VolumeStream, first: _Volume, plan: StreamPlan, budget: int) -> MaskedData:
    """Fit OLS on every map of ``stream`` (``first`` too) as it is decoded, in batches of
    maps (:mod:`bids_group.streamed_fit`): the masked data are never held nor stored."""
    candidates = candidates_of(stream, first)
    batch = batch_maps(candidates.size, budget)
    fit = OlsAccumulator(plan.design, candidates.size, batch=batch, background=plan.background)
    n_maps = len(stream.paths)
    log.info(
        "the masked data (%d maps x up to %d voxels, %s as float32) exceed half the memory "
        "budget and the run needs them only for the OLS fit: fitting them as they are "
        "decoded, %d maps at a time (no store is written)",
        n_maps, candidates.size, format_size(4 * n_maps * candidates.size), batch,
    )  # fmt: skip
    book = _empty_book(stream, candidates)
    decode_rows(stream.volumes, candidates, book, stream.paths, fit.add)
    mask, columns, n_dropped = _final_mask(stream, candidates, book)
    streamed = fit.finish(columns)
    log.info(
        "OLS fit streamed from the decoded maps (no store): it sums per-voxel statistics "
        "instead of forming residuals; bound on the relative error of each voxel's residual "
        "variance (t: half of it) from rounding: %.1g",
        streamed.rss_bound,
    )
    if streamed.rss_bound > STREAMED_BOUND_WARNING:
        log.warning(
            "the streamed OLS fit's rounding bound on the residual variance is %.1g at its worst "
            "voxel (its sums dwarf the residuals there): for the exact fit, rerun with "
            "--keep-store -w DIR (the voxel-tiled store forms explicit residuals)",
            streamed.rss_bound,
        )
    return MaskedData(
        data=streamed,
        mask=mask,
        affine=stream.target.affine,
        voxel_size=stream.target.voxel_size,
        n_dropped=n_dropped,
    )


def release(data: MaskedData, *, keep: bool = False) -> None:
    """Remove the store behind ``data`` (nothing for in-memory data) unless ``keep``."""
    if not isinstance(data.data, VoxelStore):
        return
    if keep:
        log.info("kept the tiled store %s (--keep-store)", data.data.folder)
    else:
        shutil.rmtree(data.data.folder, ignore_errors=True)
        if data.data.folder.parent.name.startswith(_TEMPORARY):
            shutil.rmtree(data.data.folder.parent, ignore_errors=True)
    _unlock(data.data.lock)


def _folder(paths: Sequence[Path], settings: dict[str, Any], work_dir: Path) -> Path:
    """``<work>/bids-group-store/<key>``: one per list of maps and settings."""
    text = json.dumps([[str(p.resolve()) for p in paths], settings], sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    return work_dir / STORE_FOLDER / key


def _stat(path: Path) -> list[Any]:
    info = path.stat()
    return [str(path.resolve()), info.st_size, info.st_mtime_ns]


def _inputs(paths: Sequence[Path], mask_path: Path | None) -> dict[str, Any]:
    return {
        "maps": [_stat(p) for p in paths],
        "mask": None if mask_path is None else _stat(Path(mask_path)),
    }


def _reuse(
    folder: Path,
    paths: Sequence[Path],
    mask_path: Path | None,
    settings: dict[str, Any],
    budget: int,
) -> MaskedData | None:
    """The store in ``folder`` if its manifest matches the inputs now, else None (and a
    stale store is removed)."""
    manifest_path = folder / _MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        inputs = _inputs(paths, mask_path)
    except (OSError, ValueError):
        manifest, inputs = {}, None
    why = _mismatch(manifest, inputs, settings, tile_voxels(len(paths), budget))
    if why:
        log.info("not reusing the tiled store %s: %s; building it again", folder, why)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    store = VoxelStore(folder, manifest["n_maps"], manifest["n_voxels"], manifest["tile_voxels"])
    if (folder / _TILES).stat().st_size != store.n_tiles * store.n_maps * store.tile_voxels * 4:
        log.info("not reusing the tiled store %s: its data file is truncated", folder)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    log.info("reusing the tiled store %s (every input's size and time unchanged)", folder)
    affine = np.asarray(manifest["affine"], dtype=np.float64)
    return MaskedData(
        data=store,
        mask=np.load(folder / _MASK),
        affine=affine,
        voxel_size=_voxel_size(affine),
        n_dropped=int(manifest["n_dropped"]),
    )


def _mismatch(
    manifest: dict[str, Any], inputs: dict[str, Any] | None, settings: dict[str, Any], width: int
) -> str:
    """Why a manifest does not describe the inputs now ('' when it does)."""
    if manifest.get("format") != STORE_FORMAT:
        return "another store format"
    if inputs is None:
        return "an input cannot be read"
    if manifest.get("settings") != settings:
        return "other loading settings"
    if manifest.get("inputs") != inputs:
        return "an input's path, size or modification time changed"
    if manifest.get("tile_voxels", width + 1) > width:
        return "its tiles are larger than the memory budget allows"
    return ""


def _build(
    stream: VolumeStream,
    first: _Volume,
    folder: Path,
    width: int,
    settings: dict[str, Any],
    mask_path: Path | None,
    budget: int,
    executor: Executor | None = None,
) -> MaskedData:
    """Decode every map into ``folder`` (``stream.volumes`` yields them all, ``first`` too),
    here or on the workers of ``executor``; return the masked data backed by the store."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    candidates = candidates_of(stream, first)
    book, chunks = _decode_rows(stream, candidates, folder, executor)
    mask, columns, n_dropped = _final_mask(stream, candidates, book)
    store = VoxelStore(folder, len(stream.paths), columns.size, width)
    with open(folder / _TILES, "wb") as tiles:  # its full size, zero padding included
        tiles.truncate(store.n_tiles * store.n_maps * width * _FLOAT.itemsize)
    plan = _TilePlan(store, candidates.size, columns, work_bytes(budget))
    for _ in (executor or InProcessExecutor()).map_chunks(_tiles_task, plan, chunks):
        pass
    for start, _ in chunks:
        rows_file(folder, start).unlink()
    np.save(folder / _MASK, mask)
    manifest = {
        "format": STORE_FORMAT,
        "inputs": _inputs(stream.paths, mask_path),
        "settings": settings,
        "n_maps": store.n_maps,
        "n_voxels": store.n_voxels,
        "tile_voxels": width,
        "affine": stream.target.affine.tolist(),
        "n_dropped": n_dropped,
    }
    partial = folder / (_MANIFEST + ".part")
    partial.write_text(json.dumps(manifest, indent=1))
    partial.replace(folder / _MANIFEST)
    log.info("tiled store: %d tiles of %d voxels x %d maps", store.n_tiles, width, store.n_maps)
    return MaskedData(
        data=store,
        mask=mask,
        affine=stream.target.affine,
        voxel_size=stream.target.voxel_size,
        n_dropped=n_dropped,
    )


def _decode_rows(
    stream: VolumeStream, candidates: np.ndarray, folder: Path, executor: Executor | None
) -> tuple[RowBook, list[tuple[int, int]]]:
    """Every map's row at the candidate voxels into the rows files of ``folder``: one file
    from this process's stream (``--n-jobs`` threads), or one per chunk of maps from the
    workers. Returns the merged book and the chunks of maps (one per rows file)."""
    book = _empty_book(stream, candidates)
    n_maps = len(stream.paths)
    if executor is None:
        write_rows(stream.volumes, candidates, book, stream.paths, rows_file(folder, 0))
        return book, [(0, n_maps)]
    chunks = map_chunks(n_maps, candidates.size, _n_workers(executor))
    plan = DecodePlan(replace(stream, volumes=iter(())), candidates, folder)
    log.info("decoding %d maps in %d tasks on the Dask workers", n_maps, len(chunks))
    for part, _ in executor.map_chunks(decode_task, plan, chunks):
        book.merge(part)
    return book, chunks


def _gather(stream: VolumeStream, first: _Volume, executor: Executor) -> MaskedData:
    """The masked data in memory, decoded by the workers in chunks of maps: each chunk's rows
    at the candidate voxels are copied into one buffer, then cut to the final mask in place
    (rows only move down), so the client holds the data once, as :func:`stack_volumes` does."""
    candidates = candidates_of(stream, first)
    n_maps, width = len(stream.paths), candidates.size
    book = _empty_book(stream, candidates)
    chunks = map_chunks(n_maps, width, _n_workers(executor))
    plan = DecodePlan(replace(stream, volumes=iter(())), candidates, None)
    log.info("decoding %d maps in %d tasks on the Dask workers", n_maps, len(chunks))
    buffer = np.empty(n_maps * width, dtype=_FLOAT)
    tasks = executor.map_chunks(decode_task, plan, chunks)
    for (start, stop), (part, rows) in zip(chunks, tasks, strict=True):
        book.merge(part)
        buffer[start * width : stop * width] = rows.ravel()
    mask, columns, n_dropped = _final_mask(stream, candidates, book)
    n = columns.size
    for i in range(n_maps):
        buffer[i * n : (i + 1) * n] = buffer[i * width : (i + 1) * width][columns]
    data = buffer[: n_maps * n].reshape(n_maps, n)
    if data.size < 0.75 * buffer.size:  # a much smaller mask: do not hold the rest
        data = data.copy()
    return MaskedData(
        data=data,
        mask=mask,
        affine=stream.target.affine,
        voxel_size=stream.target.voxel_size,
        n_dropped=n_dropped,
    )


def _empty_book(stream: VolumeStream, candidates: np.ndarray) -> RowBook:
    grid = None if stream.user_mask is not None else int(np.prod(stream.target.shape))
    return RowBook.empty(candidates.size, len(stream.paths), grid)


def _n_workers(executor: Executor) -> int:
    return max(1, int(getattr(executor, "n_workers", 1)))


def _final_mask(
    stream: VolumeStream, candidates: np.ndarray, book: RowBook
) -> tuple[np.ndarray, np.ndarray, int]:
    """The mask, the candidate positions of its voxels in C order, and the voxels dropped;
    logged as :func:`bids_group.images.load_masked_data` logs them."""
    shape = stream.target.shape
    if book.union is not None:
        kept = candidates[book.valid]  # sorted Fortran indices
        mask = _mask_from_fortran_indices(kept, shape)
        to_c_order = np.argsort(
            np.ravel_multi_index(np.unravel_index(kept, shape, order="F"), shape)
        )
        columns = np.flatnonzero(book.valid)[to_c_order]
        n_union = int(book.union.sum())
        n_dropped = n_union - kept.size
        coverage = book.support_sizes / max(n_union, 1)
        _log_auto_mask(int(kept.size), n_dropped, coverage, stream.paths)
    else:
        assert stream.user_mask is not None
        mask, n_dropped = finish_user_mask(
            stream.user_mask, book.valid, book.culprits, stream.mask_path
        )
        columns = np.flatnonzero(book.valid)
        log.info("Mask %s: %d voxels analysed", stream.mask_path, columns.size)
    if not columns.size:
        raise DataError(_empty_mask_message(stream.paths, stream.mask_path))
    return mask, columns, n_dropped


@dataclass(frozen=True)
class _TilePlan:
    """What every task of :func:`_tiles_task` shares: the store and the final columns."""

    store: VoxelStore
    n_candidates: int
    columns: np.ndarray
    work: int  # bytes a task may hold (rows read at once and their values on the mask)


def _tiles_task(plan: _TilePlan, start: int, stop: int) -> None:
    """Scatter the rows of maps ``start .. stop - 1`` into the tiles (a Dask task, or run here):
    each map's values go to their own byte ranges, so tasks never overlap and a rerun writes
    the same bytes."""
    folder = plan.store.folder
    _write_tiles(rows_file(folder, start), folder / _TILES, plan.n_candidates, plan.columns,
                 plan.store, range(start, stop), plan.work)  # fmt: skip


def _write_tiles(
    rows_path: Path,
    tiles_path: Path,
    n_candidates: int,
    columns: np.ndarray,
    store: VoxelStore,
    maps: range,
    work: int,
) -> None:
    """Rewrite the rows of ``maps`` (``maps`` x candidates, map after map) as tiles of the final
    mask's voxels, in the tiles file (already at its full size).

    As many maps' rows as fit in half of ``work`` bytes are read at once (with their values at
    the mask's voxels in the other half), and each tile gets one write of those maps' rows,
    which are contiguous in it: one write per map and tile made ~2.6 million small writes at
    N = 10,000 on the 2 mm grid.
    """
    width, n_maps, n_tiles = store.tile_voxels, store.n_maps, store.n_tiles
    row_bytes = n_candidates * _FLOAT.itemsize
    per_read = int(np.clip(work // (2 * max(row_bytes, 1)), 1, max(len(maps), 1)))
    rows_buf = np.empty((per_read, n_candidates), dtype=_FLOAT)
    values = np.zeros((per_read, n_tiles * width), dtype=_FLOAT)  # the last tile's padding: 0
    with open(rows_path, "rb") as rows, open(tiles_path, "r+b") as tiles:
        for first in range(maps.start, maps.stop, per_read):
            k = min(per_read, maps.stop - first)
            rows.seek((first - maps.start) * row_bytes)
            if rows.readinto(memoryview(rows_buf[:k]).cast("B")) != k * row_bytes:
                raise OutputError(f"{rows_path} was cut short while the store was built")
            np.take(rows_buf[:k], columns, axis=1, out=values[:k, : columns.size])
            for t in range(n_tiles):
                part = np.ascontiguousarray(values[:k, t * width : (t + 1) * width])
                os.pwrite(tiles.fileno(), part, (t * n_maps + first) * width * _FLOAT.itemsize)
