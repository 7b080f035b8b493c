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

The models live here; the state access and shared checks in
:mod:`~quests_torch.integrations.torch_sim_state`, the reporter properties and the batched
runs in :mod:`~quests_torch.integrations.torch_sim_md` (all re-exported here).

Needs ``torch-sim-atomistic>=0.3`` (``pip install quests-torch[mlip]``).
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import torch_sim  # noqa: F401  (first: a missing torch-sim gets the install hint)
    from torch_sim.models.interface import ModelInterface
except ImportError as _err:  # pragma: no cover - exercised only without torch-sim
    raise ImportError(
        "quests_torch.integrations.torch_sim needs torch-sim (torch-sim-atomistic>=0.3): "
        "install it with `pip install quests-torch[mlip]`"
    ) from _err

from ..calculators import EntropyBiasTerms, check_bias_keywords
from ..checks import check_threshold
from ..structures import strain_rows
from ..uncertainty import StructureUncertainty, UncertaintyBank, per_structure_summary
from .torch_sim_md import (
    BatchExtrapolationError,
    DroppedSystem,
    UncertaintyRun,
    run_with_uncertainty,
    uncertainty_properties,
)
from .torch_sim_state import (
    SpeciesCheck,
    StateTensors,
    check_bank_for,
    check_model,
    evaluate_state,
    state_tensors,
)

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


# ---------------------------------------------------------------------------- models
def _forwarded_flag(name: str, default: bool) -> property:
    """A bool property read from and written to the wrapped model (``default`` without one)."""

    def get(self) -> bool:
        return bool(getattr(self.model, name)) if self.model is not None else default

    def set_(self, value: bool) -> None:
        if self.model is not None:
            setattr(self.model, name, value)

    return property(get, set_, doc=f"The wrapped model's ``{name}`` ({default} without one).")


class _Wrapper(ModelInterface):
    """Forwards the attributes torch-sim reads (device, dtype, flags) to the wrapped model."""

    model: torch.nn.Module | None

    @property
    def device(self) -> torch.device:
        return self.model.device if self.model is not None else self.bank.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype if self.model is not None else self.bank.dtype

    compute_forces = _forwarded_flag("compute_forces", True)
    compute_stress = _forwarded_flag("compute_stress", False)

    @property
    def retain_graph(self) -> bool:
        """The wrapped model's ``retain_graph`` (torch-sim >= 0.6: keep the outputs' autograd
        graph); an AttributeError, as for the model, where it has none.

        A property, so that torch-sim's ``validate_model_outputs``, which writes the flag into
        the instance ``__dict__`` of a model it tests, checks the wrapper with the flag its
        wrapped model really has. dH keeps a graph only with ``differentiable=True``.
        """
        model = self._modules.get("model")
        if model is None or not hasattr(model, "retain_graph"):
            raise AttributeError(f"{type(model).__name__} has no `retain_graph`")
        return bool(model.retain_graph)

    @retain_graph.setter
    def retain_graph(self, value: bool) -> None:
        if self.model is None:
            raise AttributeError("`retain_graph` needs a wrapped model")
        self.model.retain_graph = bool(value)

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
        k: neighbours per environment the bank must have been built with (checked when
            given).
        cutoff: descriptor cutoff radius (Å) the bank must have been built with (checked
            when given).
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
        self.model = check_model(model)
        self.bank = check_bank_for(bank, model, k, cutoff)
        self.threshold = check_threshold(threshold, allow_inf=True)
        self.differentiable = bool(differentiable)
        self._species = SpeciesCheck(self.bank)

    def uncertainty(self, state: object) -> StructureUncertainty:
        """Per-atom dH and per-system max, mean and fraction above ``threshold`` of ``state``."""
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            return evaluate_state(self.bank, self._species, state_tensors(state), self.threshold)

    def forward(self, state: object, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The wrapped model's outputs plus ``dH``, ``max_dH``, ``mean_dH``, ``fraction_above``."""
        out = dict(self.model(state, **kwargs))
        u = self.uncertainty(state)
        out.update(dH=u.dH, max_dH=u.max_dH, mean_dH=u.mean_dH, fraction_above=u.fraction_above)
        return out


class EntropyBiasModel(EntropyBiasTerms, _Wrapper):
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
        compute_stress: add the bias stress (needs fully periodic systems). Default: the
            wrapped model's ``compute_stress`` (``False`` without a model).
        k: neighbours per environment the bank must have been built with (checked when
            given).
        cutoff: descriptor cutoff radius (Å) the bank must have been built with (checked
            when given).
        **bias_options: ``reduction`` (``"mean"``, default, or ``"softmax"``: how ``f_s``
            reduces the per-atom values of a system), ``beta``, ``entropy_strength``,
            ``entropy_h`` and ``saturation``: the keywords of
            :meth:`~quests_torch.calculators.EntropyBiasTerms.set_bias_options` (the same
            defaults and checks), shared with the ASE calculator.

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
        compute_stress: bool | None = None,
        k: int | None = None,
        cutoff: float | None = None,
        **bias_options,
    ) -> None:
        super().__init__()
        self.model = None if model is None else check_model(model)
        self.bank = check_bank_for(bank, model, k, cutoff)
        bias_options = check_bias_keywords(bias_options, "EntropyBiasModel")
        self.set_bias_options(strength, **bias_options)
        self._species = SpeciesCheck(self.bank)
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
        """Whether the bias stress is added (set through to the wrapped model as well)."""
        return self._stress

    @compute_stress.setter
    def compute_stress(self, value: bool) -> None:
        if self.model is not None and bool(value) != bool(self.model.compute_stress):
            self.model.compute_stress = value  # may raise NotImplementedError (torch-sim's way)
        self._stress = self._check_stress(None, value)

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
            positions = strain_rows(pos0, deform.index_select(0, idx))
            cell = strain_rows(t.cell.detach(), deform[:, None])
            y = self.bank.descriptors_of(positions, cell, t.pbc, idx, numbers)
            energy, f, dh, h_struct = self.bias_of_descriptors(y, idx, n_sys)
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
