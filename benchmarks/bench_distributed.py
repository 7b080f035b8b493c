"""Benchmark quests_torch.distributed: 1 vs several processes (gloo on CPU), a scaling table.

Each configuration ``PxT`` (``P`` processes with ``T`` torch threads each) runs in freshly
spawned processes (``torch.multiprocessing.spawn``, rendezvous through a FileStore in a temp
folder, gloo); ``1xT`` is the plain single-process library (no process group, the distributed
functions fall through to :mod:`quests_torch.metrics`). Every case: one warm-up, then
``--repeats`` runs, each timed on rank 0 between two barriers; the configurations are run in
turn ``--rounds`` times (interleaved, so that a burst of load from other jobs does not hit one
configuration only). One JSON line per (case, configuration) with the median and the best
time over all runs, then a Markdown table of the best times with the speed-up over ``1x1``.

Cases (float64, h = 0.015, k = 32, r_c = 5 Å):

* ``descriptors``: QUESTS descriptors of ``--structures`` rattled 500-atom FCC Cu cells
  (rattle 0.02-0.20 Å), structures split over ranks and all-gathered.
* ``entropy``: ``H`` of the first ``--n-entropy`` of those environments (triangular tiles
  dealt out to the ranks, ``shard="tiles"``).
* ``dh_rows`` / ``dh_cols``: ``dH`` of ``--n-query`` environments against ``--n-ref``
  (queries split, ``shard="rows"``; references split, cross-rank log-sum-exp,
  ``shard="cols"``).
* ``screen``: :func:`quests_torch.distributed.screen_trajectory` of ``--frames`` 500-atom
  frames against 2,000 reference environments (frames split, parts merged by rank 0).

Throughput is ``pairs / t`` (``n^2 / t`` for the entropy, although half of the pairs are
evaluated). On a machine shared with other jobs the figures are noisy (two single-thread
processes get two cores only when nothing else runs): compare configurations of one run
only, and prefer the best times.

Usage::

    python benchmarks/bench_distributed.py                        # 1x1, 2x1, 1x2
    python benchmarks/bench_distributed.py --configs 1x1,2x1,4x1 --cases entropy,dh_rows
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
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

H = 0.015
ALL_CASES = ["descriptors", "entropy", "dh_rows", "dh_cols", "screen"]


def _structures(n: int, seed: int = 0) -> list:
    from ase.build import bulk

    base = bulk("Cu", "fcc", a=3.61, cubic=True) * (5, 5, 5)  # 500 atoms
    rng = np.random.default_rng(seed)
    out = []
    for s in np.linspace(0.02, 0.20, n):
        a = base.copy()
        a.positions += rng.normal(0.0, s, a.positions.shape)
        a.wrap()
        out.append(a)
    return out


def _prepare(folder: Path, args) -> None:
    """Descriptors (single process) and the screening files, written once."""
    import ase.io

    import quests_torch as qt

    frames = _structures(args.structures)
    x = qt.get_descriptors(frames).numpy()
    rng = np.random.default_rng(1)
    x = x[rng.permutation(len(x))]
    need = max(args.n_entropy, args.n_ref + args.n_query)
    if len(x) < need:
        raise SystemExit(f"--structures {args.structures} gives {len(x)} rows, need {need}")
    np.save(folder / "x.npy", x)
    ase.io.write(folder / "ref.extxyz", _structures(4, seed=2), format="extxyz")
    ase.io.write(folder / "traj.extxyz", _structures(args.frames, seed=3), format="extxyz")


def _timed(fn, repeats: int) -> list[float]:
    from quests_torch import distributed as qd

    def barrier():
        if qd.is_distributed():
            torch.distributed.barrier()

    fn()  # warm-up
    times = []
    for _ in range(repeats):
        barrier()
        t0 = time.perf_counter()
        fn()
        barrier()
        times.append(time.perf_counter() - t0)
    return times


def _worker(rank: int, world: int, threads: int, folder: str, cfg: dict) -> None:
    torch.set_num_threads(threads)
    folder = Path(folder)
    if world > 1:
        store = torch.distributed.FileStore(str(folder / f"store-{world}x{threads}"), world)
        torch.distributed.init_process_group(
            "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=600)
        )
    import ase.io

    from quests_torch import distributed as qd

    x = torch.from_numpy(np.load(folder / "x.npy"))
    xe = x[: cfg["n_entropy"]]
    ref = x[: cfg["n_ref"]]
    query = x[cfg["n_ref"] : cfg["n_ref"] + cfg["n_query"]]
    results = {}
    cases = cfg["cases"]
    if "descriptors" in cases:
        frames = _structures(cfg["structures"])
        results["descriptors"] = (_timed(lambda: qd.get_descriptors(frames), cfg["repeats"]), 0)
    if "entropy" in cases:
        t = _timed(lambda: qd.entropy(xe, H, shard="tiles"), cfg["repeats"])
        results["entropy"] = (t, len(xe) ** 2)
    for case, shard in (("dh_rows", "rows"), ("dh_cols", "cols")):
        if case in cases:
            t = _timed(lambda s=shard: qd.delta_entropy(query, ref, H, shard=s), cfg["repeats"])
            results[case] = (t, len(query) * len(ref))
    if "screen" in cases:
        ref_x = qd.get_descriptors(ase.io.read(folder / "ref.extxyz", ":"))[:2000]
        out = folder / f"screen-{world}x{threads}.csv"

        def run():
            qd.screen_trajectory(
                folder / "traj.extxyz", ref_x, out, overwrite=True, batch_atoms=1000
            )

        results["screen"] = (_timed(run, cfg["repeats"]), 0)
    if rank == 0:
        (folder / f"result-{world}x{threads}.json").write_text(json.dumps(results))
    if world > 1:
        torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="1x1,2x1,1x2", help="PROCSxTHREADS, comma-separated")
    p.add_argument("--cases", default=",".join(ALL_CASES))
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case and round")
    p.add_argument("--rounds", type=int, default=2, help="passes over the configurations")
    p.add_argument("--structures", type=int, default=100, help="500-atom cells (descriptors)")
    p.add_argument("--n-entropy", type=int, default=20_000)
    p.add_argument("--n-ref", type=int, default=30_000)
    p.add_argument("--n-query", type=int, default=10_000)
    p.add_argument("--frames", type=int, default=16, help="500-atom frames to screen")
    p.add_argument("--out", default=None, help="also append the JSON lines here")
    args = p.parse_args(argv)
    configs = []
    for c in args.configs.split(","):
        procs, threads = (int(v) for v in c.lower().split("x"))
        configs.append((procs, threads))
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(ALL_CASES)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; choose from {ALL_CASES}")
    cfg = {
        "cases": cases,
        "repeats": args.repeats,
        "structures": args.structures,
        "n_entropy": args.n_entropy,
        "n_ref": args.n_ref,
        "n_query": args.n_query,
    }
    lines = []
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        folder = Path(tmp)
        _prepare(folder, args)
        runs: dict = {}
        for _ in range(args.rounds):
            for procs, threads in configs:
                torch.multiprocessing.spawn(
                    _worker, args=(procs, threads, tmp, cfg), nprocs=procs, join=True
                )
                res = json.loads((folder / f"result-{procs}x{threads}.json").read_text())
                for case, (times, pairs) in res.items():
                    entry = runs.setdefault((case, procs, threads), {"times": [], "pairs": pairs})
                    entry["times"] += times
                    entry["load"] = os.getloadavg()[0]
        measured = {}
        for (case, procs, threads), entry in runs.items():
            times, pairs = entry["times"], entry["pairs"]
            med, best = statistics.median(times), min(times)
            measured[(case, procs, threads)] = best
            row = {
                "bench": "distributed",
                "case": case,
                "procs": procs,
                "threads": threads,
                "backend": "gloo" if procs > 1 else "none",
                "median_s": round(med, 4),
                "best_s": round(best, 4),
                "times_s": [round(t, 4) for t in times],
                "pairs_per_s_best": round(pairs / best) if pairs else None,
                "torch": torch.__version__,
                "cpu_count": os.cpu_count(),
                "machine": platform.machine(),
                "load_avg": round(entry["load"], 2),
            }
            lines.append(json.dumps(row))
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n".join(lines) + "\n")
    header = "| case (best time) | " + " | ".join(f"{p} proc x {t} thr" for p, t in configs)
    header += " |"
    print()
    print(header)
    print("|" + "---|" * (len(configs) + 1))
    for case in cases:
        base = measured.get((case, 1, 1))
        cells = []
        for procs, threads in configs:
            t = measured.get((case, procs, threads))
            if t is None:
                cells.append("-")
            elif base:
                cells.append(f"{t:.2f} s ({base / t:.2f}x)")
            else:
                cells.append(f"{t:.2f} s")
        print(f"| {case} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
