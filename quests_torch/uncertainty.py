r"""Model-free uncertainty as a ``torch.nn.Module``: per-atom dH against a reference bank.

An :class:`UncertaintyBank` holds the descriptors ``X`` of a reference dataset (the training
set of an interatomic potential, say) as a registered buffer, with the parameters that made
them (``k``, ``cutoff``, species) and the bandwidth ``h``. Called on a batch of structures it
returns the per-atom differential entropy

.. math::

    \delta H(y_i \mid X) = -\log \sum_j \exp\!\bigl(-|y_i - x_j|^2 / (2 h^2)\bigr),

``> 0`` for environments outside the bank (extrapolation), ``<= 0`` for covered ones, on the
inputs' device and differentiable with respect to positions and cell (descriptors from
:func:`quests_torch.descriptors.descriptors_from_tensors`, tiled log-sum-exp from
:mod:`quests_torch.kde`). Everything runs in full precision whatever the caller's TF32/bf16
matmul flags (:func:`quests_torch.kde.full_precision`).

The bank travels with ``state_dict()``: the descriptors are the buffer ``descriptors`` and
``k``, ``cutoff``, ``h``, ``dtype`` and ``species`` are the module's extra state, so
``UncertaintyBank().load_state_dict(torch.load(path, weights_only=True))`` restores a bank
of any size (the state is plain data: never load a bank with ``weights_only=False``).
:meth:`UncertaintyBank.add` grows the bank (active learning).

The bank is checked (NaN/inf), centred and augmented for the kernel sums once
(:class:`quests_torch.kde.PreparedReferences`) and reused by every call, so a call per MD step
pays only for the new structure's descriptors and the tiles against the bank. The prepared
state is rebuilt after :meth:`~UncertaintyBank.add`, ``load_state_dict``, ``.to()`` and any
change of ``h`` or of the buffer (a new tensor, or an in-place change seen by its version
counter; writes through ``.data`` or to an inference-mode tensor bypass that counter: call
:meth:`~UncertaintyBank.invalidate` after them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._precision import compute_dtype, full_precision
from .checks import (
    DEFAULT_BANDWIDTH,
    DEFAULT_CUTOFF,
    DEFAULT_K,
    check_cutoff,
    check_dtype,
    check_h,
    check_k,
    parameter_mismatch,
    require_same_parameters,
)
from .descriptors import (
    descriptor_width,
    descriptors_from_tensors,
    get_descriptors,
    species_numbers,
)
from .io import DescriptorSet, is_descriptor_file, load_descriptors, read_structures
from .kde import PreparedReferences
from .metrics import delta_entropy
from .neighbors import DEFAULT_SKIN, NeighborCache
from .store import DescriptorStore
from .structures import AtomsBatch, resolve_device
from .summaries import StructureUncertainty, per_structure_summary

__all__ = [
    "StructureUncertainty",
    "UncertaintyBank",
    "parameter_mismatch",
    "per_structure_summary",
    "require_same_parameters",
]

_STATE_VERSION = 1


class UncertaintyBank(torch.nn.Module):
    r"""Reference descriptors and the per-atom dH of new structures against them.

    ``forward(positions, cell, pbc, system_idx)`` returns
    ``dH(y_i | X) = -log sum_j exp(-|y_i - x_j|^2 / (2 h^2))`` for every atom ``i`` of the
    batch (nats, ``[n_atoms]``), where ``y_i`` is the QUESTS descriptor of atom ``i`` computed
    with the bank's ``k`` and ``cutoff``. Differentiable with respect to positions and cell.

    Args:
        descriptors: ``[n, d]`` reference descriptors (tensor or numpy array), or ``None`` for
            an empty bank (to be filled by :meth:`add` or :meth:`load_state_dict`).
        k: neighbours of the descriptor (default 32).
        cutoff: cutoff radius of the descriptor (Å, default 5.0).
        h: bandwidth (1/Å, default 0.015).
        dtype: storage and compute dtype of the kernel sums (float64 default; float32 tiles are
            accumulated in float64). Default: that of ``descriptors``, else float64. Always
            float32 where float64 is off (:func:`quests_torch._precision.float64_enabled`:
            MPS, slow-float64 CUDA cards, ``QUESTS_TORCH_FLOAT64=0``).
        device: where the bank lives (``"auto"``: CUDA when available). Default: that of
            ``descriptors``, else CPU.
        species: element symbols or atomic numbers for a multicomponent bank (the descriptor
            of width ``(S + 1)(2k - 1)``; ``forward`` then needs ``numbers``). ``None``: plain.
        skin: Å beyond the cutoff of the neighbour lists that :meth:`forward` reuses from one
            call to the next while no atom moved more than ``skin / 2`` (an MD loop: see
            :class:`quests_torch.neighbors.NeighborCache`; the same dH as a new search).
            ``None``: a new neighbour search every call.

    Attributes:
        descriptors: ``[n, d]`` buffer holding the bank.
        neighbors: the :class:`~quests_torch.neighbors.NeighborCache` of :meth:`forward` and
            :meth:`descriptors_of` (``builds``/``reuses`` count its rebuilds), or ``None``.
    """

    descriptors: torch.Tensor

    def __init__(
        self,
        descriptors: torch.Tensor | np.ndarray | None = None,
        *,
        k: int = DEFAULT_K,
        cutoff: float = DEFAULT_CUTOFF,
        h: float = DEFAULT_BANDWIDTH,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        species: Sequence[str | int] | None = None,
        skin: float | None = DEFAULT_SKIN,
    ) -> None:
        super().__init__()
        self.neighbors = None if skin is None else NeighborCache(skin)
        self.k = check_k(k)
        self.cutoff = check_cutoff(cutoff)
        self.h = check_h(h)
        self.species = species_numbers(species)
        dtype = check_dtype(_dtype_of(descriptors) if dtype is None else dtype)
        dev = resolve_device(device, default=_device_of(descriptors))
        dtype = compute_dtype(dev, dtype)  # float32 where float64 is off (MPS, ...)
        self.register_buffer("descriptors", torch.zeros((0, self.width), dtype=dtype, device=dev))
        self._prepared: tuple[tuple, PreparedReferences, torch.Tensor] | None = None
        if descriptors is not None:
            self.add(descriptors)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_atoms(
        cls,
        atoms: object,
        *,
        k: int = DEFAULT_K,
        cutoff: float = DEFAULT_CUTOFF,
        h: float = DEFAULT_BANDWIDTH,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = "cpu",
        species: Sequence[str | int] | None = None,
        budget: int | str | None = None,
    ) -> UncertaintyBank:
        """A bank of every environment of ASE structures.

        Args:
            atoms: an ``ase.Atoms``, a list of them, or an :class:`AtomsBatch`.
            k: neighbours per environment of the descriptor (default 32).
            cutoff: cutoff radius of the descriptor (Å, default 5.0).
            h: bandwidth of the kernel (1/Å, default 0.015).
            dtype: storage and compute dtype of the bank (default float64; float32 where
                float64 is off, as in :class:`UncertaintyBank`).
            device: where the descriptors are computed and the bank lives (default CPU;
                ``"auto"``: CUDA when available).
            species: element symbols or atomic numbers for a multicomponent bank; ``None``
                (default): the plain descriptor.
            budget: memory budget of the descriptor chunks (bytes or ``"512M"``).
        """
        bank = cls(k=k, cutoff=cutoff, h=h, dtype=dtype, device=device, species=species)
        bank.add(atoms, budget=budget)
        return bank

    @classmethod
    def from_descriptors(
        cls,
        descriptors: torch.Tensor | np.ndarray | DescriptorSet | DescriptorStore,
        *,
        k: int | None = None,
        cutoff: float | None = None,
        h: float = DEFAULT_BANDWIDTH,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        species: Sequence[str | int] | None = None,
    ) -> UncertaintyBank:
        """A bank of precomputed descriptors.

        Args:
            descriptors: ``[n, d]`` tensor/array, a :class:`quests_torch.io.DescriptorSet` or a
                :class:`quests_torch.DescriptorStore` (their ``k`` and ``cutoff`` are used and
                checked against explicit ones; a multicomponent store gives its species).
            k: neighbours per environment the descriptors were computed with (default: the
                DescriptorSet's, else 32 for bare arrays).
            cutoff: cutoff radius the descriptors were computed with (Å; default: the
                DescriptorSet's, else 5.0 for bare arrays).
            h: bandwidth of the kernel (1/Å, default 0.015).
            dtype: storage and compute dtype of the bank (default: the DescriptorSet's
                recorded dtype, else that of the array: float32 stays float32, anything
                else becomes float64).
            device: where the bank lives (default: the tensor's device, else CPU).
            species: element symbols or atomic numbers for a multicomponent bank (the width
                must then be ``(S + 1)(2k - 1)``); ``None`` (default): plain.

        Raises:
            ValueError: explicit ``k``/``cutoff`` differ from the DescriptorSet's, or the width
                does not match ``k`` (and ``species``).
        """
        if isinstance(descriptors, (DescriptorSet, DescriptorStore)):
            _check_same_params(descriptors, k, cutoff)
            k, cutoff = descriptors.k, descriptors.cutoff
            if dtype is None:
                dtype = torch.float32 if descriptors.dtype == "float32" else torch.float64
            if isinstance(descriptors, DescriptorStore) and species is None:
                species = list(descriptors.species) if descriptors.multicomponent else None
        k = DEFAULT_K if k is None else k
        cutoff = DEFAULT_CUTOFF if cutoff is None else cutoff
        bank = cls(
            k=k,
            cutoff=cutoff,
            h=h,
            dtype=dtype or _dtype_of(descriptors),
            device=device if device is not None else _device_of(descriptors),
            species=species,
        )
        bank.add(descriptors)
        return bank

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        h: float = DEFAULT_BANDWIDTH,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = "cpu",
        k: int | None = None,
        cutoff: float | None = None,
        species: Sequence[str | int] | None = None,
    ) -> UncertaintyBank:
        """A bank read from descriptor files (``.npz``/``.pt``).

        The files are those of :func:`quests_torch.io.save_descriptors` (or ``quests-torch
        descriptors``); ``k`` and ``cutoff`` come from their metadata and, given explicitly, must
        agree. Several files are concatenated (they must share ``k`` and ``cutoff``).

        Args:
            path: a descriptor file or a list of them.
            h: bandwidth of the kernel (1/Å, default 0.015).
            dtype: storage and compute dtype of the bank (default: the one recorded in the
                first file).
            device: where the bank lives (default CPU).
            k: expected neighbours per environment; checked against the files' metadata
                when given.
            cutoff: expected cutoff radius (Å); checked against the files' metadata when
                given.
            species: element symbols or atomic numbers for a multicomponent bank; ``None``
                (default): plain.
        """
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        if not paths:
            raise ValueError("`path` is empty: give at least one descriptor file")
        sets = []
        for p in paths:
            if not is_descriptor_file(p):
                raise ValueError(
                    f"{p}: not a descriptor file (expected a .npz or .pt file written by "
                    "quests_torch.io.save_descriptors or `quests-torch descriptors`)"
                )
            sets.append(load_descriptors(p))
        first = sets[0]
        _check_same_params(first, k, cutoff)
        bank = cls.from_descriptors(
            first,
            h=h,
            dtype=dtype,
            device=device if device is not None else "cpu",
            species=species,
        )
        for ds in sets[1:]:
            bank.add(ds)
        return bank

    # ------------------------------------------------------------------ properties
    @property
    def width(self) -> int:
        """Descriptor columns: ``2k - 1`` (times ``S + 1`` for a multicomponent bank)."""
        return descriptor_width(self.k, len(self.species) if self.species else 0)

    @property
    def n_references(self) -> int:
        """Number of reference environments in the bank."""
        return int(self.descriptors.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the stored descriptors (and of the kernel sums)."""
        return self.descriptors.dtype

    @property
    def device(self) -> torch.device:
        """Device the bank's descriptors live on."""
        return self.descriptors.device

    def extra_repr(self) -> str:
        """Size, width and parameters of the bank, shown in the module's ``repr``."""
        sp = "" if not self.species else f", species={self.species}"
        return (
            f"n_references={self.n_references}, width={self.width}, k={self.k}, "
            f"cutoff={self.cutoff}, h={self.h}, dtype={self.dtype}{sp}"
        )

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        """``k``, ``cutoff``, ``h``, ``dtype`` and ``species``, stored in ``state_dict()``."""
        return {
            "version": _STATE_VERSION,
            "k": self.k,
            "cutoff": self.cutoff,
            "h": self.h,
            "dtype": str(self.dtype).removeprefix("torch."),
            "species": None if self.species is None else list(self.species),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore ``k``, ``cutoff``, ``h``, ``dtype`` and ``species`` from ``state_dict()``."""
        if not isinstance(state, dict) or not {"k", "cutoff", "h"} <= set(state):
            raise ValueError(
                f"not an UncertaintyBank state: extra state must hold k, cutoff, h, got {state!r}"
            )
        k, cutoff = check_k(int(state["k"])), check_cutoff(float(state["cutoff"]))
        h = check_h(float(state["h"]))
        species = species_numbers(state.get("species"))
        width = descriptor_width(k, len(species) if species else 0)
        if self.descriptors.shape[1] != width:
            sp = "" if not species else f" and species {species}"
            raise ValueError(
                f"inconsistent UncertaintyBank state: `descriptors` has "
                f"{self.descriptors.shape[1]} columns but k={k}{sp} give {width}"
            )
        self.k, self.cutoff, self.h, self.species = k, cutoff, h, species
        dtype = {"float64": torch.float64, "float32": torch.float32}.get(state.get("dtype", ""))
        if dtype is not None:  # a float64 bank loads as float32 where float64 is off
            dtype = compute_dtype(self.descriptors.device, dtype)
        if dtype is not None and dtype != self.descriptors.dtype:
            self.descriptors = self.descriptors.to(dtype)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # a bank of another size (or dtype) replaces ours: resize the buffer before the copy
        key = prefix + "descriptors"
        incoming = state_dict.get(key)
        if isinstance(incoming, torch.Tensor):  # refused before anything of ours changes
            if not incoming.dtype.is_floating_point:
                raise TypeError(
                    f"`{key}` must hold floating-point descriptors, got {incoming.dtype}"
                )
            if not bool(torch.isfinite(incoming).all()):
                raise ValueError(f"`{key}` contains NaN or inf: not a usable reference bank")
        want = None
        if isinstance(incoming, torch.Tensor):  # float32 where float64 is off (MPS, ...)
            want = compute_dtype(self.descriptors.device, incoming.dtype)
        if isinstance(incoming, torch.Tensor) and (
            incoming.shape != self.descriptors.shape or want != self.descriptors.dtype
        ):
            if incoming.ndim != 2:
                error_msgs.append(f"`{key}` must be 2-D [n, d], got shape {tuple(incoming.shape)}")
                return
            self.descriptors = torch.empty(
                incoming.shape, dtype=want, device=self.descriptors.device
            )
        self.invalidate()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------ prepared state
    def invalidate(self) -> None:
        """Drop the prepared kernel-sum state; the next call rebuilds it from ``descriptors``."""
        self._prepared = None

    def _apply(self, fn, recurse=True):
        self.invalidate()  # .to(), .cuda(), .double(): the prepared block lives on the old one
        if self.neighbors is not None:
            self.neighbors.clear()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__().copy()
        state["_prepared"] = None  # device tensors rebuilt on first use, never pickled
        if self.neighbors is not None:
            state["neighbors"] = NeighborCache(self.neighbors.skin)
        return state

    def _state_key(self) -> tuple:
        x = self.descriptors
        # with the tensor itself (held by the cache): its storage, shape and version counter
        # (in-place writes) and h; dtype and device go with the tensor
        version = None if x.is_inference() else x._version
        return (x.data_ptr(), tuple(x.shape), version, self.h)

    def prepared(self) -> PreparedReferences:
        """The bank checked, centred and augmented for kernel sums, built once and reused.

        Rebuilt when the buffer (identity, storage, shape, version counter) or ``h`` changed
        since the last call, and after :meth:`add`, ``load_state_dict`` and ``.to()``.

        Raises:
            ValueError: empty bank.
        """
        self._check_ready()
        key = self._state_key()
        cached = self._prepared
        if cached is None or cached[0] != key or cached[2] is not self.descriptors:
            prep = PreparedReferences(self.descriptors, self.h, dtype=self.dtype, name="x")
            cached = self._prepared = (key, prep, self.descriptors)
        return cached[1]

    # ------------------------------------------------------------------ growing the bank
    def add(self, data: object, *, budget: int | str | None = None) -> UncertaintyBank:
        """Append reference environments (active learning); returns ``self``.

        Args:
            data: ``[n, d]`` descriptors (tensor or numpy array, computed with the bank's ``k``
                and ``cutoff``), a :class:`quests_torch.io.DescriptorSet` (parameters
                checked), a descriptor file path (``.npz``/``.pt``), a structure file path (any
                ASE format), an ``ase.Atoms``, a list of them, or an :class:`AtomsBatch`.
            budget: memory budget of the descriptor chunks (structures only).

        Raises:
            ValueError: width or parameters differ from the bank's, non-finite values.
        """
        x = self._as_reference(data, budget)
        x = x.detach().to(device=self.device, dtype=self.dtype)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("descriptors to add contain NaN or inf")
        self.descriptors = torch.cat([self.descriptors, x], dim=0)
        self.invalidate()
        return self

    def _as_reference(self, data: object, budget) -> torch.Tensor:
        from ase import Atoms

        if isinstance(data, (str, os.PathLike)):
            if is_descriptor_file(data):
                data = load_descriptors(data)
            else:
                data = read_structures(Path(data))
        if isinstance(data, DescriptorSet):
            self.check_parameters(data.k, data.cutoff, name=_set_name(data))
            return self._check_width(data.x, "data")
        if isinstance(data, DescriptorStore):  # read once, as a tensor backed by the file
            self.check_parameters(data.k, data.cutoff, name=_set_name(data))
            return self._check_width(data.tensor(), "data")
        if isinstance(data, (torch.Tensor, np.ndarray)):
            x = torch.as_tensor(data) if isinstance(data, np.ndarray) else data
            return self._check_width(x, "data")
        if isinstance(data, AtomsBatch) or isinstance(data, Atoms) or isinstance(data, list):
            return get_descriptors(
                data,
                k=self.k,
                cutoff=self.cutoff,
                dtype=self.dtype,
                device=self.device,
                species=self.species,
                budget=budget,
            )
        raise TypeError(
            "`data` must be descriptors (tensor/array/DescriptorSet), a file path, an "
            f"ase.Atoms, a list of them or an AtomsBatch, got {type(data).__name__}"
        )

    # ------------------------------------------------------------------ checks
    def check_parameters(self, k: int | None = None, cutoff: float | None = None, *, name="query"):
        """Raise ``ValueError`` when ``k``/``cutoff`` (where given) differ from the bank's."""
        require_same_parameters(
            (k, cutoff),
            (self.k, self.cutoff),
            lambda p, given, ours: (
                f"{name} was computed with {p}={given} but the bank uses "
                f"{p}={ours}: descriptors made with different parameters cannot be compared"
            ),
        )

    def _check_width(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if x.ndim != 2:
            raise ValueError(f"`{name}` must be 2-D [n, d], got shape {tuple(x.shape)}")
        if x.shape[1] != self.width:
            sp = "" if not self.species else f", species={self.species}"
            raise ValueError(
                f"`{name}` has {x.shape[1]} descriptor columns but the bank expects "
                f"{self.width} (k={self.k}{sp}): descriptors made with different parameters "
                "cannot be compared"
            )
        if not x.dtype.is_floating_point:
            raise TypeError(f"`{name}` must hold floating-point descriptors, got {x.dtype}")
        return x

    def _check_ready(self) -> None:
        if self.descriptors.shape[0] == 0:
            raise ValueError(
                "the uncertainty bank is empty: add reference environments with `.add(...)`, "
                "`UncertaintyBank.from_atoms(...)` or `load_state_dict(...)` first"
            )

    # ------------------------------------------------------------------ evaluation
    def descriptors_of(self, *batch: torch.Tensor | None, budget=None) -> torch.Tensor:
        """Descriptors of a batch with the bank's ``k``, ``cutoff`` (and species).

        Shapes as in :func:`quests_torch.descriptors.descriptors_from_tensors`; differentiable.

        Args:
            *batch: ``positions, cell, pbc[, system_idx, numbers]``, as in :meth:`forward`.
            budget: memory budget of one descriptor chunk (bytes or ``"512M"``).

        Returns:
            ``[n_atoms, width]`` descriptors on the bank's device.
        """
        positions, cell, pbc, system_idx, numbers = _batch_tensors(batch, "descriptors_of")
        if isinstance(positions, torch.Tensor) and positions.device != self.device:
            raise ValueError(
                f"`positions` is on {positions.device} but the bank is on {self.device}: "
                "move one of them (e.g. `bank.to(positions.device)`)"
            )
        if self.species and numbers is None:
            raise ValueError(
                f"`numbers` is required: the bank was built for species {self.species}"
            )
        with full_precision():
            return descriptors_from_tensors(
                positions,
                cell,
                pbc,
                system_idx,
                k=self.k,
                cutoff=self.cutoff,
                numbers=numbers,
                species=self.species,
                budget=budget,
                neighbors=self.neighbors,
            )

    def delta_entropy(
        self,
        y: torch.Tensor | np.ndarray | DescriptorSet,
        *,
        k: int | None = None,
        cutoff: float | None = None,
        **options,
    ) -> torch.Tensor:
        """Per-environment dH of query descriptors against the bank (nats).

        Args:
            y: ``[n, d]`` query descriptors or a DescriptorSet (its ``k``/``cutoff`` checked).
            k: neighbours per environment ``y`` was computed with; checked against the
                bank's when given.
            cutoff: cutoff radius (Å) ``y`` was computed with; checked against the bank's
                when given.
            **options: forwarded to :func:`quests_torch.metrics.delta_entropy` (``tile_size``,
                ``budget``, ``distance``, ...).

        Returns:
            ``[n]`` in the promoted dtype of ``y`` and the bank, on the bank's device.
        """
        if isinstance(y, DescriptorSet):
            self.check_parameters(y.k, y.cutoff, name=_set_name(y))
            y = y.x
        self.check_parameters(k, cutoff)
        if isinstance(y, np.ndarray):
            y = torch.from_numpy(y)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"`y` must be a tensor or numpy array [n, d], got {type(y).__name__}")
        self._check_width(y, "y")
        self._check_ready()
        if y.device != self.device:
            raise ValueError(
                f"`y` is on {y.device} but the bank is on {self.device}: move one of them"
            )
        if not options and not self.descriptors.requires_grad:
            return -self.prepared().log_kernel_sum(y, name="y")
        options.setdefault("dtype", self.dtype)
        return delta_entropy(y, self.descriptors, self.h, **options)

    def forward(
        self,
        positions: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        system_idx: torch.Tensor | None = None,
        numbers: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-atom dH of a batch of structures against the bank.

        Args:
            positions: ``[n_atoms, 3]`` Cartesian positions (Å).
            cell: ``[n_systems, 3, 3]`` (or ``[3, 3]``) lattice vectors as rows.
            pbc: ``[n_systems, 3]`` (or ``[3]``) bool.
            system_idx: ``[n_atoms]`` sorted structure index (default: one structure).
            numbers: ``[n_atoms]`` atomic numbers (multicomponent banks only).

        Returns:
            ``[n_atoms]`` dH (nats) on the inputs' device, differentiable w.r.t. ``positions``
            and ``cell``.

        Raises:
            ValueError: empty bank, device mismatch, coincident atoms, bad shapes.
        """
        if self.descriptors.requires_grad:  # gradients w.r.t. the bank: the general path
            self._check_ready()
            y = self.descriptors_of(positions, cell, pbc, system_idx, numbers)
            return delta_entropy(y, self.descriptors, self.h, dtype=self.dtype)
        bank = self.prepared()
        y = self.descriptors_of(positions, cell, pbc, system_idx, numbers)
        # descriptors of validated (finite) positions are finite: no second NaN check
        return -bank.log_kernel_sum(y, name="y", check_finite=False)

    def evaluate(self, *batch: torch.Tensor | None, threshold: float = 0.0) -> StructureUncertainty:
        """Per-atom dH and, per structure, its max, mean and fraction above ``threshold``.

        The summaries are reduced on the device (``scatter_reduce``, segment sums), without a
        host synchronisation of their own.

        Args:
            *batch: ``positions, cell, pbc[, system_idx, numbers]``, as in :meth:`forward`.
            threshold: dH above which an atom counts as out of domain (nats).

        Returns:
            :class:`StructureUncertainty`.
        """
        positions, cell, pbc, system_idx, numbers = _batch_tensors(batch, "evaluate")
        dh = self.forward(positions, cell, pbc, system_idx, numbers)
        n_systems = 1 if cell.ndim == 2 else int(cell.shape[0])
        if system_idx is None:
            system_idx = torch.zeros(dh.shape[0], dtype=torch.int64, device=dh.device)
        return per_structure_summary(dh, system_idx, n_systems, threshold)

    def evaluate_atoms(self, atoms: object, *, threshold: float = 0.0) -> StructureUncertainty:
        """:meth:`evaluate` for an ``ase.Atoms``, a list of them or an :class:`AtomsBatch`."""
        if isinstance(atoms, AtomsBatch):
            batch = atoms.to(self.device, self.dtype)
        else:
            batch = AtomsBatch.from_ase(atoms, device=self.device, dtype=self.dtype)
        return self.evaluate(
            batch.positions,
            batch.cell,
            batch.pbc,
            batch.system_idx,
            batch.numbers if self.species else None,
            threshold=threshold,
        )


def _batch_tensors(batch: tuple, caller: str) -> tuple:
    """``(positions, cell, pbc, system_idx, numbers)`` of the positional arguments of a
    method that takes those of :meth:`UncertaintyBank.forward` (the last two optional)."""
    if not 3 <= len(batch) <= 5:
        raise TypeError(
            f"{caller}() takes positions, cell, pbc and optionally system_idx and numbers, "
            f"got {len(batch)} positional arguments"
        )
    return (*batch, None, None)[:5]


def _set_name(ds: DescriptorSet | DescriptorStore) -> str:
    if isinstance(ds, DescriptorStore):
        return f"store {str(ds.path)!r}"
    return f"descriptor set {ds.source!r}" if ds.source else "descriptor set"


def _check_same_params(
    ds: DescriptorSet | DescriptorStore, k: int | None, cutoff: float | None
) -> None:
    require_same_parameters(
        (k, cutoff),
        (ds.k, ds.cutoff),
        lambda p, given, theirs: (
            f"{_set_name(ds)} was computed with {p}={theirs}, not the requested {p}={given}"
        ),
    )


def _dtype_of(x: object) -> torch.dtype:
    if isinstance(x, DescriptorSet):
        x = x.x
    if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
        return torch.float32
    if isinstance(x, np.ndarray) and x.dtype == np.float32:
        return torch.float32
    return torch.float64


def _device_of(x: object) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
