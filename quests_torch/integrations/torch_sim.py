r"""torch-sim integration: per-atom dH and entropy-biased MD for batches of systems.

`torch-sim <https://github.com/TorchSim/torch-sim>`_ drives many structures at once on one
device: a ``SimState`` holds flat ``positions [n_atoms, 3]``, ``system_idx [n_atoms]`` (called
``batch`` before 0.3), ``cell [n_systems, 3, 3]`` with the lattice vectors as **columns** (the
transpose of ASE's and of :class:`~quests_torch.uncertainty.UncertaintyBank`'s rows) and
``pbc`` (a Python bool in 0.3, a ``[3]`` bool tensor later). This module adapts both ways:

* :class:`UncertaintyModel` wraps any torch-sim model (MACE, Lennard-Jones, ...) and adds the
  per-atom ``"dH"`` and the per-system ``"max_dH"``, ``"mean_dH"``, ``"fraction_above"`` to its
  outputs, computed on the state's device from the same tensors
  (``bank(positions, cell.mT, pbc, system_idx)``). It works unchanged in
  ``torch_sim.integrate``/``optimize`` (newer torch-sim keep the extra outputs on the state).
* :class:`EntropyBiasModel` adds the bias ``E_s = -lambda f_s(dH) - mu H_s`` of
  :class:`~quests_torch.calculators.EntropyBiasCalculator` (same options, same maths:
  :func:`~quests_torch.calculators.entropy_bias_energy`) to a model, forces ``-dE/dr`` and stress
  ``(1/V) dE/d eps`` by autograd, for many biased replicas in one batched call.
* :func:`uncertainty_properties` gives ``TrajectoryReporter`` property functions
  (``"max_dH"``, ``"mean_dH"``, ``"fraction_above"``).
* :func:`run_with_uncertainty` runs batched MD and flags, drops or raises on the systems whose
  ``max dH`` exceeds a threshold (the batched ``QuestsUncertaintyCalculator(action=...)``).

Needs ``torch-sim-atomistic>=0.3`` (``pip install quests-torch[mlip]``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

try:
    import torch_sim as ts
    from torch_sim.models.interface import ModelInterface
except ImportError as _err:  # pragma: no cover - exercised only without torch-sim
    raise ImportError(
        "quests_torch.integrations.torch_sim needs torch-sim (torch-sim-atomistic>=0.3): "
        "install it with `pip install quests-torch[mlip]`"
    ) from _err

from ..calculators import (
    ExtrapolationError,
    check_bank,
    check_bias_options,
    entropy_bias_energy,
)
from ..metrics import entropy_per_structure
from ..uncertainty import StructureUncertainty, UncertaintyBank, per_structure_summary

__all__ = [
    "BatchExtrapolationError",
    "DroppedSystem",
    "EntropyBiasModel",
    "StateTensors",
    "UncertaintyModel",
    "UncertaintyRun",
    "run_with_uncertainty",
    "state_tensors",
    "uncertainty_properties",
]

_ACTIONS = ("flag", "drop", "raise")


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
def _same_device(a: torch.device, b: torch.device) -> bool:
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cpu":
        return True
    ia = torch.cuda.current_device() if a.index is None and a.type == "cuda" else a.index
    ib = torch.cuda.current_device() if b.index is None and b.type == "cuda" else b.index
    return ia == ib


def _check_bank_for(
    bank: object,
    model: object | None,
    k: int | None,
    cutoff: float | None,
) -> UncertaintyBank:
    """A non-empty bank with the expected ``k``/``cutoff`` on the model's device and dtype."""
    bank = check_bank(bank)
    if k is not None and int(k) != bank.k:
        raise ValueError(
            f"`bank` was built with k={bank.k} but k={k} was expected: rebuild the bank with "
            "the descriptor parameters of the reference data"
        )
    if cutoff is not None and not math.isclose(float(cutoff), bank.cutoff, rel_tol=1e-12):
        raise ValueError(
            f"`bank` was built with cutoff={bank.cutoff} but cutoff={cutoff} was expected: "
            "rebuild the bank with the descriptor parameters of the reference data"
        )
    if model is not None:
        if not _same_device(model.device, bank.device):
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


def _check_model(model: object, name: str = "model") -> Any:
    if not isinstance(model, torch.nn.Module) or not all(
        hasattr(model, a) for a in ("device", "dtype", "compute_forces")
    ):
        raise TypeError(
            f"`{name}` must be a torch-sim model (a ModelInterface with device, dtype and "
            f"compute_forces), got {type(model).__name__}"
        )
    return model


def _check_threshold(threshold: object, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"`{name}` must be a float (nats), got {type(threshold).__name__}")
    if math.isnan(threshold):
        raise ValueError(f"`{name}` must not be NaN")
    return float(threshold)


class _SpeciesCheck:
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


def _evaluate(
    bank: UncertaintyBank, species: _SpeciesCheck, t: StateTensors, threshold: float
) -> StructureUncertainty:
    numbers = species(t.numbers)
    grad = torch.is_grad_enabled() and (t.positions.requires_grad or t.cell.requires_grad)
    with torch.set_grad_enabled(grad):
        return bank.evaluate(t.positions, t.cell, t.pbc, t.system_idx, numbers, threshold=threshold)


# ---------------------------------------------------------------------------- models
class _Wrapper(ModelInterface):
    """Forwards the attributes torch-sim reads (device, dtype, flags) to the wrapped model."""

    model: torch.nn.Module | None

    @property
    def device(self) -> torch.device:
        return self.model.device if self.model is not None else self.bank.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype if self.model is not None else self.bank.dtype

    @property
    def compute_forces(self) -> bool:
        return bool(self.model.compute_forces) if self.model is not None else True

    @compute_forces.setter
    def compute_forces(self, value: bool) -> None:
        if self.model is not None:
            self.model.compute_forces = value

    @property
    def compute_stress(self) -> bool:
        return bool(self.model.compute_stress) if self.model is not None else False

    @compute_stress.setter
    def compute_stress(self, value: bool) -> None:
        if self.model is not None:
            self.model.compute_stress = value

    @property
    def memory_scales_with(self) -> str:
        if self.model is None:
            return "n_atoms_x_density"
        return getattr(self.model, "memory_scales_with", "n_atoms_x_density")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name in ("model", "bank"):
                raise
            model = self._modules.get("model")
            if model is None:
                raise
            return getattr(model, name)


class UncertaintyModel(_Wrapper):
    r"""A torch-sim model that adds per-atom dH against a bank to another model's outputs.

    ``forward(state)`` returns the wrapped model's outputs (same keys, same tensors) plus

    * ``"dH"``: ``[n_atoms]`` ``dH(y_i | X) = -log sum_j exp(-|y_i - x_j|^2 / (2 h^2))`` (nats),
      ``bank(positions, cell.mT, pbc, system_idx)``;
    * ``"max_dH"``, ``"mean_dH"``: ``[n_systems]`` largest and mean dH of each system;
    * ``"fraction_above"``: ``[n_systems]`` fraction of each system's atoms with
      ``dH > threshold``.

    All on the state's device in the bank's dtype, reduced without host synchronisation. dH is
    computed without an autograd graph unless ``differentiable=True`` (and the state's
    positions or cell require grad): MLIPs such as MACE switch ``requires_grad`` on for the
    state's positions to get their forces, and a graph through the descriptors that nobody
    differentiates costs ~30 % of a small MACE's force call. ``device``, ``dtype``,
    ``compute_forces``, ``compute_stress``, ``memory_scales_with`` and any other attribute are
    those of the wrapped model, so it works in ``torch_sim.integrate``/``optimize``/``static``
    and the autobatchers unchanged.

    Args:
        model: the torch-sim model to wrap.
        bank: reference environments (same device and dtype as ``model``).
        threshold: dH above which an atom counts in ``"fraction_above"`` (nats).
        k, cutoff: descriptor parameters the bank must have been built with (checked when
            given).
        differentiable: keep dH's autograd graph when the state's positions or cell require
            grad (default: dH is a monitor, computed without one).

    Raises:
        TypeError: ``model`` is not a torch-sim model, ``bank`` not an UncertaintyBank.
        ValueError: empty bank, ``k``/``cutoff`` differ, model and bank on different devices
            or dtypes; at call time, species unknown to a multicomponent bank.
    """

    def __init__(
        self,
        model: ModelInterface,
        bank: UncertaintyBank,
        threshold: float = 0.0,
        *,
        k: int | None = None,
        cutoff: float | None = None,
        differentiable: bool = False,
    ) -> None:
        super().__init__()
        self.model = _check_model(model)
        self.bank = _check_bank_for(bank, model, k, cutoff)
        self.threshold = _check_threshold(threshold)
        self.differentiable = bool(differentiable)
        self._species = _SpeciesCheck(self.bank)

    def uncertainty(self, state: object) -> StructureUncertainty:
        """Per-atom dH and per-system max, mean and fraction above ``threshold`` of ``state``."""
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            return _evaluate(self.bank, self._species, state_tensors(state), self.threshold)

    def forward(self, state: object, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The wrapped model's outputs plus ``dH``, ``max_dH``, ``mean_dH``, ``fraction_above``."""
        out = dict(self.model(state, **kwargs))
        u = self.uncertainty(state)
        out.update(dH=u.dH, max_dH=u.max_dH, mean_dH=u.mean_dH, fraction_above=u.fraction_above)
        return out


def _strain(x: torch.Tensor, deform: torch.Tensor) -> torch.Tensor:
    """Rows of 3-vectors times their 3x3 deformation, ``x[i] @ deform[i]``, elementwise.

    No matmul (so no TF32); ``x [..., n, 3]`` with ``deform [..., n, 3, 3]`` broadcastable.
    """
    return (x[..., :, None] * deform).sum(-2)


class EntropyBiasModel(_Wrapper):
    r"""A torch-sim model plus the entropy bias of :class:`EntropyBiasCalculator`, batched.

    For each system ``s``,

    .. math::

        E_s = E^\text{model}_s - \lambda f_s(\delta H) - \mu H_s,

    with ``f_s`` the mean (``reduction="mean"``) or the smooth maximum
    ``(1/beta) log((1/n_s) sum_i exp(beta v_i))`` (``"softmax"``) of ``v_i = dH_i`` or, with
    ``saturation = c``, ``v_i = c tanh(dH_i / c)``, and ``H_s`` the entropy of the system's own
    environments (bandwidth ``entropy_h``, when ``entropy_strength != 0``); the maths is
    :func:`~quests_torch.calculators.entropy_bias_energy`, shared with the ASE calculator.
    The bias forces ``-dE/dr`` and, with ``compute_stress``, the stress
    ``sigma_s = (1/V_s) dE_s/d eps`` (symmetrised, torch-sim's and ASE's sign: negative under
    compression, eV/Å^3, ``[n_systems, 3, 3]``) come from autograd and are added to the model's.

    Outputs: ``"energy"`` ``[n_systems]``, ``"forces"`` ``[n_atoms, 3]``, ``"stress"``
    (when computed), plus ``"dH"`` ``[n_atoms]``, ``"max_dH"``, ``"bias_energy"`` and ``"bias_f"``
    ``[n_systems]`` (and ``"bias_entropy"`` with ``mu != 0``); other outputs of the wrapped model
    pass through.

    Args:
        model: the physical torch-sim model, or ``None`` for the bias alone (then on the bank's
            device and dtype).
        bank: reference environments (same device and dtype as ``model``).
        strength: ``lambda`` (eV/nat); positive values push towards novel environments.
        reduction, beta, entropy_strength, entropy_h, saturation: as in
            :class:`~quests_torch.calculators.EntropyBiasCalculator`.
        compute_stress: add the bias stress (needs fully periodic systems). Default: the
            wrapped model's ``compute_stress`` (``False`` without a model).
        k, cutoff: descriptor parameters the bank must have been built with (checked).

    Raises:
        ValueError: bad options (see :func:`~quests_torch.calculators.check_bias_options`),
            ``compute_stress`` with a model that does not compute stress, model/bank device or
            dtype mismatch, ``k``/``cutoff`` mismatch; at call time, stress of a non-periodic
            system or species unknown to a multicomponent bank.
    """

    def __init__(
        self,
        model: ModelInterface | None,
        bank: UncertaintyBank,
        strength: float = 0.01,
        *,
        reduction: str = "mean",
        beta: float = 1.0,
        entropy_strength: float = 0.0,
        entropy_h: float | None = None,
        saturation: float | None = None,
        compute_stress: bool | None = None,
        k: int | None = None,
        cutoff: float | None = None,
    ) -> None:
        super().__init__()
        self.model = None if model is None else _check_model(model)
        self.bank = _check_bank_for(bank, model, k, cutoff)
        (
            self.strength,
            self.reduction,
            self.beta,
            self.entropy_strength,
            self.saturation,
        ) = check_bias_options(strength, reduction, beta, entropy_strength, saturation)
        self.entropy_h = self.bank.h if entropy_h is None else float(entropy_h)
        self._species = _SpeciesCheck(self.bank)
        self._stress = self._check_stress(
            bool(getattr(model, "compute_stress", False)) if compute_stress is None else None,
            compute_stress,
        )

    def _check_stress(self, default: bool | None, value: bool | None) -> bool:
        want = default if value is None else bool(value)
        if want and self.model is not None and not self.model.compute_stress:
            raise ValueError(
                "`compute_stress=True` but the wrapped `model` does not compute stress: build it "
                "with compute_stress=True"
            )
        return bool(want)

    @property
    def compute_stress(self) -> bool:
        return self._stress

    @compute_stress.setter
    def compute_stress(self, value: bool) -> None:
        if self.model is not None and bool(value) != bool(self.model.compute_stress):
            self.model.compute_stress = value  # may raise NotImplementedError (torch-sim's way)
        self._stress = self._check_stress(None, value)

    @property
    def compute_forces(self) -> bool:
        return True if self.model is None else bool(self.model.compute_forces)

    @compute_forces.setter
    def compute_forces(self, value: bool) -> None:
        if self.model is not None:
            self.model.compute_forces = value

    def bias(
        self, state: object, *, forces: bool = True, stress: bool = False
    ) -> dict[str, torch.Tensor]:
        """The bias alone: ``energy``, and ``forces``/``stress`` when asked (detached).

        Also ``dH``, ``max_dH``, ``bias_f`` (and ``bias_entropy``). Shapes as in the class doc.
        """
        t = state_tensors(state)
        numbers = self._species(t.numbers)
        if stress and not bool(t.pbc.all()):
            raise ValueError("`state.pbc` must be fully periodic to compute the bias stress")
        n_sys, idx = t.n_systems, t.system_idx
        pos0 = t.positions.detach()
        eye = torch.eye(3, dtype=pos0.dtype, device=pos0.device)
        eps = torch.zeros((n_sys, 3, 3), dtype=pos0.dtype, device=pos0.device)
        inputs = []
        if forces:
            pos0 = pos0.clone().requires_grad_(True)
            inputs.append(pos0)
        if stress:
            eps.requires_grad_(True)
            inputs.append(eps)
        with torch.set_grad_enabled(bool(inputs)):
            deform = eye + eps
            positions = _strain(pos0, deform.index_select(0, idx))
            cell = _strain(t.cell.detach(), deform[:, None])
            y = self.bank.descriptors_of(positions, cell, t.pbc, idx, numbers)
            dh = self.bank.delta_entropy(y)
            h_struct = None
            if self.entropy_strength != 0.0:
                h_struct = entropy_per_structure(
                    y, idx, self.entropy_h, n_sys, dtype=self.bank.dtype
                )
            energy, f = entropy_bias_energy(
                dh,
                idx,
                n_sys,
                strength=self.strength,
                reduction=self.reduction,
                beta=self.beta,
                saturation=self.saturation,
                entropy=h_struct,
                entropy_strength=self.entropy_strength,
            )
            grads = torch.autograd.grad(energy.sum(), inputs) if inputs else ()
        dh = dh.detach()
        top = per_structure_summary(dh, idx, n_sys).max_dH
        out = {"energy": energy.detach(), "dH": dh, "max_dH": top, "bias_f": f.detach()}
        if h_struct is not None:
            out["bias_entropy"] = h_struct.detach()
        if forces:
            out["forces"] = -grads[0]
        if stress:
            g = grads[-1]
            volume = torch.linalg.det(t.cell.detach()).abs()
            out["stress"] = 0.5 * (g + g.mT) / volume[:, None, None]
        return out

    def forward(self, state: object, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Energy, forces (and stress) of the model plus the bias; see the class doc."""
        out = {} if self.model is None else dict(self.model(state, **kwargs))
        b = self.bias(state, forces=self.compute_forces, stress=self.compute_stress)
        for key in ("energy", "forces", "stress"):
            if key in b:
                out[key] = out[key] + b[key] if key in out else b[key]
        out["bias_energy"] = b.pop("energy")
        b.pop("forces", None)
        b.pop("stress", None)
        out.update(b)
        return out


# ---------------------------------------------------------------------------- reporting
def _resolve_bank(bank: UncertaintyBank | None, model: object | None) -> UncertaintyBank:
    if bank is not None:
        return bank
    inner = getattr(model, "bank", None) if model is not None else None
    if isinstance(inner, UncertaintyBank):
        return inner
    raise ValueError(
        "no bank: pass `bank=` to uncertainty_properties, or run with an UncertaintyModel or "
        f"EntropyBiasModel (got model {type(model).__name__})"
    )


def uncertainty_properties(
    bank: UncertaintyBank | None = None,
    *,
    threshold: float = 0.0,
    k: int | None = None,
    cutoff: float | None = None,
) -> dict[str, Callable[..., torch.Tensor]]:
    """Property functions of dH for ``torch_sim.TrajectoryReporter``.

    ``TrajectoryReporter(..., prop_calculators={10: uncertainty_properties(bank)})`` records,
    every 10 steps and for each system, ``"max_dH"``, ``"mean_dH"`` and ``"fraction_above"``
    (atoms with ``dH > threshold``). Each function takes ``(state, model=None)`` and returns a
    ``[n_systems]`` tensor for the state it is given (torch-sim 0.3 passes one system at a
    time); the three share one dH evaluation per state. Pick a subset with
    ``{name: f for name, f in props.items() if name == "max_dH"}``.

    Args:
        bank: reference environments; ``None`` takes the bank of the model the reporter is
            called with (an :class:`UncertaintyModel` or :class:`EntropyBiasModel`).
        threshold: dH above which an atom counts in ``"fraction_above"`` (nats).
        k, cutoff: descriptor parameters the bank must have been built with (checked).

    Returns:
        ``{"max_dH": fn, "mean_dH": fn, "fraction_above": fn}``.
    """
    if bank is not None:
        bank = _check_bank_for(bank, None, k, cutoff)
    threshold = _check_threshold(threshold)
    cache: dict[str, Any] = {}

    def summary(state: object, model: object | None) -> StructureUncertainty:
        b = _resolve_bank(bank, model)
        if bank is None:
            _check_bank_for(b, None, k, cutoff)
        t = state_tensors(state)
        key = (b, t.positions, t.positions._version, t.cell._version)
        if (
            cache.get("key") is not None
            and all(x is y for x, y in zip(cache["key"][:2], key[:2], strict=True))
            and cache["key"][2:] == key[2:]
        ):
            return cache["value"]
        check = cache.get("species")
        if check is None or check.bank is not b:
            check = cache["species"] = _SpeciesCheck(b)
        with torch.no_grad():
            value = _evaluate(b, check, t, threshold)
        cache["key"], cache["value"] = key, value  # holds the positions: no id reuse
        return value

    def max_dh(state: object, model: object | None = None) -> torch.Tensor:
        return summary(state, model).max_dH

    def mean_dh(state: object, model: object | None = None) -> torch.Tensor:
        return summary(state, model).mean_dH

    def fraction_above(state: object, model: object | None = None) -> torch.Tensor:
        return summary(state, model).fraction_above

    return {"max_dH": max_dh, "mean_dH": mean_dh, "fraction_above": fraction_above}


# ---------------------------------------------------------------------------- runs
class DroppedSystem(NamedTuple):
    """A system removed from a run by ``action="drop"``.

    Attributes:
        system: its index in the input batch.
        step: the MD step at which its ``max_dH`` exceeded the threshold.
        max_dH: that ``max_dH`` (nats).
        state: its single-system state at that step.
    """

    system: int
    step: int
    max_dH: float
    state: Any


class BatchExtrapolationError(ExtrapolationError):
    """Systems of a batched run left the reference data: their ``max dH > threshold``.

    An :class:`~quests_torch.calculators.ExtrapolationError`, raised by
    :func:`run_with_uncertainty` with ``action="raise"``.

    Attributes:
        systems: indices (in the input batch) of the offending systems.
        system_max_dH: their ``max_dH`` (nats), in the order of ``systems``.
        max_dH: the largest of them.
        dH: per-atom dH (numpy) of the offending systems, concatenated.
        step: MD step of the check (``call`` holds it too).
        threshold: the threshold that was exceeded.
        state: the offending systems' state at that step; ``atoms``: them as ``ase.Atoms``.
    """

    def __init__(
        self,
        systems: list[int],
        system_max_dh: list[float],
        dh: np.ndarray,
        threshold: float,
        step: int,
        state: Any,
    ) -> None:
        self.systems = systems
        self.system_max_dH = system_max_dh
        self.max_dH = max(system_max_dh)
        self.dH = dh
        self.threshold = threshold
        self.step = self.call = step
        self.state = state
        self.atoms = state.to_atoms() if hasattr(state, "to_atoms") else None
        shown = ", ".join(
            f"{s} (max dH {m:.3f})" for s, m in zip(systems, system_max_dh, strict=True)
        )
        RuntimeError.__init__(
            self,
            f"extrapolation at step {step}: systems {shown} exceed the threshold {threshold:g} "
            "nats",
        )


@dataclass
class UncertaintyRun:
    """Outcome of :func:`run_with_uncertainty`.

    Attributes:
        state: final state of the systems still running (``None`` when all were dropped).
        systems: input indices of the systems in ``state``, in order.
        steps: MD steps of the checks (0 is the initial state).
        max_dH: ``[n_checks, n_systems_in]`` float64 CPU tensor of each system's max dH at each
            check (NaN once dropped).
        mean_dH: the same for the mean dH.
        events: ``(step, system, max_dH)`` of every threshold crossing.
        dropped: the systems removed by ``action="drop"``.
    """

    state: Any
    systems: list[int]
    steps: list[int] = field(default_factory=list)
    max_dH: torch.Tensor | None = None
    mean_dH: torch.Tensor | None = None
    events: list[tuple[int, int, float]] = field(default_factory=list)
    dropped: list[DroppedSystem] = field(default_factory=list)

    @property
    def flagged(self) -> list[int]:
        """Input indices of the systems that crossed the threshold at least once."""
        return sorted({s for _, s, _ in self.events})


def _temperatures(temperature: object, n_systems: int) -> torch.Tensor:
    t = torch.as_tensor(temperature, dtype=torch.float64).cpu()
    if t.ndim == 0:
        t = t.expand(n_systems)
    if t.shape != (n_systems,):
        raise ValueError(
            f"`temperature` must be a float or one per system ({n_systems}), got shape "
            f"{tuple(t.shape)}"
        )
    return t.clone()


def run_with_uncertainty(
    system: object,
    model: ModelInterface,
    *,
    integrator: Any,
    n_steps: int,
    temperature: float | Sequence[float] | torch.Tensor,
    timestep: float,
    threshold: float,
    bank: UncertaintyBank | None = None,
    action: str = "flag",
    check_every: int = 10,
    **integrator_kwargs: Any,
) -> UncertaintyRun:
    """Batched MD with ``torch_sim.integrate`` that watches each system's max dH.

    The run is ``torch_sim.integrate`` in chunks of ``check_every`` steps; before the first
    step and after each chunk every system's ``max_dH`` is evaluated and compared with
    ``threshold``. Systems above it are recorded (``action="flag"``), removed from the running
    state and returned separately (``"drop"``; the others continue), or stop the run with
    :class:`BatchExtrapolationError` naming them (``"raise"``). Momenta carry over from chunk
    to chunk (torch-sim's integrator init keeps a state's momenta); other thermostat variables
    (Nosé-Hoover chains, barostats) are re-initialised at each check, and each chunk's init
    costs one more model call, so keep ``check_every`` well above 1 for such integrators.

    Args:
        system: anything ``torch_sim.integrate`` takes (SimState, ase.Atoms or a list, ...).
        model: the torch-sim model that drives the MD (a bare model is cheapest; an
            :class:`UncertaintyModel` works too and lends its bank).
        integrator: as for ``torch_sim.integrate`` (``ts.nvt_langevin`` in torch-sim 0.3,
            ``ts.Integrator.nvt_langevin`` later).
        n_steps: MD steps.
        temperature: K, a float or one per system.
        timestep: ps, as for ``torch_sim.integrate``.
        threshold: ``max_dH`` above which a system counts as extrapolating (nats).
        bank: reference environments (default: ``model.bank``).
        action: ``"flag"``, ``"drop"`` or ``"raise"``.
        check_every: MD steps between checks.
        **integrator_kwargs: passed to ``torch_sim.integrate``.

    Returns:
        :class:`UncertaintyRun`.

    Raises:
        BatchExtrapolationError: with ``action="raise"``, at the first check where a system
            exceeds the threshold.
        ValueError: bad arguments (named), model/bank mismatch, unknown species.
    """
    if action not in _ACTIONS:
        raise ValueError(f"`action` must be one of {_ACTIONS}, got {action!r}")
    for name, v, low in (("n_steps", n_steps, 0), ("check_every", check_every, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"`{name}` must be an int >= {low}, got {v!r}")
    threshold = _check_threshold(threshold)
    _check_model(model)
    bank = _check_bank_for(_resolve_bank(bank, model), model, None, None)
    species = _SpeciesCheck(bank)
    state = ts.initialize_state(system, model.device, model.dtype)
    n_in = state_tensors(state).n_systems
    temps = _temperatures(temperature, n_in)
    alive = list(range(n_in))
    run = UncertaintyRun(state=state, systems=alive)
    rows_max: list[torch.Tensor] = []
    rows_mean: list[torch.Tensor] = []

    def check(step: int) -> bool:
        nonlocal state, alive
        t = state_tensors(state)
        with torch.no_grad():
            u = _evaluate(bank, species, t, threshold)
        top, mean = u.max_dH.double().cpu(), u.mean_dH.double().cpu()
        row_max = torch.full((n_in,), math.nan, dtype=torch.float64)
        row_mean = row_max.clone()
        row_max[alive], row_mean[alive] = top, mean
        run.steps.append(step)
        rows_max.append(row_max)
        rows_mean.append(row_mean)
        over = [i for i, m in enumerate(top.tolist()) if m > threshold]
        for i in over:
            run.events.append((step, alive[i], float(top[i])))
        if not over or action == "flag":
            return True
        if action == "raise":
            sub = state[over] if len(over) < len(alive) else state
            dh = torch.cat([u.dH[t.system_idx == i] for i in over]).double().cpu().numpy()
            raise BatchExtrapolationError(
                [alive[i] for i in over], [float(top[i]) for i in over], dh, threshold, step, sub
            )
        if len(over) == len(alive):
            popped, state = state.split(), None
        else:
            popped = state.pop(over)
        for i, sub in zip(over, popped, strict=True):
            run.dropped.append(DroppedSystem(alive[i], step, float(top[i]), sub))
        gone = set(over)
        alive = [a for i, a in enumerate(alive) if i not in gone]
        return state is not None

    running = check(0)
    done = 0
    while running and done < n_steps:
        chunk = min(check_every, n_steps - done)
        t_alive = temps[alive]
        temperature_arg: Any = (
            float(t_alive[0]) if bool((t_alive == t_alive[0]).all()) else [t_alive.tolist()] * chunk
        )
        state = ts.integrate(
            system=state,
            model=model,
            integrator=integrator,
            n_steps=chunk,
            temperature=temperature_arg,
            timestep=timestep,
            **integrator_kwargs,
        )
        done += chunk
        running = check(done)
    run.state, run.systems = state, alive
    run.max_dH = torch.stack(rows_max)
    run.mean_dH = torch.stack(rows_mean)
    return run
