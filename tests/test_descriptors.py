"""QUESTS descriptors: parity with upstream `quests`, invariances, gradients, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from conftest import (
    central_difference,
    descriptor_structures,
    load_reference,
    rattled_fcc,
    rotated_and_shifted,
)

from quests_torch import AtomsBatch, descriptors_from_tensors, get_descriptors

REF = load_reference("descriptor")
STRUCTURES = descriptor_structures()


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", [str(n) for n in REF["names"]])
def test_parity_with_upstream_quests(name, device):
    """float64 descriptors equal upstream quests 2026.2.22 to 1e-10 (tests/data script)."""
    assert str(REF["quests_version"]) == "2026.2.22"
    x = get_descriptors(
        STRUCTURES[name], k=int(REF["k"]), cutoff=float(REF["cutoff"]), device=device
    )
    assert x.dtype == torch.float64 and x.shape == REF[name].shape
    assert np.abs(x.cpu().numpy() - REF[name]).max() <= 1e-10


def test_parity_batched_dataset(device):
    """All reference structures in one call (dense and vesin paths mixed) still match."""
    names = [str(n) for n in REF["names"]]
    x = get_descriptors([STRUCTURES[n] for n in names], device=device).cpu().numpy()
    assert np.abs(x - np.concatenate([REF[n] for n in names])).max() <= 1e-10


def test_multicomponent_parity():
    """Multicomponent blocks [X_all, X_Au, X_Cu] equal upstream's (columns re-ordered).

    Upstream returns [x1_all, x1_Au, x1_Cu, x2_all, x2_Au, x2_Cu] (see the generating script).
    """
    atoms = STRUCTURES["alloy"]
    x = get_descriptors(atoms, multicomponent=True).numpy()
    assert x.shape == (len(atoms), 3 * 63)
    ref = REF["mc_alloy"]
    x1, x2 = ref[:, : 3 * 32], ref[:, 3 * 32 :]
    blocks = [
        np.concatenate([x1[:, 32 * b : 32 * (b + 1)], x2[:, 31 * b : 31 * (b + 1)]], 1)
        for b in range(3)
    ]
    assert np.abs(x - np.concatenate(blocks, 1)).max() <= 1e-10
    # explicit species list in another order gives the same; the first block is the plain one
    y = get_descriptors(atoms, species=["Cu", "Au"]).numpy()
    assert np.array_equal(x, y)
    assert np.abs(x[:, :63] - REF["alloy"]).max() <= 1e-10


def test_multicomponent_single_species_is_plain():
    atoms = rattled_fcc((2, 2, 2))
    assert torch.equal(get_descriptors(atoms, multicomponent=True), get_descriptors(atoms))


def test_float32_close_to_float64():
    atoms = STRUCTURES["cu_thermal"]
    x64 = get_descriptors(atoms)
    x32 = get_descriptors(atoms, dtype=torch.float32)
    assert x32.dtype == torch.float32
    rel = ((x32.double() - x64).abs().max() / x64.abs().max()).item()
    assert rel < 1e-5


# ------------------------------------------------------------------------- neighbours


def test_primitive_fcc_has_42_neighbours_within_5A():
    from quests_torch.neighbors import find_neighbor_pairs

    b = AtomsBatch.from_ase(bulk("Cu", "fcc", a=3.58))
    pairs = find_neighbor_pairs(b.positions, b.cell, b.pbc, b.system_idx, 5.0)
    assert pairs.n_pairs == 12 + 6 + 24  # shells at a/sqrt2, a, a*sqrt(3/2) < 5 < a*sqrt2


def _pair_set(pairs):
    return sorted(
        zip(
            pairs.center.tolist(),
            pairs.neighbor.tolist(),
            map(tuple, pairs.shift.tolist()),
            strict=True,
        )
    )


def _ase_pairs(atoms, cutoff):
    from ase.neighborlist import neighbor_list

    i, j, S = neighbor_list("ijS", atoms, cutoff)
    return sorted(zip(i.tolist(), j.tolist(), map(tuple, S.tolist()), strict=True))


def _mixed_structures():
    tric = bulk("Cu", "fcc", a=3.6) * (2, 2, 2)
    tric.set_cell(
        tric.cell[:] @ np.array([[1.0, 0.1, 0.0], [0.2, 1.0, 0.05], [0.0, -0.1, 1.0]]),
        scale_atoms=True,
    )
    tric.rattle(0.05, seed=3)
    slab = fcc111("Cu", (3, 3, 3), vacuum=6.0)
    slab.rattle(0.05, seed=4)
    wire = rattled_fcc((1, 1, 3), seed=5)
    wire.pbc = [False, False, True]
    unwrapped = rattled_fcc((2, 2, 2), seed=6)
    unwrapped.positions[::3] += unwrapped.cell[0] * 2 - unwrapped.cell[2]
    return {"triclinic": tric, "slab": slab, "wire": wire, "unwrapped": unwrapped}


@pytest.mark.parametrize("backend", ["dense", "vesin"])
@pytest.mark.parametrize("name", ["triclinic", "slab", "wire", "unwrapped"])
def test_pairs_match_ase(name, backend):
    """Both back-ends find exactly ASE's pairs and image shifts, mixed pbc included."""
    from quests_torch.neighbors import find_neighbor_pairs

    atoms = _mixed_structures()[name]
    b = AtomsBatch.from_ase(atoms)
    pairs = find_neighbor_pairs(b.positions, b.cell, b.pbc, b.system_idx, 4.0, backend=backend)
    assert _pair_set(pairs) == _ase_pairs(atoms, 4.0)
    vec = pairs.vector
    assert torch.all(pairs.center[1:] >= pairs.center[:-1])
    assert float(vec.norm(dim=1).max()) < 4.0


@pytest.mark.parametrize("reps", [(1, 1, 1), (1, 1, 2)])
def test_vesin_on_cells_smaller_than_cutoff(reps):
    """Cells smaller than the cutoff: vesin finds an atom's own images like ASE and dense."""
    from quests_torch.neighbors import find_neighbor_pairs

    atoms = bulk("Cu", "fcc", a=3.6) * reps
    deform = np.eye(3) + 0.01 * np.random.default_rng(0).standard_normal((3, 3))
    atoms.set_cell(atoms.cell[:] @ deform, scale_atoms=True)
    b = AtomsBatch.from_ase(atoms)
    pairs = find_neighbor_pairs(b.positions, b.cell, b.pbc, b.system_idx, 5.0, backend="vesin")
    assert _pair_set(pairs) == _ase_pairs(atoms, 5.0)
    dense = find_neighbor_pairs(b.positions, b.cell, b.pbc, b.system_idx, 5.0, backend="dense")
    assert _pair_set(dense) == _pair_set(pairs)


def test_vesin_pairs_with_an_expanded_pbc():
    """torch-sim states hand ``pbc`` as one bool, expanded to ``[n_systems, 3]`` (stride 0):
    vesin-torch read its flags from the raw buffer, past the one byte there, and lost pairs
    at random (about 1 call in 20; a wrong neighbour list, dH off by 130 nats, in the
    in-flight autobatcher test of issue 28). The search now gives it contiguous copies."""
    from quests_torch.neighbors import find_neighbor_pairs

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (3, 3, 3)
    atoms.rattle(0.05, seed=2)
    b = AtomsBatch.from_ase(atoms)
    want = _pair_set(find_neighbor_pairs(b.positions, b.cell, b.pbc, b.system_idx, 5.0))
    for trial in range(100):
        junk = torch.full((4096,), trial % 2, dtype=torch.uint8)  # the bytes after the flag
        pbc = torch.tensor(True).expand(1, 3)
        got = find_neighbor_pairs(b.positions, b.cell, pbc, b.system_idx, 5.0, backend="vesin")
        assert _pair_set(got) == want, trial
        del junk


def test_slab_honours_pbc_per_direction():
    """A slab [T, T, F] equals the same slab made fully periodic with vacuum > cutoff."""
    slab = _mixed_structures()["slab"]
    assert list(slab.pbc) == [True, True, False]
    x = get_descriptors(slab)
    slab3 = slab.copy()
    slab3.pbc = True
    slab3.cell[2] *= 3.0  # vacuum far beyond the cutoff
    assert torch.allclose(x, get_descriptors(slab3), rtol=0, atol=1e-12)
    # and differs from treating the slab as an isolated cluster (upstream's behaviour)
    cluster = slab.copy()
    cluster.pbc = False
    assert (x - get_descriptors(cluster)).abs().max() > 1e-2


def test_molecule_with_zero_cell_equals_boxed():
    mol = molecule("C6H6")
    mol.rattle(0.02, seed=1)
    assert np.allclose(mol.cell[:], 0)
    boxed = mol.copy()
    boxed.center(vacuum=10.0)
    boxed.pbc = True
    assert torch.allclose(get_descriptors(mol), get_descriptors(boxed), rtol=0, atol=1e-12)


def test_perfect_crystal_ties_are_deterministic():
    """Every atom of a perfect FCC crystal gets the same descriptor (the k = 32 cut lies
    inside the 24-atom third shell); primitive and cubic supercells agree."""
    x = get_descriptors(bulk("Cu", "fcc", a=3.58, cubic=True) * (3, 3, 3))
    assert (x - x[0]).abs().max() <= 1e-12
    y = get_descriptors(bulk("Cu", "fcc", a=3.58))
    assert (x - y[0]).abs().max() <= 1e-12


# ------------------------------------------------------------------------- invariances


def test_rotation_translation_invariance():
    atoms = STRUCTURES["cu_rattled_triclinic"]
    x = get_descriptors(atoms)
    assert (get_descriptors(rotated_and_shifted(atoms, 1)) - x).abs().max() <= 1e-10


def test_permutation_and_rewrapping_invariance():
    atoms = STRUCTURES["cu_thermal"]
    x = get_descriptors(atoms)
    perm = np.random.default_rng(2).permutation(len(atoms))
    assert (get_descriptors(atoms[perm]) - x[perm]).abs().max() <= 1e-10
    moved = atoms.copy()
    rng = np.random.default_rng(3)
    moved.positions += rng.integers(-2, 3, size=(len(atoms), 3)) @ atoms.cell[:]
    assert (get_descriptors(moved) - x).abs().max() <= 1e-10


def test_left_handed_cell():
    """A cell with negative determinant (two vectors swapped) describes the same crystal."""
    atoms = STRUCTURES["cu_thermal"]
    swapped = atoms.copy()
    swapped.set_cell(atoms.cell[[1, 0, 2]], scale_atoms=False)
    assert np.linalg.det(swapped.cell[:]) < 0
    assert (get_descriptors(swapped) - get_descriptors(atoms)).abs().max() <= 1e-10


def test_supercell_gives_same_descriptors():
    atoms = STRUCTURES["cu_rattled_triclinic"]
    x = get_descriptors(atoms)
    big = get_descriptors(atoms * (2, 2, 2))
    assert (big - x.repeat(8, 1)).abs().max() <= 1e-10


def test_chunking_does_not_change_results():
    atoms = STRUCTURES["cu_hot"]
    x = get_descriptors(atoms)
    small = get_descriptors(atoms, budget="64K")  # forces one-atom chunks
    assert (x - small).abs().max() <= 1e-14  # BLAS blocking only: last-bit differences


def test_batch_equals_individual_calls():
    items = [
        STRUCTURES["ethanol_rattled"],
        STRUCTURES["cu_thermal"],
        molecule("H2O"),
        STRUCTURES["cluster"],
    ]
    x = get_descriptors(items)
    y = torch.cat([get_descriptors(a) for a in items])
    assert (x - y).abs().max() <= 1e-14


def test_tensor_api_matches_ase_api(device):
    atoms = STRUCTURES["cu_thermal"]
    b = AtomsBatch.from_ase([atoms, atoms], device=device)
    x = descriptors_from_tensors(b.positions, b.cell, b.pbc, b.system_idx)
    assert x.device.type == device
    assert (x[: len(atoms)].cpu() - get_descriptors(atoms)).abs().max() <= 1e-14
    assert (x[: len(atoms)] - x[len(atoms) :]).abs().max() <= 1e-14
    # single structure: cell [3, 3], pbc [3], no system_idx
    y = descriptors_from_tensors(b.positions[: len(atoms)], b.cell[0], b.pbc[0], k=8, cutoff=4.0)
    assert y.shape == (len(atoms), 15)


def test_k_and_cutoff_parameters():
    atoms = STRUCTURES["cu_thermal"]
    x = get_descriptors(atoms, k=8, cutoff=3.0)
    assert x.shape == (len(atoms), 15)
    # only the 12 first-shell neighbours lie within 3 A; x1 beyond 8 is cut by k
    assert (x[:, :8] > 0).all()
    full = get_descriptors(atoms, k=40, cutoff=3.0)
    assert (full[:, 12:40] == 0).all() and (full[:, :12] > 0).all()
    assert torch.allclose(full[:, :8], x[:, :8], rtol=0, atol=1e-15)


# ------------------------------------------------------------------------- gradients


def _small_periodic():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.1, seed=7)
    return atoms


@pytest.mark.parametrize("kind", ["periodic", "molecule"])
def test_gradcheck_positions_and_cell(kind):
    atoms = _small_periodic() if kind == "periodic" else molecule("CH3CH2OH")
    if kind == "molecule":
        atoms.rattle(0.05, seed=8)
    b = AtomsBatch.from_ase(atoms)
    pos = b.positions.clone().requires_grad_(True)
    cell = b.cell.clone().requires_grad_(kind == "periodic")

    def f(p, c):
        return descriptors_from_tensors(p, c, b.pbc, b.system_idx, k=6, cutoff=3.5)

    assert torch.autograd.gradcheck(f, (pos, cell), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradient_through_full_descriptor_matches_finite_differences():
    atoms = STRUCTURES["cu_thermal"]
    b = AtomsBatch.from_ase(atoms)
    w = torch.randn(len(atoms), 63, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def f(p):
        return (descriptors_from_tensors(p, b.cell, b.pbc, b.system_idx) * w).sum()

    pos = b.positions.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(pos), pos)
    assert torch.isfinite(g).all()
    for atom, axis in [(0, 0), (17, 2), (53, 1)]:
        fd = float(central_difference(f, b.positions, (atom, axis), 1e-5))
        assert abs(fd - float(g[atom, axis])) <= 1e-6 * max(1.0, abs(fd))


# ------------------------------------------------------------------------- bad input


def test_errors_name_the_problem():
    good = rattled_fcc((1, 1, 1))
    with pytest.raises(ValueError, match="`k` must be >= 1"):
        get_descriptors(good, k=0)
    with pytest.raises(ValueError, match="`cutoff` must be a finite number > 0"):
        get_descriptors(good, cutoff=0.0)
    with pytest.raises(ValueError, match="`cutoff`"):
        get_descriptors(good, cutoff=float("nan"))
    bad = good.copy()
    bad.positions[2, 1] = np.nan
    with pytest.raises(
        ValueError, match=r"`positions` contains NaN or inf \(atom 2 of structure 0"
    ):
        get_descriptors(bad)
    with pytest.raises(ValueError, match=r"`atoms\[1\]` is empty"):
        get_descriptors([good, Atoms()])
    with pytest.raises(ValueError, match="`atoms` is empty"):
        get_descriptors([])
    twin = good.copy()
    twin.positions[3] = twin.positions[1]
    with pytest.raises(ValueError, match="coincident atoms in structure 1: atom 1 and atom 3"):
        get_descriptors([good, twin])
    flat = good.copy()
    flat.cell[2] = 0.0
    with pytest.raises(ValueError, match="`cell` of structure 0 is singular"):
        get_descriptors(flat)
    planar = good.copy()
    planar.cell[2] = planar.cell[0] + planar.cell[1]
    with pytest.raises(ValueError, match="singular along its periodic directions"):
        get_descriptors(planar)
    with pytest.raises(TypeError, match="`k` must be an int"):
        get_descriptors(good, k=2.5)
    with pytest.raises(TypeError, match="`dtype`"):
        get_descriptors(good, dtype=torch.int64)


def test_tensor_api_shape_errors():
    b = AtomsBatch.from_ase(rattled_fcc((1, 1, 1)))
    with pytest.raises(ValueError, match=r"`positions` must be 2-D \[n_atoms, 3\]"):
        descriptors_from_tensors(b.positions[:, :2], b.cell, b.pbc, b.system_idx)
    with pytest.raises(ValueError, match="`system_idx` must have shape"):
        descriptors_from_tensors(b.positions, b.cell, b.pbc, b.system_idx[:-1])
    with pytest.raises(ValueError, match=r"`cell` must be 3-D \[n_systems, 3, 3\]"):
        descriptors_from_tensors(b.positions, b.cell[:, :2], b.pbc, b.system_idx)
    with pytest.raises(ValueError, match="`pbc` must have shape"):
        descriptors_from_tensors(b.positions, b.cell, b.pbc[:, :2], b.system_idx)
    with pytest.raises(ValueError, match="structure 1 is empty"):
        descriptors_from_tensors(
            b.positions, b.cell.repeat(2, 1, 1), b.pbc.repeat(2, 1), b.system_idx
        )
    with pytest.raises(TypeError, match="`cell` dtype"):
        descriptors_from_tensors(b.positions, b.cell.float(), b.pbc, b.system_idx)
    with pytest.raises(ValueError, match="`positions` is empty"):
        descriptors_from_tensors(b.positions[:0], b.cell, b.pbc, b.system_idx[:0])


def test_atoms_batch_round_trip():
    items = [STRUCTURES["ethanol_rattled"], STRUCTURES["cu_thermal"]]
    b = AtomsBatch.from_ase(items)
    assert b.n_systems == 2 and b.n_atoms == 9 + 108
    assert b.n_atoms_per_system.tolist() == [9, 108]
    back = b.to_ase()
    for a, c in zip(items, back, strict=True):
        assert np.allclose(a.positions, c.positions) and (a.numbers == c.numbers).all()
        assert np.allclose(a.cell[:], c.cell[:]) and (a.pbc == c.pbc).all()
    b32 = b.to(dtype=torch.float32)
    assert b32.positions.dtype == torch.float32 and b32.cell.dtype == torch.float32
    sub = b.select([1])
    assert sub.n_systems == 1 and torch.equal(sub.positions, b.positions[9:])


def test_descriptor_distance_behind_the_default_bandwidth():
    """docs/guide/upstream.md's numbers: |x(a=3.58) - x(a=3.54)| ~ 2h, |x(3.58) - x(3.56)| ~ h."""
    from ase.build import bulk

    x = {a: get_descriptors(bulk("Cu", "fcc", a=a, cubic=True))[0] for a in (3.58, 3.56, 3.54)}
    assert float((x[3.58] - x[3.54]).norm()) == pytest.approx(0.0308, abs=5e-5)
    assert float((x[3.58] - x[3.56]).norm()) == pytest.approx(0.0153, abs=5e-5)


def test_descriptors_under_inference_mode_with_cpu_worker_threads():
    """The CPU chunk pool's workers take the caller's inference mode: an MD cell (one block
    per thread) under ``torch.inference_mode()`` once failed writing its inference-tensor
    output from a worker thread."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (4, 4, 4)
    atoms.rattle(0.05, seed=3)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = get_descriptors(atoms)
        with torch.inference_mode():
            got = get_descriptors(atoms)
    finally:
        torch.set_num_threads(old)
    assert got.is_inference() and torch.equal(got, expected)
