"""Benchmark the tiled KDE engine (entropy, dH) against the upstream ``quests`` reference.

Every case runs in its own subprocess (so its peak RSS is its own): one warm-up, then the
median of ``--repeats`` timed runs. One JSON line per case on stdout (and in ``--out``), then
a summary line with the speed-ups measured in this run.

Data: thermal Cu from EMT molecular dynamics (ASE, Langevin, 2 fs steps, fixed seeds):
a 256-atom FCC cell at 300 K and the same cell melted at 3000 K and held at 1500 K, one frame
every 10 steps, 100 frames each (51,200 environments). Descriptors from upstream
``quests.descriptor.get_descriptors`` (k = 32, r_c = 5 Å) when installed, else from
``quests_torch.get_descriptors``. Cached in ``--data-dir`` (default: the system temp dir).
Sets (after one fixed shuffle): entropy of the first 20,000 environments; dH of the
environments 40,000-49,999 (queries) against the first 40,000 (references).

Throughput is reported as kernel evaluations per second, ``n * m / t`` (``n^2 / t`` for an
entropy, although the symmetric sweep evaluates only half of the pairs), and as a fraction of
this CPU's matrix-multiply peak::

    fraction = evaluated_pairs * 2 * (d + 2) / t / peak_gemm_flops

where ``2 (d + 2)`` is the flop count of one augmented GEMM entry (``d = 63``) and
``peak_gemm_flops`` is measured in the same run (best of a 2048^3 ``torch.mm``; about
130 GFLOP/s float64 and 260 float32 on the project's 2-core machine). The ``exp`` of every
pair is not counted in the flops.

Usage::

    python benchmarks/bench_kde.py                      # all cases, reference included
    python benchmarks/bench_kde.py --scaling            # + entropy of 1,000,000 (memmap)
    python benchmarks/bench_kde.py --cases dh_f64,dh_reference --repeats 5
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
REF_BATCH = 10_000
N_ENTROPY, N_REF, N_QUERY = 20_000, 40_000, 10_000
ALL_CASES = [
    "gemm_peak",
    "entropy_f64",
    "entropy_f32",
    "entropy_reference",
    "dh_f64",
    "dh_f32",
    "dh_reference",
    "entropy40k_f64",
]


# ------------------------------------------------------------------------------------ data


def _md_frames(temperature_k, n_frames, seed, melt_k=None, every=10, equilibrate=400):
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
    if melt_k is not None:
        atoms.set_cell(atoms.cell * 1.05 ** (1 / 3), scale_atoms=True)
    atoms.calc = EMT()
    start_k = melt_k if melt_k is not None else temperature_k
    thermalize_momenta(atoms, temperature_K=start_k, rng=rng)
    if melt_k is not None:
        Langevin(
            atoms, 2 * units.fs, temperature_K=melt_k, friction=0.05, fixcm=False, rng=rng
        ).run(equilibrate)
    dyn = Langevin(
        atoms, 2 * units.fs, temperature_K=temperature_k, friction=0.02, fixcm=False, rng=rng
    )
    dyn.run(equilibrate)
    frames = []
    for _ in range(n_frames):
        dyn.run(every)
        frame = atoms.copy()
        frame.calc = None
        frames.append(frame)
    return frames


def _descriptors(frames) -> tuple[np.ndarray, str]:
    try:
        from quests.descriptor import get_descriptors

        return get_descriptors(frames, k=32, cutoff=5.0), "quests.descriptor.get_descriptors"
    except ImportError:
        import quests_torch

        if not hasattr(quests_torch, "get_descriptors"):
            raise SystemExit(
                "need upstream `quests` or quests_torch.get_descriptors to make descriptors"
            ) from None
        x = quests_torch.get_descriptors(frames)
        return np.asarray(
            x.detach().cpu().numpy(), dtype=np.float64
        ), "quests_torch.get_descriptors"


def ensure_data(data_dir: Path) -> Path:
    path = data_dir / "bench_kde_cu_thermal.npy"
    if path.exists():
        return path
    data_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    solid = _md_frames(300.0, 100, seed=1)
    liquid = _md_frames(1500.0, 100, seed=2, melt_k=3000.0)
    x, source = _descriptors(solid + liquid)
    x = x[np.random.default_rng(0).permutation(len(x))]
    np.save(path, np.ascontiguousarray(x, dtype=np.float64))
    print(
        json.dumps(
            {
                "event": "data",
                "path": str(path),
                "n": len(x),
                "descriptors": source,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        ),
        file=sys.stderr,
    )
    return path


def ensure_scaling_data(base: Path, n: int) -> Path:
    """``n`` environments: the thermal set repeated with 1e-3 Gaussian noise, as a memmap."""
    path = base.with_name(f"bench_kde_scaling_{n}.npy")
    if path.exists():
        return path
    x = np.load(base)
    rng = np.random.default_rng(1)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(n, x.shape[1]))
    for i0 in range(0, n, len(x)):
        i1 = min(i0 + len(x), n)
        out[i0:i1] = x[: i1 - i0] + rng.normal(0.0, 1e-3, size=(i1 - i0, x.shape[1]))
    out.flush()
    del out
    return path


# ------------------------------------------------------------------------------------ child


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _timed(fn, repeats: int, warmup: bool = True):
    if warmup:
        fn()
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return times, value


def run_case(case: str, data: Path, repeats: int, scaling_n: int) -> dict:
    import torch

    record: dict = {"case": case, "torch_threads": torch.get_num_threads()}
    x_all = np.load(data)
    d = x_all.shape[1]
    ent = np.ascontiguousarray(x_all[:N_ENTROPY])
    refs = np.ascontiguousarray(x_all[:N_REF])
    queries = np.ascontiguousarray(x_all[N_REF : N_REF + N_QUERY])

    if case == "gemm_peak":
        out = {}
        for dt in (torch.float64, torch.float32):
            a = torch.randn(2048, 2048, dtype=dt)
            b = torch.randn(2048, 2048, dtype=dt)
            c = torch.empty(2048, 2048, dtype=dt)
            times, _ = _timed(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), max(repeats, 10))
            out[str(dt).split(".")[-1]] = 2 * 2048**3 / min(times) / 1e9
        record.update(
            {"gflops_float64": round(out["float64"], 1), "gflops_float32": round(out["float32"], 1)}
        )
        return record

    if case.endswith("reference"):
        import numba
        from quests.entropy import delta_entropy as q_delta_entropy
        from quests.entropy import entropy as q_entropy

        record["numba_threads"] = numba.get_num_threads()
        record["batch_size"] = REF_BATCH
        base = _current_rss_mb()
        if case == "entropy_reference":
            fn = lambda: float(q_entropy(ent, H, batch_size=REF_BATCH))  # noqa: E731
            n, m, evaluated = N_ENTROPY, N_ENTROPY, N_ENTROPY**2
        else:
            fn = lambda: q_delta_entropy(queries, refs, H, batch_size=REF_BATCH)  # noqa: E731
            n, m, evaluated = N_QUERY, N_REF, N_QUERY * N_REF
        times, value = _timed(fn, repeats)
        dtype = "float64"
    else:
        import quests_torch.metrics as qm

        dtype = "float32" if case.endswith("f32") else "float64"
        tdt = torch.float32 if dtype == "float32" else torch.float64
        if case.startswith("scaling"):
            mm = np.load(data.with_name(f"bench_kde_scaling_{scaling_n}.npy"), mmap_mode="r")
            base = _current_rss_mb()
            fn = lambda: qm.entropy(mm, H, dtype=tdt)  # noqa: E731
            n = m = scaling_n
            evaluated = n * (n + 1) // 2
            repeats, warm = 1, False
        else:
            warm = True
            if case.startswith("entropy40k"):
                x = torch.from_numpy(refs).to(tdt)
                n = m = N_REF
            elif case.startswith("entropy"):
                x = torch.from_numpy(ent).to(tdt)
                n = m = N_ENTROPY
            if case.startswith("entropy"):
                base = _current_rss_mb()
                fn = lambda: qm.entropy(x, H)  # noqa: E731
                evaluated = n * (n + 1) // 2  # symmetric sweep: upper triangle of tiles
            else:
                q = torch.from_numpy(queries).to(tdt)
                r = torch.from_numpy(refs).to(tdt)
                base = _current_rss_mb()
                fn = lambda: qm.delta_entropy(q, r, H)  # noqa: E731
                n, m = N_QUERY, N_REF
                evaluated = n * m
        times, value = _timed(fn, repeats, warmup=warm)
    median = float(np.median(times))
    if isinstance(value, float) or getattr(value, "ndim", 1) == 0:
        record["value"] = float(value)
    else:
        record["value_mean"] = float(np.asarray(value, dtype=np.float64).mean())
    record.update(
        {
            "dtype": dtype,
            "n": n,
            "m": m,
            "d": d,
            "median_s": round(median, 4),
            "min_s": round(min(times), 4),
            "times_s": [round(t, 4) for t in times],
            "kernel_evals_per_s": float(f"{n * m / median:.4g}"),
            "evaluated_pairs": evaluated,
            "gemm_gflops": round(evaluated * 2 * (d + 2) / median / 1e9, 2),
            "peak_rss_mb": round(_rss_mb(), 1),
            "rss_before_mb": round(base, 1),
        }
    )
    return record


# ------------------------------------------------------------------------------------ parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(ALL_CASES))
    parser.add_argument(
        "--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "quests-torch-bench"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the upstream cases")
    parser.add_argument("--scaling", action="store_true", help="entropy of --scaling-n (memmap)")
    parser.add_argument("--scaling-n", type=int, default=1_000_000)
    parser.add_argument("--scaling-dtype", choices=["f64", "f32"], default="f64")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_case(args.child, args.data, args.repeats, args.scaling_n)))
        return

    data = ensure_data(args.data_dir)
    cases = [c for c in args.cases.split(",") if c]
    try:
        import quests  # noqa: F401

        have_reference = True
    except ImportError:
        have_reference = False
    if args.no_reference or not have_reference:
        cases = [c for c in cases if not c.endswith("reference")]
    if args.scaling:
        ensure_scaling_data(data, args.scaling_n)
        cases.append(f"scaling_{args.scaling_dtype}")

    header = {
        "event": "machine",
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "reference_installed": have_reference,
        "data": str(data),
    }
    try:
        import torch

        header["torch"] = torch.__version__
        header["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    lines = [header]
    print(json.dumps(header), flush=True)
    results = {}
    for case in cases:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            case,
            "--data",
            str(data),
            "--repeats",
            str(args.repeats),
            "--scaling-n",
            str(args.scaling_n),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            rec = {"case": case, "error": proc.stderr.strip().splitlines()[-1:]}
        else:
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
        results[case] = rec
        lines.append(rec)
        print(json.dumps(rec), flush=True)

    summary = {"event": "summary"}
    peak = results.get("gemm_peak", {})
    for case, rec in results.items():
        if "gemm_gflops" in rec and peak:
            key = "gflops_float32" if rec.get("dtype") == "float32" else "gflops_float64"
            summary[f"{case}_fraction_of_gemm_peak"] = round(rec["gemm_gflops"] / peak[key], 3)
    for base in ("entropy", "dh"):
        ref = results.get(f"{base}_reference", {}).get("median_s")
        for dt in ("f64", "f32"):
            ours = results.get(f"{base}_{dt}", {}).get("median_s")
            if ref and ours:
                summary[f"{base}_{dt}_speedup_vs_reference"] = round(ref / ours, 2)
    lines.append(summary)
    print(json.dumps(summary), flush=True)
    if args.out is not None:
        with open(args.out, "a") as fh:
            for rec in lines:
                fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
