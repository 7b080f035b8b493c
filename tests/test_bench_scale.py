"""The scale pipeline (benchmarks/bench_scale.py) end to end at 200,000 environments.

The 10-million run of the README is the same script with its defaults; here every stage runs
on a small set in its own process, and the results of the stages are checked against each
other: the store holds every environment, dH from the store equals the screening table's per-frame
maximum, and the sampled entropy of the exact subset lies within its error bar of the exact value.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quests_torch.screen_io import read_frame_table

ROOT = Path(__file__).resolve().parents[1]
N = 200_000


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, Path]:
    data = tmp_path_factory.mktemp("scale")
    out = data / "scale.jsonl"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_scale.py"),
        "--n-envs", str(N),
        "--ref", "5000",
        "--rows", "2000",
        "--exact-subset", "20000",
        "--upstream-seconds", "0",
        "--quick-md",
        "--data-dir", str(data),
        "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = {r["stage"]: r for r in map(json.loads, out.read_text().splitlines())}
    return records, data


def test_every_stage_ran_and_reported_time_and_memory(run):
    records, _ = run
    assert set(records) == {"store", "dh", "estimate", "exact", "screen", "summary"}
    summary = records["summary"]
    stages = ("store", "dh", "estimate", "exact", "screen")
    assert summary["pipeline_seconds"] == pytest.approx(
        sum(records[s]["seconds"] for s in stages), abs=0.5
    )
    assert 0.1 < summary["peak_rss_gb"] < 4.0
    assert records["store"]["rows"] == N and records["store"]["width"] == 63
    assert records["dh"]["rows"] == N and records["estimate"]["n"] == N


def test_store_dh_matches_the_screening_table(run):
    records, data = run
    dh = np.load(data / f"scale_{N}_float32_dh.npy")
    table = read_frame_table(data / f"scale_{N}_float32_screen.csv")
    per_frame = dh.reshape(-1, 500).max(axis=1)  # 500 atoms per frame, in trajectory order
    assert len(table["frame"]) == records["screen"]["frames"] == N // 500
    np.testing.assert_allclose(table["dH_max"], per_frame, rtol=1e-4, atol=1e-3)
    # the reference is the 300-900 K solid: hot and molten frames are novel, cold ones not
    assert 0.02 < records["dh"]["fraction_above_0"] < 0.9


def test_estimate_error_bar_covers_the_exact_entropy(run):
    records, _ = run
    exact = records["exact"]
    assert exact["n"] == 20_000 and exact["rows"] == 2000
    assert 0 < exact["stderr"] < 0.1
    assert abs(exact["z"]) < 4.0  # 4 standard errors: fails by chance once in ~16,000 runs
    est = records["estimate"]
    assert 0 < est["stderr"] < 0.1 and np.isfinite(est["H"])


def test_upstream_stage_times_only_rows_that_exist(tmp_path):
    """The upstream comparison never labels a size larger than the data it ran on."""
    pytest.importorskip("quests", reason="upstream quests (make bench-reference) not installed")
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_scale.py"),
        "--n-envs", "4000", "--ref", "1000", "--rows", "500", "--exact-subset", "2000",
        "--quick-md", "--stages", "store", "--upstream-seconds", "2",
        "--data-dir", str(tmp_path), "--out", str(tmp_path / "out.jsonl"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = {
        r["stage"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())
    }
    up = records["upstream"]
    assert up["upstream_version"]
    for kernel in ("descriptors", "entropy", "dH_vs_reference"):
        sizes = [row["n"] for row in up[kernel]]
        assert sizes == [4000], (kernel, sizes)  # all the rows there are, and no more
        assert all(row["seconds"] > 0 and row["ours_seconds"] >= 0 for row in up[kernel])
