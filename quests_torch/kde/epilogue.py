"""The tile epilogue: ``exp`` and the row/column sums of one tile (compiled on request)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

COMPILE_ENV = "QUESTS_TORCH_COMPILE"


def exp_sums(
    a: torch.Tensor,
    scale: torch.Tensor | None,
    lw: torch.Tensor | None,
    mask: torch.Tensor | None,
    both: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row (and column) sums of ``exp(a * scale + lw)`` over one tile, masked pairs dropped.

    The epilogue of a kernel-sum tile written as one function so that ``torch.compile``
    fuses it into a single pass over the tile (the eager path makes 3-5 passes). No clamp:
    it is used where ``exp`` has no slow denormal path (CUDA) or where the caller accepts it.
    """
    t = a if scale is None else a * scale
    if lw is not None:
        t = t + lw
    e = t.exp()
    if mask is not None:
        e = e.masked_fill(mask, 0.0)
    return e.sum(1), (e.sum(0) if both else None)


class Epilogue:
    """The compiled :func:`exp_sums`, built on first use; eager forever after a failure."""

    fn: Callable | None = None
    failed: bool = False

    @classmethod
    def wanted(cls, device: torch.device) -> bool:
        """``$QUESTS_TORCH_COMPILE``: ``1`` on every device, anything else (default) never.

        Opt-in until a GPU run of ``benchmarks/gpu_check.py`` shows the gain: compiling costs
        tens of seconds on the first call (86 s cold on a 2-core CPU), which a one-off
        entropy or the first MD step would pay, and no GPU has timed the result yet.
        """
        mode = os.environ.get(COMPILE_ENV, "0").strip().lower()
        if cls.failed:
            return False
        return mode in ("1", "true", "on", "yes")

    @classmethod
    def get(cls) -> Callable | None:
        if cls.failed:
            return None
        if cls.fn is None:
            try:
                cls.fn = torch.compile(exp_sums, fullgraph=True)
            except Exception as err:  # torch.compile unavailable (e.g. unsupported Python)
                cls.disable(err)
                return None
        return cls.fn

    @classmethod
    def disable(cls, err: BaseException) -> None:
        cls.failed = True
        warnings.warn(
            f"torch.compile of the kernel-sum tile epilogue failed ({type(err).__name__}: "
            f"{str(err).strip()[:200]}); using the eager path (same results, slower on GPUs). "
            f"Set {COMPILE_ENV}=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=4,
        )
