"""OLS fitted straight from the decoded maps, batch by batch: no data matrix, no store.

When the masked data do not fit in the memory budget and the run needs them for nothing but
the OLS fit (see :func:`bids_group.pipeline._stream_plan`), :func:`bids_group.store.load_data`
hands every decoded map's row at the candidate voxels to an :class:`OlsAccumulator` instead of
writing the voxel-tiled store, and keeps only the fit's sufficient statistics. Pure numpy.

The statistics, per voxel, with the thin SVD ``X = U S V'`` of the design (``U``: its ``r``
left singular vectors of non-zero singular value, ``r = rank X``) and a shift ``C`` (one value
per map and voxel) in the column space of ``X``:

* ``G = U'(Y - C)`` (``r x n_voxels``), ``S = sum((Y - C)^2)``;
* ``s = sum(Y - C)`` when ``X`` spans the constant (R^2 centred on the mean), else
  ``Q = sum(Y^2)`` (R^2 uncentred, as :func:`bids_group.glm.fit_ols` does);
* what the data checks of :func:`bids_group.data_checks.check_masked_data` need: per map its
  largest finite ``|value|``, per voxel the first map's value and whether every map has the
  same value (``S == 0`` when ``X`` spans the constant, see :meth:`OlsAccumulator.finish`; else
  the smallest and largest value); and for a report not drawn on the MNI template, the sum of
  ``|Y|`` (its background).

As ``C`` lies in the column space, the residuals of ``Y - C`` are those of ``Y``, hence
``RSS = S - ||G||^2``, ``beta = pinv(X) Y = V S^-1 G + pinv(X) C`` and ``TSS = S - s^2 / n``
(or ``Q``). ``C`` is fixed by the first batch of maps: its mean at each voxel when ``X`` spans
the constant, else ``X B0`` with ``B0`` that batch's least-squares fit. Then ``S`` is close to
``RSS`` (``S / RSS`` about ``1 / (1 - R^2)``, not ``||Y||^2 / RSS``): data of mean 1000 and
spread 1e-3 lose no digits to the subtraction.

Accuracy: the in-memory fit forms explicit residuals, this one does not, so the two differ in
their last bits. Rounding in the sums (float64, float32 data converted exactly) changes ``RSS``
by at most about ``(1 + 2 sqrt(r)) (n + 2) eps S`` (first order, worst case; ``eps = 2^-52``):
:attr:`StreamedOls.rss_bound` is that relative to ``RSS``, at the worst voxel, and is logged.
The residual variance then carries at most that relative error from the sums (``t`` half of
it). The effects ``beta`` carry the rounding every float64 fit has (``pinv(X) C`` adds the
mean back: with data of mean 1000 and spread 1e-3, ~1e-17 x 1000 on a slope, in this fit and
the in-memory one alike). Measured (tests/test_streamed_fit.py): the residual variance within
this bound of a float64 least-squares oracle fitted on shifted data; against the in-memory fit,
``t`` within 1e-10 relative and ``z``, ``R^2`` within 1e-10 absolute, except with data of mean
1000 and spread 1e-3, where each fit's ``t`` differs from the oracle's by up to ~1e-9 (7e-9 with
a rank-deficient design); through the CLI, every written float32 map within a few float32
epsilons and every table the same bytes.

Determinism: batches of a fixed number of maps (:func:`batch_maps`: from the bytes of one row
and the budget) are summed in map order, on the thread that decodes (or receives) the maps,
with one BLAS thread: the bits depend neither on ``--n-jobs`` nor on how threads are scheduled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from bids_group.data_checks import DataFindings, findings_from
from bids_group.errors import DataError
from bids_group.glm import (
    GlmFit,
    _r_squared,
    check_finite_design,
    rank_and_dof,
    spans_constant,
)
from bids_group.memory import aligned, work_bytes

#: Bytes of float32 rows of one batch (at most; and at most the budget's working share).
BATCH_BYTES = 32 * 1024**2
#: Maps per batch at most (more only makes the products longer, not faster).
MAX_BATCH_MAPS = 256
#: Bytes of one step's float64 working copy (``batch x step`` voxels): stays in the CPU cache.
_STEP_BYTES = 1024**2
_EPS = float(np.finfo(np.float64).eps)


def batch_maps(n_voxels: int, budget: int) -> int:
    """Maps per batch: as many rows of ``n_voxels`` float32 as fit in :data:`BATCH_BYTES` and in
    the budget's working share (:func:`~bids_group.memory.work_bytes`), at least 1.

    >>> batch_maps(235_375, 4 * 1000**3), batch_maps(8_000, 10**6), batch_maps(10**9, 10**9)
    (35, 7, 1)
    """
    fitting = min(BATCH_BYTES, work_bytes(budget)) // (4 * max(n_voxels, 1))
    return int(np.clip(fitting, 1, MAX_BATCH_MAPS))


@dataclass(frozen=True)
class StreamPlan:
    """What a run that may stream its fit tells :func:`bids_group.store.load_data`.

    Attributes
    ----------
    design : ndarray of shape (n_maps, n_params), float64
    background : bool
        Also sum ``|value|`` per voxel (the report's background when not on a template).
    """

    design: np.ndarray
    background: bool = False


@dataclass(frozen=True)
class StreamedOls:
    """What a streamed run keeps of its data: the fit and what the data checks found.

    Stands where :attr:`bids_group.images.MaskedData.data` holds the matrix or the store;
    only its :attr:`shape` is read like theirs.

    Attributes
    ----------
    shape : (n_maps, n_voxels)
    fit : GlmFit
    findings : DataFindings
        Per map, the largest ``|value|`` is over the candidate voxels (the final mask and the
        voxels a later map removed from it), finite values only.
    mean_abs : ndarray of shape (n_voxels,) or None
        Mean ``|value|`` over the maps (with :attr:`StreamPlan.background`).
    rss_bound : float
        Worst voxel's bound on the relative error of RSS (see the module's docstring).
    batch_maps : int
    """

    shape: tuple[int, int]
    fit: GlmFit
    findings: DataFindings
    mean_abs: np.ndarray | None
    rss_bound: float
    batch_maps: int

    @property
    def nbytes(self) -> int:
        """Bytes of the masked data (float32) the matrix would have held."""
        return 4 * self.shape[0] * self.shape[1]


class OlsAccumulator:
    """The sufficient statistics of an OLS fit, fed one map's row at a time, in map order.

    Parameters
    ----------
    design : ndarray of shape (n_maps, n_params)
    n_voxels : int
        Length of every row (the candidate voxels; :meth:`finish` keeps the final mask's).
    batch : int
        Maps per batch (:func:`batch_maps`).
    background : bool
        Also sum ``|value|`` per voxel.

    Raises
    ------
    DataError
        NaN/inf in the design, or no residual degrees of freedom (as :func:`fit_ols`).
    """

    def __init__(
        self, design: np.ndarray, n_voxels: int, *, batch: int, background: bool = False
    ) -> None:
        design = np.asarray(design, dtype=np.float64)
        _check_design(design)
        n_maps = design.shape[0]
        self.design = design
        self.rank, self.dof = rank_and_dof(design)
        u, sv, vt = np.linalg.svd(design, full_matrices=False)
        self._u = np.ascontiguousarray(u[:, : self.rank])  # (n_maps, r)
        self._w = vt[: self.rank].T / sv[: self.rank]  # pinv(X) = W U'
        self.pinv_x = np.linalg.pinv(design)
        self.centred = spans_constant(design, self.pinv_x)
        self.batch = int(batch)
        self.step = aligned(max(1, _STEP_BYTES // (8 * self.batch)))
        self._rows = np.empty((self.batch, n_voxels), dtype=np.float32)
        self._work = np.empty((self.batch, min(self.step, n_voxels)), dtype=np.float64)
        self._filled = 0
        self._done = 0  # maps summed so far
        self._shift: np.ndarray | None = None  # mean (1, V) or B0 (p, V) of the first batch
        self.g = np.zeros((self.rank, n_voxels))
        self.sq = np.zeros(n_voxels)  # S = sum (Y - C)^2
        self.total = np.zeros(n_voxels)  # s = sum (Y - C), or Q = sum Y^2 (not centred)
        self.low = np.full(0 if self.centred else n_voxels, np.inf, dtype=np.float32)
        self.high = np.full(0 if self.centred else n_voxels, -np.inf, dtype=np.float32)
        self.first = np.zeros(n_voxels, dtype=np.float32)
        self.largest = np.zeros(n_maps)
        self.abs_sum = np.zeros(n_voxels) if background else None

    @property
    def n_maps(self) -> int:
        return self.design.shape[0]

    def add(self, index: int, row: np.ndarray) -> None:
        """Map ``index``'s values (float32, one per voxel); maps come in order, 0 first."""
        if index != self._done + self._filled:
            raise ValueError(f"map {index} came before map {self._done + self._filled}")
        self._rows[self._filled] = row
        self.largest[index] = _largest_finite(self._rows[self._filled])
        self._filled += 1
        if self._filled == self.batch:
            self._flush()

    def _flush(self) -> None:
        """Add the batch held to the sums (voxel steps whose float64 copy stays in cache)."""
        k, start = self._filled, self._done
        rows = self._rows[:k]
        # U' of the batch, and a row of ones whose product sums Y - C (centred TSS)
        u_t = np.ones((self.rank + 1, k))
        u_t[: self.rank] = self._u[start : start + k].T
        x = self.design[start : start + k]
        with threadpool_limits(1, user_api="blas"):  # the same bits for any thread count
            if self._shift is None:
                self.first[:] = rows[0]
                self._shift = self._first_shift(rows, x)
            for begin in range(0, rows.shape[1], self.step):
                self._add_step(rows, slice(begin, min(begin + self.step, rows.shape[1])), u_t, x)
        self._done += k
        self._filled = 0

    def _first_shift(self, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The shift of every voxel: the first batch's mean (1, V), or its fit B0 (p, V) when
        the design does not span the constant (C = X B0, in its column space).

        B0 is a ridge fit, ``(Xb'Xb + lambda I)^-1 Xb' Yb`` with lambda 1e-6 of the mean
        eigenvalue of ``Xb'Xb``: any B0 keeps C in the column space, and the ridge keeps it
        bounded when the first batch's rows are (nearly) collinear, where a least-squares B0
        blows up along the ill-determined direction, S then dwarfs RSS and ``S - ||G||^2``
        loses every digit (40 maps, two columns, the first three rows proportional to 1e-9).
        """
        if self.centred:
            return rows.mean(axis=0, dtype=np.float64)[np.newaxis, :]
        gram = x.T @ x
        ridge = 1e-6 * max(float(np.trace(gram)) / gram.shape[0], float(np.finfo(float).tiny))
        fit = np.linalg.solve(gram + ridge * np.eye(gram.shape[0]), x.T)
        return np.concatenate(
            [fit @ rows[:, b : b + self.step] for b in range(0, rows.shape[1], self.step)],
            axis=1,
        )

    def _add_step(self, rows: np.ndarray, part: slice, u_t: np.ndarray, x: np.ndarray) -> None:
        values = rows[:, part]
        d = self._work[: values.shape[0], : values.shape[1]]
        assert self._shift is not None
        if self.centred:
            np.subtract(values, self._shift[:, part], out=d)
        else:
            np.matmul(x, self._shift[:, part], out=d)
            np.subtract(values, d, out=d)
        products = u_t @ d
        self.g[:, part] += products[: self.rank]
        self.sq[part] += np.einsum("ij,ij->j", d, d)
        if self.centred:
            self.total[part] += products[self.rank]
        else:  # uncentred TSS; and C varies by map, so constant voxels need their range
            d[...] = values
            self.total[part] += np.einsum("ij,ij->j", d, d)
            np.minimum(self.low[part], values.min(axis=0), out=self.low[part])
            np.maximum(self.high[part], values.max(axis=0), out=self.high[part])
        if self.abs_sum is not None:
            self.abs_sum[part] += np.abs(values).sum(axis=0, dtype=np.float64)

    def finish(self, columns: np.ndarray) -> StreamedOls:
        """The fit at the voxels ``columns`` (the final mask's, in its order), once every map
        was added."""
        if self._filled:
            self._flush()
        if self._done != self.n_maps:
            raise ValueError(f"{self._done} of {self.n_maps} maps were added")
        n = self.n_maps
        g, sq, total = self.g[:, columns], self.sq[columns], self.total[columns]
        assert self._shift is not None
        rss = np.maximum(sq - np.einsum("ij,ij->j", g, g), 0.0)
        if self.centred:  # pinv(X) C = pinv(X) 1 c'
            shifted = np.outer(self.pinv_x.sum(axis=1), self._shift[0, columns])
            tss = np.maximum(sq - total * total / n, 0.0)
        else:  # pinv(X) X B0
            shifted = (self.pinv_x @ self.design) @ self._shift[:, columns]
            tss = total
        fit = GlmFit(
            beta=self._w @ g + shifted,
            residual_variance=rss / self.dof,
            dof=self.dof,
            xtx_inv=np.linalg.pinv(self.design.T @ self.design),
            design=self.design,
            rank=self.rank,
            r_squared=_r_squared(rss, tss),
            centred_r_squared=self.centred,
        )
        # centred: C is the first batch's mean, which is exactly the value of a voxel that
        # first batch has the same everywhere; then S = 0 exactly when every map has it
        constant = sq == 0 if self.centred else self.low[columns] == self.high[columns]
        return StreamedOls(
            shape=(n, int(columns.size)),
            fit=fit,
            findings=findings_from(self.largest, constant, self.first[columns] == 0),
            mean_abs=None if self.abs_sum is None else self.abs_sum[columns] / n,
            rss_bound=self._bound(sq, rss),
            batch_maps=self.batch,
        )

    def _bound(self, sq: np.ndarray, rss: np.ndarray) -> float:
        """The worst voxel's first-order bound on the relative error of RSS. Voxels with RSS 0
        (constant, or fitted exactly) are left out: there both fits' t is the effect over the
        variance floor (:data:`~bids_group.contrasts.VARIANCE_FLOOR`), and the data checks warn
        of constant voxels."""
        ratio = np.divide(sq, rss, out=np.zeros_like(sq), where=rss > 0)
        worst = float(ratio.max(initial=0.0))
        return (1 + 2 * np.sqrt(self.rank)) * (self.n_maps + 2) * _EPS * worst


def _check_design(design: np.ndarray) -> None:
    if design.ndim != 2:
        raise DataError(f"the design must be 2-D (n_maps, n_params); got {design.shape}")
    check_finite_design(design)


def _largest_finite(row: np.ndarray) -> float:
    """The largest finite ``|value|`` of ``row`` (0 when none): inf or NaN voxels leave a user
    mask, as in :func:`bids_group.images.finish_user_mask`.

    >>> _largest_finite(np.array([1.0, -3.0, np.inf, np.nan], dtype=np.float32))
    3.0
    """
    low, high = float(np.min(row, initial=0.0)), float(np.max(row, initial=0.0))
    if np.isfinite(low) and np.isfinite(high):  # NaN and inf propagate: then look closer
        return max(-low, high)
    finite = row[np.isfinite(row)]
    return float(np.max(np.abs(finite), initial=0.0))
