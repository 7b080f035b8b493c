"""float32-only mode against float64 on one device: errors and times (issue 19).

For each case the float64 result is computed with ``QUESTS_TORCH_FLOAT64=1`` and the
float32-only one with ``QUESTS_TORCH_FLOAT64=0`` (on MPS only the latter runs; the float64
reference then runs on the CPU). Data: the thermal Cu descriptors of
``tests/data/kde_reference.npz`` (1,536 environments) tiled ``--copies`` times with noise for
the kernel sums; rattled 4x4x4 FCC Cu cells (256 atoms) for the descriptors and the bank.
One warm-up, then the median of ``--repeats`` runs; one JSON line per case.

Usage::

    python benchmarks/bench_float32.py --device cuda
    python benchmarks/bench_float32.py --device mps --copies 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import quests_torch as qt
from quests_torch._precision import float64_enabled, float64_is_fast

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "kde_reference.npz"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _timed(fn, device, repeats: int):
    out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _with_env(value: str, fn):
    old = os.environ.get("QUESTS_TORCH_FLOAT64")
    os.environ["QUESTS_TORCH_FLOAT64"] = value
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["QUESTS_TORCH_FLOAT64"]
        else:
            os.environ["QUESTS_TORCH_FLOAT64"] = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--cells", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from ase.build import bulk

    dev = qt.structures.resolve_device(args.device)
    ref_dev = dev if dev.type != "mps" else torch.device("cpu")
    print(json.dumps({"device": str(dev), "float64_is_fast": float64_is_fast(dev),
                      "float64_enabled_by_default": float64_enabled(dev)}))  # fmt: skip
    with np.load(DATA) as f:
        base = np.concatenate([f["x_solid"], f["x_liquid"]])
        query = f["x_query"]
    rng = np.random.default_rng(0)
    x = np.concatenate([base + rng.normal(0, 1e-3, base.shape) for _ in range(args.copies)])
    x64 = torch.from_numpy(x).to(ref_dev)
    x32 = torch.from_numpy(x.astype(np.float32)).to(dev)
    q64, q32 = torch.from_numpy(query).to(ref_dev), torch.from_numpy(query).float().to(dev)
    atoms = []
    for s in range(args.cells):
        a = bulk("Cu", "fcc", a=3.61, cubic=True) * (4, 4, 4)
        a.positions += np.random.default_rng(s).normal(0, 0.1, a.positions.shape)
        atoms.append(a)

    cases = {
        "entropy": (lambda: qt.entropy(x64), lambda: qt.entropy(x32)),
        "delta_entropy": (lambda: qt.delta_entropy(q64, x64), lambda: qt.delta_entropy(q32, x32)),
        "descriptors": (
            lambda: qt.get_descriptors(atoms, device=ref_dev),
            lambda: qt.get_descriptors(atoms, device=dev),
        ),
    }
    for name, (f64, f32) in cases.items():
        r64, t64 = _with_env("1", lambda f=f64: _timed(f, ref_dev, args.repeats))
        r32, t32 = _with_env("0", lambda f=f32: _timed(f, dev, args.repeats))
        err = (r32.detach().cpu().double() - r64.detach().cpu()).abs()
        scale = r64.detach().cpu().abs().max().clamp(min=1e-300)
        row = {"case": name, "n": int(x.shape[0]), "float64_s": t64, "float32_only_s": t32,
               "dtype": str(r32.dtype), "max_abs_err": float(err.max()),
               "max_rel_err": float(err.max() / scale)}  # fmt: skip
        print(json.dumps(row))


if __name__ == "__main__":
    main()
