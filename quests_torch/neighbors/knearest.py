"""Each atom's k nearest neighbour vectors, block by block, from a pair list or a cell grid.

A *source* covers a set of atoms and hands out their k nearest neighbours (within the cutoff)
for a range of its items: atoms for a pair list, centre bins for a cell grid. Blocks are
produced on demand so the caller (the descriptor step) can size them from a memory budget, run
them in parallel and redo one in halves after an out-of-memory error; every block gives the
same neighbours whatever the block size.

**Ties.** When several neighbours sit at the same distance across the k-th position (perfect
crystals), the kept ones are chosen deterministically: by squared distance quantised to
:math:`r_c^2 / 2^{29}`, then by the neighbour vector's components quantised to
:math:`2 r_c / 2047`, lexicographically (:func:`quests_torch.neighbors.grid.full_keys`). Both
sources apply this rule, so identical environments get identical neighbour sets.

Vectors are rebuilt from ``positions`` and ``cell`` with autograd when those require grad (the
search itself is integer bookkeeping without autograd).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .grid import Grid, Selection, component_keys, d2_levels, select_block, sq_norm3
from .pairs import COINCIDENT_TOL, NeighborPairs, pair_vectors, raise_coincident

__all__ = ["GridSource", "NeighborBlock", "NeighborSource", "PairSource"]

_EMPTY_KEY = torch.iinfo(torch.int64).max
#: CPU blocks of a pair list: this many atoms (cache-sized blocks beat big ones on CPU)
PAIR_CPU_ROWS = 512
#: CPU blocks of a cell grid: about this many atoms (fewer, larger ops: less interpreter
#: time, which the GIL serialises between worker threads)
GRID_CPU_ROWS = 4096


@dataclass
class NeighborBlock:
    """The k nearest neighbours of some atoms.

    Attributes:
        rows: ``[r]`` int64 atom index of each row (the source's atom numbering), or a slice.
        vectors: ``[r, m, 3]`` neighbour vectors (``m <= k``) in no particular order;
            invalid slots hold arbitrary values.
        valid: ``[r, m]`` bool, which slots hold a neighbour within the cutoff.
    """

    rows: torch.Tensor | slice
    vectors: torch.Tensor
    valid: torch.Tensor


class NeighborSource:
    """A set of atoms whose k nearest neighbours come out in blocks of items.

    Args:
        positions: ``[n_atoms, 3]``, cell: ``[n_systems, 3, 3]``, system_idx: ``[n_atoms]``
            the (sub-)batch searched (used for differentiable vectors).
        found: what the search found: a pair list sorted by centre (:class:`PairSource`), a
            cell grid (:class:`GridSource`) or a reused candidate list
            (:class:`quests_torch.neighbors.verlet.CachedSource`).
        atoms: global atom index of ``positions``' rows when they are a sub-batch.

    Attributes: ``n_items`` items (``rows_per_item`` atoms each, at most), at most ``width``
    neighbours per atom, ``item_bytes`` of search memory per item, blocks of ``cpu_rows`` atoms
    preferred on CPU; ``per_thread``: an MD-sized source is split into one block per CPU
    thread (chunk-parallel) rather than run as one block.
    """

    n_items: int
    rows_per_item: int
    width: int
    item_bytes: int
    cpu_rows: int
    per_thread: bool = False

    def __init__(
        self,
        positions: torch.Tensor,
        cell: torch.Tensor,
        system_idx: torch.Tensor,
        found: NeighborPairs | Grid,
        k: int,
        cutoff: float,
        atoms: torch.Tensor | None = None,
    ) -> None:
        self.positions, self.cell, self.system_idx = positions, cell, system_idx
        self.k, self.cutoff, self.atoms = k, cutoff, atoms
        self.device = positions.device
        self.need_grad = torch.is_grad_enabled() and (positions.requires_grad or cell.requires_grad)
        self._prepare(found)

    def _prepare(self, found: NeighborPairs | Grid) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def block(self, a0: int, a1: int) -> NeighborBlock:  # pragma: no cover - interface
        raise NotImplementedError

    def global_rows(self, rows: torch.Tensor | slice) -> torch.Tensor | slice:
        """``rows`` of a block as indices into the whole batch."""
        if self.atoms is None:
            return rows
        return self.atoms[rows]


class PairSource(NeighborSource):
    """The k nearest of every atom from a pair list sorted by centre (a top-k per atom over
    tie-breaking keys), by blocks of atoms; ``found``: every pair within ``cutoff``, sorted by
    centre (:func:`quests_torch.neighbors.pairs.find_neighbor_pairs`)."""

    def _prepare(self, pairs: NeighborPairs) -> None:
        self.pairs = pairs
        n_atoms = self.positions.shape[0]
        counts = torch.bincount(pairs.center, minlength=n_atoms)
        bounds = torch.cumsum(counts, 0)
        self.first = bounds - counts
        c_max = int(counts.max()) if pairs.n_pairs else 0
        self.n_items, self.rows_per_item = n_atoms, 1
        self.width = min(self.k, c_max)
        self.item_bytes = 8 * c_max * 8 + 64  # the candidate arrays (c slots)
        self.cpu_rows = PAIR_CPU_ROWS
        # candidate-list bounds on the host, in one transfer
        self.bounds_h = torch.cat([bounds.new_zeros(1), bounds]).cpu().numpy()
        self.counts_h = np.diff(self.bounds_h)

    def block(self, a0: int, a1: int) -> NeighborBlock:
        """The k nearest of atoms ``a0:a1``."""
        pairs, k, cutoff, first = self.pairs, self.k, self.cutoff, self.first
        width = int(self.counts_h[a0:a1].max())
        p0, p1 = int(self.bounds_h[a0]), int(self.bounds_h[a1])
        if width == 0:
            empty = self.positions.new_zeros((a1 - a0, 0, 3))
            return NeighborBlock(slice(a0, a1), empty, empty[..., 0].bool())
        with torch.no_grad():
            center = pairs.center[p0:p1]
            vec = pairs.vector_at(slice(p0, p1))
            row = center - a0
            slot = torch.arange(p1 - p0, device=self.device) - (first[center] - p0)
            keys = torch.full((a1 - a0, width), _EMPTY_KEY, dtype=torch.int64, device=self.device)
            # every pair is within the cutoff: the level needs no out-of-range guard
            level = d2_levels(sq_norm3(vec, dim=1), cutoff).to(torch.int64)
            keys[row, slot] = (level << 33) | component_keys(vec, cutoff)
            mk = min(k, width)
            top = torch.topk(keys, mk, dim=1, largest=False, sorted=False)
            valid = top.values != _EMPTY_KEY
            pick = (first[a0:a1, None] + top.indices).clamp_max(p1 - 1)  # global pair ids
        if self.need_grad:
            chosen = pairs.select(pick.reshape(-1))
            sel_vec = pair_vectors(self.positions, self.cell, self.system_idx, chosen)
            sel_vec = sel_vec.reshape(a1 - a0, mk, 3)
        else:
            sel_vec = pairs.vector_at(pick)
        return NeighborBlock(slice(a0, a1), sel_vec, valid)


class GridSource(NeighborSource):
    """The k nearest of the atoms binned in a cell grid (the fused selection of
    :func:`quests_torch.neighbors.grid.select_block`), by blocks of centre bins; ``found``: a
    grid from :func:`quests_torch.neighbors.plan.route`."""

    def _prepare(self, grid: Grid) -> None:
        self.grid = grid
        P = grid.occupancy
        self.n_items, self.rows_per_item = int(grid.centers.numel()), P
        self.width = min(self.k, 27 * P)
        # the candidate block of a centre bin: coordinates, keys, distances
        self.item_bytes = 8 * P * 27 * P * 8 + 256
        self.cpu_rows = GRID_CPU_ROWS
        self.per_thread = True

    def block(self, a0: int, a1: int) -> NeighborBlock:
        """The k nearest of the atoms of centre bins ``a0:a1``."""
        positions, cell, system_idx = self.positions, self.cell, self.system_idx
        with torch.no_grad():
            sel = select_block(self.grid, slice(a0, a1), self.k, self.cutoff)
            if self.need_grad:
                nb, shift = sel.pairs(self.grid)
        if self.need_grad:
            # shift . cell elementwise: a matmul's backward would run outside full_precision
            cell_r = cell[system_idx[sel.center]]  # [r, 3, 3]
            image = (shift.to(cell.dtype)[..., :, None] * cell_r[:, None]).sum(-2)
            vec = positions[nb] - positions[sel.center][:, None, :] + image
        else:
            vec = sel.vectors().to(positions.dtype)
        self._check_coincident(sel, vec)
        return NeighborBlock(sel.center, vec, sel.valid)

    def _check_coincident(self, sel: Selection, vec: torch.Tensor) -> None:
        """Refuse atoms closer than :data:`COINCIDENT_TOL` (level 0 flags the candidates:
        closer than ~1.5e-4 Å; the exact test is on the vectors, rare: a host sync is ok)."""
        if not sel.close:
            return
        system_idx = self.system_idx
        d2 = torch.where(sel.valid, (vec.detach() * vec.detach()).sum(dim=2), math.inf)
        if float(d2.min()) < COINCIDENT_TOL**2:
            r, j = (int(v) for v in torch.nonzero(d2 == d2.min())[0])
            i = int(sel.center[r])
            nb, _ = sel.pairs(self.grid)
            s = int(system_idx[i])
            first = int(torch.searchsorted(system_idx, system_idx[i : i + 1]))
            raise_coincident(s, i - first, int(nb[r, j]) - first, math.sqrt(float(d2[r, j])))
