"""Property-based fuzzing of the file readers: truncated and bit-damaged inputs.

A valid extxyz file and valid ``.pt``/``.npz`` descriptor files are cut at random places and
have random bytes replaced; every reader must then either raise a ``ValueError``/``TypeError``
that names the file, or return a result that holds together (finite numbers, consistent
counts) -- never hang, never raise anything else. Deterministic (``derandomize=True``, no
example database) so that CI cannot flake; ~10 s in all on a 2-core CPU. To search deeper
locally, set ``QUESTS_TORCH_FUZZ_EXAMPLES=3000 QUESTS_TORCH_FUZZ_RANDOM=1``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rattled_fcc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quests_torch import io

FUZZ = settings(
    max_examples=int(os.environ.get("QUESTS_TORCH_FUZZ_EXAMPLES", 150)),
    deadline=2000,  # ms per example: a hang or a crawl through a huge header fails here
    derandomize=not os.environ.get("QUESTS_TORCH_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _extxyz_bytes() -> bytes:
    import ase.io

    frames = [rattled_fcc((1, 1, 1), seed=s) for s in range(3)]
    frames[1] = frames[1][:3]  # frames of different sizes: the header-by-header path
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "valid.extxyz"
        ase.io.write(path, frames, format="extxyz")
        return path.read_bytes()


def _descriptor_bytes(suffix: str) -> bytes:
    x = torch.rand(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"valid{suffix}"
        io.save_descriptors(path, x, [3, 4], k=3, cutoff=4.0, extra={"note": "fuzz"})
        return path.read_bytes()


VALID = {
    ".extxyz": _extxyz_bytes(),
    ".pt": _descriptor_bytes(".pt"),
    ".npz": _descriptor_bytes(".npz"),
}


#: a replacement byte: any, or one that keeps text looking like numbers, lines and headers
BYTE = st.one_of(st.integers(0, 255), st.sampled_from(list(b"0123456789e-+. \n\tNaninf")))


@st.composite
def damaged(draw, suffix: str) -> bytes:
    """The valid file of ``suffix`` truncated and/or with up to 4 bytes replaced."""
    data = bytearray(VALID[suffix])
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    for _ in range(draw(st.integers(0, 4 if data else 0))):
        data[draw(st.integers(0, len(data) - 1))] = draw(BYTE)
    return bytes(data)


def _written(data: bytes, suffix: str, d: str) -> Path:
    path = Path(d) / f"fuzzed{suffix}"
    path.write_bytes(data)
    return path


def test_the_valid_files_read():
    with tempfile.TemporaryDirectory() as d:
        xyz = _written(VALID[".extxyz"], ".extxyz", d)
        assert len(io.read_structures(xyz)) == 3 and io.count_frames(xyz) == 3
        for suffix in (".pt", ".npz"):
            ds = io.load_descriptors(_written(VALID[suffix], suffix, d))
            assert ds.x.shape == (7, 5) and ds.n_atoms.tolist() == [3, 4]


@FUZZ
@given(data=damaged(".extxyz"))
def test_damaged_extxyz(data):
    with tempfile.TemporaryDirectory() as d:
        path = _written(data, ".extxyz", d)
        count = io.count_frames(path)  # progress bars only: a number or None, never an error
        assert count is None or count >= 0
        try:
            frames = io.read_structures(path)
        except ValueError as exc:
            assert "fuzzed.extxyz" in str(exc)
            frames = None
        if frames is not None:
            for atoms in frames:
                assert np.isfinite(atoms.positions).all()
                assert np.isfinite(atoms.cell.array).all()
        try:
            streamed = list(io.iter_structures(path))
        except ValueError as exc:
            assert "fuzzed.extxyz" in str(exc)
        else:  # a stream may be empty where read_structures refuses an empty selection
            assert len(streamed) == (len(frames) if frames else 0)


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_damaged_descriptor_file(suffix):
    @FUZZ
    @given(data=damaged(suffix))
    def check(data):
        with tempfile.TemporaryDirectory() as d:
            path = _written(data, suffix, d)
            try:
                ds = io.load_descriptors(path)
            except (ValueError, TypeError) as exc:
                assert f"fuzzed{suffix}" in str(exc)
                return
            assert ds.x.ndim == 2 and ds.x.dtype in (torch.float32, torch.float64)
            assert bool(torch.isfinite(ds.x).all())
            assert int(ds.n_atoms.sum()) == ds.x.shape[0] and (ds.n_atoms >= 0).all()
            assert ds.k >= 1 and ds.cutoff > 0 and ds.x.shape[1] % (2 * ds.k - 1) == 0

    check()
