"""The MD step's descriptors in one Triton kernel, from a Verlet list (:mod:`.verlet`).

While a :class:`~.verlet.NeighborCache` list is valid, the descriptors of a step are a pure
function of the positions and the list: for every atom, unwrap the positions to the build's
images, form the candidate vectors and their squared distances, pick the k nearest with the
same tie-breaking keys as the torch path (:func:`.grid.d2_levels`, :func:`.grid.component_keys`:
quantised squared distance, then the quantised vector), and build the descriptor row
(:func:`quests_torch.descriptors.descriptors_from_tensors`). The torch path does this in ~100
small ops and one host sync; here it is one kernel launch, one program per atom, whose
programs also raise a flag when the list is stale (an atom moved more than ``skin / 2``, two
atoms closer than the coincidence tolerance, a changed cell, ``pbc``, structure layout or
atomic numbers). The caller reads the flag once (the step's one host sync) and falls back to
the torch path, which rebuilds the list, when it is set.

Selection without a gather: the ``k``-th smallest key comes from a sort of the candidates'
keys, the selected candidates get consecutive slots from a prefix sum, and a one-hot product
packs their vectors into ``k`` slots. The descriptor needs only the selected set (its entries
are sorted), so the result equals the torch path's to rounding (1e-15 relative in float64;
tested under Triton's interpreter).

Covered (else the torch path, unchanged): no autograd, ``2 <= k <= 64``, at most
:data:`MAX_CANDIDATES` candidates per atom, float64 allowed on the device. Multicomponent
descriptors are covered: one pass per species part, inside the kernel.
"""

from __future__ import annotations

import functools
import math

import torch

from .._precision import float64_enabled
from .._triton import interpreting, jit, runs_fused
from .grid import C_LEVELS, D2_BITS
from .pairs import COINCIDENT_TOL

__all__ = ["MAX_CANDIDATES", "MAX_K", "covers", "fused_descriptors"]

MAX_K = 64
"""Largest ``k`` the kernel takes (its ``[k, k]`` pair block stays in registers)."""
MAX_CANDIDATES = 512
"""Largest candidate list per atom the kernel takes (sorted in registers)."""
tl = None  # triton.language, bound by _kernel() (Triton is imported only when it is used)


def covers(positions: torch.Tensor, k: int, m: int, need_grad: bool) -> bool:
    """Whether the fused kernel computes this step (see the module notes)."""
    return (
        not need_grad
        and 2 <= k <= MAX_K
        and 0 < m <= MAX_CANDIDATES
        and positions.dtype in (torch.float32, torch.float64)
        and float64_enabled(positions.device)
        and runs_fused(positions.device)
    )


def _verlet_kernel(
    P,
    P0,
    INV,
    LAT,
    NBR,
    IMG,
    CELL,
    CELL0,
    PBC,
    PBC0,
    SIDX,
    SIDX0,
    NUM,
    NUM0,
    PARTS,
    OUT,
    FLAG,
    m,
    k,
    n_parts,
    out_stride,
    inv_stride,
    step,
    cutoff,
    level_scale,
    comp_scale,
    limit2,
    tol2,
    CHECK_SIDX: tl.constexpr,
    HAS_NUM: tl.constexpr,
    OUT_LEVEL: tl.constexpr,
    C_LEV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    KP: tl.constexpr,
):
    """One program: atom ``i``'s descriptor row(s) from its candidate list, and its checks.

    ``P, P0 [N, 3]``: positions now and at the build; ``INV, LAT``: inverse cell (non-periodic
    columns zero) and cell of each atom (``inv_stride`` 0: one structure); ``NBR [N, m]``
    int32 candidates, ``IMG [N, m, 3]`` their lattice images (padding far away); ``CELL,
    PBC, SIDX, NUM`` and their build-time copies ``*0``; ``PARTS [n_parts]`` atomic number of
    each descriptor part (-1: the whole structure); ``OUT [N, out_stride]``; ``FLAG [1]`` int32,
    raised to ``step`` when the list is stale (no zeroing launch: it only grows).
    """
    i = tl.program_id(0).to(tl.int64)
    c4 = tl.arange(0, 4)[None, :]  # x, y, z (and a masked fourth lane)
    # the atom itself (lane 0 of a pair of lanes) and its candidates, unwrapped to the images
    # of the build: [lanes, 4] tiles
    lane = tl.arange(0, 2)
    q_i, moved = _unwrapped(P, P0, INV, LAT, i + lane * 0, lane == 0, inv_stride, c4)
    q_i = tl.sum(tl.where(lane[:, None] == 0, q_i, 0.0), axis=0)
    moved = tl.where(lane[:, None] == 0, moved, 0.0)
    # written as "not within": a NaN position fails the test (and the new search names it)
    bad = ~(tl.sum(tl.sum(moved * moved, axis=1), axis=0) <= limit2)
    offs = tl.arange(0, BLOCK_M)
    cmask = offs < m
    j = tl.load(NBR + i * m + offs, mask=cmask, other=0).to(tl.int64)
    q_j, _ = _unwrapped(P, P0, INV, LAT, j, cmask, inv_stride, c4)
    jm = cmask[:, None] & (c4 < 3)
    image = tl.load(IMG + (i * m + offs[:, None]) * 3 + c4, mask=jm, other=0.0)
    vec = (q_j - q_i[None, :]) + image  # [BLOCK_M, 4], the fourth lane zero
    v0 = tl.sum(tl.where(c4 == 0, vec, 0.0), axis=1)
    v1 = tl.sum(tl.where(c4 == 1, vec, 0.0), axis=1)
    v2 = tl.sum(tl.where(c4 == 2, vec, 0.0), axis=1)
    d2 = v0 * v0 + v1 * v1 + v2 * v2
    bad = bad | (tl.sum((cmask & ~(d2 >= tol2)).to(tl.int32)) > 0)
    bad = bad | _structure_changed(CELL, CELL0, PBC, PBC0, SIDX, SIDX0, i, CHECK_SIDX)
    if HAS_NUM:
        z_i = tl.load(NUM + i)
        bad = bad | (z_i != tl.load(NUM0 + i))
        z_j = tl.load(NUM + j, mask=cmask, other=-1)
    tl.atomic_max(FLAG, tl.where(bad, step, 0).to(tl.int32))
    base_key = _keys(vec, d2, c4, cutoff, level_scale, comp_scale, OUT_LEVEL, C_LEV)
    out_key = OUT_LEVEL << 33
    for part in range(n_parts):
        z = tl.load(PARTS + part)
        key = base_key
        if HAS_NUM:
            key = tl.where((z < 0) | ((z_i == z) & (z_j == z)), key, out_key)
        key = tl.where(cmask, key, 0x7FFFFFFFFFFFFFFF)
        x, y, zc, valid = _select(key, v0, v1, v2, offs, k, out_key, KP)
        _descriptor_row(x, y, zc, valid, OUT + i * out_stride + part * (2 * k - 1), k, cutoff,
                        KP)  # fmt: skip


def _unwrapped(P, P0, INV, LAT, idx, mask, inv_stride, c4):
    """``(q, moved)`` ``[lanes, 4]`` of atoms ``idx``: positions moved back by the lattice
    translations they made since the build (``d @ inv`` rounded half to even, ``@ lattice``,
    as the torch path) and those displacements modulo the lattice."""
    # round half to even as torch.round: the float64 magic-number addition (exact for
    # |x| < 2^51; the kernel runs without floating-point contraction)
    magic = 6755399441055744.0  # 1.5 * 2^52
    dt = P.dtype.element_ty
    row = idx[:, None]
    am = mask[:, None] & (c4 < 3)
    p = tl.load(P + row * 3 + c4, mask=am, other=0.0)
    d = p - tl.load(P0 + row * 3 + c4, mask=am, other=0.0)
    w = tl.zeros(d.shape, dt)
    for r in range(3):
        dr = tl.sum(tl.where(c4 == r, d, 0.0), axis=1)
        w += dr[:, None] * tl.load(INV + row * inv_stride + r * 3 + c4, mask=am, other=0.0)
    w = ((w.to(tl.float64) + magic) - magic).to(dt)
    back = tl.zeros(d.shape, dt)
    for r in range(3):
        wr = tl.sum(tl.where(c4 == r, w, 0.0), axis=1)
        back += wr[:, None] * tl.load(LAT + row * inv_stride + r * 3 + c4, mask=am, other=0.0)
    return p - back, d - back


def _structure_changed(CELL, CELL0, PBC, PBC0, SIDX, SIDX0, i, CHECK_SIDX: tl.constexpr):
    """Whether atom ``i``'s structure differs from the build: cell, pbc, layout."""
    s_i = tl.load(SIDX + i)
    bad = s_i != s_i  # False
    if CHECK_SIDX:
        bad = bad | (s_i != tl.load(SIDX0 + i))
    c9 = tl.arange(0, 16)
    cell_now = tl.load(CELL + s_i * 9 + c9, mask=c9 < 9, other=0.0)
    cell_then = tl.load(CELL0 + s_i * 9 + c9, mask=c9 < 9, other=0.0)
    bad = bad | (tl.sum((cell_now != cell_then).to(tl.int32)) > 0)
    c3 = tl.arange(0, 4)
    pbc_now = tl.load(PBC + s_i * 3 + c3, mask=c3 < 3, other=0).to(tl.int32)
    pbc_then = tl.load(PBC0 + s_i * 3 + c3, mask=c3 < 3, other=0).to(tl.int32)
    return bad | (tl.sum((pbc_now != pbc_then).to(tl.int32)) > 0)


def _keys(vec, d2, c4, cutoff, level_scale, comp_scale, OUT_LEVEL: tl.constexpr,
          C_LEV: tl.constexpr):  # fmt: skip
    """int64 tie-breaking keys of the candidates, as :func:`.grid.full_keys`: the quantised
    squared distance (levels at or beyond the cutoff share one), then the quantised vector
    (11 bits a component)."""
    magic = 6755399441055744.0  # round half to even, as in _unwrapped
    levels = tl.minimum(tl.floor(d2.to(tl.float64) * level_scale + 0.5), OUT_LEVEL * 1.0)
    q = ((vec.to(tl.float64) + cutoff) * comp_scale + magic) - magic
    q = tl.minimum(tl.maximum(q, 0.0), C_LEV * 1.0).to(tl.int64)
    q0 = tl.sum(tl.where(c4 == 0, q, 0), axis=1)
    q1 = tl.sum(tl.where(c4 == 1, q, 0), axis=1)
    q2 = tl.sum(tl.where(c4 == 2, q, 0), axis=1)
    return (levels.to(tl.int64) << 33) | (q0 << 22) | (q1 << 11) | q2


def _select(key, v0, v1, v2, offs, k, out_key, KP: tl.constexpr):
    """The ``k`` smallest keys' vectors packed into ``KP`` slots ``(x, y, z, valid)``: the
    ``k``-th smallest key from a sort, ties at it broken by candidate order, slots from a
    prefix sum, vectors moved by a one-hot product (no gather)."""
    kth = tl.sum(tl.where(offs == k - 1, tl.sort(key), 0))
    less = key < kth
    tied = key == kth
    tie_rank = tl.cumsum(tied.to(tl.int32), 0)
    pick = (less | (tied & (tie_rank <= k - tl.sum(less.to(tl.int32))))) & (key < out_key)
    slot = tl.cumsum(pick.to(tl.int32), 0) - 1
    slots = tl.arange(0, KP)
    onehot = pick[None, :] & (slot[None, :] == slots[:, None])  # [KP, BLOCK_M]
    x = tl.sum(tl.where(onehot, v0[None, :], 0.0), axis=1)
    y = tl.sum(tl.where(onehot, v1[None, :], 0.0), axis=1)
    z = tl.sum(tl.where(onehot, v2[None, :], 0.0), axis=1)
    return x, y, z, slots < tl.sum(pick.to(tl.int32))


def _descriptor_row(x, y, z, valid, out, k, cutoff, KP: tl.constexpr):
    """Write ``[x1 (k), x2 (k - 1)]`` of the neighbour vectors ``(x, y, z) [KP]`` (``valid``
    slots) to ``out``, as :func:`quests_torch.descriptors._environment_descriptors`."""
    sq = x * x + y * y + z * z
    r = tl.sqrt(sq)
    rr = r + 1e-16
    zz = tl.minimum(rr, cutoff) / cutoff
    x1 = (1 - zz * zz) * (1 - zz * zz) / rr
    x1 = tl.where(valid, x1, 0.0)
    slots = tl.arange(0, KP)
    tl.store(out + slots, tl.sort(x1, descending=True), mask=slots < k)
    zr = tl.minimum(r, cutoff) / cutoff
    s = tl.where(valid, 1 - zr * zr, 0.0)  # sqrt(w)
    if x.dtype == tl.float64:  # |a|^2 + |b|^2 - 2 a.b, as the torch path's batched product
        dot = x[:, None] * x[None, :] + y[:, None] * y[None, :] + z[:, None] * z[None, :]
        pd2 = (sq[:, None] + sq[None, :]) - 2.0 * dot
    else:  # float32: direct differences
        dx = x[:, None] - x[None, :]
        dy = y[:, None] - y[None, :]
        dz = z[:, None] - z[None, :]
        pd2 = dx * dx + dy * dy + dz * dz
    both = valid[:, None] & valid[None, :] & (slots[:, None] != slots[None, :])
    t = tl.where(both, s[None, :] / tl.sqrt(tl.where(both, pd2, 1.0)), 0.0)
    x2 = tl.sum(s[:, None] * tl.sort(t, 1, descending=True), axis=0) / k
    tl.store(out + k + slots, x2, mask=slots < k - 1)


#: the functions the kernel calls, jitted under their names by :func:`_kernel`
_HELPERS = (_unwrapped, _structure_changed, _keys, _select, _descriptor_row)


@functools.cache
def _kernel(interpret: bool):
    """The kernel jitted (Triton reads ``TRITON_INTERPRET`` when it decorates)."""
    return jit(globals(), _verlet_kernel, _HELPERS, interpret=interpret)


def fused_descriptors(
    built,
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    system_idx: torch.Tensor,
    numbers: torch.Tensor | None,
    k: int,
    cutoff: float,
    parts: list[int],
):
    """``(descriptors [N, n_parts (2k - 1)], stale)`` of a step from the list ``built`` (a
    :class:`~.verlet._Built` whose key matches the batch), in one launch.

    ``parts``: the atomic number of each descriptor part, ``-1`` for the whole structure.
    ``stale()`` (the one host sync) tells whether the list no longer holds the batch (the
    descriptors are then meaningless): the programs raise the list's flag to this step's
    number, so the flag needs no zeroing launch per step.
    """
    n, m = built.neighbor.shape
    dev = positions.device
    if built.stale_flag is None or built.steps >= _MAX_STEPS:
        built.stale_flag = torch.zeros(1, dtype=torch.int32, device=dev)
        built.steps = 0
    built.steps += 1
    step, flag = built.steps, built.stale_flag
    out = torch.empty((n, len(parts) * (2 * k - 1)), dtype=positions.dtype, device=dev)
    spec = _parts_tensor(tuple(parts), dev)
    has_num = numbers is not None
    check_sidx = system_idx is not built.system_idx or bool(system_idx._version)
    per_atom = built.inv.ndim == 3
    block_m = max(16, 1 << math.ceil(math.log2(max(m, k))))
    kp = max(16, 1 << math.ceil(math.log2(k)))
    meta = dict(CHECK_SIDX=check_sidx, HAS_NUM=has_num, OUT_LEVEL=1 << D2_BITS, C_LEV=C_LEVELS,
                BLOCK_M=block_m, KP=kp)  # fmt: skip
    if dev.type == "cuda":
        meta["enable_fp_fusion"] = False  # the keys' products and sums rounded one by one
    limit = 1 << D2_BITS
    p, c = positions.detach().contiguous(), cell.detach().contiguous()
    num = numbers if has_num else flag
    num0 = built.numbers if has_num else flag
    args = (
        p,
        built.positions,
        built.inv,
        built.lattice,
        built.neighbor,
        built.image,
        c,
        built.cell,
        pbc,
        built.pbc,
        system_idx,
        built.system_idx,
        num,
        num0,
        spec,
        out,
        flag,
    )
    scalars = (m, k, len(parts), out.shape[1], 9 if per_atom else 0, step, float(cutoff),
               limit / (cutoff * cutoff), C_LEVELS / (2 * cutoff), built.limit2,
               COINCIDENT_TOL**2)  # fmt: skip
    _kernel(interpreting())[(n,)](*args, *scalars, **meta)
    return out, lambda: int(flag.item()) == step


#: fused steps from one list before its flag is zeroed again (the flag is int32)
_MAX_STEPS = 1 << 30


_PARTS: dict[tuple, torch.Tensor] = {}


def _parts_tensor(parts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The parts' atomic numbers on the device, made once per tuple and device (no copy per
    step)."""
    key = (parts, device)
    t = _PARTS.get(key)
    if t is None:
        if len(_PARTS) > 64:
            _PARTS.clear()
        t = _PARTS[key] = torch.tensor(parts, dtype=torch.int64, device=device)
    return t
