"""The public kernel-sum entry points: kernel_pass, log_kernel_sum, nearest references."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .._precision import full_precision
from ..checks import DEFAULT_BANDWIDTH, Progress, bind_arguments, check_bandwidths
from .panels import row_panels, tile_pairs
from .problem import SWEEP_OPTIONS, KernelSums, Problem, check_sweep_options
from .source import ArrayLike, Bandwidth, Source, as_log_weights
from .sweeps import LogKernelSumFn, forward
from .tiles import retry_on_oom, tile_view


def named_kernel_pass(
    x: ArrayLike,
    y: ArrayLike,
    h: Bandwidth = DEFAULT_BANDWIDTH,
    *,
    names: tuple[str, str] = ("x", "y"),
    log_weights=None,
    n_nearest: int = 0,
    progress: Progress = None,
    **options,
) -> KernelSums:
    """:func:`kernel_pass` with the argument names used in error messages; ``options`` are
    :data:`~quests_torch.kde.engine.SWEEP_OPTIONS` plus ``groups`` and ``want_sums``."""
    check_sweep_options(options, "named_kernel_pass", ("groups", "want_sums"))
    hs, vector = check_bandwidths(h)
    same = y is x
    xs = Source(x, names[0])
    ys = xs if same else Source(y, names[1])
    if not isinstance(n_nearest, int) or n_nearest < 0:
        raise ValueError(f"`n_nearest` must be a non-negative int, got {n_nearest!r}")
    lw = as_log_weights(log_weights, options.get("device"))
    problem = Problem(xs, ys, hs, log_weights=lw, same=same, n_nearest=n_nearest, **options)
    tensors = [t if isinstance(t, torch.Tensor) else None for t in (x, y, lw)]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out = LogKernelSumFn.apply(*tensors, problem, progress)
        log_p = out[0]
        nn_d, nn_i = (out[1], out[2]) if n_nearest else (None, None)
    else:
        log_p, nn_d, nn_i = forward(problem, progress)
    log_p = log_p.to(problem.out_dtype)
    if nn_d is not None:
        nn_d = nn_d.to(problem.out_dtype)
    return KernelSums(log_p if vector else log_p[:, 0], nn_d, nn_i)


def kernel_pass(
    x: ArrayLike,
    y: ArrayLike,
    h: Bandwidth = DEFAULT_BANDWIDTH,
    *,
    log_weights: torch.Tensor | np.ndarray | None = None,
    n_nearest: int = 0,
    dtype: torch.dtype | None = None,
    centre: bool = True,
    distance: str = "matmul",
    tile_size: int | tuple[int, int] | None = None,
    budget: int | str | None = None,
    device: torch.device | str | None = None,
    progress: Progress = None,
) -> KernelSums:
    """One tiled pass over all pairs: log kernel sums and, optionally, exact nearest references.

    ``log p_k(x_i | Y) = log sum_j w_j exp(-|x_i - y_j|^2 / (2 h_k^2))`` for every bandwidth
    ``h_k`` from a single evaluation of the distances, plus the ``n_nearest`` smallest
    ``|x_i - y_j|^2`` picked from the same tiles.

    Args:
        x: queries ``[n, d]``: tensor (any device) or numpy array / memmap (streamed).
        y: references ``[m, d]``, same kinds. Passing the same object as ``x`` (``y is x``)
            uses the symmetric half-cost sweep.
        h: bandwidth ``> 0`` (1/Å), or a 1-D sequence/tensor of bandwidths.
        log_weights: optional ``[m]`` log weights ``log w_j`` (``-inf`` drops a reference).
        n_nearest: number of nearest references to return (0: none).
        dtype: compute dtype; default the promoted input dtype. ``torch.float32`` tiles are
            accumulated in float64 (relative error of ``p`` ~1e-6 on thermal Cu data), or in
            compensated float32 where float64 is off (MPS, slow-float64 CUDA cards,
            ``QUESTS_TORCH_FLOAT64=0``: float32 results, see the module notes).
        centre: subtract the mean of ``y`` from both sets before the GEMM expansion
            (recommended, essential in float32).
        distance: ``"matmul"`` (GEMM expansion, fast) or ``"direct"`` (explicit differences).
        tile_size: rows and columns per tile (an int for square tiles); default from the
            memory budget and the caches. Results do not depend on it beyond rounding.
        budget: bytes a tile's temporaries may use (see :func:`quests_torch._memory.memory_budget`).
        device: compute device when neither input is a tensor (default CPU).
        progress: ``True`` for a tqdm bar or a callable ``(rows_done, rows_total)``.

    Returns:
        :class:`KernelSums` with ``log_p`` of shape ``[n]`` (scalar ``h``) or ``[n, n_h]``
        (vector ``h``), in the promoted input dtype; differentiable w.r.t. ``x``, ``y`` and
        ``log_weights`` when they are tensors requiring grad.
    """
    sweep = (dtype, centre, distance, tile_size, budget, device)
    options = dict(zip(SWEEP_OPTIONS, sweep, strict=True))
    return named_kernel_pass(
        x, y, h, log_weights=log_weights, n_nearest=n_nearest, progress=progress, **options
    )


def log_kernel_sum(
    x: ArrayLike, y: ArrayLike, h: Bandwidth = DEFAULT_BANDWIDTH, **options
) -> torch.Tensor:
    """Log kernel density ``log p(x_i | Y) = logsumexp_j(log w_j - |x_i - y_j|^2 / (2 h^2))``.

    Tiled, never builds ``n x m``; finite for arbitrarily distant queries.

    Args:
        x: queries ``[n, d]``, as in :func:`kernel_pass`.
        y: references ``[m, d]``, as in :func:`kernel_pass`.
        h: bandwidth ``> 0`` (1/Å), or a 1-D sequence/tensor of bandwidths.
        **options: every keyword of :func:`kernel_pass` but ``n_nearest`` (``log_weights``,
            ``dtype``, ``centre``, ``distance``, ``tile_size``, ``budget``, ``device``,
            ``progress``); an unknown keyword is a ``TypeError`` naming it.

    Returns:
        ``[n]`` for a scalar ``h``, ``[n, n_h]`` for a vector of bandwidths.
    """
    args = bind_arguments(kernel_pass, "log_kernel_sum", (x, y, h), options, refuse=("n_nearest",))
    return kernel_pass(**args).log_p


def kernel_sum(
    x: ArrayLike,
    y: ArrayLike,
    h: Bandwidth = DEFAULT_BANDWIDTH,
    **kwargs,
) -> torch.Tensor:
    """Kernel density ``p(x_i | Y) = sum_j w_j exp(-|x_i - y_j|^2 / (2 h^2))``.

    ``exp`` of :func:`log_kernel_sum` (same keyword arguments); underflows to 0 for queries
    more than ~38 h from every reference, where :func:`log_kernel_sum` stays finite.

    Returns:
        ``[n]`` for a scalar ``h``, ``[n, n_h]`` for a vector of bandwidths.
    """
    return log_kernel_sum(x, y, h, **kwargs).exp()


def gather_rows(src: ArrayLike, index: torch.Tensor, device: torch.device, dtype) -> torch.Tensor:
    if isinstance(src, torch.Tensor):
        return src[index.to(src.device)].to(dtype)
    rows = np.asarray(src[index.cpu().numpy().ravel()])
    return torch.from_numpy(rows).to(device=device, dtype=dtype).view(*index.shape, -1)


def named_nearest_neighbors(
    x: ArrayLike,
    y: ArrayLike,
    n: int = 3,
    *,
    names: tuple[str, str] = ("x", "y"),
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"`n` must be a positive int, got {n!r}")
    ys_n = int(y.shape[0]) if hasattr(y, "shape") and len(y.shape) == 2 else None
    if ys_n is not None and ys_n < n:
        raise ValueError(f"`n` = {n} exceeds the number of rows of `{names[1]}` ({ys_n})")
    with torch.no_grad():
        res = named_kernel_pass(
            x, y, DEFAULT_BANDWIDTH, names=names, n_nearest=n, want_sums=False, **kwargs
        )
    idx = res.nearest_index
    dev = idx.device
    out_dtype = res.log_p.dtype
    # torch wants writable memory: a read-only memmap (a descriptor store) is copied
    xt = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.require(x, requirements="W"))
    xt = xt.to(dev)
    yg = gather_rows(y, idx, dev, out_dtype)  # [n_x, n, d]
    dist = (xt.to(out_dtype)[:, None, :] - yg).square().sum(-1).sqrt()
    idx, by_index = idx.sort(dim=1)  # exact ties in distance: lower index first
    dist = dist.gather(1, by_index)
    order = dist.detach().argsort(dim=1, stable=True)
    return dist.gather(1, order), idx.gather(1, order)


def nearest_neighbors(
    x: ArrayLike,
    y: ArrayLike,
    n: int = 3,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``n`` nearest references of every query, found from the tiled distances.

    The candidates come from the same GEMM tiles as the kernel sums (running top-n per row,
    no index structure); the returned distances are then recomputed by explicit differences
    ``|x_i - y_j|`` (exact and differentiable w.r.t. ``x`` and ``y``).

    Args:
        x: queries ``[n_x, d]`` (tensor or numpy).
        y: references ``[m, d]`` with ``m >= n``.
        n: neighbours per query.
        **kwargs: ``dtype``, ``centre``, ``tile_size``, ``budget``, ``device``, ``progress``
            as in :func:`kernel_pass`.

    Returns:
        ``(distances [n_x, n], indices [n_x, n])`` sorted by increasing distance.
    """
    return named_nearest_neighbors(x, y, n, **kwargs)


def named_first_match_within(
    x: ArrayLike,
    y: ArrayLike | None = None,
    tol: float = 1e-5,
    *,
    names: tuple[str, str] = ("x", "y"),
    tile_size=None,
    budget=None,
    device=None,
) -> torch.Tensor:
    if not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"`tol` must be a positive finite float, got {tol!r}")
    xs = Source(x, names[0])
    same = y is None or y is x
    ys = xs if same else Source(y, names[1])
    p = Problem(
        xs, ys, [1.0], dtype=torch.float64, tile_size=tile_size, budget=budget, device=device
    )
    limit = -0.5 * tol * tol
    dev = p.device
    big = p.m

    def sweep() -> torch.Tensor:
        first = torch.full((p.n,), big, dtype=torch.long, device=dev)
        (storage,) = p.buffers(1)
        for panel in row_panels(p):
            if same:  # earlier rows only: the lower triangle
                panel = [t._replace(hi=t.i1) for t in panel]
            for (i0, i1, xr, xraw, _, _), j0, j1, yc in tile_pairs(p, panel):
                buf = p.exponent(xr, xraw, yc, tile_view(storage, i1 - i0, j1 - j0))
                hit = buf >= limit
                cols = torch.arange(j0, j1, device=dev)
                if same and j1 > i0:
                    hit &= cols[None, :] < torch.arange(i0, i1, device=dev)[:, None]
                cand = torch.where(hit, cols[None, :], big).amin(1)
                torch.minimum(first[i0:i1], cand, out=first[i0:i1])
        return first

    with full_precision(), torch.no_grad():
        first = retry_on_oom(sweep, p.shrink, dev, "first_match_within")
    first[first == big] = -1
    return first


def first_match_within(
    x: ArrayLike,
    y: ArrayLike | None = None,
    tol: float = 1e-5,
    **kwargs,
) -> torch.Tensor:
    """Index of the first reference within ``tol`` of each query (``-1`` if none).

    With ``y`` omitted (or ``y is x``) the references are the *earlier* rows of ``x``:
    ``first[i] = min{j < i : |x_i - x_j| <= tol}``, so ``first >= 0`` marks duplicates.
    Distances come from centred float64 GEMM tiles (absolute error of ``|x-y|^2`` ~1e-16
    times the squared spread of the data, far below ``tol^2`` for ``tol >= 1e-7``).

    Args:
        x: descriptors ``[n, d]``.
        y: references ``[m, d]`` or ``None``.
        tol: distance tolerance ``> 0`` (descriptor units, 1/Å).
        **kwargs: ``tile_size``, ``budget``, ``device`` as in :func:`kernel_pass`.

    Returns:
        ``[n]`` int64 indices into ``y`` (or ``x``).
    """
    return named_first_match_within(x, y, tol, **kwargs)
