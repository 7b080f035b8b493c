"""Per-structure summaries of per-atom dH: the largest, the mean and the fraction above a
threshold, for every structure of a batch, on the device.

One home for the summary that the uncertainty bank
(:meth:`quests_torch.uncertainty.UncertaintyBank.evaluate`) and the trajectory screening
(:mod:`quests_torch.screening`, the per-frame ``dH_max``, ``dH_mean`` and ``novel_fraction``)
both report; re-exported by :mod:`quests_torch.uncertainty`, its public home.

With ``$QUESTS_TORCH_KERNEL=triton`` (on CUDA, or CPU tensors under Triton's interpreter) and
no autograd, the three summaries of a batch of at most :data:`FUSED_MAX_PAIRS` atom-structure
pairs come from one kernel launch (the MD step of :class:`~quests_torch.UncertaintyBank`: one
program per structure, sums in float64 in a fixed order) instead of ~12 ops.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import torch

from ._triton import interpreting, jit, runs_fused
from .structures import segment_sum

__all__ = ["FUSED_MAX_PAIRS", "StructureUncertainty", "per_structure_summary"]

FUSED_MAX_PAIRS = 1 << 24
"""Largest ``n_atoms x n_systems`` the fused summary takes (each program scans every atom)."""
tl = None  # triton.language, bound by _kernel() (Triton is imported only when it is used)


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
    if _fused(dh, n_systems):
        out = torch.empty((3, n_systems), dtype=dh.dtype, device=dh.device)
        _kernel(interpreting())[(n_systems,)](dh, idx, out, dh.shape[0], n_systems,
                                              float(threshold), BLOCK=1024)  # fmt: skip
        return StructureUncertainty(dh, out[0], out[1], out[2])
    order = torch.sort(idx, stable=True).indices
    idx_sorted = idx.index_select(0, order)
    counts = torch.bincount(idx_sorted, minlength=n_systems).to(dh.dtype)
    top = dh.new_zeros(n_systems).scatter_reduce(0, idx, dh, reduce="amax", include_self=False)
    # one segmented sum of [dh, above] in sorted order: reproducible bit for bit on CUDA
    both = torch.stack([dh, (dh.detach() > threshold).to(dh.dtype)], dim=1).index_select(0, order)
    sums = segment_sum(both, idx_sorted, n_systems, is_sorted=True)
    mean, above = sums[:, 0] / counts, sums[:, 1] / counts
    return StructureUncertainty(dh, top, mean, above)


def _fused(dh: torch.Tensor, n_systems: int) -> bool:
    """Whether the summary kernel computes this call (see the module notes)."""
    return (
        not (torch.is_grad_enabled() and dh.requires_grad)
        and dh.dtype in (torch.float32, torch.float64)
        and dh.shape[0] * max(1, n_systems) <= FUSED_MAX_PAIRS
        and dh.is_contiguous()
        and runs_fused(dh.device)
    )


def _summary_kernel(DH, SIDX, OUT, n, n_systems, threshold, BLOCK: tl.constexpr):
    """One program: structure ``s``'s max, mean and fraction above ``threshold`` of ``DH
    [n]`` over the atoms with ``SIDX == s``, into ``OUT[:, s]`` (``[3, n_systems]``)."""
    s = tl.program_id(0)
    total = tl.zeros((BLOCK,), tl.float64)
    above = tl.zeros((BLOCK,), tl.float64)
    count = tl.zeros((BLOCK,), tl.int32)
    top = tl.full((BLOCK,), float("-inf"), DH.dtype.element_ty)
    for a0 in range(0, n, BLOCK):
        offs = a0 + tl.arange(0, BLOCK)
        mine = (offs < n) & (tl.load(SIDX + offs, mask=offs < n, other=-1) == s)
        v = tl.load(DH + offs, mask=mine, other=0.0)
        total += tl.where(mine, v.to(tl.float64), 0.0)
        above += tl.where(mine & (v > threshold), 1.0, 0.0)
        count += mine.to(tl.int32)
        top = tl.where(mine, tl.maximum(top, v), top)
    c = tl.sum(count).to(tl.float64)
    tl.store(OUT + s, tl.max(top))
    tl.store(OUT + n_systems + s, (tl.sum(total) / c).to(OUT.dtype.element_ty))
    tl.store(OUT + 2 * n_systems + s, (tl.sum(above) / c).to(OUT.dtype.element_ty))


@functools.cache
def _kernel(interpret: bool):
    """The kernel jitted (Triton reads ``TRITON_INTERPRET`` when it decorates)."""
    return jit(globals(), _summary_kernel, interpret=interpret)
