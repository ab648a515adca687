"""Compiled hot loops of the permutation engine (numba, ``nopython``).

Why numba: a permutation test on a 2 mm brain evaluates ~2.4e9 voxel statistics and, for TFCE,
10,000 whole-brain union-find passes. In numpy these become Python loops over permutations with
temporaries of size (n_perm, n_voxels), or scipy.ndimage.label called 100 times per map (which is
why nilearn needs hours). Each kernel below is a single pass over memory with no temporaries.

Everything here is private: arrays in, arrays out, no validation (the callers in
:mod:`bids_group.inference.permutation` and :mod:`bids_group.inference.tfce` validate). Every
kernel is deterministic: results do not depend on the number of threads.

No kernel uses ``fastmath``. Its flags (reassociation, FMA contraction, approximate reciprocals)
let LLVM round differently depending on how a function was compiled, and with ``cache=True``
that is not fixed: a callee compiled in the same process is inlined and re-optimised with its
caller, one loaded from numba's on-disk cache is linked as object code. With ``fastmath``, a
freshly compiled sign-flip kernel and a cached one gave t maps up to 3 ulp apart (18% of
values), which broke "same seed, same files" between runs. Strict IEEE semantics make every
compilation round alike, and cost nothing measurable here: the hot loops are element-wise
(they vectorise without reordering) and their maxima are taken on integer order keys.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from bids_group.inference._numba_cache import ensure_writable_cache

ensure_writable_cache(__file__)  # before any @njit(cache=True) below

# ---------------------------------------------------------------------------------------------
# Cache prefetch hint
# ---------------------------------------------------------------------------------------------


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the CPU to load ``arr[idx]`` into cache (LLVM's prefetch; no effect on results).

    The TFCE union-find visits voxels in order of value, i.e. at random places in the grid;
    asking for a voxel's neighbourhood a few voxels ahead hides most of the cache misses.
    """
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        # read, high temporal locality, data cache
        args_ = [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3)]
        builder.call(fn, [*args_, ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------
# Statistic from the projected data, fused with the per-permutation maximum and voxel counts
# ---------------------------------------------------------------------------------------------


#: Voxels per work item of the fused kernel: small enough that a chunk of every row of the
#: batch stays in cache, large enough to vectorise the inner loop.
_CHUNK = 512


@numba.njit(cache=True)
def _column_max(partial):
    """Per-relabelling maxima (n_batch,) float64 of the per-work-item maxima (n_items, n_batch),
    combined in a fixed order after the parallel loop (so independent of the thread count)."""
    n_items, n_batch = partial.shape
    out = np.full(n_batch, -np.inf)
    for it in range(n_items):
        for b in range(n_batch):
            out[b] = max(out[b], np.float64(partial[it, b]))
    return out


@numba.njit(parallel=True, cache=True, error_model="numpy")
def fused_stat_max_counts(
    w,
    ss,
    rss_floor,
    n_rank,
    n_interest,
    dof,
    is_t,
    two_sided,
    threshold,
    col0,
    out,
    maxima,
    counts,
):
    """t or F for every (relabelling, voxel) from ``w = U' P E``, fused with the per-relabelling
    maximum and the per-voxel exceedance counts.

    Parameters
    ----------
    w : (n_batch * n_rank, n_tile) float64
        Row ``b * n_rank + k`` is the k-th coordinate, in the orthonormal design basis, of the
        relabelled residuals of relabelling ``b``; the first ``n_interest`` span the effect.
        float64 because the residual sum of squares below is ``ss - ||w||^2``, whose relative
        error is ~eps * (1 + t^2 / dof): with float32 products, rounding noise from t ~ 100 on
        (a group swap, which maps t to -t exactly, came out below the tie tolerance).
    ss : (n_tile,) float64
        Sum of squares of the reduced-model residuals (invariant under relabelling).
    rss_floor : (n_tile,) float64
        Lower bound for the residual sum of squares (``ss * 1e-12``, and > 0): rounding can make
        ``ss - ||w||^2`` negative for a near-perfect fit, and a zero voxel must give 0, not NaN.
    threshold : (n_voxels,) float64
        Observed value minus the tie tolerance; ``counts[col0 + v]`` gains the number of
        relabellings whose statistic (``|t|`` if ``two_sided``) is >= ``threshold[col0 + v]``.
    out : (n_batch, n_tile) float32
        Receives the statistic.
    maxima : (n_batch,) float64
        Running max over voxel tiles, updated in place.

    Notes
    -----
    The loops run along voxels (contiguous) so they vectorise (``error_model="numpy"`` drops
    the per-division zero checks that otherwise prevent it). Strict IEEE arithmetic (no
    ``fastmath``, see the module docstring), so results depend on neither the thread count
    nor how the kernel was compiled.
    """
    n_batch = out.shape[0]
    n_tile = out.shape[1]
    n_chunks = (n_tile + _CHUNK - 1) // _CHUNK
    chunk_max = np.empty((n_chunks, n_batch), np.float64)
    for c in numba.prange(n_chunks):
        v0 = c * _CHUNK
        n_c = min(v0 + _CHUNK, n_tile) - v0
        cnt = np.zeros(n_c, np.int64)
        tot = np.empty(n_c, np.float64)
        num = np.empty(n_c, np.float64)
        val = np.empty(n_c, np.float32)
        thr = threshold[col0 + v0 : col0 + v0 + n_c].astype(np.float32)
        for b in range(n_batch):
            base = b * n_rank
            for i in range(n_c):
                x = np.float64(w[base, v0 + i])
                tot[i] = x * x
            for k in range(1, n_rank):
                if k == n_interest:
                    for i in range(n_c):
                        num[i] = tot[i]
                for i in range(n_c):
                    x = np.float64(w[base + k, v0 + i])
                    tot[i] += x * x
            if n_interest == n_rank:
                for i in range(n_c):
                    num[i] = tot[i]
            # simple branch-free loops (flags hoisted out) so that each vectorises
            if is_t:
                for i in range(n_c):
                    v = v0 + i
                    rss = ss[v] - tot[i]
                    rss = rss if rss > rss_floor[v] else rss_floor[v]
                    val[i] = np.float64(w[base, v]) * np.sqrt(dof / rss)
            else:
                scale = dof / n_interest
                for i in range(n_c):
                    v = v0 + i
                    rss = ss[v] - tot[i]
                    rss = rss if rss > rss_floor[v] else rss_floor[v]
                    val[i] = num[i] * scale / rss
            for i in range(n_c):
                out[b, v0 + i] = val[i]
            if two_sided:
                for i in range(n_c):
                    val[i] = abs(val[i])
            m = -np.inf
            for i in range(n_c):
                a = val[i]
                m = a if a > m else m
                cnt[i] += np.int64(a >= thr[i])
            chunk_max[c, b] = m
        for i in range(n_c):
            counts[col0 + v0 + i] += cnt[i]
    tile_max = _column_max(chunk_max)
    for b in range(n_batch):
        maxima[b] = max(maxima[b], tile_max[b])


# ---------------------------------------------------------------------------------------------
# Union-find with path compression
# ---------------------------------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def _find(parent, x):
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:
        nxt = parent[x]
        parent[x] = root
        x = nxt
    return root


# ---------------------------------------------------------------------------------------------
# Clusters above one height
# ---------------------------------------------------------------------------------------------


@numba.njit(cache=True)
def cluster_labels(values, height, fwd_ptr, fwd_idx, parent):
    """Label the connected sets of voxels with ``values > height``.

    Returns labels (n_voxels,) int32, 0 outside clusters, 1..n inside, numbered in order of first
    voxel. ``parent`` is scratch (n_voxels,) int32.
    """
    n = values.shape[0]
    for i in range(n):
        parent[i] = i
    for i in range(n):
        if values[i] > height:
            for j in range(fwd_ptr[i], fwd_ptr[i + 1]):
                u = fwd_idx[j]
                if values[u] > height:
                    ri = _find(parent, i)
                    ru = _find(parent, u)
                    if ri != ru:
                        if ri < ru:
                            parent[ru] = ri
                        else:
                            parent[ri] = ru
    labels = np.zeros(n, np.int32)
    root_label = np.zeros(n, np.int32)
    n_lab = 0
    for i in range(n):
        if values[i] > height:
            r = _find(parent, i)
            if root_label[r] == 0:
                n_lab += 1
                root_label[r] = n_lab
            labels[i] = root_label[r]
    return labels


@numba.njit(cache=True)
def cluster_max_size_mass(values, sign, height, fwd_ptr, fwd_idx, parent, size, mass):
    """Largest cluster size and mass among voxels with ``sign * values > height``.

    Mass of a cluster is the sum of ``sign * value - height`` over its voxels. Only voxels above
    the height are touched, so the cost scales with the suprathreshold volume. ``parent``,
    ``size`` (int32) and ``mass`` (float64) are scratch arrays of length n_voxels.
    """
    n = values.shape[0]
    n_active = 0
    active = np.empty(n, np.int32)
    for i in range(n):
        x = sign * values[i]
        if x > height:
            parent[i] = i
            size[i] = 1
            mass[i] = x - height
            active[n_active] = i
            n_active += 1
        else:
            parent[i] = -1
    best_size = 0
    best_mass = 0.0
    for a in range(n_active):
        i = active[a]
        for j in range(fwd_ptr[i], fwd_ptr[i + 1]):
            u = fwd_idx[j]
            if parent[u] >= 0:
                ri = _find(parent, i)
                ru = _find(parent, u)
                if ri != ru:
                    if size[ri] < size[ru]:
                        ri, ru = ru, ri
                    parent[ru] = ri
                    size[ri] += size[ru]
                    mass[ri] += mass[ru]
    for a in range(n_active):
        i = active[a]
        if parent[i] == i:
            if size[i] > best_size:
                best_size = size[i]
            if mass[i] > best_mass:
                best_mass = mass[i]
    return best_size, best_mass


@numba.njit(parallel=True, cache=True)
def batch_cluster_max(stat, height, two_sided, fwd_ptr, fwd_idx, max_size, max_mass):
    """:func:`cluster_max_size_mass` for every row of ``stat`` (n_batch, n_voxels), in parallel."""
    n_batch, n = stat.shape
    for b in numba.prange(n_batch):
        parent = np.empty(n, np.int32)
        size = np.empty(n, np.int32)
        mass = np.empty(n, np.float64)
        s, m = cluster_max_size_mass(stat[b], 1.0, height, fwd_ptr, fwd_idx, parent, size, mass)
        if two_sided:
            s2, m2 = cluster_max_size_mass(
                stat[b], -1.0, height, fwd_ptr, fwd_idx, parent, size, mass
            )
            s = max(s, s2)
            m = max(m, m2)
        max_size[b] = s
        max_mass[b] = m


# ---------------------------------------------------------------------------------------------
# TFCE: every threshold's clusters in one pass over voxels sorted by value
# ---------------------------------------------------------------------------------------------
#
# Voxels enter in decreasing order of value and are merged with already-entered neighbours by
# union-find, so after the voxels >= h have entered the components are the clusters at height h.
# TFCE(v) = sum over heights of e(h)^E * dG(h), with G(h) = h^(H+1)/(H+1) for the exact integral
# and G(h) = sum_{steps h_k counted at h} h_k^H for the step presets. A component's extent is
# constant between two events that touch it, so its contribution is added lazily to an offset on
# its root when it is next touched ("potential" union-find): the TFCE of a voxel is the sum of the
# offsets on its path to the root. Cost: O(n_voxels * alpha) per map once sorted.
#
# Per map: (1) rank the voxels (radix sort on the float64 bit pattern, exact; or counting sort on
# step levels) and write each voxel's rank into a rank grid (the mask's grid padded by one voxel,
# so the neighbours of a voxel are fixed offsets and need no index lists); (2) in rank order,
# read the neighbours' ranks from the grid (branch-free) and merge with those that entered
# earlier; the union-find state is indexed by rank, so a new voxel's state is the next entry.
# The neighbours are merged in increasing voxel index, as with the CSR lists of the graph.
# Scratch arrays are allocated once per worker thread and reused for all its maps; nothing is
# zeroed per map except what the map touched (the output pass resets the rank grid).

# TFCE modes (see bids_group.inference.tfce): how heights are discretised.
MODE_EXACT = 0  # the integral, exactly (piecewise between voxel values)
MODE_STEPS_PER_MAP = 1  # n_steps per map: h_k = k * max/n_steps, voxel counted if x >= h_k
MODE_FIXED_DH = 2  # fixed dh: h_k = k * dh, voxel counted if x > h_k

_INACTIVE = np.int32(2**31 - 1)
#: Radix sort digits: at most 12 bits (4096 counters per digit stay in L1).
_RADIX_BITS = 11
_N_DIGITS = 6  # ceil(64 / 12)
#: Voxels ahead (in order of value) whose grid neighbourhood is prefetched (8-16 measured
#: best: ~10% off an exact TFCE map of the 2 mm brain).
_PREFETCH_AHEAD = 16


@numba.njit(cache=True, inline="always")
def _find_offset(parent, offset, x):
    """Root of ``x``; compresses the path so that every node on it points to the root with
    ``offset[node]`` = sum of the old offsets from that node up to (excluding) the root."""
    root = x
    total = 0.0
    while parent[root] != root:
        total += offset[root]
        root = parent[root]
    y = x
    rem = total
    while parent[y] != root and y != root:
        nxt = parent[y]
        old = offset[y]
        offset[y] = rem
        rem -= old
        parent[y] = root
        y = nxt
    return root


@numba.njit(cache=True)
def _tfce_scratch(n, grid_size, n_nb):
    """Per-thread work arrays of the TFCE kernel for maps of ``n`` voxels (see _tfce_map)."""
    return (
        np.full(grid_size, _INACTIVE, np.int32),  # rank_grid: rank of each voxel, or _INACTIVE
        np.empty(n, np.float64),  # y: the signed map
        np.empty(n, np.int64),  # level (step presets)
        np.empty(n, np.int32),  # order (voxels by rank)
        np.empty(n, np.int32),  # order_tmp (radix sort)
        np.empty(n, np.uint64),  # keys
        np.empty(n, np.uint64),  # keys_tmp
        np.empty((_N_DIGITS, 1 << _RADIX_BITS), np.int32),  # hist
        np.empty(n_nb + 1, np.int32),  # earlier: the earlier-entered neighbours of one voxel
        np.empty(n, np.int64),  # pos_rank: grid position of each rank
        np.empty(n, np.float64),  # g_rank: G(value) by rank
        np.empty(n, np.int32),  # parent
        np.empty(n, np.int32),  # size
        np.empty(n, np.float64),  # last
        np.empty(n, np.float64),  # offset
    )


@numba.njit(cache=True)
def _order_desc(y, order, order_tmp, keys, keys_tmp, hist):
    """Voxels with y > 0 by decreasing y, ties by increasing index.

    LSD radix sort on the complemented float64 bit pattern (monotone in y for y > 0, so the
    order is exact and stable). Only the span of bits on which the keys differ is sorted (for
    float32 data that excludes the low 29 bits), in as few passes of <= _RADIX_BITS as it
    takes. Returns ``(order, sorted_keys, n_active)``: each is ``order`` or ``order_tmp``,
    ``keys`` or ``keys_tmp``, whichever holds the result; ``~sorted_keys[a]`` are the bits of
    the a-th largest y (so the caller needs no scattered read of y).
    """
    n = y.shape[0]
    bits = y.view(np.uint64)
    n_act = 0
    ones = ~np.uint64(0)
    k_and = ones
    k_or = np.uint64(0)
    for i in range(n):  # branch-free: y > 0 is a coin toss for a null map
        k = ~bits[i]
        active = y[i] > 0.0
        order[n_act] = i
        keys[n_act] = k
        n_act += active
        k_and &= k if active else ones
        k_or |= k if active else np.uint64(0)
    differ = k_or ^ k_and  # the bits on which the active keys are not all equal
    if n_act < 2 or differ == 0:
        return order, keys, n_act
    lo = 0
    while not (differ >> np.uint64(lo)) & np.uint64(1):
        lo += 1
    hi = 63
    while not (differ >> np.uint64(hi)) & np.uint64(1):
        hi -= 1
    n_pass = (hi - lo + _RADIX_BITS) // _RADIX_BITS
    width = (hi - lo + n_pass) // n_pass  # ceil(span / n_pass) <= _RADIX_BITS
    mask = np.uint64((1 << width) - 1)
    n_bucket = 1 << width
    hist[:n_pass, :n_bucket] = 0
    for a in range(n_act):
        k = keys[a] >> np.uint64(lo)
        for d in range(n_pass):
            hist[d, np.intp((k >> np.uint64(d * width)) & mask)] += 1
    src_o, src_k, dst_o, dst_k = order, keys, order_tmp, keys_tmp
    for d in range(n_pass):
        h = hist[d]
        pos = 0
        for c in range(n_bucket):
            cnt = h[c]
            h[c] = pos
            pos += cnt
        shift = np.uint64(lo + d * width)
        for a in range(n_act):
            k = src_k[a]
            c = np.intp((k >> shift) & mask)
            p = h[c]
            h[c] = p + 1
            dst_o[p] = src_o[a]
            dst_k[p] = k
        src_o, src_k, dst_o, dst_k = dst_o, dst_k, src_o, src_k
    return src_o, src_k, n_act


@numba.njit(cache=True)
def _order_levels(level, n_level, order, hist):
    """Voxels with level > 0 by decreasing level, ties by increasing index (counting sort);
    returns n_active. ``hist`` is scratch of length >= n_level + 2."""
    n = level.shape[0]
    counts = hist[: n_level + 2]
    counts[:] = 0
    n_act = 0
    for i in range(n):
        if level[i] > 0:
            counts[n_level - level[i] + 1] += 1
            n_act += 1
    for k in range(n_level + 1):
        counts[k + 1] += counts[k]
    for i in range(n):
        if level[i] > 0:
            k = n_level - level[i]
            order[counts[k]] = i
            counts[k] += 1
    return n_act


@numba.njit(cache=True)
def _step_levels(y, mode, h_exp, dh, n_steps, level, g_by_voxel):
    """Step presets: ``level[i]`` = number of steps counted at y[i], ``g_by_voxel[i]`` = G."""
    n = y.shape[0]
    if mode == MODE_STEPS_PER_MAP:
        step = dh / n_steps
        k_max = n_steps
    else:
        step = dh
        ymax = 0.0
        for i in range(n):
            if y[i] > ymax:
                ymax = y[i]
        k_max = int(ymax / step) + 2
    steps = np.empty(k_max + 1, np.float64)
    for k in range(k_max + 1):
        steps[k] = k * step
    if mode == MODE_STEPS_PER_MAP:
        steps[k_max] = dh  # numpy.linspace sets the end point exactly
    cum = np.zeros(k_max + 1, np.float64)
    for k in range(1, k_max + 1):
        if h_exp == 2.0:
            cum[k] = cum[k - 1] + steps[k] * steps[k]
        else:
            cum[k] = cum[k - 1] + steps[k] ** h_exp
    for i in range(n):
        yi = y[i]
        level[i] = 0
        if yi <= 0.0:
            continue
        k = min(int(yi / step), k_max)
        if mode == MODE_STEPS_PER_MAP:  # number of steps <= y
            while k < k_max and steps[k + 1] <= yi:
                k += 1
            while k > 0 and steps[k] > yi:
                k -= 1
        else:  # number of steps < y
            while k < k_max and steps[k + 1] < yi:
                k += 1
            while k > 0 and steps[k] >= yi:
                k -= 1
        level[i] = k
        g_by_voxel[i] = cum[k]
    return k_max


@numba.njit(cache=True)
def _tfce_map(
    x, sign, mode, h_exp, dh, n_steps, grid_pos, grid_off, extent_pow, scratch, out, count, thr, cnt
):
    """TFCE of the positive part of ``sign * x``; returns its maximum (>= 0).

    ``sign`` = +1 writes every voxel of ``out`` (0 where ``x <= 0``); ``sign`` = -1 writes
    ``-TFCE`` where it is > 0 and leaves the rest (the positive tail's values) alone.
    ``mode`` is one of MODE_*. For MODE_FIXED_DH the steps are ``k * dh`` (k >= 1) and a voxel
    counts at a step when strictly above it (FSL). For MODE_STEPS_PER_MAP they are
    ``numpy.linspace(0, dh, n_steps + 1)[1:]`` (the caller passes the map's maximum as ``dh``)
    and a voxel counts when >= the step (nilearn). ``extent_pow[s] = s ** e_exp``.
    ``scratch`` is :func:`_tfce_scratch` (its rank grid all _INACTIVE on entry and on exit).
    If ``count``, ``cnt[v]`` gains 1 where the final ``|out[v]|`` is >= ``thr[v]`` (call it so
    on the last tail only).
    """
    (rank_grid, y, level, order, order_tmp, keys, keys_tmp, hist, earlier, pos_rank) = scratch[:10]
    g_rank = scratch[10]
    parent, size, last, offset = scratch[11:]
    n = x.shape[0]
    for i in range(n):
        y[i] = sign * np.float64(x[i])
    if mode == MODE_EXACT:
        order, sorted_keys, n_act = _order_desc(y, order, order_tmp, keys, keys_tmp, hist)
        for a in range(n_act):
            sorted_keys[a] = ~sorted_keys[a]
        y_sorted = sorted_keys.view(np.float64)
        inv = 1.0 / (h_exp + 1.0)
        for a in range(n_act):
            yv = y_sorted[a]
            if h_exp == 2.0:
                g_rank[a] = yv * yv * yv * inv
            else:
                g_rank[a] = yv ** (h_exp + 1.0) * inv
    else:
        g_by_voxel = last  # free until the union-find
        k_max = _step_levels(y, mode, h_exp, dh, n_steps, level, g_by_voxel)
        counts = hist.reshape(-1)
        if k_max + 2 > counts.shape[0]:  # a permuted map far above the observed one
            counts = np.empty(k_max + 2, np.int32)
        n_act = _order_levels(level, k_max, order, counts)
        for a in range(n_act):
            g_rank[a] = g_by_voxel[order[a]]
    for a in range(n_act):
        p = grid_pos[order[a]]
        rank_grid[p] = a
        pos_rank[a] = p
    n_off = grid_off.shape[0]
    for a in range(n_act):
        ahead = pos_rank[min(a + _PREFETCH_AHEAD, n_act - 1)]
        for k in range(n_off):
            _prefetch(rank_grid, ahead + grid_off[k])
        # the neighbours that entered earlier, in increasing voxel index; branch-free (which
        # neighbours entered earlier is a coin toss that a branch would mispredict)
        p = pos_rank[a]
        n_earlier = 0
        for k in range(n_off):
            b = rank_grid[p + grid_off[k]]
            earlier[n_earlier] = b
            n_earlier += b < a
        g = g_rank[a]
        parent[a] = a
        size[a] = 1
        last[a] = g
        offset[a] = 0.0
        rv = a
        for k in range(n_earlier):
            b = earlier[k]
            if parent[b] == rv:  # already in this component (the common case): skip the find
                continue
            ru = _find_offset(parent, offset, b)
            if ru == rv:
                continue
            if rv == a:
                # The new voxel joins its first component (the most common merge): as the
                # general case below with size 1 and nothing yet accumulated on it.
                offset[ru] += extent_pow[size[ru]] * (last[ru] - g)
                last[ru] = g
                parent[a] = ru
                offset[a] = 0.0 - offset[ru]  # as the general case (-x differs at x = 0)
                size[ru] += 1
                rv = ru
                continue
            # The two components had constant extents since they were last touched: add their
            # contribution down to the current height, then merge (smaller under larger).
            offset[ru] += extent_pow[size[ru]] * (last[ru] - g)
            last[ru] = g
            offset[rv] += extent_pow[size[rv]] * (last[rv] - g)
            last[rv] = g
            if size[ru] < size[rv]:
                small = ru
                big = rv
            else:
                small = rv
                big = ru
            parent[small] = big
            offset[small] -= offset[big]
            size[big] += size[small]
            rv = big
    # Final flush down to G(0) = 0, then every voxel's TFCE is its path sum of offsets.
    for a in range(n_act):
        if parent[a] == a:
            offset[a] += extent_pow[size[a]] * last[a]
    for a in range(n_act):
        _find_offset(parent, offset, a)
    for a in range(n_act):
        r = parent[a]
        if r != a:  # every non-root now points at its root, whose offset is final
            offset[a] += offset[r]
    # Write out (branch-free: active or not is a coin toss), reset the rank grid, count.
    best = 0.0
    last_rank = n - 1
    for v in range(n):
        p = grid_pos[v]
        ra = rank_grid[p]
        rank_grid[p] = _INACTIVE
        t = offset[min(ra, last_rank)]
        t = t if ra != _INACTIVE else 0.0
        if sign > 0:
            out[v] = t
        else:
            out[v] = -t if t > 0.0 else out[v]
        best = max(best, t)
        if count:
            cnt[v] += abs(np.float64(out[v])) >= thr[v]
    return best


@numba.njit(parallel=True, cache=True)
def batch_tfce(
    stat,
    two_sided,
    mode,
    h_exp,
    dh,
    n_steps,
    grid_pos,
    grid_off,
    grid_size,
    extent_pow,
    n_work,
    tfce_out,
    maxima,
    count,
    threshold,
    counts,
):
    """TFCE of every row of ``stat`` (n_batch, n_voxels), in parallel over rows.

    ``tfce_out`` (n_batch, n_voxels) float32 or float64 receives signed TFCE (negative on the
    negative tail when ``two_sided``); ``maxima[b]`` the max of |TFCE|. For
    MODE_STEPS_PER_MAP, ``dh`` is ignored and each map's own max (of |stat| when two-sided)
    sets the steps. ``grid_pos`` (n_voxels,) are the voxels' flat indices in the padded grid of
    ``grid_size`` cells and ``grid_off`` the neighbours' flat offsets there, increasing.
    If ``count``, ``counts[v]`` (int64) gains the number of rows with |TFCE| >= ``threshold[v]``.
    Each of the ``n_work`` workers (the number of threads) takes every n_work-th row and
    allocates its scratch once; a row's result does not depend on which worker computes it,
    and the per-worker counts are integers, so their sum does not either.
    """
    n_batch, n = stat.shape
    n_work = max(1, min(n_work, n_batch))
    worker_counts = np.zeros((n_work, n if count else 0), np.int64)
    for w in numba.prange(n_work):
        scratch = _tfce_scratch(n, grid_size, grid_off.shape[0])
        cnt = worker_counts[w]
        for b in range(w, n_batch, n_work):
            row = stat[b]
            out = tfce_out[b]
            top = dh
            if mode == MODE_STEPS_PER_MAP:
                top = 0.0
                for i in range(n):
                    top = max(top, abs(row[i]) if two_sided else row[i])
            if top > 0.0 or mode == MODE_EXACT:
                best = 0.0
                for tail in range(2 if two_sided else 1):
                    sign = 1.0 - 2.0 * tail
                    tail_max = _tfce_map(
                        row,
                        sign,
                        mode,
                        h_exp,
                        top,
                        n_steps,
                        grid_pos,
                        grid_off,
                        extent_pow,
                        scratch,
                        out,
                        count and (sign < 0 or not two_sided),
                        threshold,
                        cnt,
                    )
                    best = max(best, tail_max)
                maxima[b] = best
            else:  # nothing above 0 to enhance (steps per map, map max <= 0)
                maxima[b] = 0.0
                for v in range(n):
                    out[v] = 0.0
                    if count:
                        cnt[v] += 0.0 >= threshold[v]
    if count:
        for w in range(n_work):
            for v in range(n):
                counts[v] += worker_counts[w, v]


# ---------------------------------------------------------------------------------------------
# Sign flips without a matrix product: subset-sum tables ("four Russians")
# ---------------------------------------------------------------------------------------------
#
# With sign flips only (no row permutation), coordinate k of relabelling b at voxel v is
# sum_i s_bi U_ik E_iv. Rows are cut into groups of ``n_bits``; for each group the 2^n_bits
# signed partial sums are tabulated once per voxel tile, and each relabelling then costs one
# table row per group (n_rows / n_bits additions per voxel instead of n_rows multiply-adds).
# The tables are built in float64 and stored in float32 (each table entry is correctly rounded;
# the sum over groups has fewer roundings than the float32 matrix product it replaces).
#
# Exact symmetry: flipping every sign maps each table entry to the entry of the complementary
# code, and the tables are built so that this entry is the exact negative (the upper half of each
# half-table is the negated lower half, and IEEE rounding is symmetric). The per-group rows are
# summed in a fixed order, so the all-flipped relabelling gives exactly -w: its statistic is
# bit-for-bit the negated statistic of the identity, whatever its size.
#
# The statistic is handled in "v-space": v = N / rss with N the interest part (w0 |w0| for t, the
# sum of squares of the q interest coordinates for F), so t = sign(v) sqrt(dof |v|) and
# F = (dof / q) v are increasing in v: maxima and threshold exceedances are found on v and
# converted once per relabelling. The residual sum of squares is NOT ``ss - ||w||^2``: for a
# large statistic ||w||^2 is within a few float32 ulps of ss and the difference is rounding noise
# (t = 244 with 10 subjects: 1 - ||w||^2/ss = 1.5e-4, 2,500 float32 ulps; the all-flipped t came
# out 3e-5 below the identity's, and 13% below at t = 1e4). Instead, with w_id the coordinates of
# the identity (computed from the same tables, so exactly those of the kernel) and rss_id its
# residual sum of squares (float64, from the residuals themselves),
#     rss = rss_id + sum_k (w_id,k - w_k)(w_id,k + w_k)          (= ss - ||w||^2 exactly),
# which is rss_id at the identity and, bit for bit, at the all-flipped relabelling (one factor is
# exactly 0), and loses no accuracy as rss_id -> 0.

#: Voxels per table tile: the tables of one tile (groups x 2^n_bits rows of _SUB float32) stay
#: in the core's L2 cache, and each row is a whole number of cache lines.
_SUB = 128
#: Voxels per parallel work item (a few tiles; per-item maxima are combined at the end).
_ITEM = 2048
#: Order key below every float32 (the running maximum of an empty set).
_KEY_NONE = -2147483648


@numba.njit(cache=True, error_model="numpy", inline="always")
def _v_to_stat(v, is_t, dof, n_interest):
    """t or F (float64) of the v-space value ``v`` (see above)."""
    if is_t:
        s = np.sqrt(dof * abs(v))
        return s if v >= 0 else -s
    return dof / n_interest * v


@numba.njit(cache=True, error_model="numpy", boundscheck=False, inline="always")
def _write_stat(vb, nv, is_t, dof, n_interest, dst):
    """t or F of ``vb[:nv]`` (v-space) into ``dst``: ``_v_to_stat`` in float32, branch-free, so
    that the loop vectorises (the maps are float32; v is already float32). Odd in v for t, so
    that the all-flipped relabelling writes exactly the negated map of the identity."""
    if is_t:
        d = np.float32(dof)
        for i in range(nv):
            v = vb[i]
            s = np.sqrt(d * abs(v))
            dst[i] = s if v >= 0 else -s
    else:
        scale = np.float32(dof / n_interest)
        for i in range(nv):
            dst[i] = scale * vb[i]


@numba.njit(cache=True, inline="always")
def _order_key(bits):
    """Integer with the order of the float32 whose bits are ``bits`` (an involution).

    numba does not vectorise a float maximum over a loop, but it does an int32 one: positive
    floats already sort as their bits, negative ones sort reversed, so their 31 low bits are
    flipped. The int32 casts keep numba's integer promotion from widening the loop to int64.
    """
    return np.int32(bits ^ ((bits >> 31) & 0x7FFFFFFF))


@numba.njit(cache=True, inline="always")
def _key_max(ubi, nv):
    """Largest order key of the float32 bits ``ubi[:nv]`` (an int32 reduction: it vectorises)."""
    m = np.int32(_KEY_NONE)
    for i in range(nv):
        m = max(m, _order_key(ubi[i]))
    return m


@numba.njit(cache=True, error_model="numpy", boundscheck=False)
def _flip_tables(resid, basis, v0, nv, n_bits, n_groups, half, tab):
    """Subset-sum tables of voxels ``v0 .. v0 + nv`` (zero beyond ``nv``) into ``tab``.

    ``tab[(k * n_groups + g) * 2^n_bits + c, i]`` = sum over the rows j of group g of
    U[r_j, k] * (-1)^(bit j of c) * E[r_j, v0 + i]. Each group's rows are split in two halves,
    whose 2^(bits/2) partial sums are tabulated in float64 (``half``); every table entry is then
    one float64 addition, correctly rounded to float32. The entry of the complementary code
    (every bit of the group flipped) is exactly the negated entry.
    """
    n_rows = resid.shape[0]
    n_rank = basis.shape[1]
    n_tab = 1 << n_bits
    for k in range(n_rank):
        for g in range(n_groups):
            r0 = g * n_bits
            nb = min(n_bits, n_rows - r0)
            n_lo = nb // 2
            for h in range(2):
                part = half[h]
                first = r0 + (n_lo if h else 0)
                n_h = nb - n_lo if h else n_lo
                base = part[0]
                for i in range(_SUB):
                    base[i] = 0.0
                for j in range(n_h):
                    wgt = basis[first + j, k]
                    src = resid[first + j]
                    for i in range(nv):
                        base[i] += wgt * np.float64(src[v0 + i])
                n_c = 1 << n_h
                # lower half (top bit clear): each code from the one without its lowest bit
                for c in range(1, n_c >> 1):
                    j = 0
                    while not (c >> j) & 1:
                        j += 1
                    wgt = 2.0 * basis[first + j, k]
                    src = resid[first + j]
                    prev = part[c - (1 << j)]
                    dst = part[c]
                    for i in range(nv):
                        dst[i] = prev[i] - wgt * np.float64(src[v0 + i])
                    for i in range(nv, _SUB):
                        dst[i] = 0.0
                # upper half: the complementary code negated, exactly (see above)
                if n_h > 0:
                    for c in range(n_c >> 1, n_c):
                        src = part[(n_c - 1) ^ c]
                        dst = part[c]
                        for i in range(_SUB):
                            dst[i] = -src[i]
            row0 = (k * n_groups + g) * n_tab
            lo, hi = half[0], half[1]
            for ch in range(1 << (nb - n_lo)):
                b_row = hi[ch]
                for cl in range(1 << n_lo):
                    a_row = lo[cl]
                    dst32 = tab[row0 + (ch << n_lo) + cl]
                    for i in range(_SUB):
                        dst32[i] = np.float32(a_row[i] + b_row[i])


@numba.njit(cache=True, error_model="numpy", boundscheck=False, inline="always")
def _sum_rows(a, add, n, r0, r1, r2, r3):
    """``a`` (+)= the sum of the first ``n`` (1 to 4) rows: one pass, one store per voxel."""
    if add:
        if n == 4:
            for i in range(_SUB):
                a[i] += (r0[i] + r1[i]) + (r2[i] + r3[i])
        elif n == 3:
            for i in range(_SUB):
                a[i] += (r0[i] + r1[i]) + r2[i]
        elif n == 2:
            for i in range(_SUB):
                a[i] += r0[i] + r1[i]
        else:
            for i in range(_SUB):
                a[i] += r0[i]
    elif n == 4:
        for i in range(_SUB):
            a[i] = (r0[i] + r1[i]) + (r2[i] + r3[i])
    elif n == 3:
        for i in range(_SUB):
            a[i] = (r0[i] + r1[i]) + r2[i]
    elif n == 2:
        for i in range(_SUB):
            a[i] = r0[i] + r1[i]
    else:
        for i in range(_SUB):
            a[i] = r0[i]


@numba.njit(cache=True, error_model="numpy", boundscheck=False, inline="always")
def _table_row(tab, codes, b, base, n_tab, g):
    return tab[base + g * n_tab + codes[b, g]]


@numba.njit(cache=True, error_model="numpy", boundscheck=False, inline="always")
def _accumulate(tab, codes, b, base, n_tab, n, a):
    """``a`` = the sum of the table rows of groups 0 .. n - 1 for relabelling b (0 if n = 0)."""
    if n == 0:
        for i in range(_SUB):
            a[i] = 0.0
        return
    for g0 in range(0, n, 4):
        m = min(4, n - g0)
        r0 = _table_row(tab, codes, b, base, n_tab, g0)
        r1 = _table_row(tab, codes, b, base, n_tab, g0 + min(1, m - 1))
        r2 = _table_row(tab, codes, b, base, n_tab, g0 + min(2, m - 1))
        r3 = _table_row(tab, codes, b, base, n_tab, g0 + min(3, m - 1))
        _sum_rows(a, g0 > 0, m, r0, r1, r2, r3)


@numba.njit(cache=True, error_model="numpy", boundscheck=False, inline="always")
def _coords(tab, codes, b, base, n_tab, n_groups, a):
    """``a`` = the coordinate of relabelling b: the rows of groups 0 .. n - 2, then the last
    group's row added, in the order of the fast path ``_flip_tile_t`` (so every path, and the
    identity, round alike)."""
    _accumulate(tab, codes, b, base, n_tab, n_groups - 1, a)
    row = _table_row(tab, codes, b, base, n_tab, n_groups - 1)
    for i in range(_SUB):
        a[i] = a[i] + row[i]


@numba.njit(cache=True, error_model="numpy", boundscheck=False)
def _flip_tile_t(tab, codes, zero, n_tab, two_sided, rss_id, floor_t, thr, nv, a, w_id, vb, cnt,
                 key_max):  # fmt: skip
    """Fast path of ``_flip_tile``: one interest column, no nuisance, no map written.

    The last group's row, the statistic, the exceedance count and the order key are one pass.
    ``zero`` (1, n_groups) are the codes of the identity, whose w is summed exactly as every
    relabelling's (same rows, same order).
    """
    n_batch, n_groups = codes.shape
    last = n_groups - 1
    vbi = vb.view(np.int32)
    _coords(tab, zero, 0, 0, n_tab, n_groups, w_id)
    for b in range(n_batch):
        _accumulate(tab, codes, b, 0, n_tab, last, a)
        row = _table_row(tab, codes, b, 0, n_tab, last)
        if two_sided:
            for i in range(_SUB):
                w = a[i] + row[i]
                rss = max(rss_id[i] + (w_id[i] - w) * (w_id[i] + w), floor_t[i])
                v = w * w / rss
                vb[i] = v
                cnt[i] += np.int32(v >= thr[i])
        else:
            for i in range(_SUB):
                w = a[i] + row[i]
                rss = max(rss_id[i] + (w_id[i] - w) * (w_id[i] + w), floor_t[i])
                v = w * abs(w) / rss
                vb[i] = v
                cnt[i] += np.int32(v >= thr[i])
        key_max[b] = max(key_max[b], _key_max(vbi, nv))


@numba.njit(cache=True, error_model="numpy", boundscheck=False)
def _flip_tile(
    tab,
    codes,
    zero,
    n_tab,
    n_interest,
    is_t,
    two_sided,
    rss_id,
    floor_t,
    thr,
    nv,
    acc,
    w_id,
    vb,
    cnt,
    key_max,
    write_out,
    out,
    v0,
    dof,
):
    """Every relabelling of the batch on one tile of _SUB voxels (see ``flip_table_stats``).

    Each loop vectorises along voxels: fixed bounds, a simple body, and the running maximum
    taken on int32 order keys.
    """
    n_rank = acc.shape[0]
    if n_rank == 1 and is_t and not write_out:
        _flip_tile_t(tab, codes, zero, n_tab, two_sided, rss_id, floor_t, thr, nv, acc[0],
                     w_id[0], vb, cnt, key_max)  # fmt: skip
        return
    n_batch, n_groups = codes.shape
    vbi = vb.view(np.int32)
    for k in range(n_rank):
        _coords(tab, zero, 0, k * n_groups * n_tab, n_tab, n_groups, w_id[k])
    for b in range(n_batch):
        for k in range(n_rank):
            _coords(tab, codes, b, k * n_groups * n_tab, n_tab, n_groups, acc[k])
        if n_rank == 1:
            a = acc[0]
            wi = w_id[0]
            for i in range(_SUB):
                w = a[i]
                rss = max(rss_id[i] + (wi[i] - w) * (wi[i] + w), floor_t[i])
                vb[i] = (w * abs(w) if is_t else w * w) / rss
        else:
            for i in range(_SUB):
                num = np.float32(0.0)
                rss = rss_id[i]
                for k in range(n_rank):
                    w = acc[k, i]
                    rss += (w_id[k, i] - w) * (w_id[k, i] + w)
                    if k < n_interest:
                        num += w * w
                if is_t:
                    num = acc[0, i] * abs(acc[0, i])
                vb[i] = num / max(rss, floor_t[i])
        if write_out:
            _write_stat(vb, nv, is_t, dof, n_interest, out[b, v0 : v0 + nv])
        if two_sided:
            for i in range(_SUB):
                vb[i] = abs(vb[i])
        for i in range(_SUB):
            cnt[i] += np.int32(vb[i] >= thr[i])
        key_max[b] = max(key_max[b], _key_max(vbi, nv))


@numba.njit(parallel=True, cache=True, error_model="numpy")
def flip_table_stats(
    resid,
    basis,
    codes,
    n_bits,
    rss_id,
    rss_floor,
    n_interest,
    dof,
    is_t,
    two_sided,
    v_threshold,
    write_out,
    out,
    maxima,
    counts,
):
    """Statistics of a batch of sign flips, their per-relabelling maxima and voxel counts.

    Parameters
    ----------
    resid : (n_rows, n_voxels) float64 (or float32)
        Freedman-Lane residuals E (C-contiguous).
    basis : (n_rows, n_rank) float64
        Orthonormal design basis U, interest first.
    codes : (n_batch, n_groups) int64
        Bit j of ``codes[b, g]`` set = row ``g * n_bits + j`` flipped in relabelling b.
    rss_id, rss_floor : (n_voxels,) float32
        Residual sum of squares of the full model fitted to E (the identity), and the smallest
        residual sum of squares allowed (> 0: a zero voxel gives 0, not NaN).
    v_threshold : (n_voxels,) float32
        Observed statistic minus the tie tolerance, mapped to v; ``counts[v]`` gains the
        relabellings with v (|v| if ``two_sided``) >= it.
    write_out : bool
        Write the statistic into ``out`` (n_batch, n_voxels) float32 (for spatial inference).
    maxima : (n_batch,) float64
        Receives the max of the statistic (|t| if ``two_sided``) over voxels.
    """
    n_rows, n_vox = resid.shape
    n_rank = basis.shape[1]
    n_batch, n_groups = codes.shape
    n_tab = 1 << n_bits
    n_half = 1 << ((n_bits + 1) // 2)
    n_items = (n_vox + _ITEM - 1) // _ITEM
    item_key = np.empty((n_items, n_batch), np.int32)
    zero = np.zeros((1, n_groups), np.int64)
    for it in numba.prange(n_items):
        tab = np.empty((n_rank * n_groups * n_tab, _SUB), np.float32)
        half = np.empty((2, n_half, _SUB), np.float64)
        acc = np.empty((n_rank, _SUB), np.float32)
        w_id = np.empty((n_rank, _SUB), np.float32)
        vb = np.empty(_SUB, np.float32)
        rss_t = np.ones(_SUB, np.float32)
        floor_t = np.ones(_SUB, np.float32)
        thr = np.empty(_SUB, np.float32)
        cnt = np.empty(_SUB, np.int32)
        key_max = item_key[it]
        for b in range(n_batch):
            key_max[b] = _KEY_NONE
        v_end = min((it + 1) * _ITEM, n_vox)
        for v0 in range(it * _ITEM, v_end, _SUB):
            nv = min(_SUB, v_end - v0)
            _flip_tables(resid, basis, v0, nv, n_bits, n_groups, half, tab)
            for i in range(_SUB):
                cnt[i] = 0
                thr[i] = np.inf  # padding voxels (i >= nv) never count
            for i in range(nv):
                thr[i] = v_threshold[v0 + i]
                rss_t[i] = rss_id[v0 + i]
                floor_t[i] = rss_floor[v0 + i]
            _flip_tile(
                tab,
                codes,
                zero,
                n_tab,
                n_interest,
                is_t,
                two_sided,
                rss_t,
                floor_t,
                thr,
                nv,
                acc,
                w_id,
                vb,
                cnt,
                key_max,
                write_out,
                out,
                v0,
                dof,
            )
            for i in range(nv):
                counts[v0 + i] += cnt[i]
    bits = np.empty(1, np.int32)
    for b in range(n_batch):
        key = np.int32(_KEY_NONE)
        for it in range(n_items):
            key = max(key, item_key[it, b])
        bits[0] = _order_key(key)
        maxima[b] = _v_to_stat(np.float64(bits.view(np.float32)[0]), is_t, dof, n_interest)
