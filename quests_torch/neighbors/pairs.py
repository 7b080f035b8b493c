"""Neighbour search: every pair of atoms closer than the cutoff, periodic images included.

Two back-ends fill one format (:class:`NeighborPairs`, integer cell shifts, sorted by centre):

* **dense, batched** for datasets of many small structures (molecules, small periodic cells):
  all structures of similar size are padded into one tensor and every (atom, image, atom)
  candidate is tested at once — one set of tensor ops per group, no Python call per structure;
* **vesin-torch** (cell lists, CPU and CUDA) for large structures, one call per structure.

Pair finding is integer bookkeeping done without autograd; neighbour *vectors* are rebuilt
from ``positions`` and ``cell`` afterwards (:func:`pair_vectors`), so gradients with respect
to positions and cell flow through every downstream quantity.

Periodicity is honoured per direction (slabs ``[T, T, F]``, wires ``[T, F, F]``); cells may be
zero along non-periodic directions and are smaller than the cutoff where needed (an atom's own
images are then its neighbours).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._memory import available_memory, memory_budget
from .._precision import float64_enabled, full_precision

__all__ = [
    "COINCIDENT_TOL",
    "DENSE_MAX_CANDIDATES",
    "DENSE_MAX_CANDIDATES_FLOAT32",
    "PAIR_BYTES",
    "NeighborPairs",
    "check_cells",
    "check_pair_memory",
    "complete_cell",
    "find_neighbor_pairs",
    "image_ranges",
    "pair_vectors",
    "raise_coincident",
    "stable_argsort",
]

#: pairs closer than this (Å) are coincident atoms, rejected with an error
COINCIDENT_TOL = 1e-6
#: structures with at most this many candidate pairs (atoms² x images) use the dense path
DENSE_MAX_CANDIDATES = 200_000
#: float32-only mode: the dense search up to here, since vesin-torch computes in float64 (larger
#: structures the cell grid refuses still go to vesin: float64 inside vesin, float32 results)
DENSE_MAX_CANDIDATES_FLOAT32 = 64 * DENSE_MAX_CANDIDATES
#: bytes a pair list holds at its peak per pair within the cutoff (indices, shifts, vectors,
#: distances, the sort by centre and the back-end's own arrays); 170-280 measured on the CPU
#: with vesin-torch for 4e5-1e7 pairs, so this undercounts: the check refuses only what
#: cannot fit
PAIR_BYTES = 160


class NeighborPairs:
    """Directed pairs ``center -> neighbor`` (both directions present), sorted by ``center``.

    The neighbour vector is ``positions[neighbor] - positions[center] + shift @ cell[s]`` with
    ``s`` the structure of ``center``.

    Attributes:
        center: ``[n_pairs]`` int64 global atom index of the central atom (sorted).
        neighbor: ``[n_pairs]`` int64 global atom index of the neighbour.
        shift: ``[n_pairs, 3]`` int64 lattice translation of the neighbour image.
        vector: ``[n_pairs, 3]`` the neighbour vectors, detached from autograd (use
            :func:`pair_vectors` for differentiable ones).

    Internally the per-pair arrays may be kept in the order they were found together with a
    permutation ``perm`` that sorts them by centre; :meth:`select` then gathers only the
    rows asked for, and the properties materialise (and cache) the sorted arrays on demand.
    """

    def __init__(
        self,
        center: torch.Tensor,
        neighbor: torch.Tensor,
        shift: torch.Tensor,
        vector: torch.Tensor,
        perm: torch.Tensor | None = None,
    ) -> None:
        self.center = center
        self._raw = {"neighbor": neighbor, "shift": shift, "vector": vector}
        self._perm = perm
        self._sorted: dict[str, torch.Tensor] = {}

    def _get(self, name: str) -> torch.Tensor:
        if self._perm is None:
            return self._raw[name]
        if name not in self._sorted:
            self._sorted[name] = self._raw[name][self._perm]
        return self._sorted[name]

    @property
    def neighbor(self) -> torch.Tensor:
        return self._get("neighbor")

    @property
    def shift(self) -> torch.Tensor:
        return self._get("shift").to(torch.int64)

    @property
    def vector(self) -> torch.Tensor:
        return self._get("vector")

    @property
    def n_pairs(self) -> int:
        return int(self.center.shape[0])

    def select(self, index: torch.Tensor | slice) -> NeighborPairs:
        """The pairs picked by a boolean mask, an index tensor or a slice (sorted order)."""
        raw = self._raw
        if self._perm is None:
            return NeighborPairs(
                self.center[index],
                raw["neighbor"][index],
                raw["shift"][index],
                raw["vector"][index],
            )
        p = self._perm[index]
        return NeighborPairs(
            self.center[index], raw["neighbor"][p], raw["shift"][p], raw["vector"][p]
        )

    def vector_at(self, index: torch.Tensor) -> torch.Tensor:
        """``vector[index]`` without materialising the whole sorted array."""
        p = index if self._perm is None else self._perm[index]
        return self._raw["vector"][p]

    def __repr__(self) -> str:
        return f"NeighborPairs(n_pairs={self.n_pairs})"


def complete_cell(cell: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor:
    """Replace the lattice vectors of non-periodic directions by an orthonormal complement.

    Along non-periodic directions the cell carries no meaning (and is often zero); a full-rank
    basis is still needed to express positions in fractional coordinates.

    Args:
        cell: ``[n_systems, 3, 3]`` lattice vectors as rows.
        pbc: ``[n_systems, 3]`` bool.

    Returns:
        ``[n_systems, 3, 3]``: periodic rows unchanged, the others orthonormal to them
        (``cell`` itself when every structure is fully periodic and ``pbc`` is on the CPU).
    """
    if pbc.device.type == "cpu" and pbc.numpy().all():
        # fully periodic (every MD cell): nothing to complete (a CPU read, no device sync)
        return cell
    # every case computed for every structure, then picked with `where`: no host sync
    n_per = pbc.sum(dim=1)[:, None, None]
    rows = torch.arange(cell.shape[0], device=cell.device)
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device)
    # one periodic direction a: two unit vectors orthogonal to it
    a_idx = pbc.to(torch.int64).argmax(dim=1)
    a = cell[rows, a_idx]
    ahat = a / a.norm(dim=1, keepdim=True).clamp_min(1e-300)
    u = torch.linalg.cross(ahat, eye[ahat.abs().argmin(dim=1)])
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-300)
    v = torch.linalg.cross(ahat, u)
    one = cell.clone()
    one[rows, (a_idx + 1) % 3] = u
    one[rows, (a_idx + 2) % 3] = v
    # two periodic directions a, b: their unit normal
    c_idx = (~pbc).to(torch.int64).argmax(dim=1)
    normal = torch.linalg.cross(cell[rows, (c_idx + 1) % 3], cell[rows, (c_idx + 2) % 3])
    two = cell.clone()
    two[rows, c_idx] = normal / normal.norm(dim=1, keepdim=True).clamp_min(1e-300)
    # no periodic direction: identity
    out = torch.where(n_per == 2, two, cell)
    out = torch.where(n_per == 1, one, out)
    return torch.where(n_per == 0, eye, out)


def check_cells(full: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor) -> None:
    """Periodic lattice vectors must be non-zero and span a non-degenerate lattice.

    Args:
        full: ``[n_systems, 3, 3]`` the cells completed by :func:`complete_cell`.
        cell, pbc: the cells as given and their periodicity.

    Raises:
        ValueError: naming the first offending structure.
    """
    lengths = cell.norm(dim=2)  # [S, 3]
    zero_periodic = pbc & (lengths < 1e-8)
    full_len = full.norm(dim=2).prod(dim=1)
    det = torch.linalg.det(full).abs()
    bad = det < 1e-8 * full_len
    if not bool(zero_periodic.any() | bad.any()):  # one host sync; the details on failure
        return
    if bool(zero_periodic.any()):
        s, d = (int(v) for v in torch.nonzero(zero_periodic)[0])
        raise ValueError(
            f"`cell` of structure {s} is singular: lattice vector {d} is zero "
            f"but the structure is periodic along it (pbc[{d}] = True)"
        )
    if bool(bad.any()):
        s = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"`cell` of structure {s} is singular along its periodic directions "
            f"(pbc = {pbc[s].tolist()}, volume ~ {float(det[s]):.3g} Å^3)"
        )


def _ball_volume(radius: torch.Tensor, dim: torch.Tensor) -> torch.Tensor:
    """Volume of the ``dim``-dimensional ball of ``radius`` (``dim`` 0 to 3, elementwise)."""
    r = radius.clamp_min(0.0)
    vol = torch.where(dim == 1, 2 * r, torch.ones_like(r))
    vol = torch.where(dim == 2, math.pi * r * r, vol)
    return torch.where(dim == 3, (4 * math.pi / 3) * r * r * r, vol)


def min_pairs_within(
    positions: torch.Tensor,
    full: torch.Tensor,
    pbc: torch.Tensor,
    system_idx: torch.Tensor,
    counts: torch.Tensor,
    cutoff: float,
) -> torch.Tensor:
    """``[S]`` float64 lower bounds on the directed pairs closer than ``cutoff`` (images
    included) of each structure: what any pair list of the structure holds, whatever finds it.

    The lattice translations ``T`` of a periodic sublattice of dimension ``p`` (cell
    ``p``-volume ``V``, longest cell diagonal ``c``) within ``R`` of any point number more than
    ``vol_p(ball(R - c / 2)) / V``: the cells centred on them tile space, lie within ``c / 2``
    of their centres, and so cover the ball of radius ``R - c / 2``. Two atoms whose offset
    has a component ``s`` out of the lattice's span (at most the atoms' extent along the open
    directions) are closer than ``cutoff`` for every ``T`` within ``sqrt(cutoff^2 - s^2)`` of
    their in-plane offset; so each of the ``n^2`` ordered pairs of atoms has at least that
    many images in reach (less the atoms themselves). With no periodic direction the count is
    1 where the atoms' extent is below ``cutoff``, 0 otherwise. Computed in float64 whatever
    the positions' dtype (float32 in float32-only mode, a bound all the same at its ~1e-7
    rounding); ``inf`` where it overflows.
    """
    f64 = torch.float64 if float64_enabled(positions.device) else torch.float32
    full = full.detach().to(f64)
    pos = positions.detach().to(f64)
    per = pbc.to(torch.bool)
    dim = per.sum(dim=1)
    volume = torch.linalg.det(full).abs()  # the complement rows are orthonormal: V_p
    rows = full * per[..., None]
    signs = torch.tensor(
        [[1, 1, 1], [1, 1, -1], [1, -1, 1], [1, -1, -1]], dtype=f64, device=full.device
    )
    half_diag = torch.einsum("dj,sjx->sdx", signs, rows).norm(dim=2).amax(dim=1) / 2
    if per.device.type == "cpu" and bool(per.all()):  # every MD cell: no open direction
        spread = volume.new_zeros(volume.shape)
    else:  # extent of the atoms along the open directions (fractional = Cartesian there)
        frac = torch.einsum("ni,nij->nj", pos, torch.linalg.inv_ex(full).inverse[system_idx])
        n_sys, index = full.shape[0], system_idx[:, None].expand(-1, 3)
        hi = frac.new_full((n_sys, 3), -math.inf).scatter_reduce(0, index, frac, "amax")
        lo = frac.new_full((n_sys, 3), math.inf).scatter_reduce(0, index, frac, "amin")
        spread = torch.where(per | (counts[:, None] == 0), 0.0, hi - lo).norm(dim=1)

    def translations(radius: torch.Tensor) -> torch.Tensor:  # at least, within radius
        covered = _ball_volume(radius - half_diag, dim) / volume
        return torch.where(radius > half_diag, covered, torch.zeros_like(covered))

    n = counts.to(f64)
    in_plane = (cutoff * cutoff - spread * spread).clamp_min(0.0).sqrt()
    every = n * n * translations(in_plane) - n
    own = n * (translations(torch.full_like(spread, cutoff)) - 1)
    return torch.maximum(torch.maximum(every, own), torch.zeros_like(n))


def check_pair_memory(
    positions: torch.Tensor,
    full: torch.Tensor,
    pbc: torch.Tensor,
    system_idx: torch.Tensor,
    counts: torch.Tensor,
    cutoff: float,
    chosen: torch.Tensor,
) -> None:
    """Refuse, before searching, pair lists that cannot fit in the memory available.

    ``chosen``: ``[S]`` bool, the structures whose pairs are to be listed. The need is
    :func:`min_pairs_within` x :data:`PAIR_BYTES`, a lower bound, against
    :func:`quests_torch._memory.available_memory` on the positions' device (one host sync).

    Raises:
        ValueError: naming ``cutoff``, the structure with the most pairs and the bytes.
    """
    pairs = min_pairs_within(positions, full, pbc, system_idx, counts, cutoff) * chosen
    total, worst, n_chosen = torch.stack(
        [pairs.sum(), pairs.argmax().to(pairs.dtype), chosen.sum().to(pairs.dtype)]
    ).tolist()
    need = total * PAIR_BYTES
    have = available_memory(positions.device)
    if need <= have:
        return
    s = int(worst)
    n, p = int(counts[s]), int(pbc[s].sum())
    size = float(torch.linalg.det(full[s].double()).abs())
    where = f"a periodic cell of {size:.4g} {('Å', 'Å^2', 'Å^3')[p - 1]}" if p else "no cell"
    raise ValueError(
        f"`cutoff` = {cutoff:g} Å gives at least {total:.3g} neighbour pairs in "
        f"{int(n_chosen)} structure(s) (the most in structure {s}: {n} atoms in {where}), "
        f"a pair list of at least {need / 2**30:.3g} GiB, more than the "
        f"{have / 2**30:.3g} GiB available on {positions.device}; use a smaller cutoff (the "
        "default is 5 Å) or fewer structures per call"
    )


def image_ranges(full: torch.Tensor, pbc: torch.Tensor, cutoff: float) -> torch.Tensor:
    """``[S, 3]`` largest |n| of lattice translations that can bring wrapped atoms within cutoff."""
    # interplanar spacing h_a = 1 / |a*|, a* the reciprocal vectors (columns of inv(cell))
    inv = torch.linalg.inv_ex(full).inverse  # checked non-singular: no error-check sync
    recip_norm = inv.norm(dim=1)  # norms of columns -> [S, 3]
    n = torch.floor(cutoff * recip_norm).to(torch.int64) + 1
    return torch.where(pbc, n, torch.zeros_like(n))


def _wrap(
    positions: torch.Tensor, full: torch.Tensor, pbc: torch.Tensor, system_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wrap positions into the cell along periodic directions.

    Returns:
        wrapped positions ``[n_atoms, 3]`` and the integer translations removed ``[n_atoms, 3]``
        (``wrapped = positions - n @ cell``).
    """
    inv = torch.linalg.inv(full)
    frac = torch.einsum("ni,nij->nj", positions, inv[system_idx])
    n = torch.floor(frac)
    n = torch.where(pbc[system_idx], n, torch.zeros_like(n))
    wrapped = positions - torch.einsum("ni,nij->nj", n, full[system_idx])
    return wrapped, n.to(torch.int64)


def _dense_group_pairs(
    positions: torch.Tensor,
    full: torch.Tensor,
    nwrap: torch.Tensor,
    n_img: torch.Tensor,
    starts: torch.Tensor,
    counts: torch.Tensor,
    systems: torch.Tensor,
    cutoff: float,
) -> NeighborPairs:
    """All pairs within ``cutoff`` for the structures ``systems`` at once (padded tensors).

    Squared distances of every (atom, image of atom) candidate come from one batched matmul
    (``|a - b|^2 = |a|^2 + |b|^2 - 2 a.b`` on centred coordinates, used only to *select*
    pairs); the kept pairs' vectors are then formed by direct differences.
    """
    device = positions.device
    P = int(counts[systems].max())
    rng = n_img[systems].max(dim=0).values  # [3]
    axes = [torch.arange(-int(r), int(r) + 1, device=device) for r in rng]
    shifts = torch.cartesian_prod(*axes).reshape(-1, 3)  # [T, 3]
    T = shifts.shape[0]
    zero_shift = T // 2  # the cartesian product is symmetric: (0, 0, 0) sits in the middle

    slot = torch.arange(P, device=device)
    atom_ok = slot[None] < counts[systems, None]  # [B, P]
    atom_idx = torch.where(atom_ok, starts[systems, None] + slot[None], 0)
    pos = positions[atom_idx]  # [B, P, 3]
    okf = atom_ok[..., None].to(pos.dtype)
    origin = (pos * okf).sum(dim=1, keepdim=True) / okf.sum(dim=1, keepdim=True)
    pos = pos - origin
    tvec = shifts.to(positions.dtype) @ full[systems]  # [B, T, 3]
    # padding slots go far away (farther than any real atom plus image shift plus cutoff)
    reach = float(pos.abs().amax()) + float(tvec.abs().amax()) + cutoff
    far = torch.zeros(P, 3, dtype=pos.dtype, device=device)
    far[:, 0] = 4.0 * reach * (slot + 1)
    pos = torch.where(atom_ok[..., None], pos, far)

    img = (pos[:, None, :, :] + tvec[:, :, None, :]).reshape(pos.shape[0], T * P, 3)
    sq_img = (img * img).sum(dim=-1)  # [B, T*P]
    sq = (pos * pos).sum(dim=-1)  # [B, P]
    # contiguous right operand: a transposed view makes CPU bmm several times slower
    d2 = torch.baddbmm(sq_img[:, None, :], pos, img.transpose(1, 2).contiguous(), alpha=-2.0)
    d2 += sq[:, :, None]
    b, i, q = torch.nonzero(d2 < cutoff * cutoff, as_tuple=True)
    t, j = q // P, q % P
    real = atom_ok[b, i] & atom_ok[b, j] & ~((i == j) & (t == zero_shift))
    b, i, j, t, q = b[real], i[real], j[real], t[real], q[real]
    ci = atom_idx[b, i]
    nj = atom_idx[b, j]
    shift = shifts[t] - nwrap[nj] + nwrap[ci]
    return NeighborPairs(ci, nj, shift, img[b, q] - pos[b, i])


def _size_bucket(n: torch.Tensor) -> torch.Tensor:
    """Padded size for structures of ``n`` atoms: multiples of 8 (<= 64), 32 (<= 256), 128."""
    return torch.where(
        n <= 64,
        (n + 7) // 8 * 8,
        torch.where(n <= 256, (n + 31) // 32 * 32, (n + 127) // 128 * 128),
    )


#: candidate pairs of one dense group stay below 2^31: ``nonzero`` (and int32-indexed CUDA
#: kernels) refuse or split tensors with more elements, and a 2^31-element group is already
#: ~17 GB of float64 distances, far past the point where larger groups pay off
DENSE_MAX_GROUP = (1 << 31) - 1


def _dense_limit(device: torch.device, budget: int | str | None, itemsize: int) -> int:
    """Candidate pairs per dense group: from the memory budget (~3 values and a mask byte or
    two per candidate), cache-sized on CPU, below :data:`DENSE_MAX_GROUP` everywhere (a half of
    an H200's free memory is ~70 GB: budget / 26 would pass 2^31)."""
    limit = memory_budget(device, budget) // (3 * itemsize + 2)
    if device.type == "cpu":
        limit = min(limit, 1 << 21)
    return max(1, min(limit, DENSE_MAX_GROUP))


def _vesin_pairs(
    positions: torch.Tensor,
    full: torch.Tensor,
    pbc: torch.Tensor,
    start: int,
    count: int,
    system: int,
    cutoff: float,
) -> NeighborPairs:
    from vesin_torch import NeighborList

    nl = NeighborList(cutoff=cutoff, full_list=True, sorted=False)
    # contiguous copies: vesin-torch reads the raw buffers without their strides, so an
    # expanded `pbc` (stride 0, e.g. torch.as_tensor(True).expand(n, 3)) made it read the
    # bytes after the flag and, now and then, search an open box (pairs lost at random)
    pts = positions[start : start + count].contiguous()
    i, j, S, D, d = nl.compute(
        points=pts,
        box=full[system].contiguous(),
        periodic=pbc[system].contiguous(),
        quantities="ijSDd",
    )
    if d.numel() and float(d.min()) < COINCIDENT_TOL:
        p = int(torch.argmin(d))
        raise_coincident(system, int(i[p]), int(j[p]), float(d[p]))
    # group by centre ourselves (a stable radix argsort beats vesin's own sorting) and keep
    # the other arrays unsorted: chunks gather only their rows
    order = stable_argsort(i)
    center, neighbor = i[order], j
    if start:
        center, neighbor = center + start, neighbor + start
    return NeighborPairs(center, neighbor, S, D.to(positions.dtype), perm=order)


def stable_argsort(x: torch.Tensor) -> torch.Tensor:
    """Stable ascending argsort of a 1-D integer tensor (NumPy's radix sort on CPU)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.argsort(x.numpy(), kind="stable"))
    return torch.sort(x, stable=True).indices


def _dense_pairs(
    positions: torch.Tensor,
    full: torch.Tensor,
    pbc: torch.Tensor,
    system_idx: torch.Tensor,
    n_img: torch.Tensor,
    counts: torch.Tensor,
    starts: torch.Tensor,
    dense_sys: torch.Tensor,
    cutoff: float,
    budget: int | str | None,
) -> list[NeighborPairs]:
    """The pairs of the structures ``dense_sys`` by the batched dense search: structures grouped
    by (image range, padded size), one tensor pass per group piece sized from the budget."""
    parts: list[NeighborPairs] = []
    device = positions.device
    if dense_sys.numel():
        wrapped, nwrap = _wrap(positions, full, pbc, system_idx)
        # group structures by (image range, padded size): one tensor pass per group piece
        p_bucket = _size_bucket(counts[dense_sys])
        rng = n_img[dense_sys]
        key = ((rng[:, 0] * 128 + rng[:, 1]) * 128 + rng[:, 2]) * (1 << 24) + p_bucket
        uniq, inverse = torch.unique(key, return_inverse=True)
        limit = _dense_limit(device, budget, positions.element_size())
        for u, k in enumerate(uniq.tolist()):
            members = dense_sys[inverse == u]
            p_b = k % (1 << 24)
            r = k >> 24
            t = (2 * (r >> 14) + 1) * (2 * ((r >> 7) % 128) + 1) * (2 * (r % 128) + 1)
            per_group = max(1, limit // (p_b * p_b * t))
            for g in range(0, members.numel(), per_group):
                parts.append(
                    _dense_group_pairs(
                        wrapped,
                        full,
                        nwrap,
                        n_img,
                        starts,
                        counts,
                        members[g : g + per_group],
                        cutoff,
                    )
                )
    return parts


@full_precision()  # float32 search and wrapping in IEEE precision (TF32 gave 0.01-0.05 Å)
def find_neighbor_pairs(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    system_idx: torch.Tensor,
    cutoff: float,
    *,
    budget: int | str | None = None,
    backend: str = "auto",
    skip: torch.Tensor | None = None,
) -> NeighborPairs:
    """All directed pairs of atoms closer than ``cutoff`` within each structure.

    Args:
        positions: ``[n_atoms, 3]`` Cartesian positions (Å).
        cell: ``[n_systems, 3, 3]`` lattice vectors as rows.
        pbc: ``[n_systems, 3]`` bool periodicity per direction.
        system_idx: ``[n_atoms]`` sorted structure index of each atom.
        cutoff: radius in Å.
        budget: memory budget for the dense path (see :func:`quests_torch._memory.memory_budget`).
        backend: ``"auto"``, ``"dense"`` or ``"vesin"`` (testing aid).
        skip: ``[n_systems]`` bool, structures to leave out (their atoms get no pairs).

    Returns:
        :class:`NeighborPairs` sorted by centre.

    Raises:
        ValueError: singular cell along a periodic direction, or coincident atoms.
    """
    if backend not in ("auto", "dense", "vesin"):
        raise ValueError(f"`backend` must be 'auto', 'dense' or 'vesin', got {backend!r}")
    device = positions.device
    with torch.no_grad():
        positions = positions.detach()
        cell = cell.detach()
        full = complete_cell(cell, pbc)
        check_cells(full, cell, pbc)
        counts = torch.bincount(system_idx, minlength=cell.shape[0])
        listed = counts > 0 if skip is None else (counts > 0) & ~skip
        check_pair_memory(positions, full, pbc, system_idx, counts, cutoff, listed)
        n_img = image_ranges(full, pbc, cutoff)  # [S, 3]
        starts = torch.cumsum(counts, 0) - counts
        n_images = (2 * n_img + 1).prod(dim=1)
        cost = counts * counts * n_images
        if backend == "dense":
            dense = torch.ones_like(counts, dtype=torch.bool)
        elif backend == "vesin":
            dense = torch.zeros_like(counts, dtype=torch.bool)
        elif float64_enabled(device):
            dense = cost <= DENSE_MAX_CANDIDATES
        else:  # float32-only: vesin computes in float64, so dense further (~180 MB float32)
            dense = cost <= DENSE_MAX_CANDIDATES_FLOAT32
        vesin = ~dense
        dense = dense & (counts > 0)  # a structure may have no atoms in a sub-batch
        if skip is not None:
            dense = dense & ~skip
            vesin = vesin & ~skip

        dense_sys = torch.nonzero(dense)[:, 0]
        parts = _dense_pairs(positions, full, pbc, system_idx, n_img, counts, starts, dense_sys,
                             cutoff, budget)  # fmt: skip
        for s in torch.nonzero(vesin)[:, 0].tolist():
            parts.append(
                _vesin_pairs(positions, full, pbc, int(starts[s]), int(counts[s]), s, cutoff)
            )
        pairs = _merge(parts, positions)
        if dense_sys.numel() and parts:
            _check_coincident(pairs, system_idx)
    return pairs


def _merge(parts: list[NeighborPairs], positions: torch.Tensor) -> NeighborPairs:
    """One pair list sorted by centre from the parts (each sorted by centre)."""
    if not parts:
        empty = torch.zeros(0, dtype=torch.int64, device=positions.device)
        return NeighborPairs(
            empty,
            empty,
            torch.zeros(0, 3, dtype=torch.int64, device=positions.device),
            positions.new_zeros((0, 3)),
        )
    if len(parts) == 1:
        return parts[0]
    center = torch.cat([p.center for p in parts])
    pairs = NeighborPairs(
        center,
        torch.cat([p.neighbor for p in parts]),
        torch.cat([p.shift for p in parts]),
        torch.cat([p.vector for p in parts]),
    )
    return pairs.select(stable_argsort(center))


def raise_coincident(system: int, i: int, j: int, distance: float) -> None:
    """Raise the coincident-atoms ValueError (shared by every search strategy).

    ``i``, ``j``: atom indices within structure ``system``; ``distance`` in Å.
    """
    what = "an image of itself" if i == j else f"atom {j}"
    raise ValueError(
        f"coincident atoms in structure {system}: atom {i} and {what} are "
        f"{distance:.2e} Å apart (closer than {COINCIDENT_TOL:g} Å)"
    )


def _check_coincident(pairs: NeighborPairs, system_idx: torch.Tensor) -> None:
    if pairs.n_pairs == 0:
        return
    vec = pairs.vector
    d2 = (vec * vec).sum(dim=1)
    bad = d2 < COINCIDENT_TOL**2
    if bool(bad.any()):
        p = int(torch.nonzero(bad)[0, 0])
        i, j = int(pairs.center[p]), int(pairs.neighbor[p])
        s = int(system_idx[i])
        first = int(torch.searchsorted(system_idx, torch.tensor(s, device=system_idx.device)))
        raise_coincident(s, i - first, j - first, math.sqrt(float(d2[p])))


def pair_vectors(
    positions: torch.Tensor, cell: torch.Tensor, system_idx: torch.Tensor, pairs: NeighborPairs
) -> torch.Tensor:
    """Neighbour vectors ``r_j - r_i + shift @ cell`` ``[n_pairs, 3]``, differentiable."""
    sys = system_idx[pairs.center]
    shift = pairs.shift.to(positions.dtype)
    cart = (shift[:, :, None] * cell[sys]).sum(dim=1)
    return positions[pairs.neighbor] - positions[pairs.center] + cart
