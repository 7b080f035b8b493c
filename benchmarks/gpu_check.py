"""One command for a machine with CUDA: correctness on the GPU, the CUDA tests, paper-scale timings.

Run it where ``torch.cuda.is_available()`` (``make gpu-check``, or directly)::

    python benchmarks/gpu_check.py --out gpu_check.json             # everything, ~8 minutes
    python benchmarks/gpu_check.py --out gpu_check.json --scale 10  # sizes / 10, ~1 minute
    python benchmarks/gpu_check.py --out gpu_check.json --skip-tests --budget-s 300

Three parts, each recorded in the JSON (rewritten atomically after every step, so a run that
is stopped still leaves what it measured):

1. **checks**: every public path on CUDA tensors against the same call on the CPU
   (descriptors small and gridded, float32 with TF32 switched on globally, metrics called with
   ``device=DEV``, gradients, the uncertainty bank, screening under
   ``torch.use_deterministic_algorithms(True)``, compression, clusters, bitwise repeatability).
2. **tests**: ``pytest -k cuda`` on the test suite (the tests parametrised over devices).
3. **timings** at paper scale, each as a fraction of the peaks measured in the same run
   (float64/float32 GEMM, device-to-device copy bandwidth): descriptors of a 1,000,188-atom
   cell and of 10,000 small cells; exact entropy of 10^6 environments (float64, float32);
   dH of 10^7 environments against 10^5; the uncertainty bank on a 100k-atom batch and per
   MD step (256 atoms against 5,120 references); the entropy estimate of 10^7 environments
   from 10^4 sampled rows. Each large case is first timed at a tenth
   or a hundredth of its size and skipped (with the extrapolated time) when it would not fit
   in the remaining ``--budget-s``.

A kernel-sum pair costs ``2 (d + 2)`` flops in the GEMM (``d = 63``) plus one ``exp``; the
reported ``gemm_fraction`` is ``pairs * 2 (d + 2) / t / peak``. Below ~50 % of the float64
GEMM peak the tile epilogue (exp, sums) dominates: the case for a fused kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quests_torch as qt  # noqa: E402
from quests_torch import metrics  # noqa: E402
from quests_torch.structures import AtomsBatch  # noqa: E402

D = 63  # descriptor width for k = 32
DEV = "cuda"  # --dry-run-cpu runs every step on the CPU (to debug this script without a GPU)


class Report:
    def __init__(self, path: Path, budget_s: float):
        self.path = path
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.data: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".gpu_check.")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.data, fh, indent=1, default=str)
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def section(self, name: str):
        rec: dict = {}
        self.data["sections"][name] = rec
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            yield rec
            rec.setdefault("status", "ok")
        except Exception as exc:  # a failing section must not stop the others
            rec["status"] = "error"
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["traceback"] = traceback.format_exc()[-3000:]
            print(rec["traceback"], flush=True)
        finally:  # the section's wall time, apart from the `seconds` a timing stored
            rec["section_seconds"] = round(time.perf_counter() - t, 3)
            _empty_cache()
            shown = {k: v for k, v in rec.items() if k != "traceback"}
            print(f"   {name}: {json.dumps(shown, default=str)[:800]}", flush=True)
            self.save()


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _empty_cache() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


def _reset_peak() -> None:
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEV == "cuda" else float("nan")


def timed(fn, repeats: int = 1, warmup: int = 0) -> tuple[float, object]:
    out = None
    for _ in range(warmup):
        out = fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def maxdiff(a, b) -> float:
    a = a.detach().double().cpu() if isinstance(a, torch.Tensor) else torch.as_tensor(a).double()
    b = b.detach().double().cpu() if isinstance(b, torch.Tensor) else torch.as_tensor(b).double()
    return float((a - b).abs().max()) if a.numel() else 0.0


def fcc(reps, stdev=0.05, seed=0, a=3.61):
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=a, cubic=True) * reps
    rng = np.random.default_rng(seed)
    atoms.positions += rng.normal(0.0, stdev, atoms.positions.shape)
    return atoms


def thermal_like(n_cells: int, reps=(2, 2, 2), seed=0):
    """Small periodic Cu cells at several 'temperatures' (rattle amplitudes), strained."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_cells):
        atoms = fcc(reps, stdev=float(rng.uniform(0.02, 0.25)), seed=seed + i)
        atoms.set_cell(atoms.cell * rng.uniform(0.97, 1.05), scale_atoms=True)
        out.append(atoms)
    return out


# ---------------------------------------------------------------------------------- peaks
def peaks(rep: Report) -> dict:
    result = {}
    with rep.section("peaks") as rec:
        n = 8192 if DEV == "cuda" else 1024
        for dtype in (torch.float64, torch.float32):
            a = torch.randn(n, n, device=DEV, dtype=dtype)
            b = torch.randn(n, n, device=DEV, dtype=dtype)
            with qt.kde.full_precision():
                t, _ = timed(lambda a=a, b=b: a @ b, repeats=5, warmup=2)
            result[str(dtype)] = 2 * n**3 / t
            rec[f"gemm_{str(dtype)[6:]}_tflops"] = round(2 * n**3 / t / 1e12, 2)
            del a, b
        x = torch.empty(1 << (29 if DEV == "cuda" else 24), device=DEV, dtype=torch.float64)
        y = torch.empty_like(x)
        t, _ = timed(lambda x=x, y=y: y.copy_(x), repeats=5, warmup=1)
        result["bandwidth"] = 2 * x.numel() * 8 / t
        rec["copy_tb_s"] = round(result["bandwidth"] / 1e12, 3)
        del x, y
    return result


# ---------------------------------------------------------------------------------- checks
def checks(rep: Report) -> None:
    from ase.build import molecule

    from quests_torch import get_descriptors

    cells = [*thermal_like(6), fcc((3, 3, 3), seed=5)]
    mol = molecule("CH3CH2OH")
    mol.center(vacuum=4.0)

    with rep.section("check_descriptors") as rec:
        for name, s in (("cells", cells), ("molecule", mol), ("slab", _slab())):
            cpu = get_descriptors(s)
            gpu = get_descriptors(s, device=DEV)
            assert gpu.device.type == DEV and gpu.dtype == torch.float64
            rec[f"{name}_maxdiff"] = maxdiff(gpu, cpu)
            g32 = get_descriptors(s, device=DEV, dtype=torch.float32)
            rec[f"{name}_f32_maxdiff"] = maxdiff(g32, cpu)
        big = fcc((14, 14, 14), seed=3)  # 10,976 atoms: the cell-grid search
        for search in ("grid", "pairs"):
            cpu = get_descriptors(big, search=search)
            gpu = get_descriptors(big, device=DEV, search=search)
            rec[f"big_{search}_maxdiff"] = maxdiff(gpu, cpu)
        torch.backends.cuda.matmul.allow_tf32 = True  # must not matter
        try:
            g32 = get_descriptors(big, device=DEV, dtype=torch.float32)
            rec["big_f32_tf32_on_maxdiff"] = maxdiff(g32, cpu)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
        assert rec["cells_maxdiff"] < 1e-10 and rec["big_grid_maxdiff"] < 1e-10, rec
        assert rec["big_f32_tf32_on_maxdiff"] < 1e-3, rec

    x_cpu = get_descriptors(cells)
    with rep.section("check_metrics") as rec:
        x = x_cpu.to(DEV)
        y = x[::3] + 0.01
        pairs = {
            "entropy": (lambda d, **o: qt.entropy(x.to(d), **o)),
            "diversity": (lambda d, **o: qt.diversity(x.to(d), **o)),
            "delta_entropy": (lambda d, **o: qt.delta_entropy(y.to(d), x.to(d), **o)),
            "overlap": (lambda d, **o: qt.overlap(y.to(d), x.to(d), **o)),
            "novelty": (lambda d, **o: qt.novelty(y.to(d), x.to(d), **o)),
            "approx_dH": (lambda d, **o: metrics.approx_delta_entropy(y.to(d), x.to(d), **o)),
        }
        for name, fn in pairs.items():
            cpu = fn("cpu")
            gpu = fn(DEV, device=DEV)  # a bare "cuda" on cuda:0 tensors (issue 19.1)
            rec[name] = maxdiff(gpu, cpu)
        cpu = qt.log_kernel_sum(x.cpu(), x.cpu(), [0.015, 0.03])
        gpu = qt.log_kernel_sum(x, x, [0.015, 0.03], tile_size=(96, 160))
        rec["log_kernel_sum_2h_small_tiles"] = maxdiff(gpu, cpu)
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            rec["entropy_f32_tf32_on"] = maxdiff(qt.entropy(x.float()), qt.entropy(x.cpu()))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
        hs = metrics.entropy_per_structure(x, _sid(cells, x.device))
        rec["entropy_per_structure"] = maxdiff(
            hs, metrics.entropy_per_structure(x.cpu(), _sid(cells, "cpu"))
        )
        worst = max(v for k, v in rec.items() if k != "entropy_f32_tf32_on")
        assert worst < 1e-9, rec

    with rep.section("check_gradients") as rec:
        for tag, dev in (("cpu", "cpu"), ("gpu", DEV)):
            b = AtomsBatch.from_ase(cells[:3], device=dev)
            pos = b.positions.clone().requires_grad_(True)
            xd = qt.descriptors_from_tensors(pos, b.cell, b.pbc, b.system_idx)
            h = qt.entropy(xd)
            (g,) = torch.autograd.grad(h, pos)
            rec[f"grad_{tag}"] = g
        rec["entropy_grad_maxdiff"] = maxdiff(rec.pop("grad_gpu"), rec.pop("grad_cpu"))
        assert rec["entropy_grad_maxdiff"] < 1e-8, rec

    with rep.section("check_bank") as rec:
        out = {}
        for dev in ("cpu", DEV):
            bank = qt.UncertaintyBank.from_descriptors(x_cpu, k=32, cutoff=5.0, device=dev)
            hot = fcc((3, 3, 3), stdev=0.2, seed=9)
            b = AtomsBatch.from_ase([hot, cells[0]], device=dev)
            pos = b.positions.clone().requires_grad_(True)
            res = bank.evaluate(pos, b.cell, b.pbc, b.system_idx, threshold=0.0)
            (g,) = torch.autograd.grad(res.dH.sum(), pos)
            out[dev] = (res, g)
        (rc, gc), (rg, gg) = out["cpu"], out[DEV]
        rec["dH"] = maxdiff(rg.dH, rc.dH)
        rec["max_dH"] = maxdiff(rg.max_dH, rc.max_dH)
        rec["mean_dH"] = maxdiff(rg.mean_dH, rc.mean_dH)
        rec["grad"] = maxdiff(gg, gc)
        assert max(rec.values()) < 1e-8, rec

    with rep.section("check_screening_deterministic") as rec:
        frames = [fcc((3, 3, 3), stdev=s, seed=i) for i, s in enumerate((0.05, 0.3, 0.05, 0.4))]
        ref = qt.get_descriptors(cells)
        cpu = list(qt.screen_frames(frames, ref))
        torch.use_deterministic_algorithms(True)
        try:
            gpu = list(qt.screen_frames(frames, ref.to(DEV), device=DEV))
            gpu2 = list(qt.screen_frames(frames, ref.to(DEV), device=DEV))
        finally:
            torch.use_deterministic_algorithms(False)
        rec["dh_maxdiff"] = max(maxdiff(a.dh, b.dh) for a, b in zip(gpu, cpu, strict=True))
        rec["novel_fraction"] = [f.novel_fraction for f in gpu]
        rec["largest_cluster_equal"] = [
            a.largest_cluster == b.largest_cluster for a, b in zip(gpu, cpu, strict=True)
        ]
        rec["repeat_bitwise"] = all(
            torch.equal(a.dh, b.dh) and a.dH_mean == b.dH_mean
            for a, b in zip(gpu, gpu2, strict=True)
        )
        assert rec["dh_maxdiff"] < 1e-9 and all(rec["largest_cluster_equal"]), rec

    with rep.section("check_compression") as rec:
        sid = _sid(cells, "cpu")
        for method in ("msc", "fps", "k_means", "random"):
            cpu = qt.compress(x_cpu, sid, size=3, method=method, generator=0)
            gpu = qt.compress(
                x_cpu.to(DEV), sid.to(DEV), size=3, method=method, generator=0, device=DEV
            )
            rec[method] = [cpu.indices.tolist(), gpu.indices.tolist()]
        assert all(a == b for a, b in rec.values()), rec

    with rep.section("check_clusters_and_repeatability") as rec:
        b = AtomsBatch.from_ase(cells, device=DEV)
        mask = (
            torch.rand(
                b.positions.shape[0], device=DEV, generator=torch.Generator(DEV).manual_seed(0)
            )
            > 0.3
        )
        bc = b.to("cpu")
        s_gpu, _ = qt.largest_cluster(b.positions, b.cell, b.pbc, b.system_idx, mask)
        s_cpu, _ = qt.largest_cluster(bc.positions, bc.cell, bc.pbc, bc.system_idx, mask.cpu())
        rec["cluster_sizes_equal"] = bool(torch.equal(s_gpu.cpu(), s_cpu))
        x = x_cpu.to(DEV)
        rec["entropy_repeat_bitwise"] = bool(torch.equal(qt.entropy(x), qt.entropy(x)))
        dh = torch.randn(200_000, device=DEV, dtype=torch.float64)
        idx = torch.randint(0, 100, (200_000,), device=DEV)
        s1 = qt.per_structure_summary(dh, idx, 100)
        s2 = qt.per_structure_summary(dh, idx, 100)
        rec["summary_repeat_bitwise"] = bool(torch.equal(s1.mean_dH, s2.mean_dH))
        assert all(rec.values()), rec


def _slab():
    from ase.build import fcc111

    slab = fcc111("Cu", (4, 4, 4), vacuum=6.0)
    slab.rattle(0.05, seed=1)
    return slab


def _sid(structures, device):
    n = [len(s) for s in structures]
    return torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n)).to(device)


# ---------------------------------------------------------------------------------- tests
def run_tests(rep: Report, timeout: float) -> None:
    with rep.section("pytest_cuda") as rec:
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "cuda",  # the marker (conftest: also every test parametrised on a CUDA device)
            "-p",
            "no:cacheprovider",
            "tests",
        ]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            rec["returncode"] = proc.returncode
            rec["tail"] = (proc.stdout + proc.stderr)[-4000:]
            if proc.returncode != 0:
                rec["status"] = "failed"
        except subprocess.TimeoutExpired as exc:
            rec["status"] = "timeout"
            rec["tail"] = str(exc.stdout)[-3000:] if exc.stdout else ""


# ---------------------------------------------------------------------------------- timings
def pair_rate(rec: dict, pairs: float, seconds: float, peak: dict, dtype: torch.dtype) -> None:
    rec["pairs_per_s"] = pairs / seconds
    rec["gemm_fraction"] = round(pairs * 2 * (D + 2) / seconds / peak[str(dtype)], 4)


def timings(rep: Report, peak: dict, scale: int) -> None:
    from quests_torch import get_descriptors

    with rep.section("descriptors_1m_cell") as rec:
        s = max(3, round(20 / scale ** (1 / 3)))
        small = fcc((s, s, s), seed=1)  # 32,000 atoms: warm-up and the ladder's first rung
        t_small, _ = timed(lambda: get_descriptors(small, device=DEV), repeats=3, warmup=1)
        rec["atoms_small"], rec["seconds_small"] = len(small), round(t_small, 4)
        n_rep = max(4, round(63 / scale ** (1 / 3)))
        big = fcc((n_rep, n_rep, n_rep), seed=2)
        rec["atoms"] = len(big)
        _reset_peak()
        b = AtomsBatch.from_ase(big, device=DEV)
        repeats = 3 if t_small * len(big) / len(small) < 10 else 1
        t, x = timed(
            lambda: qt.descriptors_from_tensors(b.positions, b.cell, b.pbc),
            repeats=repeats,
            warmup=1 if repeats > 1 else 0,
        )
        rec["seconds"] = round(t, 4)
        rec["atoms_per_s"] = round(len(big) / t)
        rec["peak_gib"] = _peak_gib()
        t_ase, _ = timed(lambda: get_descriptors(big, device=DEV), repeats=1)
        rec["seconds_from_ase"] = round(t_ase, 4)
        del b, x

    with rep.section("descriptors_10k_cells") as rec:
        n_cells = 10_000 // scale
        t0 = time.perf_counter()
        cells = thermal_like(n_cells, reps=(2, 2, 2), seed=100)
        b = AtomsBatch.from_ase(cells, device=DEV)
        rec["host_prep_seconds"] = round(time.perf_counter() - t0, 3)
        rec["cells"], rec["atoms"] = n_cells, int(b.positions.shape[0])
        m = max(1, n_cells // 10)
        b10 = AtomsBatch.from_ase(cells[:m], device=DEV)
        t10, _ = timed(
            lambda: qt.descriptors_from_tensors(b10.positions, b10.cell, b10.pbc, b10.system_idx)
        )
        rec["seconds_tenth"] = round(t10, 4)
        repeats = 3 if t10 * 10 < 10 else 1
        if t10 * 10 > rep.left() / 4:
            raise RuntimeError(f"a tenth took {t10:.1f} s: the whole would not fit the budget")
        t, _ = timed(
            lambda: qt.descriptors_from_tensors(b.positions, b.cell, b.pbc, b.system_idx),
            repeats=repeats,
        )
        rec["seconds"] = round(t, 4)
        rec["cells_per_s"] = round(n_cells / t)
        del b

    # a million distinct environments: 256-atom thermal-like cells, descriptors on the device
    n_env = 1_000_000 // scale
    with rep.section("descriptors_256_atom_cells") as rec:
        t0 = time.perf_counter()
        cells = thermal_like(n_env // 256 + 1, reps=(4, 4, 4), seed=7)
        b = AtomsBatch.from_ase(cells, device=DEV)
        rec["host_prep_seconds"] = round(time.perf_counter() - t0, 3)
        rec["cells"], rec["atoms"] = len(cells), int(b.positions.shape[0])
        t, x1m = timed(
            lambda: qt.descriptors_from_tensors(b.positions, b.cell, b.pbc, b.system_idx)
        )
        rec["seconds"] = round(t, 4)
        rec["cells_per_s"] = round(len(cells) / t)
        del cells, b
    if rep.data["sections"]["descriptors_256_atom_cells"]["status"] != "ok":
        g = torch.Generator(DEV).manual_seed(0)  # timings only: random rows in a thermal range
        x1m = 0.2 + 0.3 * torch.rand(n_env, D, device=DEV, dtype=torch.float64, generator=g)
    x1m = x1m[:n_env].contiguous()
    rep.x1m = x1m  # the fused sections time the same rows

    for dtype in (torch.float64, torch.float32):
        name = f"entropy_{n_env}_{str(dtype)[6:]}"
        with rep.section(name) as rec:
            x = x1m.to(dtype)
            n0 = n_env // 10
            t0_, _ = timed(lambda x=x, n0=n0: qt.entropy(x[:n0]), repeats=1, warmup=1)
            rec["n_small"], rec["seconds_small"] = n0, round(t0_, 3)
            predicted = t0_ * 100
            rec["predicted_seconds"] = round(predicted, 1)
            if predicted > rep.left() - 120:
                rec["status"] = "skipped"
                rec["why"] = f"predicted {predicted:.0f} s, {rep.left():.0f} s left"
                pair_rate(rec, n0 * n0, t0_, peak, dtype)
                continue
            _reset_peak()
            t, h = timed(lambda x=x: qt.entropy(x), repeats=1)
            rec["n"], rec["seconds"], rec["H"] = n_env, round(t, 3), float(h)
            rec["peak_gib"] = _peak_gib()
            pair_rate(rec, n_env * n_env, t, peak, dtype)  # n^2: the sweep does about half
            if dtype == torch.float64:
                rep.data["_h64"] = float(h)
            elif "_h64" in rep.data:
                rec["rel_diff_vs_f64"] = abs(float(h) - rep.data["_h64"]) / rep.data["_h64"]

    with rep.section("dh_10m_vs_100k") as rec:
        n_ref = 100_000 // scale
        n_q = 10_000_000 // scale
        xref = x1m[:n_ref]
        g = torch.Generator(DEV).manual_seed(0)
        q = x1m.repeat(max(1, n_q // n_env), 1)[:n_q]
        q = q + 1e-3 * torch.randn(q.shape, device=DEV, dtype=q.dtype, generator=g)
        n0 = n_q // 10
        t0_, _ = timed(lambda q=q, n0=n0: qt.delta_entropy(q[:n0], xref), repeats=1, warmup=1)
        rec["n_small"], rec["seconds_small"] = n0, round(t0_, 3)
        predicted = t0_ * 10
        rec["predicted_seconds"] = round(predicted, 1)
        if predicted > rep.left() - 60:
            rec["status"] = "skipped"
            rec["why"] = f"predicted {predicted:.0f} s, {rep.left():.0f} s left"
            pair_rate(rec, n0 * n_ref, t0_, peak, torch.float64)
        else:
            _reset_peak()
            t, dh = timed(lambda q=q: qt.delta_entropy(q, xref), repeats=1)
            rec["n_query"], rec["n_ref"], rec["seconds"] = n_q, n_ref, round(t, 3)
            rec["peak_gib"] = _peak_gib()
            rec["fraction_above_0"] = float((dh > 0).double().mean())
            pair_rate(rec, n_q * n_ref, t, peak, torch.float64)

    with rep.section("entropy_estimate_10m") as rec:
        m = max(2, 10_000 // scale)
        t, est = timed(lambda: qt.estimate_entropy(q, rows=m, generator=0), repeats=1)
        rec.update(n=int(q.shape[0]), rows=est.rows, value=est.value, stderr=est.stderr)
        rec["seconds"] = round(t, 3)
        pair_rate(rec, m * q.shape[0], t, peak, torch.float64)
    q = None

    with rep.section("bank") as rec:
        bank = qt.UncertaintyBank.from_descriptors(x1m[:5120].cpu(), k=32, cutoff=5.0, device=DEV)
        md = fcc((4, 4, 4), stdev=0.1, seed=11)  # 256 atoms
        b = AtomsBatch.from_ase(md, device=DEV)
        t, _ = timed(lambda: bank(b.positions, b.cell, b.pbc), repeats=50, warmup=5)
        rec["md_step_256_atoms_vs_5120_ms"] = round(t * 1e3, 3)
        t, y = timed(lambda: bank.descriptors_of(b.positions, b.cell, b.pbc), repeats=50, warmup=5)
        rec["md_step_descriptors_only_ms"] = round(t * 1e3, 3)
        t, _ = timed(lambda: bank.prepared().log_kernel_sum(y, check_finite=False), repeats=50)
        rec["md_step_dh_prepared_only_ms"] = round(t * 1e3, 3)
        t, _ = timed(lambda: metrics.delta_entropy(y, bank.descriptors, bank.h), repeats=50)
        rec["md_step_dh_general_path_ms"] = round(t * 1e3, 3)
        n_s = min(100, bank.descriptors.shape[0] // 32)
        idx = torch.arange(n_s, device=DEV).repeat_interleave(32)
        xs = bank.descriptors[: 32 * n_s]
        t, _ = timed(lambda: metrics.entropy_per_structure(xs, idx), repeats=20)
        rec["entropy_per_structure_100x32_ms"] = round(t * 1e3, 3)
        s = max(3, round(29 / scale ** (1 / 3)))
        big = fcc((s, s, s), stdev=0.1, seed=12)  # 97,556 atoms at scale 1
        bb = AtomsBatch.from_ase(big, device=DEV)
        bank100k = qt.UncertaintyBank.from_descriptors(
            x1m[: 100_000 // scale].cpu(), k=32, cutoff=5.0, device=DEV
        )
        t, _ = timed(lambda: bank100k(bb.positions, bb.cell, bb.pbc), repeats=3, warmup=1)
        rec["batch_atoms"] = int(bb.positions.shape[0])
        rec["batch_vs_100k_seconds"] = round(t, 4)
        pos = bb.positions.clone().requires_grad_(True)
        t, _ = timed(
            lambda: torch.autograd.grad(bank100k(pos, bb.cell, bb.pbc).sum(), pos),
            repeats=1,
            warmup=1,
        )
        rec["batch_vs_100k_with_forces_seconds"] = round(t, 4)


def epilogue(rep: Report, peak: dict, scale: int) -> None:
    """Eager vs torch.compile'd tile epilogue, tile caps, block top-n vs torch.topk."""
    from quests_torch import kde
    from quests_torch.kde import epilogue as _epi  # noqa: F401 (submodules)

    g = torch.Generator(DEV).manual_seed(0)
    n = 500_000 // scale
    centres = 0.02 * torch.randn(1000, D, dtype=torch.float64, device=DEV, generator=g)
    pick = torch.randint(0, 1000, (n,), device=DEV, generator=g)
    x = centres[pick] + 1e-3 * torch.randn(n, D, dtype=torch.float64, device=DEV, generator=g)
    with rep.section("kernel_epilogue") as rec:
        rec["n"] = n
        values = {}
        for mode in ("0", "1"):
            os.environ["QUESTS_TORCH_COMPILE"] = mode
            t0 = time.perf_counter()
            kde.log_kernel_sum(x[:20000], x[:20000])
            sync()
            rec[f"first_call_compile{mode}_s"] = round(time.perf_counter() - t0, 2)
            for dtype in (torch.float64, torch.float32):
                tag = f"compile{mode}_{str(dtype)[6:]}"
                t, v = timed(lambda dtype=dtype: kde.log_kernel_sum(x, x, dtype=dtype), warmup=1)
                rec[f"entropy_{tag}_s"] = round(t, 3)
                rec[f"entropy_{tag}_gemm_fraction"] = round(
                    n * n / 2 * 2 * (D + 2) / t / peak[str(dtype)], 4
                )
                values[(mode, dtype)] = v
        for dtype in (torch.float64, torch.float32):
            diff = (values[("0", dtype)] - values[("1", dtype)]).abs().max()
            rec[f"max_dlogp_compiled_vs_eager_{str(dtype)[6:]}"] = float(diff)
        rec["epilogue_failed"] = str(kde.epilogue.Epilogue.failed)
        os.environ.pop("QUESTS_TORCH_COMPILE", None)
        t, _ = timed(lambda: kde.log_kernel_sum(x, x, tile_size=16384), warmup=1)
        rec["entropy_f64_tile16384_s"] = round(t, 3)
        tile = -100 * torch.rand(8192, 8192, dtype=torch.float64, device=DEV, generator=g)
        for k in (3, 8):
            t, ref = timed(lambda k=k: torch.topk(tile, k, dim=1), repeats=5, warmup=1)
            rec[f"topk_8192sq_k{k}_ms"] = round(t * 1e3, 3)
            t, got = timed(lambda k=k: kde.topk.tile_top(tile, k), repeats=5, warmup=1)
            rec[f"tile_top_8192sq_k{k}_ms"] = round(t * 1e3, 3)
            rec[f"tile_top_equal_k{k}"] = bool(torch.equal(got[0], ref.values))
        q = x[: 2_000_000 // scale // 4].repeat(4, 1)
        t, _ = timed(lambda: kde.nearest_neighbors(q, x[: 100_000 // scale], 3), warmup=1)
        rec["nearest_2m_vs_100k_n3_s"] = round(t, 3)


def _with_kernel(kernel: str, fn, *args):
    from quests_torch.kde import fused

    os.environ[fused.KERNEL_ENV] = kernel
    return fn(*args)


def fused_kernels(rep: Report, peak: dict, scale: int) -> None:
    """The fused Triton kernel sums (``QUESTS_TORCH_KERNEL=triton``) beside the torch path in
    the same run: agreement, then the timed cases of issue 29 with their pair rates and GEMM
    shares (the torch path's figures are those of the `timings` sections)."""
    from quests_torch import kde
    from quests_torch.kde import fused

    with rep.section("fused_agreement") as rec:
        if not fused.triton_available():
            rec["status"] = "skipped"
            rec["why"] = "triton is not importable"
            return
        import triton

        rec["triton"] = triton.__version__
        g = torch.Generator(DEV).manual_seed(1)
        n, m = max(200, 20_000 // scale), max(50, 5000 // scale)
        x = 0.2 + 0.3 * torch.rand(n, D, device=DEV, dtype=torch.float64, generator=g)
        y = x[:m] + 1e-3 * torch.randn(m, D, device=DEV, dtype=torch.float64, generator=g)
        lw = torch.linspace(-2.0, 1.0, m, device=DEV, dtype=torch.float64)
        cases = {
            "entropy": lambda dtype: qt.entropy(x.to(dtype)),
            "log_p_cross": lambda dtype: kde.log_kernel_sum(x.to(dtype), y.to(dtype)),
            "log_p_2h": lambda dtype: kde.log_kernel_sum(
                x.to(dtype), y.to(dtype), [0.01, 0.015, 0.05]
            ),
            "log_p_weights": lambda dtype: kde.log_kernel_sum(
                x.to(dtype), y.to(dtype), log_weights=lw
            ),
            "dH_far": lambda dtype: qt.delta_entropy(x[:100].to(dtype) + 1.0, y.to(dtype)),
        }

        def rel(a, b) -> float:  # |d log p| / max(1, |log p|): relative in p near log p = 0
            a, b = a.double(), b.double()
            return float(((a - b).abs() / b.abs().clamp_min(1.0)).max())

        for name, fn in cases.items():
            os.environ[fused.KERNEL_ENV] = "torch"
            exact = fn(torch.float64)
            rec[f"{name}_float64_max_rel"] = rel(_with_kernel("triton", fn, torch.float64), exact)
            # float32: each path against float64 (GEMM-expansion rounding differs between them)
            for kernel in ("torch", "triton"):
                rec[f"{name}_float32_{kernel}_vs_f64"] = rel(
                    _with_kernel(kernel, fn, torch.float32), exact
                )
        rec["fp64_dot"] = fused.dot_status()
        os.environ.pop(fused.KERNEL_ENV, None)

    x = getattr(rep, "x1m", None)  # the rows the torch path's sections timed
    if x is None:
        g = torch.Generator(DEV).manual_seed(2)
        x = 0.2 + 0.3 * torch.rand(1_000_000 // scale, D, device=DEV, dtype=torch.float64,
                                   generator=g)  # fmt: skip
    n = x.shape[0]
    os.environ[fused.KERNEL_ENV] = "triton"
    try:
        for dtype in (torch.float64, torch.float32):
            with rep.section(f"fused_entropy_{n}_{str(dtype)[6:]}") as rec:
                xd = x.to(dtype)
                n0 = n // 10
                t0_, _ = timed(lambda xd=xd, n0=n0: qt.entropy(xd[:n0]), warmup=1)
                rec["n_small"], rec["seconds_small"] = n0, round(t0_, 3)
                if t0_ * 100 > rep.left() - 90:
                    rec["status"], rec["why"] = "skipped", f"predicted {t0_ * 100:.0f} s"
                    continue
                t, h = timed(lambda xd=xd: qt.entropy(xd))
                rec["n"], rec["seconds"], rec["H"] = n, round(t, 3), float(h)
                pair_rate(rec, n * n, t, peak, dtype)  # every pair evaluated (no symmetry)
                torch_rec = rep.data["sections"].get(f"entropy_{n}_{str(dtype)[6:]}", {})
                if "seconds" in torch_rec:
                    rec["torch_path_seconds"] = torch_rec["seconds"]
                    rec["speedup"] = round(torch_rec["seconds"] / t, 2)
                    rec["H_rel_diff_vs_torch"] = abs(float(h) - torch_rec["H"]) / torch_rec["H"]
        with rep.section("fused_dh_10m_vs_100k") as rec:
            n_ref, n_q = 100_000 // scale, 10_000_000 // scale
            g = torch.Generator(DEV).manual_seed(0)  # the queries of `dh_10m_vs_100k`
            q = x.repeat(max(1, n_q // n), 1)[:n_q]
            q = q + 1e-3 * torch.randn(q.shape, device=DEV, dtype=q.dtype, generator=g)
            n0 = n_q // 10
            t0_, _ = timed(lambda: qt.delta_entropy(q[:n0], x[:n_ref]), warmup=1)
            rec["n_small"], rec["seconds_small"] = n0, round(t0_, 3)
            if t0_ * 10 > rep.left() - 60:
                rec["status"], rec["why"] = "skipped", f"predicted {t0_ * 10:.0f} s"
            else:
                t, dh = timed(lambda: qt.delta_entropy(q, x[:n_ref]))
                rec["seconds"] = round(t, 3)
                rec["fraction_above_0"] = float((dh > 0).double().mean())
                pair_rate(rec, n_q * n_ref, t, peak, torch.float64)
                torch_rec = rep.data["sections"].get("dh_10m_vs_100k", {})
                if "seconds" in torch_rec:
                    rec["torch_path_seconds"] = torch_rec["seconds"]
                    rec["speedup"] = round(torch_rec["seconds"] / t, 2)
            with rep.section("fused_entropy_estimate_10m") as rec2:
                m = max(2, 10_000 // scale)
                t, est = timed(lambda: qt.estimate_entropy(q, rows=m, generator=0))
                rec2.update(n=int(q.shape[0]), rows=est.rows, value=est.value)
                torch_value = rep.data["sections"].get("entropy_estimate_10m", {}).get("value")
                if torch_value is not None:
                    rec2["value_rel_diff_vs_torch"] = abs(est.value - torch_value) / abs(
                        torch_value
                    )
                rec2["seconds"] = round(t, 3)
                pair_rate(rec2, m * q.shape[0], t, peak, torch.float64)
                torch_rec = rep.data["sections"].get("entropy_estimate_10m", {})
                if "seconds" in torch_rec:
                    rec2["torch_path_seconds"] = torch_rec["seconds"]
                    rec2["speedup"] = round(torch_rec["seconds"] / t, 2)
    finally:
        os.environ.pop(fused.KERNEL_ENV, None)


#: a production-size MACE of the family of the committed fixture: the architecture of
#: MACE-MP-0 "small" (128 scalar channels, L = 3 messages, correlation 3, r_max 6 Å), built
#: with random weights (the time of a call does not depend on the weights)
MACE_MP_SMALL = {
    "r_max": 6.0,
    "num_bessel": 8,
    "num_polynomial_cutoff": 5,
    "max_ell": 3,
    "num_interactions": 2,
    "hidden_irreps": "128x0e",
    "MLP_irreps": "16x0e",
    "correlation": 3,
    "radial_MLP": [64, 64, 64],
    "atomic_numbers": [29],
    "interaction_first": "RealAgnosticInteractionBlock",
    "interaction": "RealAgnosticResidualInteractionBlock",
}


def md_step_fused(rep: Report, scale: int, steps: int = 60) -> None:
    """The steady MD step of ``UncertaintyBank`` on the torch path and on the fused kernels
    (``QUESTS_TORCH_KERNEL=triton``: descriptors from the Verlet list, dH, summaries; issue 26
    item 1), in the same run: 1 x 256 atoms (``forward``) and 32 x 108 (``evaluate``) against
    5,120 references, float64 and float32; medians of synchronised steps of 0.01 Å moves,
    and the largest difference of the two paths on the same step."""
    from quests_torch import _triton

    with rep.section("md_step_fused") as rec:
        if not _triton.triton_available():
            rec["status"], rec["why"] = "skipped", "triton is not importable"
            return
        r = max(2, round(4 / scale ** (1 / 3)))
        cases = {"1x256": [fcc((r, r, r), stdev=0.1, seed=11)], "32x108": _cu_cells(32, 108)}
        steps = max(7, steps // scale)
        for name, cells in cases.items():
            b = AtomsBatch.from_ase(cells[: max(1, len(cells) // scale)], device=DEV)
            for dtype in (torch.float64, torch.float32):
                probe = qt.UncertaintyBank(torch.zeros(1, D, dtype=dtype, device=DEV))
                y = probe.descriptors_of(b.positions.to(dtype), b.cell.to(dtype), b.pbc,
                                         b.system_idx)  # fmt: skip
                g = torch.Generator(DEV).manual_seed(0)
                reps = -(-5120 // y.shape[0])
                x = (y.repeat(reps, 1)[:5120] + 2e-3 * torch.randn(5120, D, device=DEV,
                     dtype=dtype, generator=g))  # fmt: skip
                moves = [b.positions.to(dtype) + 0.01 * torch.randn(b.positions.shape,
                         device=DEV, dtype=dtype, generator=g) for _ in range(steps)]  # fmt: skip
                batch = (b.cell.to(dtype), b.pbc, b.system_idx)
                out = {}
                for kernel in ("torch", "triton"):
                    os.environ[_triton.KERNEL_ENV] = kernel
                    bank = qt.UncertaintyBank(x)
                    step = bank.evaluate if name != "1x256" else bank
                    for p in moves[:5]:  # a search, the list built, warm-up
                        step(p, *batch)
                    times = []
                    for p in moves[5:]:
                        sync()
                        t0 = time.perf_counter()
                        step(p, *batch)
                        sync()
                        times.append(time.perf_counter() - t0)
                    res = step(moves[-1], *batch)
                    out[kernel] = res if name == "1x256" else res.dH
                    key = f"{name}_{str(dtype)[6:]}_{kernel}"
                    rec[f"{key}_ms"] = round(float(np.median(times)) * 1e3, 4)
                    rec[f"{key}_builds"] = bank.neighbors.builds
                rec[f"{name}_{str(dtype)[6:]}_max_diff"] = maxdiff(out["torch"], out["triton"])
        os.environ.pop(_triton.KERNEL_ENV, None)


def _cu_cells(n_sys: int, n_atoms: int, seed: int = 0) -> list:
    reps = max(1, round((n_atoms / 4) ** (1 / 3)))
    return [fcc((reps, reps, reps), stdev=0.05, seed=seed + i) for i in range(n_sys)]


def mace_costs(rep: Report, scale: int, batches=("1x256", "1x4000", "32x108"), calls=20) -> None:
    """The cost of dH next to MACE as users run it: torch-sim's ``MaceModel`` alone and wrapped
    in ``UncertaintyModel`` (a bank of the fixture's training environments), the committed
    fixture and a production-size model, float32 and float64; medians of ``calls`` round-robin
    calls, synchronised."""
    try:
        import torch_sim as ts
        from torch_sim.models.mace import MaceModel

        sys.path.insert(0, str(ROOT / "benchmarks"))
        import train_mace_cu as tm
    except ImportError as exc:
        with rep.section("mace") as rec:
            rec["status"], rec["why"] = "skipped", f"not installed: {exc}"
        return
    import ase.io

    from quests_torch._triton import KERNEL_ENV as _TRITON_ENV
    from quests_torch._triton import triton_available
    from quests_torch.integrations.torch_sim import UncertaintyModel

    triton_ok = triton_available()
    train = ase.io.read(tm.TRAIN_PATH, ":")
    models = {
        "fixture_16ch": lambda dtype: tm.load_mace(dtype=dtype, device=DEV),
        "mace_mp_small_random": lambda dtype: (
            tm.build_mace(MACE_MP_SMALL, atomic_energy=-3.7, scale=1.0, avg_num_neighbors=40.0)
            .to(device=DEV, dtype=dtype)
            .eval()
        ),
    }
    for name, build in models.items():
        for dtype in (torch.float32, torch.float64):
            with rep.section(f"mace_{name}_{str(dtype)[6:]}") as rec:
                torch.manual_seed(0)
                bank = qt.UncertaintyBank.from_atoms(train, dtype=dtype, device=DEV)
                mace = MaceModel(build(dtype), device=torch.device(DEV), dtype=dtype,
                                 compute_forces=True, compute_stress=False)  # fmt: skip
                wrapped = UncertaintyModel(mace, bank)
                rec["bank"] = bank.n_references
                for spec in batches:
                    n_sys, n_atoms = (int(v) for v in spec.split("x"))
                    n_atoms = max(4, n_atoms // scale)
                    state = ts.io.atoms_to_state(_cu_cells(n_sys, n_atoms), DEV, dtype)
                    cases = {"mace": mace, "wrapped": partial(_with_kernel, "torch", wrapped)}
                    if triton_ok:  # the same wrapper on the fused kernels (issue 26 item 1)
                        cases["fused"] = partial(_with_kernel, "triton", wrapped)
                    times: dict[str, list[float]] = {c: [] for c in cases}
                    for c in cases:  # warm-up: compile, caches, the bank's neighbour list
                        cases[c](state)
                        cases[c](state)
                    for _ in range(calls):
                        for c, fn in cases.items():
                            sync()
                            t0 = time.perf_counter()
                            fn(state)
                            sync()
                            times[c].append(time.perf_counter() - t0)
                    med = {c: float(np.median(v)) for c, v in times.items()}
                    rec[f"{spec}_atoms"] = int(state.n_atoms)
                    rec[f"{spec}_mace_ms"] = round(med["mace"] * 1e3, 3)
                    rec[f"{spec}_wrapped_ms"] = round(med["wrapped"] * 1e3, 3)
                    rec[f"{spec}_added_percent"] = round(
                        100 * (med["wrapped"] / med["mace"] - 1), 1
                    )
                    if "fused" in med:
                        rec[f"{spec}_fused_ms"] = round(med["fused"] * 1e3, 3)
                        rec[f"{spec}_fused_added_percent"] = round(
                            100 * (med["fused"] / med["mace"] - 1), 1
                        )
    os.environ.pop(_TRITON_ENV, None)


def screening_end_to_end(rep: Report, scale: int) -> None:
    """A trajectory of 10^6 atoms (at scale 1) screened end to end from its extxyz file:
    frames and atoms per second and the time shares of reading, descriptors, kernel sums and
    clusters (the stage timings of :func:`quests_torch.screening.screen_trajectory`)."""
    import ase.io

    from quests_torch import screening

    with rep.section("screening_end_to_end") as rec:
        n_frames, per = max(4, 2000 // scale), 500
        work = Path(tempfile.mkdtemp(prefix="gpu_check_screen_"))
        traj = work / "md.extxyz"
        t0 = time.perf_counter()
        frames = [fcc((5, 5, 5), stdev=0.05 + 0.1 * (i % 7 == 0), seed=i) for i in range(n_frames)]
        ase.io.write(traj, frames)
        rec["write_seconds"] = round(time.perf_counter() - t0, 2)
        ref = qt.get_descriptors(frames[1 : max(2, n_frames // 50)], device=DEV)
        rec.update(frames=n_frames, atoms=n_frames * per, references=int(ref.shape[0]))
        # in process, then with reader processes on the node's spare cores (the same table)
        n_readers = max(2, (os.cpu_count() or 2) - 2)
        for readers in (0, n_readers):
            key = "" if readers == 0 else f"readers_{readers}_"
            table = work / f"t{readers}.csv"
            res = screening.screen_trajectory(traj, ref, table, device=DEV, readers=readers)
            sync()
            rec[f"{key}seconds"] = round(res.seconds, 3)
            rec[f"{key}frames_per_s"] = round(n_frames / res.seconds, 1)
            rec[f"{key}atoms_per_s"] = round(n_frames * per / res.seconds)
            # stage seconds (reading runs in a prefetch thread, overlapping the others)
            stages = res.timings.as_dict()
            rec[f"{key}stage_seconds"] = stages
            busy = sum(stages.values())
            rec[f"{key}stage_shares"] = (
                {k: round(v / busy, 3) for k, v in stages.items()} if busy else {}
            )
        rec["tables_equal"] = (work / "t0.csv").read_bytes() == table.read_bytes()
        shutil_rm(work)


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--budget-s", type=float, default=480.0, help="total wall-time budget")
    ap.add_argument("--scale", type=int, default=1, help="divide the timed sizes by this")
    ap.add_argument("--dry-run-cpu", action="store_true", help="every step on the CPU")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-timings", action="store_true")
    ap.add_argument("--test-timeout", type=float, default=150.0)
    groups = ("timings", "fused", "step", "mace", "screening", "epilogue")
    ap.add_argument(
        "--only",
        default=",".join(groups),
        help="timed groups to run, comma-separated (default all)",
    )
    args = ap.parse_args(argv)
    global DEV
    if args.dry_run_cpu:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print(
            "gpu_check: CUDA is not available here (--dry-run-cpu to test the script)",
            file=sys.stderr,
        )
        return 2
    rep = Report(args.out, args.budget_s)
    rep.data["env"] = {"device": DEV}
    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        rep.data["env"].update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            sms=props.multi_processor_count,
        )
    rep.data["env"].update(
        {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "quests_torch": qt.__version__,
            "git": _git(),
        }
    )
    rep.save()
    peak = peaks(rep)
    checks(rep)
    if not args.skip_tests:
        run_tests(rep, min(args.test_timeout, max(30.0, rep.left() - 240)))
    if not args.skip_timings and peak:
        only = set(args.only.split(","))
        if "timings" in only:
            timings(rep, peak, args.scale)
        if "fused" in only:
            fused_kernels(rep, peak, args.scale)
        if "step" in only:
            md_step_fused(rep, args.scale)
        if "mace" in only:
            mace_costs(rep, args.scale)
        if "screening" in only:
            screening_end_to_end(rep, args.scale)
        if "epilogue" in only:
            epilogue(rep, peak, args.scale)
    rep.save()
    bad = [k for k, v in rep.data["sections"].items() if v.get("status") in ("error", "failed")]
    print(f"gpu_check: {len(rep.data['sections'])} sections, problems: {bad or 'none'}")
    return 1 if bad else 0


def _git() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
