"""Benchmark the cost of dH next to a real MLIP: UncertaintyModel(MaceModel) vs MaceModel.

The question a MACE user asks: how much does monitoring every force call with dH cost?
Cases, on the same batch, in one process:

* ``mace``: torch-sim's ``MaceModel`` energy + forces (no stress) of the batch, with the
  committed test-fixture model of ``benchmarks/train_mace_cu.py`` (2 interactions,
  16x0e, max_L 0, r_max 5 Å): the reference cost.
* ``uncertainty_model``: ``UncertaintyModel(mace, bank)``: the same plus per-atom dH and the
  per-system max/mean/fraction (what a monitored MD step costs).
* ``dh_only``: ``bank.evaluate`` on the batch without autograd (the added part alone).

Batches (``--batches``): ``1x256`` (one 4x4x4 conventional FCC Cu cell, 256 atoms) and
``32x108`` (32 cells of 108 atoms), rattled with N(0, 0.05 Å); dtypes ``float64`` and
``float32`` (model, bank and state in the same dtype). Bank: the model's training set
(``benchmarks/models/mace_cu_emt_train.extxyz``, 4,800 environments, k = 32, r_c = 5 Å,
h = 0.015).

Note: MACE sets ``requires_grad`` on the state's positions in place (it differentiates the
energy with respect to them), so after the first call ``UncertaintyModel`` computes dH with an
autograd graph, as it does inside ``torch_sim.integrate``; the ``uncertainty_model`` case
measures that real path, ``dh_only`` the graph-free one.

One warm-up per case, then ``--repeats`` rounds that time every case once (round-robin, so
machine load hits every case alike); the median wall time per case (and the median process
CPU time, ``cpu_s``, less sensitive to other processes on a shared machine). One JSON line
per case and a summary line per batch and dtype with ``uncertainty_model / mace``.

``--baseline PATH`` also times another checkout's ``quests_torch`` (e.g. ``/work/main``,
imported under the name ``quests_torch_baseline``) in the same rounds: the cases
``baseline_uncertainty_model`` and ``baseline_dh_only`` and ``baseline_overhead`` in the
summary, so that a gain is told apart from a change of machine load.

Usage::

    python benchmarks/bench_mace.py
    python benchmarks/bench_mace.py --batches 1x256 --dtypes float32 --repeats 5 --threads 2
    python benchmarks/bench_mace.py --dtypes float32 --repeats 15 --baseline /work/main
    python benchmarks/bench_mace.py --dtypes float32 --md-steps 100 --repeats 3

``--md-steps N`` also times whole NVT Langevin runs (600 K, 2 fs) of N steps with MACE alone
and with ``UncertaintyModel``: per step, rebuilds of the bank's neighbour list included
(the per-call cases evaluate one state again and again, so their list is always reused).

Threads default to 1: on a shared 2-core machine two intra-op threads per process made MACE
several times slower (thread oversubscription); ``--threads 2`` measures the other case.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def _cases(mace, wrapped, bank, state, t, prefix: str = "") -> dict:
    def dh_only():
        with torch.no_grad():
            return bank.evaluate(t.positions.detach(), t.cell, t.pbc, t.system_idx)

    cases = {} if prefix else {"mace": lambda: mace(state)}
    cases[prefix + "uncertainty_model"] = lambda: wrapped(state)
    cases[prefix + "dh_only"] = dh_only
    return cases


def _md_runs(models: dict, state, steps: int, repeats: int, sync) -> dict:
    """Seconds per MD step of ``steps`` NVT Langevin steps at 600 K (2 fs) from ``state``,
    for every model (median over ``repeats`` rounds, round-robin), with the neighbour-list
    builds and reuses of the wrapped models' banks in the last round: the per-call cases
    time one state again and again (the list always reused), this is what an MD run pays,
    rebuilds included."""
    import torch_sim as ts

    nvt = ts.Integrator.nvt_langevin if hasattr(ts, "Integrator") else ts.nvt_langevin
    times: dict[str, list[float]] = {name: [] for name in models}
    lists = {}
    for _ in range(repeats):
        for name, model in models.items():
            cache = getattr(getattr(model, "bank", None), "neighbors", None)
            if cache is not None:
                cache.clear()
                cache.builds = cache.reuses = 0
            sync()
            t0 = time.perf_counter()
            ts.integrate(state.clone(), model, integrator=nvt, n_steps=steps,
                         temperature=600.0, timestep=0.002)  # fmt: skip
            sync()
            times[name].append((time.perf_counter() - t0) / steps)
            if cache is not None:
                lists[name] = {"builds": cache.builds, "reuses": cache.reuses}
    return {name: (statistics.median(v), lists.get(name)) for name, v in times.items()}


def _load_baseline(src: Path):
    """Another checkout's ``quests_torch`` package, imported as ``quests_torch_baseline``."""
    name = "quests_torch_baseline"
    init = src / "quests_torch" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline {src}: no quests_torch/__init__.py there")
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module, importlib.import_module(name + ".integrations.torch_sim")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1x256,32x108")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines here")
    parser.add_argument(
        "--baseline", type=Path, default=None, help="also time this checkout's quests_torch"
    )
    parser.add_argument(
        "--md-steps", type=int, default=0,
        help="also time NVT MD runs of this many steps (rebuilds of the neighbour list included)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import ase.io
    import torch_sim as ts
    import train_mace_cu as tm
    from ase.build import bulk
    from torch_sim.models.mace import MaceModel

    from quests_torch import UncertaintyBank
    from quests_torch.integrations.torch_sim import UncertaintyModel, state_tensors

    base = None if args.baseline is None else _load_baseline(args.baseline.resolve())
    device = torch.device(args.device)
    train = ase.io.read(tm.TRAIN_PATH, ":")
    lines = []

    def emit(record):
        line = json.dumps(record)
        print(line, flush=True)
        lines.append(line)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        bank = UncertaintyBank.from_atoms(train, dtype=dtype, device=device)
        mace = MaceModel(
            tm.load_mace(dtype=dtype, device=device),
            device=device,
            dtype=dtype,
            compute_forces=True,
            compute_stress=False,
        )
        wrapped = UncertaintyModel(mace, bank)
        if base is not None:
            base_bank = base[0].UncertaintyBank.from_descriptors(
                bank.descriptors, k=bank.k, cutoff=bank.cutoff, h=bank.h, dtype=dtype
            )
            base_wrapped = base[1].UncertaintyModel(mace, base_bank)
        for spec in args.batches.split(","):
            n_sys, n_atoms = (int(v) for v in spec.split("x"))
            rep = round((n_atoms / 4) ** (1 / 3))
            cells = []
            for i in range(n_sys):
                a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(rep)
                a.rattle(0.05, seed=i)
                cells.append(a)
            state = ts.io.atoms_to_state(cells, device, dtype)
            t = state_tensors(state)

            cases = _cases(mace, wrapped, bank, state, t)
            if base is not None:
                cases.update(_cases(mace, base_wrapped, base_bank, state, t, "baseline_"))
            times: dict[str, list[float]] = {c: [] for c in cases}
            cpu: dict[str, list[float]] = {c: [] for c in cases}
            for c in cases:  # warm-up
                cases[c]()
            for _ in range(args.repeats):
                for c in cases:
                    sync()
                    t0, c0 = time.perf_counter(), time.process_time()
                    cases[c]()
                    sync()
                    times[c].append(time.perf_counter() - t0)
                    cpu[c].append(time.process_time() - c0)
            med = {c: statistics.median(v) for c, v in times.items()}
            med_cpu = {c: statistics.median(v) for c, v in cpu.items()}
            meta = {
                "batch": spec,
                "atoms": int(state.n_atoms),
                "dtype": dtype_name,
                "bank": bank.n_references,
                "threads": args.threads,
                "device": str(device),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "load_1min": round(os.getloadavg()[0], 2),  # other work on a shared machine
            }
            if base is not None:
                meta["baseline"] = str(args.baseline)
            for c in cases:
                emit({"case": c, "median_s": round(med[c], 5), "cpu_s": round(med_cpu[c], 5),
                      "repeats": args.repeats, **meta})  # fmt: skip
            summary = {
                "batch": spec,
                "dtype": dtype_name,
                "threads": args.threads,
                "mace_s": round(med["mace"], 5),
                "uncertainty_model_s": round(med["uncertainty_model"], 5),
                "dh_only_s": round(med["dh_only"], 5),
                "overhead": round(med["uncertainty_model"] / med["mace"] - 1, 3),
                "overhead_cpu": round(med_cpu["uncertainty_model"] / med_cpu["mace"] - 1, 3),
            }
            if base is not None:
                b_model = med["baseline_uncertainty_model"]
                summary["baseline_uncertainty_model_s"] = round(b_model, 5)
                summary["baseline_dh_only_s"] = round(med["baseline_dh_only"], 5)
                summary["baseline_overhead"] = round(b_model / med["mace"] - 1, 3)
                summary["baseline_overhead_cpu"] = round(
                    med_cpu["baseline_uncertainty_model"] / med_cpu["mace"] - 1, 3
                )
            emit({"summary": summary})
            if args.md_steps:
                models = {"md_mace": mace, "md_uncertainty_model": wrapped}
                if base is not None:
                    models["md_baseline_uncertainty_model"] = base_wrapped
                runs = _md_runs(models, state, args.md_steps, args.repeats, sync)
                for name, (per_step, lists) in runs.items():
                    emit({"case": name, "per_step_s": round(per_step, 5), "steps": args.md_steps,
                          "neighbor_lists": lists, **meta})  # fmt: skip
                md = {name: v[0] for name, v in runs.items()}
                md_summary = {
                    "batch": spec,
                    "dtype": dtype_name,
                    "md_steps": args.md_steps,
                    "md_overhead": round(md["md_uncertainty_model"] / md["md_mace"] - 1, 3),
                }
                if base is not None:
                    md_summary["md_baseline_overhead"] = round(
                        md["md_baseline_uncertainty_model"] / md["md_mace"] - 1, 3
                    )
                emit({"md_summary": md_summary})
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
