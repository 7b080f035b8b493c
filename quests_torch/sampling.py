r"""Structure generation towards a target dH: gradient steps, and a random-walk baseline.

Both methods move the atoms of one structure until a statistic of its per-atom dH against an
:class:`~quests_torch.uncertainty.UncertaintyBank` reaches a target,
``|s(r) - target| <= tolerance``, with ``s = max_i dH_i`` or ``mean_i dH_i`` (nats). Both keep
every atom's displacement per step at most ``max_step`` and every interatomic distance
(periodic images included) at least ``min_distance``, and both count *descriptor
evaluations*: one per structure whose descriptors and dH are computed (the gradient method
also runs one backward pass per evaluation; see :attr:`GenerationResult.wall_time`).

:func:`generate_to_target` — trust-region gradient steps. With ``g = ds/dr`` (autograd
through descriptors and the tiled kernel sums) and ``sigma = sign(target - s)``, the step is
``delta = sigma * g * rho / max_i |g_i|`` (the atom with the largest gradient moves ``rho``),
shortened so that the linear model ``s + g . delta`` lands on the target, and the steps of atoms
involved in pairs closer than ``min_distance`` are halved (six times, then set to zero) until
the constraint holds (distance checks cost no descriptor evaluation). A step that brings
``s`` closer to the target is accepted and ``rho`` grows back towards ``max_step``; otherwise
it is rejected and ``rho`` is halved.

:func:`random_walk_to_target` — the baseline, in the spirit of upstream ``quests``'
``augment_pbc``: Gaussian displacements of every atom (``step_std``, capped at ``max_step``
per atom), Metropolis acceptance on the score ``|s - target|`` at temperature ``kT``
(nats); proposals that violate ``min_distance`` are rejected without evaluation.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .neighbors import find_neighbor_pairs
from .structures import AtomsBatch
from .uncertainty import UncertaintyBank

__all__ = [
    "GenerationResult",
    "generate_to_target",
    "min_interatomic_distance",
    "random_walk_to_target",
]

_STATISTICS = ("max", "mean")
_HALVINGS = 6  # per-atom step halvings before an atom in a too-close pair is held still


@dataclass
class GenerationResult:
    """Outcome of :func:`generate_to_target` or :func:`random_walk_to_target`.

    Attributes:
        atoms: the final structure (an ``ase.Atoms`` copy without calculator).
        positions: ``[n_atoms, 3]`` final positions (tensor on the bank's device).
        value: final statistic ``s`` (nats).
        target: the target ``s``.
        reached: whether ``|value - target| <= tolerance``.
        n_evaluations: descriptor + dH evaluations (the initial one included).
        n_backward: backward passes (gradient method; 0 for the random walk).
        n_accepted: accepted steps.
        n_rejected_geometry: step shortenings (gradient) or proposals rejected (random walk)
            because of ``min_distance``; no descriptor evaluation was spent on them.
        history: ``s`` of every evaluated structure, in order.
        max_displacements: largest per-atom displacement of every accepted step (Å).
        min_distances: smallest interatomic distance after every accepted step (Å; the first
            entry is the initial structure's; ``inf`` when no pair is within
            ``max(min_distance + 1, 3)`` Å).
        wall_time: seconds spent in the call.
        method: ``"gradient"`` or ``"random_walk"``.
    """

    atoms: object
    positions: torch.Tensor
    value: float
    target: float
    reached: bool
    n_evaluations: int
    n_backward: int
    n_accepted: int
    n_rejected_geometry: int
    history: list[float] = field(default_factory=list)
    max_displacements: list[float] = field(default_factory=list)
    min_distances: list[float] = field(default_factory=list)
    wall_time: float = 0.0
    method: str = ""


def _close_pairs(positions, cell, pbc, probe: float):
    system_idx = torch.zeros(positions.shape[0], dtype=torch.int64, device=positions.device)
    pairs = find_neighbor_pairs(
        positions.detach(), cell.detach()[None], pbc[None], system_idx, float(probe)
    )
    return pairs, pairs.vector.norm(dim=1)


def min_interatomic_distance(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    probe: float = 3.0,
) -> float:
    """Smallest distance between two atoms of one structure, periodic images included.

    Args:
        positions: ``[n_atoms, 3]`` (Å).
        cell: ``[3, 3]`` lattice vectors as rows.
        pbc: ``[3]`` bool.
        probe: search radius (Å); ``inf`` is returned when no pair is closer.
    """
    pairs, dist = _close_pairs(positions, cell, pbc, probe)
    return float(dist.min()) if pairs.n_pairs else math.inf


class _Objective:
    """``s(r)`` of one structure against a bank, counting evaluations."""

    def __init__(self, bank: UncertaintyBank, atoms, statistic: str):
        if not isinstance(bank, UncertaintyBank):
            raise TypeError(f"`bank` must be an UncertaintyBank, got {type(bank).__name__}")
        if statistic not in _STATISTICS:
            raise ValueError(f"`statistic` must be one of {_STATISTICS}, got {statistic!r}")
        from ase import Atoms

        if not isinstance(atoms, Atoms):
            raise TypeError(f"`atoms` must be an ase.Atoms, got {type(atoms).__name__}")
        self.bank = bank
        self.statistic = statistic
        b = AtomsBatch.from_ase(atoms, device=bank.device, dtype=bank.dtype)
        self.positions0 = b.positions
        self.cell = b.cell[0]
        self.pbc = b.pbc[0]
        self.numbers = b.numbers if bank.species else None
        self.n_evaluations = 0
        self.n_backward = 0
        self.history: list[float] = []

    def _stat(self, positions: torch.Tensor) -> torch.Tensor:
        dh = self.bank(positions, self.cell, self.pbc, None, self.numbers)
        return dh.max() if self.statistic == "max" else dh.mean()

    def value(self, positions: torch.Tensor) -> float:
        with torch.no_grad():
            s = float(self._stat(positions))
        self.n_evaluations += 1
        self.history.append(s)
        return s

    def value_and_grad(self, positions: torch.Tensor) -> tuple[float, torch.Tensor]:
        p = positions.detach().clone().requires_grad_(True)
        s = self._stat(p)
        if s.requires_grad:
            (g,) = torch.autograd.grad(s, p)
        else:  # no atom has a neighbour (moved out of the cutoff): a stationary point
            g = torch.zeros_like(p)
        self.n_evaluations += 1
        self.n_backward += 1
        value = float(s.detach())
        self.history.append(value)
        return value, g

    def min_distance(self, positions: torch.Tensor, min_distance: float) -> float:
        """Smallest distance (``inf`` beyond ``max(min_distance + 1, 3)`` Å)."""
        probe = max(min_distance + 1.0, 3.0)
        return min_interatomic_distance(positions, self.cell, self.pbc, probe)

    def too_close(self, positions: torch.Tensor, min_distance: float) -> torch.Tensor:
        """``[n_atoms]`` bool: atoms with a partner closer than ``min_distance``."""
        pairs, _ = _close_pairs(positions, self.cell, self.pbc, min_distance)
        bad = torch.zeros(positions.shape[0], dtype=torch.bool, device=positions.device)
        bad[pairs.center] = True
        bad[pairs.neighbor] = True
        return bad


def _check_positive(name: str, v, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"`{name}` must be a finite number, got {v!r}")
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")
    return float(v)


def _check_count(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"`{name}` must be a positive int, got {v!r}")
    return v


def _check_seed(seed) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise ValueError(f"`seed` must be None or an int from 0 to 2**63 - 1, got {seed!r}")
    return int(seed)


def _start(obj: _Objective, min_distance: float) -> float:
    """Check the start structure; returns its smallest interatomic distance."""
    cutoff = obj.bank.cutoff
    pairs, _ = _close_pairs(obj.positions0, obj.cell, obj.pbc, cutoff)
    if not pairs.n_pairs:
        # every descriptor is the no-neighbour one whatever small moves are made: no gradient
        # to follow, and a random walk would only spend its budget on the same dH
        n = obj.positions0.shape[0]
        raise ValueError(
            f"no atom of the start structure ({n} atom{'s' * (n != 1)}) has a neighbour within "
            f"the cutoff ({cutoff:g} Å), periodic images included: its dH does not depend on "
            "the positions, so it cannot be moved towards a target; start from a structure "
            "whose atoms are within the cutoff of each other"
        )
    d0 = obj.min_distance(obj.positions0, min_distance)
    if d0 < min_distance:
        raise ValueError(
            f"the initial structure violates `min_distance`: two atoms are {d0:.3f} Å apart "
            f"(< {min_distance} Å)"
        )
    return d0


def _result(atoms, obj: _Objective, x, value, target, tol, accepted, geo, disp, dmins, t0, method):
    out = atoms.copy()
    out.calc = None
    out.positions = x.detach().cpu().double().numpy()
    return GenerationResult(
        atoms=out,
        positions=x.detach(),
        value=value,
        target=target,
        reached=abs(value - target) <= tol,
        n_evaluations=obj.n_evaluations,
        n_backward=obj.n_backward,
        n_accepted=accepted,
        n_rejected_geometry=geo,
        history=list(obj.history),
        max_displacements=disp,
        min_distances=dmins,
        wall_time=time.perf_counter() - t0,
        method=method,
    )


def generate_to_target(
    atoms,
    bank: UncertaintyBank,
    target: float,
    *,
    statistic: str = "max",
    tolerance: float = 0.25,
    max_step: float = 0.05,
    min_distance: float = 1.5,
    max_evaluations: int = 100,
    max_shrink: int = 30,
) -> GenerationResult:
    """Move atoms by trust-region gradient steps until ``s`` (max or mean dH) hits ``target``.

    Args:
        atoms: the starting ``ase.Atoms`` (not modified).
        bank: reference environments; ``s`` is computed against them.
        target: target value of ``s`` (nats).
        statistic: ``"max"`` or ``"mean"`` of the per-atom dH.
        tolerance: success when ``|s - target| <= tolerance`` (nats).
        max_step: largest displacement of any atom in one step (Å).
        min_distance: smallest allowed interatomic distance (Å).
        max_evaluations: budget of descriptor evaluations (each with a backward pass).
        max_shrink: shortenings of one step allowed to satisfy ``min_distance``.

    Returns:
        :class:`GenerationResult` (``method="gradient"``).

    Raises:
        ValueError: invalid arguments, a starting structure that violates ``min_distance``,
            or one without any pair of atoms within the bank's cutoff (its dH does not depend
            on the positions).
    """
    t0 = time.perf_counter()
    obj = _Objective(bank, atoms, statistic)
    target = float(target)
    tol = _check_positive("tolerance", tolerance, allow_zero=True)
    max_step = _check_positive("max_step", max_step)
    min_distance = _check_positive("min_distance", min_distance, allow_zero=True)
    _check_count("max_evaluations", max_evaluations)
    dmins = [_start(obj, min_distance)]
    x = obj.positions0.clone()
    value, grad = obj.value_and_grad(x)
    radius = max_step
    accepted = geo = 0
    disp: list[float] = []
    while abs(value - target) > tol and obj.n_evaluations < max_evaluations:
        gap = target - value
        g = grad if gap > 0 else -grad
        gmax = float(g.norm(dim=1).max())
        if gmax == 0.0 or radius < 1e-9:
            break  # stationary point or trust region collapsed
        step = g * (radius / gmax)
        predicted = float((grad * step).sum().abs())
        if predicted > abs(gap):
            step = step * (abs(gap) / predicted)
        for shrink in range(max_shrink):
            cand = x + step
            dmin = obj.min_distance(cand, min_distance)
            if dmin >= min_distance:
                break
            # halve the steps of the atoms in too-close pairs only; after a few halvings hold
            # them still (a pair sitting on the constraint cannot move closer at all)
            geo += 1
            bad = obj.too_close(cand, min_distance)
            factor = 0.5 if shrink < _HALVINGS else 0.0
            step = torch.where(bad[:, None], factor * step, step)
        else:
            break  # no admissible step along the gradient
        new_value, new_grad = obj.value_and_grad(cand)
        if abs(target - new_value) < abs(gap):
            disp.append(float(step.norm(dim=1).max()))
            dmins.append(dmin)
            x, value, grad = cand, new_value, new_grad
            accepted += 1
            radius = min(max_step, 2.0 * radius)
        else:
            radius *= 0.5
    return _result(atoms, obj, x, value, target, tol, accepted, geo, disp, dmins, t0, "gradient")


def random_walk_to_target(
    atoms,
    bank: UncertaintyBank,
    target: float,
    *,
    statistic: str = "max",
    tolerance: float = 0.25,
    step_std: float = 0.02,
    max_step: float = 0.05,
    min_distance: float = 1.5,
    kT: float = 0.1,
    max_evaluations: int = 2000,
    seed: int | None = 0,
) -> GenerationResult:
    """Random-walk Metropolis on ``|s - target|`` until ``s`` (max or mean dH) hits ``target``.

    Every proposal displaces all atoms by ``N(0, step_std^2)`` per coordinate (each atom's
    displacement capped at ``max_step``); proposals closer than ``min_distance`` are rejected
    without evaluation; otherwise accepted with probability ``min(1, exp(-(score' - score) /
    kT))``. Stops at the first evaluated structure within ``tolerance`` of the target (which
    is returned) or when the evaluation budget is spent (the best structure is returned).

    Args:
        atoms: the starting ``ase.Atoms`` (not modified).
        bank: reference environments.
        target: target value of ``s`` (nats).
        statistic: ``"max"`` or ``"mean"``.
        tolerance: success when ``|s - target| <= tolerance`` (nats).
        step_std: standard deviation of the displacements (Å).
        max_step: cap of any atom's displacement per proposal (Å).
        min_distance: smallest allowed interatomic distance (Å).
        kT: Metropolis temperature on the score (nats).
        max_evaluations: budget of descriptor evaluations.
        seed: seed of the proposals (a CPU ``torch.Generator``), ``0 <= seed < 2**63``;
            ``None`` for a random one.

    Returns:
        :class:`GenerationResult` (``method="random_walk"``, ``n_backward = 0``).

    Raises:
        ValueError: invalid arguments, a starting structure that violates ``min_distance``,
            or one without any pair of atoms within the bank's cutoff.
    """
    t0 = time.perf_counter()
    obj = _Objective(bank, atoms, statistic)
    target = float(target)
    tol = _check_positive("tolerance", tolerance, allow_zero=True)
    step_std = _check_positive("step_std", step_std)
    max_step = _check_positive("max_step", max_step)
    min_distance = _check_positive("min_distance", min_distance, allow_zero=True)
    kT = _check_positive("kT", kT)
    _check_count("max_evaluations", max_evaluations)
    seed = _check_seed(seed)
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    rng = np.random.default_rng(None if seed is None else seed + 1)
    dmins = [_start(obj, min_distance)]
    x = obj.positions0.clone()
    value = obj.value(x)
    score = abs(value - target)
    best = (score, x, value)
    accepted = geo = 0
    disp: list[float] = []
    attempts = 0
    while score > tol and obj.n_evaluations < max_evaluations:
        attempts += 1
        if attempts > 50 * max_evaluations:
            break  # every proposal violates min_distance
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device) * step_std
        norms = noise.norm(dim=1, keepdim=True)
        noise = noise * torch.clamp(max_step / norms.clamp_min(1e-300), max=1.0)
        cand = x + noise
        dmin = obj.min_distance(cand, min_distance)
        if dmin < min_distance:
            geo += 1
            continue
        new_value = obj.value(cand)
        new_score = abs(new_value - target)
        if new_score <= score or rng.random() < math.exp(-(new_score - score) / kT):
            disp.append(float(noise.norm(dim=1).max()))
            dmins.append(dmin)
            x, value, score = cand, new_value, new_score
            accepted += 1
            if score < best[0]:
                best = (score, x, value)
    if score > tol:
        _, x, value = best
    return _result(atoms, obj, x, value, target, tol, accepted, geo, disp, dmins, t0, "random_walk")
