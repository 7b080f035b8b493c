"""The MD step in fused kernels (issue 26 item 1): descriptors from the Verlet list in one
Triton launch (quests_torch/neighbors/fused.py), dH in one more (kde/fused.py, rows centred in
the kernel), one host sync for the list's validity.

Run on CPU tensors under Triton's interpreter (conftest sets ``TRITON_INTERPRET=1`` without
CUDA; ``tl.sort`` is numpy's there, see tests/_triton_interp.py). Every case compares the
fused step with the torch path on the same positions and list.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from _opcount import CountOps
from ase import Atoms
from ase.build import bulk
from torch.utils._python_dispatch import _disable_current_modes

from quests_torch import AtomsBatch, summaries
from quests_torch._triton import KERNEL_ENV
from quests_torch.descriptors import descriptors_from_tensors
from quests_torch.kde import fused as kde_fused
from quests_torch.neighbors import NeighborCache
from quests_torch.neighbors import fused as nb_fused
from quests_torch.uncertainty import UncertaintyBank

pytest.importorskip("triton")
if not torch.cuda.is_available():
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or Triton's interpreter", allow_module_level=True)

#: where the fused kernels run: the GPU (then these are `cuda` tests, run by gpu_check), or
#: CPU tensors under the interpreter
FUSED_DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.parametrize("dev", [FUSED_DEV])

#: torch ops that allocate or make views: no kernel launch on a GPU
NO_LAUNCH = {
    "aten.empty.memory_format",
    "aten.detach.default",
    "aten.slice.Tensor",
    "aten.select.int",
    "aten.view.default",
    "aten.alias.default",
    "aten.promote_types.default",
}
SYNC_READ = "aten._local_scalar_dense.default"


class _Counted:
    """A jitted kernel whose launches are counted and run outside any dispatch mode (the
    interpreter's own copies of the arguments are not the step's ops)."""

    def __init__(self, kernel, counts: Counter):
        self.kernel, self.counts = kernel, counts

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def call(*args, **kwargs):
            self.counts[getattr(self.kernel, "__name__", "kernel")] += 1
            with _disable_current_modes():
                return run(*args, **kwargs)

        return call


@pytest.fixture
def launches(monkeypatch):
    """Counter of Triton launches by kernel name (the three modules with kernels)."""
    counts: Counter = Counter()
    nb_kernel, kde_kernel, sum_kernel = nb_fused._kernel, kde_fused._kernel, summaries._kernel
    monkeypatch.setattr(nb_fused, "_kernel", lambda i: _Counted(nb_kernel(i), counts))
    monkeypatch.setattr(summaries, "_kernel", lambda i: _Counted(sum_kernel(i), counts))
    monkeypatch.setattr(
        kde_fused, "_kernel", lambda i, name="_lse_kernel": _Counted(kde_kernel(i, name), counts)
    )
    return counts


@pytest.fixture
def triton_kernels(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "triton")


def _moves(pos: torch.Tensor, steps: int = 3, size: float = 0.02, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    noise = [torch.randn(pos.shape, generator=gen, dtype=pos.dtype) for _ in range(steps)]
    return [pos + size * (i + 1) * e.to(pos.device) for i, e in enumerate(noise)]


def _both_paths(monkeypatch, batch, steps, **kw):
    """Descriptors of the last step from a list built on the first two, by the torch path and
    by the fused kernel (the same cache: the same list), and the cache."""
    cache = NeighborCache()
    monkeypatch.setenv(KERNEL_ENV, "torch")
    for p in steps[:-1]:
        descriptors_from_tensors(p, *batch, neighbors=cache, **kw)
    assert cache.builds == 1
    ref = descriptors_from_tensors(steps[-1], *batch, neighbors=cache, **kw)
    monkeypatch.setenv(KERNEL_ENV, "triton")
    got = descriptors_from_tensors(steps[-1], *batch, neighbors=cache, **kw)
    assert cache.builds == 1 and cache.reuses == 2, cache  # the torch step, the fused one
    return ref, got, cache


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_fused_descriptors_equal_the_torch_path(dev, monkeypatch, dtype):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, seed=3)
    b = AtomsBatch.from_ase(atoms, device=dev)
    steps = _moves(b.positions.to(dtype))
    ref, got, _ = _both_paths(monkeypatch, (b.cell.to(dtype), b.pbc), steps)
    assert got.dtype == dtype and got.shape == ref.shape == (32, 63)
    torch.testing.assert_close(got, ref, **_tol(dtype))


def test_fused_ties_of_a_perfect_crystal_break_as_the_torch_path(dev, monkeypatch):
    """k = 32 cuts the third FCC shell (24 atoms at a sqrt(3/2)): the same 14 are kept."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
    b = AtomsBatch.from_ase(atoms, device=dev)
    steps = [b.positions.clone() for _ in range(3)]
    ref, got, _ = _both_paths(monkeypatch, (b.cell, b.pbc), steps)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    assert torch.allclose(got, got[:1].expand_as(got), rtol=1e-12, atol=1e-14)  # all alike


def test_fused_batch_of_structures_molecule_and_slab(dev, monkeypatch):
    """Per-atom inverse cells (several structures), a molecule (no periodic direction) and a
    slab (pbc T, T, F), with atoms wrapped back into the cell between steps."""
    cu = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 1, 1)
    cu.rattle(0.05, seed=4)
    slab = bulk("Al", "fcc", a=4.05, cubic=True) * (1, 2, 1)
    slab.pbc = [True, True, False]
    slab.rattle(0.05, seed=5)
    mol = Atoms("CH4", positions=[[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63],
                                  [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]])  # fmt: skip
    b = AtomsBatch.from_ase([cu, slab, mol], device=dev)
    steps = _moves(b.positions)
    # the last step wrapped into the periodic cells (torch-sim does it every step)
    last = steps[-1].clone()
    first = b.system_idx == 0
    frac = torch.linalg.solve(b.cell[0].T, last[first].T).T
    last[first] = (frac % 1.0) @ b.cell[0]
    steps[-1] = last
    ref, got, _ = _both_paths(monkeypatch, (b.cell, b.pbc, b.system_idx), steps)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    mol = b.system_idx == 2  # CH4: 4 neighbours, so x1 from the 5th on and x2 from the 4th
    assert (got[mol, 4:32] == 0).all() and (got[mol, 32 + 3 :] == 0).all()


def test_fused_multicomponent(dev, monkeypatch):
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.rattle(0.05, seed=6)
    b = AtomsBatch.from_ase(atoms, device=dev)
    steps = _moves(b.positions)
    kw = dict(numbers=b.numbers, species=[11, 17], k=16, cutoff=4.5)
    ref, got, _ = _both_paths(monkeypatch, (b.cell, b.pbc), steps, **kw)
    assert got.shape == (8, 3 * 31)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("change", ["far", "cell", "pbc", "numbers"])
def test_a_stale_list_is_rebuilt(dev, monkeypatch, triton_kernels, change):
    """The kernel's flag: an atom moved beyond skin / 2, another cell, pbc or atomic numbers.
    The step then rebuilds and gives a new search's descriptors."""
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.rattle(0.05, seed=7)
    b = AtomsBatch.from_ase(atoms, device=dev)
    pos, cell, pbc, numbers = b.positions, b.cell.clone(), b.pbc.clone(), b.numbers.clone()
    kw = dict(k=8, cutoff=4.0, species=[11, 17])
    cache = NeighborCache(skin=1.0)
    for p in _moves(pos, 2):
        descriptors_from_tensors(p, cell, pbc, numbers=numbers, neighbors=cache, **kw)
    assert cache.builds == 1
    pos = pos.clone()
    if change == "far":
        pos[3] += torch.tensor([0.6, 0.0, 0.0], dtype=pos.dtype, device=dev)
    elif change == "cell":
        cell = cell * 1.01
        pos = pos * 1.01
    elif change == "pbc":
        pbc = torch.tensor([[True, True, False]], device=dev)
    else:
        numbers = numbers.flip(0)
    got = descriptors_from_tensors(pos, cell, pbc, numbers=numbers, neighbors=cache, **kw)
    # the stale list was not used (a rebuild, or a new search where the atoms jumped) ...
    assert cache.reuses == 0 and cache.builds + cache.searches == 3, cache
    fresh = descriptors_from_tensors(pos, cell, pbc, numbers=numbers, **kw)
    torch.testing.assert_close(got, fresh, rtol=1e-12, atol=1e-14)  # ... a new search was


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_positions_reach_the_searchs_error(dev, triton_kernels, launches, bad):
    """A NaN or inf position makes the list stale (the checks are written so that NaN fails
    them), and the new search names the argument."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    b = AtomsBatch.from_ase(atoms, device=dev)
    cache = NeighborCache()
    for p in _moves(b.positions, 3):
        descriptors_from_tensors(p, b.cell, b.pbc, k=8, neighbors=cache)
    assert launches["_verlet_kernel"] == 1
    pos = b.positions.clone()
    pos[2, 1] = bad
    with pytest.raises(ValueError, match="positions"):
        descriptors_from_tensors(pos, b.cell, b.pbc, k=8, neighbors=cache)
    assert launches["_verlet_kernel"] == 2 and cache.reuses == 1


def test_coincident_atoms_reach_the_searchs_error(dev, triton_kernels):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    b = AtomsBatch.from_ase(atoms, device=dev)
    cache = NeighborCache()
    for p in _moves(b.positions, 2):
        descriptors_from_tensors(p, b.cell, b.pbc, k=8, neighbors=cache)
    pos = b.positions.clone()
    pos[1] = pos[0]
    with pytest.raises(ValueError, match=r"coincident|closer"):
        descriptors_from_tensors(pos, b.cell, b.pbc, k=8, neighbors=cache)


def test_autograd_and_large_k_keep_the_torch_path(dev, triton_kernels, launches):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.rattle(0.05, seed=8)
    b = AtomsBatch.from_ase(atoms, device=dev)
    cache = NeighborCache()
    for p in _moves(b.positions, 2):
        descriptors_from_tensors(p, b.cell, b.pbc, k=8, neighbors=cache)
    pos = b.positions.clone().requires_grad_(True)
    x = descriptors_from_tensors(pos, b.cell, b.pbc, k=8, neighbors=cache)
    assert x.grad_fn is not None and cache.reuses == 1
    descriptors_from_tensors(b.positions, b.cell, b.pbc, k=nb_fused.MAX_K + 1, cutoff=5.0)
    assert not launches


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_bank_step_in_four_launches_and_one_sync(dev, monkeypatch, launches, one_thread, dtype):
    """The steady-state MD step of UncertaintyBank (issue 26: at most four launches and one
    host sync; the torch path takes ~140 ops and 2 syncs): the descriptor kernel, the dH
    kernel, the flag's zeroing and dH's sign."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, seed=3)
    b = AtomsBatch.from_ase(atoms, device=dev)
    probe = UncertaintyBank(torch.zeros(1, 63, dtype=torch.float64, device=dev))
    y = probe.descriptors_of(b.positions, b.cell, b.pbc)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(16 * y.shape[0], y.shape[1], generator=gen, dtype=y.dtype).to(dev)
    x = y.repeat(16, 1) + 2e-3 * noise
    steps = _moves(b.positions.to(dtype))
    cell = b.cell.to(dtype)
    monkeypatch.setenv(KERNEL_ENV, "torch")
    torch_bank = UncertaintyBank(x.to(dtype))
    for p in [*steps[:-1], steps[-1] - 0.01, steps[-1]]:
        ref = torch_bank(p, cell, b.pbc)
    monkeypatch.setenv(KERNEL_ENV, "triton")
    bank = UncertaintyBank(x.to(dtype))
    for p in steps[:-1]:
        bank(p, cell, b.pbc)  # a search, then the list built
    bank(steps[-1] - 0.01, cell, b.pbc)  # the first fused step: its constants made once
    launches.clear()
    with CountOps() as c:
        dh = bank(steps[-1], cell, b.pbc)
    # the flag's read is the sync (a copy to the host), not a launch
    ops = {k: v for k, v in c.by_name.items() if k not in NO_LAUNCH | {SYNC_READ}}
    total = sum(ops.values()) + sum(launches.values())
    assert launches == Counter({"_verlet_kernel": 1, "_lse_kernel": 1}), launches
    assert total <= 4, (sorted(ops.items()), launches)
    assert c.syncs + c.host_reads == 1, (c.syncs, c.host_reads)
    assert bank.neighbors.builds == 1 and bank.neighbors.reuses == 2
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dh, ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_fused_summary_equals_the_torch_path(dev, monkeypatch, dtype):
    gen = torch.Generator().manual_seed(2)
    dh = torch.randn(1500, generator=gen, dtype=torch.float64).to(dev, dtype)
    idx = torch.sort(torch.randint(0, 5, (1500,), generator=gen)).values.to(dev)
    for system_idx in (idx, idx[torch.randperm(1500, generator=gen).to(dev)]):  # sorted or not
        monkeypatch.setenv(KERNEL_ENV, "torch")
        ref = summaries.per_structure_summary(dh, system_idx, 5, threshold=0.3)
        monkeypatch.setenv(KERNEL_ENV, "triton")
        got = summaries.per_structure_summary(dh, system_idx, 5, threshold=0.3)
        for a, b in zip(got, ref, strict=True):
            assert a.dtype == dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, **_tol(dtype))
    assert got.max_dH[0] == dh[system_idx == 0].max()


def test_evaluate_step_in_four_launches(dev, monkeypatch, launches, one_thread):
    """UncertaintyBank.evaluate on two structures (the step of torch-sim's UncertaintyModel):
    descriptors, dH, its sign and the per-structure summaries: four launches, one sync."""
    cells = []
    for seed in (3, 4):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 1, 1)
        atoms.rattle(0.05, seed=seed)
        cells.append(atoms)
    b = AtomsBatch.from_ase(cells, device=dev)
    batch = (b.cell, b.pbc, b.system_idx)
    x = torch.rand(200, 63, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x = x.to(dev)
    steps = [*_moves(b.positions, 3), b.positions + 0.01]
    results = {}
    for kernel in ("torch", "triton"):
        monkeypatch.setenv(KERNEL_ENV, kernel)
        bank = UncertaintyBank(x)
        for p in steps[:-1]:
            bank.evaluate(p, *batch, threshold=-1.0)
        launches.clear()
        with CountOps() as c:
            results[kernel] = bank.evaluate(steps[-1], *batch, threshold=-1.0)
    ops = {k: v for k, v in c.by_name.items() if k not in NO_LAUNCH | {SYNC_READ}}
    assert sum(ops.values()) + sum(launches.values()) <= 4, (sorted(ops.items()), launches)
    assert launches["_summary_kernel"] == 1 and c.syncs + c.host_reads == 1
    for a, b in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fused_step_under_inference_mode(dev, monkeypatch, triton_kernels, launches):
    """torch-sim and MD drivers often step under inference mode: the list, its flag and the
    outputs of the fused step live across calls inside and outside it."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 1, 1)
    atoms.rattle(0.05, seed=9)
    b = AtomsBatch.from_ase(atoms, device=dev)
    x = torch.rand(100, 63, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x = x.to(dev)
    bank = UncertaintyBank(x)
    moves = _moves(b.positions, 5)
    with torch.inference_mode():
        for p in moves[:3]:
            bank(p, b.cell, b.pbc)
    got = bank(moves[3], b.cell, b.pbc)  # outside, on the flag made inside
    with torch.inference_mode():
        got_inside = bank(moves[4], b.cell, b.pbc)
    assert launches["_verlet_kernel"] == 3 and bank.neighbors.builds == 1
    fresh = UncertaintyBank(x, skin=None)
    torch.testing.assert_close(got, fresh(moves[3], b.cell, b.pbc), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_inside, fresh(moves[4], b.cell, b.pbc), rtol=1e-10, atol=1e-10)
