"""Gradients of the information metrics with respect to atomic positions (through descriptors)."""

from __future__ import annotations

import torch
from ase.build import bulk, molecule
from conftest import central_difference

from quests_torch import AtomsBatch, descriptors_from_tensors
from quests_torch.metrics import delta_entropy, diversity, entropy


def _batch(atoms):
    return AtomsBatch.from_ase(atoms)


def _cu(seed: int, stdev: float = 0.1):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(stdev, seed=seed)
    return atoms


def test_gradcheck_entropy_and_diversity_wrt_positions():
    b = _batch(_cu(1))
    pos = b.positions.clone().requires_grad_(True)

    def f(p):
        x = descriptors_from_tensors(p, b.cell, b.pbc, b.system_idx, k=6, cutoff=3.5)
        return torch.stack([entropy(x, h=0.1), diversity(x, h=0.1)])

    assert torch.autograd.gradcheck(f, (pos,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_delta_entropy_wrt_query_and_reference_positions():
    ref = _batch([_cu(2), _cu(3)])
    mol = molecule("CH3CH2OH")
    mol.rattle(0.05, seed=5)  # no symmetric (tied) neighbours: the descriptor is smooth here
    query = _batch(mol)
    qpos = query.positions.clone().requires_grad_(True)
    rpos = ref.positions.clone().requires_grad_(True)

    def f(qp, rp):
        y = descriptors_from_tensors(qp, query.cell, query.pbc, query.system_idx, k=6, cutoff=3.5)
        x = descriptors_from_tensors(rp, ref.cell, ref.pbc, ref.system_idx, k=6, cutoff=3.5)
        return delta_entropy(y, x, h=0.5)

    assert torch.autograd.gradcheck(f, (qpos, rpos), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_entropy_gradient_matches_finite_differences_on_thermal_cell():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (3, 3, 3)
    atoms.rattle(0.05, seed=4)
    b = _batch(atoms)

    def f(p):
        return entropy(descriptors_from_tensors(p, b.cell, b.pbc, b.system_idx), h=0.015)

    pos = b.positions.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(pos), pos)
    # the sorted descriptor has kinks every ~4e-5 Å on thermal Cu: differences must be
    # taken well inside one smooth piece
    step = 1e-7
    assert torch.isfinite(g).all()
    for atom, axis in [(0, 0), (40, 1), (99, 2), (7, 2), (63, 0), (101, 1)]:
        fd = float(central_difference(f, b.positions, (atom, axis), step))
        assert abs(fd - float(g[atom, axis])) <= 1e-6 * max(1.0, abs(fd))
