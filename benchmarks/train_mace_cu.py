"""Train a small MACE potential for FCC Cu on EMT data: a test fixture, not a production model.

The model exists so that quests-torch's uncertainty can be shown and tested next to a real
MLIP: it is trained on EMT Cu **solid** only (32-atom FCC cells, Langevin MD at 300-900 K)
and is deliberately small (2 interactions, 16 scalar channels, max_L = 0, r_max = 5 Å). It
knows nothing of liquids, surfaces or defects, which is the point: the held-out structures
of ``benchmarks/mace_error_vs_dh.py`` leave its training domain. Do not use it for science.

What it writes (committed, never retrained by tests or notebooks):

* ``benchmarks/models/mace_cu_emt.pt``: ``{"hyperparameters": ..., "state_dict": ...,
  "metadata": ...}``, plain tensors and builtins only, so it loads with
  ``torch.load(path, weights_only=True)``; :func:`load_mace` rebuilds the
  ``mace.modules.ScaleShiftMACE`` from the hyperparameters (no pickled code is ever run).
* ``benchmarks/models/mace_cu_emt_train.extxyz``: the training configurations (positions and
  cell only; EMT energies and forces are recomputed on demand), the source of the
  ``UncertaintyBank`` of the tests.

Data (seed ``SEED``): for each temperature in ``TRAIN_TEMPERATURES`` an independent Langevin
MD run (EMT, 5 fs, friction 0.02 /fs) of the 3x3x3 conventional FCC cell (a = 3.61 Å,
32 atoms) starting from the perfect lattice, ``EQUILIBRATION`` steps discarded, then
``FRAMES_PER_TEMPERATURE`` frames ``SPACING`` steps apart.

Training: Adam (lr 0.01, then 0.002 for the last quarter of the epochs), batches of
``BATCH_SIZE`` configurations, loss ``w_E mean((dE/N)^2) + w_F mean(|dF|^2)`` with
``w_E = 1``, ``w_F = 100`` (MACE's defaults), float32, ``EPOCHS`` epochs; 10 % of the
configurations held back to report a validation error.

Usage::

    python benchmarks/train_mace_cu.py            # ~1.5 min on one CPU core
    python benchmarks/train_mace_cu.py --epochs 2 --out /tmp/m.pt --train-out /tmp/t.extxyz
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
MODEL_PATH = HERE / "models" / "mace_cu_emt.pt"
TRAIN_PATH = HERE / "models" / "mace_cu_emt_train.extxyz"

SEED = 13
LATTICE = 3.61  # Å, FCC Cu
REPEAT = 2  # 2x2x2 conventional cells: 32 atoms
TIMESTEP_FS = 5.0
FRICTION = 0.02  # 1/fs
TRAIN_TEMPERATURES = (300.0, 450.0, 600.0, 750.0, 900.0)
EQUILIBRATION = 200
FRAMES_PER_TEMPERATURE = 30
SPACING = 20
BATCH_SIZE = 4
EPOCHS = 30
LR = 0.01
ENERGY_WEIGHT, FORCES_WEIGHT = 1.0, 100.0

HYPERPARAMETERS = {
    "r_max": 5.0,
    "num_bessel": 8,
    "num_polynomial_cutoff": 5,
    "max_ell": 1,
    "num_interactions": 2,
    "hidden_irreps": "16x0e",
    "MLP_irreps": "16x0e",
    "correlation": 2,
    "radial_MLP": [32, 32],
    "atomic_numbers": [29],
    "interaction_first": "RealAgnosticInteractionBlock",
    "interaction": "RealAgnosticResidualInteractionBlock",
}


def fcc_cell():
    """The 32-atom FCC Cu cell of the training data (perfect lattice)."""
    from ase.build import bulk

    return bulk("Cu", "fcc", a=LATTICE, cubic=True).repeat(REPEAT)


def md_frames(
    atoms,
    temperature: float,
    n_frames: int,
    *,
    seed: int,
    spacing: int = SPACING,
    equilibration: int = EQUILIBRATION,
    timestep_fs: float = TIMESTEP_FS,
):
    """EMT Langevin MD frames of ``atoms`` at ``temperature`` K (copies, no calculator).

    Velocities start from Maxwell-Boltzmann at ``temperature`` (``seed``); ``equilibration``
    steps are discarded, then ``n_frames`` frames ``spacing`` steps apart are returned with
    ``info["temperature"]`` set.
    """
    from ase import units
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = atoms.copy()
    atoms.calc = EMT()
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(
        atoms,
        timestep_fs * units.fs,
        temperature_K=temperature,
        friction=FRICTION / units.fs,
        rng=rng,
    )
    dyn.run(equilibration)
    frames = []
    for _ in range(n_frames):
        dyn.run(spacing)
        frame = atoms.copy()
        frame.calc = None
        frame.info["temperature"] = float(temperature)
        frames.append(frame)
    return frames


def training_configurations(seed: int = SEED):
    """The training set: ``FRAMES_PER_TEMPERATURE`` frames per training temperature."""
    frames = []
    for i, temperature in enumerate(TRAIN_TEMPERATURES):
        frames += md_frames(fcc_cell(), temperature, FRAMES_PER_TEMPERATURE, seed=seed + i)
    return frames


def emt_labels(frames):
    """EMT energies ``[n]`` (eV) and forces (list of ``[n_atoms, 3]``, eV/Å) of ``frames``."""
    from ase.calculators.emt import EMT

    energies, forces = [], []
    for frame in frames:
        a = frame.copy()
        a.calc = EMT()
        energies.append(a.get_potential_energy())
        forces.append(a.get_forces())
    return np.array(energies), forces


def build_mace(hp: dict, *, atomic_energy: float, scale: float, avg_num_neighbors: float):
    """A ``mace.modules.ScaleShiftMACE`` from plain hyperparameters (no weights)."""
    from e3nn import o3
    from mace import modules

    return modules.ScaleShiftMACE(
        r_max=hp["r_max"],
        num_bessel=hp["num_bessel"],
        num_polynomial_cutoff=hp["num_polynomial_cutoff"],
        max_ell=hp["max_ell"],
        interaction_cls=modules.interaction_classes[hp["interaction"]],
        interaction_cls_first=modules.interaction_classes[hp["interaction_first"]],
        num_interactions=hp["num_interactions"],
        num_elements=len(hp["atomic_numbers"]),
        hidden_irreps=o3.Irreps(hp["hidden_irreps"]),
        MLP_irreps=o3.Irreps(hp["MLP_irreps"]),
        atomic_energies=np.array([atomic_energy]),
        avg_num_neighbors=avg_num_neighbors,
        atomic_numbers=hp["atomic_numbers"],
        correlation=hp["correlation"],
        gate=torch.nn.functional.silu,
        radial_MLP=hp["radial_MLP"],
        atomic_inter_scale=scale,
        atomic_inter_shift=0.0,
    )


def load_mace(path: str | Path = MODEL_PATH, dtype: torch.dtype = torch.float64, device="cpu"):
    """The committed model, rebuilt and loaded with ``weights_only=True``, in eval mode.

    Args:
        path: a file written by this script.
        dtype: ``torch.float64`` or ``torch.float32``.
        device: where the model lives.

    Returns:
        ``mace.modules.ScaleShiftMACE`` (usable by ``MACECalculator(models=...)`` and
        ``torch_sim.models.mace.MaceModel``).
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = build_mace(saved["hyperparameters"], **saved["normalisation"])
    model.load_state_dict(saved["state_dict"])
    return model.to(device=device, dtype=dtype).eval()


def _graphs(frames, energies, forces, r_max: float):
    from mace import data, tools

    z_table = tools.AtomicNumberTable([29])
    spec = data.KeySpecification(
        info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"}
    )
    graphs = []
    for frame, e, f in zip(frames, energies, forces, strict=True):
        a = frame.copy()
        a.info["REF_energy"] = float(e)
        a.arrays["REF_forces"] = np.asarray(f)
        config = data.config_from_atoms(a, key_specification=spec)
        graphs.append(data.AtomicData.from_config(config, z_table=z_table, cutoff=r_max))
    return graphs


def _loss(model, batch):
    out = model(batch.to_dict(), training=True, compute_force=True)
    n = batch.ptr[1:] - batch.ptr[:-1]
    e = ((out["energy"] - batch.energy) / n).pow(2).mean()
    f = (out["forces"] - batch.forces).pow(2).mean()
    return ENERGY_WEIGHT * e + FORCES_WEIGHT * f, e, f


def _errors(model, loader):
    """RMSE of the energy per atom (meV/atom) and of the force components (meV/Å)."""
    se, sf, ne, nf = 0.0, 0.0, 0, 0
    for batch in loader:
        out = model(batch.to_dict(), training=False, compute_force=True)
        n = batch.ptr[1:] - batch.ptr[:-1]
        se += float((((out["energy"] - batch.energy) / n) ** 2).sum())
        sf += float(((out["forces"] - batch.forces) ** 2).sum())
        ne += int(n.numel())
        nf += int(batch.forces.numel())
    return 1e3 * (se / ne) ** 0.5, 1e3 * (sf / nf) ** 0.5


def train(frames, *, epochs: int = EPOCHS, seed: int = SEED, threads: int = 1):
    """Train the model on ``frames``; returns ``(model, normalisation, report)``."""
    from mace.tools import torch_geometric

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.float32)
    energies, forces = emt_labels(frames)
    n_atoms = np.array([len(f) for f in frames])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(frames))
    n_valid = max(1, len(frames) // 10)
    valid_idx, train_idx = order[:n_valid], order[n_valid:]
    # E0 = mean energy per atom, scale = RMS force component (both from the training part)
    atomic_energy = float((energies[train_idx] / n_atoms[train_idx]).mean())
    scale = float(np.sqrt((np.concatenate([forces[i] for i in train_idx]) ** 2).mean()))
    graphs = _graphs(frames, energies, forces, HYPERPARAMETERS["r_max"])
    avg_nn = float(
        np.mean([g.edge_index.shape[1] / g.num_nodes for g in (graphs[i] for i in train_idx)])
    )
    normalisation = {
        "atomic_energy": atomic_energy,
        "scale": scale,
        "avg_num_neighbors": avg_nn,
    }
    model = build_mace(HYPERPARAMETERS, **normalisation)
    loader = torch_geometric.dataloader.DataLoader(
        [graphs[i] for i in train_idx],
        batch_size=BATCH_SIZE,
        shuffle=True,
        drop_last=False,
        generator=torch.Generator().manual_seed(seed),
    )
    valid = torch_geometric.dataloader.DataLoader(
        [graphs[i] for i in valid_idx], batch_size=BATCH_SIZE, shuffle=False
    )
    opt = torch.optim.Adam(model.parameters(), lr=LR, amsgrad=True)
    history = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        if epoch == (3 * epochs) // 4:
            for g in opt.param_groups:
                g["lr"] = LR / 5
        model.train()
        total = 0.0
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            loss, _, _ = _loss(model, batch)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        model.eval()
        e_rmse, f_rmse = _errors(model, valid)
        history.append(
            {
                "epoch": epoch,
                "loss": total / len(loader),
                "valid_E_rmse_meV_atom": e_rmse,
                "valid_F_rmse_meV_A": f_rmse,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(json.dumps(history[-1]), flush=True)
    report = {
        "train_seconds": time.perf_counter() - t0,
        "n_train": len(train_idx),
        "n_valid": len(valid_idx),
        "force_rms_eV_A": scale,
        "history": history,
    }
    return model, normalisation, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=MODEL_PATH)
    parser.add_argument("--train-out", type=Path, default=TRAIN_PATH)
    args = parser.parse_args()

    import ase
    import ase.io
    import mace

    t0 = time.perf_counter()
    frames = training_configurations()
    t_data = time.perf_counter() - t0
    model, normalisation, report = train(frames, epochs=args.epochs, threads=args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    metadata = {
        "what": "test fixture: small MACE for EMT FCC Cu solid 300-900 K; not for science",
        "seed": SEED,
        "train_temperatures_K": list(TRAIN_TEMPERATURES),
        "frames_per_temperature": FRAMES_PER_TEMPERATURE,
        "spacing_steps": SPACING,
        "equilibration_steps": EQUILIBRATION,
        "epochs": args.epochs,
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "data_seconds": t_data,
        "train_seconds": report["train_seconds"],
        "n_train": report["n_train"],
        "n_valid": report["n_valid"],
        "final_valid_E_rmse_meV_atom": report["history"][-1]["valid_E_rmse_meV_atom"],
        "final_valid_F_rmse_meV_A": report["history"][-1]["valid_F_rmse_meV_A"],
        "force_rms_eV_A": report["force_rms_eV_A"],
        "versions": {
            "mace": str(getattr(mace, "__version__", "?")),
            "torch": str(torch.__version__),
            "ase": str(ase.__version__),
        },
    }
    tmp = args.out.with_suffix(".tmp")
    torch.save(
        {
            "hyperparameters": HYPERPARAMETERS,
            "normalisation": normalisation,
            "state_dict": state,
            "metadata": metadata,
        },
        tmp,
    )
    tmp.replace(args.out)
    ase.io.write(args.train_out, frames, format="extxyz")
    print(json.dumps({"model": str(args.out), **metadata}))


if __name__ == "__main__":
    main()
