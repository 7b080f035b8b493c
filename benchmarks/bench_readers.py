"""Benchmark reading trajectories: ASE against the native readers (extxyz, LAMMPS dump text,
torch-sim HDF5, ASE .traj), in process and with reader processes, in the same run on the same
machine.

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

The same frames in the other formats (``--formats``, default all), each read whole, as
``ase.Atoms`` (what ``iter_structures`` hands on):

- ``dump_ase``: ``ase.io.iread(format="lammps-dump-text", specorder=["Cu"])`` of a dump
  ``ITEM: ATOMS id type x y z`` (ids shuffled per frame, as several MPI ranks write them;
  ``%.6f``); ``dump_native_in_process``: ``iter_structures(path, readers=0, types="Cu")``;
  ``dump_pool_warm_R``: a warm pool of R reader processes on the dump;
- ``h5_torch_sim``: ``TorchSimTrajectory.get_atoms(i)`` per frame (torch-sim's own reader:
  ASE has none) of a file written by ``TorchSimTrajectory`` (float32, zlib 1, as
  ``TrajectoryReporter`` writes; an h5py file of the same layout without torch-sim);
  ``h5_native``: ``iter_structures(path)``;
- ``traj_ase``: ``ase.io.iread`` of an ASE ``.traj`` written as an MD run writes it
  (momenta, a calculator's energy and forces); ``traj_native``:
  ``iter_structures(path, readers=0)``.

One JSON line per case (atoms/s, seconds, speed-up over ASE) and a summary line with the
machine and its load; ``--out`` appends them to a file. On a machine shared with other
CPU-heavy jobs the reader processes compete with them: read ``load_avg_1min``.

Usage::

    python benchmarks/bench_readers.py                     # 1,850 x 500 atoms, readers 2
    python benchmarks/bench_readers.py --frames 200 --repeats 5 --readers 1 2 4
    python benchmarks/bench_readers.py --formats dump traj   # skip the extxyz cases
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
from functools import partial
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


def build_dump(folder: Path, xyz: Path) -> Path:
    """The frames of ``xyz`` as LAMMPS dump text (``id type x y z``, ids shuffled)."""
    import ase.io

    path = xyz.with_suffix(".lammpstrj")
    if path.exists():
        return path
    rng = np.random.default_rng(1)
    tmp = path.with_suffix(".part")
    with open(tmp, "w") as fh:
        for step, atoms in enumerate(ase.io.iread(xyz)):
            n, hi = len(atoms), atoms.cell.lengths()
            order = rng.permutation(n)
            fh.write(f"ITEM: TIMESTEP\n{step}\nITEM: NUMBER OF ATOMS\n{n}\n")
            fh.write("ITEM: BOX BOUNDS pp pp pp\n" + "".join(f"0.0 {v:.6f}\n" for v in hi))
            fh.write("ITEM: ATOMS id type x y z\n")
            pos = atoms.positions
            fh.write("".join(f"{i + 1} 1 {x:.6f} {y:.6f} {z:.6f}\n" for i, (x, y, z) in
                             zip(order, pos[order], strict=True)))  # fmt: skip
    os.replace(tmp, path)
    return path


def build_h5(folder: Path, xyz: Path) -> Path:
    """The frames of ``xyz`` as a torch-sim trajectory (``TorchSimTrajectory`` when torch-sim
    is installed, else the same layout by h5py: float32, zlib level 1 with shuffle)."""
    import ase.io

    path = xyz.with_suffix(".h5")
    if path.exists():
        return path
    frames = list(ase.io.iread(xyz))
    pos = np.stack([a.positions for a in frames]).astype(np.float32)
    cells = np.stack([a.cell.array.T for a in frames]).astype(np.float32)  # column vectors
    tmp = path.with_suffix(".part.h5")
    try:
        from torch_sim.trajectory import TorchSimTrajectory

        with TorchSimTrajectory(tmp, mode="w") as traj:
            static = {"atomic_numbers": frames[0].numbers, "masses": frames[0].get_masses()}
            traj.write_arrays({**static, "pbc": np.array(True)}, 0)
            for a in range(0, len(frames), 100):
                steps = list(range(a, min(a + 100, len(frames))))
                traj.write_arrays({"positions": pos[a : a + 100], "cell": cells[a : a + 100]},
                                  steps)  # fmt: skip
    except ImportError:
        import h5py

        with h5py.File(tmp, "w") as f:
            f.create_group("header").attrs["program"] = "TorchSim"
            data = f.create_group("data")
            opts = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
            data.create_dataset("positions", data=pos, chunks=(1, *pos.shape[1:]), **opts)
            data.create_dataset("cell", data=cells, **opts)
            data.create_dataset("atomic_numbers", data=frames[0].numbers[None])
            data.create_dataset("pbc", data=np.array([True]))
    os.replace(tmp, path)
    return path


def build_traj(folder: Path, xyz: Path) -> Path:
    """The frames of ``xyz`` as an ASE ``.traj`` as an MD run writes it: each frame with
    momenta and a calculator's energy and forces."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    path = xyz.with_suffix(".traj")
    if path.exists():
        return path
    rng = np.random.default_rng(2)

    def frames():
        for atoms in ase.io.iread(xyz):
            atoms.set_momenta(rng.normal(size=(len(atoms), 3)))
            forces = rng.normal(size=(len(atoms), 3))
            atoms.calc = SinglePointCalculator(atoms, energy=-3.5 * len(atoms), forces=forces)
            yield atoms

    tmp = path.with_suffix(".part.traj")
    ase.io.write(tmp, frames())
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
    parser.add_argument(
        "--formats", nargs="+", default=["xyz", "dump", "h5", "traj"],
        choices=["xyz", "dump", "h5", "traj"], help="formats to time (default all)",
    )  # fmt: skip
    args = parser.parse_args()

    import ase.io
    import torch

    import quests_torch as qt

    path = build_data(Path(args.data_dir), args.frames)
    size_mb = path.stat().st_size / 1e6
    lines: list[str] = []

    def emit(record: dict) -> None:
        text = json.dumps(record)
        print(text, flush=True)
        lines.append(text)

    def case(name: str, read, pool=None, mb: float = size_mb) -> float:
        seconds, atoms = timed(read, args.repeats)
        rate = atoms / seconds
        record = {"case": name, "atoms": atoms, "seconds": round(seconds, 3),
                  "atoms_per_s": round(rate), "mb_per_s": round(mb / seconds, 1)}  # fmt: skip
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

    rates: dict[str, float] = {}
    if "xyz" in args.formats:
        xyz_cases(args, path, case, rates, emit, size_mb)
    native_cases(args, path, case, rates)
    ase_rate = rates.pop("ase", None)
    emit(
        {
            "case": "summary",
            "file_mb": round(size_mb, 1),
            "frames": args.frames,
            "atoms_per_frame": 500,
            "formats": args.formats,
            **({"ase_atoms_per_s": round(ase_rate)} if ase_rate else {}),
            **{f"{k}_atoms_per_s": round(v) for k, v in rates.items()},
            **({f"{k}_speedup": round(v / ase_rate, 2) for k, v in rates.items()
                if not k.startswith(("dump", "h5", "traj"))} if ase_rate else {}),
            **native_speedups(rates),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "ase": ase.__version__,
            "quests_torch": qt.__version__,
            "load_avg_1min": os.getloadavg()[0],
        }
    )  # fmt: skip
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n".join(lines) + "\n")


def native_speedups(rates: dict) -> dict:
    """Each native case's rate over its format's reference case (``<fmt>_ase`` or, for
    torch-sim files, ``h5_torch_sim``)."""
    out = {}
    for name, rate in rates.items():
        fmt = name.split("_")[0]
        ref = rates.get("h5_torch_sim" if fmt == "h5" else f"{fmt}_ase")
        if fmt in ("dump", "h5", "traj") and ref and name not in ("h5_torch_sim", f"{fmt}_ase"):
            out[f"{name}_speedup"] = round(rate / ref, 2)
    return out


def native_cases(args, xyz: Path, case, rates: dict) -> None:
    """The dump, torch-sim and .traj cases (their files built from the extxyz once)."""
    import ase.io

    from quests_torch.io import iter_structures
    from quests_torch.readers.index import frame_index, select_frames
    from quests_torch.readers.lammps import read_dump_frames, scan_dump
    from quests_torch.readers.pool import ReaderPool

    folder = xyz.parent
    count = lambda frames: sum(len(a) for a in frames)  # noqa: E731
    if "dump" in args.formats:
        dump = build_dump(folder, xyz)
        mb = dump.stat().st_size / 1e6
        rates["dump_ase"] = case("dump_ase", lambda: count(
            ase.io.iread(dump, format="lammps-dump-text", specorder=["Cu"])), mb=mb)  # fmt: skip
        rates["dump_native_in_process"] = case("dump_native_in_process", lambda: count(
            iter_structures(dump, readers=0, types="Cu")), mb=mb)  # fmt: skip
        index = frame_index(dump, scanner=scan_dump)
        frames = select_frames(len(index), ":")
        read = partial(read_dump_frames, types={1: 29})
        for r in (r for r in args.readers if r > 1):
            with ReaderPool(r) as pool:
                rates[f"dump_pool_warm_{r}"] = case(f"dump_pool_warm_{r}", lambda pool=pool: sum(
                    len(rec.to_atoms()) for rec in pool.records(dump, index, frames, read=read)
                ), pool=pool, mb=mb)  # fmt: skip
    if "h5" in args.formats:
        h5 = build_h5(folder, xyz)
        mb = h5.stat().st_size / 1e6
        try:
            from torch_sim.trajectory import TorchSimTrajectory

            def torch_sim_read() -> int:
                with TorchSimTrajectory(h5, mode="r") as traj:
                    return count(traj.get_atoms(i) for i in range(len(traj)))

            rates["h5_torch_sim"] = case("h5_torch_sim", torch_sim_read, mb=mb)
        except ImportError:
            pass
        rates["h5_native"] = case("h5_native", lambda: count(iter_structures(h5)), mb=mb)
    if "traj" in args.formats:
        traj = build_traj(folder, xyz)
        mb = traj.stat().st_size / 1e6
        rates["traj_ase"] = case("traj_ase", lambda: count(ase.io.iread(traj)), mb=mb)
        rates["traj_native"] = case("traj_native", lambda: count(
            iter_structures(traj, readers=0)), mb=mb)  # fmt: skip


def xyz_cases(args, path: Path, case, rates: dict, emit, size_mb: float) -> None:
    """The extxyz cases of issue 27's first part (ASE, fast in process, pools, index scan)."""
    import ase.io

    from quests_torch.io import iter_structures
    from quests_torch.readers import frame_index, scan_xyz, select_frames
    from quests_torch.readers.pool import ReaderPool

    rates["ase"] = case("ase", lambda: sum(len(a) for a in ase.io.iread(path)))
    rates["fast_in_process"] = case(
        "fast_in_process", lambda: sum(len(a) for a in iter_structures(path, readers=0))
    )
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


if __name__ == "__main__":
    main()
