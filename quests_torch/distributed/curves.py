"""The entropy learning curve, its subsets computed by all ranks together when large.

Every rank draws the same :func:`quests_torch.learning_curve.plan_learning_curve` as one
process would; this module only deals its tasks out to the ranks and gathers their values.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import learning_curve as _curve
from ..checks import bind_arguments, check_bandwidths
from ..kde import ArrayLike
from ..learning_curve import CurveTask, LearningCurve, LearningCurvePlan, plan_learning_curve
from ..metrics import entropy as _entropy
from ..structures import resolve_device
from . import comm
from .kernels import check_shard, entropy, same_seed

#: learning-curve subsets with more pairs than this are computed by all ranks together
_COLLECTIVE_PAIRS = 1 << 24
_CURVE_ARGS = ("h", "sizes", "repeats", "generator", "rows")


def entropy_learning_curve(x: ArrayLike, *args, shard: str = "auto", **options) -> LearningCurve:
    """:func:`quests_torch.metrics.entropy_learning_curve` with the subsets spread over ranks.

    Every rank draws the same plan (:func:`quests_torch.learning_curve.plan_learning_curve`)
    as one process (an ``int`` seed, or with ``None`` a seed drawn on rank 0 and broadcast; a
    ``torch.Generator`` must be in the same state on every rank). Subsets with at most
    ``2^24`` pairs are dealt out whole to the ranks (largest first, to the least loaded rank)
    and computed by :func:`quests_torch.metrics.entropy`, so their values are bit-identical
    to one process; larger subsets (and the whole set) are computed by all ranks together
    with :func:`entropy`. Values are shared with one all_reduce SUM (each slot is written by
    one rank, the others add 0.0). With ``rows`` (sampled estimates) every rank computes the
    whole curve as one process.

    Args:
        x: descriptors ``[n, d]``, the same on every rank.
        *args: ``h``, ``sizes``, ``repeats``, ``generator`` and ``rows``, as
            :func:`quests_torch.metrics.entropy_learning_curve`.
        shard: how the shared subsets are split (see :func:`entropy`).
        **options: the keywords of :func:`quests_torch.metrics.entropy_learning_curve`
            (the same defaults and checks; an unknown keyword is a ``TypeError`` naming it).

    Returns:
        :class:`quests_torch.metrics.LearningCurve`, the same on every rank.
    """
    check_shard(shard)
    if not comm.is_distributed():
        return _curve.entropy_learning_curve(x, *args, **options)
    a = bind_arguments(_curve.entropy_learning_curve, "entropy_learning_curve", (x, *args), options)
    h, sizes, repeats, generator, rows = (
        a[n] for n in ("h", "sizes", "repeats", "generator", "rows")
    )
    options = a["options"]
    if rows is not None:  # sampled estimates: every rank computes the same
        return _curve.entropy_learning_curve(
            x, h, sizes, repeats, same_seed(generator), rows=rows, **options
        )
    if generator is None:
        generator = int(comm.broadcast_object(int(torch.randint(0, 2**62, (1,)).item())))
    plan = plan_learning_curve(x, sizes, repeats, generator)
    hs, vector = check_bandwidths(h)
    placed = x.device if isinstance(x, torch.Tensor) else None
    dev = resolve_device(options.get("device"), inputs=[("x", placed)], default=comm.comm_device())
    opts = dict(options)
    if not isinstance(x, torch.Tensor):
        opts["device"] = dev
    shape = (len(plan.sizes), plan.repeats) + ((len(hs),) if vector else ())
    values = torch.zeros(shape, dtype=plan.dtype, device=dev)
    for task in _dealt(plan)[comm.rank()]:
        values[task.size_index, task.repeat] = _entropy(plan.subset(x, task), h, **opts).to(dev)
    values = comm.all_reduce(values, dist.ReduceOp.SUM)
    full = None
    for task in plan.tasks:  # the shared ones, in the same order on every rank
        if not _shared(task):
            continue
        if task.rows is None:
            if full is None:
                full = entropy(x, h, shard=shard, **options)
            value = full
        else:
            value = entropy(plan.subset(x, task), h, shard=shard, **options)
        values[task.size_index, task.repeat] = value.to(dev)
    return plan.curve(values)


def _shared(task: CurveTask) -> bool:
    """Computed by all ranks together: the whole set and subsets of many pairs."""
    return task.rows is None or task.size * task.size / 2 > _COLLECTIVE_PAIRS


def _dealt(plan: LearningCurvePlan) -> list[list[CurveTask]]:
    """The tasks not shared, per rank: largest first, each to the least loaded rank."""
    w = comm.world_size()
    load = [0.0] * w
    mine: list[list[CurveTask]] = [[] for _ in range(w)]
    tasks = [t for t in plan.tasks if not _shared(t)]
    for t in sorted(tasks, key=lambda t: (-t.size, t.size_index, t.repeat)):
        q = min(range(w), key=lambda v: (load[v], v))
        load[q] += float(t.size) ** 2
        mine[q].append(t)
    return mine
