"""Benchmark the cost of dH next to NequIP: UncertaintyModel(NequIPFrameworkModel) vs the model.

The NequIP counterpart of ``bench_mace.py`` (run it in the environment of
``make test-ts06-nequip``: torch-sim 0.6, nequip 0.19, Python 3.12). Cases, on the same batch,
in one process:

* ``nequip``: torch-sim's ``NequIPFrameworkModel`` energy + forces + stress of the batch, with
  a NequIP built by nequip's ``NequIPGNNModel`` with its default sizes (4 layers, l_max 1,
  32 features, radial MLP 1 x 128), r_max 5 Å, random weights (seed 7): the cost of a
  NequIP of the usual size, whatever its weights; eager mode (not compiled by nequip-compile).
* ``uncertainty_model``: ``UncertaintyModel(nequip, bank)``: the same plus per-atom dH and the
  per-system max/mean/fraction (what a monitored MD step costs).
* ``dh_only``: ``bank.evaluate`` on the batch without autograd (the added part alone).

Batches (``--batches``): ``1x256`` (one 4x4x4 conventional FCC Cu cell) and ``32x108``, rattled
with N(0, 0.05 Å); float64 (torch-sim's NequIP model is float64, and so the state and the
bank). Bank: the MACE fixture's training set (``benchmarks/models/mace_cu_emt_train.extxyz``,
4,800 environments, k = 32, r_c = 5 Å, h = 0.015), as in ``bench_mace.py``.

One warm-up per case, then ``--repeats`` rounds that time every case once (round-robin), the
median wall and process CPU time per case; one JSON line per case and a summary line per batch
and dtype with ``uncertainty_model / nequip``.

Usage::

    .venv-ts06-nequip/bin/python benchmarks/bench_nequip.py
    .venv-ts06-nequip/bin/python benchmarks/bench_nequip.py --batches 1x256 --repeats 15
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TRAIN_PATH = HERE / "models" / "mace_cu_emt_train.extxyz"
R_MAX = 5.0


def nequip_model(dtype: torch.dtype, device: torch.device):
    """torch-sim's NequIP model around a default-size NequIP of random weights (seed 7)."""
    from nequip.integrations.utils import basic_transforms
    from nequip.model import NequIPGNNModel
    from nequip.utils.global_state import set_global_state
    from torch_sim.models.nequip_framework import NequIPFrameworkModel

    set_global_state()
    graph = NequIPGNNModel(
        seed=7,
        model_dtype=str(dtype).removeprefix("torch."),
        r_max=R_MAX,
        type_names=["Cu"],
        avg_num_neighbors=40.0,
        per_type_energy_shifts=0.0,
        per_type_energy_scales=1.0,
    ).eval()
    transforms = basic_transforms(graph.metadata, R_MAX, ["Cu"], {"Cu": "Cu"})
    return NequIPFrameworkModel(model=graph, device=device, transforms=transforms)


def _cases(model, wrapped, bank, state, t) -> dict:
    def dh_only():
        with torch.no_grad():
            return bank.evaluate(t.positions.detach(), t.cell, t.pbc, t.system_idx)

    return {"nequip": lambda: model(state), "uncertainty_model": lambda: wrapped(state),
            "dh_only": dh_only}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1x256,32x108")
    # torch-sim's NequIP model is float64 (its `dtype`, hence the state's and the bank's)
    parser.add_argument("--dtypes", default="float64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import ase.io
    import torch_sim as ts
    from ase.build import bulk

    from quests_torch import UncertaintyBank
    from quests_torch.integrations.torch_sim import UncertaintyModel, state_tensors

    device = torch.device(args.device)
    train = ase.io.read(TRAIN_PATH, ":")
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
        model = nequip_model(dtype, device)
        wrapped = UncertaintyModel(model, bank)
        for spec in args.batches.split(","):
            n_sys, n_atoms = (int(v) for v in spec.split("x"))
            rep = round((n_atoms / 4) ** (1 / 3))
            cells = []
            for i in range(n_sys):
                a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(rep)
                a.rattle(0.05, seed=i)
                cells.append(a)
            state = ts.io.atoms_to_state(cells, device, dtype)
            cases = _cases(model, wrapped, bank, state, state_tensors(state))
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
            for c in cases:
                emit({"case": c, "median_s": round(med[c], 5), "cpu_s": round(med_cpu[c], 5),
                      "repeats": args.repeats, **meta})  # fmt: skip
            emit(
                {
                    "summary": {
                        "batch": spec,
                        "dtype": dtype_name,
                        "threads": args.threads,
                        "nequip_s": round(med["nequip"], 5),
                        "uncertainty_model_s": round(med["uncertainty_model"], 5),
                        "dh_only_s": round(med["dh_only"], 5),
                        "overhead": round(med["uncertainty_model"] / med["nequip"] - 1, 3),
                        "overhead_cpu": round(
                            med_cpu["uncertainty_model"] / med_cpu["nequip"] - 1, 3
                        ),
                    }
                }
            )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
