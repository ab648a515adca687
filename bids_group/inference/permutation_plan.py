"""Permutation inference planned before any image is read: blocks, scheme, and whether it can work.

A group analysis can run for minutes before it reaches its permutation step; a design whose
exchangeability cannot support the test, or blocks that do not partition the maps, must stop the
run at once, with the subject or variable at fault named. The checks are the engine's own
(:func:`~bids_group.inference.permutation.design_exchangeability`, which
:func:`~bids_group.inference.permutation.permutation_test` calls too), so the plan cannot disagree
with what the engine will do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from bids_group.errors import DataError, UsageError
from bids_group.inference import exchangeability as exch


@dataclass(frozen=True)
class PermutationPlan:
    """How one contrast will be permuted.

    Attributes
    ----------
    scheme : {"flip", "permute"}
        Sign flipping or row permutation (chosen from the design unless overridden).
    blocks : ndarray of shape (n_maps,) or None
        Exchangeability block of each map (codes), None without blocks.
    whole_blocks : bool
    n_distinct : int
        Number of distinct relabellings (exact, possibly huge).
    n_relabellings : int
        Size of the null distribution the run will build: ``1 + n_perm``, or ``n_distinct``
        when that is reached (all relabellings enumerated: an exact test).
    """

    scheme: exch.Scheme
    blocks: np.ndarray | None
    whole_blocks: bool
    n_distinct: int
    n_relabellings: int

    @property
    def exhaustive(self) -> bool:
        return self.n_relabellings == self.n_distinct


def block_labels(
    variables: pd.DataFrame, name: str | None, *, paths: list[str]
) -> np.ndarray | None:
    """Block of each map from a design variable (a participants.tsv column or an entity).

    Parameters
    ----------
    variables : DataFrame of shape (n_maps, n_variables)
        The design variables of the maps (:func:`bids_group.design.variables_for_maps`).
    name : str or None
        Variable holding the blocks, e.g. ``"subject"``; None: no blocks.
    paths : list of str
        The maps, to name the one with a missing block.

    Raises
    ------
    UsageError
        ``name`` is not a variable.
    DataError
        A map has no value for it.
    """
    if name is None:
        return None
    if name not in variables.columns:
        known = ", ".join(sorted(map(str, variables.columns)))
        raise UsageError(
            f"exchangeability blocks variable {name!r} is not a participants.tsv column or an "
            f"entity of the maps; known variables: {known}"
        )
    values = variables[name]
    missing = np.flatnonzero(values.isna().to_numpy())
    if missing.size:
        raise DataError(
            f"{paths[missing[0]]}: no value of the exchangeability blocks variable {name!r} "
            f"({missing.size} map(s) without one); every map needs a block"
        )
    return pd.factorize(values.astype(str))[0].astype(np.int64)


def plan_permutation(
    design: np.ndarray,
    contrast: np.ndarray,
    *,
    n_perm: int,
    scheme: exch.SchemeChoice = "auto",
    blocks: np.ndarray | None = None,
    whole_blocks: bool = False,
) -> PermutationPlan:
    """Validate the exchangeability of one contrast and count its relabellings.

    Parameters
    ----------
    design : ndarray of shape (n_maps, n_params)
    contrast : ndarray of shape (q, n_params) or (n_params,)
    n_perm : int
        Random relabellings asked for (>= 1).
    scheme : {"auto", "flip", "permute"}
    blocks : ndarray of shape (n_maps,), optional
    whole_blocks : bool

    Returns
    -------
    PermutationPlan

    Raises
    ------
    UsageError
        Row permutation of an effect that includes the mean, or an exchangeability structure
        under which no relabelling changes the statistic.
    DataError
        Blocks of unequal size with whole-block permutation; rank-deficient design.

    Examples
    --------
    >>> plan = plan_permutation(np.ones((10, 1)), np.array([1.0]), n_perm=5000)
    >>> plan.scheme, plan.n_distinct, plan.n_relabellings, plan.exhaustive
    ('flip', 1024, 1024, True)
    """
    x = np.asarray(design, dtype=np.float64)
    c = np.atleast_2d(np.asarray(contrast, dtype=np.float64))
    # The engine's module compiles numba kernels: imported only when a test is planned.
    from bids_group.inference.permutation import design_exchangeability, relabelling_count

    _, ex = design_exchangeability(x, c, scheme=scheme, blocks=blocks, whole_blocks=whole_blocks)
    n_relabellings, _ = relabelling_count(ex, n_perm)
    return PermutationPlan(ex.scheme, blocks, ex.whole_blocks, ex.n_distinct(), n_relabellings)
