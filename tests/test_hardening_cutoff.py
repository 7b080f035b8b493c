"""Hardening (issue 25, item 7): a cutoff bounds the work before anything is allocated.

A cutoff far beyond the cell multiplies the periodic images: ``-c 1e9`` hung the neighbour
search, ``-c 200`` on three 32-atom cells grew to 19 GB. Every pair-list search
(:func:`quests_torch.neighbors.find_neighbor_pairs`, behind the descriptors of structures the
cell grid does not take, the neighbour cache, clusters and sampling) now computes a lower bound
on the pairs within the cutoff (:func:`quests_torch.neighbors.pairs.min_pairs_within`) and
refuses, naming ``cutoff``, a list that cannot fit in the memory available.

The tests check that the bound is a true lower bound (never above the pairs a search finds, on
periodic, slab, wire, molecular and skewed structures) and close to them at large cutoffs, that
the refusal comes before any search (the searches are replaced by functions that fail loudly),
and that the command line exits 2 in well under a second of work.
"""

from __future__ import annotations

import math
import time

import ase.io
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111

import quests_torch as qt
from quests_torch import cli
from quests_torch.neighbors import find_neighbor_pairs
from quests_torch.neighbors import pairs as pairs_mod
from quests_torch.neighbors.pairs import PAIR_BYTES, complete_cell, min_pairs_within
from quests_torch.structures import AtomsBatch


def _batch(structures: list[Atoms]):
    b = AtomsBatch.from_ase(structures, dtype=torch.float64)
    return b.positions, b.cell, b.pbc, b.system_idx


def _cu(seed: int = 0) -> Atoms:
    a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    a.rattle(0.05, seed=seed)
    return a


def _structures() -> dict[str, Atoms]:
    skewed = Atoms(
        "Cu3",
        scaled_positions=[[0.1, 0.2, 0.3], [0.6, 0.1, 0.8], [0.3, 0.7, 0.5]],
        cell=[[4.0, 0.0, 0.0], [3.1, 2.5, 0.0], [1.0, 1.7, 3.3]],
        pbc=True,
    )
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)  # periodic in x, y
    wire = Atoms("Cu4", positions=[[0, 0, 0], [1.3, 1.1, 0.4], [2.5, 0.2, 1.9], [3.4, 1.5, 0.8]],
                 cell=[4.0, 0, 0], pbc=[True, False, False])  # fmt: skip
    molecule = Atoms("Cu5", positions=[[0, 0, 0], [2.1, 0, 0], [0, 2.3, 0], [0, 0, 2.6],
                                       [1.4, 1.5, 1.6]])  # fmt: skip
    return {"fcc": _cu(), "skewed": skewed, "slab": slab, "wire": wire, "molecule": molecule}


@pytest.mark.parametrize("name", ["fcc", "skewed", "slab", "wire", "molecule"])
@pytest.mark.parametrize("cutoff", [1.0, 3.0, 5.0, 9.0, 17.0, 30.0])
def test_pair_bound_never_exceeds_the_pairs_found(name, cutoff):
    positions, cell, pbc, system_idx = _batch([_structures()[name]])
    found = find_neighbor_pairs(positions, cell, pbc, system_idx, cutoff).n_pairs
    counts = torch.bincount(system_idx, minlength=1)
    bound = float(min_pairs_within(positions, complete_cell(cell, pbc), pbc, system_idx, counts,
                                   cutoff)[0])  # fmt: skip
    assert 0 <= bound <= found, (name, cutoff, bound, found)


@pytest.mark.parametrize("name", ["fcc", "skewed", "slab", "wire"])
def test_pair_bound_is_tight_when_the_cutoff_is_far_beyond_the_cell(name):
    """At 60 Å the bound is the ball's images less a shell of the cell's size: within a factor
    ~2 of the pairs found (the asymptote of both is n^2 vol(ball) / V)."""
    positions, cell, pbc, system_idx = _batch([_structures()[name]])
    cutoff = 60.0
    found = find_neighbor_pairs(positions, cell, pbc, system_idx, cutoff).n_pairs
    counts = torch.bincount(system_idx, minlength=1)
    bound = float(min_pairs_within(positions, complete_cell(cell, pbc), pbc, system_idx, counts,
                                   cutoff)[0])  # fmt: skip
    assert 0.3 * found <= bound <= found, (name, bound, found)


def test_molecule_bound_is_every_pair_once_the_cutoff_spans_it():
    positions, cell, pbc, system_idx = _batch([_structures()["molecule"]])
    counts = torch.bincount(system_idx, minlength=1)
    full = complete_cell(cell, pbc)
    assert float(min_pairs_within(positions, full, pbc, system_idx, counts, 1e9)[0]) == 5 * 4
    assert float(min_pairs_within(positions, full, pbc, system_idx, counts, 1.0)[0]) == 0


def test_pair_bound_is_per_structure_and_finite_in_float32():
    positions, cell, pbc, system_idx = _batch([_cu(0), _structures()["molecule"], _cu(1)])
    counts = torch.bincount(system_idx, minlength=3)
    full = complete_cell(cell, pbc)
    b64 = min_pairs_within(positions, full, pbc, system_idx, counts, 40.0)
    b32 = min_pairs_within(positions.float(), full.float(), pbc, system_idx, counts, 40.0)
    assert b64.dtype == b32.dtype == torch.float64  # float64 unless float32-only mode
    assert torch.allclose(b64, b32, rtol=1e-5)
    assert b64[1] == 20 and b64[0] > 1e5 and b64[2] > 1e5
    huge = min_pairs_within(positions, full, pbc, system_idx, counts, 1e300)
    assert math.isinf(float(huge[0])) and float(huge[1]) == 20


def _no_search(monkeypatch):
    """Every search back-end fails loudly: a refusal must come before them."""

    def boom(*args, **kwargs):
        raise AssertionError("the neighbour search ran")

    for name in ("_vesin_pairs", "_dense_pairs"):
        monkeypatch.setattr(pairs_mod, name, boom)


def test_huge_cutoff_is_refused_before_the_search(monkeypatch):
    _no_search(monkeypatch)
    with pytest.raises(ValueError, match=r"`cutoff` = 1e\+09 Å gives at least .* GiB available"):
        qt.get_descriptors([_cu()], cutoff=1e9)
    positions, cell, pbc, system_idx = _batch([_cu()])
    with pytest.raises(ValueError, match="use a smaller cutoff"):
        find_neighbor_pairs(positions, cell, pbc, system_idx, 1e9)


def test_refusal_follows_the_memory_available(monkeypatch):
    """A moderate cutoff is refused only when the pairs cannot fit: the same call passes with
    the memory the machine has and is refused when the memory is made to look smaller."""
    positions, cell, pbc, system_idx = _batch([_cu()])
    counts = torch.bincount(system_idx, minlength=1)
    bound = float(min_pairs_within(positions, complete_cell(cell, pbc), pbc, system_idx, counts,
                                   30.0)[0])  # fmt: skip
    x = qt.get_descriptors([_cu()], cutoff=30.0)
    assert x.shape == (32, 63) and torch.isfinite(x).all()
    fits = int(bound * PAIR_BYTES) + 1
    monkeypatch.setattr(pairs_mod, "available_memory", lambda device=None: fits)
    assert torch.equal(qt.get_descriptors([_cu()], cutoff=30.0), x)  # exactly fits: allowed
    monkeypatch.setattr(pairs_mod, "available_memory", lambda device=None: int(bound * 100))
    _no_search(monkeypatch)
    with pytest.raises(ValueError, match=r"structure 0: 32 atoms in a periodic cell of 373.2 Å\^3"):
        qt.get_descriptors([_cu()], cutoff=30.0)


def test_skipped_structures_do_not_count(monkeypatch):
    """The bound counts only the structures a search lists (the grid's are skipped)."""
    positions, cell, pbc, system_idx = _batch([_cu(0), _cu(1)])
    monkeypatch.setattr(pairs_mod, "available_memory", lambda device=None: 1)
    skip = torch.tensor([True, True])
    assert find_neighbor_pairs(positions, cell, pbc, system_idx, 1e9, skip=skip).n_pairs == 0


def test_neighbor_cache_is_bounded_too(monkeypatch):
    _no_search(monkeypatch)
    positions, cell, pbc, system_idx = _batch([_cu()])
    cache = qt.NeighborCache()
    with pytest.raises(ValueError, match="`cutoff`"):
        qt.descriptors_from_tensors(positions, cell, pbc, system_idx, cutoff=1e9, neighbors=cache)


@pytest.fixture
def md(tmp_path):
    ase.io.write(tmp_path / "md.xyz", [_cu(i) for i in range(3)])
    ase.io.write(tmp_path / "far.xyz", Atoms("Cu2", positions=[[0, 0, 0], [10, 0, 0]]))
    return tmp_path


@pytest.mark.parametrize("cutoff", ["1e9", "200"])
def test_cli_huge_cutoff_exits_2_at_once(md, capsys, cutoff):
    start = time.perf_counter()
    code = cli.main(["entropy", str(md / "md.xyz"), "-i", ":3", "-c", cutoff])
    err = capsys.readouterr().err
    assert code == 2
    assert "`cutoff`" in err and "use a smaller cutoff" in err and len(err.splitlines()) == 1
    assert time.perf_counter() - start < 30  # it hung (1e9) or grew to 19 GB (200) before


def test_cli_huge_cutoff_is_fine_for_a_molecule(md, capsys):
    """No periodic images: a cutoff beyond every distance is every pair once, not a refusal."""
    assert cli.main(["entropy", str(md / "far.xyz"), "-c", "1e9"]) == 0
    assert "2 environments" in capsys.readouterr().out


def test_store_with_a_huge_cutoff_refuses_dh(md, capsys):
    """A (consistent) store written with cutoff 1e9: dH of new frames against it exits 2."""
    x = torch.rand(32, 63, dtype=torch.float64)
    store = md / "huge.qstore"
    with qt.StoreWriter(store, k=32, cutoff=1e9, dtype="float64") as w:
        w.append(x, [32], species=["Cu"])
        w.complete()
    start = time.perf_counter()
    assert cli.main(["dh", str(md / "md.xyz"), "-r", str(store)]) == 2
    assert "`cutoff` = 1e+09 Å" in capsys.readouterr().err
    assert time.perf_counter() - start < 30
