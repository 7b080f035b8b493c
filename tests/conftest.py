from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


def rattled_fcc(reps=(2, 2, 2), a: float = 3.58, stdev: float = 0.05, seed: int = 0):
    """A rattled cubic FCC Cu supercell (no exact distance ties)."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=a, cubic=True) * reps
    rng = np.random.default_rng(seed)
    atoms.positions += rng.normal(0.0, stdev, atoms.positions.shape)
    return atoms


def random_rotation(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


@pytest.fixture(scope="module")
def ref():
    """Upstream reference values for the KDE/metrics tests (tests/data/kde_reference.npz)."""
    with np.load(DATA / "kde_reference.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def cu(ref):
    """Thermal Cu descriptors: 300 K solid, 1500 K liquid, queries, and the solid's structures."""
    solid = torch.from_numpy(ref["x_solid"])
    liquid = torch.from_numpy(ref["x_liquid"])
    return {
        "solid": solid,
        "liquid": liquid,
        "query": torch.from_numpy(ref["x_query"]),
        "all": torch.cat([solid, liquid]),
        "system_idx": torch.from_numpy(ref["solid_system_idx"]),
    }
