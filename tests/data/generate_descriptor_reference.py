"""Generate the descriptor parity data in ``tests/data/`` from upstream ``quests``.

Run from anywhere with the reference extra installed (``pip install quests==2026.2.22``)::

    python tests/data/generate_descriptor_reference.py

Writes, next to this script:

- ``descriptor_structures.extxyz``: every structure, ``atoms.info["name"]`` set;
- ``descriptor_reference.npz``: for each structure ``name`` the upstream descriptor
  ``[n_atoms, 2k-1]`` (key ``name``), the upstream multicomponent descriptor of the periodic
  alloy (key ``mc_alloy``), and metadata (versions, ``k``, ``cutoff``, species, layout).

Everything is seeded, so the output is reproducible. The reference descriptors are
computed on the structures *as read back* from the extxyz file (which stores positions
with 8 decimals), so a test that reads the file sees exactly the same coordinates.

Parity is only meaningful without distance ties at the k-th neighbour: a tie there lets
an implementation keep either neighbour. Every structure (and every single-species
sub-structure used by the multicomponent descriptor) is checked for a gap of at least
``MIN_RANK_GAP`` between the k-th and (k+1)-th neighbour distances. Ties *inside* the
kept set do not matter: x1 is a sorted list and x2 is symmetric in the neighbours.

As an independent guard, every stored descriptor is recomputed from the formula of the QUESTS
paper (Schwalbe-Koda et al., Nat. Commun. 2025) with an ASE neighbour list and plain NumPy,
and must agree to 1e-10.
"""

from __future__ import annotations

import argparse
import importlib.metadata
from pathlib import Path

import ase
import ase.io
import numpy as np
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.cluster import Icosahedron
from ase.md.langevin import Langevin
from ase.neighborlist import neighbor_list
from ase.units import fs, kB

K = 32
CUTOFF = 5.0
MIN_RANK_GAP = 1e-6  # Å, smallest allowed gap between the k-th and (k+1)-th distance
CROSSCHECK_TOL = 1e-10
HERE = Path(__file__).resolve().parent
STRUCTURES_FILE = "descriptor_structures.extxyz"
REFERENCE_FILE = "descriptor_reference.npz"


# --------------------------------------------------------------------------- structures


def rattle(atoms: Atoms, stdev: float, seed: int) -> Atoms:
    """Return a copy of ``atoms`` with Gaussian noise (Å) added to every coordinate."""
    rng = np.random.default_rng(seed)
    out = atoms.copy()
    out.positions = out.positions + rng.normal(0.0, stdev, size=out.positions.shape)
    return out


def strain_cell(atoms: Atoms, scale: float, seed: int) -> Atoms:
    """Return a copy whose cell is multiplied by a random near-identity matrix.

    ``cell_new = cell @ (I + scale * G)`` with G standard normal; atoms move with the cell.
    """
    rng = np.random.default_rng(seed)
    deform = np.eye(3) + scale * rng.standard_normal((3, 3))
    out = atoms.copy()
    out.set_cell(np.asarray(atoms.cell) @ deform, scale_atoms=True)
    if np.linalg.det(out.cell) <= 0.0:
        raise ValueError("strained cell is not right-handed; choose another seed")
    return out


def langevin_md(atoms: Atoms, temperature_k: float, steps: int, seed: int) -> Atoms:
    """Run a short seeded EMT Langevin MD (5 fs steps) and return the final frame.

    Initial momenta are Maxwell-Boltzmann at ``temperature_k`` with zero total momentum.
    """
    work = atoms.copy()
    work.calc = EMT()
    rng = np.random.default_rng(seed)
    masses = work.get_masses()[:, None]
    momenta = np.sqrt(masses * kB * temperature_k) * rng.standard_normal((len(work), 3))
    work.set_momenta(momenta - masses * momenta.sum(0) / masses.sum())
    dyn = Langevin(
        work,
        timestep=5.0 * fs,
        temperature_K=temperature_k,
        friction=0.02,
        fixcm=False,
        rng=np.random.default_rng(seed + 1),
    )
    dyn.run(steps)
    return work


def plain_copy(atoms: Atoms, name: str) -> Atoms:
    """Strip calculator, momenta and arrays other than positions; set ``info['name']``."""
    out = Atoms(
        symbols=atoms.get_chemical_symbols(),
        positions=atoms.get_positions(),
        cell=atoms.cell.array if atoms.pbc.any() else np.zeros((3, 3)),
        pbc=atoms.pbc,
    )
    out.info["name"] = name
    return out


def cu_fcc_108() -> Atoms:
    """108-atom FCC Cu, a = 3.58 Å, 3x3x3 cubic cells."""
    return bulk("Cu", "fcc", a=3.58, cubic=True).repeat((3, 3, 3))


def build_structures() -> list[Atoms]:
    """Build every parity structure (deterministic)."""
    thermal = langevin_md(cu_fcc_108(), 300.0, steps=60, seed=11)
    hot = langevin_md(cu_fcc_108(), 2000.0, steps=100, seed=22)
    triclinic = bulk("Cu", "fcc", a=3.6).repeat((3, 3, 3))
    triclinic = rattle(strain_cell(triclinic, 0.06, seed=33), 0.05, seed=34)
    primitive = strain_cell(bulk("Cu", "fcc", a=3.58), 0.02, seed=44)
    ethanol = rattle(molecule("CH3CH2OH"), 0.05, seed=55)
    ethanol.pbc = False
    cluster = rattle(Icosahedron("Cu", 3), 0.05, seed=66)
    cluster.pbc = False
    return [
        plain_copy(thermal, "cu_thermal"),
        plain_copy(hot, "cu_hot"),
        plain_copy(triclinic, "cu_rattled_triclinic"),
        plain_copy(primitive, "cu_primitive_rattled"),
        plain_copy(ethanol, "ethanol_rattled"),
        plain_copy(cluster, "cluster"),
        plain_copy(build_alloy(), "alloy"),
    ]


def build_alloy() -> Atoms:
    """Random 50/50 Cu/Au on 108 FCC sites (a = 3.7 Å), rattled 0.05 Å, periodic."""
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((3, 3, 3))
    rng = np.random.default_rng(77)
    symbols = np.array(["Cu"] * 54 + ["Au"] * 54)
    atoms.set_chemical_symbols(list(rng.permutation(symbols)))
    return rattle(atoms, 0.05, seed=78)


# --------------------------------------------------------------------------- checks


def sorted_neighbour_distances(atoms: Atoms, cutoff: float) -> list[np.ndarray]:
    """Per atom, the sorted distances to all neighbours (all images) within ``cutoff``."""
    i, d = neighbor_list("id", atoms, cutoff)
    return [np.sort(d[i == a]) for a in range(len(atoms))]


def min_rank_gap(atoms: Atoms, k: int, cutoff: float) -> float:
    """Smallest gap between the k-th and (k+1)-th neighbour distance over all atoms.

    Atoms with at most ``k`` neighbours within the cutoff have no cut, hence no tie: inf.
    """
    gaps = [d[k] - d[k - 1] for d in sorted_neighbour_distances(atoms, cutoff) if len(d) > k]
    return float(min(gaps)) if gaps else float("inf")


def check_no_ties(atoms: Atoms, label: str) -> float:
    """Raise if ``atoms`` has a near-tie at the k-th neighbour; return the gap."""
    gap = min_rank_gap(atoms, K, CUTOFF)
    if gap < MIN_RANK_GAP:
        raise ValueError(f"{label}: k-th neighbour gap {gap:.2e} Å < {MIN_RANK_GAP:.0e}")
    d_min = min(float(d[0]) for d in sorted_neighbour_distances(atoms, CUTOFF) if len(d))
    if d_min < 0.5:
        raise ValueError(f"{label}: unphysical nearest distance {d_min:.3f} Å")
    return gap


# --------------------------------------------------------------------------- cross-check


def smooth_cutoff(r: np.ndarray, cutoff: float) -> np.ndarray:
    """w(r) = (1 - (min(r, r_c)/r_c)^2)^2."""
    z = np.minimum(r, cutoff) / cutoff
    return (1.0 - z**2) ** 2


def formula_descriptor_one(vectors: np.ndarray, k: int, cutoff: float) -> np.ndarray:
    """The paper's descriptor of one atom from its sorted neighbour vectors [n, 3]."""
    vec = vectors[:k]
    r = np.linalg.norm(vec, axis=1)
    n = len(r)
    x1 = np.zeros(k)
    x1[:n] = smooth_cutoff(r + 1e-16, cutoff) / (r + 1e-16)
    w = smooth_cutoff(r, cutoff)
    pair = np.linalg.norm(vec[:, None, :] - vec[None, :, :], axis=-1)
    block = np.sqrt(np.outer(w, w)) / (pair + 1e-15)
    np.fill_diagonal(block, 0.0)
    big = np.zeros((k, k))
    big[:n, :n] = block
    rows = np.sort(big, axis=1)
    x2 = rows[:, ::-1].sum(axis=0)[: k - 1] / k
    return np.concatenate([x1, x2])


def formula_descriptors(atoms: Atoms, k: int, cutoff: float) -> np.ndarray:
    """The paper's descriptors of every atom, via an ASE neighbour list (slow, exact)."""
    i, d, vec = neighbor_list("idD", atoms, cutoff)
    out = np.zeros((len(atoms), 2 * k - 1))
    for a in range(len(atoms)):
        mine = i == a
        order = np.argsort(d[mine], kind="stable")
        out[a] = formula_descriptor_one(vec[mine][order], k, cutoff)
    return out


def formula_multicomponent(atoms: Atoms, species: list[str], k: int, cutoff: float) -> np.ndarray:
    """Upstream-layout multicomponent descriptor from the paper's formula.

    Blocks: [x1(all), x1(s_1), ..., x1(s_S), x2(all), x2(s_1), ..., x2(s_S)].
    """
    blocks = [formula_descriptors(atoms, k, cutoff)]
    symbols = np.array(atoms.get_chemical_symbols())
    for sp in species:
        part = np.zeros_like(blocks[0])
        part[symbols == sp] = formula_descriptors(atoms[symbols == sp], k, cutoff)
        blocks.append(part)
    x1 = [b[:, :k] for b in blocks]
    x2 = [b[:, k:] for b in blocks]
    return np.concatenate(x1 + x2, axis=1)


def crosscheck(label: str, reference: np.ndarray, independent: np.ndarray) -> float:
    """Raise if the upstream descriptors and the paper's formula differ beyond the tolerance."""
    diff = float(np.max(np.abs(reference - independent)))
    if not diff <= CROSSCHECK_TOL:
        raise ValueError(f"{label}: upstream vs the paper's formula differ by {diff:.3e}")
    return diff


# --------------------------------------------------------------------------- main


def round_trip(structures: list[Atoms], path: Path) -> list[Atoms]:
    """Write ``structures`` to extxyz and return them as read back (the stored precision)."""
    ase.io.write(path, structures, format="extxyz")
    return ase.io.read(path, index=":", format="extxyz")


def reference_arrays(structures: list[Atoms]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Compute upstream descriptors, check ties and cross-check; return arrays and a log."""
    from quests.descriptor import get_descriptors, get_descriptors_multicomponent

    arrays: dict[str, np.ndarray] = {}
    log = []
    for atoms in structures:
        name = atoms.info["name"]
        gap = check_no_ties(atoms, name)
        ref = get_descriptors([atoms], k=K, cutoff=CUTOFF, dtype="float64")
        diff = crosscheck(name, ref, formula_descriptors(atoms, K, CUTOFF))
        arrays[name] = ref
        log.append(f"{name:22s} atoms={len(atoms):4d} gap={gap:.2e} Å formula_diff={diff:.1e}")
    alloy = next(a for a in structures if a.info["name"] == "alloy")
    species = sorted(set(alloy.get_chemical_symbols()))
    for sp in species:
        check_no_ties(alloy[np.array(alloy.get_chemical_symbols()) == sp], f"alloy[{sp}]")
    mc = get_descriptors_multicomponent([alloy], k=K, cutoff=CUTOFF, species=species)
    diff = crosscheck("mc_alloy", mc, formula_multicomponent(alloy, species, K, CUTOFF))
    arrays["mc_alloy"] = mc
    arrays["mc_species"] = np.array(species)
    log.append(f"{'mc_alloy':22s} shape={mc.shape} formula_diff={diff:.1e}")
    return arrays, log


def metadata(names: list[str], species: np.ndarray) -> dict[str, np.ndarray]:
    """Version and parameter metadata stored beside the arrays (plain, non-object arrays)."""
    layout = [f"x1[{s}]" for s in ["all", *species]] + [f"x2[{s}]" for s in ["all", *species]]
    return {
        "quests_version": np.array(importlib.metadata.version("quests")),
        "ase_version": np.array(ase.__version__),
        "numpy_version": np.array(np.__version__),
        "k": np.array(K),
        "cutoff": np.array(CUTOFF),
        "names": np.array(names),
        "mc_layout": np.array(layout),
    }


def main(argv: list[str] | None = None) -> None:
    """Build structures, compute reference descriptors, write the two data files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", type=Path, default=HERE, help="output folder")
    args = parser.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)

    structures = round_trip(build_structures(), args.outdir / STRUCTURES_FILE)
    arrays, log = reference_arrays(structures)
    names = [a.info["name"] for a in structures]
    arrays.update(metadata(names, arrays["mc_species"]))
    np.savez_compressed(args.outdir / REFERENCE_FILE, **arrays)
    print("\n".join(log))
    for fname in (STRUCTURES_FILE, REFERENCE_FILE):
        print(f"wrote {args.outdir / fname} ({(args.outdir / fname).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
