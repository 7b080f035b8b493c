"""Memory budgets for tiled work: how many bytes one tile/chunk may use on a device.

Every O(N·M) or O(N·k²) computation in quests-torch is cut into pieces whose working set is
bounded by :func:`memory_budget`. The automatic budget is a fraction of the memory that is
available *now* on the compute device:

* CUDA: ``available = free + (reserved - allocated)``, i.e. the device's free memory
  (``torch.cuda.mem_get_info``) plus the blocks that PyTorch's caching allocator holds but
  does not use (``memory_reserved - memory_allocated``), which ``mem_get_info`` counts as
  used. Budget = ``fraction * available`` (default fraction 0.5), never below 256 MiB: near
  a full GPU a tiny budget only makes launch-bound tiles, and an allocation that really
  fails is retried with smaller tiles (see :mod:`quests_torch.kde`). The kernel-sum tiles are
  further capped at 8192 x 8192 on CUDA (512 MiB per float64 buffer), beyond which they gain
  nothing, so the kernel sums do not grow into whatever memory is free.
* CPU: ``fraction * MemAvailable`` (default fraction 0.25), capped at 1 GiB (bigger chunks
  only cost memory), never below 1 MiB.

Sharing a GPU (e.g. with an MLIP in another process, which allocates lazily and may need
memory later): cap quests-torch with one of

* ``QUESTS_TORCH_MEMORY_BUDGET=2G`` (bytes, or with a suffix ``K``, ``M``, ``G``, ``T``): an
  absolute budget that overrides the automatic choice everywhere (no floor, no fraction);
* ``QUESTS_TORCH_MEMORY_FRACTION=0.2``: the fraction of the available memory (0 < f <= 1)
  used by the automatic choice, on every device;
* the ``budget=`` argument of the public functions (wins over both variables).

Memory that PyTorch has cached stays reserved by this process after a call; call
``torch.cuda.empty_cache()`` to hand it back to other processes.
"""

from __future__ import annotations

import os

import torch

__all__ = ["available_memory", "memory_budget", "parse_bytes", "parse_fraction"]

_ENV = "QUESTS_TORCH_MEMORY_BUDGET"
_ENV_FRACTION = "QUESTS_TORCH_MEMORY_FRACTION"
_CPU_CAP = 1 << 30  # 1 GiB: beyond this, bigger CPU chunks only cost memory
_CPU_FRACTION = 0.25
_CUDA_FRACTION = 0.5
_MIN_BUDGET = 1 << 20  # CPU floor
_CUDA_MIN_BUDGET = 256 << 20  # below this, CUDA tiles become launch-bound


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


def parse_fraction(value: str | float) -> float:
    """Parse a memory fraction ``0 < f <= 1`` (``"0.2"``, ``"20%"`` or a float)."""
    text = str(value).strip()
    try:
        f = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(
            f"`{_ENV_FRACTION}` must be a fraction in (0, 1] such as 0.2, got {value!r}"
        ) from None
    if not 0.0 < f <= 1.0:
        raise ValueError(f"`{_ENV_FRACTION}` must be a fraction in (0, 1], got {value!r}")
    return f


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


def _cuda_available_bytes(device: torch.device) -> int:
    """Free device memory plus the caching allocator's reserved-but-unused blocks."""
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free) + max(0, int(cached))


def memory_budget(device: torch.device | str | None = None, budget: int | str | None = None) -> int:
    """Bytes that one tile's temporaries may occupy on ``device``.

    Args:
        device: where the work runs (default CPU).
        budget: explicit budget (bytes or a size string); wins over everything else.

    Returns:
        The budget in bytes: ``budget`` if given, else ``$QUESTS_TORCH_MEMORY_BUDGET``, else
        on CUDA ``max(256 MiB, f * (free + reserved - allocated))`` with ``f`` =
        ``$QUESTS_TORCH_MEMORY_FRACTION`` or 0.5, on CPU ``min(1 GiB, f * MemAvailable)``
        with ``f`` = ``$QUESTS_TORCH_MEMORY_FRACTION`` or 0.25 (see the module docstring).
    """
    if budget is not None:
        return parse_bytes(budget)
    env = os.environ.get(_ENV)
    if env:
        return parse_bytes(env)
    env_fraction = os.environ.get(_ENV_FRACTION)
    fraction = parse_fraction(env_fraction) if env_fraction else None
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        f = _CUDA_FRACTION if fraction is None else fraction
        return max(_CUDA_MIN_BUDGET, int(f * _cuda_available_bytes(device)))
    f = _CPU_FRACTION if fraction is None else fraction
    return max(_MIN_BUDGET, min(_CPU_CAP, int(f * _available_ram())))


def available_memory(device: torch.device | str | None = None) -> int:
    """Bytes that could be allocated on ``device`` now: free CUDA memory, or available RAM.

    Unlike :func:`memory_budget` (the share one tile may use) this bounds whole results, such
    as a descriptor array, that must fit at once.
    """
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        return int(_cuda_available_bytes(device))
    return int(_available_ram())
