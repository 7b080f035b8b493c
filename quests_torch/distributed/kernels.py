"""Sharded kernel sums and the metrics built on them (``shard=`` tiles, rows or cols)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from .. import metrics as _metrics
from .._memory import memory_budget
from ..checks import bind_arguments, check_bandwidths, check_threshold
from ..estimates import resolve_rows
from ..kde import DEFAULT_BANDWIDTH, ArrayLike, Bandwidth, full_precision
from ..kde import log_kernel_sum as _kde_log_kernel_sum
from ..kde.engine import (
    Problem,
    Source,
    as_log_weights,
    check_log_weights_shape,
    check_pair,
    check_sweep_options,
    compute_device,
    far_rows,
    forward,
    input_dtypes,
    progress_callback,
    sweep_plain,
    sweep_shifted,
)
from ..metrics import (
    DatasetSummary,
    check_summary_arguments,
    diversity_from_log_p,
    entropy_from_log_p,
    fraction_above,
)
from . import comm

_SHARDS = ("auto", "tiles", "rows", "cols")
#: below this many query rows per rank, "auto" shards the references instead of the queries
_MIN_ROWS_PER_RANK = 64


# --------------------------------------------------------------------------------------------
# sharded kernel sums
# --------------------------------------------------------------------------------------------


def _owned_blocks(n_blocks: int, world: int, rank_: int) -> np.ndarray:
    """Row blocks of the triangular sweep for ``rank_``: blocks ``b`` and ``B - 1 - b`` are
    paired (``B + 1`` tiles per pair), pairs dealt by longest-processing-time first."""
    units = []
    for b in range((n_blocks + 1) // 2):
        pair = (b,) if b == n_blocks - 1 - b else (b, n_blocks - 1 - b)
        units.append((sum(n_blocks - i for i in pair), pair))
    load = [0] * world
    owned = np.zeros(n_blocks, dtype=bool)
    for cost, pair in sorted(units, key=lambda u: (-u[0], u[1])):
        r = min(range(world), key=lambda q: (load[q], q))
        load[r] += cost
        if r == rank_:
            owned[list(pair)] = True
    return owned


def _rows_of(a: ArrayLike, i0: int, i1: int) -> ArrayLike:
    return a[i0:i1]  # a view for tensors and (mem)maps: only these rows are ever read


def check_shard(shard: str) -> str:
    if shard not in _SHARDS:
        raise ValueError(f"`shard` must be one of {', '.join(map(repr, _SHARDS))}, got {shard!r}")
    return shard


def _plan(shard: str, same: bool, n: int, m: int, width: int, itemsize: int, budget: int) -> str:
    fits = m * width * itemsize <= budget // 2
    if shard == "auto":
        if same:
            return "tiles" if fits else "cols"
        if not fits or n < _MIN_ROWS_PER_RANK * comm.world_size():
            return "cols"
        return "rows"
    if shard == "tiles" and not same:
        return "rows"  # the triangular sweep needs an unweighted set against itself
    return shard


def _sharded_log_p(
    x: ArrayLike,
    y: ArrayLike,
    h: Bandwidth,
    *,
    names: tuple[str, str],
    log_weights=None,
    shard: str = "auto",
    progress=None,
    **options,
) -> torch.Tensor:
    """``log p(x_i | y)`` computed by all ranks together; the whole result on every rank."""
    check_shard(shard)
    check_sweep_options(options, "log_kernel_sum")
    device = options.get("device")
    hs, vector = check_bandwidths(h)
    same = y is x
    xs = Source(x, names[0])
    ys = xs if same else Source(y, names[1])
    check_pair(xs, ys)
    lw = as_log_weights(log_weights, device)
    if lw is not None:
        check_log_weights_shape(lw, ys)
    if device is None and xs.device is None and ys.device is None:
        device = comm.comm_device()
    dev = compute_device([xs, ys], device)
    out_dtype, compute_dtype = input_dtypes(xs, ys, options.get("dtype"))
    plan = _plan(
        shard,
        same and lw is None,
        xs.n,
        ys.n,
        ys.d + 3,
        compute_dtype.itemsize,
        memory_budget(dev, options.get("budget")),
    )
    common = {"centre": True, "tile_size": None, **options, "device": dev}
    progress = progress if comm.rank() == 0 else None
    if plan == "tiles":
        log_p = _tiles_log_p(xs, hs, common, progress)
    elif plan == "rows":
        log_p = _rows_log_p(x, xs, ys, hs, lw, same, common, progress)
    else:
        log_p = _cols_log_p(xs, y, ys, hs, lw, same, names[1], common, progress)
    log_p = log_p.to(out_dtype)
    return log_p if vector else log_p[:, 0]


def _tiles_log_p(xs: Source, hs: list[float], common: dict, progress) -> torch.Tensor:
    """Plan ``tiles``: the triangular sweep of ``x`` against itself, row tiles dealt over the
    ranks (:func:`_owned_blocks`), partial sums combined, far rows shared out and rescued."""
    w, r = comm.world_size(), comm.rank()
    p = Problem(xs, xs, hs, same=True, **common)
    if not p.same:  # pragma: no cover - guarded by _plan
        raise RuntimeError("internal: the triangular sweep needs an unweighted self pass")
    n_blocks = -(-p.n // p.tm)
    if common["tile_size"] is None:
        # a multiple of 2W blocks (at least 4W): the folded pairs divide evenly over the
        # ranks; tiles only shrink, never below 64 rows
        target = -(-max(n_blocks, 4 * w) // (2 * w)) * (2 * w)
        p.set_tiles(min(p.tm, max(64, -(-p.n // target))))
        n_blocks = -(-p.n // p.tm)
    p.owned = _owned_blocks(n_blocks, w, r)
    callback, bar = progress_callback(progress, p.n, "kernel sums")
    try:
        with full_precision(), torch.no_grad():
            log_p = comm.logsumexp_ranks(sweep_plain(p, callback).log_p)
            far_flag = far_rows(p, log_p).to(torch.float64)
            far = (comm.all_reduce(far_flag, dist.ReduceOp.MAX) > 0).nonzero().squeeze(1)
            if far.numel() > 0:
                f0, f1 = comm.shard_range(int(far.numel()))
                if f1 > f0:
                    part = sweep_shifted(p.subset_rows(far[f0:f1]))
                else:
                    part = torch.empty(0, len(hs), dtype=p.acc, device=p.device)
                log_p[far] = comm.all_gather_rows(part, comm.shard_counts(int(far.numel())))
    finally:
        if bar is not None:
            bar.close()
    return log_p


def _rows_log_p(x, xs: Source, ys: Source, hs, lw, same: bool, common: dict, progress):
    """Plan ``rows``: each rank its block of query rows against all references."""
    r0, r1 = comm.shard_range(xs.n)
    if r1 > r0:
        xl = Source(_rows_of(x, r0, r1), xs.name)
        p = Problem(xl, ys, hs, log_weights=lw, pin=same, offsets=(r0, 0), **common)
        local = forward(p, progress).log_p
    else:
        local = torch.empty(0, len(hs), dtype=torch.float64, device=common["device"])
    return comm.all_gather_rows(local, comm.shard_counts(xs.n))


def _cols_log_p(xs: Source, y, ys: Source, hs, lw, same: bool, name: str, common, progress):
    """Plan ``cols``: each rank all queries against its block of references (centred on the
    global mean of the references), partial sums combined by a log-sum-exp over ranks."""
    dev = common["device"]
    c0, c1 = comm.shard_range(ys.n)
    mu = None
    if common["centre"]:
        total = torch.zeros(ys.d, dtype=torch.float64, device=dev)
        if c1 > c0:
            yl = Source(_rows_of(y, c0, c1), name)
            chunk = max(1, (1 << 24) // (8 * ys.d))
            total = yl.check_finite_and_mean(dev, chunk) * (c1 - c0)
        mu = comm.all_reduce(total, dist.ReduceOp.SUM) / ys.n
    lw_l = None if lw is None else lw[c0:c1]
    empty = c1 <= c0 or (lw_l is not None and not bool(torch.isfinite(lw_l).any()))
    if empty:
        local = torch.full((xs.n, len(hs)), -math.inf, dtype=torch.float64, device=dev)
    else:
        yl = Source(_rows_of(y, c0, c1), name)
        p = Problem(xs, yl, hs, log_weights=lw_l, pin=same, offsets=(0, c0), mu=mu, **common)
        local = forward(p, progress).log_p
    log_p = comm.logsumexp_ranks(local)
    if lw is not None and not bool(torch.isfinite(log_p).any()):
        raise ValueError("`log_weights` are all -inf (every weight is zero)")
    return log_p


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def _twin(single, args: tuple, options: dict, shard: str, sharded):
    """``single(*args, **options)`` in one process; with several ranks ``sharded`` of the
    arguments bound to ``single``'s signature (its defaults and an unknown keyword's
    ``TypeError``, as a call of ``single`` gives them)."""
    check_shard(shard)
    if not comm.is_distributed():
        return single(*args, **options)
    return sharded(bind_arguments(single, single.__name__, args, options))


def log_kernel_sum(
    x: ArrayLike, y: ArrayLike, *args, shard: str = "auto", **options
) -> torch.Tensor:
    """:func:`quests_torch.kde.log_kernel_sum` computed by all ranks together.

    ``log p(x_i | Y) = logsumexp_j(log w_j - |x_i - y_j|^2 / (2 h^2))``; ``y is x`` uses the
    symmetric sweep (``shard="tiles"``).

    Args:
        x: queries ``[n, d]``, the same on every rank (tensor, numpy array or memmap).
        y: references ``[m, d]``, the same on every rank.
        *args: ``h``, as :func:`quests_torch.kde.log_kernel_sum`.
        shard: ``"auto"``, ``"tiles"`` (``y is x`` only), ``"rows"`` or ``"cols"`` (see the
            module docstring).
        **options: the keywords of :func:`quests_torch.kde.log_kernel_sum`.

    Returns:
        ``[n]`` (``[n, n_h]`` for a vector ``h``) on every rank; not differentiable when
        distributed.
    """

    def sharded(a: dict) -> torch.Tensor:
        return _sharded_log_p(x, y, a["h"], names=("x", "y"), shard=shard, **a["options"])

    return _twin(_kde_log_kernel_sum, (x, y, *args), options, shard, sharded)


def same_seed(generator):
    """``generator`` itself, or for ``None`` a seed drawn on rank 0 and broadcast."""
    if generator is None:
        return int(comm.broadcast_object(int(torch.randint(0, 2**62, (1,)).item())))
    return generator


def _self_log_p(x: ArrayLike, h: Bandwidth, options: dict) -> torch.Tensor:
    return _sharded_log_p(x, x, h, names=("x", "x"), **options)


def entropy(x: ArrayLike, h: Bandwidth = DEFAULT_BANDWIDTH, **options) -> torch.Tensor:
    """:func:`quests_torch.metrics.entropy` computed by all ranks together.

    ``H(X) = log n - (1/n) sum_i log p(x_i | X)``, the sum over all ``n`` rows gathered on
    every rank in order, then reduced exactly as in one process.

    Args:
        x: descriptors ``[n, d]``, the same on every rank.
        h: bandwidth (1/Å) or a 1-D sequence of bandwidths.
        **options: ``shard`` plus the options of :func:`quests_torch.kde.kernel_pass`.

    Returns:
        0-d tensor (``[n_h]`` for a vector ``h``), the same on every rank.
    """
    if not comm.is_distributed():
        check_shard(options.pop("shard", "auto"))
        return _metrics.entropy(x, h, **options)
    return entropy_from_log_p(_self_log_p(x, h, options))


def diversity(x: ArrayLike, h: Bandwidth = DEFAULT_BANDWIDTH, **options) -> torch.Tensor:
    """:func:`quests_torch.metrics.diversity` (``D = log sum_i 1 / p(x_i | X)``), all ranks
    together; see :func:`entropy`."""
    if not comm.is_distributed():
        check_shard(options.pop("shard", "auto"))
        return _metrics.diversity(x, h, **options)
    return diversity_from_log_p(_self_log_p(x, h, options))


def delta_entropy(
    y: ArrayLike, x: ArrayLike, *args, shard: str = "auto", **options
) -> torch.Tensor:
    """:func:`quests_torch.metrics.delta_entropy` (``dH(y_i | X) = -log p(y_i | X)``), all
    ranks together.

    Args:
        y: test descriptors ``[n_y, d]``, the same on every rank.
        x: reference descriptors ``[n_x, d]``, the same on every rank.
        *args: ``h``, as :func:`quests_torch.metrics.delta_entropy`.
        shard: how the pairs are split (see :func:`log_kernel_sum`).
        **options: the options of :func:`quests_torch.kde.kernel_pass`.

    Returns:
        ``[n_y]`` (``[n_y, n_h]``) on every rank.
    """
    return _twin(
        _metrics.delta_entropy, (y, x, *args), options, shard, lambda a: -_log_p_of(a, shard)
    )


def _log_p_of(a: dict, shard: str) -> torch.Tensor:
    """The sharded ``log p(y | x)`` of the bound arguments ``a`` of a metric of ``(y, x)``."""
    return _sharded_log_p(a["y"], a["x"], a["h"], names=("y", "x"), shard=shard, **a["options"])


def _novel_fraction(a: dict, shard: str) -> torch.Tensor:
    """The sharded fraction with ``dH > threshold`` of the bound arguments ``a``."""
    threshold = check_threshold(a["threshold"])
    return fraction_above(-_log_p_of(a, shard), threshold)


def novelty(y: ArrayLike, x: ArrayLike, *args, shard: str = "auto", **options) -> torch.Tensor:
    """:func:`quests_torch.metrics.novelty` (fraction with ``dH > threshold``), all ranks.

    Args:
        y: test descriptors ``[n_y, d]``, the same on every rank.
        x: reference descriptors ``[n_x, d]``, the same on every rank.
        *args: ``h`` and ``threshold``, as :func:`quests_torch.metrics.novelty`.
        shard: how the pairs are split (see :func:`log_kernel_sum`).
        **options: the keywords of :func:`quests_torch.metrics.novelty`.

    Returns:
        0-d tensor (``[n_h]`` for a vector ``h``) on every rank.
    """
    return _twin(
        _metrics.novelty, (y, x, *args), options, shard, lambda a: _novel_fraction(a, shard)
    )


def overlap(y: ArrayLike, x: ArrayLike, *args, shard: str = "auto", **options) -> torch.Tensor:
    """:func:`quests_torch.metrics.overlap` (``1 - novelty``), all ranks together; arguments
    as :func:`novelty`."""
    return 1.0 - novelty(y, x, *args, shard=shard, **options)


def dataset_summary(x: ArrayLike, *args, shard: str = "auto", **options) -> DatasetSummary:
    """:func:`quests_torch.metrics.dataset_summary` (size, ``H``, ``log n``, ``D``, overlaps),
    all ranks together; ``H`` and ``D`` share one sharded kernel pass.

    With ``rows`` (sampled estimates, ``m n`` pairs) every rank computes the same estimates
    from the same sampled rows (an int seed, or with ``generator=None`` a seed drawn on rank 0
    and broadcast); the exact path is sharded.

    Args:
        x: descriptors ``[n, d]``, the same on every rank.
        *args: ``h``, ``other``, ``threshold``, ``rows`` and ``generator``, as
            :func:`quests_torch.metrics.dataset_summary`.
        shard: how the pairs are split (see :func:`log_kernel_sum`).
        **options: the keywords of :func:`quests_torch.metrics.dataset_summary`.

    Returns:
        :class:`quests_torch.metrics.DatasetSummary`, the same on every rank.
    """
    single = _metrics.dataset_summary
    return _twin(single, (x, *args), options, shard, lambda a: _sharded_summary(a, shard))


def _sharded_summary(a: dict, shard: str) -> DatasetSummary:
    x, h, other, threshold, rows = (a[n] for n in ("x", "h", "other", "threshold", "rows"))
    options = a["options"]
    if resolve_rows(rows, Source(x, "x").n) < Source(x, "x").n:
        a = {**a, "generator": same_seed(a["generator"])}
        return _metrics.dataset_summary(**{n: v for n, v in a.items() if n != "options"}, **options)
    threshold = check_summary_arguments(h, threshold)
    log_p = _self_log_p(x, h, {"shard": shard, **options})
    ov = ov_other = None
    if other is not None:
        ov = overlap(x, other, h, threshold, shard=shard, **options)
        ov_other = overlap(other, x, h, threshold, shard=shard, **options)
    return DatasetSummary.from_log_p(log_p, ov, ov_other)
