"""Neighbour search: each atom's k nearest neighbours within the cutoff, periodic images included.

One entry point, :func:`find_k_nearest`, takes a flat batch (``positions``, ``cell``, ``pbc``,
``system_idx``) and returns each atom's k nearest neighbour vectors as :class:`KNearest`:
blocks of ``[r, m, 3]`` vectors with a ``[r, m]`` validity mask, produced on demand so that the
descriptor step can size, parallelise and retry them. The strategy is chosen inside, per
structure (:mod:`.plan`):

* **dense batched pair search** (:mod:`.pairs`) for small structures: structures of similar size
  padded into one tensor, every (atom, image, atom) candidate tested at once;
* **cell grid** (:mod:`.grid`) for large ones where a grid applies: the k nearest picked
  straight from blocks of cutoff-thick bins, without building the pair list;
* **vesin-torch** cell lists (:mod:`.pairs`) for large structures the grid does not suit.

A top-k over tie-breaking keys turns a pair list into k nearest (:mod:`.knearest`); both routes
give the same neighbours. :func:`find_neighbor_pairs` (every pair within the cutoff, used by
clustering and sampling) stays available on its own.

Layout: ``__init__`` (entry point, species sub-batches), ``plan`` (routing rules), ``pairs``
(pair lists: dense and vesin-torch), ``grid`` (the cell grid), ``knearest`` (blocks of k
nearest from either).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .._precision import full_precision
from .knearest import GridSource, NeighborBlock, PairSource
from .pairs import (
    COINCIDENT_TOL,
    DENSE_MAX_CANDIDATES,
    DENSE_MAX_CANDIDATES_FLOAT32,
    NeighborPairs,
    complete_cell,
    find_neighbor_pairs,
    pair_vectors,
)
from .plan import GRID_MIN_CANDIDATES, check_search, grid_threshold, route
from .verlet import DEFAULT_SKIN, NeighborCache

__all__ = [
    "COINCIDENT_TOL",
    "DEFAULT_SKIN",
    "DENSE_MAX_CANDIDATES",
    "DENSE_MAX_CANDIDATES_FLOAT32",
    "GRID_MIN_CANDIDATES",
    "GridSource",
    "KNearest",
    "NeighborBlock",
    "NeighborCache",
    "NeighborPairs",
    "PairSource",
    "check_search",
    "complete_cell",
    "find_k_nearest",
    "find_neighbor_pairs",
    "pair_vectors",
]

Source = PairSource | GridSource


@dataclass
class KNearest:
    """Each atom's k nearest neighbours, as sources of blocks.

    Attributes:
        n_atoms: atoms of the batch.
        sources: ``sources[0]``: the sources covering the whole batch; with ``species`` given
            (more than one), ``sources[1 + j]`` those of the sub-structure of species ``j``
            only (each atom's neighbours of its own species; atoms of other species have
            none). Within a list later sources overwrite earlier ones' rows: a pair source
            covers every atom (no neighbours for those it skipped), grid sources follow.
    """

    n_atoms: int
    sources: list[list[Source]] = field(default_factory=list)

    def blocks(self, part: int = 0) -> Iterator[tuple[torch.Tensor | slice, NeighborBlock]]:
        """``(global rows, block)`` of ``sources[part]`` in one block per source (no memory
        budget: use the sources' ``block`` for chunked work)."""
        for src in self.sources[part]:
            if src.n_items:
                blk = src.block(0, src.n_items)
                yield src.global_rows(blk.rows), blk

    def dense(self, part: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors [n_atoms, m, 3], valid [n_atoms, m])`` of ``sources[part]`` in one
        tensor (``m``: the widest source; invalid slots zero)."""
        width = max((s.width for s in self.sources[part]), default=0)
        vec = valid = None
        for rows, blk in self.blocks(part):
            if vec is None:
                vec = blk.vectors.new_zeros((self.n_atoms, width, 3))
                valid = torch.zeros((self.n_atoms, width), dtype=torch.bool, device=vec.device)
            m = blk.vectors.shape[1]
            vec[rows, :m] = torch.where(blk.valid[..., None], blk.vectors, 0.0)
            valid[rows, :m] = blk.valid
            valid[rows, m:] = False
        if vec is None:
            return torch.zeros((self.n_atoms, 0, 3)), torch.zeros((self.n_atoms, 0), dtype=bool)
        return vec, valid


def find_k_nearest(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    system_idx: torch.Tensor,
    k: int,
    cutoff: float,
    search: str = "auto",
    *,
    budget: int | str | None = None,
    numbers: torch.Tensor | None = None,
    species: list[int] | None = None,
) -> KNearest:
    """Each atom's k nearest neighbours within ``cutoff`` (periodic images included).

    Args:
        positions: ``[n_atoms, 3]`` Cartesian positions (Å), validated by the caller.
        cell: ``[n_systems, 3, 3]`` lattice vectors as rows.
        pbc: ``[n_systems, 3]`` bool.
        system_idx: ``[n_atoms]`` sorted int64 structure index per atom.
        k: neighbours kept per atom; cutoff: radius in Å.
        search: ``"auto"`` (dense pair search for structures with at most
            :data:`GRID_MIN_CANDIDATES` candidate pairs, the cell grid for larger ones where
            it applies, vesin-torch otherwise), ``"grid"`` (the grid wherever it applies) or
            ``"pairs"`` (never the grid).
        budget: memory budget of the dense pair search (bytes or "512M").
        numbers, species: ``[n_atoms]`` atomic numbers and the species (more than one) whose
            sub-structures get their own neighbour sets (``KNearest.sources[1 + j]``).

    Returns:
        :class:`KNearest`; vectors are differentiable with respect to ``positions`` and
        ``cell`` when those require grad and autograd is on.

    Raises:
        ValueError: an unknown ``search``, a singular periodic cell, or coincident atoms.
    """
    opts = _Options(k, float(cutoff), budget, grid_threshold(search))
    with full_precision():
        sources = _route_sources((positions, cell, pbc, system_idx), opts, numbers, species or [])
    return KNearest(positions.shape[0], sources)


class _Options(NamedTuple):
    k: int
    cutoff: float
    budget: int | str | None
    threshold: float  # structures with more candidate pairs take the grid


def _route_sources(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    opts: _Options,
    numbers: torch.Tensor | None,
    spec: list[int],
    skip: torch.Tensor | None = None,
    atoms: torch.Tensor | None = None,
) -> list[list[Source]]:
    """The sources of every part of ``batch`` (positions, cell, pbc, system_idx): pair lists
    for the structures not on a grid, then the batched cell grids; none for structures in
    ``skip``. ``atoms``: global atom index of ``batch``'s rows when it is a sub-batch.

    Species parts of pair-list structures filter the pair list; those of gridded structures
    are the same routing applied to the sub-batch of each species' atoms (one call per
    species, not per structure).
    """
    positions, cell, pbc, system_idx = batch
    k, cutoff, budget, threshold = opts
    device = positions.device
    parts: list[list[Source]] = [[] for _ in range(1 + (len(spec) if len(spec) > 1 else 0))]
    grids, pending = route(positions, cell, pbc, system_idx, cutoff, threshold, skip)
    if pending is None or pending.size:
        # the structures not on the grid: pair lists (rows of the others get no neighbours)
        if pending is None:
            rest = skip
        else:
            rest = torch.ones(cell.shape[0], dtype=torch.bool, device=device)
            rest[torch.from_numpy(pending).to(device)] = False
        pairs = find_neighbor_pairs(
            positions, cell, pbc, system_idx, cutoff, budget=budget, skip=rest
        )
        args = (positions, cell, system_idx)
        parts[0].append(PairSource(*args, pairs, k, cutoff, atoms))
        if len(spec) > 1:
            assert numbers is not None
            zc, zn = numbers[pairs.center], numbers[pairs.neighbor]
            for j, z in enumerate(spec):
                sub = pairs.select((zc == z) & (zn == z))
                parts[j + 1].append(PairSource(*args, sub, k, cutoff, atoms))
    for grid in grids:
        parts[0].append(GridSource(positions, cell, system_idx, grid, k, cutoff, atoms))
    if grids and len(spec) > 1:
        assert numbers is not None
        in_grid = torch.zeros(cell.shape[0], dtype=torch.bool, device=device)
        in_grid[[s for g in grids for s in g.structures]] = True
        for j, z in enumerate(spec):
            idx = torch.nonzero((numbers == z) & in_grid[system_idx])[:, 0]
            if idx.numel() == 0:
                continue
            sub_batch = (positions[idx], cell, pbc, system_idx[idx])
            sub_atoms = idx if atoms is None else atoms[idx]
            sub_parts = _route_sources(sub_batch, opts, None, [], skip=~in_grid, atoms=sub_atoms)
            parts[j + 1] += sub_parts[0]
    return parts
