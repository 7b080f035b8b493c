"""A batch of atomic structures as flat tensors (the torch-sim / ASE convention).

``positions [n_atoms, 3]`` (Å), ``cell [n_systems, 3, 3]`` with lattice vectors as *rows*
(ASE convention: ``atoms.cell[i]`` is the i-th lattice vector), ``pbc [n_systems, 3]`` (bool),
``system_idx [n_atoms]`` (which structure each atom belongs to, sorted ascending) and
``numbers [n_atoms]`` (atomic numbers).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .checks import check_dtype
from .devices import canonical_device, resolve_device

__all__ = [
    "AtomsBatch",
    "canonical_device",
    "centred_copies",
    "resolve_device",
    "segment_sum",
    "strain_rows",
]


def centred_copies(structures: object) -> object:
    """Copies of ``ase.Atoms`` with each structure's positions centred on their mean.

    Used in float32-only mode (:func:`quests_torch._precision.float64_enabled`) before the
    positions are cast to float32: centring in float64 on the host keeps ~1e-7 relative
    precision of the interatomic vectors however far from the origin a structure sits
    (descriptors, dH and clusters are translation invariant, periodic or not). Anything else
    (an iterator, non-Atoms items) is returned as is.
    """
    from ase import Atoms

    if isinstance(structures, Atoms):
        structures = [structures]
    elif not isinstance(structures, Sequence):
        return structures
    out = []
    for a in structures:
        if not isinstance(a, Atoms) or len(a) == 0:
            return structures  # AtomsBatch.from_ase raises with the right message
        pos = a.positions - a.positions.mean(0)
        out.append(Atoms(numbers=a.numbers, positions=pos, cell=a.cell, pbc=a.pbc))
    return out


def segment_sum(
    values: torch.Tensor, index: torch.Tensor, n_segments: int, *, is_sorted: bool = False
) -> torch.Tensor:
    """Per-segment sums of ``values`` along dim 0, bitwise reproducible on every device.

    ``index_add_``/``scatter_add_`` accumulate float64 with atomics on CUDA, so their last
    bits vary from run to run; here each segment is summed in order after a stable sort
    (skipped when ``is_sorted``), with ``torch.segment_reduce``. No host synchronisation;
    differentiable with respect to ``values``.

    Args:
        values: ``[n, ...]`` values to sum.
        index: ``[n]`` int segment of each row, in ``[0, n_segments)``.
        n_segments: number of segments (empty segments sum to 0).
        is_sorted: ``index`` is already non-decreasing.

    Returns:
        ``[n_segments, ...]`` sums in the dtype of ``values``.
    """
    index = index.to(device=values.device, dtype=torch.int64)
    if not is_sorted:
        order = torch.sort(index, stable=True).indices
        values, index = values.index_select(0, order), index.index_select(0, order)
    lengths = torch.bincount(index, minlength=n_segments)
    if lengths.shape[0] != n_segments:  # known on the host: bincount sized its output
        raise ValueError(f"`index` holds values >= `n_segments` ({n_segments})")
    return torch.segment_reduce(values, "sum", lengths=lengths, axis=0, unsafe=True)


@dataclass
class AtomsBatch:
    """Many structures in flat tensors.

    Attributes:
        positions: ``[n_atoms, 3]`` Cartesian positions in Å.
        cell: ``[n_systems, 3, 3]`` lattice vectors as rows (may be zero for molecules).
        pbc: ``[n_systems, 3]`` periodicity per lattice direction.
        system_idx: ``[n_atoms]`` int64 structure index of each atom, non-decreasing.
        numbers: ``[n_atoms]`` int64 atomic numbers (0 when unknown).
    """

    positions: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    system_idx: torch.Tensor
    numbers: torch.Tensor

    def __post_init__(self) -> None:
        validate_batch(self.positions, self.cell, self.pbc, self.system_idx)
        if self.numbers.shape != self.system_idx.shape:
            raise ValueError(
                f"`numbers` must have shape {tuple(self.system_idx.shape)}, "
                f"got {tuple(self.numbers.shape)}"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_ase(
        cls,
        atoms: object,
        *,
        device: torch.device | str | None = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> AtomsBatch:
        """Build a batch from one ``ase.Atoms`` or an iterable of them.

        Args:
            atoms: an ``ase.Atoms`` or a sequence/iterable of them.
            device: target device (``"auto"``: CUDA when available).
            dtype: float dtype of positions and cells.
        """
        from ase import Atoms

        check_dtype(dtype)
        if isinstance(atoms, Atoms):
            structures: Sequence[Atoms] = [atoms]
        elif isinstance(atoms, Iterable) and not isinstance(atoms, (str, bytes)):
            structures = list(atoms)
        else:
            raise TypeError(
                f"`atoms` must be an ase.Atoms or a list of them, got {type(atoms).__name__}"
            )
        if len(structures) == 0:
            raise ValueError("`atoms` is empty: no structures given")
        for s, a in enumerate(structures):
            if not isinstance(a, Atoms):
                raise TypeError(f"`atoms[{s}]` must be an ase.Atoms, got {type(a).__name__}")
            if len(a) == 0:
                raise ValueError(f"`atoms[{s}]` is empty (structure {s} has no atoms)")
        counts = np.fromiter((len(a) for a in structures), dtype=np.int64, count=len(structures))
        positions = np.concatenate([a.positions for a in structures], axis=0)
        numbers = np.concatenate([a.numbers for a in structures], axis=0)
        cell = np.stack([np.asarray(a.cell[:], dtype=np.float64) for a in structures])
        pbc = np.stack([np.asarray(a.pbc, dtype=bool) for a in structures])
        system_idx = np.repeat(np.arange(len(structures), dtype=np.int64), counts)
        dev = resolve_device(device)

        if dtype == torch.float32:  # cast on the host: no float64 tensor on the device
            positions, cell = positions.astype(np.float32), cell.astype(np.float32)

        def put(values: np.ndarray, dt: torch.dtype | None = None) -> torch.Tensor:
            t = torch.as_tensor(values, dtype=dt)
            if dev.type == "cuda":  # from pinned memory: no synchronising pageable copy
                return t.pin_memory().to(dev, non_blocking=True)
            return t.to(dev)

        return cls(
            positions=put(positions, dtype),
            cell=put(cell, dtype),
            pbc=put(pbc),
            system_idx=put(system_idx),
            numbers=put(numbers, torch.int64),
        )

    def to_ase(self) -> list:
        """The structures back as a list of ``ase.Atoms`` (positions, numbers, cell, pbc)."""
        from ase import Atoms

        pos = self.positions.detach().cpu().double().numpy()
        cell = self.cell.detach().cpu().double().numpy()
        pbc = self.pbc.cpu().numpy()
        num = self.numbers.cpu().numpy()
        bounds = np.concatenate([[0], np.cumsum(self.n_atoms_per_system.cpu().numpy())])
        return [
            Atoms(numbers=num[a:b], positions=pos[a:b], cell=cell[s], pbc=pbc[s])
            for s, (a, b) in enumerate(itertools.pairwise(bounds))
        ]

    # ------------------------------------------------------------------ properties
    @property
    def n_atoms(self) -> int:
        """Total number of atoms over all structures (rows of ``positions``)."""
        return int(self.positions.shape[0])

    @property
    def n_systems(self) -> int:
        """Number of structures in the batch (leading dimension of ``cell``)."""
        return int(self.cell.shape[0])

    @property
    def n_atoms_per_system(self) -> torch.Tensor:
        """``[n_systems]`` number of atoms of each structure."""
        return torch.bincount(self.system_idx, minlength=self.n_systems)

    @property
    def device(self) -> torch.device:
        """Device of the batch's tensors (that of ``positions``)."""
        return self.positions.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point dtype of ``positions`` and ``cell``."""
        return self.positions.dtype

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> AtomsBatch:
        """Copy to ``device`` and/or float ``dtype`` (like ``torch.Tensor.to``)."""
        dev = self.device if device is None else resolve_device(device)
        dt = self.dtype if dtype is None else check_dtype(dtype)
        return AtomsBatch(
            positions=self.positions.to(dev, dt),
            cell=self.cell.to(dev, dt),
            pbc=self.pbc.to(dev),
            system_idx=self.system_idx.to(dev),
            numbers=self.numbers.to(dev),
        )

    def select(self, systems: Sequence[int] | torch.Tensor) -> AtomsBatch:
        """A new batch holding only the structures ``systems`` (renumbered 0..)."""
        sel = torch.as_tensor(systems, dtype=torch.int64, device=self.device).reshape(-1)
        keep = torch.isin(self.system_idx, sel)
        # renumber the kept systems in the order of ``sel`` sorted ascending
        order = torch.sort(sel).values
        remap = torch.full((self.n_systems,), -1, dtype=torch.int64, device=self.device)
        remap[order] = torch.arange(order.numel(), device=self.device)
        return AtomsBatch(
            positions=self.positions[keep],
            cell=self.cell[order],
            pbc=self.pbc[order],
            system_idx=remap[self.system_idx[keep]],
            numbers=self.numbers[keep],
        )


def validate_batch(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    system_idx: torch.Tensor,
    *,
    values: bool = True,
) -> None:
    """Check shapes, dtypes, devices and (``values``) finiteness of batch tensors and the
    order of ``system_idx`` (one host sync); raise on problems."""
    n_sys = _check_batch_layout(positions, cell, pbc, system_idx)
    if values:
        _check_batch_values(positions, cell, system_idx, n_sys)


def _check_batch_layout(
    positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, system_idx: torch.Tensor
) -> int:
    """Types, shapes, dtypes and the one device of the batch tensors; the structure count."""
    for name, t in (
        ("positions", positions),
        ("cell", cell),
        ("pbc", pbc),
        ("system_idx", system_idx),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(
            f"`positions` must be 2-D [n_atoms, 3], got shape {tuple(positions.shape)}"
        )
    if positions.shape[0] == 0:
        raise ValueError("`positions` is empty: no atoms given")
    if not positions.is_floating_point():
        raise TypeError(f"`positions` must be a floating point tensor, got {positions.dtype}")
    if cell.ndim != 3 or cell.shape[1:] != (3, 3):
        raise ValueError(f"`cell` must be 3-D [n_systems, 3, 3], got shape {tuple(cell.shape)}")
    n_sys = cell.shape[0]
    if pbc.shape != (n_sys, 3):
        raise ValueError(
            f"`pbc` must have shape [n_systems, 3] = {(n_sys, 3)}, got {tuple(pbc.shape)}"
        )
    if pbc.dtype != torch.bool:
        raise TypeError(f"`pbc` must be a bool tensor, got {pbc.dtype}")
    if system_idx.shape != positions.shape[:1]:
        raise ValueError(
            f"`system_idx` must have shape [n_atoms] = ({positions.shape[0]},), "
            f"got {tuple(system_idx.shape)}"
        )
    if system_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"`system_idx` must be an integer tensor, got {system_idx.dtype}")
    if cell.dtype != positions.dtype:
        raise TypeError(
            f"`cell` dtype {cell.dtype} differs from `positions` dtype {positions.dtype}"
        )
    devices = {t.device for t in (positions, cell, pbc, system_idx)}
    if len(devices) > 1:
        raise ValueError(
            f"`positions`, `cell`, `pbc`, `system_idx` must be on one device, got {devices}"
        )
    return n_sys


def _check_batch_values(
    positions: torch.Tensor, cell: torch.Tensor, system_idx: torch.Tensor, n_sys: int
) -> None:
    """Finite positions and cells, ``system_idx`` sorted, in range and no structure empty:
    one host transfer for all of them; the details only on failure."""
    idx = system_idx.long()
    in_range = (idx.min() >= 0) & (idx.max() < n_sys)
    counts = torch.zeros(n_sys, dtype=torch.int64, device=idx.device)
    counts.index_add_(0, idx.clamp(0, n_sys - 1), torch.ones_like(idx))
    flags = torch.stack(
        [
            torch.isfinite(positions).all(),
            torch.isfinite(cell).all(),
            in_range,
            (idx[1:] >= idx[:-1]).all(),
            (counts > 0).all(),
        ]
    ).tolist()
    if all(flags):
        return
    finite_pos, finite_cell, ok_range, ok_sorted, _ = flags
    if not finite_pos:
        bad = torch.nonzero(~torch.isfinite(positions).all(dim=1))[:, 0]
        atom = int(bad[0])
        raise ValueError(
            f"`positions` contains NaN or inf (atom {atom} of structure {int(system_idx[atom])}; "
            f"{bad.numel()} atoms affected)"
        )
    if not finite_cell:
        bad = torch.nonzero(~torch.isfinite(cell).reshape(n_sys, -1).all(dim=1))[:, 0]
        raise ValueError(f"`cell` contains NaN or inf (structure {int(bad[0])})")
    if not ok_range:
        raise ValueError(
            f"`system_idx` values must lie in [0, {n_sys}), got range "
            f"[{int(system_idx.min())}, {int(system_idx.max())}]"
        )
    if not ok_sorted:
        raise ValueError("`system_idx` must be sorted (atoms of each structure contiguous)")
    s = int(torch.nonzero(counts == 0)[0, 0])
    raise ValueError(f"structure {s} is empty: `system_idx` assigns it no atoms")


def strain_rows(x: torch.Tensor, deform: torch.Tensor) -> torch.Tensor:
    """Rows of 3-vectors times their 3x3 deformation, ``x[..., i, :] @ deform[..., i, :, :]``.

    Elementwise products and a sum, no matmul (so no TF32 whatever the matmul flags): the
    strained positions and cell rows whose derivative at ``deform = 1`` gives the virial of
    the bias stress. ``x [..., n, 3]`` with ``deform [..., n, 3, 3]`` or a broadcastable shape.
    """
    return (x[..., :, None] * deform).sum(-2)
