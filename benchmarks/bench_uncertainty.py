"""Benchmark the UncertaintyBank module (descriptors + per-atom dH) against an EMT force call.

The question an MD user asks: how much does watching dH on every step cost compared with the
potential itself? Cases, on the same structure, in one process:

* ``emt_forces``: ASE's EMT energy + forces of a new configuration, as in an MD step (the
  neighbour list is updated, not rebuilt; the reference cost; numpy, one thread).
* ``module_f64`` / ``module_f32``: ``bank(positions, cell, pbc)`` under ``no_grad``
  (descriptors with the bank's k/cutoff, then the tiled dH against the whole bank).
* ``descriptors_f64`` and ``dh_f64``: the two halves of ``module_f64``.
* ``module_grad_f64``: forward + backward of ``dH.mean()`` w.r.t. positions (the cost of one
  step of the entropy bias or of gradient-based generation).
* ``wrapper_f64``: ``QuestsUncertaintyCalculator(EMT(), bank)``: EMT energy + forces + dH of
  a new configuration (what a monitored MD step costs).

Data: query = 4,000-atom FCC Cu (10x10x10 conventional cells, a = 3.61 Å) rattled with
N(0, 0.05 Å) per coordinate (seed 0; ~0.087 Å rms displacement, about the 300 K EMT
amplitude). Bank = 20,000 environments of thermal Cu: EMT Langevin MD of a 256-atom cell at
300 K (2 fs, friction 0.02, seed 1, 400 steps of equilibration, then a frame every 10 steps),
descriptors k = 32, r_c = 5 Å, cached in ``--data-dir``. h = 0.015.

One warm-up per case, then ``--repeats`` rounds that time every case once (round-robin, so
load from other processes hits all cases alike); the median per case. One JSON line per case
and a summary line with the time of every case relative to ``emt_forces``. On a shared
machine, ``--threads 1`` avoids the large slowdowns of a 2-thread OpenMP pool whose second
core is busy with someone else's job.

Usage::

    python benchmarks/bench_uncertainty.py
    python benchmarks/bench_uncertainty.py --cases emt_forces,module_f64 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ALL_CASES = [
    "emt_forces",
    "descriptors_f64",
    "dh_f64",
    "module_f64",
    "module_f32",
    "module_grad_f64",
    "wrapper_f64",
]
N_BANK = 20_000


def _thermal_frames(n_frames: int, seed: int = 1, every: int = 10, equilibrate: int = 400):
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin

    try:
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:  # ASE < 3.28
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 4, 4))
    atoms.calc = EMT()
    thermalize_momenta(atoms, temperature_K=300.0, rng=rng)
    dyn = Langevin(atoms, 2 * units.fs, temperature_K=300.0, friction=0.02, fixcm=False, rng=rng)
    dyn.run(equilibrate)
    frames = []
    for _ in range(n_frames):
        dyn.run(every)
        frame = atoms.copy()
        frame.calc = None
        frames.append(frame)
    return frames


def ensure_bank(data_dir: Path) -> Path:
    """20,000 thermal Cu descriptors (float64 .npy), made once and cached."""
    path = data_dir / "bench_uncertainty_bank.npy"
    if path.exists():
        return path
    import quests_torch as qt

    data_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    frames = _thermal_frames(-(-N_BANK // 256))
    x = qt.get_descriptors(frames).numpy()[:N_BANK]
    np.save(path, np.ascontiguousarray(x))
    event = {
        "event": "data",
        "path": str(path),
        "n": len(x),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(event), file=sys.stderr)
    return path


def query_structure():
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((10, 10, 10))
    rng = np.random.default_rng(0)
    atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
    return atoms


def setup_case(case: str, bank_path: Path):
    """``(fn, record)``: a callable timing one call of ``case`` and its static description."""
    import torch
    from ase.calculators.emt import EMT

    import quests_torch as qt
    from quests_torch.calculators import QuestsUncertaintyCalculator
    from quests_torch.uncertainty import UncertaintyBank

    atoms = query_structure()
    x_bank = torch.from_numpy(np.load(bank_path))
    dtype = torch.float32 if case.endswith("f32") else torch.float64
    bank = UncertaintyBank(x_bank, dtype=dtype)
    b = qt.AtomsBatch.from_ase(atoms, dtype=dtype)
    record: dict = {
        "case": case,
        "n_atoms": len(atoms),
        "n_bank": bank.n_references,
        "dtype": "float64" if case == "emt_forces" else str(dtype).removeprefix("torch."),
    }
    flip = [1e-5]

    def md_like_step():
        # a new configuration, as in MD: EMT updates (not rebuilds) its neighbour list
        atoms.positions[0, 0] += flip[0]
        flip[0] = -flip[0]

    if case == "emt_forces":
        atoms.calc = EMT()

        def fn():
            md_like_step()
            atoms.get_forces()

    elif case == "wrapper_f64":
        atoms.calc = QuestsUncertaintyCalculator(EMT(), bank)

        def fn():
            md_like_step()
            atoms.get_forces()
            return atoms.calc.results["max_dH"]

    elif case == "descriptors_f64":

        def fn():
            with torch.no_grad():
                bank.descriptors_of(b.positions, b.cell, b.pbc)

    elif case == "dh_f64":
        with torch.no_grad():
            y = bank.descriptors_of(b.positions, b.cell, b.pbc)

        def fn():
            with torch.no_grad():
                return bank.delta_entropy(y).max()

    elif case in ("module_f64", "module_f32"):

        def fn():
            with torch.no_grad():
                return bank(b.positions, b.cell, b.pbc).max()

    elif case == "module_grad_f64":

        def fn():
            p = b.positions.clone().requires_grad_(True)
            dh = bank(p, b.cell, b.pbc)
            torch.autograd.grad(dh.mean(), p)
            return dh.detach().max()

    else:
        raise SystemExit(f"unknown case {case!r}")
    return fn, record


def run_cases(cases: list[str], bank_path: Path, repeats: int) -> dict[str, dict]:
    """Warm every case up, then time them round-robin (each repeat visits every case once,
    so a burst of load from other processes hits all cases alike); medians per case."""
    import torch

    setups = {case: setup_case(case, bank_path) for case in cases}
    times: dict[str, list[float]] = {case: [] for case in cases}
    for fn, record in setups.values():
        value = fn()  # warm-up
        if value is not None:
            record["max_dH"] = round(float(value), 4)
    for _ in range(repeats):
        for case, (fn, _) in setups.items():
            t0 = time.perf_counter()
            fn()
            times[case].append(time.perf_counter() - t0)
    out = {}
    for case, (_, record) in setups.items():
        t = times[case]
        record.update(
            {
                "median_s": round(float(np.median(t)), 4),
                "min_s": round(min(t), 4),
                "times_s": [round(v, 4) for v in t],
                "torch_threads": torch.get_num_threads(),
            }
        )
        out[case] = record
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default=",".join(ALL_CASES))
    parser.add_argument(
        "--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "quests-torch-bench"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines here")
    args = parser.parse_args()

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    bank_path = ensure_bank(args.data_dir)
    header = {
        "event": "machine",
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "bank": str(bank_path),
    }
    lines = [header]
    print(json.dumps(header), flush=True)
    results = run_cases([c for c in args.cases.split(",") if c], bank_path, args.repeats)
    for rec in results.values():
        lines.append(rec)
        print(json.dumps(rec), flush=True)
    summary: dict = {"event": "summary", "load_average": [round(v, 2) for v in os.getloadavg()]}
    emt = results.get("emt_forces", {}).get("median_s")
    if emt:
        for case, rec in results.items():
            if case != "emt_forces":
                summary[f"{case}_over_emt"] = round(rec["median_s"] / emt, 3)
    lines.append(summary)
    print(json.dumps(summary), flush=True)
    if args.out is not None:
        with open(args.out, "a") as fh:
            for rec in lines:
                fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
