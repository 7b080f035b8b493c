"""Baseline selections of :func:`quests_torch.compression.compress`: k-means on the
structures' mean descriptors (k-means++ init, Lloyd), one representative per cluster; and the
mean descriptor distances of its farthest-point sampling (``fps``).

Both run in the dtype of their inputs: float64 by default, float32 in float32-only mode
(:func:`quests_torch._precision.float64_enabled`), where the inputs arrive centred."""

from __future__ import annotations

import math

import torch

from .kde import engine, full_precision
from .structures import segment_sum

__all__ = ["MeanDistances", "assign", "k_means", "sq_dist"]

#: near-ties of the cluster representatives, relative to the largest ``|mean|^2``: above the
#: GEMM expansion's rounding (a few eps), far below real differences
TIE_SLACK = {torch.float64: 1e-10, torch.float32: 1e-5}


def sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[len(a), len(b)]`` squared distances ``|a_i - b_j|^2`` (GEMM expansion, >= 0)."""
    with full_precision():
        d2 = torch.addmm((b * b).sum(1)[None, :], a, b.T, alpha=-2.0)
    return d2.add_((a * a).sum(1, keepdim=True)).clamp_(min=0.0)


def assign(points: torch.Tensor, centres: torch.Tensor, budget: int):
    """Nearest centre of every point (ties: lowest index) and its squared distance."""
    rows = max(1, budget // (8 * 2 * max(1, centres.shape[0])))
    labels, dist = [], []
    for i0, i1 in engine.spans(0, points.shape[0], rows):
        d2 = sq_dist(points[i0:i1], centres)
        v, i = d2.min(1)
        labels.append(i)
        dist.append(v)
    return torch.cat(labels), torch.cat(dist)


def k_means(means: torch.Tensor, size: int, gen: torch.Generator, budget: int, max_iter: int):
    """k-means++ then Lloyd on the structures' mean descriptors; one member per cluster.

    Each cluster is represented by the structure nearest to its centroid; clusters are ordered
    by population (largest first). Empty clusters (duplicate points) are filled by
    farthest-point sampling among the remaining structures.
    """
    S, dev = means.shape[0], means.device
    centres_idx = [int(torch.randint(S, (1,), generator=gen))]
    d2 = sq_dist(means, means[centres_idx[0]][None])[:, 0]
    for _ in range(1, size):
        total = float(d2.sum())
        if total > 0:
            probs = (d2 / total).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        else:  # every remaining point coincides with a centre
            free = torch.ones(S, dtype=torch.bool)
            free[centres_idx] = False
            nxt = int(torch.nonzero(free)[0])
        centres_idx.append(nxt)
        d2 = torch.minimum(d2, sq_dist(means, means[nxt][None])[:, 0])
    centres = means[centres_idx].clone()
    labels = None
    for _ in range(max_iter):
        new, _ = assign(means, centres, budget)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = segment_sum(means, labels, size)
        pop = torch.bincount(labels, minlength=size).to(means.dtype)
        filled = pop > 0
        centres[filled] = sums[filled] / pop[filled, None]
    labels, dist = assign(means, centres, budget)
    pop = torch.bincount(labels, minlength=size)
    best = torch.full((size,), math.inf, dtype=dist.dtype, device=dev)
    best = best.scatter_reduce(0, labels, dist, "amin")
    idx = torch.arange(S, device=dev)
    # near-ties count as ties (the lowest index wins): the two members of a 2-structure
    # cluster are equidistant from its centroid by construction, and which one rounding makes
    # nearer differs between devices. The slack is the expansion's rounding error, ~eps |x|^2.
    slack = TIE_SLACK[means.dtype] * float((means * means).sum(1).max())
    cand = torch.where(dist <= best[labels] + slack, idx, S)
    rep = torch.full((size,), S, dtype=torch.long, device=dev).scatter_reduce(
        0, labels, cand, "amin"
    )
    keys = torch.argsort(-pop * (S + 1) + rep, stable=True)  # population desc, then index
    chosen = [int(r) for r in rep[keys].tolist() if r < S]
    if len(chosen) < size:  # empty clusters: farthest points among the rest
        taken = torch.zeros(S, dtype=torch.bool, device=dev)
        taken[chosen] = True
        far = torch.full((S,), math.inf, dtype=means.dtype, device=dev)
        for c in chosen:
            far = torch.minimum(far, sq_dist(means, means[c][None])[:, 0])
        while len(chosen) < size:
            nxt = int(torch.argmax(torch.where(taken, -math.inf, far)))
            chosen.append(nxt)
            taken[nxt] = True
            far = torch.minimum(far, sq_dist(means, means[nxt][None])[:, 0])
    return chosen


class MeanDistances:
    """``mean_j |x_i - y_j|`` of every row of ``x`` to a block ``y``, one wide GEMM per tile.

    Computed in ``dtype`` (float64; float32 in float32-only mode, on centred ``x``)."""

    def __init__(self, x: torch.Tensor, budget: int, dtype: torch.dtype = torch.float64):
        # [x, |x|^2, 1]^T . [-2 y, 1, |y|^2] = |x - y|^2
        self.dtype = dtype
        self.xt = engine.augment(x.to(dtype), None, 1.0, norm_first=True).T.contiguous()
        self.budget = budget

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        ya = engine.augment(y.to(self.dtype), -2.0, 1.0, norm_first=False)
        n = self.xt.shape[1]
        out = torch.empty(n, dtype=self.dtype, device=self.xt.device)
        with full_precision():
            for j0, j1 in engine.wide_spans(self.xt.device, self.budget, y.shape[0], self.dtype, n):
                d2 = torch.mm(ya, self.xt[:, j0:j1])
                out[j0:j1] = d2.clamp_(min=0.0).sqrt_().mean(0)
        return out
