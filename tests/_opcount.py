"""Count what torch code dispatches: ops (kernel launches on CUDA) and host-sync-type ops.

A CPU proxy for GPU launch overhead, copied from the team's counting tool so that CI can run
the op-count tests (``tests/test_bank_proxies.py``)::

    with CountOps() as c:
        bank(positions, cell, pbc)
    c.ops, c.syncs, c.by_name.most_common(10)
"""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {
    "aten._local_scalar_dense.default",  # .item(), float(t), int(t), bool(t)
    "aten.nonzero.default",
    "aten.item.default",
    "aten.equal.default",
    "aten.is_nonzero.default",
}


class CountOps(TorchDispatchMode):
    """Counts dispatched aten ops and those that force a host synchronisation."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.by_name: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        self.ops += 1
        self.by_name[name] += 1
        self.syncs += name in SYNC_OPS
        return out
