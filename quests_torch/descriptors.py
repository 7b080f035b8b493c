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

The grid path is batched: every gridded structure of a batch is binned at once (bins keyed
by structure and bin, structures grouped by fullest bin), so a batch of many mid-size cells
costs a fixed number of tensor ops and host syncs, not a number per structure.

**float32-only mode** (MPS, CUDA cards without full-rate float64, ``QUESTS_TORCH_FLOAT64=0``;
:func:`quests_torch._precision.float64_enabled`): positions and cells are cast to float32
(ASE structures after centring each on its mean in float64 on the host), the cell grid bins
and selects in float32 (selection keys on float32 bits), the component keys are packed as
integers, and the pair list uses the dense search instead of vesin-torch (float64 inside) up
to :data:`quests_torch.neighbors.DENSE_MAX_CANDIDATES_FLOAT32` candidates. Measured against
float64 (max error over max |descriptor|): rattled FCC Cu 5e-7 (32 atoms), 9.7e-7 (256
atoms, grid and pair list), ethanol 6.8e-8, also 1,000 Å from the origin (3.6e-5 without
the centring).

Everything here is differentiable with respect to positions and cell; atoms are processed in
chunks sized from a memory budget. A chunk that raises ``torch.OutOfMemoryError`` is redone in
halves (results do not depend on the chunk size) down to :data:`OOM_FLOOR` bytes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch

from ._memory import available_memory, memory_budget
from ._precision import compute_dtype, float64_enabled, full_precision
from .cellgrid import (
    Grid,
    Selection,
    component_keys,
    d2_levels,
    plan_grids,
    select_block,
    sq_norm3,
)
from .checks import DEFAULT_CUTOFF, DEFAULT_K, MAX_K, check_cutoff, check_k
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
from .structures import AtomsBatch, centred_copies, resolve_device, validate_batch

__all__ = [
    "DEFAULT_CUTOFF",
    "DEFAULT_K",
    "MAX_K",
    "descriptor_width",
    "descriptors_from_tensors",
    "get_descriptors",
]

_EPS_X1 = 1e-16
_EPS_X2 = 1e-15
_EMPTY_KEY = torch.iinfo(torch.int64).max
_CPU_CHUNK = 512
_CPU_SELECT_ROWS = 4096
#: structures with more candidate pairs than this (atoms^2 x periodic images within reach) use
#: the fused cell-grid search where it applies; smaller ones the batched dense pair search
GRID_MIN_CANDIDATES = DENSE_MAX_CANDIDATES
#: after out-of-memory errors chunk budgets are halved down to this many bytes, then it gives up
OOM_FLOOR = 1 << 20

T = TypeVar("T")


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
    check_k(k)
    check_cutoff(cutoff)


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
    size = max(1, min(n_atoms, memory_budget(device, budget) // per_atom))
    if device.type == "cpu":
        size = min(size, _CPU_CHUNK)  # cache-sized blocks are faster than big ones on CPU
    # candidate-list bounds on the host, in one transfer
    bounds_h = torch.cat([bounds.new_zeros(1), bounds]).cpu().numpy()
    counts_h = np.diff(bounds_h)

    def one_chunk(a0: int, a1: int) -> torch.Tensor:
        width = int(counts_h[a0:a1].max())
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
        return torch.cat(_run_chunks(one_chunk, n_atoms, size, per_atom, device, False), dim=0)
    out = positions.new_empty((n_atoms, 2 * k - 1))

    def fill(a0: int, a1: int) -> None:
        out[a0:a1] = one_chunk(a0, a1)

    _run_chunks(fill, n_atoms, size, per_atom, device)
    return out


def _run_chunks(
    run: Callable[[int, int], T],
    n_items: int,
    size: int,
    item_bytes: int,
    device: torch.device,
    parallel: bool = True,
) -> list[T]:
    """``run(a0, a1)`` over consecutive ranges of ``size`` items covering ``range(n_items)``;
    the results in order.

    On CPU (``parallel``) the ranges run chunk-parallel over the torch thread count. A range
    that runs out of memory is redone in halves (the CUDA cache emptied first), and the
    halved size is kept for the ranges after it; results do not depend on the chunk size.
    Below :data:`OOM_FLOOR` bytes (``size * item_bytes``) or one item the error is re-raised
    with the sizes reached.
    """
    ranges = [(a, min(n_items, a + size)) for a in range(0, n_items, size)]
    if parallel and device.type == "cpu" and torch.get_num_threads() > 1 and len(ranges) > 1:
        # every worker runs whole chunks single-threaded (torch ops and NumPy sorts release
        # the GIL): beats intra-op threading on these cache-sized blocks
        pool = _pool()  # sized from the thread count: before it is lowered below

        def attempt(r: tuple[int, int]) -> tuple[bool, T | None]:
            try:
                return True, run(*r)
            except torch.OutOfMemoryError:
                return False, None

        with _torch_threads(1):
            done = list(pool.map(attempt, ranges))
        out: list[T] = []
        for (a0, a1), (ok, res) in zip(ranges, done, strict=True):
            if ok:
                out.append(res)  # type: ignore[arg-type]
            else:  # redo it alone (the other workers' memory is free now), halving if need be
                out += _halving_chunks(run, a0, a1, a1 - a0, item_bytes, device)
        return out
    return _halving_chunks(run, 0, n_items, size, item_bytes, device)


def _halving_chunks(
    run: Callable[[int, int], T],
    a0: int,
    a1: int,
    size: int,
    item_bytes: int,
    device: torch.device,
) -> list[T]:
    """``run`` over ``a0:a1`` in ranges of ``size``, halving it after an out-of-memory error."""
    out: list[T] = []
    while a0 < a1:
        b = min(a1, a0 + size)
        failure = None
        try:
            out.append(run(a0, b))
        except torch.OutOfMemoryError as err:
            failure = str(err)  # the chunk's tensors are freed with `err` when this block ends
        if failure is None:
            a0 = b
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
        size = (b - a0) // 2
        if size < 1 or size * item_bytes < OOM_FLOOR:
            raise torch.OutOfMemoryError(
                f"descriptors ran out of memory on {device} even with chunks of {b - a0} "
                f"item(s) (~{(b - a0) * item_bytes / 2**20:.1f} MiB; halving stops below "
                f"{OOM_FLOOR / 2**20:g} MiB): free memory or pass a smaller `budget`. "
                f"Last error: {failure}"
            )
    return out


def _grid_descriptors(
    positions: torch.Tensor,
    cell: torch.Tensor,
    system_idx: torch.Tensor,
    grid: Grid,
    k: int,
    cutoff: float,
    budget: int | str | None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Descriptors of the atoms binned in ``grid`` (fused search, see
    :mod:`quests_torch.cellgrid`), whatever the number of structures in it.

    Args:
        positions: ``[n_atoms, 3]`` the batch's positions; cell: ``[n_systems, 3, 3]``;
            system_idx: ``[n_atoms]``.
        out: ``[n_atoms, 2k - 1]`` where to write the rows of the grid's atoms (no autograd).

    Returns:
        With autograd, ``(rows, descriptors)``: the grid's atoms and their ``[r, 2k - 1]``
        descriptors; otherwise None (written into ``out``).
    """
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

    def check(sel: Selection, vec: torch.Tensor) -> None:
        # level 0: closer than ~1.5e-4 Å; the exact test is on the vectors (rare: host sync ok)
        if sel.close:
            d2 = torch.where(sel.valid, (vec.detach() * vec.detach()).sum(dim=2), math.inf)
            if float(d2.min()) < COINCIDENT_TOL**2:
                r, j = (int(v) for v in torch.nonzero(d2 == d2.min())[0])
                i = int(sel.center[r])
                nb, _ = sel.pairs(grid)
                s = int(system_idx[i])
                first = int(torch.searchsorted(system_idx, system_idx[i : i + 1]))
                _raise_coincident(s, i - first, int(nb[r, j]) - first, math.sqrt(float(d2[r, j])))

    if need_grad:

        def rows(c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                sel = select_block(grid, slice(c0, c1), k, cutoff)
                nb, shift = sel.pairs(grid)
            # shift . cell elementwise: a matmul's backward would run outside full_precision
            cell_r = cell[system_idx[sel.center]]  # [r, 3, 3]
            image = (shift.to(cell.dtype)[..., :, None] * cell_r[:, None]).sum(-2)
            vec = positions[nb] - positions[sel.center][:, None, :] + image
            check(sel, vec)
            return sel.center, _environment_descriptors(vec, sel.valid, k, cutoff)

        parts = _run_chunks(rows, n_centers, bins_per, per_bin, device, parallel=False)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    assert out is not None
    sub = _CPU_CHUNK if device.type == "cpu" else positions.shape[0]

    def fill(c0: int, c1: int) -> None:
        sel = select_block(grid, slice(c0, c1), k, cutoff)
        vec = sel.vectors().to(positions.dtype)
        check(sel, vec)
        for r0 in range(0, vec.shape[0], sub):
            rows = slice(r0, r0 + sub)
            out[sel.center[rows]] = _environment_descriptors(vec[rows], sel.valid[rows], k, cutoff)

    with torch.no_grad():
        _run_chunks(fill, n_centers, bins_per, per_bin, device)
    return None


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
    if compute_dtype(positions.device, positions.dtype) != positions.dtype:  # float32-only
        positions, cell = positions.float(), cell.float()
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
        return _routed_descriptors(
            positions, cell, pbc, system_idx, k, cutoff, budget, threshold, numbers, spec
        )


def _routed_descriptors(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    system_idx: torch.Tensor,
    k: int,
    cutoff: float,
    budget: int | str | None,
    threshold: float,
    numbers: torch.Tensor | None,
    spec: list[int],
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Descriptors (multicomponent blocks too) of every atom: the batched cell grid for the
    structures it suits, pair lists for the others; zero rows for structures in ``skip``.

    The species blocks of gridded structures are the same routing applied to the sub-batch
    of each species' atoms (one call per species, not per structure).
    """
    n = positions.shape[0]
    device = positions.device
    need_grad = torch.is_grad_enabled() and (positions.requires_grad or cell.requires_grad)
    base = 2 * k - 1
    width = base * (len(spec) + 1 if len(spec) > 1 else 1)
    grids, pending = _plan_grids(positions, cell, pbc, system_idx, cutoff, threshold, skip)
    out = None
    if pending is None or pending.size:
        # the structures not on the grid: pair lists (rows of the others stay zero)
        if pending is None:
            rest = skip
        else:
            rest = torch.ones(cell.shape[0], dtype=torch.bool, device=device)
            rest[torch.from_numpy(pending).to(device)] = False
        out = _pair_list_descriptors(
            positions, cell, pbc, system_idx, k, cutoff, budget, numbers, spec, rest
        )
    if not grids:
        return out if out is not None else positions.new_zeros((n, width))
    if out is None:  # every row is on a grid; species blocks have zero rows
        if need_grad or len(spec) > 1:
            out = positions.new_zeros((n, width))
        else:
            out = positions.new_empty((n, width))
    pieces: list[tuple[torch.Tensor, int, torch.Tensor]] = []  # (rows, first column, values)
    for grid in grids:
        got = _grid_descriptors(
            positions, cell, system_idx, grid, k, cutoff, budget,
            out=None if need_grad else out[:, :base],
        )  # fmt: skip
        if got is not None:
            pieces.append((got[0], 0, got[1]))
    if len(spec) > 1:
        assert numbers is not None
        in_grid = torch.zeros(cell.shape[0], dtype=torch.bool, device=device)
        in_grid[[s for g in grids for s in g.structures]] = True
        for j, z in enumerate(spec):
            idx = torch.nonzero((numbers == z) & in_grid[system_idx])[:, 0]
            if idx.numel() == 0:
                continue
            sub = _routed_descriptors(
                positions[idx], cell, pbc, system_idx[idx], k, cutoff, budget, threshold,
                None, [], skip=~in_grid,
            )  # fmt: skip
            if need_grad:
                pieces.append((idx, base * (j + 1), sub))
            else:
                out[idx, base * (j + 1) : base * (j + 2)] = sub
    for rows, col, values in pieces:
        cols = torch.arange(col, col + values.shape[1], device=device)
        out = out.index_put((rows[:, None], cols[None, :]), values)
    return out


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
    skip: torch.Tensor | None = None,
) -> tuple[list[Grid], np.ndarray | None]:
    """The cell grids (see :func:`quests_torch.cellgrid.plan_grids`) of the structures with
    more than ``threshold`` candidate pairs where a grid applies, all structures at once.

    Returns:
        ``(grids, pending)``: the grids, and the structures (host, ascending) left for the
        pair list: those with atoms, not in ``skip`` and on no grid (None: all but ``skip``,
        when no grid is tried).
    """
    if threshold == math.inf:
        return [], None
    with torch.no_grad():
        full = complete_cell(cell.detach(), pbc)
        _check_cells(full, cell.detach(), pbc)
        n_sys = cell.shape[0]
        counts = torch.zeros(n_sys, dtype=torch.int64, device=positions.device)
        counts.index_add_(0, system_idx, torch.ones_like(system_idx))
        big = (_candidates(counts, full, pbc, cutoff) > threshold) & (counts > 0)
        if skip is None:
            skip = torch.zeros_like(big)
        counts_h, big_h, skip_h = torch.stack([counts, big & ~skip, skip]).cpu().numpy()
        grids = plan_grids(positions, full, pbc, system_idx, cutoff, np.flatnonzero(big_h),
                           counts_h)  # fmt: skip
    left = (counts_h > 0) & (skip_h == 0)
    for g in grids:
        left[g.structures] = False
    return grids, np.flatnonzero(left)


def _candidates(
    counts: torch.Tensor, full: torch.Tensor, pbc: torch.Tensor, cutoff: float
) -> torch.Tensor:
    """Candidate pairs of a brute-force search per structure: atoms^2 x images within reach."""
    return counts * counts * (2 * _image_ranges(full, pbc, cutoff) + 1).prod(dim=1)


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
        dtype: ``torch.float64`` (default) or ``torch.float32``; float32 wherever float64 is
            off (:func:`quests_torch._precision.float64_enabled`: MPS, slow-float64 CUDA cards,
            ``QUESTS_TORCH_FLOAT64=0``).
        device: where to compute (``"auto"``: CUDA, else MPS, else CPU).
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
    dtype = compute_dtype(dev, dtype)
    if isinstance(structures, AtomsBatch):
        batch = structures.to(dev, dtype)
    else:
        if not float64_enabled(dev):
            structures = centred_copies(structures)
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
