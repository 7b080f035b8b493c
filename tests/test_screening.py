"""Screening pipeline: clusters, per-frame summaries, resumable files (library API)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from conftest import rattled_fcc

import quests_torch as qt
from quests_torch.clusters import connected_components, largest_cluster
from quests_torch.io import cached_descriptors, load_descriptors, save_descriptors
from quests_torch.metrics import delta_entropy
from quests_torch.screening import (
    FRAME_COLUMNS,
    read_frame_table,
    screen_frames,
    screen_trajectory,
)
from quests_torch.structures import AtomsBatch


def test_connected_components_small_graph():
    # 0-1-2 chain, 3-4 pair (edge given one way), 5 isolated, 6-7-8 triangle
    src = torch.tensor([0, 1, 4, 6, 7, 8])
    dst = torch.tensor([1, 2, 3, 7, 8, 6])
    labels = connected_components(9, src, dst)
    assert labels.tolist() == [0, 0, 0, 3, 3, 5, 6, 6, 6]


def test_connected_components_long_chain_converges():
    n = 1000
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    labels = connected_components(n, perm[:-1], perm[1:])  # one shuffled path
    assert torch.all(labels == 0)


def _seed_in_gas(
    seed_reps: int, box: float, n_gas: int, shift: np.ndarray, rng_seed: int = 0
) -> tuple[Atoms, int]:
    """A perfect FCC seed (wrapped across the periodic box) plus isolated gas atoms."""
    seed = bulk("Cu", "fcc", a=3.61, cubic=True) * ((seed_reps,) * 3)
    pos = seed.positions + shift
    rng = np.random.default_rng(rng_seed)
    gas: list[np.ndarray] = []
    cell = np.eye(3) * box

    def min_image_dist(p, others):
        d = others - p
        d -= box * np.round(d / box)
        return np.sqrt((d**2).sum(1)).min() if len(others) else np.inf

    while len(gas) < n_gas:
        p = rng.uniform(0, box, 3)
        if min_image_dist(p, pos) > 3.5 and min_image_dist(p, np.array(gas).reshape(-1, 3)) > 3.5:
            gas.append(p)
    atoms = Atoms(
        "Cu" * (len(pos) + n_gas),
        positions=np.concatenate([pos, np.array(gas)]),
        cell=cell,
        pbc=True,
    )
    atoms.wrap()
    return atoms, len(pos)


def test_largest_cluster_seed_in_gas_across_periodic_boundary():
    # frame 0: a 32-atom seed centred on a box corner (split by the periodic boundary),
    # frame 1: a 108-atom seed in the middle; gas atoms > 3.5 Å from everything
    a0, n0 = _seed_in_gas(2, 22.0, 40, shift=np.full(3, -3.0), rng_seed=1)
    a1, n1 = _seed_in_gas(3, 24.0, 30, shift=np.full(3, 6.0), rng_seed=2)
    batch = AtomsBatch.from_ase([a0, a1])
    mask = torch.ones(batch.n_atoms, dtype=torch.bool)  # every atom is a node
    sizes, labels = largest_cluster(batch.positions, batch.cell, batch.pbc, batch.system_idx, mask)
    assert (n0, n1) == (32, 108)
    assert sizes.tolist() == [32, 108]
    # seed atoms share one label; every gas atom is its own cluster
    assert torch.unique(labels[:n0]).numel() == 1
    gas0 = labels[n0 : len(a0)]
    assert torch.equal(gas0, torch.arange(n0, len(a0)))
    # without periodic images the corner seed falls apart into pieces
    open_batch = AtomsBatch.from_ase([a0.copy()])
    open_batch.pbc[:] = False
    m = torch.ones(open_batch.n_atoms, dtype=torch.bool)
    s_open, _ = largest_cluster(
        open_batch.positions, open_batch.cell, open_batch.pbc, open_batch.system_idx, m
    )
    assert int(s_open[0]) < 32
    # unselected atoms are no nodes: dropping one seed atom of a chain-free seed keeps 31
    mask[0] = False
    sizes, labels = largest_cluster(batch.positions, batch.cell, batch.pbc, batch.system_idx, mask)
    assert sizes.tolist() == [31, 108] and int(labels[0]) == -1


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.7, 1.0])
def test_clusters_from_the_selected_atoms_equal_those_of_all_pairs(fraction):
    """Only the selected atoms are searched: the labels equal those of every pair within the
    cutoff filtered to selected ends (the search before), for any selection, including a
    structure with no selected atom and molecules without a cell."""
    from quests_torch.neighbors import find_neighbor_pairs

    frames = [rattled_fcc((3, 3, 3), seed=s) for s in range(3)]
    frames.append(Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]))
    batch = AtomsBatch.from_ase(frames)
    gen = torch.Generator().manual_seed(int(fraction * 10))
    mask = torch.rand(batch.n_atoms, generator=gen) < fraction
    mask[batch.system_idx == 1] = False  # a structure with nothing selected
    sizes, labels = largest_cluster(batch.positions, batch.cell, batch.pbc, batch.system_idx,
                                    mask, 2.7)  # fmt: skip
    pairs = find_neighbor_pairs(batch.positions, batch.cell, batch.pbc, batch.system_idx,
                                2.7 + 1e-9)  # fmt: skip
    keep = mask[pairs.center] & mask[pairs.neighbor]
    full = connected_components(batch.n_atoms, pairs.center[keep], pairs.neighbor[keep])
    assert torch.equal(labels, torch.where(mask, full, torch.full_like(full, -1)))
    expected = [int(torch.bincount(labels[(batch.system_idx == s) & mask]).max())
                if ((batch.system_idx == s) & mask).any() else 0 for s in range(4)]  # fmt: skip
    assert sizes.tolist() == expected and sizes[1] == 0


def test_screen_frames_crystal_covered_gas_novel():
    """A perfect crystal against itself: dH <= 0 everywhere, one cluster of every atom; a
    dilute gas: every atom novel, no cluster."""
    crystal = bulk("Cu", "fcc", a=3.61, cubic=True) * (3, 3, 3)
    ref = qt.get_descriptors(crystal)
    gas, _ = _seed_in_gas(1, 20.0, 60, shift=np.full(3, 100.0), rng_seed=3)
    gas = gas[4:]  # drop the 4-atom "seed": only isolated atoms remain
    out = list(screen_frames([crystal, gas, crystal], ref, batch_atoms=50))
    assert [f.frame for f in out] == [0, 1, 2]
    assert out[0].largest_cluster == 108 and out[0].novel_fraction == 0.0
    assert out[1].largest_cluster == 0 and out[1].novel_fraction == 1.0
    assert out[0].dH_max <= 0 and out[1].dH_mean > 10
    assert torch.all(out[1].cluster == -1)


def test_screen_frames_matches_metrics_and_batching():
    frames = [rattled_fcc((2, 2, 2), stdev=0.03 * (i + 1), seed=i) for i in range(5)]
    ref = qt.get_descriptors(frames[:1])
    full = delta_entropy(qt.get_descriptors(frames), ref)
    for batch_atoms in (1, 64, 100_000):
        out = list(screen_frames(frames, ref, batch_atoms=batch_atoms))
        dh = torch.cat([f.dh for f in out])
        torch.testing.assert_close(dh, full, rtol=1e-12, atol=1e-10)
        for f in out:
            assert f.dH_max == pytest.approx(float(f.dh.max()), rel=1e-12)
            assert f.dH_mean == pytest.approx(float(f.dh.mean()), rel=1e-12)
            assert f.novel_fraction == pytest.approx(float((f.dh > 0).double().mean()))


def test_screen_errors():
    ref = torch.zeros(4, 63, dtype=torch.float64)
    frame = rattled_fcc()
    with pytest.raises(ValueError, match="`reference` has 63 columns but k = 8"):
        list(screen_frames([frame], ref, k=8))
    with pytest.raises(ValueError, match="`cluster_cutoff` must be a finite number > 0"):
        list(screen_frames([frame], ref, cluster_cutoff=-1.0))
    with pytest.raises(ValueError, match="`reference` must be a non-empty"):
        list(screen_frames([frame], torch.zeros(0, 63)))


def _write_traj(path, n_frames=6):
    import ase.io

    frames = [rattled_fcc((2, 2, 2), stdev=0.02 + 0.04 * i, seed=i) for i in range(n_frames)]
    ase.io.write(path, frames, format="extxyz")
    return frames


def test_screen_trajectory_resume_and_refusal(tmp_path):
    traj = tmp_path / "traj.extxyz"
    _write_traj(traj)
    ref = qt.get_descriptors(rattled_fcc((2, 2, 2), stdev=0.02, seed=10))
    kwargs = dict(batch_atoms=64, extxyz=tmp_path / "dh.extxyz")
    res = screen_trajectory(traj, ref, tmp_path / "t.csv", **kwargs)
    assert res.frames_screened == 6 and res.frames_resumed == 0
    table = read_frame_table(tmp_path / "t.csv")
    assert list(table) == list(FRAME_COLUMNS) and table["frame"].tolist() == list(range(6))
    csv_bytes = (tmp_path / "t.csv").read_bytes()
    xyz_bytes = (tmp_path / "dh.extxyz").read_bytes()
    # fake an interruption after 2 committed frames with a torn tail, then resume
    state_file = tmp_path / "t.csv.state.json"
    state = json.loads(state_file.read_text())
    lines = csv_bytes.splitlines(keepends=True)
    committed = len(b"".join(lines[:3]))  # header + 2 frames
    state.update(frames_done=2, complete=False)
    state["bytes"]["table"] = committed
    state["sha256"]["table"] = hashlib.sha256(csv_bytes[:committed]).hexdigest()
    import ase.io

    first_two = ase.io.read(tmp_path / "dh.extxyz", ":2")
    import io

    buf = io.StringIO()
    ase.io.write(buf, first_two, format="extxyz")
    state["bytes"]["extxyz"] = len(buf.getvalue().encode())
    state["sha256"]["extxyz"] = hashlib.sha256(buf.getvalue().encode()).hexdigest()
    state_file.write_text(json.dumps(state))
    (tmp_path / "t.csv").write_bytes(csv_bytes[: committed + 17])  # a torn, uncommitted row
    res2 = screen_trajectory(traj, ref, tmp_path / "t.csv", **kwargs)
    assert (res2.frames_resumed, res2.frames_screened) == (2, 4)
    assert (tmp_path / "t.csv").read_bytes() == csv_bytes
    assert (tmp_path / "dh.extxyz").read_bytes() == xyz_bytes
    # per-atom dH written for OVITO equals the library's
    frames_dh = ase.io.read(tmp_path / "dh.extxyz", ":")
    lib = list(screen_frames(ase.io.read(traj, ":"), ref, batch_atoms=64))
    for f, g in zip(frames_dh, lib, strict=True):
        np.testing.assert_allclose(f.arrays["dH"], g.dh.numpy(), atol=1e-7)  # %.8f in extxyz
    # a different screening into the same table is refused, --overwrite starts afresh
    with pytest.raises(ValueError, match="different screening"):
        screen_trajectory(traj, ref, tmp_path / "t.csv", threshold=1.0, **kwargs)
    res3 = screen_trajectory(traj, ref, tmp_path / "t.csv", threshold=1.0, overwrite=True)
    assert res3.frames_screened == 6


def test_screen_trajectory_resumed_twice_without_extxyz(tmp_path, monkeypatch):
    """Two interruptions in a row: the second resume must find a valid state (a table without
    extxyz once lost the extxyz digest from its state on the first resume)."""
    from quests_torch.resume import ResumeState

    traj = tmp_path / "traj.extxyz"
    _write_traj(traj, n_frames=8)
    ref = qt.get_descriptors(rattled_fcc((2, 2, 2), stdev=0.02, seed=10))
    commit = ResumeState.commit

    def interrupted(self, frames):
        commit(self, frames)
        raise KeyboardInterrupt  # right after one committed batch

    monkeypatch.setattr(ResumeState, "commit", interrupted)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            screen_trajectory(traj, ref, tmp_path / "t.csv", batch_atoms=32)
    monkeypatch.setattr(ResumeState, "commit", commit)
    res = screen_trajectory(traj, ref, tmp_path / "t.csv", batch_atoms=32)
    assert (res.frames_resumed, res.frames_screened) == (2, 6)
    full = screen_trajectory(traj, ref, tmp_path / "full.csv", batch_atoms=32)
    assert (tmp_path / "t.csv").read_bytes() == (tmp_path / "full.csv").read_bytes()
    assert full.frames_screened == 8


def test_descriptor_file_roundtrip_and_cache(tmp_path):
    frames = [rattled_fcc(seed=1), rattled_fcc(seed=2)]
    x = qt.get_descriptors(frames)
    for name in ("d.npz", "d.pt"):
        save_descriptors(tmp_path / name, x, [32, 32], k=32, cutoff=5.0)
        ds = load_descriptors(tmp_path / name)
        assert (ds.k, ds.cutoff, ds.dtype) == (32, 5.0, "float64")
        assert torch.equal(ds.x, x) and ds.n_atoms.tolist() == [32, 32]
    import ase.io

    ase.io.write(tmp_path / "s.extxyz", frames)
    kw = dict(k=32, cutoff=5.0, cache_dir=tmp_path / "cache")
    ds1, hit1 = cached_descriptors(tmp_path / "s.extxyz", **kw)
    ds2, hit2 = cached_descriptors(tmp_path / "s.extxyz", **kw)
    assert (hit1, hit2) == (False, True) and torch.equal(ds1.x, ds2.x)
    _, hit3 = cached_descriptors(tmp_path / "s.extxyz", **{**kw, "cutoff": 4.0})
    assert not hit3  # another cutoff is another cache entry
    ase.io.write(tmp_path / "s.extxyz", frames[:1])  # new content: a miss
    ds4, hit4 = cached_descriptors(tmp_path / "s.extxyz", **kw)
    assert not hit4 and ds4.x.shape[0] == 32


@pytest.mark.parametrize("gap, expected", [(2.9, 2), (3.0, 2), (3.001, 1)])
def test_cluster_edges_are_at_most_the_cutoff(gap, expected):
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [gap, 0, 0]], cell=[8.0, 8.0, 8.0], pbc=False)
    b = AtomsBatch.from_ase(atoms)
    mask = torch.ones(2, dtype=torch.bool)
    sizes, _ = largest_cluster(b.positions, b.cell, b.pbc, b.system_idx, mask, cutoff=3.0)
    assert sizes.tolist() == [expected]


def test_batches_are_built_in_the_prefetch_thread_and_errors_handed_on():
    """The next batch is parsed and assembled (and on CUDA copied on a side stream) by the
    prefetch thread while the current one computes; a build's ValueError reaches the
    consumer in place of the batch, so it is raised where the frames are named."""
    import threading

    from quests_torch.screen_io import prefetched, staged_batches
    from quests_torch.screening import ScreenTimings

    built_in: list[str] = []

    def build(chunk):
        built_in.append(threading.current_thread().name)
        if chunk == ["bad"]:
            raise ValueError("`atoms[0]` is empty")
        return AtomsBatch.from_ase(chunk)

    timings = ScreenTimings()
    frames = [[rattled_fcc((1, 1, 1), seed=1)], ["bad"], [rattled_fcc((1, 1, 1), seed=2)]]
    got = list(prefetched(staged_batches(iter(frames), build, torch.device("cpu"), timings)))
    assert built_in == ["quests-torch-prefetch"] * 3 and timings.batching > 0
    assert isinstance(got[1][1], ValueError) and got[1][0] == ["bad"]
    batch = got[2][1].take(torch.device("cpu"))
    assert torch.equal(batch.positions, AtomsBatch.from_ase(frames[2]).positions)


@pytest.mark.cuda
def test_staged_batch_on_cuda_equals_a_direct_copy():
    from quests_torch.screen_io import staged_batches

    frames = [[rattled_fcc((2, 2, 2), seed=s)] for s in range(3)]
    dev = torch.device("cuda")
    staged = list(staged_batches(iter(frames), lambda c: AtomsBatch.from_ase(c, device=dev), dev))
    for chunk, st in staged:
        batch = st.take(dev)
        assert st.ready is not None and batch.positions.device.type == "cuda"
        assert torch.equal(batch.positions.cpu(), AtomsBatch.from_ase(chunk).positions)
