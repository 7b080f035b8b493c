"""Tile plan: default tile sizes from the memory budget, tile views and out-of-memory retries."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator

import torch

CPU_TILE = (1024, 1024)
CUDA_TILE_CAP = 8192  # 512 MiB per float64 buffer; larger tiles measured no faster


CPU_RUNNING_TILE = 1 << 17  # elements of one RunningLogKernelSum tile on a CPU (1 MB f64)
OOM_MIN_SIDE = 64  # out-of-memory retries halve the tiles down to this side, then give up


def auto_tiles(device_type: str, budget: int, itemsize: int) -> tuple[int, int]:
    """Default tile ``(rows, cols)`` for a memory budget in bytes.

    CPU: cache-sized :data:`CPU_TILE`. CUDA: square, ``budget / 8`` bytes per tile (up to 4
    tile buffers live in a multi-bandwidth backward), capped at :data:`CUDA_TILE_CAP` per
    side. Either way a small budget halves the tiles until 4 buffers fit in it.
    """
    if device_type == "cuda":
        side = int(math.sqrt(budget / (8 * itemsize)))
        tm = tn = max(64, min(CUDA_TILE_CAP, side))
    else:
        tm, tn = CPU_TILE
    while tm * tn * itemsize * 4 > budget and (tm > 1 or tn > 1):
        if tn >= tm:
            tn = max(1, tn // 2)
        else:
            tm = max(1, tm // 2)
    return tm, tn


def tile_view(storage: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor | None:
    return None if storage is None else storage[: rows * cols].view(rows, cols)


def release_cached(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def retry_on_oom(run: Callable, shrink: Callable[[], str | None], device, what: str):
    """``run()``; after a ``torch.OutOfMemoryError`` shrink the tiles and run it again.

    ``shrink()`` halves the tiles (results do not depend on them) and describes the new
    size, or returns ``None`` at the floor, where the error is re-raised with advice.
    """
    while True:
        try:
            return run()
        except torch.OutOfMemoryError as err:
            smaller = shrink()
            if smaller is None:
                raise torch.OutOfMemoryError(
                    f"{what} ran out of memory on {device} even with the smallest tiles "
                    f"({OOM_MIN_SIDE} per side): free memory on the device (other processes, "
                    f"tensors held by the caller) or compute on another device. "
                    f"Original error: {err}"
                ) from err
        # the failed attempt's tiles are unreachable once the except block is left
        release_cached(torch.device(device))
        warnings.warn(
            f"{what}: out of memory on {device}; retrying with {smaller} "
            "(results do not depend on the tile size)",
            RuntimeWarning,
            stacklevel=3,
        )


def spans(start: int, stop: int, step: int) -> Iterator[tuple[int, int]]:
    """The tile iterator: ``(a, b)`` with ``b = min(a + step, stop)`` for ``a`` in
    ``range(start, stop, step)``. Every sweep walks its row and column tiles with it."""
    for a in range(start, stop, step):
        yield a, min(a + step, stop)


def wide_tile_columns(device: torch.device, budget: int, m: int, dtype: torch.dtype, n: int) -> int:
    """Columns of an ``[m, cols]`` tile for the wide ``[m, d] x [d, n]`` products.

    Three ``[m, cols]`` temporaries fit the memory budget; on a CPU the tile is also capped
    at ~1 MB so the GEMM and the passes that follow stay in the L2 cache.
    """
    cols = budget // (3 * dtype.itemsize * max(1, m))
    if torch.device(device).type == "cpu":
        cols = min(cols, max(256, CPU_RUNNING_TILE // max(1, m)))
    return max(1, min(n, cols))


def wide_spans(
    device: torch.device, budget: int, m: int, dtype: torch.dtype, n: int
) -> Iterator[tuple[int, int]]:
    """:func:`spans` over ``n`` columns of the wide ``[m, cols]`` tiles
    (:func:`wide_tile_columns` per tile): running sums and mean distances."""
    return spans(0, n, wide_tile_columns(device, budget, m, dtype, n))
