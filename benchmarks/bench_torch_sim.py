"""Benchmark the torch-sim UncertaintyModel against the bare model it wraps.

The question a torch-sim user asks: how much does adding dH to every batched force call cost?
Cases, on the same batch, in one process:

* ``lj``: torch-sim's Lennard-Jones model (Cu-like, epsilon = 0.4093 eV, sigma = 2.338 Å,
  r_c = 5 Å) energy + forces of the batch (the reference cost).
* ``uncertainty_model``: ``UncertaintyModel(lj, bank)``: the same plus per-atom dH and the
  per-system max/mean/fraction (what a monitored MD step costs).
* ``dh_only``: ``bank.evaluate`` on the batch (the added part alone).
* ``bias_model``: ``EntropyBiasModel(lj, bank)``: the model plus the bias energy and its
  autograd forces.

Data: ``--systems`` 108-atom FCC Cu cells (3x3x3 conventional, a = 3.61 Å) rattled with
N(0, 0.05 Å) (seeds 0, 1, ...). Bank: ``--bank-cells`` other such cells (seeds 1000, ...),
descriptors k = 32, r_c = 5 Å, h = 0.015, float64.

One warm-up per case, then ``--repeats`` rounds that time every case once (round-robin); the
median per case. One JSON line per case and a summary line with each case relative to ``lj``.

Usage::

    python benchmarks/bench_torch_sim.py
    python benchmarks/bench_torch_sim.py --systems 32 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", type=int, default=32)
    parser.add_argument("--bank-cells", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", default="lj,uncertainty_model,dh_only,bias_model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import torch_sim as ts
    from ase.build import bulk
    from torch_sim.models.lennard_jones import LennardJonesModel

    from quests_torch import UncertaintyBank
    from quests_torch.integrations.torch_sim import (
        EntropyBiasModel,
        UncertaintyModel,
        state_tensors,
    )

    device = torch.device(args.device)

    def cells(n, seed0):
        out = []
        for i in range(n):
            a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3)
            a.rattle(0.05, seed=seed0 + i)
            out.append(a)
        return out

    bank = UncertaintyBank.from_atoms(cells(args.bank_cells, 1000), dtype=torch.float64)
    bank = bank.to(device)
    lj = LennardJonesModel(
        sigma=2.338, epsilon=0.4093, cutoff=5.0, dtype=torch.float64, device=device
    )
    state = ts.io.atoms_to_state(cells(args.systems, 0), device, torch.float64)
    wrapped = UncertaintyModel(lj, bank)
    biased = EntropyBiasModel(lj, bank, 0.01)
    t = state_tensors(state)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    cases = {
        "lj": lambda: lj(state),
        "uncertainty_model": lambda: wrapped(state),
        "dh_only": lambda: bank.evaluate(t.positions, t.cell, t.pbc, t.system_idx),
        "bias_model": lambda: biased(state),
    }
    chosen = [c for c in args.cases.split(",") if c]
    times: dict[str, list[float]] = {c: [] for c in chosen}
    for c in chosen:  # warm-up
        with torch.no_grad() if c != "bias_model" else torch.enable_grad():
            cases[c]()
    for _ in range(args.repeats):
        for c in chosen:
            sync()
            t0 = time.perf_counter()
            with torch.no_grad() if c != "bias_model" else torch.enable_grad():
                cases[c]()
            sync()
            times[c].append(time.perf_counter() - t0)
    med = {c: statistics.median(v) for c, v in times.items()}
    meta = {
        "systems": args.systems,
        "atoms": int(state.n_atoms),
        "bank": bank.n_references,
        "threads": args.threads,
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for c in chosen:
        print(json.dumps({"case": c, "median_s": round(med[c], 5), **meta}))
    if "lj" in med:
        print(json.dumps({"summary": {c: round(med[c] / med["lj"], 3) for c in chosen}}))


if __name__ == "__main__":
    main()
