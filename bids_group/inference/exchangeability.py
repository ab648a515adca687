"""Which relabellings of the data are allowed, how many distinct ones exist, and drawing them.

Two schemes (Winkler et al. 2014, NeuroImage 92:381, sections 2.3-2.5):

``"flip"``
    Sign flipping: independent and symmetric errors (ISE). Used when the effect tested includes
    the mean (an intercept-only one-sample test, or a mean over groups), which permuting rows
    cannot change.
``"permute"``
    Row permutation: exchangeable errors (EE). Used for every other effect.

Exchangeability blocks: with ``whole_blocks=False`` rows are permuted only within their block
(sign flips are per row, so blocks change nothing there); with ``whole_blocks=True`` whole blocks
are permuted as units, keeping the order of their rows (blocks must have the same size), or
flipped as units.

A relabelling is stored as a signed permutation: ``perm`` (row i of the relabelled data is row
``perm[i]`` of the residuals) and ``signs`` (+1/-1 per row).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from bids_group.errors import DataError, UsageError

Scheme = Literal["flip", "permute"]
SchemeChoice = Literal["auto", "flip", "permute"]

#: Exhaustive enumeration is only attempted below this many distinct relabellings.
MAX_ENUMERATE = 2_000_000


@dataclass(frozen=True)
class Exchangeability:
    """A validated exchangeability structure for n rows.

    Attributes
    ----------
    scheme : {"flip", "permute"}
    block_codes : ndarray of shape (n_rows,), int64
        Block of each row, coded 0..n_blocks-1 in order of first appearance (all 0 without
        blocks).
    whole_blocks : bool
    row_types : ndarray of shape (n_rows,), int64
        Rows with identical design rows share a type; swapping them cannot change a statistic,
        so distinct permutations are counted over types (the multinomial count).
    """

    scheme: Scheme
    block_codes: np.ndarray
    whole_blocks: bool
    row_types: np.ndarray

    @property
    def n_rows(self) -> int:
        return int(self.block_codes.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.block_codes.max()) + 1 if self.n_rows else 0

    def n_distinct(self) -> int:
        """Number of distinct relabellings (an exact Python int, possibly huge)."""
        if self.scheme == "flip":
            return 2 ** (self.n_blocks if self.whole_blocks else self.n_rows)
        if self.whole_blocks:
            return _multinomial(self._block_types())
        total = 1
        for b in range(self.n_blocks):
            total *= _multinomial(self.row_types[self.block_codes == b])
        return total

    def _block_types(self) -> np.ndarray:
        """Type of each block (blocks with identical sequences of row types share a type)."""
        seqs = [tuple(self.row_types[self.block_codes == b]) for b in range(self.n_blocks)]
        lookup: dict[tuple, int] = {}
        return np.array([lookup.setdefault(s, len(lookup)) for s in seqs], dtype=np.int64)

    def _block_rows(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.block_codes == b) for b in range(self.n_blocks)]


def _multinomial(labels: np.ndarray) -> int:
    """n! / prod(m_i!) for the multiplicities m_i of the values in ``labels``."""
    _, counts = np.unique(labels, return_counts=True)
    out = math.factorial(int(labels.shape[0]))
    for c in counts:
        out //= math.factorial(int(c))
    return out


def make_exchangeability(
    design: np.ndarray,
    tested_basis: np.ndarray,
    *,
    scheme: SchemeChoice = "auto",
    blocks: np.ndarray | None = None,
    whole_blocks: bool = False,
) -> Exchangeability:
    """Validate blocks and choose the scheme.

    Parameters
    ----------
    design : ndarray of shape (n_rows, n_params)
    tested_basis : ndarray of shape (n_rows, n_interest)
        Orthonormal basis of the effect of interest after the partition (``X_interest``).
    scheme : {"auto", "flip", "permute"}
        ``"auto"`` flips signs when the tested effect has a component along the constant
        vector (it includes the mean), else permutes rows.
    blocks : ndarray of shape (n_rows,), optional
        Exchangeability block label of each row (e.g. the subject).
    whole_blocks : bool

    Raises
    ------
    UsageError
        Unknown scheme; ``whole_blocks`` without blocks; row permutation asked for an effect
        that includes the mean.
    DataError
        Blocks that do not label every row once, or unequal blocks with ``whole_blocks``.
    """
    n = design.shape[0]
    if scheme not in ("auto", "flip", "permute"):
        raise UsageError(f"exchangeability scheme must be auto, flip or permute, got {scheme!r}.")
    codes = _block_codes(blocks, n, whole_blocks)
    includes_mean = _includes_mean(tested_basis)
    if scheme == "auto":
        chosen: Scheme = "flip" if includes_mean else "permute"
    else:
        chosen = scheme
    if chosen == "permute" and includes_mean:
        raise UsageError(
            "Row permutation cannot test this contrast: the tested effect includes the mean "
            "(e.g. an intercept), which permuting rows leaves unchanged. Use sign flipping "
            "(scheme='flip'), or add an intercept to the model so that the mean is a nuisance."
        )
    if whole_blocks:
        sizes = np.bincount(codes)
        if chosen == "permute" and np.unique(sizes).size > 1:
            raise DataError(
                "Whole-block permutation needs blocks of equal size; got sizes "
                f"{sorted(set(sizes.tolist()))}. Use within-block permutation (whole_blocks=False)."
            )
    types = _row_types(design)
    return Exchangeability(chosen, codes, bool(whole_blocks), types)


def _includes_mean(tested_basis: np.ndarray) -> bool:
    n = tested_basis.shape[0]
    ones = np.ones(n) / np.sqrt(n)
    return bool(np.linalg.norm(tested_basis.T @ ones) > 1e-8)


def _block_codes(blocks: np.ndarray | None, n: int, whole_blocks: bool) -> np.ndarray:
    if blocks is None:
        if whole_blocks:
            raise UsageError("whole_blocks=True needs exchangeability blocks (blocks=...).")
        return np.zeros(n, dtype=np.int64)
    blocks = np.asarray(blocks)
    if blocks.ndim != 1 or blocks.shape[0] != n:
        raise DataError(
            f"Exchangeability blocks must give one label per row: got shape {blocks.shape} "
            f"for {n} rows. Give each input map the label of its block (e.g. its subject)."
        )
    if blocks.dtype.kind == "f" and not np.all(np.isfinite(blocks)):
        raise DataError(
            "Exchangeability blocks contain NaN: every row must belong to exactly one block."
        )
    if blocks.dtype.kind == "O" and any(b is None for b in blocks):
        raise DataError(
            "Exchangeability blocks contain None: every row must belong to exactly one block."
        )
    _, first, inverse = np.unique(blocks, return_index=True, return_inverse=True)
    # recode in order of first appearance so codes do not depend on label sorting
    rank = np.empty_like(first)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[inverse].astype(np.int64)


def _row_types(design: np.ndarray) -> np.ndarray:
    rounded = np.round(np.asarray(design, dtype=np.float64), 12)
    _, inverse = np.unique(rounded, axis=0, return_inverse=True)
    return inverse.ravel().astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Relabellings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Relabellings:
    """A batch of signed permutations.

    Attributes
    ----------
    perm : ndarray of shape (n_batch, n_rows), int64
    signs : ndarray of shape (n_batch, n_rows), float64 (+1 / -1)
    """

    perm: np.ndarray
    signs: np.ndarray

    def __len__(self) -> int:
        return int(self.perm.shape[0])


def identity(n_rows: int) -> Relabellings:
    return Relabellings(np.arange(n_rows)[None, :], np.ones((1, n_rows)))


def random_relabellings(ex: Exchangeability, rng: np.random.Generator, n: int) -> Relabellings:
    """Draw ``n`` relabellings uniformly (with replacement) from the allowed group.

    The draws consume ``rng`` row by row, so splitting a sequence into batches of any size
    gives the same relabellings.
    """
    n_rows = ex.n_rows
    perm = np.tile(np.arange(n_rows), (n, 1))
    signs = np.ones((n, n_rows))
    if ex.scheme == "flip":
        units = ex.n_blocks if ex.whole_blocks else n_rows
        flips = np.where(rng.random((n, units)) < 0.5, -1.0, 1.0)
        signs = flips[:, ex.block_codes] if ex.whole_blocks else flips
        return Relabellings(perm, signs)
    keys = rng.random((n, ex.n_blocks if ex.whole_blocks else n_rows))
    if ex.whole_blocks:
        rows = np.stack(ex._block_rows())  # (n_blocks, block_size)
        order = np.argsort(keys, axis=1)  # new block j takes the rows of block order[j]
        for j in range(ex.n_blocks):
            perm[:, rows[j]] = rows[order[:, j]]
        return Relabellings(perm, signs)
    # within blocks: sort by (block, random key); positions grouped by block in row order
    grouped = np.argsort(ex.block_codes, kind="stable")
    order = np.argsort(ex.block_codes[None, :] * 2.0 + keys, axis=1, kind="stable")
    perm[:, grouped] = order
    return Relabellings(perm, signs)


def enumerate_relabellings(ex: Exchangeability) -> Relabellings:
    """Every distinct relabelling once, the identity first.

    Raises
    ------
    UsageError
        If there are more than :data:`MAX_ENUMERATE`.
    """
    total = ex.n_distinct()
    if total > MAX_ENUMERATE:
        raise UsageError(f"{total} distinct relabellings is too many to enumerate.")
    n_rows = ex.n_rows
    if ex.scheme == "flip":
        units = ex.n_blocks if ex.whole_blocks else n_rows
        # bit k of the index -> unit k flipped; index 0 is the identity
        idx = np.arange(total, dtype=np.int64)[:, None]
        flips = np.where((idx >> np.arange(units)) & 1, -1.0, 1.0)
        signs = flips[:, ex.block_codes] if ex.whole_blocks else flips
        return Relabellings(np.tile(np.arange(n_rows), (total, 1)), signs)
    if ex.whole_blocks:
        rows = np.stack(ex._block_rows())
        perms = []
        for order in _multiset_orders(ex._block_types()):
            p = np.empty(n_rows, dtype=np.int64)
            p[rows.ravel()] = rows[order].ravel()
            perms.append(p)
    else:
        per_block = []
        for b_rows in ex._block_rows():
            per_block.append([b_rows[o] for o in _multiset_orders(ex.row_types[b_rows])])
        block_rows = ex._block_rows()
        perms = []
        for combo in itertools.product(*per_block):
            p = np.empty(n_rows, dtype=np.int64)
            for b_rows, src in zip(block_rows, combo, strict=True):
                p[b_rows] = src
            perms.append(p)
    perm = np.stack(perms)
    is_id = np.all(perm == np.arange(n_rows), axis=1)
    perm = np.concatenate([perm[is_id][:1], perm[~is_id]])
    return Relabellings(perm, np.ones(perm.shape))


def _multiset_orders(types: np.ndarray) -> Iterator[np.ndarray]:
    """Index orders giving each distinct relabelling of elements with these ``types`` once.

    Position i receives element ``o[i]``. Two relabellings are the same when every element lands
    on a position of the same type, so the arrangements of types *over the elements* are
    enumerated: for an arrangement ``seq`` (``seq[j]`` = type of the position element j goes
    to), the positions of type t receive, in order, the elements j with ``seq[j] == t``.
    """
    types = np.asarray(types)
    positions = {t: np.flatnonzero(types == t) for t in np.unique(types).tolist()}
    seq = sorted(types.tolist())
    while True:
        arr = np.asarray(seq)
        order = np.empty(len(seq), dtype=np.int64)
        for t, pos in positions.items():
            order[pos] = np.flatnonzero(arr == t)
        yield order
        if not _next_permutation(seq):
            return


def _next_permutation(seq: list) -> bool:
    """Advance ``seq`` in place to the next lexicographic arrangement; False after the last."""
    i = len(seq) - 2
    while i >= 0 and seq[i] >= seq[i + 1]:
        i -= 1
    if i < 0:
        return False
    j = len(seq) - 1
    while seq[j] <= seq[i]:
        j -= 1
    seq[i], seq[j] = seq[j], seq[i]
    seq[i + 1 :] = reversed(seq[i + 1 :])
    return True


def check_supports_test(ex: Exchangeability, basis: np.ndarray, residual_maker: np.ndarray) -> None:
    """Raise if no allowed relabelling can change the statistic.

    The statistic depends on the data only through ``basis' P R y`` (``basis``: orthonormal basis
    of the full design, interest first; ``R``: residual-forming matrix of the nuisance). If every
    generator of the group (one row flip, one swap of two rows in a block, one swap of two
    blocks) leaves ``basis' P R`` unchanged, the whole group does, and the test is empty.

    Raises
    ------
    UsageError
    """
    ref = basis.T @ residual_maker
    scale = max(1.0, float(np.abs(ref).max()))
    for p, s in _generators(ex):
        moved = basis.T @ (s[:, None] * residual_maker[p])
        if np.abs(moved - ref).max() > 1e-9 * scale:
            return
    raise UsageError(
        f"The exchangeability structure cannot support this test: no allowed {ex.scheme} "
        "changes the statistic (e.g. permuting within blocks an effect that is constant within "
        "every block). Permute whole blocks, drop the blocks, or change the scheme."
    )


def _generators(ex: Exchangeability) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    n = ex.n_rows
    ident = np.arange(n)
    ones = np.ones(n)
    if ex.scheme == "flip":
        units = ex._block_rows() if ex.whole_blocks else [np.array([i]) for i in range(n)]
        for rows in units:
            s = ones.copy()
            s[rows] = -1.0
            yield ident, s
        return
    if ex.whole_blocks:
        rows = ex._block_rows()
        for j in range(1, len(rows)):
            p = ident.copy()
            p[rows[0]], p[rows[j]] = rows[j], rows[0]
            yield p, ones
        return
    for rows in ex._block_rows():
        for j in range(1, rows.size):
            p = ident.copy()
            p[rows[0]], p[rows[j]] = rows[j], rows[0]
            yield p, ones
