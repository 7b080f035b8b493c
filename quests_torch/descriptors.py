r"""The QUESTS descriptor of atomic environments (SPEC section 1), as batched tensor ops.

For atom :math:`i` with neighbours sorted by distance :math:`r_1 \le r_2 \le \dots` (periodic
images included, the first :math:`n_i = \min(k, \#\{r < r_c\})` kept):

.. math::

    w(r) = \bigl(1 - (\min(r, r_c)/r_c)^2\bigr)^2, \qquad
    x^{(1)}_j = \frac{w(r_j + 10^{-16})}{r_j + 10^{-16}}, \\
    R_{jl} = \frac{\sqrt{w(r_j) w(r_l)}}{|\mathbf r_j - \mathbf r_l| + 10^{-15}}\ (j \ne l), \qquad
    x^{(2)}_m = \frac1k \sum_{j=1}^{k} \operatorname{sort}(R_{j\cdot})_{k-1-m}, \quad m = 0..k-2,

and :math:`X_i = [x^{(1)}, x^{(2)}]` has :math:`2k - 1` entries (63 for k = 32). Entries for
missing neighbours are zero; :math:`x^{(2)}` divides by :math:`k`, not :math:`n_i`.

**Ties.** When several neighbours sit at the same distance across the k-th position (perfect
crystals), the kept ones are chosen deterministically: by squared distance quantised to
:math:`r_c^2 / 2^{29}` (~4.7e-8 Å², ~5 nÅ in distance at 5 Å), then by the neighbour
vector's components (x, y, z) quantised to :math:`2 r_c / 2047`, lexicographically. Identical
environments therefore get identical descriptors (a perfect FCC crystal has H = 0). The choice
only matters for exact ties; both search paths below apply the same rule.

**Two search paths.** Small structures (up to :data:`GRID_MIN_CANDIDATES` candidate pairs,
~85 atoms in a periodic cell, ~450 in a molecule) and larger ones a cell grid does not suit
go through a pair list (:mod:`quests_torch.neighbors`: batched dense search
or vesin-torch) and a per-atom top-k over it. Larger structures use the fused cell-grid
selection of :mod:`quests_torch.cellgrid`, which picks the k nearest straight from blocks of
bins without building the pair list.

Everything here is differentiable with respect to positions and cell; atoms are processed in
chunks sized from a memory budget.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from ._memory import available_memory, memory_budget
from ._precision import full_precision
from .cellgrid import (
    Grid,
    Selection,
    component_keys,
    d2_levels,
    plan_grid,
    select_block,
    sq_norm3,
)
from .neighbors import (
    COINCIDENT_TOL,
    DENSE_MAX_CANDIDATES,
    NeighborPairs,
    _check_cells,
    _image_ranges,
    _raise_coincident,
    complete_cell,
    find_neighbor_pairs,
    pair_vectors,
)
from .structures import AtomsBatch, resolve_device, validate_batch

__all__ = [
    "DEFAULT_CUTOFF",
    "DEFAULT_K",
    "MAX_K",
    "descriptor_width",
    "descriptors_from_tensors",
    "get_descriptors",
]

DEFAULT_K = 32
DEFAULT_CUTOFF = 5.0
#: the largest ``k`` accepted: beyond the neighbours within the cutoff (~80 at 5 Å in dense
#: metals, a few hundred at 10 Å) a larger ``k`` only appends zero columns
MAX_K = 1024
_EPS_X1 = 1e-16
_EPS_X2 = 1e-15
_EMPTY_KEY = torch.iinfo(torch.int64).max
_CPU_CHUNK = 512
_CPU_SELECT_ROWS = 4096
#: structures with more candidate pairs than this (atoms^2 x periodic images within reach) use
#: the fused cell-grid search where it applies; smaller ones the batched dense pair search
GRID_MIN_CANDIDATES = DENSE_MAX_CANDIDATES


def descriptor_width(k: int = DEFAULT_K, n_species: int = 0) -> int:
    """Number of columns: ``2k - 1``, times ``n_species + 1`` for the multicomponent form
    (``n_species <= 1`` means the plain descriptor)."""
    return (2 * k - 1) * (n_species + 1 if n_species > 1 else 1)


def _check_output_memory(n_atoms: int, width: int, k: int, dtype, device) -> None:
    """Refuse a descriptor array ``[n_atoms, width]`` larger than the memory available on
    ``device`` (free CUDA memory or available RAM): say so before allocating it."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = n_atoms * width * itemsize
    have = available_memory(device)
    if need > have:
        raise ValueError(
            f"`k` = {k} needs a [{n_atoms}, {width}] descriptor array of {need / 2**30:.3g} GiB "
            f"for {n_atoms} atoms, more than the {have / 2**30:.3g} GiB available on {device}; "
            "use a smaller k or fewer structures per call"
        )


def _check_params(k: int, cutoff: float) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"`k` must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}")
    if k > MAX_K:
        raise ValueError(
            f"`k` must be <= {MAX_K}, got {k} (beyond the neighbours within the cutoff a "
            "larger k only adds zero columns)"
        )
    if not isinstance(cutoff, (int, float)) or isinstance(cutoff, bool):
        raise TypeError(f"`cutoff` must be a number, got {type(cutoff).__name__}")
    if not (cutoff > 0) or cutoff == float("inf"):
        raise ValueError(f"`cutoff` must be a finite number > 0, got {cutoff}")


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(
            max(1, torch.get_num_threads()), thread_name_prefix="quests-sort"
        )
    return _POOL


def _sorted_rows(r: torch.Tensor) -> torch.Tensor:
    """Each row of the last dim sorted ascending; differentiable when ``r`` requires grad.

    On CPU without autograd this is NumPy's SIMD value sort (AVX-512/AVX2 quicksort, ~3x
    faster than an argsort and ~10x faster than ``torch.sort`` for rows of 32 doubles).
    """
    if r.device.type == "cpu" and not (torch.is_grad_enabled() and r.requires_grad):
        return torch.from_numpy(np.sort(r.numpy(), axis=-1))
    return torch.sort(r, dim=-1).values


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Temporarily run torch CPU ops on ``n`` intra-op threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _environment_descriptors(
    vec: torch.Tensor, valid: torch.Tensor, k: int, cutoff: float
) -> torch.Tensor:
    """Descriptors of atoms from their selected neighbour vectors.

    Args:
        vec: ``[n, m, 3]`` neighbour vectors (``m <= k``), invalid slots arbitrary.
        valid: ``[n, m]`` bool, which slots hold a neighbour.

    Returns:
        ``[n, 2k - 1]``.
    """
    n, m, _ = vec.shape
    if m == 0:
        return vec.new_zeros((n, 2 * k - 1))
    # padded slots: distinct dummy points on a circle of radius 3 r_c (w = 0 there, the norm
    # is smooth, and every off-diagonal distance stays > 0, so no clamping is needed)
    angle = torch.arange(m, dtype=vec.dtype, device=vec.device) * (2 * math.pi / m)
    dummy = torch.stack([angle.cos(), angle.sin(), torch.zeros_like(angle)], dim=1) * (3 * cutoff)
    vec = torch.where(valid[..., None], vec, dummy)
    sq = sq_norm3(vec, dim=-1)  # [n, m]
    r = sq.sqrt()
    rr = r + _EPS_X1
    z = rr.clamp(max=cutoff) / cutoff
    x1 = (1 - z * z) ** 2 / rr  # zero at the dummy slots (rr > cutoff there)
    x1 = _sorted_rows(x1).flip(-1)  # descending: nearest neighbour first
    if k == 1 or m == 1:
        x2 = x1.new_zeros((n, k - 1))
        return torch.cat([x1, x1.new_zeros((n, k - m)), x2], dim=1)

    s = 1 - (r.clamp(max=cutoff) / cutoff) ** 2  # sqrt(w), zero at the dummy slots
    if vec.dtype == torch.float64:
        # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b as one batched matmul of augmented rows
        # [a, |a|^2, 1] . [-2b, 1, |b|^2]: ~1e-15 relative in float64
        if vec.requires_grad and torch.is_grad_enabled():
            one = torch.ones_like(sq)[..., None]
            lhs = torch.cat([vec, sq[..., None], one], dim=-1)
            rhs = torch.cat([-2 * vec, one, sq[..., None]], dim=-1).transpose(1, 2)
        else:  # written in place: fewer passes
            lhs = vec.new_empty((n, m, 5))
            lhs[..., :3] = vec
            lhs[..., 3] = sq
            lhs[..., 4] = 1.0
            rhs = vec.new_empty((n, 5, m))
            torch.mul(vec.transpose(1, 2), -2.0, out=rhs[:, :3])
            rhs[:, 3] = 1.0
            rhs[:, 4] = sq
        # a contiguous right operand: bmm with a transposed view is ~4x slower on CPU
        d2 = torch.bmm(lhs, rhs.contiguous())
    else:
        # float32: direct differences (no cancellation, immune to TF32 matmul settings)
        diff = vec[:, :, None, :] - vec[:, None, :, :]
        d2 = (diff * diff).sum(dim=-1)
    if torch.is_grad_enabled() and vec.requires_grad:
        # the diagonal has d2 ~ 0: the clamp keeps sqrt and its gradient finite, the mask
        # zeroes it
        offdiag = 1.0 - torch.eye(m, dtype=vec.dtype, device=vec.device)
        R = (s[:, :, None] * s[:, None, :]) * offdiag / (d2.clamp_min(1e-30).sqrt() + _EPS_X2)
    else:  # the hot path of screening and entropy: fewer passes, in place
        # the diagonal may be NaN or inf (d2 ~ -0 or 0): overwritten below. No epsilon on
        # r_ij here: distinct neighbours are never closer than the coincidence tolerance,
        # and 1e-15 on r ~ 2.5 Å is below the rounding of the result anyway
        # row i of R is s_i * (s_j / r_ij) with s_i >= 0: sort T_ij = s_j / r_ij and weight
        # the sorted rows by s_i in one batched product. rsqrt is ~2x faster than sqrt (and
        # a product replaces the division); the diagonal's NaN/inf is overwritten
        T = d2.rsqrt_().mul_(s[:, None, :])
        T.diagonal(dim1=1, dim2=2).zero_()
        x2 = torch.bmm(s[:, None, :], _sorted_rows(T)).squeeze(1).flip(-1) / k
        R = None
    # (q+1)-th smallest of each row summed over rows; rows/columns beyond m are all zero,
    # so the largest m values of each full k-row are those of the m-row
    if R is not None:
        x2 = _sorted_rows(R).sum(dim=1).flip(-1) / k  # [n, m], largest first
    w2 = min(m, k - 1)
    parts = [x1]
    if m < k:
        parts.append(x1.new_zeros((n, k - m)))
    parts.append(x2[:, :w2])
    if w2 < k - 1:
        parts.append(x1.new_zeros((n, k - 1 - w2)))
    return torch.cat(parts, dim=1)


def _descriptors_from_pairs(
    positions: torch.Tensor,
    cell: torch.Tensor,
    system_idx: torch.Tensor,
    pairs: NeighborPairs,
    k: int,
    cutoff: float,
    budget: int | str | None,
) -> torch.Tensor:
    """Descriptors of every atom given all pairs within the cutoff (sorted by centre)."""
    n_atoms = positions.shape[0]
    device = positions.device
    need_grad = torch.is_grad_enabled() and (positions.requires_grad or cell.requires_grad)
    counts = torch.bincount(pairs.center, minlength=n_atoms)
    bounds = torch.cumsum(counts, 0)
    first = bounds - counts
    c_max = int(counts.max()) if pairs.n_pairs else 0
    m = min(k, c_max)
    # memory per atom: candidate arrays (c slots) + ~10 m x m temporaries
    per_atom = 8 * (c_max * 8 + m * m * 10) + 64
    chunk = max(1, min(n_atoms, memory_budget(device, budget) // per_atom))
    if device.type == "cpu":
        chunk = min(chunk, _CPU_CHUNK)  # cache-sized blocks are faster than big ones on CPU
    # chunk boundaries and their widest candidate list, in one host transfer
    starts = list(range(0, n_atoms, chunk))
    ends = [min(n_atoms, a0 + chunk) for a0 in starts]
    bounds_h = torch.cat([bounds.new_zeros(1), bounds]).cpu().numpy()
    counts_h = counts.cpu().numpy()
    widths = np.maximum.reduceat(counts_h, starts) if n_atoms else np.zeros(0, dtype=np.int64)

    def one_chunk(c: int) -> torch.Tensor:
        a0, a1, width = starts[c], ends[c], int(widths[c])
        p0, p1 = int(bounds_h[a0]), int(bounds_h[a1])
        if width == 0:
            return positions.new_zeros((a1 - a0, 2 * k - 1))
        with torch.no_grad():
            center = pairs.center[p0:p1]
            vec = pairs.vector_at(slice(p0, p1))
            row = center - a0
            slot = torch.arange(p1 - p0, device=device) - (first[center] - p0)
            keys = torch.full((a1 - a0, width), _EMPTY_KEY, dtype=torch.int64, device=device)
            # every pair is within the cutoff: the level needs no out-of-range guard
            level = d2_levels(sq_norm3(vec, dim=1), cutoff).to(torch.int64)
            keys[row, slot] = (level << 33) | component_keys(vec, cutoff)
            mk = min(k, width)
            top = torch.topk(keys, mk, dim=1, largest=False, sorted=False)
            valid = top.values != _EMPTY_KEY
            pick = (first[a0:a1, None] + top.indices).clamp_max(p1 - 1)  # global pair ids
        if need_grad:
            sel_vec = pair_vectors(positions, cell, system_idx, pairs.select(pick.reshape(-1)))
            sel_vec = sel_vec.reshape(a1 - a0, mk, 3)
        else:
            sel_vec = pairs.vector_at(pick)
        return _environment_descriptors(sel_vec, valid, k, cutoff)

    if need_grad:
        return torch.cat([one_chunk(c) for c in range(len(starts))], dim=0)
    out = positions.new_empty((n_atoms, 2 * k - 1))

    def fill(c: int) -> None:
        out[starts[c] : ends[c]] = one_chunk(c)

    _run_chunks(fill, len(starts), device)
    return out


def _run_chunks(fill: Callable[[int], None], n_chunks: int, device: torch.device) -> None:
    """Call ``fill(c)`` for every chunk; on CPU, chunk-parallel over the torch thread count."""
    if device.type == "cpu" and torch.get_num_threads() > 1 and n_chunks > 1:
        # every worker runs whole chunks single-threaded (torch ops and NumPy sorts release
        # the GIL): beats intra-op threading on these cache-sized blocks
        pool = _pool()  # sized from the thread count: before it is lowered below
        with _torch_threads(1):
            list(pool.map(fill, range(n_chunks)))
    else:
        for c in range(n_chunks):
            fill(c)


def _grid_descriptors(
    positions: torch.Tensor,
    cell: torch.Tensor,
    grid: Grid,
    k: int,
    cutoff: float,
    budget: int | str | None,
    system: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Descriptors of the atoms of one structure binned in ``grid`` (fused search, see
    :mod:`quests_torch.cellgrid`).

    Args:
        positions: ``[n, 3]`` the structure's positions; cell: ``[3, 3]``.
        system: the structure's index, for error messages.
        out: ``[n, 2k - 1]`` where to write them (no autograd).
    """
    n = positions.shape[0]
    device = positions.device
    need_grad = torch.is_grad_enabled() and (positions.requires_grad or cell.requires_grad)
    P = grid.occupancy
    m = min(k, 27 * P)
    # memory per centre bin: the candidate block (coordinates, keys, distances) and the
    # m x m temporaries of its atoms
    per_bin = 8 * P * (27 * P * 8 + m * m * 10) + 256
    bins_per = max(1, memory_budget(device, budget) // per_bin)
    if device.type == "cpu":
        # selection blocks of ~2,000 atoms (fewer, larger ops: less interpreter time, which
        # the GIL serialises between workers); descriptor blocks of _CPU_CHUNK atoms (cache)
        bins_per = min(bins_per, max(1, _CPU_SELECT_ROWS // P))
    n_centers = grid.centers.numel()
    chunks = [slice(c0, min(n_centers, c0 + bins_per)) for c0 in range(0, n_centers, bins_per)]

    def check(sel: Selection, vec: torch.Tensor) -> None:
        # level 0: closer than ~1.5e-4 Å; the exact test is on the vectors (rare: host sync ok)
        if bool((sel.level == 0).any()):
            d2 = torch.where(sel.valid, (vec.detach() * vec.detach()).sum(dim=2), math.inf)
            if float(d2.min()) < COINCIDENT_TOL**2:
                r, j = (int(v) for v in torch.nonzero(d2 == d2.min())[0])
                i = int(sel.center[r])
                nb, _ = sel.pairs(grid)
                _raise_coincident(system, i, int(nb[r, j]), math.sqrt(float(d2[r, j])))

    if need_grad:
        rows, descs = [], []
        for ch in chunks:
            with torch.no_grad():
                sel = select_block(grid, ch, k, cutoff)
                nb, shift = sel.pairs(grid)
            # shift . cell elementwise: a matmul's backward would run outside full_precision
            image = (shift.to(cell.dtype)[..., :, None] * cell).sum(-2)
            vec = positions[nb] - positions[sel.center][:, None, :] + image
            check(sel, vec)
            rows.append(sel.center)
            descs.append(_environment_descriptors(vec, sel.valid, k, cutoff))
        order = torch.cat(rows)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n, device=device)
        return torch.cat(descs)[inverse]

    if out is None:
        out = positions.new_empty((n, 2 * k - 1))

    sub = _CPU_CHUNK if device.type == "cpu" else n

    def fill(c: int) -> None:
        sel = select_block(grid, chunks[c], k, cutoff)
        vec = sel.vectors().to(positions.dtype)
        check(sel, vec)
        for r0 in range(0, vec.shape[0], sub):
            rows = slice(r0, r0 + sub)
            out[sel.center[rows]] = _environment_descriptors(vec[rows], sel.valid[rows], k, cutoff)

    with torch.no_grad():
        _run_chunks(fill, len(chunks), device)
    return out


def _sorted_species(species: Sequence[int]) -> list[int]:
    """Unique atomic numbers ordered by chemical symbol (upstream's column order)."""
    from ase.data import chemical_symbols

    unique = {int(s) for s in species}
    for z in unique:
        if not 0 < z < len(chemical_symbols):
            raise ValueError(f"`species` contains an invalid atomic number {z}")
    return sorted(unique, key=lambda z: chemical_symbols[z])


def species_numbers(species: Sequence[str | int] | None) -> list[int] | None:
    """Atomic numbers ordered by chemical symbol (the multicomponent column order), or None."""
    if species is None:
        return None
    from ase.data import atomic_numbers

    if isinstance(species, (str, int)):
        species = [species]
    out = []
    for s in species:
        if isinstance(s, str):
            if s not in atomic_numbers:
                raise ValueError(f"`species` contains an unknown element {s!r}")
            out.append(atomic_numbers[s])
        elif isinstance(s, numbers.Integral) and not isinstance(s, bool):
            out.append(int(s))
        else:
            raise TypeError(f"`species` must hold symbols or atomic numbers, got {s!r}")
    if not out:
        raise ValueError("`species` is empty")
    return _sorted_species(out)


def descriptors_from_tensors(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    system_idx: torch.Tensor | None = None,
    *,
    k: int = DEFAULT_K,
    cutoff: float = DEFAULT_CUTOFF,
    numbers: torch.Tensor | None = None,
    species: Sequence[int] | None = None,
    budget: int | str | None = None,
    search: str = "auto",
) -> torch.Tensor:
    """QUESTS descriptors of every atom of a batch of structures, on the inputs' device.

    Args:
        positions: ``[n_atoms, 3]`` Cartesian positions (Å), float32 or float64.
        cell: ``[n_systems, 3, 3]`` (or ``[3, 3]`` for one structure) lattice vectors as rows;
            zero rows allowed along non-periodic directions.
        pbc: ``[n_systems, 3]`` (or ``[3]``) bool periodicity per direction.
        system_idx: ``[n_atoms]`` sorted structure index per atom (default: all zero).
        k: number of nearest neighbours (default 32), at most :data:`MAX_K` (1024); refused
            (ValueError) when the ``[n_atoms, width]`` result would not fit in the memory
            available on the device (free CUDA memory or available RAM).
        cutoff: cutoff radius in Å (default 5.0).
        numbers: ``[n_atoms]`` atomic numbers; with ``species`` or when several elements are
            present and ``species`` is given, selects the multicomponent descriptor.
        species: atomic numbers for the multicomponent descriptor. With more than one species
            the output is ``[X_all, X_s1, X_s2, ...]``, species ordered by chemical symbol (as
            upstream quests does), each ``X_s`` computed on the sub-structure of species ``s``
            only (zero rows for atoms of other species). One species: the plain descriptor.
        budget: memory budget for one chunk (bytes or "512M"); default automatic.
        search: neighbour search. ``"auto"``: a batched dense search for small structures,
            the fused cell grid (:mod:`quests_torch.cellgrid`) for larger ones where it
            applies, vesin-torch cell lists otherwise; ``"grid"``: the cell grid wherever it
            applies; ``"pairs"``: never the grid (dense or vesin-torch pair lists). All give
            the same descriptors (to ~1e-15).

    Returns:
        ``[n_atoms, 2k - 1]`` (``[n_atoms, (S + 1)(2k - 1)]`` multicomponent), dtype and device
        of ``positions``; differentiable with respect to ``positions`` and ``cell``.
    """
    _check_params(k, cutoff)
    cutoff = float(cutoff)
    if isinstance(cell, torch.Tensor) and cell.ndim == 2:
        cell = cell[None]
    if isinstance(pbc, torch.Tensor) and pbc.ndim == 1:
        pbc = pbc[None]
    if system_idx is None:
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"`positions` must be a torch.Tensor, got {type(positions).__name__}")
        # shape[:1]: a positions tensor of the wrong rank reaches validate_batch's message
        system_idx = torch.zeros(positions.shape[:1], dtype=torch.int64, device=positions.device)
    if isinstance(pbc, torch.Tensor) and pbc.dtype != torch.bool:
        pbc = pbc.to(torch.bool)
    validate_batch(positions, cell, pbc, system_idx)
    system_idx = system_idx.to(torch.int64)
    threshold = _grid_threshold(search)

    spec: list[int] = []
    if species is not None:
        if numbers is None:
            raise ValueError(
                "`numbers` is required for the multicomponent descriptor (`species` given)"
            )
        if numbers.shape != system_idx.shape:
            raise ValueError(
                f"`numbers` must have shape [n_atoms] = ({positions.shape[0]},), "
                f"got {tuple(numbers.shape)}"
            )
        spec = _sorted_species(species)
        numbers = numbers.to(device=positions.device, dtype=torch.int64)
        known = torch.tensor(spec, device=numbers.device)
        missing = torch.unique(numbers[~torch.isin(numbers, known)])
        if missing.numel():
            raise ValueError(
                f"`species` {spec} lacks atomic numbers {missing.tolist()} present in the data"
            )

    _check_output_memory(
        positions.shape[0], descriptor_width(k, len(spec)), k, positions.dtype, positions.device
    )
    # float32 matmuls (pair search, wrapping, distance blocks) in IEEE precision whatever the
    # caller's TF32/bf16 flags: a rounded distance can swap neighbours at the cutoff
    with full_precision():
        grids = _plan_grids(positions, cell, pbc, system_idx, cutoff, threshold)
        out = None
        if sum(a1 - a0 for _, a0, a1, _ in grids) < positions.shape[0]:
            # the structures not on the grid: pair lists (rows of the others stay zero)
            skip = torch.zeros(cell.shape[0], dtype=torch.bool, device=positions.device)
            skip[[s for s, _, _, _ in grids]] = True
            out = _pair_list_descriptors(
                positions, cell, pbc, system_idx, k, cutoff, budget, numbers, spec, skip
            )
        if not grids:
            return out
        need_grad = torch.is_grad_enabled() and (positions.requires_grad or cell.requires_grad)
        width = (2 * k - 1) * (len(spec) + 1 if len(spec) > 1 else 1)
        if out is None and not need_grad:
            out = positions.new_empty((positions.shape[0], width))
        pieces, prev = [], 0  # with autograd: row blocks concatenated, out of place
        for s, a0, a1, grid in grids:
            rows = _gridded_structure(
                positions, cell, pbc, numbers, spec, s, a0, a1, grid, k, cutoff, budget,
                threshold, out=None if need_grad else out[a0:a1],
            )  # fmt: skip
            if need_grad:
                pieces += [out[prev:a0], rows] if out is not None else [rows]
                prev = a1
        if not need_grad:
            return out
        if out is not None:
            pieces.append(out[prev:])
        return torch.cat(pieces, dim=0)


def _pair_list_descriptors(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    system_idx: torch.Tensor,
    k: int,
    cutoff: float,
    budget: int | str | None,
    numbers: torch.Tensor | None,
    spec: list[int],
    skip: torch.Tensor,
) -> torch.Tensor:
    """Descriptors (multicomponent blocks too) through pair lists; zero rows where ``skip``."""
    pairs = find_neighbor_pairs(positions, cell, pbc, system_idx, cutoff, budget=budget, skip=skip)
    blocks = [_descriptors_from_pairs(positions, cell, system_idx, pairs, k, cutoff, budget)]
    if len(spec) > 1:
        assert numbers is not None
        zc, zn = numbers[pairs.center], numbers[pairs.neighbor]
        for z in spec:
            sub = pairs.select((zc == z) & (zn == z))
            blocks.append(
                _descriptors_from_pairs(positions, cell, system_idx, sub, k, cutoff, budget)
            )
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


def _gridded_structure(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    numbers: torch.Tensor | None,
    spec: list[int],
    s: int,
    a0: int,
    a1: int,
    grid: Grid,
    k: int,
    cutoff: float,
    budget: int | str | None,
    threshold: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows ``a0:a1`` (structure ``s``, binned in ``grid``): the plain descriptor and, for
    several species, one block per species; written into ``out`` when given (no autograd)."""
    pos_s, cell_s = positions[a0:a1], cell[s]
    dest = None if out is None else out[:, : 2 * k - 1]
    cols = [_grid_descriptors(pos_s, cell_s, grid, k, cutoff, budget, s, dest)]
    if len(spec) > 1:
        assert numbers is not None
        for z in spec:
            mask = numbers[a0:a1] == z
            cols.append(
                _species_block(pos_s, cell_s, pbc[s], mask, k, cutoff, budget, s, threshold)
            )
    if out is None:
        return cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)
    if len(cols) > 1:
        out[:, 2 * k - 1 :] = torch.cat(cols[1:], dim=1)
    return out


def _grid_threshold(search: str) -> float:
    """Structures with more candidate pairs than this take the grid (``inf``: none)."""
    if search == "auto":
        return GRID_MIN_CANDIDATES
    if search == "grid":
        return -1
    if search == "pairs":
        return math.inf
    raise ValueError(f"`search` must be 'auto', 'grid' or 'pairs', got {search!r}")


def _plan_grids(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    system_idx: torch.Tensor,
    cutoff: float,
    threshold: float,
) -> list[tuple[int, int, int, Grid]]:
    """``(structure, first atom, end, grid)`` of the structures for the fused grid search:
    more than ``threshold`` candidate pairs and a grid that applies (see
    :func:`quests_torch.cellgrid.plan_grid`)."""
    if threshold == math.inf:
        return []
    counts = torch.bincount(system_idx, minlength=cell.shape[0])
    with torch.no_grad():
        full = complete_cell(cell.detach(), pbc)
        _check_cells(full, cell.detach(), pbc)
        big = torch.nonzero(_candidates(counts, full, pbc, cutoff) > threshold)
        big = big[:, 0].tolist()
        if not big:
            return []
        ends = torch.cumsum(counts, 0).tolist()
        counts_h = counts.tolist()
        out = []
        for s in big:
            a1 = ends[s]
            a0 = a1 - counts_h[s]
            grid = plan_grid(positions[a0:a1], full[s], pbc[s], cutoff)
            if grid is not None:
                out.append((s, a0, a1, grid))
    return out


def _candidates(
    counts: torch.Tensor, full: torch.Tensor, pbc: torch.Tensor, cutoff: float
) -> torch.Tensor:
    """Candidate pairs of a brute-force search per structure: atoms^2 x images within reach."""
    return counts * counts * (2 * _image_ranges(full, pbc, cutoff) + 1).prod(dim=1)


def _species_block(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    cutoff: float,
    budget: int | str | None,
    system: int,
    threshold: float,
) -> torch.Tensor:
    """``[n, 2k - 1]`` descriptors of one structure's sub-structure ``mask`` (one species);
    zero rows for the other atoms."""
    idx = torch.nonzero(mask)[:, 0]
    out = positions.new_zeros((positions.shape[0], 2 * k - 1))
    if idx.numel() == 0:
        return out
    sub = positions[idx]
    grid = None
    with torch.no_grad():
        full = complete_cell(cell.detach()[None], pbc[None])
        n = torch.tensor([idx.numel()], device=positions.device)
        if int(_candidates(n, full, pbc[None], cutoff)[0]) > threshold:
            grid = plan_grid(sub, full[0], pbc, cutoff)
    if grid is not None:
        desc = _grid_descriptors(sub, cell, grid, k, cutoff, budget, system)
    else:
        zeros = torch.zeros(idx.numel(), dtype=torch.int64, device=positions.device)
        pairs = find_neighbor_pairs(sub, cell[None], pbc[None], zeros, cutoff, budget=budget)
        desc = _descriptors_from_pairs(sub, cell[None], zeros, pairs, k, cutoff, budget)
    return out.index_copy(0, idx, desc)


def get_descriptors(
    structures: object,
    k: int = DEFAULT_K,
    cutoff: float = DEFAULT_CUTOFF,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = "cpu",
    multicomponent: bool = False,
    species: Sequence[str | int] | None = None,
    budget: int | str | None = None,
    search: str = "auto",
) -> torch.Tensor:
    """QUESTS descriptors of every atom of one ``ase.Atoms``, a list of them, or an AtomsBatch.

    Args:
        structures: ``ase.Atoms``, a list of ``ase.Atoms``, or an :class:`AtomsBatch`.
        k: number of nearest neighbours (default 32, at most :data:`MAX_K` = 1024; see
            :func:`descriptors_from_tensors` for the memory check).
        cutoff: cutoff radius in Å (default 5.0).
        dtype: ``torch.float64`` (default) or ``torch.float32``.
        device: where to compute (``"auto"``: CUDA when available).
        multicomponent: append one descriptor block per species (SPEC section 1).
        species: element symbols or atomic numbers for the multicomponent blocks (default:
            every element present); blocks are ordered by chemical symbol.
        budget: memory budget for one chunk (bytes or "512M").
        search: neighbour search, ``"auto"``, ``"grid"`` or ``"pairs"`` (see
            :func:`descriptors_from_tensors`).

    Returns:
        ``[n_atoms, 2k - 1]`` tensor (multicomponent: ``[n_atoms, (S + 1)(2k - 1)]`` when the
        data has ``S > 1`` species) on ``device``, atoms in input order.
    """
    _check_params(k, cutoff)  # before the structures are converted
    dev = resolve_device(device)
    if isinstance(structures, AtomsBatch):
        batch = structures.to(dev, dtype)
    else:
        batch = AtomsBatch.from_ase(structures, device=dev, dtype=dtype)
    spec: list[int] | None = species_numbers(species)
    if multicomponent and spec is None:
        spec = sorted(set(torch.unique(batch.numbers).tolist()))
    return descriptors_from_tensors(
        batch.positions,
        batch.cell,
        batch.pbc,
        batch.system_idx,
        k=k,
        cutoff=cutoff,
        numbers=batch.numbers,
        species=spec,
        budget=budget,
        search=search,
    )
