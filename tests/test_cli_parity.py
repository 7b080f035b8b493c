"""Command-line parity with upstream ``quests`` (issue 17), through the real entry point.

``dh --approx N`` (upstream ``approx_dH``), ``entropy --per-environment`` (upstream
``metrics``) and ``generate`` (upstream ``mcmc``): exit codes, files written, and values equal
to the library calls on the same (small) data.
"""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
from conftest import cli, rattled_fcc, read_json

import quests_torch as qt
from quests_torch import metrics


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
    res = read_json(d / "a.json")
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
    res = read_json(d / "b.json")
    assert "seconds_exact" not in res["timings"] and "seconds_approx" in res["timings"]
    assert res["parameters"]["exact_timed"] is False
    np.testing.assert_array_equal(np.load(d / "b.npy"), np.load(d / "a.npy"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--approx", "1000"], "--approx 1000: the reference has only 96 environments"),
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
    res = read_json(d / "pe.json")["results"]
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


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------


def _bank(read):
    from quests_torch.uncertainty import UncertaintyBank

    return UncertaintyBank(qt.get_descriptors(read["ref"]))


def test_generate_gradient_and_random_walk_match_library(data):
    from quests_torch.sampling import generate_to_target, random_walk_to_target

    d, read = data
    bank = _bank(read)
    proc = cli("generate", "ref.extxyz", "-i", "0", "--target", "2", "-w", "g.extxyz",
               "-o", "g.json", cwd=d)  # fmt: skip
    lib = generate_to_target(read["ref"][0], bank, 2.0)
    res = read_json(d / "g.json")
    s = res["results"]["structures"][0]
    assert s["reached"] and s["start"] == 0
    np.testing.assert_allclose(s["history"], lib.history, rtol=1e-10)
    assert s["n_evaluations"] == lib.n_evaluations == res["results"]["n_evaluations"]
    (out,) = ase.io.read(d / "g.extxyz", ":")
    np.testing.assert_allclose(out.positions, lib.atoms.positions, atol=1e-6)
    assert out.info["generate_dH"] == pytest.approx(lib.value)
    assert f"dH {lib.history[0]:.3f} -> {lib.value:.3f} in {lib.n_evaluations}" in proc.stdout
    # random walk, two structures from starts drawn with --seed, start and result written
    cli("generate", "ref.extxyz", "-n", "2", "--seed", "4", "-m", "random-walk", "--target",
        "0", "--steps", "300", "--statistic", "mean", "--tolerance", "0.5", "-w", "r.extxyz",
        "--compare", "-o", "r.json", "-q", cwd=d)  # fmt: skip
    res = read_json(d / "r.json")["results"]
    starts = np.random.default_rng(4).integers(0, 3, size=2).tolist()
    assert [s["start"] for s in res["structures"]] == starts
    frames = ase.io.read(d / "r.extxyz", ":")
    assert [a.info["generate_role"] for a in frames] == ["start", "result"] * 2
    for j, start in enumerate(starts):
        lib = random_walk_to_target(
            read["ref"][start], bank, 0.0, statistic="mean", tolerance=0.5,
            max_evaluations=300, seed=4 + j,
        )  # fmt: skip
        s = res["structures"][j]
        assert s["reached"] == lib.reached and s["n_evaluations"] == lib.n_evaluations
        np.testing.assert_allclose(s["history"], lib.history, rtol=1e-10)
        np.testing.assert_allclose(frames[2 * j].positions, read["ref"][start].positions)
        np.testing.assert_allclose(frames[2 * j + 1].positions, lib.atoms.positions, atol=1e-6)


def test_generate_unreachable_target_refused_unless_best_effort(data):
    d, _ = data
    args = ["generate", "ref.extxyz", "-i", "1", "--target", "40", "--steps", "3",
            "--max-step", "0.01", "-w", "u.extxyz", "-o", "u.json"]  # fmt: skip
    proc = cli(*args, cwd=d, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--target 40 not reached within 3 evaluations" in proc.stderr
    assert "--best-effort" in proc.stderr
    assert not (d / "u.extxyz").exists() and not (d / "u.json").exists()
    proc = cli(*args, "--best-effort", cwd=d)
    assert "target NOT reached" in proc.stdout
    res = read_json(d / "u.json")["results"]
    assert res["n_reached"] == 0 and res["structures"][0]["n_evaluations"] == 3
    (out,) = ase.io.read(d / "u.extxyz", ":")
    assert out.info["generate_reached"] is False


@pytest.mark.parametrize(
    "args, message",
    [
        (["-i", "7"], "-i 7: the dataset has 3 structures"),
        (["-w", "out.nosuchformat"], "ASE cannot write format"),
        (["--min-distance", "3"], "violates `min_distance`"),
    ],
)
def test_generate_errors(data, args, message):
    d, _ = data
    base = ["generate", "ref.extxyz", "--target", "1", "-w", "e.extxyz"]
    proc = cli(*base, *args, cwd=d, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (d / "e.extxyz").exists()
