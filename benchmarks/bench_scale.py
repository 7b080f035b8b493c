"""The pipeline at scale: ten million environments on one CPU node, timed with peak memory.

Data (built once into ``--data-dir``, not timed): FCC Cu cells of 500 atoms (5x5x5 cubic,
a = 3.61 Å). EMT Langevin MD at 300, 600, 900, 1200 and 1500 K and a melt at 2000 K gives
``base`` frames; each is then copied many times with Gaussian displacements of 0.005-0.05 Å
(a fresh draw per copy, so no two environments are equal) until ``--n-envs`` atoms are
written, in a shuffled order (any prefix mixes all temperatures), as one extxyz trajectory.
The reference is a separate 300-900 K set (another MD seed) of ``--ref`` environments:
the "training set" a model would have seen, so hot and molten frames come out novel.

Stages, each in its own Python process (so each reports its own wall time and peak RSS,
as a user running them one by one would see):

- ``store``: descriptors of the whole trajectory streamed into a
  :class:`quests_torch.DescriptorStore` (frames read with ``ase.io.iread``, batches
  appended; never all in memory);
- ``dh``: dH of every environment of the store against the reference;
- ``estimate``: the entropy estimate of the whole store from ``--rows`` sampled rows, with
  its standard error;
- ``exact``: exact entropy of a ``--exact-subset`` prefix of the store, read tile by tile
  from the memmap; and the estimate of that same subset, to check its error bar;
- ``screen``: :func:`quests_torch.screening.screen_trajectory` of the whole trajectory
  against the reference (descriptors, dH, clusters, the resumable per-frame table);
- ``upstream``: upstream ``quests`` (numba) on the largest sizes it finishes within
  ``--upstream-seconds`` per kernel, with ours on the same rows in the same run.

Usage::

    python benchmarks/bench_scale.py --data-dir /tmp/qt-scale            # 10 M (the issue's)
    python benchmarks/bench_scale.py --n-envs 200000 --exact-subset 20000 --rows 2000 \\
        --ref 5000 --upstream-seconds 0 --quick-md                         # ~1 min (the test)

Writes one JSON line per stage and a final ``summary`` line (pipeline seconds excluding data
generation, the largest peak RSS, the estimate and its standard error) to ``--out`` and stdout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ATOMS_PER_FRAME = 500  # 5 x 5 x 5 cubic FCC cells
TEMPERATURES = (300.0, 600.0, 900.0, 1200.0, 1500.0)
MELT_K = 2000.0
REF_TEMPERATURES = (300.0, 600.0, 900.0)
H = 0.015
STAGES = ("store", "dh", "estimate", "exact", "screen")


# ------------------------------------------------------------------------------------ data


def _md(temperature_k: float, n_frames: int, seed: int, equilibrate: int, every: int) -> list:
    """``n_frames`` EMT Langevin frames of a 500-atom Cu cell at ``temperature_k``."""
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin

    try:
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:  # ASE < 3.28
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (5, 5, 5)
    if temperature_k >= MELT_K:
        atoms.set_cell(atoms.cell * 1.05 ** (1 / 3), scale_atoms=True)  # liquid density
    atoms.calc = EMT()
    thermalize_momenta(atoms, temperature_K=temperature_k, rng=rng)
    dyn = Langevin(
        atoms, 2 * units.fs, temperature_K=temperature_k, friction=0.05, fixcm=False, rng=rng
    )
    dyn.run(equilibrate)
    frames = []
    for _ in range(n_frames):
        dyn.run(every)
        frame = atoms.copy()
        frame.calc = None
        frames.append(frame)
    return frames


def _write_frame(fh, positions: np.ndarray, cell: np.ndarray) -> None:
    lattice = " ".join(f"{v:.8f}" for v in cell.ravel())
    fh.write(f'{len(positions)}\nLattice="{lattice}" Properties=species:S:1:pos:R:3 pbc="T T T"\n')
    np.savetxt(fh, positions, fmt="Cu %.8f %.8f %.8f")


def _variants(base: list, n_frames: int, rng: np.random.Generator):
    """``n_frames`` (positions, cell): base frames in a shuffled order, freshly displaced."""
    which = rng.permutation(np.arange(n_frames) % len(base))
    for i in which:
        atoms = base[i]
        sigma = rng.uniform(0.005, 0.05)
        pos = atoms.positions + rng.normal(0.0, sigma, atoms.positions.shape)
        yield pos, atoms.cell.array


def build_data(args: argparse.Namespace) -> dict:
    """Write (once) the trajectory and the reference; return their description."""
    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    n_frames = -(-args.n_envs // ATOMS_PER_FRAME)
    n_ref_frames = -(-args.ref // ATOMS_PER_FRAME)
    md = (2, 30, 5) if args.quick_md else (6, 150, 15)  # frames/temperature, equilibrate, every
    tag = f"{n_frames}x{ATOMS_PER_FRAME}" + ("q" if args.quick_md else "")
    info = {
        "trajectory": str(data / f"scale_traj_{tag}.extxyz"),
        "reference": str(data / f"scale_ref_{n_ref_frames}x{ATOMS_PER_FRAME}.npy"),
        "frames": n_frames,
        "environments": n_frames * ATOMS_PER_FRAME,
        "reference_environments": n_ref_frames * ATOMS_PER_FRAME,
    }
    meta = data / f"scale_{tag}_ref{n_ref_frames}.json"
    if meta.exists() and json.loads(meta.read_text()) == info:
        return info
    t0 = time.perf_counter()
    per_t, equilibrate, every = md
    base = []
    for j, t in enumerate((*TEMPERATURES, MELT_K)):
        base += _md(t, per_t, seed=100 + j, equilibrate=equilibrate, every=every)
    rng = np.random.default_rng(7)
    tmp = info["trajectory"] + ".tmp"
    with open(tmp, "w") as fh:
        for pos, cell in _variants(base, n_frames, rng):
            _write_frame(fh, pos, cell)
    os.replace(tmp, info["trajectory"])

    import quests_torch as qt

    ref_base = []
    for j, t in enumerate(REF_TEMPERATURES):
        ref_base += _md(t, per_t, seed=200 + j, equilibrate=equilibrate, every=every)
    frames = []
    for pos, cell in _variants(ref_base, n_ref_frames, np.random.default_rng(8)):
        a = ref_base[0].copy()
        a.positions, a.cell = pos, cell
        frames.append(a)
    x = qt.get_descriptors(frames).numpy()
    np.save(info["reference"] + ".tmp.npy", x)
    os.replace(info["reference"] + ".tmp.npy", info["reference"])
    meta.write_text(json.dumps(info))
    _log({"event": "data", **info, "seconds": round(time.perf_counter() - t0, 1)})
    return info


# ------------------------------------------------------------------------------------ stages


def _log(record: dict) -> None:
    print(json.dumps(record), file=sys.stderr, flush=True)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _store_path(args) -> Path:
    return Path(args.data_dir) / f"scale_{args.n_envs}_{args.dtype}.qstore"


def stage(name: str, args: argparse.Namespace, info: dict) -> dict:
    """Run one stage in this process; return its record (without the RSS)."""
    import torch

    import quests_torch as qt
    from quests_torch.metrics import fraction_above

    dtype = getattr(torch, args.dtype)
    ref = np.load(info["reference"])
    record: dict = {"stage": name, "dtype": args.dtype}
    t0 = time.perf_counter()
    if name == "store":
        store = qt.write_descriptor_store(
            info["trajectory"], _store_path(args), dtype=dtype, overwrite=True, progress=True
        )
        record.update(rows=len(store), width=int(store.x.shape[1]))
    elif name == "dh":
        store = qt.open_store(_store_path(args))
        dh = qt.delta_entropy(store, ref, H, dtype=dtype)
        out = Path(args.data_dir) / f"scale_{args.n_envs}_{args.dtype}_dh.npy"
        np.save(str(out) + ".tmp.npy", dh.numpy())  # for checks against the screening table
        os.replace(str(out) + ".tmp.npy", out)
        record.update(
            rows=int(dh.shape[0]),
            reference=int(ref.shape[0]),
            fraction_above_0=float(fraction_above(dh, 0.0)),
            max_dH=float(dh.max()),
        )
    elif name == "estimate":
        store = qt.open_store(_store_path(args))
        est = qt.estimate_entropy(store, H, rows=args.rows, generator=0, dtype=dtype)
        record.update(H=est.value, stderr=est.stderr, rows=est.rows, n=est.n)
    elif name == "exact":
        store = qt.open_store(_store_path(args))
        sub = store.x[: args.exact_subset]
        exact = float(qt.entropy(sub, H, dtype=dtype))
        record["seconds_exact"] = round(time.perf_counter() - t0, 2)
        est = qt.estimate_entropy(sub, H, rows=args.rows, generator=1, dtype=dtype)
        record.update(
            n=int(sub.shape[0]),
            H_exact=exact,
            H_estimate=est.value,
            stderr=est.stderr,
            rows=est.rows,
            z=(est.value - exact) / est.stderr if est.stderr > 0 else 0.0,
        )
    elif name == "screen":
        table = Path(args.data_dir) / f"scale_{args.n_envs}_{args.dtype}_screen.csv"
        res = qt.screen_trajectory(
            info["trajectory"], ref, table, dtype=dtype, overwrite=True, progress=True
        )
        record.update(
            frames=res.frames_screened,
            atoms_per_second=round(info["environments"] / res.seconds),
            timings={k: round(v, 2) for k, v in vars(res.timings).items()},
        )
    elif name == "upstream":
        record.update(upstream(args, info, ref, dtype))
    else:
        raise SystemExit(f"unknown stage {name!r}")
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def _largest(sizes, run, budget: float, available: int) -> list[dict]:
    """Run ``run(n)`` on growing sizes (at most ``available``, the rows there are) while the
    next would still fit in ``budget`` s."""
    out = []
    for n in [n for n in sizes if n < available] + [available]:
        if n > sizes[-1]:
            break
        t0 = time.perf_counter()
        extra = run(n)
        dt = time.perf_counter() - t0
        out.append({"n": n, "seconds": round(dt, 2), **extra})
        if dt * 4 > budget:  # every kernel here grows at least linearly, entropy as n^2
            break
    return out


def upstream(args, info: dict, ref: np.ndarray, dtype) -> dict:
    """Upstream ``quests`` on the largest sizes it finishes within the budget, beside ours."""
    import ase.io
    from quests.descriptor import get_descriptors as q_descriptors
    from quests.entropy import delta_entropy as q_delta_entropy
    from quests.entropy import entropy as q_entropy

    import quests_torch as qt

    budget = args.upstream_seconds
    frames = []
    for atoms in ase.io.iread(info["trajectory"], index=":"):
        frames.append(atoms)
        if len(frames) * ATOMS_PER_FRAME >= 2_000_000:
            break
    q_descriptors(frames[:40], k=32, cutoff=5.0)  # numba warm-up (JIT not timed)

    def desc(n):
        fr = frames[: n // ATOMS_PER_FRAME]
        t0 = time.perf_counter()
        qt.get_descriptors(fr)
        ours = time.perf_counter() - t0
        q_descriptors(fr, k=32, cutoff=5.0)
        return {"ours_seconds": round(ours, 2)}

    sizes = [20_000, 100_000, 500_000, 1_000_000, 2_000_000]
    rows = _largest(sizes, desc, budget, len(frames) * ATOMS_PER_FRAME)
    x = np.asarray(q_descriptors(frames[: rows[-1]["n"] // ATOMS_PER_FRAME], k=32, cutoff=5.0))
    q_entropy(x[:2000], H)  # warm-up

    def ent(n):
        t0 = time.perf_counter()
        float(qt.entropy(x[:n], H, dtype=dtype))
        ours = time.perf_counter() - t0
        float(q_entropy(x[:n], H))
        return {"ours_seconds": round(ours, 2)}

    def dh(n):
        t0 = time.perf_counter()
        qt.delta_entropy(x[:n], ref, H, dtype=dtype)
        ours = time.perf_counter() - t0
        q_delta_entropy(x[:n], ref, H)
        return {"ours_seconds": round(ours, 2)}

    return {
        "descriptors": rows,
        "entropy": _largest([10_000, 20_000, 50_000, 100_000, 200_000], ent, budget, len(x)),
        "dH_vs_reference": _largest([10_000, 50_000, 200_000, 1_000_000], dh, budget, len(x)),
        "upstream_version": importlib.metadata.version("quests"),
    }


# ------------------------------------------------------------------------------------ main


def _child(name: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--stage", name]
    run = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if run.returncode != 0:
        raise SystemExit(f"stage {name} failed (exit {run.returncode})")
    return json.loads(run.stdout.strip().splitlines()[-1])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-envs", type=int, default=10_000_000, help="environments in the set")
    p.add_argument("--ref", type=int, default=20_000, help="reference environments")
    p.add_argument("--rows", type=int, default=10_000, help="rows of the entropy estimate")
    p.add_argument("--exact-subset", type=int, default=1_000_000, help="rows of the exact H")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--data-dir", default="/tmp/quests-torch-scale")
    p.add_argument("--out", default=None, help="append the JSON lines here")
    p.add_argument("--upstream-seconds", type=float, default=300.0, help="0: skip upstream")
    p.add_argument("--quick-md", action="store_true", help="short MD for the base frames")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # child process
    args = p.parse_args(argv)
    for name in ("n_envs", "ref", "rows", "exact_subset"):
        if getattr(args, name) < 2:
            p.error(f"--{name.replace('_', '-')} must be at least 2")
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    info = build_data(args)
    if args.stage is not None:
        record = stage(args.stage, args, info)
        record["peak_rss_gb"] = round(_peak_rss_gb(), 3)
        print(json.dumps(record), flush=True)
        return
    import torch

    head = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "environments": info["environments"],
        "reference": info["reference_environments"],
        "date": time.strftime("%Y-%m-%d"),
    }
    names = [s for s in args.stages.split(",") if s]
    if args.upstream_seconds > 0:
        names.append("upstream")
    records = []
    for name in names:
        record = {**head, **_child(name, argv)}
        records.append(record)
        _emit(record, args.out)
    pipeline = [r for r in records if r["stage"] in STAGES]
    summary = {
        **head,
        "stage": "summary",
        "dtype": args.dtype,
        "pipeline_seconds": round(sum(r["seconds"] for r in pipeline), 1),
        "peak_rss_gb": max(r["peak_rss_gb"] for r in pipeline) if pipeline else None,
        "stages": {r["stage"]: r["seconds"] for r in records},
    }
    est = next((r for r in records if r["stage"] == "estimate"), None)
    if est is not None:
        summary.update(H_estimate=est["H"], H_stderr=est["stderr"])
    _emit(summary, args.out)


def _emit(record: dict, out: str | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
