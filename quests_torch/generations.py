"""Active-learning analytics: entropy, diversity and novelty across generations.

:func:`generation_report` follows the generations of an active-learning loop: the cumulative
entropy and diversity of the data after each generation and the novelty of each generation
against all earlier ones (paper Fig. 2f, g), from one running log kernel sum per environment
(:class:`quests_torch.kde.RunningLogKernelSum`) updated once per generation. In float32-only
mode (:func:`quests_torch._precision.float64_enabled`) all of it runs in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from ._precision import compute_dtype
from .checks import Progress, check_keywords, check_single_bandwidth, check_threshold
from .grouped import group_descriptors
from .kde import DEFAULT_BANDWIDTH, RunningLogKernelSum, engine
from .metrics import diversity_from_log_p, entropy_from_log_p

__all__ = ["GenerationReport", "generation_report"]


@dataclass
class GenerationReport:
    """Per generation of an active-learning loop (see :func:`generation_report`).

    Attributes (``[G]`` CPU tensors, except ``labels``):
        labels: the generation labels, in order.
        n_environments: environments added by each generation.
        cumulative_environments: environments in generations ``0..g``.
        entropy: ``H`` of the cumulative dataset (nats).
        diversity: ``D`` of the cumulative dataset (nats).
        novelty: fraction of generation ``g``'s environments with
            ``dH(x | generations < g) > threshold`` (NaN for the first generation).
        max_dh: largest ``dH`` of generation ``g`` against the earlier ones (NaN for the first).
    """

    labels: list
    n_environments: torch.Tensor
    cumulative_environments: torch.Tensor
    entropy: torch.Tensor
    diversity: torch.Tensor
    novelty: torch.Tensor
    max_dh: torch.Tensor

    def rows(self) -> list[dict]:
        """One dict per generation (NaN as ``None``), ready for JSON or a table."""
        out = []
        names = [f.name for f in fields(self)][1:]
        for g, label in enumerate(self.labels):
            row = {"generation": label}
            for name in names:
                v = getattr(self, name)[g].item()
                row[name] = None if isinstance(v, float) and math.isnan(v) else v
            out.append(row)
        return out

    def __repr__(self) -> str:
        return (
            f"GenerationReport({len(self.labels)} generations, H -> {float(self.entropy[-1]):.3f})"
        )


#: the keywords of generation_report's running sums (``tile_size``: accepted, no effect)
_RUNNING_OPTIONS = ("dtype", "device", "tile_size", "budget")


def generation_report(
    x,
    generation_idx,
    *,
    labels: Sequence | None = None,
    h: float = DEFAULT_BANDWIDTH,
    threshold: float = 0.0,
    progress: Progress = None,
    **options,
) -> GenerationReport:
    """Entropy, diversity and novelty across the generations of an active-learning loop.

    For generation ``g`` (environments ``X_g``) with earlier data ``P_g = X_0 ∪ ... ∪ X_{g-1}``:
    ``novelty_g`` = fraction of ``x in X_g`` with ``dH(x | P_g) > threshold``, and ``H``,
    ``D`` of ``P_g ∪ X_g`` (paper Fig. 2f, g). One running log kernel sum per environment,
    updated once per generation: the cost is one kernel pass over all pairs.

    Args:
        x: descriptors ``[n, d]`` of all environments of all generations, or a list of
            per-generation ``[n_g, d]`` arrays/tensors.
        generation_idx: ``[n]`` generation of each environment, numbered ``0..G-1`` in
            order (ignored for a list ``x``).
        labels: names of the generations (default ``0..G-1``).
        h: bandwidth (1/Å).
        threshold: dH threshold of the novelty.
        progress: ``True`` for a tqdm bar or a callable ``(done, total)``.
        **options: the kernel-sum keywords of :func:`quests_torch.kde.kernel_pass` that apply
            to running sums: ``dtype`` (default: that of ``x``), ``device`` (default: where
            ``x`` lives) and ``budget`` (bytes a tile's temporaries may use; the running
            sums size their tiles from it, so a ``tile_size`` is accepted and has no effect).

    Returns:
        :class:`GenerationReport`.
    """
    check_keywords(options, _RUNNING_OPTIONS, "generation_report")
    device = options.get("device")
    h = check_single_bandwidth(h)
    threshold = check_threshold(threshold)
    if isinstance(x, (list, tuple)):
        data = group_descriptors(x, None, "x", device, "generation_idx", "generation")
    else:
        data = group_descriptors(x, generation_idx, "x", device, "generation_idx", "generation")
    G = data.n_structures
    if labels is None:
        labels = list(range(G))
    elif len(labels) != G:
        raise ValueError(f"`labels` has {len(labels)} entries for {G} generations")
    acc = compute_dtype(data.x.device, torch.float64)  # float32 in float32-only mode
    mu = data.x.to(acc).mean(0)
    xc = (data.x.to(acc) - mu).to(data.x.dtype)
    running = RunningLogKernelSum(xc, h, dtype=options.get("dtype"), budget=options.get("budget"))
    tick, bar = engine.progress_ticker(progress, G, "generations")
    stats = []
    nan = torch.tensor(math.nan, dtype=acc, device=xc.device)
    try:
        for g in range(G):
            a, b = int(data.start[g]), int(data.end[g])
            if g == 0:
                nov, mx = nan, nan
            else:
                dh = -running.log_k[a:b]
                nov = (dh > threshold).to(acc).mean()
                mx = dh.max()
            # float32: the self pairs pinned to 0 (their rounding, ~1e-5, would reach H); the
            # float64 bits stay as they were
            running.add(xc[a:b], a if acc == torch.float32 else None)
            lk = running.log_k[:b]
            ent = entropy_from_log_p(lk)
            div = diversity_from_log_p(lk)
            stats.append(torch.stack([ent, div, nov, mx]))
            tick(g + 1)
    finally:
        if bar is not None:
            bar.close()
    values = torch.stack(stats).cpu()
    counts = data.counts.cpu()
    return GenerationReport(
        list(labels),
        counts,
        torch.cumsum(counts, 0),
        values[:, 0],
        values[:, 1],
        values[:, 2],
        values[:, 3],
    )
