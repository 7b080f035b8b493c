"""Generate ``compression_reference.npz`` and ``compression_structures.extxyz``.

The compression tests compare the selection order of quests-torch's ``msc``,
``msc_conditional`` and ``fps`` with upstream ``quests`` (``pip install quests==2026.2.22``,
``quests.compression``). The tests only read the files written here, so they run without
``quests`` installed.

Data (fixed seeds, ASE EMT potential for Cu, 2x2x2 conventional FCC cells, a = 3.61 Å):

* ``dataset``: 40 frames, 10 each from Langevin MD at 300, 700, 1100 and 1500 K
  (frames every 25 steps of 2 fs after 400 steps of equilibration); every fourth frame
  loses one atom (a vacancy), so structures have 31 or 32 environments.
* ``reference``: 6 further 300 K frames (another seed), the prior dataset for
  ``msc_conditional``.

Upstream works on the structures as read back from the extxyz file (which rounds positions),
and is called exactly as its ``DatasetCompressor`` does: descriptors of each structure
from ``quests.descriptor.get_descriptors([atoms])`` (k = 32, r_c = 5 Å), per-structure
entropies with ``quests.entropy.entropy``, then ``quests.compression.fps.{msc,
msc_conditional, fps}`` for the full selection order (size 40), and ``get_summary`` of the
first 12 structures of the msc order.

Run from the repository root::

    python tests/data/generate_compression_reference.py
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
from ase.io import read, write

HERE = Path(__file__).parent
H = 0.015
TEMPERATURES = (300.0, 700.0, 1100.0, 1500.0)
FRAMES_PER_TEMPERATURE = 10
SUMMARY_SIZE = 12


def _cu_trajectory():
    spec = importlib.util.spec_from_file_location("gen_kde", HERE / "generate_kde_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cu_trajectory


def build_structures() -> tuple[list, list]:
    cu_trajectory = _cu_trajectory()
    dataset = []
    for t, temperature in enumerate(TEMPERATURES):
        dataset += cu_trajectory(temperature, FRAMES_PER_TEMPERATURE, seed=100 + t, size=2)
    for i in range(0, len(dataset), 4):
        del dataset[i][i % len(dataset[i])]  # a vacancy: structures of 31 and 32 atoms
    for i, atoms in enumerate(dataset):
        atoms.info["frame"] = i
        atoms.info["set"] = "dataset"
        atoms.arrays["tag_id"] = np.arange(len(atoms)) + 1000 * i
    reference = cu_trajectory(300.0, 6, seed=200, size=2)
    for i, atoms in enumerate(reference):
        atoms.info["frame"] = i
        atoms.info["set"] = "reference"
    return dataset, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=HERE / "compression_reference.npz", help="npz output"
    )
    parser.add_argument(
        "--structures",
        type=Path,
        default=HERE / "compression_structures.extxyz",
        help="extxyz with the dataset then the reference frames",
    )
    args = parser.parse_args()

    from importlib.metadata import version

    from quests.compression.compress import DatasetCompressor
    from quests.compression.fps import fps, msc, msc_conditional
    from quests.descriptor import get_descriptors
    from quests.entropy import entropy

    dataset, reference = build_structures()
    write(args.structures, dataset + reference, format="extxyz")
    # work from the file as written (extxyz rounds positions to 1e-8 Å)
    frames = read(args.structures, ":")
    dataset, reference = frames[: len(dataset)], frames[len(dataset) :]

    xs = [get_descriptors([atoms], k=32, cutoff=5.0) for atoms in dataset]
    refs = [get_descriptors([atoms], k=32, cutoff=5.0) for atoms in reference]
    entropies = np.array([entropy(x, h=H) for x in xs])
    n = len(dataset)

    order_msc = np.array(msc(xs, entropies, n, h=H))
    order_cond = np.array(msc_conditional(xs, entropies, n, reference=refs, h=H))
    order_fps = np.array(fps(xs, entropies, n))

    comp = DatasetCompressor(dataset, bandwidth=H)
    summary = comp.get_summary(order_msc[:SUMMARY_SIZE].tolist())

    out = {
        "quests_version": np.array(version("quests")),
        "numpy_version": np.array(np.__version__),
        "parameters": np.array(
            "EMT Cu 2x2x2 FCC a=3.61; Langevin 300/700/1100/1500 K (seeds 100-103), 10 frames"
            " each, vacancy in every 4th frame; reference 6 frames 300 K seed 200;"
            " k=32 cutoff=5.0 h=0.015"
        ),
        "n_dataset": np.array(n),
        "h": np.array(H),
        "entropy_per_structure": entropies,
        "order_msc": order_msc,
        "order_msc_conditional": order_cond,
        "order_fps": order_fps,
        "summary_size": np.array(SUMMARY_SIZE),
        "summary_entropy": np.array(summary["entropy"]),
        "summary_diversity": np.array(summary["diversity"]),
        "summary_overlap_1e-5": np.array(summary["overlap"]),
        "summary_compressed_envs": np.array(summary["compressed_envs"]),
        "summary_original_envs": np.array(summary["original_envs"]),
    }
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.1f} kB) and {args.structures}")
    for key in ("order_msc", "order_msc_conditional", "order_fps"):
        print(f"  {key}: {out[key].tolist()}")
    print(f"  summary of msc[:{SUMMARY_SIZE}]: {summary}")


if __name__ == "__main__":
    main()
