"""Count what a piece of torch code dispatches: ops, sync-type ops and host reads.

A CPU proxy for GPU behaviour (copied from the project's shared tools, which CI cannot see):
every dispatched op is a kernel launch on CUDA, and the sync-type ops below wait for the
device. ``Tensor.tolist()`` and ``Tensor.cpu()`` dispatch nothing on a CPU tensor but are
device-to-host transfers (syncs) on CUDA, so they are counted separately as ``host_reads``.

    with CountOps() as c:
        get_descriptors(cells)
    c.ops, c.syncs, c.host_reads, c.by_name.most_common(8)

Ops run in other threads (the CPU chunk pool) are not seen: count with one torch thread.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {
    "aten._local_scalar_dense.default",  # .item(), float(t), int(t), bool(t)
    "aten.nonzero.default",
    "aten.item.default",
    "aten.equal.default",
    "aten.is_nonzero.default",
}
_READS = ("tolist", "cpu")


class CountOps(TorchDispatchMode):
    """Counts dispatched aten ops, those that force a host sync, and tolist/cpu host reads."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.host_reads = 0
        self.by_name: Counter[str] = Counter()
        self._saved: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        self.ops += 1
        self.by_name[name] += 1
        self.syncs += name in SYNC_OPS
        return out

    def __enter__(self):
        for name in _READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(t, *a, _original=original, **kw):
                self.host_reads += 1
                return _original(t, *a, **kw)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return super().__exit__(*exc)
