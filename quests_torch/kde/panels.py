"""Row and column panels of the tiled sweeps: the references read once per row panel.

When the prepared references do not fit the memory budget (``Problem.cols_resident`` is
``None``), rebuilding every column tile for every row tile would read them from the host
``ceil(n / tm)`` times. The sweeps instead keep a row panel (as many row tiles as the budget
allows, :meth:`Problem.panel_sizes`) on the device and walk the column panels once per row
panel: ``ceil(n / (tiles * tm))`` passes. A column panel crosses to the device in the
source's own dtype (a float32 memmap moves 4 bytes a value) and is converted, centred and
augmented there; on CUDA the next panel is read into pinned memory and copied on a side
stream while the current one computes (double-buffered).

Every row tile still meets its column tiles in increasing order, cut at the same places
(panels start on the tile grid; only a group's column range, which starts anywhere, may be
cut at a panel edge), and the row tiles of a panel meet each column tile in increasing
order: the sums are accumulated in the order of the plain tile loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch

from .tiles import spans

if TYPE_CHECKING:
    from .problem import Problem


class RowTile(NamedTuple):
    """One row tile of a panel: rows ``[i0, i1)``, prepared and centred, and the columns
    ``[lo, hi)`` it visits."""

    i0: int
    i1: int
    xr: torch.Tensor
    xraw: torch.Tensor
    lo: int
    hi: int


def row_panels(p: Problem, triangular: bool = False) -> Iterator[list[RowTile]]:
    """The row panels of ``p``: lists of consecutive row tiles (``p.tm`` rows each)."""
    tiles, _ = p.panel_sizes()
    for a, b in spans(0, p.n, tiles * p.tm):
        panel = []
        for i0, i1 in spans(a, b, p.tm):
            lo, hi = p.col_range(i0, i1, triangular)
            panel.append(RowTile(i0, i1, *p.rows(i0, i1), lo, hi))
        yield panel


def tile_pairs(
    p: Problem, panel: list[RowTile]
) -> Iterator[tuple[RowTile, int, int, torch.Tensor]]:
    """``(row tile, j0, j1, prepared columns j0:j1)`` for every tile of a row panel, column
    panel by column panel (each read once), row tiles in order within a column panel."""
    live = [t for t in panel if t.hi > t.lo]
    if not live:
        return
    lo, hi = min(t.lo for t in live), max(t.hi for t in live)
    for c0, c1, cols in column_panels(p, lo, hi):
        for t in live:
            for j0, j1 in clipped_spans(t.lo, t.hi, p.tn, c0, c1):
                yield t, j0, j1, cols[j0 - c0 : j1 - c0]


def clipped_spans(lo: int, hi: int, step: int, c0: int, c1: int) -> Iterator[tuple[int, int]]:
    """The tiles of ``spans(lo, hi, step)`` that meet ``[c0, c1)``, cut to it."""
    if hi <= c0 or lo >= c1:
        return
    start = lo + max(0, (c0 - lo) // step) * step
    for a in range(start, min(hi, c1), step):
        yield max(a, c0), min(a + step, hi, c1)


def column_panels(p: Problem, lo: int, hi: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(c0, c1, prepared columns c0:c1)`` over ``[lo, hi)`` in panels of
    :meth:`Problem.panel_sizes` columns: slices of the resident block, panels prefetched from
    host memory on CUDA, or read when asked for (CPU, or a tensor already on the device)."""
    _, width = p.panel_sizes()
    bounds = list(spans(lo, hi, width))
    if p.cols_resident is not None:
        for c0, c1 in bounds:
            yield c0, c1, p.cols_resident[c0:c1]
    elif p.device.type == "cuda" and p.ys.tensor is None:
        yield from prefetched(p, bounds, width)
    else:
        for c0, c1 in bounds:
            yield c0, c1, p.build_cols(c0, c1, p.ys.rows(c0, c1, p.device, None))


def prefetched(
    p: Problem, bounds: list[tuple[int, int]], width: int
) -> Iterator[tuple[int, int, torch.Tensor]]:  # pragma: no cover - needs CUDA
    """Column panels of a host source on CUDA, each read and copied while the one before
    computes.

    Two slots: panel ``k`` is read into pinned host memory ``host[k % 2]`` (after that slot's
    previous copy has finished), copied on a side stream into ``landed[k % 2]`` (after the
    compute stream has finished with that buffer) and prepared on the compute stream once
    the copy has landed. The host read of panel ``k + 1`` runs while the GPU works on ``k``.
    """
    dev, raw = p.device, p.ys.storage_dtype
    main = torch.cuda.current_stream(dev)
    side = torch.cuda.Stream(device=dev)
    host = [torch.empty(width, p.d, dtype=raw, pin_memory=True) for _ in range(2)]
    landed = [torch.empty(width, p.d, dtype=raw, device=dev) for _ in range(2)]
    for buf in landed:
        buf.record_stream(side)  # written on the side stream: not reused before it is done
    copied = [torch.cuda.Event() for _ in range(2)]  # the copy into landed[s] has finished
    used = [torch.cuda.Event() for _ in range(2)]  # the compute stream is done with landed[s]

    def issue(k: int) -> None:
        s, (c0, c1) = k % 2, bounds[k]
        copied[s].synchronize()  # host[s] is free once its previous copy has finished
        p.ys.host_rows(c0, c1, out=host[s][: c1 - c0])
        with torch.cuda.stream(side):
            side.wait_event(used[s])
            landed[s][: c1 - c0].copy_(host[s][: c1 - c0], non_blocking=True)
            copied[s].record(side)

    issue(0)
    for k, (c0, c1) in enumerate(bounds):
        s = k % 2
        main.wait_event(copied[s])
        cols = p.build_cols(c0, c1, landed[s][: c1 - c0])
        used[s].record(main)
        if k + 1 < len(bounds):
            issue(k + 1)
        yield c0, c1, cols
