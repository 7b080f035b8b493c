"""Descriptor sets grouped by structure (or generation): the input of compression and of the
per-generation reports.

:func:`group_descriptors` takes either one ``[n, d]`` array with a ``[n]`` group index
(``system_idx``, ``generation_idx``) or a list of per-group ``[n_g, d]`` arrays, checks them
(floating point, 2-D, finite, groups numbered ``0..G-1`` without gaps) and returns a
:class:`GroupedDescriptors` with the rows sorted by group (stable) on the compute device.
In float32-only mode (:func:`quests_torch._precision.float64_enabled`) float64 descriptors
are cast to float32 first (numpy arrays on the host): no float64 tensor reaches the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._precision import float64_enabled
from .checks import check_descriptor_matrix
from .structures import resolve_device

__all__ = ["GroupedDescriptors", "as_descriptor_tensor", "concat_groups", "group_descriptors"]


@dataclass
class GroupedDescriptors:
    """Environments grouped by structure: rows of structure ``s`` are ``x[start[s]:end[s]]``."""

    x: torch.Tensor  # [n, d], sorted by structure, on the compute device
    sid: torch.Tensor  # [n] structure of each row (sorted), long, same device
    counts: torch.Tensor  # [S] environments per structure, long, same device
    start: np.ndarray  # [S] host copies for slicing
    end: np.ndarray
    order: torch.Tensor  # [n] original row of each sorted row

    @property
    def n_structures(self) -> int:
        return int(self.start.shape[0])

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    def rows(self, s: int) -> torch.Tensor:
        return self.x[int(self.start[s]) : int(self.end[s])]


def as_descriptor_tensor(x, name: str, device) -> torch.Tensor:
    check_descriptor_matrix(
        x,
        name,
        expected="a torch.Tensor, a numpy array [n, d] or a list of per-structure arrays",
        allow_empty=True,
    )
    placed = x.device if isinstance(x, torch.Tensor) else None
    target = resolve_device(device, inputs=[(name, placed)], default="cpu")
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
        if x.dtype == torch.float64 and not float64_enabled(target):
            x = x.float()  # on the host: float32-only devices get no float64 tensor
        x = x.to(target)
    if x.dtype == torch.float64 and not float64_enabled(x.device):
        x = x.float()
    return x


def concat_groups(parts: Sequence, name: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of per-structure ``[n_s, d]`` arrays -> ``(x [n, d], system_idx [n])``."""
    if len(parts) == 0:
        raise ValueError(f"`{name}` is empty: no structures")
    tensors = [as_descriptor_tensor(p, f"{name}[{i}]", device) for i, p in enumerate(parts)]
    widths = {t.shape[1] for t in tensors}
    if len(widths) > 1:
        raise ValueError(f"`{name}` mixes descriptor widths {sorted(widths)}")
    dev = tensors[0].device
    for i, t in enumerate(tensors):
        if t.device != dev:
            raise ValueError(f"`{name}[{i}]` lives on {t.device}, `{name}[0]` on {dev}")
    counts = torch.tensor([t.shape[0] for t in tensors], device=dev)
    sid = torch.repeat_interleave(torch.arange(len(tensors), device=dev), counts)
    return torch.cat(tensors), sid


def group_descriptors(
    x, system_idx, name: str = "x", device=None, idx: str = "system_idx", unit: str = "structure"
) -> GroupedDescriptors:
    from .store import DescriptorStore

    if isinstance(x, DescriptorStore):  # a store knows its structures
        if system_idx is None:
            system_idx = x.system_idx()
        x = x.tensor()  # backed by the file; copied to the device and dtype used
    if isinstance(x, (list, tuple)):
        if system_idx is not None:
            raise ValueError(f"`{idx}` must be None when `{name}` is a list of {unit}s")
        x, sid = concat_groups(x, name, device)
    else:
        x = as_descriptor_tensor(x, name, device)
        if system_idx is None:
            raise ValueError(
                f"`{idx}` is required with a single `{name}` array: the {unit} of each environment"
            )
        if isinstance(system_idx, np.ndarray):
            system_idx = torch.from_numpy(system_idx)
        if not isinstance(system_idx, torch.Tensor) or system_idx.dtype.is_floating_point:
            raise TypeError(f"`{idx}` must be an integer tensor or numpy array [n]")
        if system_idx.shape != (x.shape[0],):
            raise ValueError(
                f"`{idx}` must have shape ({x.shape[0]},) like the rows of `{name}`, "
                f"got {tuple(system_idx.shape)}"
            )
        sid = system_idx.to(device=x.device, dtype=torch.long)
    if x.shape[0] == 0:
        raise ValueError(f"`{name}` is empty: no environments")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"`{name}` contains NaN or infinite descriptor values")
    if bool((sid < 0).any()):
        raise ValueError(f"`{idx}` must be non-negative")
    order = torch.sort(sid, stable=True).indices
    sid = sid[order]
    counts = torch.bincount(sid)
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel():
        raise ValueError(
            f"{unit} {int(empty[0])} has no environments (`{idx}` must number the "
            f"structures 0..{counts.numel() - 1} without gaps)"
        )
    end = torch.cumsum(counts, 0).cpu().numpy()
    start = end - counts.cpu().numpy()
    return GroupedDescriptors(x[order], sid, counts, start, end, order)
