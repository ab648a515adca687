"""Tail probabilities of t and F, and their conversion to z, precise far into the tails.

Everything is computed in log space so that a t of 30 or an F of 1e4 gives the right z
instead of ``inf`` or a clipped value. Both t and F tails are regularized incomplete beta
functions (Abramowitz & Stegun 26.5.27 and 26.6.2):

* ``P(T >= t) = I_x(dof/2, 1/2) / 2`` with ``x = dof / (dof + t^2)``, for ``t >= 0``;
* ``P(F >= f) = I_x(d2/2, d1/2)`` with ``x = d2 / (d2 + d1 f)``.

``scipy.special.betainc``/``betaincc`` are relatively accurate down to the smallest double;
where they underflow we evaluate ``log I_x(a, b)`` with the continued fraction of A&S 26.5.8
(modified Lentz), which converges for ``x < (a + 1) / (a + b + 2)`` -- always the case in a far
upper tail. z is then ``-ndtri_exp(log p)`` for the upper tail and ``ndtri_exp(log q)`` (q = the
lower tail) when the lower tail is the smaller one, so neither tail loses precision.

Pure numpy/scipy; no I/O.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import special

log = logging.getLogger(__name__)

#: Below this a betainc result is treated as underflowed and recomputed in log space.
_UNDERFLOW = 1e-290
#: log of the smallest positive double: floor for log tails that are exactly zero (F = 0).
_LOG_TINY = float(np.log(np.nextafter(0.0, 1.0)))
_CF_MAX_ITER = 20_000
_CF_EPS = 1e-15
_CF_FPMIN = 1e-300


def _log_betainc_cf(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``log I_x(a, b)`` by the continued fraction of A&S 26.5.8 (valid for small x).

    Parameters
    ----------
    a, b, x : ndarray of the same shape, float64
        ``a, b > 0`` and ``0 < x < (a + 1) / (a + b + 2)``.

    Returns
    -------
    ndarray, float64
        ``log I_x(a, b)``; finite even where ``I_x`` underflows.
    """
    # Prefactor x^a (1-x)^b / (a B(a, b)) in logs (A&S 26.5.8).
    log_front = a * np.log(x) + b * np.log1p(-x) - special.betaln(a, b) - np.log(a)
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = 1.0 / np.where(np.abs(d) < _CF_FPMIN, _CF_FPMIN, d)
    h = d.copy()
    active = np.ones(x.shape, dtype=bool)
    for m in range(1, _CF_MAX_ITER + 1):
        # Only iterate the elements that have not converged yet.
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        am, bm, xm = a[idx], b[idx], x[idx]
        cm, dm, hm = c[idx], d[idx], h[idx]
        m2 = 2.0 * m
        for aa in (
            m * (bm - m) * xm / ((qam[idx] + m2) * (am + m2)),
            -(am + m) * (qab[idx] + m) * xm / ((am + m2) * (qap[idx] + m2)),
        ):
            dm = 1.0 + aa * dm
            dm = 1.0 / np.where(np.abs(dm) < _CF_FPMIN, _CF_FPMIN, dm)
            cm = 1.0 + aa / cm
            cm = np.where(np.abs(cm) < _CF_FPMIN, _CF_FPMIN, cm)
            delta = dm * cm
            hm = hm * delta
        c[idx], d[idx], h[idx] = cm, dm, hm
        active[idx] = np.abs(delta - 1.0) > _CF_EPS
    else:
        log.warning(
            "incomplete-beta continued fraction did not converge for %d values", active.sum()
        )
    return log_front + np.log(h)


def log_betainc(a, b, x, y=None) -> np.ndarray:
    """Log of the regularized incomplete beta function ``I_x(a, b)``, finite where it underflows.

    Parameters
    ----------
    a, b : array_like, float
        Shape parameters (> 0), broadcast against ``x``.
    x : array_like, float
        In [0, 1].
    y : array_like, float, optional
        ``1 - x`` computed by the caller without cancellation; used where ``I_x > 1/2`` (via
        ``I_x(a, b) = 1 - I_y(b, a)``) so that values of ``x`` rounded to 1 keep their precision.

    Returns
    -------
    ndarray, float64
        ``log I_x(a, b)``; ``-inf`` only at ``x == 0``.

    Examples
    --------
    >>> float(np.exp(log_betainc(2.0, 3.0, 0.5)))  # doctest: +ELLIPSIS
    0.6875...
    >>> bool(np.isfinite(log_betainc(500.0, 0.5, 1e-3)))  # betainc underflows to 0 here
    True
    """
    if y is None:
        y = 1.0 - np.asarray(x, dtype=np.float64)
    a, b, x, y = (np.asarray(v, dtype=np.float64) for v in np.broadcast_arrays(a, b, x, y))
    shape = x.shape
    a, b, x, y = (v.ravel() for v in (a, b, x, y))
    direct = special.betainc(a, b, x)
    # Near I = 1 (x close to 1) use 1 - I_y(b, a): it keeps the precision of y = 1 - x.
    # (scipy's betaincc would do too, but is ~10x slower.)
    near_one = direct > 0.5
    if near_one.any():
        direct[near_one] = 1.0 - special.betainc(b[near_one], a[near_one], y[near_one])
    with np.errstate(divide="ignore"):
        out = np.log(direct)
    small = (direct < _UNDERFLOW) & (x > 0)
    if small.any():
        out[small] = _log_betainc_cf(a[small], b[small], x[small])
    return out.reshape(shape)


def _t_tails(t: np.ndarray, dof: float) -> tuple[np.ndarray, np.ndarray]:
    """log P(T >= |t|) (the small tail) for Student's t, via the incomplete beta.

    Returns the log of the tail beyond ``|t|`` and a boolean "t >= 0" array.
    """
    abs_t = np.abs(t)
    t2 = abs_t * abs_t
    # x = dof/(dof+t^2) and 1-x = t^2/(dof+t^2), each computed directly (no cancellation).
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.where(np.isinf(t2), 0.0, dof / (dof + t2))
        y = np.where(np.isinf(t2), 1.0, t2 / (dof + t2))
    log_i = log_betainc(0.5 * dof, 0.5, x, y)
    return np.log(0.5) + log_i, t >= 0


def log_sf_t(t, dof: float) -> np.ndarray:
    """``log P(T >= t)`` for Student's t with ``dof`` degrees of freedom.

    Parameters
    ----------
    t : array_like, float
    dof : float
        Degrees of freedom (> 0).

    Returns
    -------
    ndarray, float64, same shape as ``t``

    Examples
    --------
    >>> round(float(np.exp(log_sf_t(2.0, 10.0))), 6)
    0.036694
    """
    t = np.asarray(t, dtype=np.float64)
    log_tail, positive = _t_tails(t, float(dof))
    return np.where(positive, log_tail, np.log1p(-np.exp(log_tail)))


def log_sf_f(f, dfn: float, dfd: float) -> np.ndarray:
    """``log P(F >= f)`` for Fisher's F with (``dfn``, ``dfd``) degrees of freedom.

    Parameters
    ----------
    f : array_like, float
        F statistics (>= 0).
    dfn, dfd : float
        Numerator and denominator degrees of freedom (> 0).

    Returns
    -------
    ndarray, float64, same shape as ``f``
    """
    log_upper, _ = _f_tails(np.asarray(f, dtype=np.float64), float(dfn), float(dfd))
    return log_upper


def _f_tails(f: np.ndarray, dfn: float, dfd: float) -> tuple[np.ndarray, np.ndarray]:
    """(log P(F >= f), log P(F <= f)), each precise when it is the smaller tail.

    The lower tail is only evaluated where it is the smaller one (upper > 1/2); elsewhere it
    is ``log1p(-upper)``, which is precise there and saves a second incomplete beta.
    """
    shape = f.shape
    f = f.ravel()
    with np.errstate(over="ignore", invalid="ignore"):
        d1f = dfn * f
        # x = d2/(d2 + d1 f), 1 - x = d1 f/(d2 + d1 f), computed without cancellation.
        x = np.where(np.isinf(d1f), 0.0, dfd / (dfd + d1f))
        y = np.where(np.isinf(d1f), 1.0, d1f / (dfd + d1f))
    log_upper = log_betainc(0.5 * dfd, 0.5 * dfn, x, y)  # A&S 26.6.2
    with np.errstate(divide="ignore"):
        log_lower = np.log1p(-np.exp(log_upper))
    lower_small = log_upper > np.log(0.5)
    if lower_small.any():
        log_lower[lower_small] = log_betainc(0.5 * dfn, 0.5 * dfd, y[lower_small], x[lower_small])
    return log_upper.reshape(shape), log_lower.reshape(shape)


def z_from_log_tails(log_upper: np.ndarray, log_lower: np.ndarray) -> np.ndarray:
    """z with the same tail probabilities, using whichever tail is the smaller (more precise).

    Parameters
    ----------
    log_upper, log_lower : ndarray, float64
        ``log P(S >= s)`` and ``log P(S <= s)`` of a continuous statistic ``S``.

    Returns
    -------
    ndarray, float64
        ``z`` with ``P(Z >= z) = P(S >= s)``, always finite: a tail that is exactly 0 (F = 0,
        where ``P(F <= 0) = 0``) is floored at the smallest positive double, giving
        z = -38.47 instead of -inf.
    """
    upper_small = log_upper <= log_lower
    # Only an exactly-zero tail (log = -inf) is floored; legitimately tiny tails pass through.
    log_upper = np.where(np.isneginf(log_upper), _LOG_TINY, log_upper)
    log_lower = np.where(np.isneginf(log_lower), _LOG_TINY, log_lower)
    return np.where(upper_small, -special.ndtri_exp(log_upper), special.ndtri_exp(log_lower))


def t_sf_and_z(t, dof: float) -> tuple[np.ndarray, np.ndarray]:
    """Upper-tail p and signed z of Student's t, from one incomplete-beta evaluation.

    Parameters
    ----------
    t : array_like, float
    dof : float
        Degrees of freedom (> 0).

    Returns
    -------
    p : ndarray, float64, same shape as ``t``
        ``P(T >= t)`` (may underflow to 0 for huge t; ``z`` does not).
    z : ndarray, float64, same shape as ``t``
        ``P(Z >= z) = p``; exactly antisymmetric (z(-t) = -z(t)), z(0) = 0, finite for finite
        ``t``, ``+-inf`` for ``+-inf``, NaN for NaN.
    """
    t = np.asarray(t, dtype=np.float64)
    log_tail, positive = _t_tails(t, float(dof))
    # The t distribution is symmetric: z(-t) = -z(t), computed from the small tail only.
    z_abs = -special.ndtri_exp(np.minimum(log_tail, np.log(0.5)))
    # "+ 0.0" turns the -0.0 of ndtri_exp(log 1/2) into 0.0.
    z = np.where(positive, z_abs, -z_abs) + 0.0
    tail = np.exp(log_tail)
    p = np.where(positive, tail, 1.0 - tail)
    return p, z


def t_to_z(t, dof: float) -> np.ndarray:
    """Signed z with the same upper-tail p as Student's t (see :func:`t_sf_and_z`).

    Examples
    --------
    >>> float(t_to_z(0.0, 12.0))
    0.0
    >>> round(float(t_to_z(30.0, 10.0)), 4)  # p = 1.98e-11
    6.6055
    >>> round(float(t_to_z(50.0, 1e4)), 4)  # p = 1e-487 underflows; z does not
    47.2369
    """
    return t_sf_and_z(t, dof)[1]


def f_sf_and_z(f, dfn: float, dfd: float) -> tuple[np.ndarray, np.ndarray]:
    """Upper-tail p and z of Fisher's F (z negative where p > 1/2).

    Parameters
    ----------
    f : array_like, float
        F statistics (>= 0).
    dfn, dfd : float
        Numerator and denominator degrees of freedom (> 0).

    Returns
    -------
    p : ndarray, float64, same shape as ``f``
        ``P(F >= f)`` (may underflow to 0; ``z`` does not).
    z : ndarray, float64, same shape as ``f``
        ``P(Z >= z) = p``; finite for finite ``f``; F = 0 gives -38.47 (see
        :func:`z_from_log_tails`); ``inf`` for ``inf``.
    """
    f = np.asarray(f, dtype=np.float64)
    log_upper, log_lower = _f_tails(f, float(dfn), float(dfd))
    z = np.where(np.isposinf(f), np.inf, z_from_log_tails(log_upper, log_lower))
    return np.exp(log_upper), z


def f_to_z(f, dfn: float, dfd: float) -> np.ndarray:
    """z with the same upper-tail p as Fisher's F (see :func:`f_sf_and_z`).

    Examples
    --------
    >>> round(float(f_to_z(1e4, 2.0, 20.0)), 4)  # p = 9.9e-31
    11.4649
    """
    return f_sf_and_z(f, dfn, dfd)[1]


def t_isf(p: float, dof: float) -> float:
    """Upper-tail quantile of Student's t: the t with ``P(T > t) = p`` (as ``scipy.stats.t.isf``,
    whose formula this is, without importing ``scipy.stats``: ~0.3 s at every start).

    >>> round(t_isf(0.025, 10), 6)
    2.228139
    """
    return float(-special.stdtrit(dof, p))


def f_isf(p: float, dfn: float, dfd: float) -> float:
    """Upper-tail quantile of F(dfn, dfd) (as ``scipy.stats.f.isf``, whose formula this is).

    >>> round(f_isf(0.05, 2, 10), 6)
    4.102821
    """
    return float(special.fdtri(dfn, dfd, 1.0 - p))


def norm_sf(z: np.ndarray) -> np.ndarray:
    """Upper-tail probability of the standard normal (as ``scipy.stats.norm.sf``: ``ndtr(-z)``)."""
    return special.ndtr(-np.asarray(z, dtype=np.float64))
