"""Tiled sweeps: plain (triangular), shifted far-row rescue, forward driver and backward."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from .._precision import full_precision
from ..checks import Progress
from .epilogue import Epilogue
from .fused import fused_log_sums, use_fused
from .panels import row_panels, tile_pairs
from .problem import KernelSums, Problem
from .source import progress_callback
from .tiles import retry_on_oom, tile_view
from .topk import merge_top, tile_top


def tile_sums(p: Problem, buf, tmp, j0: int, j1: int, k: int, mask, both: bool):
    """Row (and, for ``both``, column) sums of ``exp`` of one tile's exponents for ``h_k``.

    Compiled (one fused pass, no clamp) when :class:`Epilogue` is wanted and works, else
    eager in place in ``buf``/``tmp`` (clamped at the floor off CUDA). Both agree to ~1e-15.
    """
    if p.fused:
        fn = Epilogue.get()
        if fn is not None:
            lw = p.lw[j0:j1] if p.lw is not None and not p.fold_lw else None
            try:
                return fn(buf, p.scale_tensors[k], lw, mask, both)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # compilation failed: eager from now on
                Epilogue.disable(err)
                p.fused = False
    t = p.terms(buf, tmp, j0, j1, k)
    if p.clamp:
        t.clamp_(min=p.floor)
    t.exp_()
    if mask is not None:
        t.masked_fill_(mask, 0.0)
    return t.sum(1), (t.sum(0) if both else None)


def sweep_plain(p: Problem, progress) -> KernelSums:
    """Unshifted sums (clamped at the floor off CUDA); optional exact top-k; triangular
    when ``x is y``."""
    n_h = len(p.hs)
    dev = p.device
    sums = torch.zeros(p.n, n_h, dtype=p.acc, device=dev)
    comp = None if p.f64 else torch.zeros_like(sums)  # float32-only: Neumaier compensation
    k_nn = min(p.n_nearest, p.m)
    best = best_idx = None
    if k_nn:
        best = torch.full((p.n, k_nn), -math.inf, dtype=p.dtype, device=dev)
        best_idx = torch.full((p.n, k_nn), -1, dtype=torch.long, device=dev)
    storage, tmp_storage = p.buffers(2) if p.multi else (*p.buffers(1), None)
    for panel in row_panels(p, triangular=p.same):
        for (i0, i1, xr, xraw, _, _), j0, j1, yc in tile_pairs(p, panel):
            buf = tile_view(storage, i1 - i0, j1 - j0)
            tmp = tile_view(tmp_storage, i1 - i0, j1 - j0)
            p.exponent_tile(i0, i1, j0, j1, xr, xraw, yc, buf)
            if k_nn:
                v, ix = tile_top(buf, min(k_nn, j1 - j0))
                merge_top(best[i0:i1], best_idx[i0:i1], v, ix.add_(j0), k_nn)
            if not p.want_sums:
                continue
            mask = p.group_mask(i0, i1, j0, j1)
            both = p.same and j0 != i0  # off-diagonal tile of a symmetric sweep
            row_parts, col_parts = [], []
            for k in range(n_h):
                row, col = tile_sums(p, buf, tmp, j0, j1, k, mask, both)
                row_parts.append(row)
                if both:
                    col_parts.append(col)
            accumulate(sums, comp, i0, i1, torch.stack(row_parts, 1))
            if both:
                accumulate(sums, comp, j0, j1, torch.stack(col_parts, 1))
        if progress is not None:
            progress(panel[-1].i1, p.n)
    nearest = None
    if k_nn:
        nearest = (best.to(p.acc) * (-2.0 / p.c0)).clamp_(min=0.0)
    if comp is not None:
        sums += comp
    return KernelSums(sums.log_(), nearest, best_idx)


def accumulate(
    sums: torch.Tensor, comp: torch.Tensor | None, i0: int, i1: int, values: torch.Tensor
) -> None:
    """``sums[i0:i1] += values``; with ``comp`` (float32-only mode) Neumaier-compensated:
    ``comp`` collects the low-order bits each addition drops, ``sums + comp`` is the total
    (error ~eps_32 instead of ~eps_32 x number of tiles)."""
    if comp is None:
        sums[i0:i1] += values
        return
    s = sums[i0:i1]
    t = s + values
    lost = torch.where(s.abs() >= values.abs(), (s - t) + values, (values - t) + s)
    comp[i0:i1] += lost
    s.copy_(t)


def sweep_shifted(p: Problem) -> torch.Tensor:
    """Online log-sum-exp with a running row maximum: accurate for arbitrarily far rows."""
    n_h = len(p.hs)
    dev = p.device
    out = torch.empty(p.n, n_h, dtype=p.acc, device=dev)
    lowest = torch.finfo(p.dtype).min / 4
    storage, tmp_storage = p.buffers(2) if p.multi else (*p.buffers(1), None)
    for panel in row_panels(p):
        r0, r1 = panel[0].i0, panel[-1].i1  # the running state of the whole row panel
        run_max = torch.full((r1 - r0, n_h), -math.inf, dtype=p.dtype, device=dev)
        run_sum = torch.zeros(r1 - r0, n_h, dtype=p.acc, device=dev)
        run_comp = None if p.f64 else torch.zeros_like(run_sum)
        for (i0, i1, xr, xraw, _, _), j0, j1, yc in tile_pairs(p, panel):
            buf = tile_view(storage, i1 - i0, j1 - j0)
            tmp = tile_view(tmp_storage, i1 - i0, j1 - j0)
            p.exponent(xr, xraw, yc, buf)
            mask = p.group_mask(i0, i1, j0, j1)
            rows = slice(i0 - r0, i1 - r0)
            comp = None if run_comp is None else run_comp[rows]
            for k in range(n_h):
                t = p.terms(buf, tmp, j0, j1, k)
                if mask is not None:
                    t.masked_fill_(mask, lowest)  # finite: keeps the rescale factors NaN-free
                online_step(p, t, mask, run_max[rows], run_sum[rows], comp, k)
        if run_comp is not None:
            run_sum += run_comp
        out[r0:r1] = run_max.to(p.acc) + run_sum.log()
    return out


def online_step(p: Problem, t, mask, run_max, run_sum, run_comp, k: int) -> None:
    """Fold the exponents ``t`` of one tile into the running maximum and sum of ``h_k``
    (in place; ``t`` is overwritten): rescale the sum to the new maximum, add ``exp``."""
    new_max = torch.maximum(run_max[:, k], t.amax(1))
    t.sub_(new_max[:, None])
    if p.clamp:
        t.clamp_(min=p.floor)
    t.exp_()
    if mask is not None:
        t.masked_fill_(mask, 0.0)
    rescale = torch.exp((run_max[:, k] - new_max).to(p.acc))
    if run_comp is None:
        run_sum[:, k] = run_sum[:, k] * rescale + t.sum(1)
    else:  # rescale sum and compensation, then a Neumaier step
        s = run_sum[:, k] * rescale
        run_comp[:, k] *= rescale
        v = t.sum(1)
        tot = s + v
        run_comp[:, k] += torch.where(s.abs() >= v.abs(), (s - tot) + v, (v - tot) + s)
        run_sum[:, k] = tot
    run_max[:, k] = new_max


def far_rows(p: Problem, log_p: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: rows whose plain sums are too small for the floor clamp to be negligible.

    The clamp at ``p.floor`` changes a sum by at most ``m e^floor``; below
    ``log p < floor + log m + log(1/eps)`` that is no longer within rounding, and the row is
    recomputed by :func:`sweep_shifted` (no host sync here: the caller decides).
    """
    threshold = p.floor + math.log(p.m) - math.log(p.eps)
    return (log_p < threshold).any(1)


def forward(p: Problem, progress: Progress, out_dtype: torch.dtype | None = None) -> KernelSums:
    """Plain sweep, then the shifted sweep for the rows whose sums are too small; or the
    fused Triton kernel where it is chosen and covers the problem (:mod:`.fused`).

    Each sweep is redone with smaller tiles after an out-of-memory error. ``out_dtype``: the
    dtype the fused kernel stores ``log_p`` in when the problem has no weights (no conversion
    launch afterwards); the other paths return the accumulator dtype.
    """
    callback, bar = progress_callback(progress, p.n, "kernel sums")
    try:
        with full_precision(), torch.no_grad():
            if use_fused(p):  # one pass, far rows included: the online sums are shifted
                if p.lw is None:  # lw_max is 0 without weights: no op to launch
                    return KernelSums(fused_log_sums(p, callback, out_dtype), None, None)
                log_p = fused_log_sums(p, callback)
                log_p += p.lw_max
                return KernelSums(log_p, None, None)
            res = retry_on_oom(lambda: sweep_plain(p, callback), p.shrink, p.device, "kernel sums")
            log_p = res.log_p
            if not p.want_sums:
                return res
            far = far_rows(p, log_p).nonzero().squeeze(1)  # the one host sync
            if far.numel() > 0:
                sub = p.subset_rows(far)
                log_p[far] = retry_on_oom(
                    lambda: sweep_shifted(sub), sub.shrink, p.device, "kernel sums (far rows)"
                )
            log_p += p.lw_max
    finally:
        if bar is not None:
            bar.close()
    return KernelSums(log_p, res.nearest_sq_dist, res.nearest_index)


def backward(p: Problem, log_p: torch.Tensor, grad: torch.Tensor, need: Sequence[bool]):
    """Gradients of ``sum(grad * log_p)`` w.r.t. ``x``, ``y`` and the log weights.

    With ``P_ijk = w_j K_k(x_i, y_j) / p_k(x_i)`` and ``W_ij = sum_k grad_ik P_ijk / h_k^2``::

        dL/dx_i  = sum_j W_ij (y_j - x_i)
        dL/dy_j  = sum_i W_ij (x_i - y_j)
        dL/dlw_j = sum_ik grad_ik P_ijk
    """
    need_x, need_y, need_w = need
    dev, dt = p.device, p.dtype
    n_h = len(p.hs)
    gx = torch.zeros(p.n, p.d, dtype=p.acc, device=dev) if need_x else None
    gy = torch.zeros(p.m, p.d, dtype=p.acc, device=dev) if need_y else None
    gw = torch.zeros(p.m, dtype=p.acc, device=dev) if need_w else None
    lp = (log_p.to(p.acc) - p.lw_max).to(dt)  # log sums of the exponents actually evaluated
    g = grad.to(dt)
    storage, tmp_storage, w_storage, v_storage = p.buffers(4 if p.multi else 1) + [None] * (
        0 if p.multi else 3
    )
    for panel in row_panels(p):
        r0, r1 = panel[0].i0, panel[-1].i1
        gxp = torch.zeros(r1 - r0, p.d, dtype=dt, device=dev) if need_x else None
        for (i0, i1, xr, xraw, _, _), j0, j1, yc in tile_pairs(p, panel):
            yraw = yc[:, : p.d]
            buf = tile_view(storage, i1 - i0, j1 - j0)
            tmp = tile_view(tmp_storage, i1 - i0, j1 - j0)
            p.exponent_tile(i0, i1, j0, j1, xr, xraw, yc, buf)
            mask = p.group_mask(i0, i1, j0, j1)
            if not p.multi:
                t = p.terms(buf, tmp, j0, j1, 0)
                v = w = weighted_probabilities(p, t, lp[i0:i1, :1], g[i0:i1, :1], mask)
                scale = p.c0  # V = grad * P, W = c0 * V
            else:
                w = tile_view(w_storage, i1 - i0, j1 - j0).zero_()
                v = tile_view(v_storage, i1 - i0, j1 - j0).zero_() if need_w else None
                for k in range(n_h):
                    t = p.terms(buf, tmp, j0, j1, k)
                    cut = slice(k, k + 1)
                    t = weighted_probabilities(p, t, lp[i0:i1, cut], g[i0:i1, cut], mask)
                    if v is not None:
                        v.add_(t)
                    w.add_(t, alpha=p.scales[k])
                scale = 1.0
            if need_w:
                gw[j0:j1] += v.sum(0).to(p.acc)
            if need_x:
                part = torch.mm(w, yraw) - w.sum(1)[:, None] * xraw
                gxp[i0 - r0 : i1 - r0].add_(part, alpha=scale)
            if need_y:
                part = torch.mm(w.T, xraw) - w.sum(0)[:, None] * yraw
                gy[j0:j1] += part.to(p.acc).mul_(scale)
        if need_x:
            gx[r0:r1] = gxp.to(p.acc)
    return gx, gy, gw


def weighted_probabilities(p: Problem, t, lp, g, mask) -> torch.Tensor:
    """``grad * P`` of one tile for one bandwidth, in place in its exponents ``t``:
    ``exp(t - log p)`` (clamped at the floor off CUDA), masked pairs zeroed, times ``grad``."""
    t.sub_(lp)
    if p.clamp:
        t.clamp_(min=p.floor)
    t.exp_()
    if mask is not None:
        t.masked_fill_(mask, 0.0)
    return t.mul_(g)


class LogKernelSumFn(torch.autograd.Function):
    """``log p`` with a tile-recomputing backward; inputs ``x``, ``y``, ``log_w`` (or None)."""

    @staticmethod
    def forward(ctx, x, y, log_w, problem: Problem, progress):
        res = forward(problem, progress)
        ctx.problem = problem
        ctx.save_for_backward(res.log_p)
        extra = [t for t in (res.nearest_sq_dist, res.nearest_index) if t is not None]
        ctx.mark_non_differentiable(*extra)
        return (res.log_p, *extra)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, *_ignored):
        (log_p,) = ctx.saved_tensors
        p: Problem = ctx.problem
        need = ctx.needs_input_grad[:3]
        with full_precision(), torch.no_grad():
            gx, gy, gw = retry_on_oom(
                lambda: backward(p, log_p, grad, need), p.shrink, p.device, "kernel-sum backward"
            )
        return (
            None if gx is None else gx.to(p.xs.dtype),
            None if gy is None else gy.to(p.ys.dtype),
            gw,
            None,
            None,
        )
