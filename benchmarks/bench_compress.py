"""Benchmark dataset compression (``msc`` to 10 %) against upstream ``quests``.

Data: 2,000 thermal 32-atom Cu structures (2x2x2 FCC cells, a = 3.61 Å) from EMT Langevin
MD (ASE, 2 fs steps, fixed seeds), 500 frames each at 300, 600, 900 and 1200 K, one frame
every 10 steps after 400 steps of equilibration; 64,000 environments. Descriptors (k = 32,
r_c = 5 Å) are computed once by quests-torch and shared by both implementations, so only the
compression is timed: per-structure entropies plus the greedy selection of 200 structures.

* ``reference``: ``quests.entropy.entropy`` of every structure, then
  ``quests.compression.fps.msc`` (what ``DatasetCompressor.get_indices("msc", 200)`` runs).
* ``msc`` / ``msc_nocurve``: :func:`quests_torch.compression.compress` with and without the
  compression curve (entropy, diversity and overlap after every selected structure).
* ``fps``: both libraries' farthest-point sampling, for scale.

Every case runs in its own subprocess: one warm-up, then the median of ``--repeats`` runs
(the reference's ``msc`` is slow, so it gets ``--reference-repeats``, default 1, after its
warm-up on a 200-structure subset that compiles the numba kernels). One JSON line per case,
then a summary line with the speed-ups; the selections of both libraries are compared.

Usage::

    python benchmarks/bench_compress.py
    python benchmarks/bench_compress.py --cases msc,reference --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

H = 0.015
SIZE = 200
ALL_CASES = ["msc", "msc_nocurve", "reference", "fps", "fps_reference"]
TEMPERATURES = (300.0, 600.0, 900.0, 1200.0)


def _frames(temperature_k: float, n_frames: int, seed: int, every: int = 10):
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin

    try:
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:  # ASE < 3.28
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.calc = EMT()
    thermalize_momenta(atoms, temperature_K=temperature_k, rng=rng)
    dyn = Langevin(
        atoms, 2 * units.fs, temperature_K=temperature_k, friction=0.02, fixcm=False, rng=rng
    )
    dyn.run(400)
    out = []
    for _ in range(n_frames):
        dyn.run(every)
        frame = atoms.copy()
        frame.calc = None
        out.append(frame)
    return out


def ensure_data(data_dir: Path) -> Path:
    path = data_dir / "bench_compress_cu2000.npz"
    if path.exists():
        return path
    import quests_torch

    data_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    frames = []
    for i, t in enumerate(TEMPERATURES):
        frames += _frames(t, 500, seed=40 + i)
    x = quests_torch.get_descriptors(frames).numpy()
    counts = np.array([len(a) for a in frames])
    np.savez(path, x=x, counts=counts)
    print(
        json.dumps(
            {
                "event": "data",
                "path": str(path),
                "structures": len(frames),
                "environments": len(x),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        ),
        file=sys.stderr,
    )
    return path


# ------------------------------------------------------------------------------------ cases


def _load(path: Path):
    d = np.load(path)
    x, counts = d["x"], d["counts"]
    return x, counts


def case_ours(path: Path, method: str, curve: bool, repeats: int) -> dict:
    import torch

    from quests_torch.compression import compress

    x, counts = _load(path)
    xt = torch.from_numpy(x)
    sid = torch.repeat_interleave(torch.arange(len(counts)), torch.from_numpy(counts))
    compress(xt, sid, 20, method, curve=curve)  # warm-up
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = compress(xt, sid, SIZE, method, curve=curve)
        times.append(time.perf_counter() - t0)
    out = {"seconds": float(np.median(times)), "times": [round(t, 4) for t in times]}
    out["indices"] = result.indices.tolist()
    if result.curve is not None:
        out["summary"] = result.summary()
    out["threads"] = torch.get_num_threads()
    return out


def case_reference(path: Path, method: str, repeats: int) -> dict:
    from quests.compression.fps import fps, msc
    from quests.entropy import entropy

    x, counts = _load(path)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    xs = [x[bounds[i] : bounds[i + 1]] for i in range(len(counts))]

    def run(data, size):
        ent = np.array([entropy(d, h=H) for d in data])
        if method == "msc":
            return msc(data, ent, size, h=H)
        return fps(data, ent, size)

    run(xs[:200], 20)  # warm-up: numba compilation
    times, idx = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        idx = run(xs, SIZE)
        times.append(time.perf_counter() - t0)
    import numba

    return {
        "seconds": float(np.median(times)),
        "times": [round(t, 4) for t in times],
        "indices": [int(i) for i in idx],
        "threads": numba.get_num_threads(),
    }


def run_case(name: str, path: Path, repeats: int, ref_repeats: int) -> dict:
    if name == "msc":
        res = case_ours(path, "msc", True, repeats)
    elif name == "msc_nocurve":
        res = case_ours(path, "msc", False, repeats)
    elif name == "fps":
        res = case_ours(path, "fps", False, repeats)
    elif name == "reference":
        res = case_reference(path, "msc", ref_repeats)
    elif name == "fps_reference":
        res = case_reference(path, "fps", ref_repeats)
    else:
        raise SystemExit(f"unknown case {name}")
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(ALL_CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-repeats", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # subprocess mode
    args = parser.parse_args()

    path = ensure_data(args.data_dir)
    if args.case:
        print(json.dumps(run_case(args.case, path, args.repeats, args.reference_repeats)))
        return

    results = {}
    for name in args.cases.split(","):
        if name.endswith("reference"):
            try:
                import quests  # noqa: F401
            except ImportError:
                print(json.dumps({"case": name, "skipped": "quests not installed"}))
                continue
        cmd = [
            sys.executable,
            __file__,
            "--case",
            name,
            "--repeats",
            str(args.repeats),
            "--reference-repeats",
            str(args.reference_repeats),
            "--data-dir",
            str(args.data_dir),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"case {name} failed:\n{proc.stderr}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results[name] = res
        line = {
            "case": name,
            "structures": 2000,
            "environments": 64000,
            "size": SIZE,
            **{k: v for k, v in res.items() if k != "indices"},
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        }
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(line) + "\n")

    summary = {"event": "summary"}
    for ours, ref in (("msc", "reference"), ("msc_nocurve", "reference"), ("fps", "fps_reference")):
        if ours in results and ref in results:
            summary[f"speedup_{ours}"] = round(
                results[ref]["seconds"] / results[ours]["seconds"], 2
            )
            summary[f"same_selection_{ours}"] = results[ours]["indices"] == results[ref]["indices"]
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
