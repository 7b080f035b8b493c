"""Benchmark dH against references streamed from a float32 memmap that do not fit the budget.

The references are a float32 ``.npy`` memmap; ``--budget`` is chosen so that their prepared
float64 block (``m (d + 2) 8`` bytes) exceeds half of it, so the sweep streams them. Reported
per run: the wall time of ``delta_entropy(queries, references, budget=...)`` and the number
of passes the sweep made over the references, counted from the rows that
``Source.rows`` handed out for them (the NaN check and centring pass excluded), so the same
script times the code before and after the row panels (run it with either on ``PYTHONPATH``).

Data: ``--centres`` random centres in ``d = 63`` dimensions (scale 0.1), float32 references
and float64 queries (so the sums are float64) drawn around them with noise 0.005; queries
only around centres that have references (no row takes the shifted fallback). One JSON line
per run on stdout.

Usage::

    python benchmarks/bench_stream.py                     # 200,000 x 100,000, budget 64M
    python benchmarks/bench_stream.py --n 20000 --m 10000 --budget 8M
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_data(path: Path, n: int, m: int, d: int, centres: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = rng.normal(scale=0.1, size=(centres, d))
    near = rng.integers(0, centres, m)
    y = (c[near] + rng.normal(scale=0.005, size=(m, d))).astype(np.float32)
    x = c[rng.choice(near, n)] + rng.normal(scale=0.005, size=(n, d))  # float64 queries
    np.save(path / "references.npy", y)
    return x, np.load(path / "references.npy", mmap_mode="r")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="query rows")
    parser.add_argument("--m", type=int, default=100_000, help="reference rows (memmap)")
    parser.add_argument("--d", type=int, default=63)
    parser.add_argument("--centres", type=int, default=2000)
    parser.add_argument("--budget", default="64M")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    import quests_torch
    from quests_torch.kde.engine import Source
    from quests_torch.metrics import delta_entropy

    read = {"rows": 0}
    real = Source.rows

    def counting(self, i0, i1, *rest, **kw):
        if self.name == "x":  # delta_entropy(y, x): the references are named x
            read["rows"] += i1 - i0
        return real(self, i0, i1, *rest, **kw)

    Source.rows = counting
    with tempfile.TemporaryDirectory() as tmp:
        x, ref = make_data(Path(tmp), args.n, args.m, args.d, args.centres)
        for _ in range(args.repeats):
            read["rows"] = 0
            t0 = time.perf_counter()
            dh = delta_entropy(x, ref, budget=args.budget)
            seconds = time.perf_counter() - t0
            record = {
                "case": "dh_memmap_f32_streamed",
                "n": args.n,
                "m": args.m,
                "budget": args.budget,
                "seconds": round(seconds, 2),
                "column_passes": (read["rows"] - args.m) / args.m,  # minus the NaN check
                "dh_mean": float(dh.double().mean()),
                "dh_max": float(dh.double().max()),
                "threads": torch.get_num_threads(),
                "quests_torch": str(Path(quests_torch.__file__).parent.parent),
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
