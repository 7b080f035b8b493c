"""The fused cell-grid selection (large structures) against upstream and the pair-list path.

Structures with more than ``neighbors.GRID_MIN_CANDIDATES`` candidate pairs take the grid
path; here the threshold is lowered so that the small reference structures take it too, and
every result is compared with upstream's values and with the pair-list path on the same input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from conftest import descriptor_structures, load_reference, rattled_fcc, rotated_and_shifted

import quests_torch.descriptors as D
import quests_torch.neighbors.knearest as K
import quests_torch.neighbors.plan as NP
from quests_torch import AtomsBatch, get_descriptors
from quests_torch.neighbors import complete_cell
from quests_torch.neighbors.grid import plan_grid, select_block

REF = load_reference("descriptor")
STRUCTURES = descriptor_structures()


@pytest.fixture
def grid_path(monkeypatch):
    """Every structure takes the grid path where it applies (as ``search="grid"`` does)."""
    monkeypatch.setattr(NP, "GRID_MIN_CANDIDATES", -1)


def pair_path(structures, **kw):
    """Descriptors through the pair list only."""
    return get_descriptors(structures, search="pairs", **kw)


def uses_grid(atoms, cutoff=5.0) -> bool:
    b = AtomsBatch.from_ase(atoms)
    full = complete_cell(b.cell, b.pbc)[0]
    return plan_grid(b.positions, full, b.pbc[0], cutoff) is not None


@pytest.mark.parametrize("name", [str(n) for n in REF["names"]])
def test_parity_with_upstream_on_the_grid(name, grid_path, device):
    """The grid path reproduces upstream quests 2026.2.22 on every reference structure that it
    applies to (the others fall back to the pair list and must still match)."""
    atoms = STRUCTURES[name]
    x = get_descriptors(atoms, k=int(REF["k"]), cutoff=float(REF["cutoff"]), device=device)
    assert np.abs(x.cpu().numpy() - REF[name]).max() <= 1e-10


def test_reference_set_exercises_the_grid():
    """The parity test above is not vacuous: most reference structures can be gridded."""
    gridded = [
        n for n in REF["names"] if len(STRUCTURES[str(n)]) > 1 and uses_grid(STRUCTURES[str(n)])
    ]
    assert len(gridded) >= len(REF["names"]) // 2


def test_batched_dataset_mixed_paths(monkeypatch):
    """A batch where some structures take the grid and others the dense/vesin pair list keeps
    every row in place and matches upstream."""
    names = [str(n) for n in REF["names"]]
    structures = [STRUCTURES[n] for n in names]
    sizes = sorted(len(a) for a in structures)
    monkeypatch.setattr(NP, "GRID_MIN_CANDIDATES", sizes[len(sizes) // 2] ** 2)
    b = AtomsBatch.from_ase(structures)
    grids, pending = NP.route(b.positions, b.cell, b.pbc, b.system_idx, 5.0, NP.GRID_MIN_CANDIDATES)
    gridded = [s for g in grids for s in g.structures]
    assert 0 < len(gridded) < len(structures) - 1
    assert sorted(gridded + pending.tolist()) == list(range(len(structures)))
    x = get_descriptors(structures).numpy()
    assert np.abs(x - np.concatenate([REF[n] for n in names])).max() <= 1e-10


def test_multicomponent_on_the_grid(grid_path):
    atoms = STRUCTURES["alloy"]
    x = get_descriptors(atoms, multicomponent=True)
    y = pair_path(atoms, multicomponent=True)
    assert x.shape == y.shape == (len(atoms), 3 * 63)
    assert (x - y).abs().max() <= 1e-12
    assert np.abs(x[:, :63].numpy() - REF["alloy"]).max() <= 1e-10


@pytest.mark.parametrize(
    "atoms",
    [
        pytest.param(rattled_fcc((4, 4, 4), seed=1), id="two-bins-per-direction"),
        pytest.param(rattled_fcc((6, 5, 7), seed=2), id="several-bins"),
        pytest.param(
            (bulk("Cu", "fcc", a=3.6) * (9, 8, 10)).copy(), id="primitive-triclinic-perfect"
        ),
        pytest.param(fcc111("Cu", size=(8, 8, 6), vacuum=8.0, periodic=False), id="slab-TTF"),
        pytest.param(
            Atoms("Cu", positions=[[0, 0, 0]], cell=[3.0, 60.0, 60.0], pbc=[True, False, False])
            * (40, 1, 1),
            id="wire-TFF",
        ),
    ],
)
def test_grid_equals_pair_list(atoms, grid_path):
    """Grid and pair list agree on periodic, triclinic, slab and wire geometries."""
    atoms = atoms.copy()
    if atoms.pbc.all() and "perfect" not in str(atoms.info):
        atoms.rattle(0.02, seed=3)
    assert uses_grid(atoms)
    x, y = get_descriptors(atoms), pair_path(atoms)
    assert (x - y).abs().max() <= 1e-12


def test_sparse_cluster_and_few_neighbours(grid_path):
    """Dimers 12 Å apart in a large non-periodic box (bins merged to ~2 per atom, one
    neighbour each), a random gas (uneven: it may fall back) and a molecule gas."""
    rng = np.random.default_rng(4)
    sites = np.stack(np.meshgrid(*[np.arange(6) * 12.0] * 3), -1).reshape(-1, 3)
    dimers = Atoms(
        "Ar" * (2 * len(sites)),
        positions=np.concatenate([sites, sites + rng.normal(0, 1.0, sites.shape)]),
    )
    assert uses_grid(dimers)
    x = get_descriptors(dimers)
    assert (x - pair_path(dimers)).abs().max() <= 1e-12
    assert (x[:, 0] > 0).all() and (x[:, 1:32] == 0).all()  # exactly one neighbour each
    gas = Atoms("Ar300", positions=rng.uniform(0, 60.0, (300, 3)))
    x = get_descriptors(gas)
    assert (x - pair_path(gas)).abs().max() <= 1e-12
    assert (x == 0).all(dim=1).any()  # isolated atoms: zero descriptors
    mols = molecule("C6H6")
    box = mols.copy()
    for shift in rng.uniform(0, 30.0, (20, 3)):
        m = mols.copy()
        m.positions += shift
        box += m
    box.rattle(0.01, seed=5)
    assert (get_descriptors(box) - pair_path(box)).abs().max() <= 1e-12


@pytest.mark.parametrize("k", [1, 5, 100])
def test_k_smaller_and_larger_than_the_neighbours(k, grid_path):
    atoms = rattled_fcc((4, 4, 4), a=4.2, seed=6)  # a dilute crystal: ~28 within 5 Å
    x, y = get_descriptors(atoms, k=k), pair_path(atoms, k=k)
    assert x.shape == (len(atoms), 2 * k - 1)
    assert (x - y).abs().max() <= 1e-12


def test_k_larger_than_the_candidate_slots(grid_path):
    """k above 27 x (fullest bin): every candidate slot is kept, no tie check needed."""
    atoms = rattled_fcc((2, 2, 2), a=5.5, seed=18)  # 11 Å cell: 2 bins a side, 4 atoms each
    b = AtomsBatch.from_ase(atoms)
    grid = plan_grid(b.positions, complete_cell(b.cell, b.pbc)[0], b.pbc[0], 5.0)
    k = 27 * grid.occupancy + 10
    x, y = get_descriptors(atoms, k=k), pair_path(atoms, k=k)
    assert x.shape == (len(atoms), 2 * k - 1)
    assert (x - y).abs().max() <= 1e-12


def test_perfect_crystal_ties_on_the_grid(grid_path):
    """The k-th neighbour is cut inside a shell: the tie-break gives every atom the same
    descriptor, the same as the pair list's and the primitive cell's."""
    big = bulk("Cu", "fcc", a=3.58, cubic=True) * (5, 5, 5)
    assert uses_grid(big)
    x = get_descriptors(big)
    assert (x - x[0]).abs().max() <= 1e-12
    assert (x - pair_path(big)).abs().max() <= 1e-12
    assert (x[0] - pair_path(bulk("Cu", "fcc", a=3.58))[0]).abs().max() <= 1e-12


def test_invariances_on_the_grid(grid_path):
    """Rotation + translation, permutation, re-wrapping and supercells."""
    atoms = STRUCTURES["cu_rattled_triclinic"] * (2, 2, 2)
    x = get_descriptors(atoms)
    assert (get_descriptors(rotated_and_shifted(atoms, 7)) - x).abs().max() <= 1e-10
    perm = np.random.default_rng(8).permutation(len(atoms))
    moved = atoms[perm]
    moved.positions += np.random.default_rng(9).integers(-2, 3, (len(atoms), 3)) @ atoms.cell[:]
    assert (get_descriptors(moved) - x[perm]).abs().max() <= 1e-10
    small = get_descriptors(STRUCTURES["cu_rattled_triclinic"])
    assert (x - small.repeat(8, 1)).abs().max() <= 1e-10


def test_block_size_and_threads_do_not_change_results(monkeypatch, grid_path):
    atoms = rattled_fcc((5, 5, 5), seed=10)
    x = get_descriptors(atoms)
    monkeypatch.setattr(D, "_CPU_CHUNK", 7)  # one-bin selection blocks, tiny descriptor blocks
    monkeypatch.setattr(K, "PAIR_CPU_ROWS", 7)
    y = get_descriptors(atoms)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        z = get_descriptors(atoms)
    finally:
        torch.set_num_threads(old)
    assert (x - y).abs().max() <= 1e-14 and (x - z).abs().max() <= 1e-14


def test_float32_on_the_grid(grid_path):
    atoms = rattled_fcc((4, 4, 4), seed=11)
    x32 = get_descriptors(atoms, dtype=torch.float32)
    assert x32.dtype == torch.float32
    assert (x32.double() - pair_path(atoms)).abs().max() <= 1e-5


def test_gradients_on_the_grid():
    """Gradients of a function of the descriptors w.r.t. positions and cell equal the pair
    list's (gradcheck itself runs in test_descriptors on the pair path)."""
    atoms = rattled_fcc((3, 3, 3), seed=12)
    b = AtomsBatch.from_ase(atoms)

    def grads(search):
        pos = b.positions.clone().requires_grad_(True)
        cell = b.cell.clone().requires_grad_(True)
        x = D.descriptors_from_tensors(pos, cell, b.pbc, b.system_idx, search=search)
        (x * torch.linspace(0.5, 1.5, x.shape[1], dtype=x.dtype)).pow(2).sum().backward()
        return pos.grad, cell.grad

    gp, gc = grads("grid")
    rp, rc = grads("pairs")
    assert (gp - rp).abs().max() <= 1e-10 and (gc - rc).abs().max() <= 1e-10
    assert gp.abs().max() > 0


def test_grid_gradcheck_small(grid_path):
    atoms = rattled_fcc((3, 3, 3), a=3.9, seed=13)
    b = AtomsBatch.from_ase(atoms)
    pos = b.positions.clone().requires_grad_(True)

    def f(p):
        return D.descriptors_from_tensors(p, b.cell, b.pbc, b.system_idx, k=8, cutoff=4.5)[:6]

    assert torch.autograd.gradcheck(f, (pos,), eps=1e-7, atol=1e-6)


def test_coincident_atoms_named_on_the_grid(grid_path):
    atoms = rattled_fcc((4, 4, 4), seed=14)
    atoms.positions[17] = atoms.positions[40] + 1e-8
    with pytest.raises(
        ValueError, match=r"coincident atoms in structure 0: atom (17|40) and atom (17|40)"
    ):
        get_descriptors(atoms)
    two = [rattled_fcc((2, 2, 2)), atoms]
    with pytest.raises(ValueError, match="structure 1"):
        get_descriptors(two)


def test_plan_grid_refuses_thin_cells_and_uneven_filling():
    """A periodic direction thinner than the cutoff, or one dense clump in a big periodic box,
    leaves the structure to the pair list (which handles both)."""
    thin = bulk("Cu", "fcc", a=3.6, cubic=True) * (1, 8, 8)  # 3.6 Å along x
    assert not uses_grid(thin)
    clump = rattled_fcc((3, 3, 3), seed=15)
    clump.set_cell([200.0, 200.0, 200.0], scale_atoms=False)
    clump += Atoms("Cu", positions=[[150.0, 150.0, 150.0]])
    assert not uses_grid(clump)  # 108 atoms in one or two bins: padding would exceed 3x
    x = get_descriptors(clump, search="grid")  # falls back to the pair list
    assert (x - pair_path(clump)).abs().max() == 0
    assert (x[:-1] != 0).any(dim=1).all() and (x[-1] == 0).all()


def test_selection_picks_the_k_nearest():
    """select_block's neighbours are the k nearest within the cutoff of each atom (ASE)."""
    from ase.neighborlist import neighbor_list

    atoms = rattled_fcc((4, 4, 4), seed=16)
    b = AtomsBatch.from_ase(atoms)
    grid = plan_grid(b.positions, complete_cell(b.cell, b.pbc)[0], b.pbc[0], 5.0)
    sel = select_block(grid, slice(0, None), 32, 5.0)
    assert sorted(sel.center.tolist()) == list(range(len(atoms)))
    vec = sel.vectors()
    nb, shift = sel.pairs(grid)
    direct = b.positions[nb] - b.positions[sel.center][:, None] + shift.double() @ b.cell[0]
    assert (vec - direct).abs().max() <= 1e-12
    i, d = neighbor_list("id", atoms, 5.0)
    for row in (0, 5, 100):
        a = int(sel.center[row])
        want = np.sort(d[i == a])[:32]
        got = np.sort(vec[row].norm(dim=1).numpy()[sel.valid[row].numpy()])
        assert np.allclose(got, want, atol=1e-12)


def test_search_parameter():
    """``search`` picks the path publicly; an unknown value is refused by name."""
    atoms = rattled_fcc((4, 4, 4), seed=17)
    grid = get_descriptors(atoms, search="grid")
    assert (grid - get_descriptors(atoms)).abs().max() == 0  # 256 atoms: auto takes the grid
    assert (grid - get_descriptors(atoms, search="pairs")).abs().max() <= 1e-12
    small = [rattled_fcc((1, 1, 1), seed=s) for s in range(3)]  # auto: dense pair search
    assert (get_descriptors(small, search="grid") - get_descriptors(small)).abs().max() <= 1e-12
    with pytest.raises(ValueError, match="`search` must be 'auto', 'grid' or 'pairs'"):
        get_descriptors(atoms, search="fast")


def test_find_k_nearest_strategies_agree():
    """The neighbour entry point gives the same k nearest (distances) through the grid and the
    pair list, and its vectors turn into the descriptors get_descriptors returns."""
    from quests_torch.descriptors import _environment_descriptors
    from quests_torch.neighbors import GridSource, PairSource, find_k_nearest

    b = AtomsBatch.from_ase([rattled_fcc((5, 5, 5), seed=3), rattled_fcc((1, 1, 1), seed=4)])
    dist = {}
    for search, kinds in (("grid", {PairSource, GridSource}), ("pairs", {PairSource})):
        near = find_k_nearest(b.positions, b.cell, b.pbc, b.system_idx, 32, 5.0, search)
        assert {type(s) for s in near.sources[0]} == kinds
        vec, valid = near.dense()
        assert vec.shape == (b.positions.shape[0], 32, 3)
        x = _environment_descriptors(vec, valid, 32, 5.0)
        assert (x - get_descriptors(b, search=search)).abs().max() == 0
        dist[search] = torch.where(valid, vec.norm(dim=-1), torch.inf).sort(dim=1).values
    finite = torch.isfinite(dist["pairs"])
    assert torch.equal(finite, torch.isfinite(dist["grid"]))
    assert (dist["grid"] - dist["pairs"])[finite].abs().max() < 1e-12
    with pytest.raises(ValueError, match="`search` must be"):
        find_k_nearest(b.positions, b.cell, b.pbc, b.system_idx, 32, 5.0, "cells")
