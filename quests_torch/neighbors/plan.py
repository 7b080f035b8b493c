"""Routing: which structures of a batch take the cell grid and which the pair list.

The rule (``search="auto"``): a structure with more than :data:`GRID_MIN_CANDIDATES` candidate
pairs (atoms^2 x periodic images within reach of the cutoff) takes the fused cell grid of
:mod:`quests_torch.neighbors.grid` where a grid applies (see
:func:`quests_torch.neighbors.grid.plan_grid`); the others, and those a grid does not suit, take
a pair list (:func:`quests_torch.neighbors.pairs.find_neighbor_pairs`: the batched dense search
for small structures, vesin-torch for large ones). ``search="grid"`` tries the grid for every
structure, ``search="pairs"`` for none.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .grid import Grid, plan_grids
from .pairs import DENSE_MAX_CANDIDATES, check_cells, complete_cell, image_ranges

__all__ = [
    "GRID_MIN_CANDIDATES",
    "SEARCHES",
    "candidate_pairs",
    "check_search",
    "grid_threshold",
    "route",
]

#: structures with more candidate pairs than this (atoms^2 x periodic images within reach) use
#: the fused cell-grid search where it applies; smaller ones the batched dense pair search
GRID_MIN_CANDIDATES = DENSE_MAX_CANDIDATES
#: the accepted values of ``search``
SEARCHES = ("auto", "grid", "pairs")


def grid_threshold(search: str) -> float:
    """Structures with more candidate pairs than this take the grid (``inf``: none).

    Raises:
        ValueError: ``search`` is not one of :data:`SEARCHES`.
    """
    if search == "auto":
        return GRID_MIN_CANDIDATES
    if search == "grid":
        return -1
    if search == "pairs":
        return math.inf
    raise ValueError(f"`search` must be 'auto', 'grid' or 'pairs', got {search!r}")


def check_search(search: str) -> None:
    """Refuse a ``search`` that is not one of :data:`SEARCHES` (ValueError)."""
    grid_threshold(search)


def candidate_pairs(
    counts: torch.Tensor, full: torch.Tensor, pbc: torch.Tensor, cutoff: float
) -> torch.Tensor:
    """Candidate pairs of a brute-force search per structure: atoms^2 x images within reach.

    Args:
        counts: ``[n_systems]`` atoms per structure.
        full: ``[n_systems, 3, 3]`` completed cells (:func:`complete_cell`).
        pbc: ``[n_systems, 3]`` bool.
    """
    return counts * counts * (2 * image_ranges(full, pbc, cutoff) + 1).prod(dim=1)


def route(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    system_idx: torch.Tensor,
    cutoff: float,
    threshold: float,
    skip: torch.Tensor | None = None,
) -> tuple[list[Grid], np.ndarray | None]:
    """The cell grids (see :func:`quests_torch.neighbors.grid.plan_grids`) of the structures
    with more than ``threshold`` candidate pairs where a grid applies, all structures at once.

    Args:
        skip: ``[n_systems]`` bool, structures to leave out altogether.

    Returns:
        ``(grids, pending)``: the grids, and the structures (host, ascending) left for the
        pair list: those with atoms, not in ``skip`` and on no grid (None: all but ``skip``,
        when no grid is tried).
    """
    if threshold == math.inf:
        return [], None
    with torch.no_grad():
        full = complete_cell(cell.detach(), pbc)
        check_cells(full, cell.detach(), pbc)
        n_sys = cell.shape[0]
        counts = torch.zeros(n_sys, dtype=torch.int64, device=positions.device)
        counts.index_add_(0, system_idx, torch.ones_like(system_idx))
        big = (candidate_pairs(counts, full, pbc, cutoff) > threshold) & (counts > 0)
        if skip is None:
            skip = torch.zeros_like(big)
        counts_h, big_h, skip_h = torch.stack([counts, big & ~skip, skip]).cpu().numpy()
        grids = plan_grids(positions, full, pbc, system_idx, cutoff, np.flatnonzero(big_h),
                           counts_h)  # fmt: skip
    left = (counts_h > 0) & (skip_h == 0)
    for g in grids:
        left[g.structures] = False
    return grids, np.flatnonzero(left)
