"""The memory budget of a run: parse it, choose the default, and size working arrays from it.

The budget bounds what one model holds at once. Its parts (fractions of the budget):

* the masked data in memory (``n_maps x n_voxels`` float32; with permutations also the
  residuals, :data:`PERMUTATION_BYTES_PER_CELL` in all) when they fit in :data:`DATA_FRACTION`
  of it, else a voxel-tiled store on disk (:mod:`bids_group.store`);
* one voxel tile of all maps at a time (the store's tiles, the fit's float64 working arrays),
  in :data:`WORK_FRACTION` of it (:func:`tile_voxels`); the fit works through a tile in
  cache-sized steps (:func:`bids_group.glm.fit_ols`).

The rest is left for the per-voxel results (a few float64 per voxel, independent of the number
of maps), one decoded volume per thread, the scans of the data (checks, the report's background:
tiles of at most :data:`SCAN_BYTES`, :func:`scan_voxels`), and the interpreter.

Reads ``/proc`` and ``/sys/fs/cgroup`` on Linux; no project imports. :class:`TiledMaps` is what
the fit and the data checks read tile by tile: an in-memory matrix or the store.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

#: Default budget: never more than this (a workstation never swaps, a cluster job's request is
#: easy to size), and never more than half the memory available when the run starts.
DEFAULT_CAP = 4 * 1000**3
#: Smallest budget accepted (1 MB): below it a tile of one map is smaller than a volume slice.
MIN_BUDGET = 1000**2
#: Share of the budget for the masked data held in memory (else the tiled store is used).
DATA_FRACTION = 0.5
#: Share of the budget for the fit's working arrays (one tile of all maps at a time).
WORK_FRACTION = 0.25
#: ... and never more than this: a wider tile is no faster (the fit is bound by memory
#: bandwidth), and at N = 1,000 the 1 GB of a 4 GB budget doubled the run's peak memory.
MAX_WORK_BYTES = 256 * 1024**2
#: Bytes per (map, voxel) cell of a tile while it is fitted: the float32 tile read from the
#: store, and room for float64 working copies (the fit now makes those one cache-sized step
#: at a time, a few MB per thread: :func:`bids_group.glm.fit_ols`).
FIT_BYTES_PER_CELL = 4 + 3 * 8
#: Tiles are a multiple of this many voxels, and every matrix product over voxels is computed
#: this many voxels at a time (:func:`aligned_matmul`, the last tile padded with zeros): OpenBLAS
#: chooses its kernel, hence the order of the sums, from the shape of the whole product, so a
#: voxel fitted in a wider call can get other bits (measured from 500 maps up: a tile of 1,728
#: voxels and one of 65,536 differed); a fixed-shape call, on one BLAS thread in the fit, gives
#: each voxel the same bits whatever the tile or step width, so the tiled and in-memory fits
#: agree bit for bit at any N.
TILE_ALIGN = 64
#: Largest tile: wider tiles are no faster and fall out of the CPU cache.
MAX_TILE_VOXELS = 65536
#: Bytes (float32) of one tile of an in-memory matrix read by a scan (:func:`iter_tiles` without
#: a width: data checks, finiteness and NaN tests, the report's background). Their temporaries
#: (``|tile|``, NaN masks, ``nanmean``'s copy) are a few times this: a 65,536-voxel tile made
#: ~600 MB of them at N = 1,000, more than the fit's working arrays.
SCAN_BYTES = 16 * 1024**2

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """Bytes in ``text``: a number with an optional unit (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB).

    Units are case-insensitive; MB is 10^6 bytes and MiB 2^20. A bare number is bytes.

    Raises
    ------
    ValueError
        Not a positive size, or an unknown unit (the message lists the units).

    Examples
    --------
    >>> parse_size("4GB"), parse_size("1.5 GiB"), parse_size("512mb"), parse_size(1000)
    (4000000000, 1610612736, 512000000, 1000)
    """
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a size")
    if isinstance(text, int | float):
        number, unit = float(text), ""
    else:
        found = _SIZE.match(str(text))
        if not found:
            raise ValueError(f"{text!r} is not a size such as 4GB, 512MB or 2GiB")
        number, unit = float(found.group(1)), found.group(2).lower()
    if unit not in _UNITS:
        raise ValueError(f"unknown unit {unit!r} in {text!r}: use B, kB, MB, GB, TB, KiB, MiB, GiB")
    return int(number * _UNITS[unit])


def format_size(n_bytes: float) -> str:
    """``1.23 GB``-style text (decimal units, as :func:`parse_size` reads them).

    >>> format_size(4e9), format_size(2_500_000), format_size(999)
    ('4 GB', '2.5 MB', '999 B')
    """
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= size:
            return f"{n_bytes / size:.3g} {unit}"
    return f"{int(n_bytes)} B"


def available_memory() -> tuple[int | None, str]:
    """Memory this process may still use, and where the figure comes from.

    The smaller of ``MemAvailable`` (``/proc/meminfo``; else free pages from ``os.sysconf``) and
    the room left under a cgroup limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``, as a
    container or a SLURM job sets). None when nothing can be read.
    """
    found: list[tuple[int, str]] = []
    meminfo = _meminfo_available()
    if meminfo is not None:
        found.append((meminfo, "MemAvailable"))
    else:
        try:
            pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            found.append((int(pages), "free physical pages"))
        except (ValueError, OSError, AttributeError):
            pass
    cgroup = _cgroup_room()
    if cgroup is not None:
        found.append((cgroup, "cgroup limit"))
    if not found:
        return None, "unknown"
    return min(found)


def _meminfo_available() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def _cgroup_room() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2, else v1); None if unlimited."""
    pairs = (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    )
    for limit_path, usage_path in pairs:
        try:
            limit_text = Path(limit_path).read_text().strip()
        except OSError:
            continue
        if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= 2**60:
            return None  # v1 writes a huge number for "no limit"
        try:
            usage = int(Path(usage_path).read_text().strip())
        except (OSError, ValueError):
            usage = 0
        return max(int(limit_text) - usage, 0)
    return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity (a SLURM job's or ``taskset``'s cores), capped by
    a cgroup v2 CPU quota (``cpu.max``, as ``docker run --cpus`` sets), at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(count, 1)


def default_budget() -> tuple[int, str]:
    """The smaller of half the available memory and :data:`DEFAULT_CAP`, and why."""
    available, source = available_memory()
    if available is None:
        return DEFAULT_CAP, f"the {format_size(DEFAULT_CAP)} cap (available memory unknown)"
    half = max(available // 2, MIN_BUDGET)
    if half < DEFAULT_CAP:
        return half, f"half the available memory ({format_size(available)}, {source})"
    return DEFAULT_CAP, f"the {format_size(DEFAULT_CAP)} cap ({format_size(available)} available)"


def choose_budget(given: int | None, where: str = "--mem-budget") -> int:
    """``given`` (bytes) or the default; logs the budget chosen and where it comes from."""
    if given is not None:
        log.info("memory budget: %s (%s)", format_size(given), where)
        available, source = available_memory()
        if available is not None and given > available:
            log.warning(
                "%s %s is more than the memory available now (%s, %s): a model that uses it "
                "may swap or be killed; give at most %s",
                where, format_size(given), format_size(available), source,
                format_size(available),
            )  # fmt: skip
        return given
    budget, why = default_budget()
    log.info(
        "memory budget: %s (default: %s; set --mem-budget to change)", format_size(budget), why
    )
    return budget


#: Bytes per (map, voxel) a permutation test holds in memory besides the float32 data: the
#: float64 Freedman-Lane residuals and their copy in the engine's product tiles (float32 or
#: float64). With the tiled store these stay on disk.
PERMUTATION_BYTES_PER_CELL = 4 + 8 + 8
#: Bytes per (map, voxel) of a mixed-effects fit: the effects and the variances (float32 as
#: read), the valid flags and one boolean temporary (measured: 10.5 at N = 210 on pain21's
#: mask). The mixed-effects model is not fitted from the tiled store: data that do not fit are
#: refused, naming the budget that would do.
MIXED_BYTES_PER_CELL = 4 + 4 + 1 + 1
#: The same with mixed-effects permutations: also the cleaned effects and variances (float32),
#: the Freedman-Lane residuals and fitted values (float64) and the engine's transposed float64
#: copies of these and of the variances (measured: 49 at N = 210 with DerSimonian-Laird).
MIXED_PERMUTATION_BYTES_PER_CELL = 4 + 4 + 1 + 4 + 4 + 8 + 8 + 8 + 8 + 8


def data_fits(n_maps: int, n_voxels: int, budget: int, bytes_per_cell: int = 4) -> bool:
    """Whether the masked data (float32, and whatever else is held per map and voxel:
    ``bytes_per_cell`` in all) fit in their share of the budget."""
    return bytes_per_cell * n_maps * n_voxels <= DATA_FRACTION * budget


def work_bytes(budget: int) -> int:
    """Bytes of working arrays one step may hold: :data:`WORK_FRACTION` of ``budget``, at most
    :data:`MAX_WORK_BYTES`.

    >>> work_bytes(4 * 1000**3) == MAX_WORK_BYTES, work_bytes(10**6)
    (True, 250000)
    """
    return min(int(WORK_FRACTION * budget), MAX_WORK_BYTES)


def tile_voxels(n_maps: int, budget: int) -> int:
    """Voxels per tile: a multiple of :data:`TILE_ALIGN` whose working arrays for all
    ``n_maps`` maps fit in :data:`WORK_FRACTION` of ``budget`` and :data:`MAX_WORK_BYTES` (at
    least one aligned tile).

    >>> tile_voxels(100, 4 * 1000**3), tile_voxels(100, 10**6), tile_voxels(10**6, 10**6)
    (65536, 64, 64)
    """
    fitting = work_bytes(budget) // (max(n_maps, 1) * FIT_BYTES_PER_CELL)
    aligned = (fitting // TILE_ALIGN) * TILE_ALIGN
    return min(max(aligned, TILE_ALIGN), MAX_TILE_VOXELS)


@runtime_checkable
class TiledMaps(Protocol):
    """Masked data read one voxel tile (all maps) at a time: the store of
    :mod:`bids_group.store`. An in-memory ``(n_maps, n_voxels)`` array is read with
    :func:`iter_tiles` the same way."""

    @property
    def shape(self) -> tuple[int, int]:
        """(n_maps, n_voxels)."""
        ...

    @property
    def tile_voxels(self) -> int:
        """Voxels per tile (a multiple of :data:`TILE_ALIGN`; the last tile may be shorter)."""
        ...

    def tiles(self) -> Iterator[tuple[slice, np.ndarray]]:
        """(voxel slice, float32 array of shape (n_maps, slice length)) for each tile in order."""
        ...


def scan_voxels(n_maps: int) -> int:
    """Voxels per tile of a scan: a float32 tile of ``n_maps`` maps within :data:`SCAN_BYTES`
    (a multiple of :data:`TILE_ALIGN`, at least one aligned tile, at most
    :data:`MAX_TILE_VOXELS`).

    >>> scan_voxels(1), scan_voxels(1000), scan_voxels(10**6)
    (65536, 4160, 64)
    """
    fitting = SCAN_BYTES // (4 * max(n_maps, 1))
    return min(max((fitting // TILE_ALIGN) * TILE_ALIGN, TILE_ALIGN), MAX_TILE_VOXELS)


def iter_tiles(
    data: np.ndarray | TiledMaps, width: int | None = None
) -> Iterator[tuple[slice, np.ndarray]]:
    """(voxel slice, values of all maps there) per tile: ``width`` voxels of an in-memory
    array at a time (default :func:`scan_voxels`: sized in bytes), or the store's own tiles."""
    if isinstance(data, np.ndarray):
        n_voxels = data.shape[1]
        if width is None:
            width = scan_voxels(data.shape[0])
        for start in range(0, n_voxels, width):
            block = slice(start, min(start + width, n_voxels))
            yield block, data[:, block]
    else:
        yield from data.tiles()


def aligned(width: int) -> int:
    """``width`` rounded up to a multiple of :data:`TILE_ALIGN` (tiles are padded to it).

    >>> aligned(1), aligned(64), aligned(65)
    (64, 64, 128)
    """
    return -(-width // TILE_ALIGN) * TILE_ALIGN


def aligned_matmul(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``a @ y`` computed :data:`TILE_ALIGN` columns of ``y`` at a time (float64).

    ``y`` has a multiple of :data:`TILE_ALIGN` columns (a padded tile). Each column's result
    then comes from a call of the same shape whatever the width of ``y``: the same bits for a
    voxel in any tile (see :data:`TILE_ALIGN`). As fast as one call or faster (measured: 8 ms
    against 29 ms for 3 x 500 by 500 x 4,096): the blocks stay in the cache.

    >>> y = np.arange(256.0).reshape(2, 128)
    >>> np.array_equal(aligned_matmul(np.ones((1, 2)), y), np.ones((1, 2)) @ y)
    True
    """
    out = np.empty((a.shape[0], y.shape[1]), dtype=np.result_type(a, y, np.float64))
    for start in range(0, y.shape[1], TILE_ALIGN):
        block = slice(start, start + TILE_ALIGN)
        np.matmul(a, y[:, block], out=out[:, block])
    return out


#: glibc's ``mallopt`` parameters (malloc.h) and the values :func:`keep_heap_warm` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks below this come from the heap, not from a fresh mapping: a decoded 2 mm map (3.6 MB),
#: its compressed bytes and the fit's steps are reused instead of faulted in page by page.
HEAP_BLOCK_LIMIT = 16 * 1024**2
#: Free memory a heap keeps before giving it back: a few maps per decoding thread.
HEAP_TRIM_THRESHOLD = 32 * 1024**2


def keep_heap_warm() -> bool:
    """Make glibc's malloc reuse freed blocks of up to :data:`HEAP_BLOCK_LIMIT` (process-wide).

    By default glibc maps each block over its (adaptive) threshold afresh and unmaps it when
    freed, and trims heaps eagerly, so a thousand decoded maps fault in a thousand times 3.6 MB
    page by page: at N = 1,000 on the 2 mm grid 2 ms of system time per map, a quarter of the
    CPU of decoding. Fixed thresholds keep that memory in the heap (at most
    :data:`HEAP_TRIM_THRESHOLD` idle per heap). Called by the console entry point only, since
    it changes the whole process; a no-op (False) where the C library is not glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl, macOS: other allocators
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT)
    done &= mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD)
    return bool(done)
