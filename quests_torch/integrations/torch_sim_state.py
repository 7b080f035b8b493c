"""torch-sim states in quests-torch's conventions, and the checks shared by its models and runs.

A torch-sim ``SimState`` holds flat ``positions [n_atoms, 3]``, ``system_idx [n_atoms]``
(called ``batch`` before 0.3), ``cell [n_systems, 3, 3]`` with the lattice vectors as
**columns** and ``pbc`` (a Python bool in 0.3, a ``[3]`` bool tensor later):
:func:`state_tensors` reads it as :class:`~quests_torch.uncertainty.UncertaintyBank` wants it
(cell rows, per-system pbc). The checks (bank against model, species of a multicomponent
bank) are used by :mod:`quests_torch.integrations.torch_sim` (the models) and
:mod:`quests_torch.integrations.torch_sim_md` (reporting and batched MD). Needs no torch-sim
itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from ..calculators import check_bank
from ..structures import canonical_device
from ..uncertainty import StructureUncertainty, UncertaintyBank, require_same_parameters

__all__ = [
    "SpeciesCheck",
    "StateTensors",
    "check_bank_for",
    "check_model",
    "evaluate_state",
    "state_tensors",
]


# ---------------------------------------------------------------------------- state access
class StateTensors(NamedTuple):
    """The tensors of a torch-sim state in quests-torch's conventions.

    Attributes:
        positions: ``[n_atoms, 3]`` (Å).
        cell: ``[n_systems, 3, 3]`` lattice vectors as **rows** (``state.cell.mT``).
        pbc: ``[n_systems, 3]`` bool.
        system_idx: ``[n_atoms]`` int64 system of each atom.
        numbers: ``[n_atoms]`` atomic numbers (``None`` when the state has none).
        n_systems: number of systems (``cell.shape[0]``, no host synchronisation).
    """

    positions: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    system_idx: torch.Tensor
    numbers: torch.Tensor | None
    n_systems: int


def _field(state: object, name: str) -> Any:
    if isinstance(state, Mapping):
        return state.get(name)
    return getattr(state, name, None)


def state_tensors(state: object) -> StateTensors:
    """Positions, row cell, per-system pbc and ``system_idx`` of a torch-sim state.

    Accepts a ``SimState`` (or subclass) or a state dict with the same keys; ``system_idx`` is
    read from ``batch`` where an older torch-sim calls it so, ``pbc`` may be a bool, a ``[3]``
    or a ``[n_systems, 3]`` tensor.

    Raises:
        TypeError: ``state`` lacks positions or cell.
    """
    positions, cell = _field(state, "positions"), _field(state, "cell")
    if not isinstance(positions, torch.Tensor) or not isinstance(cell, torch.Tensor):
        raise TypeError(
            "`state` must be a torch-sim SimState (or a dict) with `positions` and `cell` "
            f"tensors, got {type(state).__name__}"
        )
    if cell.ndim == 2:
        cell = cell[None]
    n_systems = int(cell.shape[0])
    system_idx = _field(state, "system_idx")
    if system_idx is None:
        system_idx = _field(state, "batch")
    if system_idx is None:
        system_idx = torch.zeros(positions.shape[0], dtype=torch.int64, device=positions.device)
    pbc = _field(state, "pbc")
    pbc = torch.as_tensor(True if pbc is None else pbc, dtype=torch.bool, device=positions.device)
    if pbc.ndim == 0:
        pbc = pbc.expand(3)
    if pbc.ndim == 1:
        pbc = pbc.expand(n_systems, 3)
    numbers = _field(state, "atomic_numbers")
    return StateTensors(positions, cell.mT, pbc, system_idx.to(torch.int64), numbers, n_systems)


# ---------------------------------------------------------------------------- checks
def check_bank_for(
    bank: object,
    model: object | None,
    k: int | None,
    cutoff: float | None,
) -> UncertaintyBank:
    """A non-empty bank with the expected ``k``/``cutoff`` on the model's device and dtype."""
    bank = check_bank(bank)
    require_same_parameters(
        (k, cutoff),
        (bank.k, bank.cutoff),
        lambda p, given, ours: (
            f"`bank` was built with {p}={ours} but {p}={given} was "
            "expected: rebuild the bank with the descriptor parameters of the reference data"
        ),
    )
    if model is not None:
        if canonical_device(model.device) != canonical_device(bank.device):
            raise ValueError(
                f"`model` is on {model.device} but `bank` is on {bank.device}: move the bank "
                f"(`bank.to({str(model.device)!r})`) or build the model on {bank.device}"
            )
        if model.dtype != bank.dtype:
            raise ValueError(
                f"`model` computes in {model.dtype} but `bank` holds {bank.dtype}: build them "
                f"with the same dtype (e.g. `bank.to({model.dtype})`)"
            )
    return bank


def check_model(model: object, name: str = "model") -> Any:
    """``model`` itself if it looks like a torch-sim model (device, dtype, compute_forces)."""
    if not isinstance(model, torch.nn.Module) or not all(
        hasattr(model, a) for a in ("device", "dtype", "compute_forces")
    ):
        raise TypeError(
            f"`{name}` must be a torch-sim model (a ModelInterface with device, dtype and "
            f"compute_forces), got {type(model).__name__}"
        )
    return model


class SpeciesCheck:
    """Check once per ``atomic_numbers`` tensor that a multicomponent bank knows its species."""

    def __init__(self, bank: UncertaintyBank) -> None:
        self.bank = bank
        self._seen: torch.Tensor | None = None

    def __call__(self, numbers: torch.Tensor | None) -> torch.Tensor | None:
        species = self.bank.species
        if not species:
            return None
        if numbers is None:
            raise ValueError(
                f"`state.atomic_numbers` is required: the bank was built for species {species}"
            )
        if numbers is self._seen:  # integrators pass the same tensor from step to step
            return numbers
        present = torch.unique(numbers).tolist()
        unknown = sorted(set(present) - set(species))
        if unknown:
            raise ValueError(
                f"`state.atomic_numbers` holds species {unknown} that the bank does not know "
                f"(bank species {list(species)}): add structures with them to the bank"
            )
        self._seen = numbers
        return numbers


def evaluate_state(
    bank: UncertaintyBank, species: SpeciesCheck, t: StateTensors, threshold: float
) -> StructureUncertainty:
    """Per-atom dH of a state and its per-system summaries (with a graph only where the
    state's positions or cell require grad and grad mode is on)."""
    numbers = species(t.numbers)
    grad = torch.is_grad_enabled() and (t.positions.requires_grad or t.cell.requires_grad)
    with torch.set_grad_enabled(grad):
        return bank.evaluate(t.positions, t.cell, t.pbc, t.system_idx, numbers, threshold=threshold)
