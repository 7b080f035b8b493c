"""The paper's error-vs-dH result (QUESTS, Fig. 3c) with a real MLIP: MACE trained on EMT Cu.

For held-out configurations the model never saw, every atom gets

* ``dH``: its differential entropy against the model's training environments
  (``UncertaintyBank`` of ``benchmarks/models/mace_cu_emt_train.extxyz``, k = 32,
  r_c = 5 Å, h = 0.015, float64), and
* ``error``: ``|F_MACE - F_EMT|``, the norm of the force error vector (eV/Å), with the
  committed model of ``benchmarks/train_mace_cu.py`` in float64.

Held-out sets (``benchmarks/models/mace_cu_emt_heldout.extxyz``, regenerated with
``--regenerate``; 108-atom cells unless said, EMT Langevin MD as in the training script but
with other seeds): ``solid_300``, ``solid_600``, ``solid_900`` (inside the training
temperatures), ``hot_solid_1200``, ``liquid_1800`` (melted at 3000 K in a cell 5 % larger in
volume, then 1800 K), ``vacancy_600`` (107 atoms), ``surface_111_600`` (a 4x4x6 Cu(111) slab,
96 atoms, 12 Å of vacuum). ``N_FRAMES`` frames each, ``SPACING`` steps apart.

Reported (JSON): Spearman rank correlation of the per-atom error with dH; the mean error of
atoms with ``dH <= 0`` and ``dH > 0`` and their ratio; per structure, the same for
``max dH`` against the force RMSE ``sqrt(mean_i |F_MACE,i - F_EMT,i|^2)``; and per set the
mean dH, fraction of atoms with ``dH > 0`` and force RMSE.

Usage::

    python benchmarks/mace_error_vs_dh.py                 # writes benchmarks/results/
    python benchmarks/mace_error_vs_dh.py --regenerate    # rebuild the held-out extxyz first
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import train_mace_cu as tm  # noqa: E402

HELDOUT_PATH = HERE / "models" / "mace_cu_emt_heldout.extxyz"
RESULT_PATH = HERE / "results" / "mace_error_vs_dh.json"
HELDOUT_SEED = 1013
N_FRAMES = 4
SPACING = 40
BANK_H = 0.015


def heldout_configurations(seed: int = HELDOUT_SEED):
    """The held-out structures, each with ``info["set"]`` naming its set (EMT MD, no labels)."""
    from ase.build import bulk, fcc111

    def cell108():
        return bulk("Cu", "fcc", a=tm.LATTICE, cubic=True).repeat(3)

    sets = []
    for i, t in enumerate((300.0, 600.0, 900.0)):
        sets.append(
            (
                f"solid_{int(t)}",
                tm.md_frames(cell108(), t, N_FRAMES, seed=seed + i, spacing=SPACING),
            )
        )
    sets.append(
        (
            "hot_solid_1200",
            tm.md_frames(cell108(), 1200.0, N_FRAMES, seed=seed + 3, spacing=SPACING),
        )
    )
    big = cell108()
    big.set_cell(big.cell * 1.05 ** (1 / 3), scale_atoms=True)
    melt = tm.md_frames(big, 3000.0, 1, seed=seed + 4, equilibration=600, spacing=1)[0]
    sets.append(
        ("liquid_1800", tm.md_frames(melt, 1800.0, N_FRAMES, seed=seed + 5, spacing=SPACING))
    )
    vac = cell108()
    del vac[0]
    sets.append(("vacancy_600", tm.md_frames(vac, 600.0, N_FRAMES, seed=seed + 6, spacing=SPACING)))
    slab = fcc111("Cu", size=(4, 4, 6), a=tm.LATTICE, vacuum=6.0)
    sets.append(
        ("surface_111_600", tm.md_frames(slab, 600.0, N_FRAMES, seed=seed + 7, spacing=SPACING))
    )
    frames = []
    for name, fs in sets:
        for f in fs:
            f.info["set"] = name
            frames.append(f)
    return frames


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def split_means(error: np.ndarray, dh: np.ndarray) -> dict:
    """Mean error of the items with ``dH <= 0`` and ``dH > 0``, their counts and ratio."""
    low, high = error[dh <= 0], error[dh > 0]
    m_low = float(low.mean()) if low.size else float("nan")
    m_high = float(high.mean()) if high.size else float("nan")
    return {
        "mean_error_dH_le_0": m_low,
        "mean_error_dH_gt_0": m_high,
        "ratio": m_high / m_low if low.size and high.size else float("nan"),
        "n_dH_le_0": int(low.size),
        "n_dH_gt_0": int(high.size),
    }


def per_atom_data(
    model_path=tm.MODEL_PATH, train_path=tm.TRAIN_PATH, heldout_path=HELDOUT_PATH, threads=1
):
    """Per-atom dH, force error and set name of every held-out atom, per-structure index.

    Returns:
        dict of numpy arrays: ``dH``, ``error`` (eV/Å), ``structure`` (int), ``set`` (str per
        atom), and ``sets`` (set name per structure).
    """
    import ase.io
    from mace.calculators import MACECalculator

    from quests_torch import UncertaintyBank

    train = ase.io.read(train_path, ":")
    frames = ase.io.read(heldout_path, ":")
    bank = UncertaintyBank.from_atoms(train, h=BANK_H)
    model = tm.load_mace(model_path, dtype=torch.float64)
    calc = MACECalculator(models=model, device="cpu", default_dtype="float64")
    _, f_emt = tm.emt_labels(frames)
    dh, err, structure, names = [], [], [], []
    for i, (frame, f_ref) in enumerate(zip(frames, f_emt, strict=True)):
        a = frame.copy()
        a.calc = calc
        err.append(np.linalg.norm(a.get_forces() - f_ref, axis=1))
        dh.append(bank.evaluate_atoms(frame).dH.numpy())
        structure.append(np.full(len(frame), i))
        names.append(frame.info["set"])
    return {
        "dH": np.concatenate(dh),
        "error": np.concatenate(err),
        "structure": np.concatenate(structure),
        "sets": np.array(names),
    }


def summarise(data: dict) -> dict:
    """The Fig. 3c numbers from :func:`per_atom_data`."""
    dh, err, s = data["dH"], data["error"], data["structure"]
    n_struct = int(s.max()) + 1
    max_dh = np.array([dh[s == i].max() for i in range(n_struct)])
    rmse = np.array([np.sqrt((err[s == i] ** 2).mean()) for i in range(n_struct)])
    per_set = {}
    for name in dict.fromkeys(data["sets"].tolist()):
        idx = np.flatnonzero(data["sets"] == name)
        atoms = np.isin(s, idx)
        per_set[name] = {
            "n_structures": len(idx),
            "n_atoms": int(atoms.sum()),
            "mean_dH": float(dh[atoms].mean()),
            "max_dH": float(dh[atoms].max()),
            "fraction_dH_gt_0": float((dh[atoms] > 0).mean()),
            "force_rmse": float(np.sqrt((err[atoms] ** 2).mean())),
            "mean_error": float(err[atoms].mean()),
        }
    return {
        "per_atom": {"n": len(dh), "spearman": spearman(err, dh), **split_means(err, dh)},
        "per_structure": {
            "n": n_struct,
            "spearman": spearman(rmse, max_dh),
            **split_means(rmse, max_dh),
        },
        "per_set": per_set,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regenerate", action="store_true", help="rebuild the held-out set")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULT_PATH)
    args = parser.parse_args()
    if args.regenerate:
        import ase.io

        HELDOUT_PATH.parent.mkdir(parents=True, exist_ok=True)
        ase.io.write(HELDOUT_PATH, heldout_configurations(), format="extxyz")
    t0 = time.perf_counter()
    result = summarise(per_atom_data(threads=args.threads))
    result["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
