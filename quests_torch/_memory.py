"""Memory budgets for tiled work: how many bytes one tile/chunk may use on a device.

Every O(N·M) or O(N·k²) computation in quests-torch is cut into pieces whose working set is
bounded by :func:`memory_budget`. On CUDA the budget is a share of the *free* device memory
(``torch.cuda.mem_get_info``); on CPU it is a share of the available RAM, capped so that
tiles stay friendly to the caches and the allocator. ``QUESTS_TORCH_MEMORY_BUDGET`` (bytes,
or with a suffix ``K``, ``M``, ``G``) overrides the automatic choice everywhere.
"""

from __future__ import annotations

import os

import torch

__all__ = ["available_memory", "memory_budget", "parse_bytes"]

_ENV = "QUESTS_TORCH_MEMORY_BUDGET"
_CPU_CAP = 1 << 30  # 1 GiB: beyond this, bigger CPU chunks only cost memory
_MIN_BUDGET = 1 << 20


def parse_bytes(value: str | int) -> int:
    """Parse ``"512M"``, ``"2G"``, ``"1048576"`` (or an int) into a number of bytes."""
    if isinstance(value, int):
        n = value
    else:
        text = str(value).strip().upper().removesuffix("B").removesuffix("I")
        scale = 1
        for suffix, mult in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
            if text.endswith(suffix):
                text, scale = text[:-1], mult
                break
        try:
            n = int(float(text) * scale)
        except ValueError:
            raise ValueError(
                f"memory budget must be a size such as '512M' or '2G', got {value!r}"
            ) from None
    if n <= 0:
        raise ValueError(f"memory budget must be positive, got {value!r}")
    return n


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def memory_budget(device: torch.device | str | None = None, budget: int | str | None = None) -> int:
    """Bytes that one tile's temporaries may occupy on ``device``.

    Args:
        device: where the work runs (default CPU).
        budget: explicit budget (bytes or a size string); wins over everything else.

    Returns:
        The budget in bytes: ``budget`` if given, else ``$QUESTS_TORCH_MEMORY_BUDGET``, else
        half of the free CUDA memory, or on CPU a quarter of the available RAM capped at 1 GiB.
    """
    if budget is not None:
        return parse_bytes(budget)
    env = os.environ.get(_ENV)
    if env:
        return parse_bytes(env)
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(_MIN_BUDGET, free // 2)
    return max(_MIN_BUDGET, min(_CPU_CAP, _available_ram() // 4))


def available_memory(device: torch.device | str | None = None) -> int:
    """Bytes that could be allocated on ``device`` now: free CUDA memory, or available RAM.

    Unlike :func:`memory_budget` (the share one tile may use) this bounds whole results, such
    as a descriptor array, that must fit at once.
    """
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(_available_ram())
