"""Per-structure summaries of per-atom dH: the largest, the mean and the fraction above a
threshold, for every structure of a batch, on the device.

One home for the summary that the uncertainty bank
(:meth:`quests_torch.uncertainty.UncertaintyBank.evaluate`) and the trajectory screening
(:mod:`quests_torch.screening`, the per-frame ``dH_max``, ``dH_mean`` and ``novel_fraction``)
both report; re-exported by :mod:`quests_torch.uncertainty`, its public home.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from .structures import segment_sum

__all__ = ["StructureUncertainty", "per_structure_summary"]


class StructureUncertainty(NamedTuple):
    """Per-atom dH and its per-structure summaries (see :meth:`UncertaintyBank.evaluate`).

    Attributes:
        dH: ``[n_atoms]`` per-atom dH (nats).
        max_dH: ``[n_systems]`` largest dH of each structure.
        mean_dH: ``[n_systems]`` mean dH of each structure.
        fraction_above: ``[n_systems]`` fraction of the structure's atoms with
            ``dH > threshold`` (out of domain).
    """

    dH: torch.Tensor
    max_dH: torch.Tensor
    mean_dH: torch.Tensor
    fraction_above: torch.Tensor


def per_structure_summary(
    dh: torch.Tensor, system_idx: torch.Tensor, n_systems: int, threshold: float = 0.0
) -> StructureUncertainty:
    """Max, mean and fraction above ``threshold`` of per-atom dH, per structure, on device.

    ``scatter_reduce`` and sorted segment sums only: no host synchronisation, the same bits on
    every run (no float atomics), differentiable (max and mean) with respect to ``dh``.

    Args:
        dh: ``[n_atoms]`` per-atom dH.
        system_idx: ``[n_atoms]`` int structure index of each atom in ``[0, n_systems)``.
        n_systems: number of structures (every one must hold at least one atom).
        threshold: dH above which an atom counts as out of domain (nats).

    Returns:
        :class:`StructureUncertainty` with ``[n_systems]`` summaries in the dtype of ``dh``.
    """
    if not isinstance(dh, torch.Tensor) or dh.ndim != 1:
        raise ValueError(f"`dh` must be a 1-D tensor [n_atoms], got {getattr(dh, 'shape', dh)}")
    if not isinstance(system_idx, torch.Tensor) or system_idx.shape != dh.shape:
        raise ValueError(
            f"`system_idx` must be a tensor of shape {tuple(dh.shape)} like `dh`, "
            f"got {tuple(getattr(system_idx, 'shape', ()))}"
        )
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"`threshold` must be a float, got {type(threshold).__name__}")
    idx = system_idx.to(device=dh.device, dtype=torch.int64)
    order = torch.sort(idx, stable=True).indices
    idx_sorted = idx.index_select(0, order)
    counts = torch.bincount(idx_sorted, minlength=n_systems).to(dh.dtype)
    top = dh.new_zeros(n_systems).scatter_reduce(0, idx, dh, reduce="amax", include_self=False)
    # one segmented sum of [dh, above] in sorted order: reproducible bit for bit on CUDA
    both = torch.stack([dh, (dh.detach() > threshold).to(dh.dtype)], dim=1).index_select(0, order)
    sums = segment_sum(both, idx_sorted, n_systems, is_sorted=True)
    mean, above = sums[:, 0] / counts, sums[:, 1] / counts
    return StructureUncertainty(dh, top, mean, above)
