"""Compiled per-voxel loops of the mixed-effects estimators (numba, ``nopython``).

Model at one voxel, over the ``k`` maps that are valid there (see
:mod:`bids_group.mixed_effects` for the input policy)::

    y_i = x_i' beta + u_i + e_i,   Var(e_i) = v_i (given),   Var(u_i) = tau^2,

with weights ``w_i = 1 / (v_i + tau^2)``, ``A = X'WX``, ``beta(tau^2) = A^-1 X'Wy``, residuals
``r = y - X beta``, ``P = W - W X A^-1 X' W`` (so that ``P y = W r``). The profile
log-likelihoods (Viechtbauer 2005, eqs. 8 and 10; constants dropped) are::

    ML:    l(tau^2)   = -1/2 [ sum_i log(v_i + tau^2) + r'Wr ]
    REML:  l_R(tau^2) = l(tau^2) - 1/2 log|X'WX|

with derivatives (``d P / d tau^2 = -P P``, ``u = P y = W r``)::

    ML:    l'  = 1/2 [ u'u - tr W ],   l''  = 1/2 tr W^2 - u'Pu
    REML:  l_R' = 1/2 [ u'u - tr P ],  l_R'' = 1/2 tr PP - u'Pu

Everything is private: arrays in, arrays out, no validation (the caller in
:mod:`bids_group.mixed_effects` validates). Every voxel is independent, so results do not
depend on the number of threads. No ``fastmath`` (see :mod:`bids_group.inference._kernels`).
"""

from __future__ import annotations

import numba
import numpy as np

from bids_group.inference._numba_cache import ensure_writable_cache

ensure_writable_cache(__file__)  # before any @njit(cache=True) below

#: Method codes shared with :mod:`bids_group.mixed_effects`.
FE, DL, HEDGES, ML, REML = 0, 1, 2, 3, 4

#: Convergence of the score's root: relative width of the bracket on tau^2.
_ROOT_RTOL = 1e-13
_ROOT_MAX_ITER = 200


@numba.njit(cache=True, error_model="numpy")
def _cholesky(a, p):
    """Lower Cholesky factor of the lower triangle of ``a`` (p x p) in place.

    Returns ``log det`` of the matrix, or NaN when it is not numerically positive definite.
    """
    logdet = 0.0
    for j in range(p):
        d = a[j, j]
        for m in range(j):
            d -= a[j, m] * a[j, m]
        if not d > 0.0:
            return np.nan
        ljj = np.sqrt(d)
        a[j, j] = ljj
        logdet += 2.0 * np.log(ljj)
        for i in range(j + 1, p):
            s = a[i, j]
            for m in range(j):
                s -= a[i, m] * a[j, m]
            a[i, j] = s / ljj
    return logdet


@numba.njit(cache=True, error_model="numpy")
def _forward(chol, b, p, out):
    """Solve ``L out = b`` (L lower triangular)."""
    for j in range(p):
        s = b[j]
        for m in range(j):
            s -= chol[j, m] * out[m]
        out[j] = s / chol[j, j]


@numba.njit(cache=True, error_model="numpy")
def _backward(chol, b, p, out):
    """Solve ``L' out = b``."""
    for j in range(p - 1, -1, -1):
        s = b[j]
        for m in range(j + 1, p):
            s -= chol[m, j] * out[m]
        out[j] = s / chol[j, j]


@numba.njit(cache=True, error_model="numpy")
def _wls(tau2, y, v, x, k, chol, beta, tmp, resid, w, with_log=True):
    """Weighted least squares at ``tau2`` on the first ``k`` rows.

    Fills ``chol`` (Cholesky factor of X'WX), ``beta``, ``resid`` and ``w``; returns
    ``(sum log(v + tau2), r'Wr, log|X'WX|)`` (log-det NaN when X'WX is singular; the sum of
    logs 0 unless ``with_log``, which the score does not need).
    """
    p = x.shape[1]
    for j in range(p):
        tmp[j] = 0.0
        for m in range(p):
            chol[j, m] = 0.0
    sum_log = 0.0
    for i in range(k):
        s = v[i] + tau2
        wi = 1.0 / s
        w[i] = wi
        if with_log:
            sum_log += np.log(s)
        for j in range(p):
            wx = wi * x[i, j]
            tmp[j] += wx * y[i]
            for m in range(j + 1):
                chol[j, m] += wx * x[i, m]
    logdet = _cholesky(chol, p)
    if np.isnan(logdet):
        return sum_log, np.nan, np.nan
    _forward(chol, tmp, p, beta)
    for j in range(p):
        tmp[j] = beta[j]
    _backward(chol, tmp, p, beta)
    rwr = 0.0
    for i in range(k):
        r = y[i]
        for j in range(p):
            r -= x[i, j] * beta[j]
        resid[i] = r
        rwr += w[i] * r * r
    return sum_log, rwr, logdet


@numba.njit(cache=True, error_model="numpy")
def _loglik(tau2, y, v, x, k, reml, ws):
    """Profile (ML) or restricted (REML) log-likelihood at ``tau2`` (constants dropped)."""
    chol, beta, tmp, resid, w, z = ws
    sum_log, rwr, logdet = _wls(tau2, y, v, x, k, chol, beta, tmp, resid, w)
    ll = -0.5 * (sum_log + rwr)
    if reml:
        ll -= 0.5 * logdet
    return ll


@numba.njit(cache=True, error_model="numpy")
def _derivatives_one_column(tau2, y, v, x, k, reml, w, second):
    """:func:`_derivatives` for a one-column design (the common one-sample case) in two
    tight loops: with ``A = sum w x^2``, ``q_i = x_i^2 / A``."""
    a = 0.0
    b = 0.0
    sum_w = 0.0
    sum_w2x2 = 0.0
    for i in range(k):
        wi = 1.0 / (v[i] + tau2)
        w[i] = wi
        wx = wi * x[i, 0]
        a += wx * x[i, 0]
        b += wx * y[i]
        sum_w += wi
        sum_w2x2 += wx * wx
    beta = b / a
    uu = 0.0
    if not second:
        for i in range(k):
            u = w[i] * (y[i] - x[i, 0] * beta)
            uu += u * u
        return 0.5 * (uu - (sum_w - sum_w2x2 / a if reml else sum_w)), 0.0
    wuu = 0.0
    wux = 0.0
    sum_w2 = 0.0
    sum_w3x2 = 0.0
    for i in range(k):
        wi = w[i]
        u = wi * (y[i] - x[i, 0] * beta)
        uu += u * u
        wuu += wi * u * u
        wux += wi * u * x[i, 0]
        sum_w2 += wi * wi
        sum_w3x2 += wi * wi * wi * x[i, 0] * x[i, 0]
    upu = wuu - wux * wux / a
    if reml:
        m = sum_w2x2 / a
        tr_p = sum_w - m
        tr_pp = sum_w2 - 2.0 * sum_w3x2 / a + m * m
        return 0.5 * (uu - tr_p), 0.5 * tr_pp - upu
    return 0.5 * (uu - sum_w), 0.5 * sum_w2 - upu


@numba.njit(cache=True, error_model="numpy")
def _derivatives(tau2, y, v, x, k, reml, ws, second=True):
    """(score, second derivative) of the ML or REML log-likelihood at ``tau2``.

    The second derivative is 0 unless ``second`` (the grid needs only the score's sign).
    """
    chol, beta, tmp, resid, w, z = ws
    p = x.shape[1]
    if p == 1:
        return _derivatives_one_column(tau2, y, v, x, k, reml, w, second)
    _wls(tau2, y, v, x, k, chol, beta, tmp, resid, w, False)
    uu = 0.0
    sum_w = 0.0
    sum_w2q = 0.0
    if not second:
        # tr P = sum w - tr(A^-1 B), B = sum_i w_i^2 x_i x_i' (no per-map triangular solve)
        bmat = z[k : k + p, :]
        for a in range(p):
            for c in range(p):
                bmat[a, c] = 0.0
        for i in range(k):
            wi = w[i]
            u = wi * resid[i]
            uu += u * u
            sum_w += wi
            if reml:
                w2 = wi * wi
                for a in range(p):
                    for c in range(a + 1):
                        bmat[a, c] += w2 * x[i, a] * x[i, c]
        if not reml:
            return 0.5 * (uu - sum_w), 0.0
        for c in range(p):
            for a in range(c):
                bmat[a, c] = bmat[c, a]
        for c in range(p):
            _forward(chol, bmat[:, c], p, z[0])
            _backward(chol, z[0], p, z[1])
            sum_w2q += z[1, c]
        return 0.5 * (uu - (sum_w - sum_w2q)), 0.0
    # m = sum_i w_i^2 z_i z_i' (p x p, in z's spare rows), tmp = sum_i w_i u_i z_i
    sum_w2 = 0.0
    sum_w3q = 0.0
    wuu = 0.0
    m = z[k : k + p, :]
    for a in range(p):
        tmp[a] = 0.0
        for b in range(p):
            m[a, b] = 0.0
    for i in range(k):
        _forward(chol, x[i], p, z[i])
        q = 0.0
        for a in range(p):
            q += z[i, a] * z[i, a]
        wi = w[i]
        u = wi * resid[i]
        uu += u * u
        wuu += wi * u * u
        sum_w += wi
        sum_w2 += wi * wi
        sum_w2q += wi * wi * q
        sum_w3q += wi * wi * wi * q
        for a in range(p):
            tmp[a] += wi * u * z[i, a]
            for b in range(p):
                m[a, b] += wi * wi * z[i, a] * z[i, b]
    upu = wuu
    for a in range(p):
        upu -= tmp[a] * tmp[a]
    if reml:
        frob = 0.0
        for a in range(p):
            for b in range(p):
                frob += m[a, b] * m[a, b]
        tr_p = sum_w - sum_w2q
        tr_pp = sum_w2 - 2.0 * sum_w3q + frob
        return 0.5 * (uu - tr_p), 0.5 * tr_pp - upu
    return 0.5 * (uu - sum_w), 0.5 * sum_w2 - upu


@numba.njit(cache=True, error_model="numpy")
def _upper_bound(y, v, x, k, reml, ws):
    """A tau^2 beyond which the score is negative (so every maximum lies in [0, bound]).

    With ``s = RSS_OLS / (k - p)`` (REML) or ``RSS_OLS / k`` (ML): ``|Wr|^2 <= RSS / (v_min +
    tau^2)^2`` and ``tr P >= (k - p) / (v_max + tau^2)`` (``tr W >= k / (v_max + tau^2)``), so
    the score is negative once ``(v_min + tau^2)^2 / (v_max + tau^2) > s``.
    """
    chol, beta, tmp, resid, w, z = ws
    p = x.shape[1]
    vmin = np.inf
    vmax = 0.0
    for i in range(k):
        vmin = min(vmin, v[i])
        vmax = max(vmax, v[i])
        w[i] = 0.0  # reuse the WLS solver with unit weights: v = 0, tau^2 = 1
    _, rss, _ = _wls(1.0, y, w, x, k, chol, beta, tmp, resid, z[:, 0], False)
    s = rss / (k - p if reml else k)
    delta = vmax - vmin
    t = 0.5 * (s + np.sqrt(s * s + 4.0 * s * delta))
    return max(0.0, (t - vmin) * (1.0 + 1e-9)), vmin


@numba.njit(cache=True, error_model="numpy")
def _root(a, b, sa, sb, y, v, x, k, reml, ws):
    """Root of the score in ``[a, b]`` (score ``sa > 0 >= sb``): Newton from the secant point,
    safeguarded by bisection (Numerical Recipes' rtsafe). Returns tau^2."""
    t = a + sa * (b - a) / (sa - sb)
    for _ in range(_ROOT_MAX_ITER):
        s, d2 = _derivatives(t, y, v, x, k, reml, ws)
        if s == 0.0:
            return t
        if s > 0.0:
            a = t
        else:
            b = t
        if b - a <= _ROOT_RTOL * b:
            break
        step_ok = d2 < 0.0
        if step_ok:
            newton = t - s / d2
            step_ok = a < newton < b
        if step_ok:
            converged = abs(newton - t) <= _ROOT_RTOL * t
            t = newton
            if converged:
                break
        else:
            t = 0.5 * (a + b)
    return t


@numba.njit(cache=True, error_model="numpy")
def _better(best, best_ll, n_cand, cand, y, v, x, k, reml, ws):
    """Keep the better of the best candidate so far and ``cand`` (ties: the earlier, smaller
    tau^2); log-likelihoods are computed only from the second candidate on."""
    if n_cand == 0:
        return cand, best_ll, 1
    if np.isnan(best_ll):
        best_ll = _loglik(best, y, v, x, k, reml, ws)
    ll = _loglik(cand, y, v, x, k, reml, ws)
    if ll > best_ll:
        return cand, ll, n_cand + 1
    return best, best_ll, n_cand + 1


@numba.njit(cache=True, error_model="numpy")
def _grid_points(y, v, x, k, reml, ws, tcol):
    """Fill ``tcol`` (n_grid,) with the voxel's search grid; False when tau^2 is 0 outright.

    0, then ``n_grid - 1`` points log-spaced from ``1e-3 v_min`` to the bound of
    :func:`_upper_bound` (beyond which the score is negative). When the bound is below
    ``1e-3 v_min`` the likelihood is quadratic to ~1e-3 on [0, bound]: the grid is 0 and the
    bound (repeated).
    """
    n_grid = tcol.shape[0]
    bound, vmin = _upper_bound(y, v, x, k, reml, ws)
    if not bound > 0.0:
        return False
    lo = 1e-3 * vmin
    tcol[0] = 0.0
    if bound <= lo:
        for g in range(1, n_grid):
            tcol[g] = bound
        return True
    factor = np.exp(np.log(bound / lo) / (n_grid - 2))
    t = lo / factor
    for g in range(1, n_grid):
        t = bound if g == n_grid - 1 else t * factor
        tcol[g] = t
    return True


@numba.njit(cache=True, error_model="numpy")
def _pick(tcol, scol, y, v, x, k, reml, ws):
    """Global maximiser from the scores ``scol`` at the grid ``tcol``.

    Candidates: 0 when the score there is not positive (tau^2 exactly 0), and the root of the
    score in every grid cell where it turns from positive to non-positive, i.e. every local
    maximum that the grid resolves. The candidate with the highest log-likelihood wins (ties:
    the smaller tau^2); the log-likelihood (k logs) is evaluated only when there are two.
    """
    n_grid = tcol.shape[0]
    best, best_ll, n_cand = 0.0, np.nan, 0
    if scol[0] <= 0.0:
        n_cand = 1
    for g in range(1, n_grid):
        if scol[g - 1] > 0.0 and scol[g] <= 0.0 and tcol[g] > tcol[g - 1]:
            r = _root(tcol[g - 1], tcol[g], scol[g - 1], scol[g], y, v, x, k, reml, ws)
            best, best_ll, n_cand = _better(best, best_ll, n_cand, r, y, v, x, k, reml, ws)
    if scol[n_grid - 1] > 0.0:  # beyond the bound's guarantee only by rounding
        t = tcol[n_grid - 1]
        best, best_ll, n_cand = _better(best, best_ll, n_cand, t, y, v, x, k, reml, ws)
    return best


@numba.njit(cache=True, error_model="numpy")
def _likelihood_tau2(y, v, x, k, reml, ws, tcol, scol):
    """Global maximiser of the ML/REML log-likelihood over tau^2 >= 0, one voxel at a time:
    :func:`_grid_points`, the score at each (:func:`_derivatives`), then :func:`_pick`. The
    reference for the vectorised grid of :func:`fit_voxels` (see :func:`tau2_per_voxel`)."""
    if not _grid_points(y, v, x, k, reml, ws, tcol):
        return 0.0
    for g in range(tcol.shape[0]):
        scol[g], _ = _derivatives(tcol[g], y, v, x, k, reml, ws, False)
    return _pick(tcol, scol, y, v, x, k, reml, ws)


@numba.njit(cache=True, error_model="numpy")
def _grid_scores_one_column(yb, vb, okb, x0, reml, tgrid, scores, wbuf, acc):
    """Scores at every grid point of a block of voxels, one-column design, vectorised across
    voxels (the innermost loops run over voxels: SIMD without reordering any sum).

    ``yb, vb, okb``: (n_maps, B) with 0/1 ``okb`` (invalid entries y = 0, v = 1, weight 0);
    ``tgrid, scores``: (n_grid, B). The sums run over the maps in the same order as
    :func:`_derivatives_one_column` (with exact zeros for excluded maps), so the scores are
    bitwise those of the per-voxel path.
    """
    n_maps, n_b = yb.shape
    a, b, sw, sw2x2, uu = acc[0], acc[1], acc[2], acc[3], acc[4]
    for g in range(tgrid.shape[0]):
        t = tgrid[g]
        for j in range(n_b):
            a[j] = 0.0
            b[j] = 0.0
            sw[j] = 0.0
            sw2x2[j] = 0.0
            uu[j] = 0.0
        for i in range(n_maps):
            xi = x0[i]
            yi, vi, oki, wi = yb[i], vb[i], okb[i], wbuf[i]
            for j in range(n_b):
                w = oki[j] / (vi[j] + t[j])
                wi[j] = w
                wx = w * xi
                a[j] += wx * xi
                b[j] += wx * yi[j]
                sw[j] += w
                sw2x2[j] += wx * wx
        for j in range(n_b):
            b[j] = b[j] / a[j]  # beta
        for i in range(n_maps):
            xi = x0[i]
            yi, wi = yb[i], wbuf[i]
            for j in range(n_b):
                u = wi[j] * (yi[j] - xi * b[j])
                uu[j] += u * u
        for j in range(n_b):
            tr = sw[j] - sw2x2[j] / a[j] if reml else sw[j]
            scores[g, j] = 0.5 * (uu[j] - tr)


@numba.njit(cache=True, error_model="numpy")
def _moments_tau2(method, y, v, x, k, ws):
    """DerSimonian-Laird or Hedges tau^2 (method of moments), floored at 0."""
    chol, beta, tmp, resid, w, z = ws
    p = x.shape[1]
    if method == DL:
        # Q = r'Wr at tau^2 = 0; E[Q] = (k - p) + tau^2 tr(P); Q - (k - p) over tr P.
        _, q, _ = _wls(0.0, y, v, x, k, chol, beta, tmp, resid, w)
        tr_p = 0.0
        for i in range(k):
            _forward(chol, x[i], p, z[i])
            lev = 0.0
            for a in range(p):
                lev += z[i, a] * z[i, a]
            tr_p += w[i] - w[i] * w[i] * lev
        return max(0.0, (q - (k - p)) / tr_p)
    # Hedges: RSS_OLS has expectation sum_i (1 - h_i) v_i + (k - p) tau^2.
    zero = z[:, 0]
    for i in range(k):
        zero[i] = 0.0
    _, rss, _ = _wls(1.0, y, zero, x, k, chol, beta, tmp, resid, w)
    expected = 0.0
    for i in range(k):
        _forward(chol, x[i], p, z[i])
        lev = 0.0
        for a in range(p):
            lev += z[i, a] * z[i, a]
        expected += (1.0 - lev) * v[i]
    return max(0.0, (rss - expected) / (k - p))


@numba.njit(cache=True, error_model="numpy")
def _compact(yt, vt, ok, x, j, y, v, xv):
    """Copy voxel ``j``'s valid maps into ``y, v, xv``; return their number."""
    k = 0
    for i in range(ok.shape[1]):
        if ok[j, i]:
            y[k] = yt[j, i]
            v[k] = vt[j, i]
            for a in range(x.shape[1]):
                xv[k, a] = x[i, a]
            k += 1
    return k


@numba.njit(cache=True, error_model="numpy")
def _grid_scores_general(yb, vb, okb, x, reml, tgrid, scores, wbuf):
    """:func:`_grid_scores_one_column` for a design of ``p`` columns: the sums over maps run
    across voxels (SIMD), the p x p solves per voxel, in the order of :func:`_derivatives`."""
    n_maps, n_b = yb.shape
    p = x.shape[1]
    amat = np.empty((p, p, n_b))
    bmat = np.empty((p, p, n_b))
    bvec = np.empty((p, n_b))
    sw = np.empty(n_b)
    uu = np.empty(n_b)
    chol = np.empty((p, p))
    tmp = np.empty(p)
    beta = np.empty((p, n_b))
    z = np.empty((2, p))
    bcol = np.empty(p)
    for g in range(tgrid.shape[0]):
        t = tgrid[g]
        amat[:] = 0.0
        bmat[:] = 0.0
        bvec[:] = 0.0
        sw[:] = 0.0
        uu[:] = 0.0
        for i in range(n_maps):
            yi, vi, oki, wi = yb[i], vb[i], okb[i], wbuf[i]
            for j in range(n_b):
                wi[j] = oki[j] / (vi[j] + t[j])
                sw[j] += wi[j]
            for c in range(p):
                xc = x[i, c]
                for j in range(n_b):
                    wx = wi[j] * xc
                    bvec[c, j] += wx * yi[j]
                for m in range(c + 1):
                    xm = x[i, m]
                    for j in range(n_b):
                        amat[c, m, j] += wi[j] * xc * xm
                        bmat[c, m, j] += wi[j] * wi[j] * xc * xm
        for j in range(n_b):
            for c in range(p):
                tmp[c] = bvec[c, j]
                for m in range(c + 1):
                    chol[c, m] = amat[c, m, j]
            _cholesky(chol, p)
            _forward(chol, tmp, p, z[0])
            _backward(chol, z[0], p, z[1])
            for c in range(p):
                beta[c, j] = z[1, c]
            trace = 0.0
            if reml:
                for c in range(p):
                    for m in range(p):
                        bcol[m] = bmat[max(c, m), min(c, m), j]
                    _forward(chol, bcol, p, z[0])
                    _backward(chol, z[0], p, z[1])
                    trace += z[1, c]
            scores[g, j] = -trace  # completed below
        for i in range(n_maps):
            yi, wi = yb[i], wbuf[i]
            for j in range(n_b):
                r = yi[j]
                for c in range(p):
                    r -= x[i, c] * beta[c, j]
                u = wi[j] * r
                uu[j] += u * u
        for j in range(n_b):
            scores[g, j] = 0.5 * (uu[j] - (sw[j] + scores[g, j]))


#: Voxels per parallel work item (one set of work arrays each; one vectorised grid block).
_CHUNK = 256


@numba.njit(cache=True, error_model="numpy")
def _workspace(n_maps, p):
    """(y, v, X) of one voxel's valid maps and the work arrays of the solvers."""
    ws = (
        np.empty((p, p)),
        np.empty(p),
        np.empty(p),
        np.empty(n_maps),
        np.empty(n_maps),
        np.empty((n_maps + p, p)),
    )
    return np.empty(n_maps), np.empty(n_maps), np.empty((n_maps, p)), ws


@numba.njit(cache=True, error_model="numpy")
def _block_grid(yt, vt, ok, estimable, x, j0, j1, reml, n_grid, ws, y, v, xv):
    """Grids and scores of voxels ``j0:j1``, vectorised across voxels.

    Returns ``(tgrid, scores, use)``: (n_grid, B), (n_grid, B), (B,) with ``use`` False where
    tau^2 is 0 outright or the voxel is not estimable.
    """
    n_b, n_maps = j1 - j0, yt.shape[1]
    tgrid = np.zeros((n_grid, n_b))
    scores = np.empty((n_grid, n_b))
    use = np.zeros(n_b, dtype=np.bool_)
    yb = np.zeros((n_maps, n_b))
    vb = np.ones((n_maps, n_b))
    okb = np.zeros((n_maps, n_b))
    for jj in range(n_b):
        j = j0 + jj
        if not estimable[j]:
            continue
        k = _compact(yt, vt, ok, x, j, y, v, xv)
        use[jj] = _grid_points(y, v, xv, k, reml, ws, tgrid[:, jj])
        for i in range(n_maps):
            if ok[j, i]:
                yb[i, jj] = yt[j, i]
                vb[i, jj] = vt[j, i]
                okb[i, jj] = 1.0
    wbuf = np.empty((n_maps, n_b))
    if x.shape[1] == 1:
        acc = np.empty((5, n_b))
        _grid_scores_one_column(yb, vb, okb, x[:, 0], reml, tgrid, scores, wbuf, acc)
    else:
        _grid_scores_general(yb, vb, okb, x, reml, tgrid, scores, wbuf)
    return tgrid, scores, use


@numba.njit(cache=True, error_model="numpy")
def _store(j, p, ws, beta, cov):
    """beta and cov = A^-1 = L'^-1 L^-1 (column by column) of voxel ``j`` from ``ws``."""
    chol, b, tmp, resid, w, z = ws
    for col in range(p):
        for a in range(p):
            tmp[a] = 1.0 if a == col else 0.0
        _forward(chol, tmp, p, z[0])
        _backward(chol, z[0], p, z[1])
        for a in range(p):
            cov[a, col, j] = z[1, a]
    for a in range(p):
        beta[a, j] = b[a]


@numba.njit(cache=True, error_model="numpy")
def _fit_chunk(yt, vt, ok, estimable, x, method, n_grid, fixed_tau2, j0, j1, out):
    """Fit voxels ``j0:j1``; see :func:`fit_voxels`."""
    beta, cov, tau2, rwr = out
    n_maps, p = x.shape
    y, v, xv, ws = _workspace(n_maps, p)
    chol, b, tmp, resid, w, z = ws
    likelihood = method == ML or method == REML
    reml = method == REML
    if likelihood:
        data = (yt, vt, ok, estimable, x)
        tgrid, scores, use = _block_grid(*data, j0, j1, reml, n_grid, ws, y, v, xv)
    else:
        tgrid, scores, use = np.zeros((1, 1)), np.zeros((1, 1)), np.zeros(1, dtype=np.bool_)
    for j in range(j0, j1):
        if not estimable[j]:
            continue
        k = _compact(yt, vt, ok, x, j, y, v, xv)
        if method == FE:
            t = fixed_tau2
        elif not likelihood:
            t = _moments_tau2(method, y, v, xv, k, ws)
        else:
            jj = j - j0
            t = _pick(tgrid[:, jj], scores[:, jj], y, v, xv, k, reml, ws) if use[jj] else 0.0
        _, rwr[j], _ = _wls(t, y, v, xv, k, chol, b, tmp, resid, w, False)
        tau2[j] = t
        _store(j, p, ws, beta, cov)


@numba.njit(parallel=True, cache=True, error_model="numpy")
def fit_voxels(yt, vt, ok, estimable, x, method, n_grid, fixed_tau2, beta, cov, tau2, rwr):
    """Fit every voxel: tau^2 by ``method``, then WLS at that tau^2.

    Parameters
    ----------
    yt, vt : (n_voxels, n_maps) float64
    ok : (n_voxels, n_maps) bool, the valid maps at each voxel
    estimable : (n_voxels,) bool, voxels to fit (others are left as NaN); k > p there
    x : (n_maps, p) float64
    method : int, one of FE, DL, HEDGES, ML, REML
    n_grid : int, grid points for ML/REML
    fixed_tau2 : float, tau^2 for FE (0 for fixed effects)
    beta, cov, tau2, rwr : outputs (p, V), (p, p, V), (V,), (V,)
    """
    n_vox = yt.shape[0]
    out = (beta, cov, tau2, rwr)
    for c in numba.prange((n_vox + _CHUNK - 1) // _CHUNK):
        j0, j1 = c * _CHUNK, min((c + 1) * _CHUNK, n_vox)
        _fit_chunk(yt, vt, ok, estimable, x, method, n_grid, fixed_tau2, j0, j1, out)


@numba.njit(parallel=True, cache=True, error_model="numpy")
def loglik_voxels(yt, vt, ok, x, tau2, reml, out):
    """ML or REML log-likelihood (constants dropped) of every voxel at its ``tau2``."""
    n_vox, n_maps = yt.shape
    p = x.shape[1]
    for c in numba.prange((n_vox + _CHUNK - 1) // _CHUNK):
        y, v, xv, ws = _workspace(n_maps, p)
        for j in range(c * _CHUNK, min((c + 1) * _CHUNK, n_vox)):
            k = _compact(yt, vt, ok, x, j, y, v, xv)
            out[j] = _loglik(tau2[j], y, v, xv, k, reml, ws)


@numba.njit(cache=True, error_model="numpy")
def tau2_per_voxel(yt, vt, ok, estimable, x, reml, n_grid, out):
    """ML/REML tau^2 by the one-voxel-at-a-time search (:func:`_likelihood_tau2`); a reference
    for tests of the vectorised grid. Arguments as :func:`fit_voxels`."""
    n_maps, p = x.shape
    y, v, xv, ws = _workspace(n_maps, p)
    tcol, scol = np.empty(n_grid), np.empty(n_grid)
    for j in range(yt.shape[0]):
        out[j] = np.nan
        if estimable[j]:
            k = _compact(yt, vt, ok, x, j, y, v, xv)
            out[j] = _likelihood_tau2(y, v, xv, k, reml, ws, tcol, scol)


#: Adjustment codes of :func:`relabelled_stats`.
ADJ_NONE, ADJ_KH, ADJ_KH_FLOOR = 0, 1, 2


@numba.njit(cache=True, error_model="numpy")
def _contrast_stat(beta, cov, jj, cmat, scale, m_buf, e_buf, z_buf):
    """t (one row) or F = e' M^-1 e / q of contrast ``cmat`` at voxel ``jj`` of a chunk,
    ``M = scale C Cov(beta) C'``; NaN where M is not positive definite."""
    q, p = cmat.shape
    for r in range(q):
        e = 0.0
        for a in range(p):
            e += cmat[r, a] * beta[a, jj]
        e_buf[r] = e
        for s in range(r + 1):
            acc = 0.0
            for a in range(p):
                for b in range(p):
                    acc += cmat[r, a] * cov[a, b, jj] * cmat[s, b]
            m_buf[r, s] = acc * scale
    if q == 1:
        return e_buf[0] / np.sqrt(m_buf[0, 0])
    if np.isnan(_cholesky(m_buf, q)):
        return np.nan
    _forward(m_buf, e_buf, q, z_buf)
    f = 0.0
    for r in range(q):
        f += z_buf[r] * z_buf[r]
    return f / q


@numba.njit(parallel=True, cache=True, error_model="numpy")
def relabelled_stats(rt, ft, vt, ok, x, method, n_grid, signs, perms, cmat, adj, out):
    """The contrast's t or F of the full model refitted to relabelled data, every voxel.

    For relabelling ``b`` the data at voxel ``j`` are ``signs[b, i] * rt[j, perms[b, i]] +
    ft[j, i]`` (Freedman-Lane: reduced-model residuals relabelled, its fitted values added), fitted
    as :func:`fit_voxels` does (tau^2 re-estimated by ``method``), then the contrast ``cmat``
    (q, p) with the adjustment ``adj`` (ADJ_*). Every voxel must be estimable.

    Parameters
    ----------
    rt, ft, vt : (n_voxels, n_maps) float64
    ok : (n_voxels, n_maps) bool
    signs : (n_batch, n_maps) float64; perms : (n_batch, n_maps) int64
    out : (n_batch, n_voxels) float64
    """
    n_vox, n_maps = rt.shape
    p = x.shape[1]
    q = cmat.shape[0]
    n_b = signs.shape[0]
    for c in numba.prange((n_vox + _CHUNK - 1) // _CHUNK):
        j0, j1 = c * _CHUNK, min((c + 1) * _CHUNK, n_vox)
        m = j1 - j0
        yt = np.empty((m, n_maps))
        est = np.ones(m, dtype=np.bool_)
        beta, cov = np.empty((p, m)), np.empty((p, p, m))
        tau2, rwr = np.empty(m), np.empty(m)
        chunk = (beta, cov, tau2, rwr)
        m_buf, e_buf, z_buf = np.empty((q, q)), np.empty(q), np.empty(q)
        dof = np.empty(m)
        for jj in range(m):
            k = 0
            for i in range(n_maps):
                if ok[j0 + jj, i]:
                    k += 1
            dof[jj] = k - p
        for b in range(n_b):
            for jj in range(m):
                for i in range(n_maps):
                    yt[jj, i] = signs[b, i] * rt[j0 + jj, perms[b, i]] + ft[j0 + jj, i]
            _fit_chunk(yt, vt[j0:j1], ok[j0:j1], est, x, method, n_grid, 0.0, 0, m, chunk)
            for jj in range(m):
                scale = 1.0
                if adj != ADJ_NONE:
                    scale = rwr[jj] / dof[jj]
                    if adj == ADJ_KH_FLOOR and scale < 1.0:
                        scale = 1.0
                out[b, j0 + jj] = _contrast_stat(beta, cov, jj, cmat, scale, m_buf, e_buf, z_buf)


# --- Variance groups: one tau^2 per group, joint ML/REML search (any design) ------------------
#
# With a group index g(i) per map, w_i = 1 / (v_i + tau^2_g(i)) and D_g the 0/1 diagonal of the
# maps of group g, the derivatives of the profile log-likelihoods generalise those above
# (d P / d tau^2_g = -P D_g P, u = P y = W r):
#
#     ML:    dl/dtau_g   = 1/2 [ u'D_g u - tr(W D_g) ]
#            d2l         = 1/2 delta_gh tr(W^2 D_g) - u'D_g P D_h u
#     REML:  dl_R/dtau_g = 1/2 [ u'D_g u - tr(P D_g) ]
#            d2l_R       = 1/2 tr(P D_g P D_h) - u'D_g P D_h u
#
# With z_i = L^-1 x_i (L L' = X'WX), P_ij = delta_ij w_i - w_i w_j z_i'z_j, so every term is a
# sum over maps (O(k p^2)): tr(P D_g) = sum_g (w_i - w_i^2 |z_i|^2),
# tr(P D_g P D_h) = delta_gh sum_g (w_i^2 - 2 w_i^3 |z_i|^2) + tr(M_g M_h) with
# M_g = sum_g w_i^2 z_i z_i', and u'D_g P D_h u = delta_gh sum_g w_i u_i^2 - t_g't_h with
# t_g = sum_g w_i u_i z_i. The expected information (1/2 tr(P D_g P D_h) for REML,
# 1/2 delta_gh tr(W^2 D_g) for ML) is positive definite: the fallback ascent direction.

#: Local maxima of the grid refined per voxel (the best ones by log-likelihood).
_MAX_STARTS = 4
_NEWTON_MAX_ITER = 100
#: Relative step below which the projected Newton iteration has converged.
_NEWTON_RTOL = 1e-12
#: A full Newton step this small (relative) is taken without a line search: the
#: log-likelihood cannot resolve its gain (it is ~ step^2) in double precision.
_NEWTON_TRUST = 1e-5
#: Rounds of axis scans (:func:`_axis_scan`) after the grid's refinements.
_AXIS_ROUNDS = 2
#: Top of the grid of each group's tau^2, times the OLS residual sum of squares.
_GRID_TOP = 10.0


@numba.njit(cache=True, error_model="numpy")
def _with_groups(v, gi, k, tau, vt):
    """``vt_i = v_i + tau[g(i)]``: the total variance of each map (then WLS at tau^2 = 0)."""
    for i in range(k):
        vt[i] = v[i] + tau[gi[i]]


@numba.njit(cache=True, error_model="numpy")
def _loglik_groups(tau, y, v, x, k, gi, reml, ws, vt):
    """:func:`_loglik` with one tau^2 per group (``vt`` is work space)."""
    _with_groups(v, gi, k, tau, vt)
    return _loglik(0.0, y, vt, x, k, reml, ws)


@numba.njit(cache=True, error_model="numpy")
def _group_derivatives(tau, y, v, x, k, gi, reml, ws, gw):
    """Score ``s`` (G,), Hessian ``h`` (G, G) and expected information ``f`` (G, G) at
    ``tau`` (see the formulas above), in ``gw = (vt, s, h, f, mg, tg, acc)``."""
    chol, beta, tmp, resid, w, z = ws
    vt, s, h, f, mg, tg, acc = gw
    n_groups = s.shape[0]
    p = x.shape[1]
    _with_groups(v, gi, k, tau, vt)
    _wls(0.0, y, vt, x, k, chol, beta, tmp, resid, w, False)
    acc[:] = 0.0  # rows: u'D_g u, tr W D_g, tr W^2 D_g, sum_g w^2 q, sum_g w^3 q, sum_g w u^2
    mg[:] = 0.0
    tg[:] = 0.0
    for i in range(k):
        _forward(chol, x[i], p, z[0])
        q = 0.0
        for a in range(p):
            q += z[0, a] * z[0, a]
        g = gi[i]
        wi = w[i]
        u = wi * resid[i]
        acc[0, g] += u * u
        acc[1, g] += wi
        acc[2, g] += wi * wi
        acc[3, g] += wi * wi * q
        acc[4, g] += wi * wi * wi * q
        acc[5, g] += wi * u * u
        for a in range(p):
            tg[g, a] += wi * u * z[0, a]
            for b in range(p):
                mg[g, a, b] += wi * wi * z[0, a] * z[0, b]
    for g in range(n_groups):
        trace = acc[1, g] - acc[3, g] if reml else acc[1, g]
        s[g] = 0.5 * (acc[0, g] - trace)
        for e in range(n_groups):
            upu = 0.0
            for a in range(p):
                upu -= tg[g, a] * tg[e, a]
            info = 0.0
            if g == e:
                upu += acc[5, g]
                info = acc[2, g] - 2.0 * acc[4, g] if reml else acc[2, g]
            if reml:
                for a in range(p):
                    for b in range(p):
                        info += mg[g, a, b] * mg[e, b, a]
            f[g, e] = 0.5 * info
            h[g, e] = f[g, e] - upu


@numba.njit(cache=True, error_model="numpy")
def _solve_free(mat, rhs, free, nf, out, lmat, work):
    """Solve ``mat[free, free] d = rhs[free]`` by Cholesky; False when not positive definite."""
    for a in range(nf):
        for b in range(a + 1):
            lmat[a, b] = mat[free[a], free[b]]
    if np.isnan(_cholesky(lmat, nf)):
        return False
    for a in range(nf):
        work[0, a] = rhs[free[a]]
    _forward(lmat, work[0], nf, work[1])
    _backward(lmat, work[1], nf, out)
    return True


@numba.njit(cache=True, error_model="numpy")
def _ascent_direction(s, h, f, free, nf, d, lmat, work):
    """Newton direction on the free groups when the Hessian there is negative definite
    (returns True), else Fisher scoring (the expected information), else the gradient."""
    n_groups = s.shape[0]
    neg = work[2 : 2 + n_groups, :n_groups]
    for a in range(n_groups):
        for b in range(n_groups):
            neg[a, b] = -h[a, b]
    if _solve_free(neg, s, free, nf, d, lmat, work):
        return True
    if not _solve_free(f, s, free, nf, d, lmat, work):
        for a in range(nf):
            d[a] = s[free[a]] / max(f[free[a], free[a]], 1e-300)
    return False


@numba.njit(cache=True, error_model="numpy")
def _refine_groups(tau, y, v, x, k, gi, reml, scale, ws, gw, rw):
    """Projected Newton ascent from ``tau`` (G,), in place; returns the log-likelihood.

    Groups at 0 whose score is not positive are held at exactly 0 (the active bound); the
    step on the others is Newton where the Hessian is negative definite, else Fisher
    scoring, projected onto ``tau >= 0`` (a group crossing 0 lands exactly on 0) and halved
    until the log-likelihood increases. ``scale`` (a variance of the voxel) sets the
    absolute part of the convergence test near 0.
    """
    vt, s, h, f, mg, tg, acc = gw
    free, d, trial, lmat, work = rw
    n_groups = tau.shape[0]
    ll = _loglik_groups(tau, y, v, x, k, gi, reml, ws, vt)
    for _ in range(_NEWTON_MAX_ITER):
        _group_derivatives(tau, y, v, x, k, gi, reml, ws, gw)
        nf = 0
        for g in range(n_groups):
            if tau[g] > 0.0 or s[g] > 0.0:
                free[nf] = g
                nf += 1
        if nf == 0:
            break
        newton = _ascent_direction(s, h, f, free, nf, d, lmat, work)
        small = True
        for a in range(nf):
            g = free[a]
            if abs(d[a]) > _NEWTON_TRUST * (tau[g] + scale):
                small = False
        step = 1.0
        accepted = False
        for _half in range(60):
            for g in range(n_groups):
                trial[g] = tau[g]
            for a in range(nf):
                trial[free[a]] = max(0.0, tau[free[a]] + step * d[a])
            ll_trial = _loglik_groups(trial, y, v, x, k, gi, reml, ws, vt)
            if ll_trial >= ll or (newton and small and step == 1.0):
                accepted = True
                break
            step *= 0.5
        if not accepted:
            break
        converged = True
        for g in range(n_groups):
            if abs(trial[g] - tau[g]) > _NEWTON_RTOL * (tau[g] + scale):
                converged = False
            tau[g] = trial[g]
        ll = ll_trial
        if converged:
            break
    return ll


@numba.njit(cache=True, error_model="numpy")
def _group_grid_tables(y, v, x, k, gi, reml, ws, grid, tabs):
    """Per group ``g`` and grid value ``grid[g, a]`` of its tau^2, the group's parts of the
    log-likelihood: ``X'WX`` (lower triangle), ``X'Wy``, ``y'Wy`` and ``sum log(v + tau^2)``
    over its maps. The likelihood at a grid point is then a sum over groups plus one p x p
    Cholesky (the cost of the G-dimensional grid does not grow with the number of maps)."""
    chol, beta, tmp, resid, w, z = ws
    amat, bvec, cyy, slog = tabs
    n_groups, n_pts = grid.shape
    p = x.shape[1]
    # The grid spans 1e-3 of the group's smallest variance to 10x the OLS residual sum of
    # squares (no tau^2 can exceed the spread of the residuals by that much); the projected
    # Newton refinement is not bounded by it.
    for i in range(k):
        w[i] = 0.0
    _, rss, _ = _wls(1.0, y, w, x, k, chol, beta, tmp, resid, z[:, 0], False)
    for g in range(n_groups):
        vmin = np.inf
        for i in range(k):
            if gi[i] == g:
                vmin = min(vmin, v[i])
        lo = 1e-3 * vmin if vmin < np.inf else 1.0
        hi = max(_GRID_TOP * rss, 10.0 * lo)
        grid[g, 0] = 0.0
        factor = np.exp(np.log(hi / lo) / (n_pts - 2))
        for a in range(1, n_pts):
            grid[g, a] = hi if a == n_pts - 1 else lo * factor ** (a - 1)
    amat[:] = 0.0
    bvec[:] = 0.0
    cyy[:] = 0.0
    slog[:] = 0.0
    for g in range(n_groups):
        for a in range(n_pts):
            t = grid[g, a]
            for i in range(k):
                if gi[i] != g:
                    continue
                s = v[i] + t
                wi = 1.0 / s
                slog[g, a] += np.log(s)
                cyy[g, a] += wi * y[i] * y[i]
                for c in range(p):
                    wx = wi * x[i, c]
                    bvec[g, a, c] += wx * y[i]
                    for m in range(c + 1):
                        amat[g, a, c, m] += wx * x[i, m]


@numba.njit(cache=True, error_model="numpy")
def _grid_loglik(reml, tabs, ll, idx, mat, bsum, zz):
    """Log-likelihood at every point of the product grid (row-major over groups).

    ``X'WX = L D L'`` (unit lower ``L``, no square roots) with ``log|X'WX| = log prod D`` (one
    log per point: the grid is the hot loop), ``r'Wr = y'Wy - sum_c z_c^2 / D_c`` with
    ``L z = X'Wy``.
    """
    amat, bvec, cyy, slog = tabs
    n_groups, n_pts = cyy.shape
    p = bvec.shape[2]
    inv = np.empty(p)  # 1 / D_j: one division per pivot
    for g in range(n_groups):
        idx[g] = 0
    for flat in range(ll.shape[0]):
        if flat > 0:  # odometer over the groups' indices (row-major, last fastest): no division
            g = n_groups - 1
            idx[g] += 1
            while idx[g] == n_pts:
                idx[g] = 0
                g -= 1
                idx[g] += 1
        for c in range(p):
            bsum[c] = 0.0
            for m in range(c + 1):
                mat[c, m] = 0.0
        total = 0.0
        for g in range(n_groups):
            a = idx[g]
            total += slog[g, a] + cyy[g, a]
            for c in range(p):
                bsum[c] += bvec[g, a, c]
                for m in range(c + 1):
                    mat[c, m] += amat[g, a, c, m]
        det = 1.0
        positive = True
        for j in range(p):  # LDL': mat[j, j] <- D_j, mat[i, j] <- L_ij
            d = mat[j, j]
            for m in range(j):
                d -= mat[j, m] * mat[j, m] * mat[m, m]
            if not d > 0.0:
                positive = False
                break
            mat[j, j] = d
            inv[j] = 1.0 / d
            det *= d
            for i in range(j + 1, p):
                s = mat[i, j]
                for m in range(j):
                    s -= mat[i, m] * mat[j, m] * mat[m, m]
                mat[i, j] = s * inv[j]
        if not positive:
            ll[flat] = -np.inf
            continue
        for c in range(p):
            s = bsum[c]
            for m in range(c):
                s -= mat[c, m] * zz[m]
            zz[c] = s
            total -= s * s * inv[c]  # r'Wr = y'Wy - b'(X'WX)^-1 b
        if reml:
            if det > 1e-300 and det < 1e300:
                total += np.log(det)
            else:  # the product under/overflowed: sum the logs
                for j in range(p):
                    total += np.log(mat[j, j])
        ll[flat] = -0.5 * total


@numba.njit(cache=True, error_model="numpy")
def _grid_starts(ll, n_groups, n_pts, starts):
    """Flat indices of the grid's local maxima (no neighbour in the 3^G box is higher; of
    equal neighbours the first counts), best first, at most ``starts.shape[0]``."""
    n_found = 0
    idx = np.empty(n_groups, dtype=np.int64)
    for flat in range(ll.shape[0]):
        val = ll[flat]
        if not val > -np.inf:
            continue
        rem = flat
        for g in range(n_groups - 1, -1, -1):
            idx[g] = rem % n_pts
            rem //= n_pts
        is_max = True
        for off in range(3**n_groups):
            code = off
            nb = 0
            inside = True
            for g in range(n_groups):
                step = code % 3 - 1
                code //= 3
                a = idx[g] + step
                if a < 0 or a >= n_pts:
                    inside = False
                nb = nb * n_pts + a
            if not inside or nb == flat:
                continue
            if ll[nb] > val or (ll[nb] == val and nb < flat):
                is_max = False
                break
        if not is_max:
            continue
        pos = n_found if n_found < starts.shape[0] else starts.shape[0]
        while pos > 0 and ll[starts[pos - 1]] < val:
            pos -= 1
        if pos < starts.shape[0]:
            last = min(n_found, starts.shape[0] - 1)
            for q in range(last, pos, -1):
                starts[q] = starts[q - 1]
            starts[pos] = flat
            n_found = min(n_found + 1, starts.shape[0])
    return n_found


@numba.njit(cache=True, error_model="numpy")
def _group_workspace(n_maps, p, n_groups, n_pts):
    """Work arrays of one chunk of the joint search."""
    tabs = (
        np.empty((n_groups, n_pts, p, p)),
        np.empty((n_groups, n_pts, p)),
        np.empty((n_groups, n_pts)),
        np.empty((n_groups, n_pts)),
    )
    gw = (
        np.empty(n_maps),
        np.empty(n_groups),
        np.empty((n_groups, n_groups)),
        np.empty((n_groups, n_groups)),
        np.empty((n_groups, p, p)),
        np.empty((n_groups, p)),
        np.empty((6, n_groups)),
    )
    rw = (
        np.empty(n_groups, dtype=np.int64),
        np.empty(n_groups),
        np.empty(n_groups),
        np.empty((n_groups, n_groups)),
        np.empty((2 + n_groups, max(n_groups, 2))),
    )
    return tabs, gw, rw


@numba.njit(cache=True, error_model="numpy")
def _joint_tau2(y, v, x, k, gi, reml, ws, grid, tabs, ll, starts, gw, rw, cand, best):
    """Global maximiser over tau^2_g >= 0 of one voxel's ML/REML log-likelihood: the product
    grid, then :func:`_refine_groups` from each of its best local maxima; the highest
    log-likelihood wins (ties: the earlier start). Fills ``best`` (G,)."""
    n_groups, n_pts = grid.shape
    _group_grid_tables(y, v, x, k, gi, reml, ws, grid, tabs)
    p = x.shape[1]
    chol = np.empty((p, p))
    _grid_loglik(reml, tabs, ll, rw[0], chol, ws[1], ws[2])
    n_starts = _grid_starts(ll, n_groups, n_pts, starts)
    if n_starts == 0:  # no finite grid value (not expected for a full-rank design): from 0
        starts[0] = 0
        n_starts = 1
    scale = np.inf
    for i in range(k):
        scale = min(scale, v[i])
    scale *= 1e-6
    best_ll = -np.inf
    for q in range(n_starts):
        rem = starts[q]
        for g in range(n_groups - 1, -1, -1):
            cand[g] = grid[g, rem % n_pts]
            rem //= n_pts
        val = _refine_groups(cand, y, v, x, k, gi, reml, scale, ws, gw, rw)
        if val > best_ll or q == 0:
            best_ll = val
            for g in range(n_groups):
                best[g] = cand[g]
    for _ in range(_AXIS_ROUNDS):
        improved = False
        for g in range(n_groups):
            val = _axis_scan(g, best, best_ll, y, v, x, k, gi, reml, scale, ws, gw, rw, grid, cand)
            if val > best_ll:
                best_ll = val
                for e in range(n_groups):
                    best[e] = cand[e]
                improved = True
        if not improved:
            break


@numba.njit(cache=True, error_model="numpy")
def _axis_scan(g, best, best_ll, y, v, x, k, gi, reml, scale, ws, gw, rw, grid, cand):
    """The score of group ``g`` along its axis through ``best`` (the others fixed), at every
    other value of its grid: each cell where it turns from positive to non-positive away from
    ``best``, and 0 when the score there is not positive, starts :func:`_refine_groups`. The
    sign test resolves a second maximum whose dip the likelihood values of the coarse grid
    miss (two maxima nearly equal in height). Returns the best log-likelihood found (``cand``
    its point), or ``best_ll``."""
    n_groups, n_pts = grid.shape
    s = gw[1]
    found = best_ll
    keep = np.empty(n_groups)
    prev_t, prev_s = 0.0, 0.0
    a = 0
    while a < n_pts:
        for e in range(n_groups):
            cand[e] = best[e]
        t = grid[g, a]
        cand[g] = t
        _group_derivatives(cand, y, v, x, k, gi, reml, ws, gw)
        score = s[g]
        start = -1.0
        if a == 0 and score <= 0.0 and best[g] > 0.0:
            start = 0.0
        elif a > 0 and prev_s > 0.0 and score <= 0.0 and not (prev_t <= best[g] <= t):
            start = prev_t + prev_s * (t - prev_t) / (prev_s - score)
        if start >= 0.0:
            for e in range(n_groups):
                cand[e] = best[e]
            cand[g] = start
            val = _refine_groups(cand, y, v, x, k, gi, reml, scale, ws, gw, rw)
            if val > found:
                found = val
                for e in range(n_groups):
                    keep[e] = cand[e]
        prev_t, prev_s = t, score
        a = a + 2 if a + 2 < n_pts or a == n_pts - 1 else n_pts - 1
    if found > best_ll:
        for e in range(n_groups):
            cand[e] = keep[e]
    return found


@numba.njit(cache=True, error_model="numpy")
def _compact_groups(ok, groups, j, gi):
    """Voxel ``j``'s group index of each valid map, in the order of :func:`_compact`."""
    k = 0
    for i in range(ok.shape[1]):
        if ok[j, i]:
            gi[k] = groups[i]
            k += 1


@numba.njit(cache=True, error_model="numpy")
def _fit_chunk_groups(yt, vt, ok, estimable, x, groups, reml, n_pts, j0, j1, out):
    beta, cov, tau2, rwr = out
    n_maps, p = x.shape
    n_groups = tau2.shape[0]
    y, v, xv, ws = _workspace(n_maps, p)
    chol, b, tmp, resid, w, z = ws
    tabs, gw, rw = _group_workspace(n_maps, p, n_groups, n_pts)
    grid = np.empty((n_groups, n_pts))
    ll = np.empty(n_pts**n_groups)
    starts = np.empty(_MAX_STARTS, dtype=np.int64)
    gi = np.empty(n_maps, dtype=np.int64)
    cand = np.empty(n_groups)
    best = np.empty(n_groups)
    total = np.empty(n_maps)
    for j in range(j0, j1):
        if not estimable[j]:
            continue
        k = _compact(yt, vt, ok, x, j, y, v, xv)
        _compact_groups(ok, groups, j, gi)
        _joint_tau2(y, v, xv, k, gi, reml, ws, grid, tabs, ll, starts, gw, rw, cand, best)
        _with_groups(v, gi, k, best, total)
        _, rwr[j], _ = _wls(0.0, y, total, xv, k, chol, b, tmp, resid, w, False)
        for g in range(n_groups):
            tau2[g, j] = best[g]
        _store(j, p, ws, beta, cov)


@numba.njit(parallel=True, cache=True, error_model="numpy")
def fit_voxels_groups(yt, vt, ok, estimable, x, groups, reml, n_pts, beta, cov, tau2, rwr):
    """ML/REML fit with one tau^2 per variance group (any design), then WLS at them.

    Parameters
    ----------
    yt, vt, ok, estimable, x : as :func:`fit_voxels`
    groups : (n_maps,) int64, the group index (0..G-1) of each map
    reml : bool
    n_pts : int, grid values per group (0 and ``n_pts - 1`` log-spaced); ``n_pts^G`` points
    beta, cov, rwr : outputs as :func:`fit_voxels`; tau2 : (G, V)
    """
    n_vox = yt.shape[0]
    out = (beta, cov, tau2, rwr)
    for c in numba.prange((n_vox + _CHUNK - 1) // _CHUNK):
        j0, j1 = c * _CHUNK, min((c + 1) * _CHUNK, n_vox)
        _fit_chunk_groups(yt, vt, ok, estimable, x, groups, reml, n_pts, j0, j1, out)


@numba.njit(parallel=True, cache=True, error_model="numpy")
def loglik_voxels_groups(yt, vt, ok, x, groups, tau2, reml, out):
    """ML or REML log-likelihood (constants dropped) of every voxel at its ``tau2`` (G, V)."""
    n_vox, n_maps = yt.shape
    p = x.shape[1]
    n_groups = tau2.shape[0]
    for c in numba.prange((n_vox + _CHUNK - 1) // _CHUNK):
        y, v, xv, ws = _workspace(n_maps, p)
        gi = np.empty(n_maps, dtype=np.int64)
        tau = np.empty(n_groups)
        total = np.empty(n_maps)
        for j in range(c * _CHUNK, min((c + 1) * _CHUNK, n_vox)):
            k = _compact(yt, vt, ok, x, j, y, v, xv)
            _compact_groups(ok, groups, j, gi)
            for g in range(n_groups):
                tau[g] = tau2[g, j]
            out[j] = _loglik_groups(tau, y, v, xv, k, gi, reml, ws, total)
