"""Distributed kernel sums, metrics, descriptors and screening (quests_torch.distributed).

Two gloo processes on the CPU are started once per module (``torch.multiprocessing.spawn``,
rendezvous through a FileStore in ``tmp_path``); each computes everything and saves what it
got, and the tests compare both ranks' results with one process. The CLI is run once under
``python -m torch.distributed.run --nproc-per-node 2``.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from conftest import load_reference, rattled_fcc

import quests_torch as qt
from quests_torch import distributed as qd
from quests_torch import metrics
from quests_torch.screening import read_frame_table, screen_trajectory

H = 0.015
H_VEC = [0.01, 0.015, 0.03]
RTOL = 1e-12
WORLD = 2


# ------------------------------------------------------------------- data shared by both sides


def _data(folder: Path) -> dict:
    """Small inputs written to ``folder`` (the workers read the same files)."""
    f = load_reference("kde")
    solid, liquid, query = f["x_solid"], f["x_liquid"], f["x_query"]
    x = np.concatenate([solid[::2], liquid[::2]])  # 768 environments
    far = query[:5] + 1.0  # dH ~ 1e5 nats: the exact shifted path
    x_far = np.concatenate([x[:300], far])
    y = np.concatenate([query, far])
    np.save(folder / "x.npy", x)
    np.save(folder / "x_far.npy", x_far)
    np.save(folder / "y.npy", y)
    structures = [rattled_fcc((2, 2, 2), stdev=0.05, seed=s) for s in range(3)]
    structures.append(rattled_fcc((1, 1, 2), stdev=0.05, seed=3))
    alloy = rattled_fcc((2, 2, 1), stdev=0.05, seed=4)
    alloy.numbers[::3] = 28  # Ni in Cu: multicomponent blocks
    structures.append(alloy)
    ase.io.write(folder / "structures.extxyz", structures, format="extxyz")
    ref = [rattled_fcc((2, 2, 2), stdev=0.03, seed=40 + s) for s in range(2)]
    traj = [rattled_fcc((2, 2, 2), stdev=0.02 + 0.02 * s, seed=50 + s) for s in range(7)]
    ase.io.write(folder / "ref.extxyz", ref, format="extxyz")
    ase.io.write(folder / "traj.extxyz", traj, format="extxyz")
    return {"x": x, "x_far": x_far, "y": y}


def _run_all(folder: Path, out: dict) -> None:
    """What both the workers (distributed) and the test process (single) compute."""
    x = np.load(folder / "x.npy")
    x_far = np.load(folder / "x_far.npy")
    y = np.load(folder / "y.npy")
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    out["entropy"] = qd.entropy(xt, H)
    out["entropy_small_tiles"] = qd.entropy(xt, H, tile_size=192)
    out["entropy_rows"] = qd.entropy(xt, H, shard="rows")
    out["entropy_cols"] = qd.entropy(xt, H, shard="cols")
    out["entropy_hvec"] = qd.entropy(xt, H_VEC)
    out["entropy_far"] = qd.entropy(torch.from_numpy(x_far), H, tile_size=96)
    out["entropy_far_cols"] = qd.entropy(torch.from_numpy(x_far), H, shard="cols")
    out["entropy_f32"] = qd.entropy(xt.float(), H)
    out["entropy_memmap"] = qd.entropy(np.load(folder / "x.npy", mmap_mode="r"), H)
    out["diversity"] = qd.diversity(xt, H)
    out["diversity_hvec"] = qd.diversity(xt, H_VEC)
    out["dh"] = qd.delta_entropy(yt, xt, H)
    out["dh_cols"] = qd.delta_entropy(yt, xt, H, shard="cols")
    out["dh_hvec_cols"] = qd.delta_entropy(yt, xt, H_VEC, shard="cols", tile_size=160)
    log_w = torch.linspace(-3.0, 0.5, x.shape[0], dtype=torch.float64)
    out["lks_weights_rows"] = qd.log_kernel_sum(yt, xt, H, log_weights=log_w, shard="rows")
    out["lks_weights_cols"] = qd.log_kernel_sum(yt, xt, H, log_weights=log_w, shard="cols")
    out["lks_self_weights"] = qd.log_kernel_sum(xt, xt, H, log_weights=log_w)
    out["overlap"] = qd.overlap(yt, xt, H)
    out["overlap_back"] = qd.overlap(xt, yt, H, threshold=-1.0)
    s = qd.dataset_summary(xt, H, other=yt)
    out["summary"] = torch.stack([s.entropy, s.diversity, s.overlap, s.overlap_other])
    curve = qd.entropy_learning_curve(xt, H, sizes=[10, 50, 200, 400, 768], generator=3)
    out["curve_values"] = curve.values
    # sampled estimates (issue 16): every rank draws the same rows
    s = qd.dataset_summary(xt, H, other=yt, rows=200, generator=5)
    out["summary_rows"] = torch.tensor(
        [v for e in s.estimates.values() for v in (e.value, e.stderr)], dtype=torch.float64
    )
    s = qd.dataset_summary(xt, H, rows=200)  # no seed: rank 0's seed, broadcast
    out["summary_rows_unseeded"] = torch.tensor([s.estimates["entropy"].value])
    curve = qd.entropy_learning_curve(xt, H, sizes=[50, 400, 768], generator=3, rows=100)
    out["curve_rows"] = torch.cat([curve.values.flatten(), curve.stderr.flatten()])
    frames = ase.io.read(folder / "structures.extxyz", ":")
    out["descriptors"] = qd.get_descriptors(frames)
    out["descriptors_mc"] = qd.get_descriptors(frames, multicomponent=True)
    out["descriptors_batch"] = qd.get_descriptors(qt.AtomsBatch.from_ase(frames))


def _worker(rank: int, folder: str, store: str) -> None:
    torch.set_num_threads(1)
    folder = Path(folder)
    torch.distributed.init_process_group(
        "gloo",
        store=torch.distributed.FileStore(store, WORLD),
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=90),
    )
    try:
        out: dict = {"world": qd.world_size(), "rank": qd.rank()}
        # the learning curve: small subsets dealt out whole, the larger ones shared
        qd.curves._COLLECTIVE_PAIRS = 30_000
        _run_all(folder, out)
        out.update(_screen_with_interrupt(folder, rank))
    finally:
        torch.distributed.destroy_process_group()
    torch.save(out, folder / f"rank{rank}.pt")


def _screen_with_interrupt(folder: Path, rank: int) -> dict:
    """Rank 1 fails after its first committed batch; a rerun resumes; a third run is idle."""
    from quests_torch import screening

    ref = qd.get_descriptors(ase.io.read(folder / "ref.extxyz", ":"))
    kw = dict(extxyz=folder / "d.extxyz", batch_atoms=64)
    original = screening._screen_batches
    if rank == 1:

        def failing(*args, **kwargs):
            for i, batch in enumerate(original(*args, **kwargs)):
                if i == 1:
                    raise KeyboardInterrupt("simulated interrupt")  # not an Exception
                yield batch

        screening._screen_batches = failing
    failed = ""
    try:
        qd.screen_trajectory(folder / "traj.extxyz", ref, folder / "d.csv", **kw)
    except BaseException as exc:  # rank 1: the interrupt; rank 0: "failed on another rank"
        failed = f"{type(exc).__name__}: {exc}"
    screening._screen_batches = original
    parts = sorted(p.name for p in (folder / "d.csv.parts").iterdir())
    res = qd.screen_trajectory(folder / "traj.extxyz", ref, folder / "d.csv", **kw)
    again = qd.screen_trajectory(folder / "traj.extxyz", ref, folder / "d.csv", **kw)
    return {
        "failed": failed,
        "parts_after_failure": parts,
        "resumed": (res.frames_screened, res.frames_resumed),
        "again": (again.frames_screened, again.frames_resumed),
        "parts_left": (folder / "d.csv.parts").exists(),
        "table_rows": res.frames["frame"].tolist(),
        "reference": ref,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    _data(folder)
    torch.multiprocessing.spawn(
        _worker, args=(str(folder), str(folder / "store")), nprocs=WORLD, join=True
    )
    got = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    single: dict = {}
    _run_all(folder, single)
    return folder, got, single


# ------------------------------------------------------------------- helpers without processes


def test_shard_range_covers_everything_once():
    for n in (0, 1, 5, 7, 100):
        for w in (1, 2, 3, 8):
            blocks = [qd.shard_range(n, r, w) for r in range(w)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))
            sizes = [b - a for a, b in blocks]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="`rank_` must lie"):
        qd.shard_range(4, 2, 2)


def test_owned_blocks_partition_and_balance():
    for n_blocks in (1, 2, 5, 8, 33):
        for w in (1, 2, 3, 4):
            owned = np.stack([qd.kernels._owned_blocks(n_blocks, w, r) for r in range(w)])
            assert (owned.sum(0) == 1).all()  # every row block exactly once
            tiles = [(n_blocks - np.nonzero(o)[0]).sum() for o in owned]
            if n_blocks >= 2 * w:
                assert max(tiles) - min(tiles) <= n_blocks + 1  # at most one pair apart


def _positions(total: int, index: str) -> list[int]:
    return list(range(total)[slice(*[int(v) if v else None for v in index.split(":")])])


def test_structure_blocks_and_frame_index():
    blocks = qd.descriptors._structure_blocks([32, 32, 4, 200, 8], 2)
    assert blocks[0][0] == 0 and blocks[-1][1] == 5 and blocks[0][1] == blocks[1][0]
    for index in (":", "2:9:3", "::-1", "-4:", "5:1:-2"):
        sel = range(10)[slice(*[int(v) if v else None for v in index.split(":")])]
        for w in (1, 2, 3):
            got = []
            for r in range(w):
                a, b = qd.shard_range(len(sel), r, w)
                if b > a:
                    got += _positions(10, qd.screening._index_of(sel[a:b]))
            assert got == list(sel), (index, w)


def test_single_process_is_a_no_op(tmp_path):
    assert (qd.is_distributed(), qd.world_size(), qd.rank()) == (False, 1, 0)
    assert qd.init_from_env() is False  # no WORLD_SIZE: nothing to do
    x = torch.randn(50, 6, dtype=torch.float64) * 0.02
    assert torch.equal(qd.entropy(x, H, shard="cols"), metrics.entropy(x, H))
    assert torch.equal(qd.delta_entropy(x[:7], x, H), metrics.delta_entropy(x[:7], x, H))
    with pytest.raises(ValueError, match="`shard` must be one of"):
        qd.entropy(x, H, shard="diagonal")
    # differentiable like the single-process metrics (no collectives involved)
    xg, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    qd.entropy(xg, H).backward()
    metrics.entropy(xm, H).backward()
    assert torch.isfinite(xg.grad).all()
    assert torch.equal(xg.grad, xm.grad)


# ------------------------------------------------------------------- two gloo ranks


def _close(a, b, rtol=RTOL):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape
    scale = b.abs().clamp_min(1.0)  # dH near 0: compare on the nats scale
    err = float(((a - b).abs() / scale).max())
    assert err <= rtol, err


METRICS = [
    "entropy",
    "entropy_small_tiles",
    "entropy_rows",
    "entropy_cols",
    "entropy_hvec",
    "entropy_far",
    "entropy_far_cols",
    "entropy_memmap",
    "diversity",
    "diversity_hvec",
    "dh",
    "dh_cols",
    "dh_hvec_cols",
    "lks_weights_rows",
    "lks_weights_cols",
    "lks_self_weights",
    "summary",
    "summary_rows",
    "curve_rows",
]


@pytest.mark.parametrize("name", METRICS)
def test_two_ranks_match_one_process(runs, name):
    _, got, single = runs
    assert got[0]["world"] == WORLD and got[1]["rank"] == 1
    for r in range(WORLD):
        _close(got[r][name], single[name])
    assert torch.equal(got[0][name], got[1][name])  # every rank holds the same result


def test_two_ranks_float32_overlap_and_learning_curve(runs):
    _, got, single = runs
    for r in range(WORLD):
        _close(got[r]["entropy_f32"], single["entropy_f32"], rtol=1e-6)
        assert got[r]["overlap"] == single["overlap"]
        assert got[r]["overlap_back"] == single["overlap_back"]
        _close(got[r]["curve_values"], single["curve_values"])
    # far rows really took the exact shifted path and stay finite
    assert torch.isfinite(single["dh"]).all() and single["dh"].max() > 1e4
    assert 0.0 < float(single["overlap"]) < 1.0


def test_two_ranks_sample_the_same_rows_without_a_seed(runs):
    _, got, _ = runs
    assert torch.equal(got[0]["summary_rows_unseeded"], got[1]["summary_rows_unseeded"])


def test_two_ranks_descriptors_in_order(runs):
    _, got, single = runs
    for key in ("descriptors", "descriptors_mc", "descriptors_batch"):
        for r in range(WORLD):
            assert got[r][key].shape == single[key].shape
            torch.testing.assert_close(got[r][key], single[key], rtol=1e-13, atol=1e-13)
    assert single["descriptors_mc"].shape[1] == 3 * 63


def test_two_ranks_screening_resumes_and_merges(runs):
    folder, got, _ = runs
    assert "simulated interrupt" in got[1]["failed"]
    assert "failed on another rank" in got[0]["failed"]
    # rank 1 left a part with a resume state; rank 0 finished its part
    assert "rank00001-of-00002.csv.state.json" in got[0]["parts_after_failure"]
    # the rerun: frames 0-2 (rank 0) and rank 1's committed batch (frames 3-4) are kept,
    # only frames 5-6 are screened again
    assert got[0]["resumed"] == got[1]["resumed"] == (2, 5)
    assert got[0]["again"] == (0, 7)  # a finished screening is not redone
    assert got[0]["parts_left"] is False
    assert got[0]["table_rows"] == list(range(7))
    # the merged table equals one process's, frame by frame
    ref = qt.get_descriptors(ase.io.read(folder / "ref.extxyz", ":"))
    one = screen_trajectory(
        folder / "traj.extxyz",
        ref,
        folder / "one.csv",
        extxyz=folder / "one.extxyz",
        batch_atoms=64,
    )
    merged = read_frame_table(folder / "d.csv")
    for c in ("frame", "n_atoms", "largest_cluster"):
        assert merged[c].tolist() == one.frames[c].tolist()
    np.testing.assert_allclose(merged["dH_max"], one.frames["dH_max"], rtol=RTOL)
    np.testing.assert_allclose(merged["dH_mean"], one.frames["dH_mean"], rtol=RTOL)
    assert merged["novel_fraction"].tolist() == one.frames["novel_fraction"].tolist()
    frames = ase.io.read(folder / "d.extxyz", ":")
    assert [a.info["frame"] for a in frames] == list(range(7))
    # a single-process run of the same screening (same reference values) finds it complete
    again = screen_trajectory(
        folder / "traj.extxyz",
        got[0]["reference"],
        folder / "d.csv",
        extxyz=folder / "d.extxyz",
        batch_atoms=64,
    )
    assert (again.frames_screened, again.frames_resumed) == (0, 7)


# ------------------------------------------------------------------- the CLI under torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "QUESTS_TORCH_CACHE": str(folder / "cache"),
        "QUESTS_TORCH_DIST_BACKEND": "gloo",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(WORLD),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "quests_torch",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_screen_under_torchrun(runs):
    folder, _, _ = runs
    proc = _torchrun(
        folder, "screen", "traj.extxyz", "-r", "ref.extxyz", "--table", "cli.jsonl",
        "--batch-atoms", "64", "--device", "cpu", "-o", "cli.json",
    )  # fmt: skip
    assert proc.stdout.count("7 frames, 224 atoms") == 1  # rank 0 alone prints
    res = json.loads((folder / "cli.json").read_text())
    assert res["results"]["n_frames"] == 7 and res["results"]["frames_screened_now"] == 7
    merged = read_frame_table(folder / "cli.jsonl")
    ref = qt.get_descriptors(ase.io.read(folder / "ref.extxyz", ":"))
    one = screen_trajectory(folder / "traj.extxyz", ref, folder / "one-cli.csv", batch_atoms=64)
    np.testing.assert_allclose(merged["dH_max"], one.frames["dH_max"], rtol=RTOL)
    assert merged["largest_cluster"].tolist() == one.frames["largest_cluster"].tolist()


def test_cli_entropy_under_torchrun(runs):
    folder, _, _ = runs
    proc = _torchrun(folder, "entropy", "structures.extxyz", "--device", "cpu", "-o", "h.json")
    assert proc.stdout.count("entropy   H =") == 1
    res = json.loads((folder / "h.json").read_text())["results"]
    x = qt.get_descriptors(ase.io.read(folder / "structures.extxyz", ":"))
    _close(res["entropy"], metrics.entropy(x, H))
    _close(res["diversity"], metrics.diversity(x, H))
    assert res["n"] == x.shape[0]
