"""End-to-end tests of the ``quests-torch`` command through the real entry point.

Every call is a subprocess ``python -m quests_torch ...`` on small generated files; the
numbers it writes are compared with the library API on the same data.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import ase.io
import numpy as np
import pytest
import torch
from conftest import cli, rattled_fcc, read_json

import quests_torch as qt
from quests_torch import metrics
from quests_torch.screening import read_frame_table, screen_frames


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    ref = [rattled_fcc((2, 2, 2), stdev=0.03, seed=s) for s in range(3)]
    test = [rattled_fcc((2, 2, 2), a=3.60, stdev=0.09, seed=10 + s) for s in range(3)]
    traj = [rattled_fcc((2, 2, 2), stdev=0.02 + 0.025 * s, seed=20 + s) for s in range(8)]
    for name, frames in (("ref", ref), ("test", test), ("traj", traj)):
        ase.io.write(d / f"{name}.extxyz", frames, format="extxyz")
    # the library sees exactly what the CLI reads back (extxyz rounds positions)
    read = {name: ase.io.read(d / f"{name}.extxyz", ":") for name in ("ref", "test", "traj")}
    return d, read


def test_descriptors_entropy_from_structures_and_files(data):
    d, read = data
    x = qt.get_descriptors(read["ref"])
    cli("descriptors", "ref.extxyz", "-o", "ref.npz", cwd=d)
    cli("descriptors", "ref.extxyz", "-o", "ref.pt", "--json", "desc.json", cwd=d)
    assert read_json(d / "desc.json")["results"]["width"] == 63
    proc = cli("entropy", "ref.extxyz", "-o", "e_xyz.json", cwd=d)
    assert "entropy   H =" in proc.stdout and "diversity D =" in proc.stdout
    h_ref, d_ref = float(metrics.entropy(x)), float(metrics.diversity(x))
    for out, inp in (("e_xyz.json", None), ("e_npz.json", "ref.npz"), ("e_pt.json", "ref.pt")):
        if inp is not None:
            cli("entropy", inp, "-o", out, "-q", cwd=d)
        res = read_json(d / out)
        assert res["results"]["entropy"] == pytest.approx(h_ref, rel=1e-12)
        assert res["results"]["diversity"] == pytest.approx(d_ref, rel=1e-12)
        assert res["results"]["n"] == 96
        assert res["parameters"]["k"] == 32 and res["parameters"]["bandwidth"] == 0.015
        assert res["versions"]["quests_torch"] == qt.__version__


def test_dh_and_overlap_match_library(data):
    d, read = data
    xr, xt = qt.get_descriptors(read["ref"]), qt.get_descriptors(read["test"])
    if not (d / "ref.npz").exists():
        cli("descriptors", "ref.extxyz", "-o", "ref.npz", cwd=d)
    proc = cli(
        "dh", "test.extxyz", "-r", "ref.npz", "--save", "dh.npy", "--plot", "plots/t",
        "-o", "dh.json", cwd=d,
    )  # fmt: skip
    dh = metrics.delta_entropy(xt, xr)
    np.testing.assert_allclose(np.load(d / "dh.npy"), dh.numpy(), rtol=1e-12, atol=1e-12)
    res = read_json(d / "dh.json")["results"]
    assert res["novelty"] == pytest.approx(float((dh > 0).double().mean()))
    assert res["dH_max"] == pytest.approx(float(dh.max()), rel=1e-12)
    assert res["top"][0]["dH"] == pytest.approx(float(dh.max()), rel=1e-12)
    assert (d / "plots/t-dh-histogram.png").read_bytes()[:4] == b"\x89PNG"
    assert "novel (dH > 0)" in proc.stdout
    cli("overlap", "test.extxyz", "-r", "ref.extxyz", "-b", "0.02", "-o", "ov.json", cwd=d)
    res = read_json(d / "ov.json")["results"]
    assert res["overlap"] == pytest.approx(float(metrics.overlap(xt, xr, 0.02)))
    assert res["overlap_reverse"] == pytest.approx(float(metrics.overlap(xr, xt, 0.02)))


def test_learning_curve_and_bandwidth(data):
    d, read = data
    x = qt.get_descriptors(read["ref"])
    cli("learning-curve", "ref.extxyz", "--repeats", "2", "--plot", "lc", "-o", "lc.json", cwd=d)
    res = read_json(d / "lc.json")["results"]
    curve = metrics.entropy_learning_curve(x, repeats=2, generator=0)
    assert res["sizes"] == curve.sizes.tolist()
    np.testing.assert_allclose(res["entropy_mean"], curve.mean.numpy(), rtol=1e-12)
    fit = metrics.fit_entropy_asymptote(curve.sizes, curve.mean)
    assert res["fit"]["h_inf"] == pytest.approx(fit.h_inf, rel=1e-9)
    assert (d / "lc-learning-curve.png").exists()
    cli("bandwidth", "ref.extxyz", "-o", "bw.json", cwd=d)
    res = read_json(d / "bw.json")["results"]
    v = float(np.mean([a.get_volume() / len(a) for a in read["ref"]]))
    assert res["volume_per_atom"] == pytest.approx(v)
    assert res["bandwidth"] == pytest.approx(metrics.bandwidth(v, "gaussian"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["entropy", "missing.xyz"], "missing.xyz: no such file"),
        (["entropy", "ref.extxyz", "-i", "10:20"], "holds no structures"),
        (["entropy", "garbage.xyz"], "cannot read structures"),
        (["entropy", "ref.extxyz", "-b", "-1"], "expected a positive number"),
        (["dh", "test.extxyz", "-r", "ref16.npz", "-k", "32"], "differs from k=16"),
        (["dh", "ref.npz", "-r", "ref16.npz"], "descriptor parameters differ"),
        (["screen", "traj.extxyz"], "required: -r/--reference"),
    ],
)
def test_errors_one_line_nonzero_exit(data, args, message):
    d, _ = data
    (d / "garbage.xyz").write_text("this is\nnot a structure file\n")
    if not (d / "ref16.npz").exists():
        cli("descriptors", "ref.extxyz", "-k", "16", "-o", "ref16.npz", cwd=d)
    if not (d / "ref.npz").exists():
        cli("descriptors", "ref.extxyz", "-o", "ref.npz", cwd=d)
    proc = cli(*args, cwd=d, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_screen_matches_library_and_caches_reference(data):
    d, read = data
    common = ["-r", "ref.extxyz", "--batch-atoms", "64"]
    proc = cli(
        "screen", "traj.extxyz", *common, "--table", "s1.csv", "--extxyz", "s1.extxyz",
        "--plot", "s1", "-o", "s1.json", cwd=d,
    )  # fmt: skip
    assert "8 frames, 256 atoms" in proc.stdout
    res = read_json(d / "s1.json")
    assert res["inputs"]["reference"]["cache_hit"] is False
    table = read_frame_table(d / "s1.csv")
    lib = list(screen_frames(read["traj"], qt.get_descriptors(read["ref"]), batch_atoms=64))
    np.testing.assert_allclose(table["dH_max"], [f.dH_max for f in lib], rtol=1e-12)
    np.testing.assert_allclose(table["dH_mean"], [f.dH_mean for f in lib], rtol=1e-12)
    assert table["novel_fraction"].tolist() == [f.novel_fraction for f in lib]
    assert table["largest_cluster"].tolist() == [f.largest_cluster for f in lib]
    assert table["largest_cluster"][0] == 32 and table["novel_fraction"][-1] > 0.5
    assert res["results"]["n_frames"] == 8
    assert (d / "s1-timeline.png").exists()
    frames = ase.io.read(d / "s1.extxyz", ":")
    np.testing.assert_allclose(frames[3].arrays["dH"], lib[3].dh.numpy(), atol=1e-7)
    # the reference descriptors now come from the cache; -q prints nothing
    proc = cli(
        "screen", "traj.extxyz", *common, "--table", "s2.jsonl", "-o", "s2.json", "-q", cwd=d
    )
    assert proc.stdout == ""
    assert read_json(d / "s2.json")["inputs"]["reference"]["cache_hit"] is True
    t2 = read_frame_table(d / "s2.jsonl")
    assert all(np.array_equal(t2[c], table[c]) for c in table)


def test_screen_killed_and_resumed_equals_uninterrupted(data):
    d, _ = data
    args = ["screen", "traj.extxyz", "-r", "ref.extxyz", "--batch-atoms", "32", "-q"]
    cli(*args, "--table", "full.csv", "--extxyz", "full.extxyz", cwd=d)
    table, xyz, state = d / "cut.csv", d / "cut.extxyz", d / "cut.csv.state.json"
    # a pause between each batch's append and its commit: a kill there leaves an uncommitted tail
    slow_commit = (
        "import sys, time\n"
        "from quests_torch.cli import main\n"
        "from quests_torch.resume import ResumeState\n"
        "commit = ResumeState.commit\n"
        "def paused(self, frames):\n"
        "    time.sleep(1.0)\n"
        "    commit(self, frames)\n"
        "ResumeState.commit = paused\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    run = [sys.executable, "-c", slow_commit, *args, "--table", table.name, "--extxyz", xyz.name]
    env = {**os.environ, "QUESTS_TORCH_CACHE": str(d / "cache")}
    proc = subprocess.Popen(run, cwd=d, env=env)
    try:
        deadline = time.monotonic() + 120
        committed = None
        while time.monotonic() < deadline:  # wait for 2 committed frames ...
            try:
                st = json.loads(state.read_text())
            except (OSError, ValueError):
                st = None
            if st and st["frames_done"] >= 2:
                committed = st["bytes"]["table"]
                # ... and for the next batch appended but not yet committed (in the pause)
                if table.stat().st_size > committed and st["frames_done"] < 8:
                    break
            time.sleep(0.02)
        else:
            pytest.fail("screening did not reach the kill point")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    st = json.loads(state.read_text())
    assert not st["complete"] and 2 <= st["frames_done"] < 8
    assert table.stat().st_size > st["bytes"]["table"]  # an uncommitted tail was left
    out = cli(*args[:-1], "--table", table.name, "--extxyz", xyz.name, cwd=d)
    assert f"resumed: {st['frames_done']} frames were already done" in out.stdout
    assert table.read_bytes() == (d / "full.csv").read_bytes()
    assert xyz.read_bytes() == (d / "full.extxyz").read_bytes()
    assert read_frame_table(table)["frame"].tolist() == list(range(8))
    # restarting a finished run screens nothing and changes nothing
    out = cli(*args, "--table", table.name, "--extxyz", xyz.name, "-o", "again.json", cwd=d)
    res = read_json(d / "again.json")["results"]
    assert (res["frames_resumed"], res["frames_screened_now"]) == (8, 0)
    assert table.read_bytes() == (d / "full.csv").read_bytes()


def test_python_api_unaffected_by_cli_dtype(data):
    # float32 through the CLI stays within the documented float32 accuracy of the library
    d, read = data
    cli("entropy", "ref.extxyz", "--dtype", "float32", "-o", "e32.json", cwd=d)
    h32 = read_json(d / "e32.json")["results"]["entropy"]
    x = qt.get_descriptors(read["ref"], dtype=torch.float32)
    assert h32 == pytest.approx(float(metrics.entropy(x)), rel=1e-5)
