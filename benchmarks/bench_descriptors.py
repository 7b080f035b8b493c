"""Benchmark QUESTS descriptors: quests_torch against upstream ``quests`` on the same data.

Cases (k = 32, cutoff = 5 Å unless changed; structures built deterministically, untimed):

- ``fcc100k``: one FCC Cu cubic supercell, a = 3.58 Å, 29x29x30 cells (100,920 atoms),
  rattled 0.05 Å, periodic;
- ``cells2000``: 2,000 FCC Cu 2x2x2 cubic cells (32 atoms each), rattled 0.05 Å, periodic;
- ``ethanol5000``: 5,000 ethanol molecules (9 atoms each), rattled 0.05 Å, non-periodic;
- ``fcc1m`` (only when asked for): a 1,000,188-atom cell, the bounded-memory scaling check.

Each implementation runs in its own subprocess (this script re-invoked with ``--worker``),
so its peak resident memory is its own: a small warm-up call (numba JIT compile, torch
thread pools) comes first, then the resident set size is read, then one full-size warm-up
call and ``--repeats`` timed calls. Reported per case, one JSON line on stdout (and
appended to ``--out``): median seconds of each, speedup = reference / ours, max |diff|
between the two outputs, peak RSS (absolute, and above the pre-computation baseline),
versions, thread counts and the machine.

Usage::

    python benchmarks/bench_descriptors.py                       # all cases
    python benchmarks/bench_descriptors.py --cases ethanol5000 --repeats 5
    python benchmarks/bench_descriptors.py --no-reference --dtype float32 --out bench.jsonl
    python benchmarks/bench_descriptors.py --cases fcc100k --search pairs   # vesin pair list
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk, molecule

SEED = 2025
RATTLE = 0.05  # Å
CASES = ("fcc100k", "cells2000", "ethanol5000", "fcc1m")
DEFAULT_CASES = ("fcc100k", "cells2000", "ethanol5000")
IMPLS = ("ours", "reference")


# --------------------------------------------------------------------------- structures


def fcc_supercell() -> list[Atoms]:
    """One 29x29x30 cubic FCC Cu supercell (a = 3.58 Å, 100,920 atoms), rattled."""
    atoms = bulk("Cu", "fcc", a=3.58, cubic=True).repeat((29, 29, 30))
    rng = np.random.default_rng(SEED)
    atoms.positions += rng.normal(0.0, RATTLE, size=atoms.positions.shape)
    return [atoms]


def fcc_million() -> list[Atoms]:
    """One 63x63x63 cubic FCC Cu supercell (1,000,188 atoms), rattled: the scaling check."""
    atoms = bulk("Cu", "fcc", a=3.58, cubic=True).repeat((63, 63, 63))
    rng = np.random.default_rng(SEED)
    atoms.positions += rng.normal(0.0, RATTLE, size=atoms.positions.shape)
    return [atoms]


def replicas(template: Atoms, count: int) -> list[Atoms]:
    """``count`` copies of ``template``, each with its own Gaussian rattle (vectorised)."""
    rng = np.random.default_rng(SEED)
    noise = rng.normal(0.0, RATTLE, size=(count, len(template), 3))
    out = []
    for shift in noise:
        atoms = template.copy()
        atoms.positions += shift
        out.append(atoms)
    return out


def fcc_cells() -> list[Atoms]:
    """2,000 rattled 32-atom FCC Cu cells (2x2x2 cubic, a = 3.58 Å), periodic."""
    return replicas(bulk("Cu", "fcc", a=3.58, cubic=True).repeat((2, 2, 2)), 2000)


def ethanols() -> list[Atoms]:
    """5,000 rattled ethanol molecules, non-periodic, zero cell."""
    template = molecule("CH3CH2OH")
    template.pbc = False
    return replicas(template, 5000)


BUILDERS: dict[str, Callable[[], list[Atoms]]] = {
    "fcc100k": fcc_supercell,
    "cells2000": fcc_cells,
    "ethanol5000": ethanols,
    "fcc1m": fcc_million,
}


def warmup_structures(case: str) -> list[Atoms]:
    """A small structure that takes the same code path as ``case`` (for JIT/threads)."""
    if case == "ethanol5000":
        atoms = molecule("CH3CH2OH")
        atoms.pbc = False
        return [atoms]
    return replicas(bulk("Cu", "fcc", a=3.58, cubic=True).repeat((3, 3, 3)), 1)


# --------------------------------------------------------------------------- implementations


def ours_fn(
    k: int, cutoff: float, dtype: str, search: str = "auto"
) -> Callable[[list[Atoms]], np.ndarray]:
    """Return a callable computing quests_torch descriptors as a float64 NumPy array."""
    import torch

    import quests_torch

    torch_dtype = getattr(torch, dtype)

    def run(structures: list[Atoms]) -> np.ndarray:
        out = quests_torch.get_descriptors(
            structures, k=k, cutoff=cutoff, dtype=torch_dtype, search=search
        )
        return out.detach().to("cpu", torch.float64).numpy()

    return run


def reference_fn(k: int, cutoff: float, dtype: str) -> Callable[[list[Atoms]], np.ndarray]:
    """Return a callable computing upstream ``quests`` descriptors (always float64)."""
    from quests.descriptor import get_descriptors

    del dtype  # upstream computes in float64 whatever it is asked to return

    def run(structures: list[Atoms]) -> np.ndarray:
        return get_descriptors(structures, k=k, cutoff=cutoff)

    return run


# --------------------------------------------------------------------------- worker


def current_rss_mib() -> float:
    """Resident set size of this process now, MiB (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_rss_mib()


def peak_rss_mib() -> float:
    """Peak resident set size of this process, MiB (ru_maxrss is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def set_threads(threads: int | None, impl: str) -> int:
    """Apply ``--threads`` to the implementation's thread pool; return the count in use."""
    if impl == "ours":
        import torch

        if threads:
            torch.set_num_threads(threads)
        return torch.get_num_threads()
    import numba

    if threads:
        numba.set_num_threads(threads)
    return numba.get_num_threads()


def time_calls(
    fn: Callable[[list[Atoms]], np.ndarray], structures: list[Atoms], repeats: int
) -> tuple[list[float], np.ndarray]:
    """One untimed full-size call, then ``repeats`` timed calls; return times and output."""
    out = fn(structures)
    times = []
    for _ in range(repeats):
        del out
        start = time.perf_counter()
        out = fn(structures)
        times.append(time.perf_counter() - start)
    return times, out


def worker(args: argparse.Namespace) -> dict:
    """Time one implementation on one case in this process; save its output if asked."""
    case, impl = args.worker
    result: dict = {"impl": impl}
    try:
        if impl == "ours":
            fn = ours_fn(args.k, args.cutoff, args.dtype, args.search)
        else:
            fn = reference_fn(args.k, args.cutoff, args.dtype)
        result["threads"] = set_threads(args.threads, impl)
        structures = BUILDERS[case]()
        fn(warmup_structures(case))
    except Exception as exc:  # missing package or API: report, do not crash the run
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    rss_before = current_rss_mib()
    times, out = time_calls(fn, structures, args.repeats)
    peak = peak_rss_mib()
    result.update(
        times_s=[round(t, 4) for t in times],
        median_s=round(statistics.median(times), 4),
        peak_rss_mib=round(peak, 1),
        peak_rss_delta_mib=round(peak - rss_before, 1),
        shape=list(out.shape),
    )
    if args.save:
        np.save(args.save, out)
    return result


# --------------------------------------------------------------------------- driver


def run_worker(case: str, impl: str, args: argparse.Namespace, save: Path) -> dict:
    """Run ``worker`` for (case, impl) in a fresh subprocess and return its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, impl]
    cmd += ["--k", str(args.k), "--cutoff", str(args.cutoff), "--dtype", args.dtype]
    cmd += ["--repeats", str(args.repeats), "--save", str(save), "--search", args.search]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"impl": impl, "error": f"worker exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def max_abs_diff(path_a: Path, path_b: Path) -> float | None:
    """Max |a - b| of two saved outputs, or None if either is missing or shapes differ."""
    if not (path_a.exists() and path_b.exists()):
        return None
    a, b = np.load(path_a), np.load(path_b)
    if a.shape != b.shape:
        return None
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def versions() -> dict:
    """Versions of torch, quests_torch and quests (None where not importable)."""
    import importlib.metadata as md

    found = {}
    for dist in ("torch", "quests-torch", "quests", "numba", "ase", "numpy"):
        try:
            found[dist.replace("-", "_") + "_version"] = md.version(dist)
        except md.PackageNotFoundError:
            found[dist.replace("-", "_") + "_version"] = None
    return found


def cpu_model() -> str | None:
    """CPU model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine() -> dict:
    """Processor, core count and load average at the start of the case."""
    return {
        "machine": platform.machine(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
    }


def case_record(case: str, args: argparse.Namespace, tmp: Path) -> dict:
    """Benchmark both implementations on ``case`` and combine into one JSON record."""
    structures = BUILDERS[case]()
    record: dict = {
        "case": case,
        "n_atoms": sum(len(a) for a in structures),
        "n_structures": len(structures),
        "k": args.k,
        "cutoff": args.cutoff,
        "dtype": args.dtype,
        "search": args.search,
        "repeats": args.repeats,
        **machine(),
    }
    del structures
    impls = [i for i in IMPLS if not getattr(args, f"no_{i}")]
    results = {impl: run_worker(case, impl, args, tmp / f"{case}-{impl}.npy") for impl in impls}
    for impl in IMPLS:
        res = results.get(impl, {"error": "skipped"})
        for key in ("median_s", "times_s", "peak_rss_mib", "peak_rss_delta_mib", "threads"):
            record[f"{impl}_{key}"] = res.get(key)
        record[f"{impl}_error"] = res.get("error")
    ours, ref = record["ours_median_s"], record["reference_median_s"]
    record["speedup"] = round(ref / ours, 3) if ours and ref else None
    record["max_abs_diff"] = max_abs_diff(tmp / f"{case}-ours.npy", tmp / f"{case}-reference.npy")
    record.update(versions())
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--worker`` and ``--save`` are internal)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(DEFAULT_CASES))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (median taken)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: library's)")
    parser.add_argument(
        "--search",
        choices=("auto", "grid", "pairs"),
        default="auto",
        help="quests_torch neighbour search (pairs: dense/vesin pair lists, no cell grid)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip upstream quests")
    parser.add_argument("--no-ours", action="store_true", help="skip quests_torch")
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here too")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"`--repeats` must be >= 1, got {args.repeats}")
    if args.worker and (args.worker[0] not in CASES or args.worker[1] not in IMPLS):
        parser.error(f"`--worker` must be CASE IMPL with IMPL in {IMPLS}, got {args.worker}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the selected cases and print one JSON line per case."""
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="bench_descriptors_") as tmp:
        for case in args.cases:
            line = json.dumps(case_record(case, args, Path(tmp)))
            print(line, flush=True)
            if args.out:
                with args.out.open("a") as fh:
                    fh.write(line + "\n")


if __name__ == "__main__":
    main()
