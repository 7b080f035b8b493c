"""GPU behaviour measured on a CPU (issue 19 items 3, 4, 8): kernel launches and host syncs of
the descriptors of a batch, out-of-memory retries, and the dense search's group size cap.

Ops and syncs are counted with a TorchDispatchMode (``tests/_opcount.py``): on CUDA every op
is a kernel launch and every sync-type op or host read waits for the device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _opcount import CountOps
from ase.build import bulk
from conftest import rattled_fcc

import quests_torch.descriptors as D
import quests_torch.neighbors.knearest as K
from quests_torch import AtomsBatch, get_descriptors
from quests_torch.neighbors.pairs import DENSE_MAX_GROUP, _dense_limit


def strained_cells(n: int, reps=(5, 5, 5)) -> list:
    """``n`` FCC Cu cells (5x5x5 conventional: 500 atoms), each with its own strain and rattle."""
    out = []
    for i in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * reps
        rng = np.random.default_rng(i)
        atoms.set_cell(atoms.cell * (1 + 0.01 * rng.normal(size=3)), scale_atoms=True)
        atoms.rattle(0.05, seed=i)
        out.append(atoms)
    return out


@pytest.fixture
def device_chunking(monkeypatch):
    """Chunks sized from the memory budget alone, as on CUDA (no cache-sized CPU blocks)."""
    monkeypatch.setattr(D, "_CPU_CHUNK", 1 << 40)
    monkeypatch.setattr(K, "PAIR_CPU_ROWS", 1 << 40)
    monkeypatch.setattr(K, "GRID_CPU_ROWS", 1 << 40)


# ------------------------------------------------------------------ item 8: no per-structure loop
def test_descriptor_ops_do_not_grow_with_the_number_of_cells(one_thread, device_chunking):
    """40 periodic 500-atom cells cost at most 1.5x the ops of 10 (before: 10,741 vs 2,761)
    and at most 10 syncs per call (before: 257 sync-type ops and 163 host reads)."""
    cells = strained_cells(40)
    get_descriptors(cells[:2], budget="64G")  # warm-up
    counts = {}
    for n in (10, 40):
        with CountOps() as c:
            x = get_descriptors(cells[:n], budget="64G")
        counts[n] = c
        assert x.shape == (500 * n, 63)
        assert c.syncs + c.host_reads <= 10, (n, c.syncs, c.host_reads)
    assert counts[40].ops <= 1.5 * counts[10].ops, (counts[10].ops, counts[40].ops)


def test_batched_cells_equal_one_by_one():
    """The batched grid (bins keyed by structure) gives each cell its own descriptors, also
    with cells of different occupancy groups in one batch."""
    cells = strained_cells(4) + strained_cells(2, (4, 4, 4)) + [rattled_fcc((1, 1, 1))]
    x = get_descriptors(cells)
    alone = torch.cat([get_descriptors(a) for a in cells])
    assert (x - alone).abs().max() <= 1e-12


# ------------------------------------------------------------------ item 3: out of memory
class FailOnce:
    """Wraps ``fn``: raises torch.OutOfMemoryError on the first call, records every call."""

    def __init__(self, fn, always: bool = False):
        self.fn, self.always, self.calls = fn, always, []

    def __call__(self, *args, **kwargs):
        self.calls.append(args)
        if self.always or len(self.calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return self.fn(*args, **kwargs)


def bins_of(call) -> int:
    """Centre bins asked of ``select_block(grid, bins, k, cutoff)``."""
    grid, bins = call[0], call[1]
    return len(range(*bins.indices(grid.centers.numel())))


@pytest.mark.parametrize("threads", [1, 2])
def test_grid_chunk_is_redone_in_halves_after_out_of_memory(monkeypatch, threads):
    atoms = rattled_fcc((5, 5, 5), seed=10)
    want = get_descriptors(atoms)
    spy = FailOnce(K.select_block)
    monkeypatch.setattr(K, "select_block", spy)
    if threads > 1:
        monkeypatch.setattr(K, "GRID_CPU_ROWS", 200)  # chunks of a few bins, in parallel
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = get_descriptors(atoms)
    finally:
        torch.set_num_threads(old)
    assert (got - want).abs().max() == 0
    first = bins_of(spy.calls[0])
    if threads == 1:  # one chunk of every bin, redone in halves
        assert [bins_of(c) for c in spy.calls[1:3]] == [first // 2, first // 2]
    else:  # the parallel path redoes the failed chunk alone, once the others are done
        chunks = {c[1].start for c in spy.calls}
        assert len(chunks) > 2 and len(spy.calls) == len(chunks) + 1
        assert spy.calls[-1][1] == spy.calls[0][1]


def test_grid_gradients_after_out_of_memory(monkeypatch):
    b = AtomsBatch.from_ase(rattled_fcc((3, 3, 3), seed=12))

    def grads():
        pos = b.positions.clone().requires_grad_(True)
        x = D.descriptors_from_tensors(pos, b.cell, b.pbc, b.system_idx, search="grid")
        (x * x).sum().backward()
        return x.detach(), pos.grad

    x0, g0 = grads()
    spy = FailOnce(K.select_block)
    monkeypatch.setattr(K, "select_block", spy)
    x1, g1 = grads()
    assert len(spy.calls) >= 3
    assert (x1 - x0).abs().max() == 0 and (g1 - g0).abs().max() <= 1e-14


def test_pair_chunk_is_redone_after_out_of_memory(monkeypatch):
    cells = [rattled_fcc((1, 1, 1), seed=s) for s in range(40)]  # 160 atoms, one 512 chunk
    want = get_descriptors(cells, search="pairs")
    spy = FailOnce(D._environment_descriptors)
    monkeypatch.setattr(D, "_environment_descriptors", spy)
    got = get_descriptors(cells, search="pairs")
    assert (got - want).abs().max() == 0
    assert [c[0].shape[0] for c in spy.calls[:3]] == [160, 80, 80]


def test_out_of_memory_gives_up_below_the_floor(monkeypatch):
    spy = FailOnce(K.select_block, always=True)
    monkeypatch.setattr(K, "select_block", spy)
    with pytest.raises(torch.OutOfMemoryError, match=r"even with chunks of 1 item.*`budget`"):
        get_descriptors(rattled_fcc((5, 5, 5), seed=10))
    assert bins_of(spy.calls[-1]) == 1
    spy = FailOnce(D._environment_descriptors, always=True)
    monkeypatch.setattr(D, "_environment_descriptors", spy)
    with pytest.raises(torch.OutOfMemoryError, match="halving stops below 1 MiB"):
        get_descriptors([rattled_fcc((1, 1, 1), seed=s) for s in range(40)], search="pairs")
    assert 1 < len(spy.calls) < 10  # gave up at the floor, not at one atom


# ------------------------------------------------------------------ item 4: nonzero below 2^31
def test_dense_group_stays_below_two_to_the_31():
    """budget / 26 candidates passes 2^31 above ~52 GiB (half an H200's free memory)."""
    cuda = torch.device("cuda")  # only sized, never allocated
    assert _dense_limit(cuda, 64 << 30, 8) == DENSE_MAX_GROUP < 2**31
    assert _dense_limit(cuda, 1 << 40, 4) == DENSE_MAX_GROUP
    assert _dense_limit(cuda, 1 << 30, 8) == (1 << 30) // 26  # below the cap: the budget
    assert _dense_limit(torch.device("cpu"), 1 << 40, 8) == 1 << 21  # CPU: cache-sized
