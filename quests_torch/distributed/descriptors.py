"""Descriptors split by structure over the ranks and all-gathered in input order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..checks import bind_arguments
from ..descriptors import get_descriptors as _get_descriptors
from ..structures import AtomsBatch, resolve_device
from . import comm

# --------------------------------------------------------------------------------------------
# descriptors
# --------------------------------------------------------------------------------------------


def _structure_blocks(atoms_per_structure: Sequence[int], world: int) -> list[tuple[int, int]]:
    """Contiguous structure blocks per rank balanced by atom count (cumulative split)."""
    cum = np.concatenate([[0], np.cumsum(np.asarray(atoms_per_structure, dtype=np.int64))])
    total = int(cum[-1])
    cuts = [0]
    for r in range(1, world):
        cuts.append(max(cuts[-1], int(np.searchsorted(cum, r * total / world, side="left"))))
    cuts.append(len(atoms_per_structure))
    return [(cuts[r], max(cuts[r], cuts[r + 1])) for r in range(world)]


def get_descriptors(structures: object, *args, gather: bool = True, **options) -> torch.Tensor:
    """:func:`quests_torch.descriptors.get_descriptors` with the structures split over ranks.

    Takes every argument of :func:`quests_torch.descriptors.get_descriptors` (the same
    defaults and checks; an unknown keyword is a ``TypeError`` naming it). Rank ``r``
    computes a contiguous block of structures (blocks balanced by atom count, see
    :func:`shard_range` for the idea) on ``device``; the rows are all-gathered in input
    order. The species of the multicomponent blocks are fixed from all structures first
    (``species`` default: every element of all the structures, not only of this rank's
    block), so every rank builds the same columns. One structure is never split: a single
    huge cell is computed by one rank.

    Args:
        structures: ``ase.Atoms``, a list of them, or an :class:`AtomsBatch` (the same on
            every rank).
        *args: ``k`` and ``cutoff``, as :func:`quests_torch.descriptors.get_descriptors`.
        gather: ``False`` returns only this rank's rows (its structures' atoms, in order).
        **options: the keywords of :func:`quests_torch.descriptors.get_descriptors`.

    Returns:
        ``[n_atoms, width]`` on ``device`` (every rank), or this rank's block.
    """
    if not comm.is_distributed():
        return _get_descriptors(structures, *args, **options)
    kw = bind_arguments(_get_descriptors, "get_descriptors", (structures, *args), options)
    del kw["structures"]
    multicomponent, species = kw["multicomponent"], kw["species"]
    if isinstance(structures, AtomsBatch):
        counts = structures.n_atoms_per_system.tolist()
        numbers = torch.unique(structures.numbers).tolist()
    else:
        items = structures if isinstance(structures, list | tuple) else [structures]
        counts = [len(a) for a in items]
        numbers = sorted({int(z) for a in items for z in np.unique(a.numbers)})
    spec = species
    if multicomponent and species is None:
        spec = sorted(numbers)  # every element of the whole data, not of this rank's block
    s0, s1 = _structure_blocks(counts, comm.world_size())[comm.rank()]
    dev = resolve_device(kw["device"])
    if s1 > s0:
        if isinstance(structures, AtomsBatch):
            block = structures.select(torch.arange(s0, s1))
        else:
            block = list(items[s0:s1])
        local = _get_descriptors(block, **{**kw, "device": dev, "species": spec})
    else:
        local = torch.empty(0, 0, dtype=kw["dtype"], device=dev)
    if not gather:
        return local
    width = int(
        comm.all_reduce(torch.tensor([local.shape[1]], dtype=torch.int64), dist.ReduceOp.MAX)
    )
    if local.shape[1] != width:
        local = torch.empty(0, width, dtype=kw["dtype"], device=dev)
    cum = np.concatenate([[0], np.cumsum(counts)])
    blocks = _structure_blocks(counts, comm.world_size())
    return comm.all_gather_rows(local, [int(cum[b] - cum[a]) for a, b in blocks])
