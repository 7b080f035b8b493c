"""Benchmark structure generation towards a target dH: gradient steps vs a random walk.

Both methods start from the same structure, obey the same constraints (at most ``--max-step``
Å per atom per step, no interatomic distance below ``--min-distance`` Å) and stop when the
statistic (max or mean per-atom dH against the bank) is within ``--tolerance`` nats of the
target. Reported per run: descriptor evaluations (the gradient method also runs one backward
pass per evaluation), backward passes, wall time, whether the target was reached.

Data: bank = the 768 thermal Cu environments of ``tests/data/kde_reference.npz`` (EMT, 300 K,
k = 32, r_c = 5 Å; h = 0.015). Start = 108-atom FCC Cu (3x3x3 conventional, a = 3.61 Å)
rattled by N(0, 0.05 Å) with the run's seed (max dH ~ -3, mean dH ~ -4.5 nats).
Targets (default): max dH = 5 nats and mean dH = -1 nats. The random walk uses Gaussian steps of
``--step-std`` Å per coordinate and Metropolis at kT = 0.1 nats on ``|s - target|``.

One JSON line per (statistic, method, seed), then a summary line with the medians over seeds.

Usage::

    python benchmarks/bench_generation.py
    python benchmarks/bench_generation.py --seeds 0,1,2,3,4 --min-distance 2.0
    python benchmarks/bench_generation.py --max-target 20 --mean-target 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "kde_reference.npz"


def start_structure(seed: int):
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (3, 3, 3)
    atoms.rattle(0.05, seed=seed)
    return atoms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--statistics", default="max,mean")
    parser.add_argument("--max-target", type=float, default=5.0, help="target of max dH")
    parser.add_argument("--mean-target", type=float, default=-1.0, help="target of mean dH")
    parser.add_argument("--tolerance", type=float, default=0.25)
    parser.add_argument("--max-step", type=float, default=0.05)
    parser.add_argument("--min-distance", type=float, default=2.0)
    parser.add_argument("--step-std", type=float, default=0.02)
    parser.add_argument("--max-evaluations", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines here")
    args = parser.parse_args()

    import torch

    from quests_torch.sampling import generate_to_target, random_walk_to_target
    from quests_torch.uncertainty import UncertaintyBank

    with np.load(DATA) as f:
        bank = UncertaintyBank(torch.from_numpy(f["x_solid"]))
    header = {
        "event": "machine",
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "n_bank": bank.n_references,
        "n_atoms": 108,
    }
    lines = [header]
    print(json.dumps(header), flush=True)
    common = {
        "tolerance": args.tolerance,
        "max_step": args.max_step,
        "min_distance": args.min_distance,
        "max_evaluations": args.max_evaluations,
    }
    runs: dict[tuple[str, str], list[dict]] = {}
    for stat in [s for s in args.statistics.split(",") if s]:
        target = {"max": args.max_target, "mean": args.mean_target}[stat]
        for seed in [int(s) for s in args.seeds.split(",") if s]:
            atoms = start_structure(seed)
            for method in ("gradient", "random_walk"):
                if method == "gradient":
                    res = generate_to_target(atoms, bank, target, statistic=stat, **common)
                else:
                    res = random_walk_to_target(
                        atoms,
                        bank,
                        target,
                        statistic=stat,
                        step_std=args.step_std,
                        seed=seed,
                        **common,
                    )
                rec = {
                    "statistic": stat,
                    "target": target,
                    "method": method,
                    "seed": seed,
                    "start": round(res.history[0], 3),
                    "final": round(res.value, 3),
                    "reached": res.reached,
                    "n_evaluations": res.n_evaluations,
                    "n_backward": res.n_backward,
                    "n_accepted": res.n_accepted,
                    "n_rejected_geometry": res.n_rejected_geometry,
                    "max_displacement": round(max(res.max_displacements, default=0.0), 4),
                    "min_distance": round(min(res.min_distances), 4),
                    "wall_s": round(res.wall_time, 3),
                }
                runs.setdefault((stat, method), []).append(rec)
                lines.append(rec)
                print(json.dumps(rec), flush=True)
    summary: dict = {"event": "summary", "load_average": [round(v, 2) for v in os.getloadavg()]}
    for (stat, method), recs in runs.items():
        key = f"{stat}_{method}"
        summary[f"{key}_median_evaluations"] = float(np.median([r["n_evaluations"] for r in recs]))
        summary[f"{key}_median_wall_s"] = round(float(np.median([r["wall_s"] for r in recs])), 3)
        summary[f"{key}_reached"] = f"{sum(r['reached'] for r in recs)}/{len(recs)}"
    lines.append(summary)
    print(json.dumps(summary), flush=True)
    if args.out is not None:
        with open(args.out, "a") as fh:
            for rec in lines:
                fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
