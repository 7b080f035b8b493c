"""torch-sim runs watched by dH: reporter properties and batched MD that flags, drops or raises.

* :func:`uncertainty_properties` gives ``TrajectoryReporter`` property functions
  (``"max_dH"``, ``"mean_dH"``, ``"fraction_above"``).
* :func:`run_with_uncertainty` runs batched MD and flags, drops or raises on the systems whose
  ``max dH`` exceeds a threshold (the batched ``QuestsUncertaintyCalculator(action=...)``).

Both are re-exported by :mod:`quests_torch.integrations.torch_sim` (import them from there).
Needs ``torch-sim-atomistic>=0.3`` (``pip install quests-torch[mlip]``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch_sim as ts
from torch_sim.models.interface import ModelInterface

from ..calculators import ExtrapolationError
from ..checks import check_threshold
from ..uncertainty import StructureUncertainty, UncertaintyBank
from .torch_sim_state import (
    SpeciesCheck,
    check_bank_for,
    check_model,
    evaluate_state,
    state_tensors,
)

__all__ = [
    "BatchExtrapolationError",
    "DroppedSystem",
    "UncertaintyRun",
    "run_with_uncertainty",
    "uncertainty_properties",
]

_ACTIONS = ("flag", "drop", "raise")


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
            called with (an :class:`~quests_torch.integrations.torch_sim.UncertaintyModel` or
            :class:`~quests_torch.integrations.torch_sim.EntropyBiasModel`).
        threshold: dH above which an atom counts in ``"fraction_above"`` (nats).
        k: neighbours per environment the bank must have been built with (checked when
            given, also against a model's bank taken at call time).
        cutoff: descriptor cutoff radius (Å) the bank must have been built with (checked
            when given, like ``k``).

    Returns:
        ``{"max_dH": fn, "mean_dH": fn, "fraction_above": fn}``.
    """
    if bank is not None:
        bank = check_bank_for(bank, None, k, cutoff)
    threshold = check_threshold(threshold, allow_inf=True)
    cache: dict[str, Any] = {}

    def summary(state: object, model: object | None) -> StructureUncertainty:
        b = _resolve_bank(bank, model)
        if bank is None:
            check_bank_for(b, None, k, cutoff)
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
            check = cache["species"] = SpeciesCheck(b)
        with torch.no_grad():
            value = evaluate_state(b, check, t, threshold)
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


def _torch_sim_version() -> tuple[int, ...]:
    """torch-sim's release as ``(major, minor, patch)`` (0.3 has no ``__version__``)."""
    text = getattr(ts, "__version__", None)
    if text is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("torch-sim-atomistic")
        except PackageNotFoundError:  # pragma: no cover - a source tree on sys.path
            text = "0"
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


# torch-sim >= 0.5.1 reads a 1-D temperature list of length n_systems as one per system (0.3:
# one per step, so there a [n_steps, n_systems] list); when n_systems == n_steps it reads the
# list as one per step, whatever its shape, and fails on a 2-D one (0.6.2)
_PER_SYSTEM_TEMPERATURES = _torch_sim_version() >= (0, 5, 1)


def _integrate_calls(t_alive: torch.Tensor, n_steps: int) -> list[tuple[int, Any]]:
    """``(n_steps, temperature)`` of the ``torch_sim.integrate`` calls that run the systems of
    ``t_alive`` (K, one each) for ``n_steps``: one call, or two where torch-sim would read
    per-system temperatures as per-step ones (as many systems as steps)."""
    if bool((t_alive == t_alive[0]).all()):
        return [(n_steps, float(t_alive[0]))]
    per_system = t_alive.tolist()
    if not _PER_SYSTEM_TEMPERATURES:
        return [(n_steps, [per_system] * n_steps)]
    if len(per_system) != n_steps:
        return [(n_steps, per_system)]
    return [(n_steps - 1, per_system), (1, per_system)]


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
    Different temperatures per system are passed in the form the installed torch-sim reads
    as one per system; on torch-sim >= 0.5.1, when as many systems run as there are steps
    between checks (which torch-sim reads as one temperature per step), the chunk is run as
    two calls (one more model call).

    Args:
        system: anything ``torch_sim.integrate`` takes (SimState, ase.Atoms or a list, ...).
        model: the torch-sim model that drives the MD (a bare model is cheapest; an
            :class:`~quests_torch.integrations.torch_sim.UncertaintyModel` works too and lends
            its bank).
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
    threshold = check_threshold(threshold, allow_inf=True)
    check_model(model)
    bank = check_bank_for(_resolve_bank(bank, model), model, None, None)
    monitor = _Monitor(ts.initialize_state(system, model.device, model.dtype), bank, threshold)
    temps = _temperatures(temperature, monitor.n_in)
    running = monitor.check(0, action)
    done = 0
    while running and done < n_steps:
        chunk = min(check_every, n_steps - done)
        for steps, temperature_arg in _integrate_calls(temps[monitor.alive], chunk):
            monitor.state = ts.integrate(
                system=monitor.state,
                model=model,
                integrator=integrator,
                n_steps=steps,
                temperature=temperature_arg,
                timestep=timestep,
                **integrator_kwargs,
            )
        done += chunk
        running = monitor.check(done, action)
    return monitor.result()


class _Monitor:
    """The running systems of :func:`run_with_uncertainty`, their checks and the outcome."""

    def __init__(self, state: Any, bank: UncertaintyBank, threshold: float) -> None:
        self.state, self.bank, self.threshold = state, bank, threshold
        self.species = SpeciesCheck(bank)
        self.n_in = state_tensors(state).n_systems
        self.alive = list(range(self.n_in))
        self.run = UncertaintyRun(state=state, systems=self.alive)
        self.rows_max: list[torch.Tensor] = []
        self.rows_mean: list[torch.Tensor] = []

    def check(self, step: int, action: str) -> bool:
        """Evaluate every running system at ``step``, record it, and flag, raise or drop the
        ones above the threshold; ``False`` when no system is left."""
        t = state_tensors(self.state)
        with torch.no_grad():
            u = evaluate_state(self.bank, self.species, t, self.threshold)
        top, mean = u.max_dH.double().cpu(), u.mean_dH.double().cpu()
        row_max = torch.full((self.n_in,), math.nan, dtype=torch.float64)
        row_mean = row_max.clone()
        row_max[self.alive], row_mean[self.alive] = top, mean
        self.run.steps.append(step)
        self.rows_max.append(row_max)
        self.rows_mean.append(row_mean)
        over = [i for i, m in enumerate(top.tolist()) if m > self.threshold]
        for i in over:
            self.run.events.append((step, self.alive[i], float(top[i])))
        if not over or action == "flag":
            return True
        if action == "raise":
            sub = self.state[over] if len(over) < len(self.alive) else self.state
            dh = torch.cat([u.dH[t.system_idx == i] for i in over]).double().cpu().numpy()
            raise BatchExtrapolationError(
                [self.alive[i] for i in over],
                [float(top[i]) for i in over],
                dh,
                self.threshold,
                step,
                sub,
            )
        self._drop(over, top, step)
        return self.state is not None

    def _drop(self, over: list[int], top: torch.Tensor, step: int) -> None:
        if len(over) == len(self.alive):
            popped, self.state = self.state.split(), None
        else:
            popped = self.state.pop(over)
        for i, sub in zip(over, popped, strict=True):
            self.run.dropped.append(DroppedSystem(self.alive[i], step, float(top[i]), sub))
        gone = set(over)
        self.alive = [a for i, a in enumerate(self.alive) if i not in gone]

    def result(self) -> UncertaintyRun:
        run = self.run
        run.state, run.systems = self.state, self.alive
        run.max_dH = torch.stack(self.rows_max)
        run.mean_dH = torch.stack(self.rows_mean)
        return run
