"""Command-line parity with upstream ``quests`` (issue 17), through the real entry point.

``dh --approx N`` (upstream ``approx_dH``), ``entropy --per-environment`` (upstream
``metrics``) and ``generate`` (upstream ``mcmc``): exit codes, files written, and values equal
to the library calls on the same (small) data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from conftest import rattled_fcc

import quests_torch as qt
from quests_torch import metrics


def cli(*args, cwd: Path, check: bool = True):
    env = {**os.environ, "QUESTS_TORCH_CACHE": str(cwd / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "quests_torch", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr}")
    return proc


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    ref = [rattled_fcc((2, 2, 2), stdev=0.03, seed=s) for s in range(3)]
    test = [rattled_fcc((2, 2, 2), a=3.60, stdev=0.09, seed=10 + s) for s in range(2)]
    for name, frames in (("ref", ref), ("test", test)):
        ase.io.write(d / f"{name}.extxyz", frames, format="extxyz")
    read = {name: ase.io.read(d / f"{name}.extxyz", ":") for name in ("ref", "test")}
    return d, read


# --------------------------------------------------------------------------------------------
# dh --approx N
# --------------------------------------------------------------------------------------------


def test_dh_approx_matches_library_and_times_both(data):
    d, read = data
    xr, xt = qt.get_descriptors(read["ref"]), qt.get_descriptors(read["test"])
    proc = cli(
        "dh", "test.extxyz", "-r", "ref.extxyz", "--approx", "5", "--save", "a.npy",
        "--plot", "a", "-o", "a.json", cwd=d,
    )  # fmt: skip
    approx = metrics.approx_delta_entropy(xt, xr, n=5).numpy()
    exact = metrics.delta_entropy(xt, xr).numpy()
    np.testing.assert_allclose(np.load(d / "a.npy"), approx, rtol=1e-12, atol=1e-12)
    res = _json(d / "a.json")
    r = res["results"]
    assert r["approx"] == 5 and res["parameters"]["approx"] == 5
    assert r["dH_max"] == pytest.approx(float(approx.max()), rel=1e-12)
    assert r["novelty"] == pytest.approx(float((approx > 0).mean()))
    assert r["novelty_exact"] == pytest.approx(float((exact > 0).mean()))
    assert r["dH_approx_minus_exact_max"] == pytest.approx(float((approx - exact).max()))
    assert r["dH_approx_minus_exact_mean"] >= 0.0
    assert res["timings"]["seconds_approx"] >= 0 and res["timings"]["seconds_exact"] >= 0
    assert (d / "a-dh-histogram.png").read_bytes()[:4] == b"\x89PNG"
    assert "approximate dH (5 nearest references)" in proc.stdout
    assert "exact" in proc.stdout
    # --no-exact: the same dH, no exact time
    cli("dh", "test.extxyz", "-r", "ref.extxyz", "--approx", "5", "--no-exact", "-o", "b.json",
        "--save", "b.npy", "-q", cwd=d)  # fmt: skip
    res = _json(d / "b.json")
    assert "seconds_exact" not in res["timings"] and "seconds_approx" in res["timings"]
    assert res["parameters"]["exact_timed"] is False
    np.testing.assert_array_equal(np.load(d / "b.npy"), np.load(d / "a.npy"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--approx", "1000"], "--approx 1000: the reference has only 96 environments"),
        (["--approx", "0"], "expected a positive integer"),
        (["--no-exact"], "--no-exact only applies with --approx"),
    ],
)
def test_dh_approx_errors(data, args, message):
    d, _ = data
    proc = cli("dh", "test.extxyz", "-r", "ref.extxyz", *args, cwd=d, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------
# entropy --per-environment FILE
# --------------------------------------------------------------------------------------------


def test_entropy_per_environment_npy_csv_extxyz(data):
    d, read = data
    x = qt.get_descriptors(read["ref"])
    dh_self = metrics.delta_entropy(x, x).numpy()
    h = float(metrics.entropy(x))
    assert h == pytest.approx(np.log(len(dh_self)) + dh_self.mean(), rel=1e-12)
    proc = cli("entropy", "ref.extxyz", "--per-environment", "pe.npy", "-o", "pe.json", cwd=d)
    np.testing.assert_allclose(np.load(d / "pe.npy"), dh_self, rtol=1e-12, atol=1e-12)
    res = _json(d / "pe.json")["results"]
    assert res["entropy"] == pytest.approx(h, rel=1e-12)
    pe = res["per_environment"]
    assert pe["dH_self_mean"] == pytest.approx(res["entropy"] - res["log_n"], rel=1e-10)
    assert pe["top"][0]["dH_self"] == pytest.approx(float(dh_self.max()), rel=1e-12)
    assert "dH_self = -log p(x_i | X)" in proc.stdout and "wrote pe.npy" in proc.stdout
    cli("descriptors", "ref.extxyz", "-o", "ref.npz", "-q", cwd=d)
    cli("entropy", "ref.npz", "--per-environment", "sub/pe.csv", "-q", cwd=d)
    table = np.genfromtxt(d / "sub/pe.csv", delimiter=",", names=True)
    assert table.dtype.names == ("environment", "structure", "atom", "dH_self")
    np.testing.assert_allclose(table["dH_self"], dh_self, rtol=1e-12, atol=1e-12)
    assert table["structure"][40] == 1 and table["atom"][40] == 8
    cli("entropy", "ref.extxyz", "--per-environment", "pe.extxyz", "-q", cwd=d)
    frames = ase.io.read(d / "pe.extxyz", ":")
    assert len(frames) == 3
    got = np.concatenate([a.arrays["dH_self"] for a in frames])
    np.testing.assert_allclose(got, dh_self, rtol=0, atol=1e-7)  # extxyz: 8 decimals
    np.testing.assert_allclose(frames[1].positions, read["ref"][1].positions)


@pytest.mark.parametrize(
    "args, message",
    [
        (["ref.npz", "--per-environment", "pe.extxyz"], "only when the input is a structure file"),
        (["ref.extxyz", "--per-environment", "pe.txt"], "write .npy, .csv or .extxyz/.xyz"),
        (["ref.extxyz", "--per-environment", "pe.npy", "--rows", "10"], "needs every"),
        (["ref.extxyz", "--per-environment", "ref.extxyz/x.npy"], "--per-environment ref.extxyz"),
        (["ref.extxyz", "--per-environment", "."], "is a folder"),
    ],
)
def test_entropy_per_environment_errors(data, args, message):
    d, _ = data
    if not (d / "ref.npz").exists():
        cli("descriptors", "ref.extxyz", "-o", "ref.npz", "-q", cwd=d)
    before = sorted(p.name for p in d.iterdir())
    proc = cli("entropy", *args, cwd=d, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in d.iterdir()) == before
