"""Neighbour lists reused across MD steps: a Verlet list with a skin.

Between two MD steps atoms move by a small fraction of an Ångström, so the candidates for each
atom's k nearest neighbours hardly change. :class:`NeighborCache` keeps, for every atom, the
atoms within ``cutoff + skin`` at the time it was built (a padded ``[n_atoms, M]`` list with
integer lattice shifts) and picks each atom's k nearest from those candidates until some atom
has moved more than ``skin / 2`` since the build. Until then every pair now within the cutoff
was within ``cutoff + skin`` at the build, so the list still holds all of them and the k
nearest are the same as a new search's (picked with the same tie-breaking keys as
:mod:`.knearest`): the descriptors do not depend on whether the list was reused.

A list is built on the second of two consecutive calls for the same kind of batch (atom count,
structures, dtype, device, ``k``, ``cutoff``, species) whose cell is the same and whose atoms
moved less than ``skin / 2`` in between: an MD loop. One-off calls on unrelated structures
(screening a dataset through a bank) get a new search each, as without a cache, and never pay
for a list they would not reuse.

The list is rebuilt when an atom moved too far, when the cell, ``pbc``, the structure layout
(``system_idx``), the atomic numbers (multicomponent descriptors), ``k``, ``cutoff``, dtype or
device changed, or when two atoms came closer than the coincidence tolerance (the new search
then raises its error). Displacements are taken modulo the lattice, so positions wrapped back
into the cell by the MD engine (torch-sim does it every step) do not force a rebuild.

A reused step is ~50 tensor ops and one host sync (the validity flag), with no Python work per
atom or structure; a new search costs several hundred ops and several syncs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._memory import memory_budget
from .._precision import full_precision
from . import fused
from .grid import D2_BITS, component_keys, d2_levels
from .knearest import NeighborBlock, NeighborSource
from .pairs import COINCIDENT_TOL, complete_cell, find_neighbor_pairs

__all__ = ["DEFAULT_SKIN", "CachedSource", "NeighborCache"]

#: Å added to the cutoff for the candidate lists (rebuilt once an atom moves skin / 2)
DEFAULT_SKIN = 1.0
#: the level of squared distances at or beyond the cutoff, and the smallest key it gives
_OUT_LEVEL = 1 << D2_BITS
_OUT_KEY = _OUT_LEVEL << 33
#: Å kept from skin / 2 for the rounding of the build's distances and of the displacements
_MARGIN = 1e-3
#: the candidate arrays may take at most this fraction of the memory budget (else no cache)
_BUDGET_FRACTION = 0.25


@dataclass
class _Built:
    """A candidate list and what it was built for (every tensor detached)."""

    key: tuple  # (n_atoms, n_systems, dtype, device, k, cutoff, species)
    positions: torch.Tensor  # [N, 3] at the build
    cell: torch.Tensor  # [S, 3, 3]
    pbc: torch.Tensor  # [S, 3]
    system_idx: torch.Tensor  # [N]
    numbers: torch.Tensor | None  # [N] int64 (multicomponent) or None
    inv: torch.Tensor  # [3, 3] (one structure) or [N, 3, 3]: inverse cell, non-periodic columns 0
    lattice: torch.Tensor  # [3, 3] or [N, 3, 3]: the cell of each atom
    neighbor: torch.Tensor  # [N, M] int32 candidate atoms (padding: the atom itself)
    shift: torch.Tensor  # [N, M, 3] int16 lattice translations of the candidates
    image: torch.Tensor  # [N, M, 3] shift @ cell (padding: a point far outside the cutoff)
    same_species: list[torch.Tensor]  # per species: [N, M] both atoms of that species
    limit2: float  # squared displacement that forces a rebuild
    #: the fused kernel's staleness flag (neighbors/fused.py): the last step number found stale
    stale_flag: torch.Tensor | None = None
    steps: int = 0  # fused steps taken from this list


class NeighborCache:
    """Candidate neighbour lists reused across calls while they stay valid (a Verlet list).

    Pass one to :func:`quests_torch.descriptors.descriptors_from_tensors` (``neighbors=``) in
    an MD loop; :class:`quests_torch.UncertaintyBank` holds one. See the module docstring for
    when the list is rebuilt.

    Args:
        skin: Å added to the cutoff for the candidate lists (default 1.0): the list is rebuilt
            once an atom moved more than about ``skin / 2`` since the last build. Larger skins
            rebuild less often but give more candidates per atom (``(1 + skin / cutoff)^3``).

    Attributes:
        builds: lists built so far.
        reuses: calls answered from a list without a rebuild.
        searches: calls answered by a new search without a list (the first of a run, or
            unrelated structures).
    """

    def __init__(self, skin: float = DEFAULT_SKIN) -> None:
        if isinstance(skin, bool) or not isinstance(skin, (int, float)):
            raise TypeError(f"`skin` must be a number of Å, got {type(skin).__name__}")
        skin = float(skin)
        if not (math.isfinite(skin) and 2 * _MARGIN < skin <= 10.0):
            raise ValueError(f"`skin` must be between {2 * _MARGIN:g} and 10 Å, got {skin!r}")
        self.skin = skin
        self.builds = 0
        self.reuses = 0
        self.searches = 0
        self._built: _Built | None = None
        self._last: tuple | None = None  # (key, positions, cell) of the last new search

    def __repr__(self) -> str:
        return (f"NeighborCache(skin={self.skin}, builds={self.builds}, reuses={self.reuses}, "
                f"searches={self.searches})")  # fmt: skip

    def clear(self) -> None:
        """Forget the list and the last call (the next two calls search anew, then build)."""
        self._built = None
        self._last = None

    def _follows_last(self, key: tuple, p: torch.Tensor, c: torch.Tensor) -> bool:
        """Whether the last call without a list was for the same kind of batch, the same cell
        and atoms less than ``skin / 2`` away (an MD loop: worth a list). One host sync."""
        last, self._last = self._last, (key, p.clone(), c.clone())
        if last is None or last[0] != key:
            return False
        d = p - last[1]
        near = (d * d).sum(1).amax() <= (self.skin / 2) ** 2
        return bool(near & (c == last[2]).all())

    def single_system_idx(self, positions: torch.Tensor) -> torch.Tensor:
        """All-zero ``system_idx`` for one structure of ``positions``' atoms: the list's own
        when it was built for one (then :meth:`reuse` need not compare it)."""
        b = self._built
        if b is not None and b.system_idx.shape == positions.shape[:1] and b.cell.shape[0] == 1:
            if b.system_idx.device == positions.device and b.system_idx._version == 0:
                return b.system_idx
        return torch.zeros(positions.shape[:1], dtype=torch.int64, device=positions.device)

    @staticmethod
    def _key(positions, cell, k, cutoff, species) -> tuple:
        return (positions.shape[0], cell.shape[0], positions.dtype, positions.device, k, cutoff,
                tuple(species))  # fmt: skip

    def _list_for(self, positions, cell, k, cutoff, numbers, species) -> _Built | None:
        """The list when it was built for this kind of batch (shape, dtype, device, ``k``,
        ``cutoff``, species, with or without atomic numbers), else ``None``. No values read."""
        b = self._built
        if b is None or b.key != self._key(positions, cell, k, cutoff, list(species or [])):
            return None
        return b if (numbers is None) == (b.numbers is None) else None

    def reuse(
        self,
        positions: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        system_idx: torch.Tensor,
        k: int,
        cutoff: float,
        *,
        numbers: torch.Tensor | None = None,
        species: list[int] | None = None,
    ) -> list[list[NeighborSource]] | None:
        """The neighbour sources of this batch from the list, or ``None`` when it is stale.

        Shapes as in :func:`quests_torch.neighbors.find_k_nearest` (the layout checked by the
        caller; the values need not be: a NaN position makes the list stale, and the caller's
        full checks then name it). One host sync.
        """
        b = self._list_for(positions, cell, k, cutoff, numbers, species)
        if b is None:
            return None
        with torch.no_grad(), full_precision():
            p = positions.detach()
            d = p - b.positions
            if b.inv.ndim == 2:  # one structure: two 3 x 3 products
                wraps = (d @ b.inv).round_()
                back = wraps @ b.lattice
            else:
                wraps = torch.einsum("ni,nij->nj", d, b.inv).round_()
                back = torch.einsum("ni,nij->nj", wraps, b.lattice)
            moved = d - back  # displacement since the build, modulo the lattice
            q = p - back  # the positions unwrapped to the build's images
            vec = (
                q.index_select(0, b.neighbor.view(-1)).view(b.image.shape)
                - q.unsqueeze(1)
                + b.image
            )
            d2 = (vec * vec).sum(2)
            ok = ((moved * moved).sum(1).amax() <= b.limit2) & (d2.amin() >= COINCIDENT_TOL**2)
            changed = (cell.detach() != b.cell).any() | (pbc != b.pbc).any()
            if system_idx is not b.system_idx or system_idx._version:
                changed = changed | (system_idx != b.system_idx).any()
            if numbers is not None:
                changed = changed | (numbers != b.numbers).any()
            if not bool(ok & ~changed):  # the one host sync
                return None
        self.reuses += 1
        step = _Step(b, vec, d2, wraps)
        parts = [None, *range(len(b.same_species))]
        return [
            [CachedSource(positions, cell, system_idx, step, k, cutoff, part)] for part in parts
        ]

    def fused_reuse(
        self,
        positions: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        system_idx: torch.Tensor,
        k: int,
        cutoff: float,
        *,
        numbers: torch.Tensor | None = None,
        species: list[int] | None = None,
        need_grad: bool = False,
    ) -> tuple[torch.Tensor | None, bool]:
        """This batch's descriptors from the list in one fused kernel (:mod:`.fused`).

        Returns:
            ``(descriptors, True)`` from a valid list; ``(None, True)`` when the list is stale
            (the kernel's flag, the one host sync: the caller rebuilds without asking
            :meth:`reuse`); ``(None, False)`` when no list applies or the kernel does not
            cover the step (the caller tries :meth:`reuse`).
        """
        b = self._list_for(positions, cell, k, cutoff, numbers, species)
        if b is None or not fused.covers(positions, k, b.neighbor.shape[1], need_grad):
            return None, False
        parts = [-1, *species] if b.same_species else [-1]
        out, stale = fused.fused_descriptors(
            b, positions, cell, pbc, system_idx, numbers, k, cutoff, parts
        )
        if stale():  # the one host sync
            return None, True
        self.reuses += 1
        return out, True

    def build(
        self,
        positions: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        system_idx: torch.Tensor,
        k: int,
        cutoff: float,
        *,
        numbers: torch.Tensor | None = None,
        species: list[int] | None = None,
        budget: int | str | None = None,
    ) -> list[list[NeighborSource]] | None:
        """Build the list from a new pair search at ``cutoff + skin`` and return this batch's
        sources from it; ``None`` (no list kept; the caller searches anew) when the last call
        was not for nearly the same batch (see the module docstring), when the candidate
        arrays would take more than a quarter of the memory budget or no atom has a neighbour.

        The batch must be validated by the caller (values included).

        Raises:
            ValueError: a singular periodic cell or coincident atoms (from the pair search).
        """
        self._built = None
        species = list(species or [])
        # normal tensors even when called under inference mode: the list outlives the call
        with torch.inference_mode(False), torch.no_grad(), full_precision():
            p, c = positions.detach(), cell.detach()
            if not self._follows_last(self._key(positions, cell, k, cutoff, species), p, c):
                self.searches += 1
                return None
            pairs = find_neighbor_pairs(p, c, pbc, system_idx, cutoff + self.skin, budget=budget)
            n = p.shape[0]
            counts = torch.bincount(pairs.center, minlength=n)
            m = int(counts.max()) if pairs.n_pairs else 0
            per_atom = m * (4 + 3 * 2 + 4 * p.element_size() + len(species))  # kept arrays
            if m == 0 or n * per_atom > _BUDGET_FRACTION * memory_budget(p.device, budget):
                self.searches += 1
                return None
            slot = torch.arange(pairs.n_pairs, device=p.device)
            slot = slot - (torch.cumsum(counts, 0) - counts)[pairs.center]
            neighbor = torch.arange(n, device=p.device)[:, None].repeat(1, m)
            neighbor[pairs.center, slot] = pairs.neighbor
            shift = torch.zeros((n, m, 3), dtype=torch.int64, device=p.device)
            shift[pairs.center, slot] = pairs.shift
            real = torch.zeros((n, m), dtype=torch.bool, device=p.device)
            real[pairs.center, slot] = True
            lattice = c[system_idx]  # [N, 3, 3]
            image = (shift.to(p.dtype)[..., :, None] * lattice[:, None]).sum(-2)
            # kept compact: int32 atoms, int16 shifts (the list may outlive a large call)
            neighbor = neighbor.to(torch.int32) if n < 2**31 else neighbor
            if int(shift.abs().max()) < 2**15:
                shift = shift.to(torch.int16)
            image[..., 0].masked_fill_(~real, 4.0 * (cutoff + self.skin))  # padding: far away
            inv = torch.linalg.inv(complete_cell(c, pbc)) * pbc[:, None, :].to(p.dtype)
            inv = inv[system_idx]
            if c.shape[0] == 1:
                inv, lattice = inv[0], lattice[0]
            same = []
            if numbers is not None:
                for z in species:
                    mine = numbers == z
                    same.append(mine[:, None] & mine[neighbor] & real)
            limit = self.skin / 2 - _MARGIN
            self._built = _Built(
                key=self._key(positions, cell, k, cutoff, species),
                positions=p.clone(),
                cell=c.clone(),
                pbc=pbc.clone(),
                system_idx=system_idx.clone(),
                numbers=None if numbers is None else numbers.clone(),
                inv=inv,
                lattice=lattice,
                neighbor=neighbor,
                shift=shift,
                image=image,
                same_species=same,
                limit2=limit * limit,
            )
        self.builds += 1
        got = self.reuse(positions, cell, pbc, system_idx, k, cutoff, numbers=numbers,
                         species=species)  # fmt: skip
        self.reuses -= got is not None  # counted as a build, not a reuse
        return got


@dataclass
class _Step:
    """One call's candidate vectors (from the list) and the wraps since the build."""

    built: _Built
    vectors: torch.Tensor  # [N, M, 3] detached
    d2: torch.Tensor  # [N, M]
    wraps: torch.Tensor  # [N, 3] lattice translations removed since the build (as floats)


class CachedSource(NeighborSource):
    """The k nearest of every atom picked from a :class:`NeighborCache` list, by blocks of
    atoms; ``found``: the call's :class:`_Step`; ``part``: ``None`` for the whole structure,
    ``j`` for the sub-structure of species ``j`` (other atoms get no neighbours)."""

    def __init__(self, positions, cell, system_idx, found, k, cutoff, part=None) -> None:
        self.part = part
        super().__init__(positions, cell, system_idx, found, k, cutoff)

    def _prepare(self, step: _Step) -> None:
        self.step = step
        n, m = step.d2.shape
        self.n_items, self.rows_per_item = n, 1
        self.width = min(self.k, m)
        self.item_bytes = m * 64 + 64
        self.cpu_rows = 512
        self.per_thread = True  # an MD cell: one block per CPU thread

    def block(self, a0: int, a1: int) -> NeighborBlock:
        """The k nearest of atoms ``a0:a1``."""
        step, b, cutoff = self.step, self.step.built, self.cutoff
        with torch.no_grad():
            d2, vec = step.d2[a0:a1], step.vectors[a0:a1]
            # levels at or beyond the cutoff share one (the candidates of the skin and the
            # padding): keys from there on mark no neighbour
            levels = d2_levels(d2, cutoff).clamp_(max=_OUT_LEVEL).to(torch.int64)
            keys = (levels << 33) | component_keys(vec, cutoff)
            if self.part is not None:  # a species' sub-structure: other pairs are out
                keys.masked_fill_(~b.same_species[self.part][a0:a1], _OUT_KEY)
            top = torch.topk(keys, self.width, dim=1, largest=False, sorted=False)
            valid = top.values < _OUT_KEY
            pick = top.indices
        if not self.need_grad:
            return NeighborBlock(slice(a0, a1), vec.gather(1, pick[..., None].expand(-1, -1, 3)),
                                 valid)  # fmt: skip
        # differentiable: r_j - r_i + (s - n_j + n_i) . cell, the wraps n since the build
        nb = b.neighbor[a0:a1].gather(1, pick)
        shift = b.shift[a0:a1].gather(1, pick[..., None].expand(-1, -1, 3)).to(step.wraps.dtype)
        shift = shift - step.wraps[nb] + step.wraps[a0:a1, None, :]
        cell_r = self.cell[self.system_idx[a0:a1]]  # [r, 3, 3]
        image = (shift.to(self.cell.dtype)[..., :, None] * cell_r[:, None]).sum(-2)
        pos = self.positions
        return NeighborBlock(slice(a0, a1), pos[nb] - pos[a0:a1, None, :] + image, valid)
