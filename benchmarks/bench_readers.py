"""Benchmark reading an extxyz trajectory: ASE against the fast reader, in process and with
reader processes, in the same run on the same machine.

Data: a plain extxyz of ``--frames`` frames of 500 Cu atoms (a 5x5x5 fcc cell cut to 500,
rattled 0.1 Å), written once by ASE (``Lattice``, ``Properties=species:S:1:pos:R:3``, a
per-frame ``step`` key, ``pbc``; about 50 MB for the default 1,850 frames) to ``--data-dir``
and reused.

Cases, each timed over the whole file after a warm-up, median of ``--repeats``:

- ``ase``: ``list(ase.io.iread(path))``, the reader of quests-torch before issue 27;
- ``fast_in_process``: ``quests_torch.io.iter_structures(path, readers=0)`` end to end
  (``ase.Atoms`` out, NaN/inf checks, the frame index from the cache);
- ``pool_cold_R``: the frames as ``ase.Atoms`` from a new
  :class:`quests_torch.readers.pool.ReaderPool` of R processes, started and stopped inside
  the timing (the forkserver already up: the warm-up started it), for R in ``--readers``
  above 1 (``iter_structures`` itself reads selections under ``MIN_POOL_ATOMS`` atoms in
  process);
- ``pool_warm_R``: the same from a pool started before the timing (what a long run sees
  once the readers are up), with the CPU seconds of the consuming process and of the
  readers for one more read, and the rate they would give with a free core each
  (``projected_atoms_per_s_free_cores``: atoms / max(parent, readers / R); a model, for
  machines shared with other jobs);
- ``index_scan``: the cold byte-offset scan of the file (no cache).

One JSON line per case (atoms/s, seconds, speed-up over ASE) and a summary line with the
machine and its load; ``--out`` appends them to a file. On a machine shared with other
CPU-heavy jobs the reader processes compete with them: read ``load_avg_1min``.

Usage::

    python benchmarks/bench_readers.py                     # 1,850 x 500 atoms, readers 2
    python benchmarks/bench_readers.py --frames 200 --repeats 5 --readers 1 2 4
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
from pathlib import Path

import numpy as np


def build_data(folder: Path, frames: int) -> Path:
    import ase.io
    from ase.build import bulk

    path = folder / f"cu500_{frames}.extxyz"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((5, 5, 5))[:500]

    def frame(i):
        a = base.copy()
        a.positions += rng.normal(scale=0.1, size=a.positions.shape)
        a.info["step"] = i
        return a

    tmp = path.with_suffix(".part.extxyz")
    ase.io.write(tmp, (frame(i) for i in range(frames)), format="extxyz")
    os.replace(tmp, path)
    return path


def timed(read, repeats: int) -> tuple[float, int]:
    read()  # warm-up (imports, page cache, index cache)
    runs, atoms = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        atoms = read()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), atoms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1850, help="frames of 500 atoms")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--readers", type=int, nargs="+", default=[2])
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "qt-bench"))
    parser.add_argument("--out", default=None, help="also append the JSON lines here")
    args = parser.parse_args()

    import ase.io
    import torch

    import quests_torch as qt
    from quests_torch.io import iter_structures
    from quests_torch.readers import frame_index, scan_xyz, select_frames
    from quests_torch.readers.pool import ReaderPool

    path = build_data(Path(args.data_dir), args.frames)
    size_mb = path.stat().st_size / 1e6
    lines: list[str] = []

    def emit(record: dict) -> None:
        text = json.dumps(record)
        print(text, flush=True)
        lines.append(text)

    def case(name: str, read, pool=None) -> float:
        seconds, atoms = timed(read, args.repeats)
        rate = atoms / seconds
        record = {"case": name, "atoms": atoms, "seconds": round(seconds, 3),
                  "atoms_per_s": round(rate), "mb_per_s": round(size_mb / seconds, 1)}  # fmt: skip
        if pool is not None:  # one more read, its CPU time split between parent and readers
            pool.reader_cpu_seconds = 0.0
            cpu0 = time.process_time()
            read()
            parent = time.process_time() - cpu0
            readers = pool.reader_cpu_seconds
            record.update(
                parent_cpu_s=round(parent, 3),
                readers_cpu_s=round(readers, 3),
                # each process on a free core: the slower of the parent and the readers
                projected_atoms_per_s_free_cores=round(atoms / max(parent, readers / pool.readers)),
            )
        emit(record)
        return rate

    ase_rate = case("ase", lambda: sum(len(a) for a in ase.io.iread(path)))
    rates = {
        "fast_in_process": case(
            "fast_in_process", lambda: sum(len(a) for a in iter_structures(path, readers=0))
        )
    }
    index = frame_index(path)
    frames = select_frames(len(index), ":")

    def from_pool(pool) -> int:
        return sum(len(rec.to_atoms()) for rec in pool.records(path, index, frames))

    def cold(r: int) -> int:
        with ReaderPool(r) as pool:
            return from_pool(pool)

    for r in (r for r in args.readers if r > 1):
        rates[f"pool_cold_{r}"] = case(f"pool_cold_{r}", lambda r=r: cold(r))
        with ReaderPool(r) as pool:
            rates[f"pool_warm_{r}"] = case(
                f"pool_warm_{r}", lambda pool=pool: from_pool(pool), pool=pool
            )
    t0 = time.perf_counter()
    scanned = scan_xyz(path)
    scan_s = time.perf_counter() - t0
    emit({"case": "index_scan", "frames": len(scanned), "seconds": round(scan_s, 4),
          "mb_per_s": round(size_mb / scan_s, 1)})  # fmt: skip
    emit(
        {
            "case": "summary",
            "file_mb": round(size_mb, 1),
            "frames": args.frames,
            "atoms_per_frame": 500,
            "ase_atoms_per_s": round(ase_rate),
            **{f"{k}_atoms_per_s": round(v) for k, v in rates.items()},
            **{f"{k}_speedup": round(v / ase_rate, 2) for k, v in rates.items()},
            "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "ase": ase.__version__,
            "quests_torch": qt.__version__,
            "load_avg_1min": os.getloadavg()[0],
        }
    )
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
