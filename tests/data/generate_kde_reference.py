"""Generate ``kde_reference.npz``: thermal Cu descriptors and upstream ``quests`` metrics.

The KDE/metric tests compare quests-torch against values computed here with the upstream
reference implementation (``pip install quests==2026.2.22``). The tests themselves only read
the ``.npz`` file, so they run without ``quests`` installed.

Data (fixed seeds, ASE EMT potential for Cu):

* ``solid``: 256-atom FCC Cu (4x4x4 conventional cells, a = 3.61 Å) thermalised with Langevin
  dynamics at 300 K; frames every 25 steps after 400 steps of equilibration.
* ``liquid``: the same cell expanded by 5 % in volume, melted at 3000 K and held at 1500 K.
* ``query``: later 300 K frames of the solid trajectory (not in ``solid``).

Descriptors come from ``quests.descriptor.get_descriptors`` (k = 32, r_c = 5 Å) so the tests
do not depend on quests-torch's own descriptor code. Environments are subsampled (fixed seed)
to keep the file below ~1.5 MB.

Run from the repository root::

    python tests/data/generate_kde_reference.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin

try:  # ASE >= 3.28
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # pragma: no cover
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

H_DEFAULT = 0.015
H_VECTOR = np.array([0.005, 0.01, 0.015, 0.03, 0.1])
VOLUMES = np.array([5.0, 8.0, 10.0, 11.8, 12.0, 16.0, 20.0, 30.0, 60.0])


def cu_trajectory(
    temperature_k: float,
    n_frames: int,
    seed: int,
    *,
    melt_k: float | None = None,
    volume_scale: float = 1.0,
    every: int = 25,
    equilibrate: int = 400,
    size: int = 4,
) -> list:
    """EMT Cu frames from Langevin MD (2 fs steps), optionally melted first at ``melt_k``."""
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((size, size, size))
    if volume_scale != 1.0:
        atoms.set_cell(atoms.cell * volume_scale ** (1.0 / 3.0), scale_atoms=True)
    atoms.calc = EMT()
    if melt_k is not None:
        thermalize_momenta(atoms, temperature_K=melt_k, rng=rng)
        Langevin(
            atoms, 2 * units.fs, temperature_K=melt_k, friction=0.05, fixcm=False, rng=rng
        ).run(equilibrate)
    else:
        thermalize_momenta(atoms, temperature_K=temperature_k, rng=rng)
    dyn = Langevin(
        atoms, 2 * units.fs, temperature_K=temperature_k, friction=0.02, fixcm=False, rng=rng
    )
    dyn.run(equilibrate)
    frames = []
    for _ in range(n_frames):
        dyn.run(every)
        frame = atoms.copy()
        frame.calc = None
        frames.append(frame)
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("kde_reference.npz"))
    args = parser.parse_args()

    from importlib.metadata import version

    from quests.descriptor import get_descriptors
    from quests.entropy import (
        delta_entropy,
        diversity,
        entropy,
        get_bandwidth,
        kernel_sum_multi_bandwidth,
    )

    sub = np.random.default_rng(2025)

    # 300 K solid: 8 frames; keep 96 random atoms of each -> 768 environments, system_idx
    solid_frames = cu_trajectory(300.0, 12, seed=11)
    fit_frames, query_frames = solid_frames[:8], solid_frames[8:]
    solid, solid_sys = [], []
    for s, frame in enumerate(fit_frames):
        x = get_descriptors([frame], k=32, cutoff=5.0)
        keep = np.sort(sub.choice(len(frame), 96, replace=False))
        solid.append(x[keep])
        solid_sys.append(np.full(keep.size, s))
    x_solid = np.concatenate(solid)
    solid_system_idx = np.concatenate(solid_sys)

    liquid_frames = cu_trajectory(1500.0, 4, seed=12, melt_k=3000.0, volume_scale=1.05)
    x_liquid = get_descriptors(liquid_frames, k=32, cutoff=5.0)
    x_liquid = x_liquid[np.sort(sub.choice(len(x_liquid), 768, replace=False))]

    x_query = get_descriptors(query_frames, k=32, cutoff=5.0)
    x_query = x_query[np.sort(sub.choice(len(x_query), 256, replace=False))]

    x_all = np.concatenate([x_solid, x_liquid])
    out = {
        "quests_version": np.array(version("quests")),
        "numpy_version": np.array(np.__version__),
        "parameters": np.array(
            "EMT Cu 4x4x4 FCC a=3.61; solid Langevin 300 K (seed 11, friction 0.02, dt 2 fs,"
            " 400 eq. steps, frames every 25); liquid 3000 K melt then 1500 K at +5% volume"
            " (seed 12); descriptors quests.descriptor.get_descriptors k=32 cutoff=5.0;"
            " subsample seed 2025; batch_size=20000 for all reference metrics"
        ),
        "x_solid": x_solid,
        "solid_system_idx": solid_system_idx,
        "x_liquid": x_liquid,
        "x_query": x_query,
        "h": np.array(H_DEFAULT),
        "h_vector": H_VECTOR,
        "entropy_solid": np.array(entropy(x_solid, H_DEFAULT)),
        "entropy_liquid": np.array(entropy(x_liquid, H_DEFAULT)),
        "entropy_all": np.array(entropy(x_all, H_DEFAULT)),
        "entropy_all_hvec": entropy(x_all, H_VECTOR),
        "diversity_solid": np.array(diversity(x_solid, H_DEFAULT)),
        "diversity_liquid": np.array(diversity(x_liquid, H_DEFAULT)),
        "diversity_all_hvec": diversity(x_all, H_VECTOR),
        "kernel_sum_all_hvec": kernel_sum_multi_bandwidth(x_all, x_all, H_VECTOR),
        "kernel_sum_query_solid_hvec": kernel_sum_multi_bandwidth(x_query, x_solid, H_VECTOR),
        "dh_query_solid": delta_entropy(x_query, x_solid, H_DEFAULT),
        "dh_liquid_solid": delta_entropy(x_liquid, x_solid, H_DEFAULT),
        "dh_solid_liquid": delta_entropy(x_solid, x_liquid, H_DEFAULT),
        "dh_liquid_solid_h01": delta_entropy(x_liquid, x_solid, 0.1),
        "entropy_per_structure_solid": np.array(
            [entropy(x_solid[solid_system_idx == s], H_DEFAULT) for s in range(len(fit_frames))]
        ),
        "volumes": VOLUMES,
        "bandwidth_gaussian": np.array([get_bandwidth(v, "gaussian") for v in VOLUMES]),
        "bandwidth_cutoff": np.array([get_bandwidth(v, "cutoff") for v in VOLUMES]),
    }
    np.savez_compressed(args.out, **out)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")
    for key in ("entropy_solid", "entropy_liquid", "entropy_all", "diversity_solid"):
        print(f"  {key} = {float(out[key]):.6f}")
    for key in ("dh_query_solid", "dh_liquid_solid", "dh_solid_liquid"):
        v = out[key]
        print(
            f"  {key}: finite {np.isfinite(v).sum()}/{v.size}, range {v.min():.3g}..{v.max():.3g}"
        )


if __name__ == "__main__":
    main()
