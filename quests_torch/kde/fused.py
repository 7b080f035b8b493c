"""Fused kernel sums in Triton: every pair evaluated in registers, never written to memory.

The torch path (:mod:`.sweeps`) writes each ``[rows x columns]`` tile of exponents to device
memory with a GEMM and reads it back for ``exp`` and the sums: tens of bytes per pair, which
bounds it by memory bandwidth on a GPU. The kernel here keeps the tile in registers: a program
owns a block of rows and walks the column blocks, computing ``g = x_i . y_j`` (``tl.dot``,
IEEE precision, or fused multiply-adds), the exponent ``(g - |x_i|^2/2 - |y_j|^2/2) / h_k^2 +
lw'_j`` for up to :data:`MAX_BANDWIDTHS` bandwidths at once, and folding it into a running row
maximum and a running sum of exponentials (the online log-sum-exp of attention kernels). Only
``log p_i`` is written. Far rows therefore need no second pass: the shifted sum is the only sum.

Numerics, as the torch path: rows and columns centred on the references' mean (by
:class:`.problem.Problem`), the exponent in the compute dtype (float64, or float32 tiles),
the running sums in float64 (float32 in float32-only mode), the self pair of ``x is y`` set to
exactly ``lw'_i`` (0 without weights). Results equal the torch path's to rounding (1e-12
relative in float64, tested under the interpreter).

Self sums (``x is y``, no weights: entropy, diversity) take the triangular kernel
(:func:`fused_self_sums`): half the pairs, each block above the diagonal counted for its rows
and its columns, the column sums of each program in a slot of its own and summed in a fixed
order (no atomics: repeatable bit for bit).

Dispatch (:func:`kernel_choice`): ``$QUESTS_TORCH_KERNEL`` = ``torch`` (the default until a
GPU run of ``benchmarks/gpu_check.py`` decides), ``triton`` (this kernel for every problem it
covers, on CUDA, or on CPU tensors under Triton's interpreter, ``TRITON_INTERPRET=1``) or
``auto`` (today: ``torch``). Covered: resident tensors on one device, any number of
bandwidths up to 8, column log-weights, self pairs (also of a block of a sharded problem);
not covered, so on the torch path: per-group sums, exact top-n, ``distance="direct"``, streamed
(numpy, memmap, store) sources, row ownership of the sharded triangular sweep.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .._triton import KERNEL_ENV, interpreting, jit, kernel_choice, triton_available

if TYPE_CHECKING:
    from .problem import Problem

__all__ = [
    "KERNEL_ENV",
    "MAX_BANDWIDTHS",
    "covers",
    "dot_status",
    "fused_log_sums",
    "fused_self_sums",
    "kernel_choice",
    "panel_blocks",
    "symmetric",
    "triton_available",
    "use_fused",
]

MAX_BANDWIDTHS = 8
"""Bandwidths one fused pass evaluates (one running sum each); more go to the torch path."""
tl = None  # triton.language, bound by _kernel() (Triton is imported only when it is used)
_interpreting = interpreting


def covers(p: Problem) -> bool:
    """Whether the fused kernel computes problem ``p`` (see the module notes), on its device."""
    if p.device.type == "cuda":
        runs_here = True
    else:
        runs_here = p.device.type == "cpu" and _interpreting()
    return (
        runs_here
        and p.f64
        and p.want_sums
        and p.n_nearest == 0
        and p.groups is None
        and p.owned is None
        and not p.direct
        and len(p.hs) <= MAX_BANDWIDTHS
        and p.cols_resident is not None
        and p.xs.tensor is not None
        and p.xs.tensor.device == p.device
    )


def use_fused(p: Problem) -> bool:
    """:func:`kernel_choice` is ``triton`` and the kernel covers ``p``."""
    return kernel_choice() == "triton" and covers(p)


def _lse_kernel(
    X,
    Y,
    QX,
    QY,
    LW,
    S,
    OUT,
    n,
    m,
    d,
    stride_x,
    stride_y,
    n_h,
    diag_offset,
    MU,
    CENTER: tl.constexpr,
    HAS_LW: tl.constexpr,
    PIN: tl.constexpr,
    USE_DOT: tl.constexpr,
    NB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: ``BLOCK_M`` rows against every column, online log-sum-exp per bandwidth.

    ``X [n, d]``, ``Y [m, d]``: centred rows and columns (compute dtype); ``QX [n]``,
    ``QY [m]``: ``-|x|^2/2`` and ``-|y|^2/2``; ``LW [m]``: ``lw'`` (``HAS_LW``); ``S [n_h]``:
    ``1/h_k^2``; ``OUT [n, n_h]``: ``log sum_j exp(t_ijk)`` (summed in the dtype of ``MU``,
    the accumulator, stored in that of ``OUT``). ``PIN``: the pair ``i + diag_offset == j``
    is a point with itself (exponent exactly ``lw'_j``).
    ``CENTER``: ``X`` holds the raw rows (any float dtype), centred here on ``MU [d]``
    (accumulator dtype) and ``QX`` computed here (not read): no torch ops before the launch.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < d
    acc_dtype = MU.dtype.element_ty
    x = tl.load(X + rows[:, None] * stride_x + dims[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)  # fmt: skip
    if CENTER:  # centred on the references' mean in the accumulator dtype, then rounded
        mu = tl.load(MU + dims, mask=dmask, other=0.0)
        x = tl.where(dmask[None, :], x.to(acc_dtype) - mu[None, :], 0.0).to(Y.dtype.element_ty)
        qx = (tl.sum(x.to(acc_dtype) * x.to(acc_dtype), axis=1) * -0.5).to(x.dtype)
    else:
        qx = tl.load(QX + rows, mask=rmask, other=0.0)
    ks = tl.arange(0, NB)
    s = tl.load(S + ks, mask=ks < n_h, other=0.0)
    run_max = tl.full((BLOCK_M, NB), float("-inf"), x.dtype)
    run_sum = tl.zeros((BLOCK_M, NB), acc_dtype)
    for j0 in range(0, m, BLOCK_N):
        cols = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # offsets past 2^31
        cmask = cols < m
        qy = tl.load(QY + cols, mask=cmask, other=0.0)
        if USE_DOT:
            y = tl.load(Y + cols[:, None] * stride_y + dims[None, :],
                        mask=cmask[:, None] & dmask[None, :], other=0.0)  # fmt: skip
            g = tl.dot(x, tl.trans(y), input_precision="ieee", out_dtype=x.dtype)
        else:  # fused multiply-adds, one descriptor column at a time
            g = tl.zeros((BLOCK_M, BLOCK_N), x.dtype)
            for c in range(0, d):
                xc = tl.load(X + rows * stride_x + c, mask=rmask, other=0.0)
                if CENTER:
                    xc = (xc.to(acc_dtype) - tl.load(MU + c)).to(x.dtype)
                yc = tl.load(Y + cols * stride_y + c, mask=cmask, other=0.0)
                g += xc[:, None] * yc[None, :]
        e = tl.minimum(g + qx[:, None] + qy[None, :], 0.0)  # -|x - y|^2 / 2, rounding cut
        t = e[:, :, None] * s[None, None, :]
        if HAS_LW:
            lw = tl.load(LW + cols, mask=cmask, other=0.0)
            t = t + lw[None, :, None]
        if PIN:
            self_pair = (rows[:, None] + diag_offset) == cols[None, :]
            pinned = tl.zeros((BLOCK_M, BLOCK_N), x.dtype)
            if HAS_LW:
                pinned = pinned + lw[None, :]
            t = tl.where(self_pair[:, :, None], pinned[:, :, None], t)
        t = tl.where(cmask[None, :, None], t, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(t, axis=1))
        rescale = tl.exp((run_max - new_max).to(acc_dtype))
        terms = tl.exp(t - new_max[:, None, :]).to(acc_dtype)
        run_sum = run_sum * rescale + tl.sum(terms, axis=1)
        run_max = new_max
    log_p = run_max.to(acc_dtype) + tl.log(run_sum)
    out_mask = rmask[:, None] & (ks[None, :] < n_h)
    tl.store(OUT + rows[:, None] * n_h + ks[None, :], log_p.to(OUT.dtype.element_ty),
             mask=out_mask)  # fmt: skip


def _self_kernel(
    X,
    QX,
    S,
    ROWS,
    COLS,
    n,
    d,
    stride_x,
    n_h,
    b0,
    n_blocks,
    USE_DOT: tl.constexpr,
    NB: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Self sums ``sum_j exp(-|x_i - x_j|^2 / (2 h_k^2))`` over the upper triangle of blocks.

    Program ``pid`` owns row block ``bi = b0 + pid`` and walks the column blocks ``bj >= bi``:
    each pair block adds its row sums to ``ROWS[rows]`` (``[n, NB]``, written once, by the
    block's owner) and, above the diagonal, its column sums to ``COLS[pid, cols]`` (``[panel,
    n, NB]``, one slot per program: summed by the caller in a fixed order, so the result is
    the same bit for bit on every run, with no atomics). The self pair is exactly 1 and every
    other term at most 1, so no running maximum is needed: the plain sums cannot underflow.
    """
    pid = tl.program_id(0)
    bi = b0 + pid
    rows = (bi * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)  # offsets past 2^31
    rmask = rows < n
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < d
    x = tl.load(X + rows[:, None] * stride_x + dims[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)  # fmt: skip
    qx = tl.load(QX + rows, mask=rmask, other=0.0)
    ks = tl.arange(0, NB)
    s = tl.load(S + ks, mask=ks < n_h, other=0.0)
    acc_dtype = ROWS.dtype.element_ty
    row_sum = tl.zeros((BLOCK, NB), acc_dtype)
    for bj in range(bi, n_blocks):
        cols = (bj * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        cmask = cols < n
        qy = tl.load(QX + cols, mask=cmask, other=0.0)
        if USE_DOT:
            y = tl.load(X + cols[:, None] * stride_x + dims[None, :],
                        mask=cmask[:, None] & dmask[None, :], other=0.0)  # fmt: skip
            g = tl.dot(x, tl.trans(y), input_precision="ieee", out_dtype=x.dtype)
        else:
            g = tl.zeros((BLOCK, BLOCK), x.dtype)
            for c in range(0, d):
                xc = tl.load(X + rows * stride_x + c, mask=rmask, other=0.0)
                yc = tl.load(X + cols * stride_x + c, mask=cmask, other=0.0)
                g += xc[:, None] * yc[None, :]
        e = tl.minimum(g + qx[:, None] + qy[None, :], 0.0)
        e = tl.where(rows[:, None] == cols[None, :], 0.0, e)  # the self pair, exactly
        t = e[:, :, None] * s[None, None, :]
        valid = rmask[:, None] & cmask[None, :]
        terms = tl.where(valid[:, :, None], tl.exp(t), 0.0).to(acc_dtype)
        row_sum += tl.sum(terms, axis=1)
        if bj > bi:
            col_sum = tl.sum(terms, axis=0)
            out = COLS + pid.to(tl.int64) * n * n_h + cols[:, None] * n_h + ks[None, :]
            tl.store(out, col_sum, mask=cmask[:, None] & (ks[None, :] < n_h))
    tl.store(ROWS + rows[:, None] * n_h + ks[None, :], row_sum,
             mask=rmask[:, None] & (ks[None, :] < n_h))  # fmt: skip


@functools.cache
def _kernel(interpret: bool, name: str = "_lse_kernel"):
    """The kernel ``name`` jitted (Triton reads ``TRITON_INTERPRET`` when it decorates)."""
    return jit(globals(), globals()[name], interpret=interpret)


def _blocks(p: Problem) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_D)``: 64 x 64 pairs a program step (32 x 32 with several
    bandwidths: the ``[rows, columns, bandwidths]`` exponents stay in registers), the width
    padded to a power of two."""
    block_d = max(16, 1 << max(0, math.ceil(math.log2(max(p.d, 1)))))
    side = 64 if len(p.hs) == 1 else 32
    if p.device.type == "cpu":  # the interpreter: numpy per program, larger is faster
        side = 128
    return side, side, block_d


def symmetric(p: Problem) -> bool:
    """Whether ``p`` is a dataset against itself that the triangular kernel computes: ``x is
    y``, no weights, not a block of a sharded problem."""
    return p.same and p.lw is None and p.row_offset == 0 and p.col_offset == 0


def panel_blocks(p: Problem, block: int) -> int:
    """Row blocks per panel of :func:`fused_self_sums`: as many ``[n, n_h]`` column-sum slots
    as a quarter of the memory budget holds (at least one; all blocks at most)."""
    per_slot = p.n * len(p.hs) * p.acc.itemsize
    return max(1, min(-(-p.n // block), (p.budget // 4) // per_slot))


def fused_self_sums(p: Problem, progress=None) -> torch.Tensor:
    """``[n, n_h]`` log self sums of ``x is y`` over the upper triangle of blocks (half the
    pairs): each block above the diagonal counts for its rows and its columns.

    The column sums of each program go to a slot of their own, summed in a fixed order after
    each panel of row blocks (as many as half the memory budget holds), so the result is
    repeatable bit for bit. ``progress(rows_done, n)`` after each panel.
    """
    n, n_h = p.n, len(p.hs)
    cols = p.cols_resident
    x, qx = cols[:, : p.d].contiguous(), cols[:, p.d].contiguous()
    hs = torch.tensor([1.0 / h**2 for h in p.hs], dtype=p.dtype, device=p.device)
    block = _blocks(p)[0]
    n_blocks = -(-n // block)
    rows = torch.empty((n, n_h), dtype=p.acc, device=p.device)
    col_total = torch.zeros((n, n_h), dtype=p.acc, device=p.device)
    panel = panel_blocks(p, block)
    meta = dict(USE_DOT=_use_dot(p), NB=1 << max(0, math.ceil(math.log2(n_h))), BLOCK=block,
                BLOCK_D=_blocks(p)[2])  # fmt: skip
    launch = _launcher(_kernel(_interpreting(), "_self_kernel"), p, meta)
    for b0 in range(0, n_blocks, panel):
        b1 = min(n_blocks, b0 + panel)
        part = torch.zeros((b1 - b0, n, n_h), dtype=p.acc, device=p.device)
        launch((b1 - b0,), x, qx, hs, rows, part, n, p.d, x.stride(0), n_h, b0, n_blocks)
        col_total += part.sum(0)
        if progress is not None:
            progress(min(n, b1 * block), n)
    return (rows + col_total).log_()


def fused_log_sums(p: Problem, progress=None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[n, n_h]`` ``log sum_j exp(-|x_i - y_j|^2 / (2 h_k^2) + lw'_j)`` of problem ``p``
    (add ``p.lw_max`` for the weighted log density), summed in the accumulator dtype and
    returned in ``out_dtype`` (default: the accumulator's).

    One launch per row tile of the problem (``p.tm`` rows: the rows of a launch do not affect
    each other, so the results do not depend on it), ``progress(rows_done, n)`` after each.
    """
    n, m, n_h = p.n, p.m, len(p.hs)
    if n == 0 or m == 0:
        return torch.full((n, n_h), -math.inf, dtype=out_dtype or p.acc, device=p.device)
    if symmetric(p):
        return fused_self_sums(p, progress).to(out_dtype or p.acc)
    out = torch.empty((n, n_h), dtype=out_dtype or p.acc, device=p.device)  # every row written
    y, qy, hs = _columns(p)
    lw = p.lw if p.lw is not None else qy  # a placeholder the kernel does not read
    block_m, block_n, block_d = _blocks(p)
    meta = dict(CENTER=True, HAS_LW=p.lw is not None, PIN=bool(p.self_pairs), USE_DOT=_use_dot(p),
                NB=1 << max(0, math.ceil(math.log2(n_h))), BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_D=block_d)  # fmt: skip
    kernel = _kernel(_interpreting())
    launch = _launcher(kernel, p, meta)
    step = p.tm
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        x = p.xs.tensor.detach()[i0:i1]  # centred in the kernel (CENTER)
        if x.stride(1) != 1:
            x = x.contiguous()
        part = out[i0:i1]
        grid = (-(-(i1 - i0) // block_m),)
        launch(grid, x, y, qy, qy, lw, hs, part, i1 - i0, m, p.d, x.stride(0), y.stride(0), n_h,
               i0 + p.row_offset - p.col_offset, p.mu)  # fmt: skip
        if progress is not None:
            progress(i1, n)
    return out


_COLUMNS = WeakIdKeyDictionary()  # resident columns -> (y, qy): split once per reference set
_INVERSE_SQUARES: dict[tuple, torch.Tensor] = {}


def _columns(p: Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y [m, d], qy [m], 1/h^2 [n_h])`` of the resident columns, made once per prepared
    reference set (and bandwidths): a step against a bank launches no copy."""
    cols = p.cols_resident
    got = _COLUMNS.get(cols)
    if got is None:
        got = _COLUMNS[cols] = (cols[:, : p.d].contiguous(), cols[:, p.d].contiguous())
    key = (tuple(p.hs), p.dtype, p.device)
    hs = _INVERSE_SQUARES.get(key)
    if hs is None:
        if len(_INVERSE_SQUARES) > 64:
            _INVERSE_SQUARES.clear()
        hs = torch.tensor([1.0 / h**2 for h in p.hs], dtype=p.dtype, device=p.device)
        _INVERSE_SQUARES[key] = hs
    return got[0], got[1], hs


#: per (device type, dtype): ``"dot"`` once ``tl.dot`` compiled and ran, ``"fma"`` after it
#: failed to compile (the fused multiply-add loop is used from then on)
_DOT: dict[tuple[str, torch.dtype], str] = {}


def dot_status() -> dict[str, str]:
    """How the Gram products were computed so far: ``{"cuda float64": "dot" | "fma"}``."""
    return {f"{dev} {str(dt).removeprefix('torch.')}": v for (dev, dt), v in _DOT.items()}


def _use_dot(p: Problem) -> bool:
    """``tl.dot`` (tensor cores: FP64 on sm_80/sm_90, IEEE float32) where the device has
    them and it compiled; fused multiply-adds on older GPUs or after ``tl.dot`` failed to
    compile for the dtype. Under the interpreter both are numpy."""
    if p.device.type != "cuda":
        return True
    if _DOT.get(("cuda", p.dtype)) == "fma":
        return False
    major, _ = torch.cuda.get_device_capability(p.device)
    return major >= 8


def _launcher(kernel, p: Problem, meta: dict):
    """``launch(grid, *args)``: the kernel with ``meta``; on CUDA a ``tl.dot`` that does not
    compile for the dtype (an older Triton without float64 dots) falls back to the
    multiply-add loop once, remembered for the process."""
    key = (p.device.type, p.dtype)

    def launch(grid, *args):
        if not meta["USE_DOT"] or _DOT.get(key) == "dot" or p.device.type != "cuda":
            kernel[grid](*args, **meta)
            return
        try:
            kernel[grid](*args, **meta)
        except Exception as exc:  # triton's CompilationError and the lowering's errors
            if "dot" not in str(exc).lower() and "mma" not in str(exc).lower():
                raise
            _DOT[key] = "fma"
            meta["USE_DOT"] = False
            kernel[grid](*args, **meta)
            return
        _DOT[key] = "dot"

    return launch
