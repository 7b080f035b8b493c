"""Benchmark trajectory screening: frames/s and atoms/s, and where the time goes.

Case (the issue's): a 100-frame trajectory of a 4,000-atom FCC Cu cell (10x10x10 cubic
cells, a = 3.61 Å) screened against a 20,000-environment solid reference, k = 32,
r_c = 5 Å, h = 0.015, float64. Frames: the lattice with Gaussian displacements growing from
0.03 to 0.15 Å over the run (cold solid -> strongly disordered), plus, in every fourth frame,
extra 0.15 Å displacements inside a 12 Å sphere (a disordered, "molten" core), so that
clusters and novel atoms are non-trivial (dH up to a few hundred nats, like real melts and
below the ~650-nat level where the kernel sums switch to their slower exact-shift path).
Reference: 5 frames of the same cell rattled 0.03-0.08 Å. Built deterministically with
numpy, written once as extxyz (about 40 MB) to ``--data-dir`` and reused.

The run is :func:`quests_torch.screening.screen_trajectory` end to end (extxyz streamed with
``ase.io.iread``, per-frame CSV appended and fsync-ed per batch, resume state written), after
a warm-up on the first 2 frames. Reported per repeat as one JSON line: frames/s, atoms/s,
wall seconds, and the seconds and share of each stage: ``io`` (parsing frames from disk),
``descriptors``, ``kernel`` (the dH kernel sums), ``clusters`` (3.0 Å neighbour graph and
connected components) and ``write`` (table + state). A final summary line gives medians.

Usage::

    python benchmarks/bench_screen.py                      # the 100 x 4,000 vs 20,000 case
    python benchmarks/bench_screen.py --frames 20 --repeats 3 --dtype float32
    python benchmarks/bench_screen.py --threads 1     # on a busy machine (see below)

On a machine shared with other CPU-heavy jobs, torch's intra-op parallelism degrades badly
(two threads waiting on each other while one is descheduled: 25x slower kernel sums were
seen at load 5 on 2 cores); ``--threads 1`` then gives the more meaningful figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SEED = 7


def build_data(data_dir: Path, n_frames: int, reps: int, n_ref_frames: int) -> tuple[Path, Path]:
    """Write (once) the trajectory and reference extxyz files; return their paths."""
    import ase.io
    from ase.build import bulk

    data_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{n_frames}x{4 * reps**3}"
    traj_path = data_dir / f"bench_screen_traj_{tag}.extxyz"
    ref_path = data_dir / f"bench_screen_ref_{n_ref_frames}x{4 * reps**3}.extxyz"
    base = bulk("Cu", "fcc", a=3.61, cubic=True) * (reps, reps, reps)
    rng = np.random.default_rng(SEED)
    if not ref_path.exists():
        ref = []
        for s in np.linspace(0.03, 0.08, n_ref_frames):
            a = base.copy()
            a.positions += rng.normal(0.0, s, a.positions.shape)
            ref.append(a)
        ase.io.write(str(ref_path) + ".tmp", ref, format="extxyz")
        os.replace(str(ref_path) + ".tmp", ref_path)
    if not traj_path.exists():
        centre = base.cell.sum(0) / 2
        inside = np.linalg.norm(base.positions - centre, axis=1) < 12.0
        tmp = str(traj_path) + ".tmp"
        with open(tmp, "w") as fh:
            for i, s in enumerate(np.linspace(0.03, 0.15, n_frames)):
                a = base.copy()
                a.positions += rng.normal(0.0, s, a.positions.shape)
                if i % 4 == 3:  # a disordered sphere: much larger displacements inside
                    n_in = int(inside.sum())
                    a.positions[inside] += rng.normal(0.0, 0.15, (n_in, 3))
                a.wrap()
                ase.io.write(fh, a, format="extxyz")
        os.replace(tmp, traj_path)
    return traj_path, ref_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--reps", type=int, default=10, help="cubic cells per side (4 reps^3)")
    parser.add_argument("--ref-frames", type=int, default=5, help="reference frames")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-atoms", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "qt-bench"))
    parser.add_argument("--out", default=None, help="also append the JSON lines here")
    args = parser.parse_args()

    import quests_torch as qt
    from quests_torch.screening import screen_trajectory

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    traj, ref_path = build_data(Path(args.data_dir), args.frames, args.reps, args.ref_frames)
    build_s = time.perf_counter() - t0
    import ase.io

    t0 = time.perf_counter()
    x_ref = qt.get_descriptors(ase.io.read(ref_path, ":"), dtype=dtype, device=args.device)
    ref_s = time.perf_counter() - t0
    n_atoms = 4 * args.reps**3
    lines = []

    def emit(record: dict) -> None:
        text = json.dumps(record)
        print(text, flush=True)
        lines.append(text)

    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(dtype=dtype, device=args.device, batch_atoms=args.batch_atoms, overwrite=True)
        screen_trajectory(traj, x_ref, Path(tmp) / "warm.csv", index=":2", **kw)  # warm-up
        runs = []
        for r in range(args.repeats):
            res = screen_trajectory(traj, x_ref, Path(tmp) / f"run{r}.csv", **kw)
            t = res.timings.as_dict()
            wall = res.seconds
            runs.append(wall)
            emit(
                {
                    "case": f"screen_{args.frames}x{n_atoms}_ref{x_ref.shape[0]}_{args.dtype}",
                    "repeat": r,
                    "frames": res.frames_screened,
                    "atoms": int(res.frames["n_atoms"].sum()),
                    "reference_environments": int(x_ref.shape[0]),
                    "seconds": round(wall, 3),
                    "frames_per_s": round(res.frames_screened / wall, 3),
                    "atoms_per_s": round(res.frames["n_atoms"].sum() / wall, 1),
                    "kernel_evals_per_s": round(
                        res.frames["n_atoms"].sum() * x_ref.shape[0] / max(t["kernel"], 1e-9)
                    ),
                    "stage_seconds": t,
                    "stage_share": {key: round(v / wall, 3) for key, v in t.items()},
                    "batch_atoms": res.batch_atoms,
                    "summary": {
                        key: res.summary[key]
                        for key in ("dH_max", "novel_fraction", "largest_cluster_min")
                    },
                }
            )
    med = statistics.median(runs)
    emit(
        {
            "case": "summary",
            "median_seconds": round(med, 3),
            "frames_per_s": round(args.frames / med, 3),
            "atoms_per_s": round(args.frames * n_atoms / med, 1),
            "data_build_seconds": round(build_s, 2),
            "reference_descriptor_seconds": round(ref_s, 2),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "quests_torch": qt.__version__,
            "load_avg_1min": os.getloadavg()[0],
        }
    )
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
