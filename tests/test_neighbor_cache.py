"""The reused neighbour lists of an MD loop (quests_torch.neighbors.NeighborCache, issue 19
item 9): the same descriptors as a new search at every step, rebuilt exactly when needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from conftest import rattled_fcc

from quests_torch import AtomsBatch, UncertaintyBank
from quests_torch.descriptors import descriptors_from_tensors
from quests_torch.neighbors import NeighborCache


def _batch(structures, dtype=torch.float64):
    b = AtomsBatch.from_ase(structures, dtype=dtype)
    return b.positions, b.cell, b.pbc, b.system_idx


def _both(cache, positions, cell, pbc, system_idx=None, **kw):
    fresh = descriptors_from_tensors(positions, cell, pbc, system_idx, **kw)
    cached = descriptors_from_tensors(positions, cell, pbc, system_idx, neighbors=cache, **kw)
    return fresh, cached


def _ready(cache, positions, cell, pbc, system_idx=None, **kw):
    """Two calls on the same batch: the second builds the list (the first only searches)."""
    for _ in range(2):
        descriptors_from_tensors(positions, cell, pbc, system_idx, neighbors=cache, **kw)
    assert (cache.builds, cache.reuses, cache.searches) == (1, 0, 1), cache


def _walk(positions, steps, scale, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = positions.clone()
    for _ in range(steps):
        out = out + scale * torch.randn(out.shape, generator=gen, dtype=out.dtype)
        yield out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_md_walk_gives_the_descriptors_of_a_new_search(dtype):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (4, 4, 4)
    atoms.rattle(0.05, seed=3)
    pos, cell, pbc, _ = _batch(atoms, dtype)
    cache = NeighborCache(skin=1.0)
    worst = 0.0
    for p in _walk(pos, 20, 0.03):
        fresh, cached = _both(cache, p, cell, pbc)
        worst = max(worst, float((fresh - cached).abs().max()))
    assert worst <= (1e-13 if dtype == torch.float64 else 1e-5), worst
    # a 0.03 Å random walk: the largest displacement reaches 0.5 Å after ~10-20 steps; the
    # first call and each call that finds the list stale search anew, the next one builds
    assert 1 <= cache.builds <= 4 and cache.builds + cache.reuses + cache.searches == 20, cache
    assert 1 <= cache.searches <= cache.builds and cache.reuses >= 12, cache


def test_positions_wrapped_into_the_cell_reuse_the_list():
    atoms = rattled_fcc((3, 3, 3), seed=2)
    pos, cell, pbc, _ = _batch(atoms)
    cache = NeighborCache()
    _ready(cache, pos, cell, pbc)
    inv = torch.linalg.inv(cell[0])
    for p in _walk(pos - 0.3, 3, 0.01, seed=4):  # moved 0.52 Å... minus its own wrap below
        p = p + 0.3 - 0.2  # 0.17 Å from the build in all, every atom
        frac = p @ inv
        wrapped = (frac - frac.floor()) @ cell[0]  # torch-sim wraps every step
        assert not torch.allclose(wrapped, p)  # some atoms crossed the cell's faces
        fresh, cached = _both(cache, wrapped, cell, pbc)
        assert torch.allclose(fresh, cached, rtol=0, atol=1e-13)
    assert (cache.builds, cache.reuses) == (1, 3)
    half = wrapped + torch.tensor([atoms.cell[0][0] * 0.5, 0.0, 0.0], dtype=pos.dtype)
    fresh, cached = _both(cache, half, cell, pbc)  # half a cell away: a new search
    assert torch.allclose(fresh, cached, rtol=0, atol=1e-13)
    assert (cache.builds, cache.reuses, cache.searches) == (1, 3, 2)


def test_two_atoms_moving_towards_each_other_by_almost_half_the_skin_each():
    """The worst case of the skin rule: a pair at cutoff + skin - 0.01 Å at the build comes
    within the cutoff without any atom moving more than skin / 2: it must be found."""
    cutoff, skin = 5.0, 1.0
    d0 = cutoff + skin - 0.01
    atoms = Atoms("Cu3", positions=[[0, 0, 0], [d0, 0, 0], [0, 3.0, 0]], pbc=False)
    pos, cell, pbc, _ = _batch(atoms)
    cache = NeighborCache(skin)
    _ready(cache, pos, cell, pbc, k=4, cutoff=cutoff)
    step = skin / 2 - 2e-3  # just inside the rebuild limit
    moved = pos.clone()
    moved[0, 0] += step
    moved[1, 0] -= step
    fresh, cached = _both(cache, moved, cell, pbc, k=4, cutoff=cutoff)
    assert cache.reuses == 1
    assert float(fresh[0, 1]) > 0  # atom 0 now has atom 1 as a second neighbour
    assert torch.allclose(fresh, cached, rtol=0, atol=1e-14)
    moved[0, 0] += 3e-3  # past the limit: searched anew
    fresh, cached = _both(cache, moved, cell, pbc, k=4, cutoff=cutoff)
    assert (cache.builds, cache.reuses, cache.searches) == (1, 1, 2)
    assert torch.allclose(fresh, cached, rtol=0, atol=1e-14)


def test_mixed_batch_molecule_slab_and_cells():
    water = molecule("H2O")
    water.center(vacuum=4.0)
    slab = fcc111("Cu", size=(3, 3, 3), vacuum=6.0)
    slab.rattle(0.03, seed=1)
    structures = [rattled_fcc((2, 2, 2), seed=5), water, slab, rattled_fcc((3, 3, 3), seed=6)]
    pos, cell, pbc, sid = _batch(structures)
    cache = NeighborCache()
    for p in _walk(pos, 4, 0.02, seed=1):
        fresh, cached = _both(cache, p, cell, pbc, sid)
        assert torch.allclose(fresh, cached, rtol=0, atol=1e-13)
    assert (cache.builds, cache.reuses, cache.searches) == (1, 2, 1)


def test_perfect_crystal_ties_are_broken_the_same_way():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (3, 3, 3)  # ties at the 32nd neighbour
    pos, cell, pbc, _ = _batch(atoms)
    cache = NeighborCache()
    for shift in (0.0, 0.1, 0.2):  # a rigid translation (|d| < skin / 2) keeps every tie
        p = pos + shift
        fresh, cached = _both(cache, p, cell, pbc)
        assert torch.allclose(fresh, cached, rtol=0, atol=1e-15)
        assert float((cached - cached[0]).abs().max()) < 1e-14  # every environment the same
    assert cache.builds == 1


def test_multicomponent_descriptors_and_a_change_of_species():
    atoms = rattled_fcc((3, 3, 3), seed=7)
    rng = np.random.default_rng(0)
    numbers = np.where(rng.random(len(atoms)) < 0.3, 28, 29)
    atoms.numbers = numbers
    b = AtomsBatch.from_ase(atoms)
    cache = NeighborCache()
    kw = {"numbers": b.numbers, "species": [28, 29]}
    for p in _walk(b.positions, 3, 0.02):
        fresh, cached = _both(cache, p, b.cell, b.pbc, **kw)
        assert fresh.shape == (len(atoms), 3 * 63)
        assert torch.allclose(fresh, cached, rtol=0, atol=1e-13)
    swapped = b.numbers.clone()
    swapped[:5] = 57 - swapped[:5]  # Ni <-> Cu
    kw["numbers"] = swapped
    fresh, cached = _both(cache, p, b.cell, b.pbc, **kw)
    assert torch.allclose(fresh, cached, rtol=0, atol=1e-13)
    assert (cache.builds, cache.reuses, cache.searches) == (2, 1, 1)  # new numbers: rebuilt


@pytest.mark.parametrize(
    "change",
    ["cell", "pbc", "system_idx", "k", "cutoff", "dtype", "n_atoms"],
)
def test_every_change_of_the_structure_or_parameters_rebuilds(change):
    structures = [rattled_fcc((2, 2, 2), seed=1), rattled_fcc((2, 2, 2), seed=2)]
    pos, cell, pbc, sid = _batch(structures)
    cache = NeighborCache()
    kw = {"k": 32, "cutoff": 5.0}
    _ready(cache, pos, cell, pbc, sid, **kw)
    if change == "cell":
        cell = cell * 1.01
    elif change == "pbc":
        pbc = pbc.clone()
        pbc[1, 2] = False
    elif change == "system_idx":  # the same atom count, split 16 + 48 instead of 32 + 32
        sid = torch.cat([torch.zeros(16), torch.ones(48)]).long()
    elif change == "k":
        kw["k"] = 24
    elif change == "cutoff":
        kw["cutoff"] = 4.5
    elif change == "dtype":
        pos, cell = pos.float(), cell.float()
    elif change == "n_atoms":
        pos, sid = pos[:-1], sid[:-1]
    fresh, cached = _both(cache, pos, cell, pbc, sid, **kw)
    # not reused: a new search, or a new list where only pbc or system_idx changed
    assert cache.reuses == 0 and cache.builds + cache.searches == 3, cache
    # the split puts atoms of two cells 0.05 Å apart (x1 ~ 18): relative agreement
    assert torch.allclose(fresh, cached, rtol=1e-11, atol=1e-5 if change == "dtype" else 1e-13)


def test_gradients_through_a_reused_list_with_wrapped_atoms():
    atoms = rattled_fcc((2, 2, 2), seed=3)
    pos, cell, pbc, _ = _batch(atoms)
    cache = NeighborCache()
    _ready(cache, pos, cell, pbc)
    p = pos + 0.05
    frac = p @ torch.linalg.inv(cell[0])
    p = (frac - frac.floor()) @ cell[0]
    weights = torch.randn(len(atoms), 63, generator=torch.Generator().manual_seed(0), dtype=p.dtype)

    def grads(neighbors):
        x = p.clone().requires_grad_(True)
        c = cell.clone().requires_grad_(True)
        y = descriptors_from_tensors(x, c, pbc, neighbors=neighbors)
        return torch.autograd.grad((y * weights).sum(), (x, c))

    gx, gc = grads(cache)
    assert cache.reuses == 1
    fx, fc = grads(None)
    assert torch.allclose(gx, fx, rtol=1e-10, atol=1e-12)
    assert torch.allclose(gc, fc, rtol=1e-10, atol=1e-12)


def test_bad_values_on_a_reused_list_get_the_new_search_errors():
    atoms = rattled_fcc((2, 2, 2), seed=4)
    pos, cell, pbc, _ = _batch(atoms)
    cache = NeighborCache()
    _ready(cache, pos, cell, pbc)
    nan = pos.clone()
    nan[3, 1] = float("nan")
    with pytest.raises(ValueError, match="positions"):
        descriptors_from_tensors(nan, cell, pbc, neighbors=cache)
    close = pos.clone()
    close[1] = close[0] + 1e-8  # would move atom 1 far: rebuilt, and the search refuses it
    with pytest.raises(ValueError, match="coincident"):
        descriptors_from_tensors(close, cell, pbc, neighbors=cache)


def test_a_wrong_neighbors_argument_is_named():
    pos, cell, pbc, _ = _batch(rattled_fcc((2, 2, 2), seed=8))
    with pytest.raises(TypeError, match="`neighbors` must be a NeighborCache"):
        descriptors_from_tensors(pos, cell, pbc, neighbors=1.0)


def test_skin_is_checked():
    with pytest.raises(ValueError, match="skin"):
        NeighborCache(0.0)
    with pytest.raises(ValueError, match="skin"):
        NeighborCache(float("nan"))
    with pytest.raises(TypeError, match="skin"):
        NeighborCache("1.0")


def test_no_list_is_kept_past_the_memory_budget():
    atoms = rattled_fcc((2, 2, 2), seed=5)
    pos, cell, pbc, _ = _batch(atoms)
    cache = NeighborCache()
    fresh = descriptors_from_tensors(pos, cell, pbc)
    for _ in range(2):
        small = descriptors_from_tensors(pos, cell, pbc, neighbors=cache, budget=4096)
    assert torch.allclose(fresh, small, rtol=0, atol=1e-13)
    assert cache.builds == 0 and cache.searches == 2 and cache._built is None


def test_the_bank_reuses_its_list_and_forgets_it_when_moved_or_pickled():
    import pickle

    atoms = rattled_fcc((2, 2, 2), seed=6)
    bank = UncertaintyBank.from_atoms([rattled_fcc((2, 2, 2), seed=s) for s in range(3)])
    b = AtomsBatch.from_ase(atoms)
    plain = UncertaintyBank(bank.descriptors, skin=None)
    assert plain.neighbors is None
    for p in _walk(b.positions, 3, 0.01):
        assert torch.allclose(bank(p, b.cell, b.pbc), plain(p, b.cell, b.pbc), rtol=0, atol=1e-12)
    assert (bank.neighbors.builds, bank.neighbors.reuses, bank.neighbors.searches) == (1, 1, 1)
    copy = pickle.loads(pickle.dumps(bank))
    assert copy.neighbors._built is None and copy.neighbors.skin == bank.neighbors.skin
    bank.double()
    assert bank.neighbors._built is None


def test_unrelated_structures_never_pay_for_a_list():
    """A bank screening a dataset (a new structure every call) searches anew each time, as
    without a cache: no list is built for structures that are not seen twice in a row."""
    cache = NeighborCache()
    for seed in range(4):
        pos, cell, pbc, _ = _batch(rattled_fcc((2, 2, 2), seed=seed, stdev=0.3))
        fresh, cached = _both(cache, pos, cell, pbc)
        assert torch.allclose(fresh, cached, rtol=0, atol=1e-13)
    assert (cache.builds, cache.reuses, cache.searches) == (0, 0, 4)
