r"""The QUESTS descriptor of atomic environments (the QUESTS paper), as batched tensor ops.

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
only matters for exact ties; every search strategy applies the same rule.

**Neighbours.** Each atom's k nearest neighbour vectors come from
:func:`quests_torch.neighbors.find_k_nearest` (a batched dense pair search, the cell grid or
vesin-torch, chosen there per structure, with its tie-breaking rule); this module only turns
them into descriptors, block by block, as the neighbour search hands them out.

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
from .checks import DEFAULT_CUTOFF, DEFAULT_K, MAX_K, check_cutoff, check_k
from .neighbors import KNearest, NeighborCache, check_search, find_k_nearest
from .neighbors.grid import sq_norm3
from .neighbors.knearest import GridSource, PairSource
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
#: CPU descriptor blocks: this many atoms (cache-sized blocks are faster than big ones on CPU)
_CPU_CHUNK = 512
#: descriptor arrays up to this many bytes skip the available-memory check on an accelerator
#: (``mem_get_info`` waits for the device: a sync in every MD step); on the CPU the check
#: reads /proc/meminfo (~10 us) and always runs
_SMALL_OUTPUT = 64 << 20
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
    if need <= _SMALL_OUTPUT and torch.device(device).type != "cpu":
        return  # an MD step's descriptors on a GPU: no device query
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


def _pair_sq_distances(vec: torch.Tensor) -> torch.Tensor:
    """``[n, m, m]`` squared distances ``|v_j - v_l|^2`` between the rows of ``vec [n, m, 3]``
    from direct differences, component by component (in place without autograd)."""
    grad = torch.is_grad_enabled() and vec.requires_grad
    d2 = None
    for x in vec.permute(2, 0, 1).contiguous():  # three contiguous [n, m] planes
        d = x[:, :, None] - x[:, None, :]
        if d2 is None:
            d2 = d * d if grad else d.mul_(d)
        else:
            d2 = d2 + d * d if grad else d2.addcmul_(d, d)
    return d2


_DUMMIES: dict[tuple, torch.Tensor] = {}


def _dummy_slots(m: int, cutoff: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[m, 3]`` where padded neighbour slots go: distinct points on a circle of radius
    3 r_c (w = 0 there, the norm is smooth, and every off-diagonal distance stays > 0, so no
    clamping is needed). Made once per shape, dtype and device (a few ops less per MD step)."""
    key = (m, cutoff, dtype, device)
    dummy = _DUMMIES.get(key)
    if dummy is None:
        if len(_DUMMIES) > 64:
            _DUMMIES.clear()
        angle = torch.arange(m, dtype=dtype, device=device) * (2 * math.pi / m)
        dummy = torch.stack([angle.cos(), angle.sin(), torch.zeros_like(angle)], 1) * (3 * cutoff)
        _DUMMIES[key] = dummy
    return dummy


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
    vec = torch.where(valid[..., None], vec, _dummy_slots(m, cutoff, vec.dtype, vec.device))
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
        # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b, the product as one batched matmul added to the
        # norms (~1e-15 relative in float64; 5 ops, as fast as augmented rows up to the CPU
        # blocks of 512 atoms). A contiguous right operand: bmm with a transposed view is ~4x
        # slower on CPU
        d2 = torch.baddbmm(
            sq[:, :, None] + sq[:, None, :], vec, vec.transpose(1, 2).contiguous(), alpha=-2.0
        )
    else:
        # float32: direct differences (no cancellation, immune to TF32 matmul settings), one
        # component at a time on [n, m, m] planes: ~6x faster than differences of [n, m, m, 3]
        # summed over the size-3 last dimension
        d2 = _pair_sq_distances(vec)
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


def _neighbor_descriptors(
    near: KNearest,
    positions: torch.Tensor,
    k: int,
    cutoff: float,
    budget: int | str | None,
    n_parts: int,
    need_grad: bool,
) -> torch.Tensor:
    """Descriptors (multicomponent blocks too: part ``j`` fills columns ``j (2k - 1)`` on) of
    every atom from its k nearest neighbours; zero rows for atoms no source covers.

    Within a part, later sources overwrite earlier ones' rows (see :class:`KNearest`).
    """
    n = positions.shape[0]
    device = positions.device
    base = 2 * k - 1
    width = base * n_parts
    has_pairs = any(isinstance(src, PairSource) for part in near.sources for src in part)
    if need_grad or n_parts > 1 or has_pairs or not near.sources[0]:
        out = positions.new_zeros((n, width))
    else:  # every row is on a grid
        out = positions.new_empty((n, width))
    pieces: list[tuple[torch.Tensor | slice, int, torch.Tensor]] = []  # (rows, column, values)
    for j, part in enumerate(near.sources):
        for src in part:
            if need_grad:
                got = _source_descriptors(src, k, cutoff, budget, None)
                if got is not None:
                    pieces.append((got[0], base * j, got[1]))
            else:
                _source_descriptors(src, k, cutoff, budget, out[:, base * j : base * (j + 1)])
    for rows, col, values in pieces:
        cols = torch.arange(col, col + values.shape[1], device=device)
        if isinstance(rows, slice):
            rows = torch.arange(n, device=device)[rows]
        out = out.index_put((rows[:, None], cols[None, :]), values)
    return out


def _source_descriptors(
    src: PairSource | GridSource,
    k: int,
    cutoff: float,
    budget: int | str | None,
    out: torch.Tensor | None,
) -> tuple[torch.Tensor | slice, torch.Tensor] | None:
    """Descriptors of the atoms of one neighbour source, in blocks sized from the budget.

    Args:
        out: ``[n_atoms, 2k - 1]`` where to write the rows (no autograd), or None.

    Returns:
        With ``out`` None, ``(rows, descriptors)``: the source's atoms (batch indices) and
        their ``[r, 2k - 1]`` descriptors; otherwise None (written into ``out``).
    """
    device = src.device
    m = src.width
    # memory per item: the search's candidate arrays and ~10 m x m temporaries per atom
    per_item = src.item_bytes + src.rows_per_item * 8 * m * m * 10
    size = max(1, min(max(1, src.n_items), memory_budget(device, budget) // per_item))
    if device.type == "cpu":
        size = min(size, max(1, src.cpu_rows // src.rows_per_item))
        per_thread = -(-src.n_items // torch.get_num_threads())
        if out is not None and src.per_thread and per_thread < size:
            # one MD cell in one grid block: a block per thread (chunk-parallel, each on one
            # intra-op thread; intra-op threads on a busy machine made it 20x slower)
            size = per_thread
    if src.n_items == 0:
        return None

    if out is None:

        def rows(a0: int, a1: int) -> tuple[torch.Tensor | slice, torch.Tensor]:
            blk = src.block(a0, a1)
            return blk.rows, _environment_descriptors(blk.vectors, blk.valid, k, cutoff)

        parts = _run_chunks(rows, src.n_items, size, per_item, device, parallel=False)
        values = torch.cat([p[1] for p in parts])
        if isinstance(parts[0][0], slice):  # consecutive atom ranges
            got: torch.Tensor | slice = slice(parts[0][0].start, parts[-1][0].stop)
        else:
            got = torch.cat([p[0] for p in parts])
        return src.global_rows(got), values

    sub = _CPU_CHUNK if device.type == "cpu" else out.shape[0]

    def fill(a0: int, a1: int) -> None:
        blk = src.block(a0, a1)
        rows = src.global_rows(blk.rows)
        if isinstance(rows, slice) and blk.vectors.shape[0] <= sub:
            out[rows] = _environment_descriptors(blk.vectors, blk.valid, k, cutoff)
            return
        if isinstance(rows, slice):
            rows = torch.arange(rows.start, rows.stop, device=device)
        for r0 in range(0, blk.vectors.shape[0], sub):
            r = slice(r0, r0 + sub)
            out[rows[r]] = _environment_descriptors(blk.vectors[r], blk.valid[r], k, cutoff)

    with torch.no_grad():
        _run_chunks(fill, src.n_items, size, per_item, device)
    return None


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
        # grad and inference modes are thread-local: the workers take the caller's (an
        # inference tensor may only be written to in inference mode)
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def attempt(r: tuple[int, int]) -> tuple[bool, T | None]:
            try:
                with torch.inference_mode(inference), torch.set_grad_enabled(grad):
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


def _check_species(
    numbers: torch.Tensor | None, species: Sequence[int], positions: torch.Tensor
) -> tuple[torch.Tensor, list[int]]:
    """``numbers`` as int64 on the positions' device and the species sorted by chemical
    symbol; ValueError when ``numbers`` is missing or of the wrong shape or holds an element
    ``species`` lacks."""
    if numbers is None:
        raise ValueError(
            "`numbers` is required for the multicomponent descriptor (`species` given)"
        )
    if numbers.shape != positions.shape[:1]:
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
    return numbers, spec


def _reused_neighbors(
    cache: NeighborCache | None,
    batch: tuple[torch.Tensor, ...],
    k: int,
    cutoff: float,
    numbers: torch.Tensor | None,
    species: Sequence[int] | None,
    search: str,
    need_grad: bool,
) -> KNearest | torch.Tensor | None:
    """The neighbours from ``cache``'s list when it is still valid for ``batch`` (then the
    batch's values need no checks of their own: the same structure, atoms moved a little),
    or straight the descriptors where the fused kernel covers the step (:mod:`.neighbors.fused`,
    ``$QUESTS_TORCH_KERNEL=triton``); ``None`` when the list is stale or absent."""
    if cache is None:
        return None
    check_search(search)
    spec = _sorted_species(species) if species is not None else []
    if spec and numbers is None:
        return None  # the full checks name the missing argument
    if spec:
        numbers = numbers.to(device=batch[0].device, dtype=torch.int64)
    which = dict(numbers=numbers if spec else None, species=spec if len(spec) > 1 else [])
    out, checked = cache.fused_reuse(*batch, k, cutoff, need_grad=need_grad, **which)
    if checked:
        return out
    sources = cache.reuse(*batch, k, cutoff, **which)
    return None if sources is None else KNearest(batch[0].shape[0], sources)


def _new_neighbors(
    cache: NeighborCache | None,
    batch: tuple[torch.Tensor, ...],
    k: int,
    cutoff: float,
    numbers: torch.Tensor | None,
    species: Sequence[int] | None,
    budget: int | str | None,
    search: str,
) -> KNearest:
    """The batch's values checked, then its neighbours from a new search (and a new list
    in ``cache`` when one is given)."""
    positions, cell, pbc, system_idx = batch
    validate_batch(positions, cell, pbc, system_idx)
    check_search(search)
    spec: list[int] = []
    if species is not None:
        numbers, spec = _check_species(numbers, species, positions)
    _check_output_memory(
        positions.shape[0], descriptor_width(k, len(spec)), k, positions.dtype, positions.device
    )
    if cache is not None:
        cached = cache.build(*batch, k, cutoff, numbers=numbers if spec else None,
                             species=spec if len(spec) > 1 else [], budget=budget)  # fmt: skip
        if cached is not None:
            return KNearest(positions.shape[0], cached)
    return find_k_nearest(
        positions, cell, pbc, system_idx, k, cutoff, search,
        budget=budget, numbers=numbers, species=spec,
    )  # fmt: skip


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
    neighbors: NeighborCache | None = None,
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
            the fused cell grid (:mod:`quests_torch.neighbors.grid`) for larger ones where it
            applies, vesin-torch cell lists otherwise; ``"grid"``: the cell grid wherever it
            applies; ``"pairs"``: never the grid (dense or vesin-torch pair lists). All give
            the same descriptors (to ~1e-15).
        neighbors: a :class:`quests_torch.neighbors.NeighborCache` to reuse between calls on
            the same moving structures (an MD loop): the k nearest are then picked from the
            candidate lists it keeps (atoms within ``cutoff + skin``) while they stay valid,
            with the same result as a new search. ``search`` applies to its rebuilds only
            when no list is kept.

    Returns:
        ``[n_atoms, 2k - 1]`` (``[n_atoms, (S + 1)(2k - 1)]`` multicomponent), dtype and device
        of ``positions``; differentiable with respect to ``positions`` and ``cell``.
    """
    _check_params(k, cutoff)
    cutoff = float(cutoff)
    if neighbors is not None and not isinstance(neighbors, NeighborCache):
        raise TypeError(
            f"`neighbors` must be a NeighborCache or None, got {type(neighbors).__name__}"
        )
    if isinstance(cell, torch.Tensor) and cell.ndim == 2:
        cell = cell[None]
    if isinstance(pbc, torch.Tensor) and pbc.ndim == 1:
        pbc = pbc[None]
    if system_idx is None:
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"`positions` must be a torch.Tensor, got {type(positions).__name__}")
        # shape[:1]: a positions tensor of the wrong rank reaches validate_batch's message
        if neighbors is not None:  # the cache's own (compared by identity: fewer ops)
            system_idx = neighbors.single_system_idx(positions)
        else:
            system_idx = torch.zeros(
                positions.shape[:1], dtype=torch.int64, device=positions.device
            )
    if isinstance(pbc, torch.Tensor) and pbc.dtype != torch.bool:
        pbc = pbc.to(torch.bool)
    validate_batch(positions, cell, pbc, system_idx, values=False)
    system_idx = system_idx.to(torch.int64)
    if compute_dtype(positions.device, positions.dtype) != positions.dtype:  # float32-only
        positions, cell = positions.float(), cell.float()
    batch = (positions, cell, pbc, system_idx)
    need_grad = torch.is_grad_enabled() and (positions.requires_grad or cell.requires_grad)
    near = _reused_neighbors(neighbors, batch, k, cutoff, numbers, species, search, need_grad)
    if isinstance(near, torch.Tensor):  # the fused kernel's descriptors (neighbors/fused.py)
        return near
    if near is None:
        near = _new_neighbors(neighbors, batch, k, cutoff, numbers, species, budget, search)
    # float32 matmuls (pair search, wrapping, distance blocks) in IEEE precision whatever the
    # caller's TF32/bf16 flags: a rounded distance can swap neighbours at the cutoff
    with full_precision():
        return _neighbor_descriptors(
            near, positions, k, cutoff, budget, len(near.sources), need_grad
        )


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
        multicomponent: append one descriptor block per species, each computed on the
            sub-structure of that species only (as upstream quests does).
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
