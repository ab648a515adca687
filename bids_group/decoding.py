"""Maps decoded into rows at the candidate voxels: one function, in this process or as Dask tasks.

Whether the masked data go to memory or to the tiled store (:mod:`bids_group.store`), each map
is decoded (:meth:`bids_group.images.VolumeStream.decode_maps`: read, inflate, resample, smooth)
and cut to the *candidate* voxels: those of the user mask, or the support of the first map
(the automatic mask can only shrink from there). :func:`decode_rows` does this for a run of
maps and keeps what the final mask needs in a :class:`RowBook` (voxels still valid, the union
of the supports, coverage, maps with non-finite voxels). Chunks of maps are independent, and
their books merge exactly (logical and / or, integer sums, lists in map order), so the same
function serves the client's single stream and :func:`decode_task`, run by a Dask worker on a
chunk of maps (:func:`map_chunks`): the rows then come back to the client (data in memory) or
go to one file per chunk in the store's folder (the shared work folder), which the client
never reads whole.

A task is a pure function of its arguments: a worker that dies mid-task leaves at most a
temporary file, and the task rerun elsewhere writes the same bytes under the same name.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bids_group.errors import UsageError
from bids_group.executor import task_threads
from bids_group.images import VolumeStream, _fortran_indices_in_c_order, _Volume

#: Chunks of maps per worker (so that a slow or lost worker delays a small part).
TASKS_PER_WORKER = 4
#: Largest rows of one decoding task (bytes of float32): a worker holds them until sent.
MAX_TASK_BYTES = 64 * 1024**2
_FLOAT = np.dtype(np.float32)


@dataclass
class RowBook:
    """What the mask needs from the maps decoded so far.

    Attributes
    ----------
    valid : ndarray of bool, one per candidate voxel
        Still in the mask: in the support (automatic mask) or finite (user mask) of every map.
    union : ndarray of bool (flat Fortran grid) or None
        Automatic mask: support of any map; None with a user mask.
    support_sizes : ndarray of int64, one per map
        Voxels in each map's support (automatic mask; 0 for maps not decoded here).
    culprits : list of (Path, int)
        User mask: maps with non-finite candidate voxels, and how many, in map order.
    """

    valid: np.ndarray
    union: np.ndarray | None
    support_sizes: np.ndarray
    culprits: list[tuple[Path, int]] = field(default_factory=list)

    @classmethod
    def empty(cls, n_candidates: int, n_maps: int, grid_size: int | None) -> RowBook:
        """Nothing decoded yet (``grid_size``: voxels of the grid, None with a user mask)."""
        return cls(
            valid=np.ones(n_candidates, dtype=bool),
            union=None if grid_size is None else np.zeros(grid_size, dtype=bool),
            support_sizes=np.zeros(n_maps, dtype=np.int64),
        )

    def merge(self, other: RowBook) -> None:
        """Add the book of the next chunk of maps (exact in any grouping)."""
        self.valid &= other.valid
        if self.union is not None and other.union is not None:
            self.union |= other.union
        self.support_sizes += other.support_sizes
        self.culprits += other.culprits


def candidates_of(stream: VolumeStream, first: _Volume) -> np.ndarray:
    """Fortran flat indices of the candidate voxels: the user mask's, listed in C order, or the
    first map's support (sorted)."""
    if stream.user_mask is None:
        return np.flatnonzero(first.support)
    return _fortran_indices_in_c_order(stream.user_mask)


def decode_rows(
    volumes: Iterable[_Volume],
    candidates: np.ndarray,
    book: RowBook,
    paths: list[Path],
    put: Callable[[int, np.ndarray], object],
) -> None:
    """Each volume's values at ``candidates`` to ``put(index, row)`` (float32), and its
    support or finiteness there into ``book``."""
    for volume in volumes:
        put(volume.index, np.ascontiguousarray(volume.data[candidates], dtype=_FLOAT))
        if book.union is not None:
            book.union |= volume.support
            book.support_sizes[volume.index] = np.count_nonzero(volume.support)
            book.valid &= volume.support[candidates]
        else:
            finite = volume.finite[candidates]
            if not finite.all():
                book.culprits.append((paths[volume.index], int((~finite).sum())))
                book.valid &= finite


def rows_file(folder: Path, start: int) -> Path:
    """The rows of the chunk of maps that starts at map ``start`` (float32, map after map)."""
    return folder / f"rows-{start:08d}.f32"


def write_rows(
    volumes: Iterable[_Volume], candidates: np.ndarray, book: RowBook, paths: list[Path],
    target: Path,
) -> None:  # fmt: skip
    """:func:`decode_rows` into the file ``target``, complete or absent: written under a
    private name, renamed when done (a rerun task or a dead worker leaves no half file)."""
    partial = target.with_name(f"{target.name}.{uuid.uuid4().hex}.part")
    try:
        with open(partial, "wb") as f:
            decode_rows(volumes, candidates, book, paths, lambda _, row: f.write(row.data))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


@dataclass(frozen=True)
class DecodePlan:
    """What every decoding task shares (sent once): how to decode, where to cut, where to put.

    Attributes
    ----------
    stream : VolumeStream
        Its ``volumes`` iterator is left out (empty): a task decodes its own maps.
    candidates : ndarray of int64
    folder : Path or None
        The store's folder (rows go to :func:`rows_file`), or None: rows are returned.
    """

    stream: VolumeStream
    candidates: np.ndarray
    folder: Path | None


def decode_task(plan: DecodePlan, start: int, stop: int) -> tuple[RowBook, np.ndarray | None]:
    """Decode maps ``start .. stop - 1``: their book, and their rows (n, n_candidates) unless
    they went to the store's folder. A Dask task (also run in process by the tests)."""
    stream, candidates = plan.stream, plan.candidates
    if plan.folder is not None and not plan.folder.is_dir():
        raise UsageError(
            f"the Dask worker on {socket.gethostname()} cannot see the tiled store's folder "
            f"{plan.folder}: give -w a work folder on a filesystem the workers share"
        )
    grid = None if stream.user_mask is not None else int(np.prod(stream.target.shape))
    book = RowBook.empty(candidates.size, len(stream.paths), grid)
    volumes = stream.decode_maps(start, stop, n_jobs=task_threads())
    if plan.folder is not None:
        write_rows(volumes, candidates, book, stream.paths, rows_file(plan.folder, start))
        return book, None
    rows = np.empty((stop - start, candidates.size), dtype=_FLOAT)

    def put(index: int, row: np.ndarray) -> None:
        rows[index - start] = row

    decode_rows(volumes, candidates, book, stream.paths, put)
    return book, rows


def map_chunks(n_maps: int, n_candidates: int, n_workers: int) -> list[tuple[int, int]]:
    """Maps ``0 .. n_maps - 1`` cut into about :data:`TASKS_PER_WORKER` chunks per worker, each
    at most :data:`MAX_TASK_BYTES` of rows (at least one map).

    >>> map_chunks(10, 100, 1)
    [(0, 3), (3, 6), (6, 9), (9, 10)]
    """
    even = -(-n_maps // (TASKS_PER_WORKER * max(1, n_workers)))
    size = max(1, min(even, MAX_TASK_BYTES // max(1, _FLOAT.itemsize * n_candidates)))
    return [(start, min(start + size, n_maps)) for start in range(0, n_maps, size)]
