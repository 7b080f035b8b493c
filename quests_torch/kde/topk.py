"""Exact per-row top-k of distance tiles (nearest references), ties to the lower column."""

from __future__ import annotations

import math

import torch

TOPK_BLOCK = 128  # columns per block of the block-maximum top-k pre-selection
TOPK_ROUNDS = 8  # up to this k, k rounds of max beat a sort in the top-k selections


def top_first(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of every row of ``a`` and their columns, in the order value
    descending then column ascending (ties go to the lower column).

    Small ``k``: ``k`` rounds of ``max`` (which returns the first maximal column) on a copy,
    each removing its pick. Larger ``k``: ``topk`` finds the ``k``-th value ``v``; the entries
    above ``v`` and the first ones equal to it are kept in column order, then sorted stably.
    """
    if k > TOPK_ROUNDS:
        rows, width = a.shape
        kth = torch.topk(a, k, dim=1, sorted=False).values.amin(1, keepdim=True)
        above, tied = a > kth, a == kth
        need = k - above.sum(1, keepdim=True)
        keep = above | (tied & (tied.cumsum(1) <= need))  # exactly k per row
        slot = torch.where(keep, keep.cumsum(1) - 1, k)  # the rest lands in a spare slot k
        every = torch.arange(width, device=a.device).expand(rows, width)
        cols = torch.zeros(rows, k + 1, dtype=torch.long, device=a.device)
        cols = cols.scatter_(1, slot, every)[:, :k]
        v, order = torch.sort(a.gather(1, cols), dim=1, descending=True, stable=True)
        return v, cols.gather(1, order)
    work = a.clone()
    values, cols = [], []
    for _ in range(k):
        v, j = work.max(1, keepdim=True)
        values.append(v)
        cols.append(j)
        work.scatter_(1, j, -math.inf)
    return torch.cat(values, 1), torch.cat(cols, 1)


def tile_top(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of every row of ``a`` ``[rows, L]`` and their columns.

    Order: value descending, then column ascending (ties go to the lower column). Exact, by
    a block pre-selection instead of a selection over the whole tile: the row is cut into
    blocks of ``B ~ sqrt(L/k)`` (8 to 128) columns, the ``k`` blocks with the largest maxima
    (ties: lower block) are kept and the answer is picked from their ``k B`` entries. Every
    top-``k`` entry lies in those blocks: a block left out has ``k`` kept blocks whose maxima
    precede its own maximum, hence ``k`` entries that precede each of its entries. Cost: one
    ``amax`` pass over the tile plus selections on ``[rows, L/B]`` and ``[rows, k B]``.
    """
    width = a.shape[1]
    # the selections cost ~ k (L/B + k B) per row: B ~ sqrt(L/k), fewer than L/4 candidates
    block = min(TOPK_BLOCK, width // (4 * k), max(8, math.isqrt(width // k)))
    if block < 8:  # narrow tile or large k: select on the whole tile
        return top_first(a, k)
    full = width // block
    maxima = a[:, : full * block].unflatten(1, (full, block)).amax(2)
    if full * block < width:
        maxima = torch.cat([maxima, a[:, full * block :].amax(1, keepdim=True)], 1)
    chosen = top_first(maxima, k)[1].sort(dim=1).values  # ascending: candidates in order
    cols = (chosen[:, :, None] * block + torch.arange(block, device=a.device)).flatten(1)
    inside = cols < width  # the last block may be short
    cand = a.gather(1, cols.clamp(max=width - 1)).masked_fill_(~inside, -math.inf)
    v, sel = top_first(cand, k)
    return v, cols.gather(1, sel)


def merge_top(
    best: torch.Tensor, best_idx: torch.Tensor, v: torch.Tensor, ix: torch.Tensor, k: int
) -> None:
    """Fold a tile's top entries ``(v, ix)`` into the running ``(best, best_idx)`` in place.

    ``best`` holds earlier (lower) columns, so a stable sort of ``[best, v]`` keeps the
    lower-column-first rule of :func:`tile_top` across tiles.
    """
    v = torch.cat([best, v], 1)
    ix = torch.cat([best_idx, ix], 1)
    v, sel = torch.sort(v, dim=1, descending=True, stable=True)
    best.copy_(v[:, :k])
    best_idx.copy_(ix.gather(1, sel[:, :k]))
