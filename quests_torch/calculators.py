r"""ASE integration: uncertainty-aware wrapping of any calculator and an entropy bias potential.

:class:`QuestsUncertaintyCalculator` wraps an ASE calculator (an MLIP, EMT, DFT, ...): its
results are passed through unchanged and ``results["dH"]`` (per-atom dH against an
:class:`~quests_torch.uncertainty.UncertaintyBank`, nats) and ``results["max_dH"]`` are added.
When ``max_dH`` exceeds a threshold it either raises :class:`ExtrapolationError` (which stops
an MD run or an optimisation with the offending configuration attached) or records the event,
as chosen by ``action``; ``every=N`` evaluates dH on every N-th new configuration only.

:class:`EntropyBiasCalculator` is a bias potential for entropy-biased sampling,

.. math::

    E_\text{bias} = -\lambda\, f(\delta H_1, \dots, \delta H_n) - \mu\, H(X_\text{struct}),

with ``f`` the mean of the per-atom dH against the bank (``reduction="mean"``) or the smooth
maximum ``f = (1/\beta) \log((1/n) \sum_i e^{\beta\, \delta H_i})`` (``reduction="softmax"``,
between the mean and the max, tending to the max as ``beta`` grows), and ``H`` the
information entropy of the structure's own environments. Far from the bank dH grows like
``d^2 / (2 h^2)`` with the descriptor distance ``d``, so the bias is unbounded and a strong
one runs away (measured on 108-atom EMT Cu at 300 K: ``lambda = 1`` eV/nat with the mean
raises the mean dH by ~4 nats in 60 steps, ``lambda = 3`` or the softmax at ``lambda = 1``
reach dH of 10^2-10^4); ``saturation = c`` replaces every dH by ``c tanh(dH / c)`` before
the reduction, bounding the bias to ``lambda c`` per structure. Forces ``-dE/dr`` and the stress
``(1/V) dE/d\varepsilon`` come from autograd. Add it to a physical potential with
``ase.calculators.mixing.SumCalculator([EMT(), bias])``.
"""

from __future__ import annotations

import math
import numbers
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from ase.calculators.calculator import (
    BaseCalculator,
    Calculator,
    PropertyNotImplementedError,
    all_changes,
)

from .checks import (
    bind_arguments,
    check_h,
    check_positive_float,
    check_positive_int,
    check_threshold,
)
from .metrics import entropy as _entropy
from .metrics import entropy_per_structure
from .structures import AtomsBatch, segment_sum, strain_rows
from .uncertainty import UncertaintyBank

__all__ = [
    "BiasTerms",
    "EntropyBiasCalculator",
    "EntropyBiasTerms",
    "ExtrapolationError",
    "QuestsUncertaintyCalculator",
    "check_bank",
    "check_bias_keywords",
    "check_bias_options",
    "entropy_bias_energy",
]


class ExtrapolationError(RuntimeError):
    """A configuration left the reference data: ``max dH > threshold``.

    Attributes:
        atoms: a copy of the offending configuration (without calculator).
        dH: ``[n_atoms]`` per-atom dH (nats).
        max_dH: largest dH.
        threshold: the threshold that was exceeded.
        call: index of the configuration among those the calculator has seen (0-based).
    """

    def __init__(self, atoms, dH: np.ndarray, threshold: float, call: int) -> None:
        self.atoms = atoms
        self.dH = dH
        self.max_dH = float(dH.max())
        self.threshold = threshold
        self.call = call
        atom = int(np.argmax(dH))
        super().__init__(
            f"extrapolation: max dH = {self.max_dH:.3f} nats (atom {atom}) exceeds the "
            f"threshold {threshold:g} at configuration {call}"
        )


def check_bank(bank: object) -> UncertaintyBank:
    """``bank`` itself if it is a non-empty :class:`UncertaintyBank`; TypeError/ValueError else."""
    if not isinstance(bank, UncertaintyBank):
        raise TypeError(f"`bank` must be an UncertaintyBank, got {type(bank).__name__}")
    if bank.n_references == 0:
        raise ValueError("`bank` is empty: add reference environments first")
    return bank


def _batch(bank: UncertaintyBank, atoms) -> AtomsBatch:
    return AtomsBatch.from_ase(atoms, device=bank.device, dtype=bank.dtype)


class QuestsUncertaintyCalculator(Calculator):
    """Wrap an ASE calculator; add per-atom dH and stop or flag extrapolation.

    Results: everything the wrapped calculator computed (same values, same keys), plus
    ``"dH"`` (``[n_atoms]`` float64, nats) and ``"max_dH"`` (float) on the configurations
    where dH is evaluated.

    Args:
        calc: the ASE calculator to wrap.
        bank: reference environments and bandwidth.
        threshold: ``max_dH`` above which a configuration counts as extrapolation (nats);
            ``None`` never triggers.
        action: ``"raise"`` raises :class:`ExtrapolationError` (stops ``dyn.run()``; the
            results of the configuration are stored first), ``"flag"`` records the event in
            :attr:`events` and sets :attr:`extrapolated`.
        every: evaluate dH on every ``every``-th new configuration (the first one included);
            an explicit ``get_property("dH")`` always evaluates.

    Attributes:
        n_configurations: new configurations seen.
        n_evaluations: dH evaluations done.
        events: ``(configuration, max_dH)`` of every threshold crossing.
        extrapolated: whether any configuration crossed the threshold.
        history: ``(configuration, max_dH)`` of every evaluation.
    """

    def __init__(
        self,
        calc: BaseCalculator,
        bank: UncertaintyBank,
        *,
        threshold: float | None = None,
        action: str = "raise",
        every: int = 1,
    ) -> None:
        if not isinstance(calc, BaseCalculator):
            raise TypeError(f"`calc` must be an ASE calculator, got {type(calc).__name__}")
        if action not in ("raise", "flag"):
            raise ValueError(f"`action` must be 'raise' or 'flag', got {action!r}")
        super().__init__()
        self.calc = calc
        self.bank = check_bank(bank)
        self.threshold = None if threshold is None else check_threshold(threshold, allow_inf=True)
        self.action = action
        self.every = check_positive_int(every, "every")
        self.implemented_properties = [
            *calc.implemented_properties,
            *(p for p in ("dH", "max_dH") if p not in calc.implemented_properties),
        ]
        self.n_configurations = 0
        self.n_evaluations = 0
        self.events: list[tuple[int, float]] = []
        self.history: list[tuple[int, float]] = []

    @property
    def extrapolated(self) -> bool:
        """Whether any configuration crossed ``threshold`` (``events`` is not empty)."""
        return bool(self.events)

    def per_atom_dh(self, atoms) -> np.ndarray:
        """Per-atom dH of ``atoms`` against the bank (float64 numpy, nats)."""
        b = _batch(self.bank, atoms)
        with torch.no_grad():
            dh = self.bank(b.positions, b.cell, b.pbc, b.system_idx, self._numbers(b))
        return dh.detach().cpu().numpy().astype(np.float64)

    def _numbers(self, b: AtomsBatch):
        return b.numbers if self.bank.species else None

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """Run the wrapped calculator for ``properties``, then add dH when due or asked for."""
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        new = bool(system_changes)
        if new:
            self.n_configurations += 1
        wrapped = [p for p in properties if p in self.calc.implemented_properties]
        for p in wrapped:
            self.calc.get_property(p, atoms)
        if wrapped:
            self.results.update(self.calc.results)
        asked = any(p in ("dH", "max_dH") for p in properties)
        due = new and (self.n_configurations - 1) % self.every == 0
        if "dH" in self.results or not (asked or due):
            return
        dh = self.per_atom_dh(atoms)
        self.n_evaluations += 1
        top = float(dh.max())
        self.results["dH"] = dh
        self.results["max_dH"] = top
        config = self.n_configurations - 1
        self.history.append((config, top))
        if self.threshold is not None and top > self.threshold:
            self.events.append((config, top))
            if self.action == "raise":
                frame = atoms.copy()
                frame.calc = None
                raise ExtrapolationError(frame, dh, self.threshold, config)


_REDUCTIONS = ("mean", "softmax")


class BiasTerms(NamedTuple):
    """Terms of the entropy bias of one structure (tensors, differentiable); from
    :meth:`EntropyBiasTerms.bias_of_descriptors` each is per structure (``[n_systems]``).

    Attributes:
        energy: 0-d bias energy ``-lambda f - mu H`` (eV).
        f: 0-d reduction of the per-atom dH (nats).
        dH: ``[n_atoms]`` per-atom dH against the bank (nats).
        entropy: 0-d entropy ``H`` of the structure's own environments, or ``None`` when
            ``mu = 0``.
    """

    energy: torch.Tensor
    f: torch.Tensor
    dH: torch.Tensor
    entropy: torch.Tensor | None


def check_bias_options(
    strength: float,
    reduction: str = "mean",
    beta: float = 1.0,
    entropy_strength: float = 0.0,
    saturation: float | None = None,
) -> tuple[float, str, float, float, float | None]:
    """Validate the options of the entropy bias; returns them as plain floats.

    Shared by :class:`EntropyBiasCalculator` and the torch-sim ``EntropyBiasModel``.

    Returns:
        ``(strength, reduction, beta, entropy_strength, saturation)``.

    Raises:
        ValueError: a non-finite strength, an unknown reduction, ``beta <= 0``, or a
            saturation that is not a positive float.
        TypeError: ``beta`` or ``saturation`` is not a number.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}")
    for name, v in (("strength", strength), ("entropy_strength", entropy_strength)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"`{name}` must be a finite float, got {v!r}")
    return (
        float(strength),
        reduction,
        check_positive_float(beta, "beta"),
        float(entropy_strength),
        None if saturation is None else check_positive_float(saturation, "saturation"),
    )


def entropy_bias_energy(
    dh: torch.Tensor,
    system_idx: torch.Tensor | None = None,
    n_systems: int = 1,
    *,
    strength: float,
    reduction: str = "mean",
    beta: float = 1.0,
    saturation: float | None = None,
    entropy: torch.Tensor | None = None,
    entropy_strength: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Entropy bias energy of each structure from its per-atom dH (pure, differentiable).

    .. math::

        v_i = c \tanh(\delta H_i / c) \text{ (or } \delta H_i \text{ without saturation)},\quad
        f_s = \frac{1}{n_s}\sum_{i \in s} v_i \text{ (mean) or }
        \frac{1}{\beta}\log\frac{1}{n_s}\sum_{i \in s} e^{\beta v_i} \text{ (softmax)},\quad
        E_s = -\lambda f_s - \mu H_s.

    The segmented sums are sorted segment sums (reproducible on CUDA); the softmax subtracts
    each structure's (detached) maximum before the exponential. Options are validated by
    :func:`check_bias_options`.

    Args:
        dh: ``[n_atoms]`` per-atom dH (nats).
        system_idx: ``[n_atoms]`` structure index of each atom (default: one structure).
        n_systems: number of structures (each holding at least one atom).
        strength: ``lambda`` (eV/nat).
        reduction: ``"mean"`` or ``"softmax"``.
        beta: sharpness of the softmax (1/nat).
        saturation: ``c`` (nats) or ``None``.
        entropy: ``[n_systems]`` entropy ``H_s`` of each structure's own environments, or
            ``None`` (no entropy term).
        entropy_strength: ``mu`` (eV/nat).

    Returns:
        ``(energy, f)``, both ``[n_systems]`` in the dtype of ``dh`` (eV and nats).
    """
    if system_idx is None:
        system_idx = torch.zeros(dh.shape[0], dtype=torch.int64, device=dh.device)
    idx = system_idx.to(device=dh.device, dtype=torch.int64)
    counts = torch.bincount(idx, minlength=n_systems).to(dh.dtype)
    v = dh if saturation is None else saturation * torch.tanh(dh / saturation)
    if reduction == "mean":
        f = segment_sum(v, idx, n_systems) / counts
    elif reduction == "softmax":
        bv = beta * v
        top = bv.detach().new_full((n_systems,), -math.inf)
        top = top.scatter_reduce(0, idx, bv.detach(), reduce="amax", include_self=False)
        sums = segment_sum(torch.exp(bv - top.index_select(0, idx)), idx, n_systems)
        f = (top + torch.log(sums) - torch.log(counts)) / beta
    else:
        raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}")
    energy = -strength * f
    if entropy is not None and entropy_strength != 0.0:
        energy = energy - entropy_strength * entropy
    return energy, f


def check_bias_keywords(options: dict, caller: str) -> dict:
    """``options`` when every key is a keyword of :meth:`EntropyBiasTerms.set_bias_options`;
    else the ``TypeError`` Python raises for a call of ``caller`` with the unknown one.

    Args:
        options: the bias keywords given to a front end.
        caller: the front end's name, as the message shows it.

    Returns:
        ``options``.
    """
    bind_arguments(EntropyBiasTerms.set_bias_options, caller, (None,), options)
    return options


class EntropyBiasTerms:
    """The options and the energy of the entropy bias ``E_s = -lambda f_s(dH) - mu H_s``.

    Shared by :class:`EntropyBiasCalculator` and the torch-sim ``EntropyBiasModel`` (a base
    class of both): :meth:`set_bias_options` validates the options once
    (:func:`check_bias_options`) and stores them as the attributes ``strength``,
    ``reduction``, ``beta``, ``entropy_strength``, ``saturation`` and ``entropy_h`` (default
    the bank's ``h``); :meth:`bias_of_descriptors` evaluates the bias of descriptors against
    ``self.bank`` (:func:`entropy_bias_energy`).
    """

    bank: UncertaintyBank

    def set_bias_options(
        self,
        strength: float = 0.01,
        *,
        reduction: str = "mean",
        beta: float = 1.0,
        entropy_strength: float = 0.0,
        entropy_h: float | None = None,
        saturation: float | None = None,
    ) -> None:
        """Validate and store the bias options (``self.bank`` must be set); the one list of
        them (and of their defaults) that both front ends take as keywords.

        Args:
            strength: ``lambda`` (eV/nat); positive values push towards novel environments.
            reduction: ``"mean"`` or ``"softmax"``, how ``f`` reduces the per-atom values of
                a structure.
            beta: sharpness of ``"softmax"`` (1/nat).
            entropy_strength: ``mu`` (eV/nat; 0: no entropy term).
            entropy_h: bandwidth of ``H`` (1/Å, default ``bank.h``).
            saturation: ``c`` (nats) of the ``c tanh(dH / c)`` cap, or ``None`` (no cap).
        """
        (
            self.strength,
            self.reduction,
            self.beta,
            self.entropy_strength,
            self.saturation,
        ) = check_bias_options(strength, reduction, beta, entropy_strength, saturation)
        self.entropy_h = self.bank.h if entropy_h is None else check_h(entropy_h, "entropy_h")

    def bias_of_descriptors(
        self, y: torch.Tensor, system_idx: torch.Tensor | None = None, n_systems: int = 1
    ) -> BiasTerms:
        """Bias of the environments ``y`` [n_atoms, d] of ``n_systems`` structures.

        Returns:
            :class:`BiasTerms` with ``[n_systems]`` ``energy`` and ``f``, ``[n_atoms]`` ``dH``
            and ``[n_systems]`` ``entropy`` (``None`` when ``mu = 0``); differentiable.
            Without ``system_idx`` (one structure) the entropy is that of
            :func:`~quests_torch.metrics.entropy`, else of
            :func:`~quests_torch.metrics.entropy_per_structure`.
        """
        dh = self.bank.delta_entropy(y)
        h_struct = None
        if self.entropy_strength != 0.0:
            if system_idx is None:
                h_struct = _entropy(y, self.entropy_h, dtype=self.bank.dtype)[None]
            else:
                h_struct = entropy_per_structure(
                    y, system_idx, self.entropy_h, n_systems, dtype=self.bank.dtype
                )
        energy, f = entropy_bias_energy(
            dh,
            system_idx,
            n_systems,
            strength=self.strength,
            reduction=self.reduction,
            beta=self.beta,
            saturation=self.saturation,
            entropy=h_struct,
            entropy_strength=self.entropy_strength,
        )
        return BiasTerms(energy, f, dh, h_struct)


class EntropyBiasCalculator(EntropyBiasTerms, Calculator):
    r"""Bias potential rewarding novel environments: ``E = -lambda f(dH) - mu H``.

    ``f`` reduces the per-atom dH of the structure against ``bank``: ``"mean"``, or the smooth
    maximum ``(1/beta) log((1/n) sum_i exp(beta dH_i))`` (``"softmax"``); with ``saturation``
    each dH is first replaced by ``c tanh(dH / c)`` (the bias is otherwise unbounded). ``H`` is
    the entropy of the structure's own environments (bandwidth ``entropy_h``, default the
    bank's ``h``), included when ``entropy_strength`` is non-zero. Energies in eV; ``strength`` and
    ``entropy_strength`` in eV/nat. Forces and, for fully periodic cells, the stress
    (``(1/V) dE/d eps``, ASE sign and Voigt order) come from autograd in the bank's dtype.

    Results also hold ``"dH"`` (per-atom), ``"max_dH"``, ``"bias_f"`` (``f``) and
    ``"bias_entropy"`` (``H``, when computed).

    Args:
        bank: reference environments and bandwidth.
        **bias_options: ``strength`` (``lambda``, eV/nat, default 0.01), ``reduction``
            (``"mean"`` or ``"softmax"``), ``beta``, ``entropy_strength`` (``mu``),
            ``entropy_h`` and ``saturation``: the keywords of
            :meth:`EntropyBiasTerms.set_bias_options` (the same defaults and checks; an
            unknown keyword is a ``TypeError`` naming it).
    """

    implemented_properties: ClassVar[list[str]] = [
        "energy",
        "free_energy",
        "forces",
        "stress",
        "dH",
        "max_dH",
    ]

    def __init__(self, bank: UncertaintyBank, **bias_options) -> None:
        super().__init__()
        self.bank = check_bank(bank)
        self.set_bias_options(**check_bias_keywords(bias_options, "EntropyBiasCalculator"))

    def bias_terms(
        self, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, numbers=None
    ) -> BiasTerms:
        """Bias energy and its parts for one structure, differentiable (tensors).

        Args:
            positions: ``[n_atoms, 3]`` (Å), on the bank's device.
            cell: ``[3, 3]`` lattice vectors as rows.
            pbc: ``[3]`` bool.
            numbers: ``[n_atoms]`` atomic numbers (multicomponent banks).
        """
        y = self.bank.descriptors_of(positions, cell, pbc, None, numbers)
        energy, f, dh, h_struct = self.bias_of_descriptors(y)
        return BiasTerms(energy[0], f[0], dh, None if h_struct is None else h_struct[0])

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """Bias energy (eV) and dH; forces (eV/Å) and stress (eV/Å^3) by autograd if asked."""
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        b = _batch(self.bank, atoms)
        if "stress" in properties and not atoms.pbc.all():
            raise PropertyNotImplementedError("stress needs a fully periodic cell")
        numbers_ = b.numbers if self.bank.species else None
        if not {"forces", "stress"} & set(properties):  # energy only: no autograd graph
            with torch.no_grad():
                terms = self.bias_terms(b.positions, b.cell[0], b.pbc[0], numbers_)
            self._store(terms)
            return
        want_stress = bool(atoms.pbc.all())
        pos0 = b.positions.clone().requires_grad_(True)
        eps = torch.zeros(3, 3, dtype=b.dtype, device=b.positions.device)
        inputs = [pos0]
        if want_stress:
            eps.requires_grad_(True)
            inputs.append(eps)
        deform = torch.eye(3, dtype=b.dtype, device=b.positions.device) + eps
        positions = strain_rows(pos0, deform)
        cell = strain_rows(b.cell[0], deform)
        terms = self.bias_terms(positions, cell, b.pbc[0], numbers_)
        grads = torch.autograd.grad(terms.energy, inputs)
        self._store(terms)
        self.results["forces"] = -grads[0].detach().cpu().numpy().astype(np.float64)
        if want_stress:
            from ase.stress import full_3x3_to_voigt_6_stress

            g = grads[1].detach().cpu().numpy().astype(np.float64)
            stress = 0.5 * (g + g.T) / atoms.get_volume()
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)

    def _store(self, terms: BiasTerms) -> None:
        e = float(terms.energy.detach())
        dh_np = terms.dH.detach().cpu().numpy().astype(np.float64)
        self.results["energy"] = e
        self.results["free_energy"] = e
        self.results["dH"] = dh_np
        self.results["max_dH"] = float(dh_np.max())
        self.results["bias_f"] = float(terms.f.detach())
        if terms.entropy is not None:
            self.results["bias_entropy"] = float(terms.entropy.detach())
