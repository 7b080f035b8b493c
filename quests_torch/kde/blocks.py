"""Block-diagonal sums: every row against its own group only, equal-size groups batched."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .._precision import full_precision
from ..checks import DEFAULT_BANDWIDTH, Progress, check_bandwidths
from .prepared import default_tile_elements
from .problem import Groups, Problem, check_sweep_options
from .source import ArrayLike, Bandwidth, Source, compute_device, progress_callback
from .sweeps import backward, far_rows, sweep_shifted
from .tiles import spans


class GroupBlocks(NamedTuple):
    """``count`` consecutive groups of ``size`` rows each, starting at row ``start``."""

    start: int
    count: int
    size: int


def block_terms(p: Problem, e: torch.Tensor) -> torch.Tensor:
    """Floor-clamped kernel sums ``[..., n_h]`` over the last (column) dim of exponents ``e``."""
    tmp = torch.empty_like(e) if p.multi else None
    parts = []
    for k in range(len(p.hs)):
        t = p.terms(e, tmp, 0, 0, k)  # no weights here: the column range is not used
        parts.append(t.clamp_(min=p.floor).exp_().sum(-1))
    return torch.stack(parts, -1)


def sweep_blocks(
    p: Problem, blocks: Sequence[GroupBlocks], elements: int, progress
) -> torch.Tensor:
    """Plain log sums ``[n, n_h]`` of each row over its own group (``p.xs is p.ys``).

    Equal-size groups are stacked into ``[G, size, size]`` exponent tiles, one batched GEMM
    each (``G`` from the tile area), so the number of kernels does not grow with the number
    of groups; a group too large for one tile of ``elements`` gets ``[rows, size]`` tiles of
    its own.
    """
    sums = torch.empty(p.n, len(p.hs), dtype=p.acc, device=p.device)
    done = 0
    for start, count, size in blocks:
        if count == 0 or size == 0:
            continue
        per = elements // (size * size)
        if per >= 1:  # whole groups, batched
            for g0 in range(0, count, per):
                g = min(per, count - g0)
                i0 = start + g0 * size
                i1 = i0 + g * size
                xr, xraw = p.rows(i0, i1)
                yc = p.cols(i0, i1)
                if p.direct:
                    xb = xraw.view(g, size, p.d)
                    dist = torch.cdist(xb, xb, compute_mode="donot_use_mm_for_euclid_dist")
                    e = dist.square_().mul_(-0.5 * p.c0)
                else:
                    e = torch.bmm(xr.view(g, size, -1), yc.view(g, size, -1).transpose(1, 2))
                if p.self_pairs:
                    e.diagonal(dim1=1, dim2=2).fill_(0.0)
                sums[i0:i1] = block_terms(p, e).view(i1 - i0, -1)
                done += i1 - i0
                if progress is not None:
                    progress(done, p.n)
            continue
        rows = max(1, elements // size)  # one large group: row tiles spanning the group
        for a in range(start, start + count * size, size):
            yc = p.cols(a, a + size)
            for i0, i1 in spans(a, a + size, rows):
                xr, xraw = p.rows(i0, i1)
                out = torch.empty(i1 - i0, size, dtype=p.dtype, device=p.device)
                e = p.exponent_tile(i0, i1, a, a + size, xr, xraw, yc, out)
                sums[i0:i1] = block_terms(p, e)
                done += i1 - i0
                if progress is not None:
                    progress(done, p.n)
    return sums.log_()


def forward_blocks(p: Problem, blocks, elements: int, progress) -> torch.Tensor:
    """:func:`~.sweeps.forward` for block-diagonal groups.

    Batched plain sums, then far rows shifted.
    """
    callback, bar = progress_callback(progress, p.n, "kernel sums")
    try:
        with full_precision(), torch.no_grad():
            log_p = sweep_blocks(p, blocks, elements, callback)
            far = far_rows(p, log_p).nonzero().squeeze(1)  # the one host sync
            if far.numel() > 0:
                log_p[far] = sweep_shifted(p.subset_rows(far))
    finally:
        if bar is not None:
            bar.close()
    return log_p


class BlockLogKernelSumFn(torch.autograd.Function):
    """Block-diagonal ``log p`` of ``x`` against itself; the backward is :func:`backward`."""

    @staticmethod
    def forward(ctx, x, problem: Problem, blocks, elements, progress):
        log_p = forward_blocks(problem, blocks, elements, progress)
        ctx.problem = problem
        ctx.save_for_backward(log_p)
        return log_p

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (log_p,) = ctx.saved_tensors
        p: Problem = ctx.problem
        with full_precision(), torch.no_grad():
            gx, gy, _ = backward(p, log_p, grad, (True, True, False))
        # x is both the rows and the columns
        return (gx + gy).to(p.xs.dtype), None, None, None, None


def grouped_log_kernel_sum(
    x: ArrayLike,
    group_sizes: Sequence[int] | np.ndarray | torch.Tensor,
    h: Bandwidth = DEFAULT_BANDWIDTH,
    *,
    name: str = "x",
    progress: Progress = None,
    **options,
) -> torch.Tensor:
    """Log kernel sums of each row over its own group: ``log p(x_i | X_g(i))``.

    ``log p(x_i | X_g) = log sum_{j in g} exp(-|x_i - x_j|^2 / (2 h^2))`` (self pair
    included), where the rows of ``x`` form consecutive groups of ``group_sizes`` rows. Runs
    of equal-size groups are evaluated as ``[G, size, size]`` batched GEMMs (``G`` from the
    tile area), so the number of kernels depends on the number of such runs (sort the groups
    by size to make them few), not on the number of groups. Same numerics as
    :func:`kernel_pass` (centring on the mean of all of ``x``, GEMM expansion, self pairs
    exactly 0, floor-clamped sums, far rows recomputed shifted); the backward recomputes the
    tiles (first derivatives, w.r.t. ``x``).

    Args:
        x: descriptors ``[n, d]`` sorted by group.
        group_sizes: ``[G]`` rows of each consecutive group (``>= 0``, summing to ``n``).
        h: bandwidth (1/Å) or a 1-D sequence of bandwidths.
        name: the name of ``x`` in error messages.
        progress: ``True`` for a tqdm bar or a callable ``(done, total)``.
        **options: ``dtype``, ``centre``, ``distance``, ``tile_size``, ``budget`` and
            ``device``, as in :func:`kernel_pass` (``tile_size`` bounds the elements of a
            tile; default from the memory budget).

    Returns:
        ``[n]`` (``[n, n_h]`` for a vector ``h``) in the dtype of ``x``.
    """
    check_sweep_options(options, "grouped_log_kernel_sum")
    hs, vector = check_bandwidths(h)
    xs = Source(x, name)
    if isinstance(group_sizes, torch.Tensor):
        group_sizes = group_sizes.cpu().numpy()
    sizes = np.asarray(group_sizes, dtype=np.int64).ravel()
    if (sizes < 0).any() or int(sizes.sum()) != xs.n:
        raise ValueError(
            f"`group_sizes` must be non-negative and sum to the {xs.n} rows of `{name}`, "
            f"got a sum of {int(sizes.sum())}"
        )
    ends = np.cumsum(sizes)
    starts = ends - sizes
    problem_device = compute_device([xs], options.get("device"))
    labels = torch.from_numpy(np.repeat(np.arange(sizes.size), sizes)).to(problem_device)
    groups = Groups(labels, labels, np.repeat(starts, sizes), np.repeat(ends, sizes))
    tile_size = options.get("tile_size")
    explicit = tile_size is not None
    if not explicit:
        # the grouped 2-D tiles (backward, far rows) visit the union of their rows' groups:
        # keep them near the group size so small groups do not pay for 1024-wide tiles
        largest = max(1, int(sizes.max(initial=1)))
        tile_size = min(1024, max(64, 1 << (largest - 1).bit_length()))
    p = Problem(xs, xs, hs, groups=groups, **{**options, "tile_size": tile_size})
    elements = p.tm * p.tn if explicit else default_tile_elements(p)
    # runs of consecutive non-empty groups of equal size, found with numpy (no Python loop
    # over the groups: a dataset may hold millions of structures)
    keep = np.flatnonzero(sizes > 0)
    size_k, start_k = sizes[keep], starts[keep]
    head = np.ones(keep.size, dtype=bool)
    head[1:] = (size_k[1:] != size_k[:-1]) | (start_k[1:] != start_k[:-1] + size_k[:-1])
    heads = np.flatnonzero(head)
    counts = np.diff(np.append(heads, keep.size))
    blocks = [
        GroupBlocks(int(start_k[h]), int(c), int(size_k[h]))
        for h, c in zip(heads.tolist(), counts.tolist(), strict=True)
    ]
    if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
        log_p = BlockLogKernelSumFn.apply(x, p, blocks, elements, progress)
    else:
        log_p = forward_blocks(p, blocks, elements, progress)
    log_p = log_p.to(p.out_dtype)
    return log_p if vector else log_p[:, 0]
