"""The entropy learning curve, its subsets computed by all ranks together when large."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from .. import metrics as _metrics
from ..checks import check_bandwidths
from ..kde import (
    DEFAULT_BANDWIDTH,
    ArrayLike,
    Bandwidth,
    engine,
)
from ..metrics import (
    LearningCurve,
    _generator,
)
from . import comm
from .kernels import check_shard, entropy, same_seed

#: learning-curve subsets with more pairs than this are computed by all ranks together
_COLLECTIVE_PAIRS = 1 << 24


def _curve_sizes(n: int, sizes) -> torch.Tensor:
    if sizes is None:
        grid = np.unique(np.round(np.geomspace(min(10, n), n, 16)).astype(np.int64))
        return torch.from_numpy(grid)
    sizes_t = torch.as_tensor(sizes).flatten().to(torch.int64).sort().values
    if sizes_t.numel() == 0:
        raise ValueError("`sizes` is empty")
    if int(sizes_t.min()) < 1 or int(sizes_t.max()) > n:
        raise ValueError(f"`sizes` must lie in [1, {n}] (the rows of `x`), got {sizes_t.tolist()}")
    return sizes_t


def entropy_learning_curve(
    x: ArrayLike,
    h: Bandwidth = DEFAULT_BANDWIDTH,
    sizes: Sequence[int] | torch.Tensor | None = None,
    repeats: int = 3,
    generator: torch.Generator | int | None = None,
    **options,
) -> LearningCurve:
    """:func:`quests_torch.metrics.entropy_learning_curve` with the subsets spread over ranks.

    Every rank draws the same random subsets in the same order as one process (an ``int``
    seed, or with ``None`` a seed drawn on rank 0 and broadcast; a ``torch.Generator`` must be
    in the same state on every rank). Subsets with at most ``2^24`` pairs are dealt out whole
    to the ranks (largest first, to the least loaded rank) and computed by
    :func:`quests_torch.metrics.entropy`, so their values are bit-identical to one process;
    larger subsets (and the whole set) are computed by all ranks together with
    :func:`entropy`. Values are shared with one all_reduce SUM (each slot is written by one
    rank, the others add 0.0).

    Returns:
        :class:`quests_torch.metrics.LearningCurve`, the same on every rank.
    """
    if not comm.is_distributed():
        check_shard(options.pop("shard", "auto"))
        return _metrics.entropy_learning_curve(x, h, sizes, repeats, generator, **options)
    rows = options.pop("rows", None)
    if rows is not None:  # sampled estimates: every rank computes the same
        options.pop("shard", None)
        return _metrics.entropy_learning_curve(
            x, h, sizes, repeats, same_seed(generator), rows=rows, **options
        )
    src = engine.Source(x, "x")
    n = src.n
    sizes_t = _curve_sizes(n, sizes)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be a positive int, got {repeats!r}")
    if generator is None:
        generator = int(comm.broadcast_object(int(torch.randint(0, 2**62, (1,)).item())))
    gen = _generator(generator)
    hs, vector = check_bandwidths(h)
    if isinstance(x, torch.Tensor):
        dev = x.device
    else:
        dev = torch.device(options.get("device") or comm.comm_device())
    opts = {key: v for key, v in options.items() if key != "shard"}
    if not isinstance(x, torch.Tensor):
        opts["device"] = dev
    tasks = []  # (slot, size, pick or None for the whole set, shared by all ranks?)
    for si, s in enumerate(sizes_t.tolist()):
        for rep in range(repeats):
            if s == n:
                tasks.append(((si, rep), s, None, True))
            else:
                pick = torch.randperm(n, generator=gen)[:s].sort().values
                tasks.append(((si, rep), s, pick, s * s / 2 > _COLLECTIVE_PAIRS))
    load = [0.0] * comm.world_size()
    mine = []
    for t in sorted((t for t in tasks if not t[3]), key=lambda t: (-t[1], t[0])):
        q = min(range(comm.world_size()), key=lambda v: (load[v], v))
        load[q] += float(t[1]) ** 2
        if q == comm.rank():
            mine.append(t)

    def subset(pick: torch.Tensor) -> ArrayLike:
        if isinstance(x, torch.Tensor):
            return x.index_select(0, pick.to(x.device))
        return np.ascontiguousarray(x[pick.numpy()])

    shape = (len(sizes_t), repeats) + ((len(hs),) if vector else ())
    values = torch.zeros(shape, dtype=src.dtype, device=dev)
    for slot, _size, pick, _shared in mine:
        values[slot] = _metrics.entropy(subset(pick), h, **opts).to(dev)
    values = comm.all_reduce(values, dist.ReduceOp.SUM)
    full = None
    for slot, _size, pick, shared in tasks:  # the same order on every rank
        if not shared:
            continue
        if pick is None:
            if full is None:
                full = entropy(x, h, **options)
            values[slot] = full.to(dev)
        else:
            values[slot] = entropy(subset(pick), h, **options).to(dev)
    mean = values.mean(1)
    std = values.std(1, correction=0)
    return LearningCurve(sizes_t, mean, std, values)
