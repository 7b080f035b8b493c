"""float32-only mode (issue 19): MPS, slow-float64 CUDA cards and ``QUESTS_TORCH_FLOAT64=0``.

On CPU the switch makes the CPU the compute device of a float32-only run: a dispatch mode
fails on any float64 tensor produced by the library call.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from quests_torch import _precision
from quests_torch._precision import compute_dtype, float64_enabled, float64_is_fast
from quests_torch.structures import resolve_device


class NoFloat64(TorchDispatchMode):
    """Raise on any float64 tensor an operator returns (names the operator)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                raise AssertionError(f"float64 tensor produced by {func}")
        return out


@pytest.fixture
def f32(monkeypatch):
    monkeypatch.setenv("QUESTS_TORCH_FLOAT64", "0")


def test_switch_and_rule(monkeypatch):
    monkeypatch.delenv("QUESTS_TORCH_FLOAT64", raising=False)
    assert float64_is_fast("cpu") and float64_enabled("cpu")
    assert not float64_is_fast("mps") and not float64_enabled("mps")
    assert compute_dtype("cpu", torch.float64) == torch.float64
    monkeypatch.setenv("QUESTS_TORCH_FLOAT64", "0")
    assert not float64_enabled("cpu")
    assert compute_dtype("cpu", torch.float64) == torch.float32
    assert compute_dtype("cpu", torch.float32) == torch.float32
    monkeypatch.setenv("QUESTS_TORCH_FLOAT64", "1")
    assert float64_enabled("cpu") and not float64_enabled("mps")


@pytest.mark.parametrize(
    ("capability", "name", "fast"),
    [
        ((9, 0), "NVIDIA H200", True),
        ((9, 0), "NVIDIA H100 80GB HBM3", True),
        ((8, 0), "NVIDIA A100-SXM4-80GB", True),
        ((7, 0), "Tesla V100-SXM2-16GB", True),
        ((6, 0), "Tesla P100-PCIE-16GB", True),
        ((9, 0), "NVIDIA H20", False),
        ((9, 0), "NVIDIA H800", False),
        ((8, 6), "NVIDIA GeForce RTX 3090", False),
        ((8, 9), "NVIDIA GeForce RTX 4090", False),
        ((8, 9), "NVIDIA L40S", False),
        ((7, 5), "Tesla T4", False),
        ((12, 0), "NVIDIA GeForce RTX 5090", False),
        ((10, 0), "NVIDIA B200", True),
        ((10, 3), "NVIDIA B300 SXM6 AC", False),
    ],
)
def test_float64_is_fast_cuda_rule(monkeypatch, capability, name, fast):
    monkeypatch.delenv("QUESTS_TORCH_FLOAT64", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: name)
    _precision._cuda_fp64_fast.cache_clear()
    try:
        assert float64_is_fast(torch.device("cuda", 0)) is fast
        assert float64_enabled(torch.device("cuda", 0)) is fast
    finally:
        _precision._cuda_fp64_fast.cache_clear()


def test_auto_device_prefers_cuda_then_mps(monkeypatch):
    from quests_torch import devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps", 0)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")


# ---------------------------------------------------------------------------- kernel sums
# measured on the thermal Cu descriptors (1,536 x 63, h = 0.015), float32-only vs float64:
# H relative 4.1e-8, dH max abs 1.5e-6 nats, log p max abs 4.6e-5 (median 1.0e-6)


@pytest.mark.parametrize("tile", [None, 64])
def test_entropy_float32_only(monkeypatch, cu, tile):
    from quests_torch import entropy, log_kernel_sum

    x64 = cu["all"]
    h64 = entropy(x64, tile_size=tile)
    lp64 = log_kernel_sum(x64, x64, 0.015, tile_size=tile)
    monkeypatch.setenv("QUESTS_TORCH_FLOAT64", "0")
    x = x64.float()
    with NoFloat64():
        h = entropy(x, tile_size=tile)
        lp = log_kernel_sum(x, x, 0.015, tile_size=tile)
    assert h.dtype == torch.float32 and lp.dtype == torch.float32
    assert abs(float(h) - float(h64)) <= 1e-6 * abs(float(h64))  # measured 4.1e-8
    err = (lp.double() - lp64).abs()
    assert float(err.max()) < 2e-4 and float(err.median()) < 1e-5  # 4.6e-5, 1.0e-6


@pytest.mark.parametrize("tile", [None, 64])
def test_delta_entropy_float32_only(monkeypatch, cu, tile):
    from quests_torch import delta_entropy

    dh64 = delta_entropy(cu["query"], cu["solid"], tile_size=tile)
    monkeypatch.setenv("QUESTS_TORCH_FLOAT64", "0")
    q, y = cu["query"].float(), cu["solid"].float()
    with NoFloat64():
        dh = delta_entropy(q, y, tile_size=tile)
    assert dh.dtype == torch.float32
    assert float((dh.double() - dh64).abs().max()) < 1e-5  # measured 1.5e-6 nats


def test_float64_inputs_come_back_float32(monkeypatch, cu):
    from quests_torch import entropy

    monkeypatch.setenv("QUESTS_TORCH_FLOAT64", "0")
    assert entropy(cu["solid"]).dtype == torch.float32


def test_far_rows_float32_only(monkeypatch):
    """Rows past the float32 floor go through the shifted sweep, compensated as well."""
    from quests_torch import log_kernel_sum

    g = torch.Generator().manual_seed(0)
    y = torch.randn(300, 8, generator=g, dtype=torch.float64) * 0.1
    x = torch.cat([y[:5], y[:5] + 3.0])  # the last five are ~1e4 nats away at h = 0.015
    ref = log_kernel_sum(x, y, 0.05, tile_size=64)
    monkeypatch.setenv("QUESTS_TORCH_FLOAT64", "0")
    with NoFloat64():
        got = log_kernel_sum(x.float(), y.float(), 0.05, tile_size=64)
    assert torch.isfinite(got).all()
    assert float(((got.double() - ref) / ref.abs().clamp(min=1)).abs().max()) < 1e-5


# ---------------------------------------------------------------------------- descriptors
# measured float32-only vs float64, max abs error / max |descriptor|: rattled FCC Cu 5e-7
# (32 atoms) and 9.7e-7 (256 atoms, cell grid and pair list), ethanol 6.8e-8, ethanol moved
# 1,000 Å from the origin 6.8e-8 (3.6e-5 without centring each structure before the cast)


def _descriptor_cases():
    from ase.build import molecule
    from conftest import rattled_fcc

    far = molecule("CH3CH2OH")
    far.positions += 1000.0
    return [
        ("fcc32", rattled_fcc((2, 2, 2), stdev=0.1), ("auto", "pairs", "grid")),
        ("fcc256", rattled_fcc((4, 4, 4), stdev=0.1), ("auto", "pairs")),
        ("ethanol", molecule("CH3CH2OH"), ("auto",)),
        ("ethanol_far", far, ("auto",)),
    ]


@pytest.mark.parametrize("case", range(4), ids=["fcc32", "fcc256", "ethanol", "ethanol_far"])
def test_descriptors_float32_only(monkeypatch, case):
    from quests_torch import get_descriptors

    _, atoms, searches = _descriptor_cases()[case]
    ref = get_descriptors(atoms)
    monkeypatch.setenv("QUESTS_TORCH_FLOAT64", "0")
    for search in searches:
        with NoFloat64():
            d = get_descriptors(atoms, search=search)
        assert d.dtype == torch.float32
        err = float((d.double() - ref).abs().max() / ref.abs().max())
        assert err < 5e-6, (search, err)  # measured <= 9.7e-7


def test_descriptors_from_tensors_float32_only(monkeypatch):
    from conftest import rattled_fcc

    from quests_torch import AtomsBatch, descriptors_from_tensors

    b = AtomsBatch.from_ase([rattled_fcc((2, 2, 2), seed=s) for s in range(3)])
    ref = descriptors_from_tensors(b.positions, b.cell, b.pbc, b.system_idx)
    monkeypatch.setenv("QUESTS_TORCH_FLOAT64", "0")
    pos, cell = b.positions.float(), b.cell.float()
    with NoFloat64():
        d = descriptors_from_tensors(pos, cell, b.pbc, b.system_idx, search="grid")
    assert d.dtype == torch.float32
    assert float((d.double() - ref).abs().max() / ref.abs().max()) < 5e-6


# ---------------------------------------------------------------------------- bank, screening


def _bank_data():
    from conftest import rattled_fcc

    refs = [rattled_fcc((2, 2, 2), seed=s) for s in range(3)]
    query = [rattled_fcc((2, 2, 2), seed=10, stdev=0.1), rattled_fcc((2, 2, 2), seed=11)]
    return refs, query


def test_uncertainty_bank_float32_only(monkeypatch):
    from quests_torch import AtomsBatch, UncertaintyBank

    refs, query = _bank_data()
    b = AtomsBatch.from_ase(query)
    dh64 = UncertaintyBank.from_atoms(refs)(b.positions, b.cell, b.pbc, b.system_idx)
    monkeypatch.setenv("QUESTS_TORCH_FLOAT64", "0")
    b32 = AtomsBatch.from_ase(query, dtype=torch.float32)
    pos = b32.positions.clone().requires_grad_(True)
    with NoFloat64():
        bank = UncertaintyBank.from_atoms(refs)  # asks for float64: gets float32
        dh = bank(pos, b32.cell, b32.pbc, b32.system_idx)
        (grad,) = torch.autograd.grad(dh.sum(), pos)
    assert bank.descriptors.dtype == torch.float32 and dh.dtype == torch.float32
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    err = (dh.detach().double() - dh64.detach()).abs() / dh64.detach().abs().clamp(min=1.0)
    assert float(err.max()) < 1e-4, float(err.max())


def test_screen_frames_float32_only(monkeypatch):
    from quests_torch import get_descriptors, screen_frames

    refs, query = _bank_data()
    x_ref = get_descriptors(refs)
    ref64 = list(screen_frames(query, x_ref))
    monkeypatch.setenv("QUESTS_TORCH_FLOAT64", "0")
    x32 = x_ref.float()
    with NoFloat64():
        got = list(screen_frames(query, x32))
    for a, b in zip(got, ref64, strict=True):
        assert a.dh.dtype == torch.float32
        scale = max(1.0, abs(b.dH_max))
        assert abs(a.dH_max - b.dH_max) < 1e-4 * scale
        assert abs(a.dH_mean - b.dH_mean) < 1e-4 * max(1.0, abs(b.dH_mean))
        assert a.novel_fraction == b.novel_fraction
        assert a.largest_cluster == b.largest_cluster


def test_float64_bank_state_loads_as_float32(monkeypatch):
    from quests_torch import UncertaintyBank

    refs, _ = _bank_data()
    state = UncertaintyBank.from_atoms(refs).state_dict()
    assert state["descriptors"].dtype == torch.float64
    monkeypatch.setenv("QUESTS_TORCH_FLOAT64", "0")
    bank = UncertaintyBank()
    bank.load_state_dict(state)
    assert bank.descriptors.dtype == torch.float32
    assert torch.equal(bank.descriptors, state["descriptors"].float())


# ---------------------------------------------------------------------------- compression
# 16 rattled FCC Cu cells (32 atoms; lattice 3.50-3.69 Å, rattle 0.02-0.11 Å: well separated)
# and a 2-cell prior, float32-only vs float64, measured: the same selection order of all 16
# structures for msc, msc_conditional, fps and random (generators 0-2), of 6 for k_means
# (generators 0-2); H_s max abs 5.3e-7 nats; curve entropy max abs 6.0e-7 nats (relative
# 2.6e-7), diversity relative 1.1e-7; overlap counts equal (without the pinned self pairs of
# the running sums: H abs 2.5e-6 and one environment's coverage flips). The 40 thermal Cu
# structures of tests/test_compression.py: the same order (all 40; 10 for k_means) for every
# method, curve H relative <= 2.5e-7, diversity relative <= 2.4e-7.


@pytest.fixture(scope="module")
def cells():
    from conftest import rattled_fcc

    from quests_torch import get_descriptors

    S = 16
    frames = [
        rattled_fcc(
            (2, 2, 2), a=3.5 + 0.2 * (7 * s % S) / S, stdev=0.02 + 0.1 * (5 * s % S) / S, seed=s
        )
        for s in range(S)
    ]
    prior = [rattled_fcc((2, 2, 2), stdev=0.05, seed=100 + i) for i in range(2)]
    sid = torch.repeat_interleave(torch.arange(S), 32)
    return get_descriptors(frames), sid, get_descriptors(prior)


def _compress(method, x, sid, prior, **kw):
    from quests_torch.compression import compress

    size = 6 if method == "k_means" else int(sid.max()) + 1  # k_means of all 16 is trivial
    ref = prior if method == "msc_conditional" else None
    return compress(x, sid, size, method, reference=ref, **kw)


@pytest.mark.parametrize("method", ["msc", "msc_conditional", "fps", "k_means", "random"])
def test_compression_float32_only(monkeypatch, cells, method):
    x, sid, prior = cells
    gens = (0, 1, 2) if method in ("k_means", "random") else (0,)
    for gen in gens:
        monkeypatch.delenv("QUESTS_TORCH_FLOAT64", raising=False)
        want = _compress(method, x, sid, prior, generator=gen)
        monkeypatch.setenv("QUESTS_TORCH_FLOAT64", "0")
        with NoFloat64():
            got = _compress(method, x.float(), sid, prior.float(), generator=gen)
        assert got.indices.tolist() == want.indices.tolist(), gen  # measured: equal
        a, b = want.curve, got.curve
        assert b.entropy.dtype == b.diversity.dtype == got.structure_entropy.dtype == torch.float32
        assert float((got.structure_entropy.double() - want.structure_entropy).abs().max()) < 2e-6
        assert float((b.entropy.double() - a.entropy).abs().max()) < 2e-6  # measured 6.0e-7
        assert float(((b.diversity.double() - a.diversity) / a.diversity).abs().max()) < 1e-6
        n = x.shape[0]  # covered environments, counted: exactly equal
        assert torch.equal((b.overlap.double() * n).round(), (a.overlap * n).round())


def test_compression_float64_inputs_float32_only(monkeypatch, cells):
    """float64 tensors and arrays are cast first (arrays on the host): the float32 result."""
    x, sid, prior = cells
    monkeypatch.setenv("QUESTS_TORCH_FLOAT64", "0")
    want = _compress("msc", x.float(), sid, prior)
    with NoFloat64():
        got = _compress("msc", x, sid, prior)
    from_numpy = _compress("msc", x.numpy(), sid.numpy(), prior)
    for res in (got, from_numpy):
        assert torch.equal(res.indices, want.indices)
        assert torch.equal(res.curve.entropy, want.curve.entropy)
        assert torch.equal(res.structure_entropy, want.structure_entropy)


class _Stop(Exception):
    pass


def test_compression_checkpoint_float32_only(monkeypatch, cells, tmp_path):
    x, sid, prior = cells
    x = x.float()  # float32 data: the same digest in both modes
    path = tmp_path / "fps.ckpt"
    monkeypatch.setenv("QUESTS_TORCH_FLOAT64", "0")
    want = _compress("fps", x, sid, prior)

    def stop_after_5(done, total):
        if done == 5:
            raise _Stop

    with NoFloat64():
        with pytest.raises(_Stop):
            _compress("fps", x, sid, prior, checkpoint=path, progress=stop_after_5)
        got = _compress("fps", x, sid, prior, checkpoint=path)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.curve.entropy, want.curve.entropy)
    monkeypatch.delenv("QUESTS_TORCH_FLOAT64")  # float32 state is not resumed in float64
    with pytest.raises(ValueError, match="written for other data or parameters"):
        _compress("fps", x, sid, prior, checkpoint=path)


def test_generation_report_float32_only(monkeypatch, cells):
    """Measured (4 generations of 4 cells): H relative 3.4e-8, D 7.6e-8, max dH 5.0e-7,
    novelty equal; the 40 thermal Cu structures in 4 generations: 7.2e-8, 6.8e-8, 6.7e-7."""
    from quests_torch.generations import generation_report

    x, sid, _ = cells
    gen = sid % 4
    want = generation_report(x, gen)
    monkeypatch.setenv("QUESTS_TORCH_FLOAT64", "0")
    with NoFloat64():
        got = generation_report(x.float(), gen)
    assert got.entropy.dtype == torch.float32
    for name, tol in (("entropy", 1e-6), ("diversity", 1e-6), ("max_dh", 5e-6)):
        a, b = getattr(want, name)[1:].double(), getattr(got, name)[1:].double()
        assert float(((b - a) / a).abs().max()) < tol, name
    assert torch.isnan(got.novelty[0]) and torch.isnan(got.max_dh[0])
    n = got.n_environments[1:]  # novel environments, counted: exactly equal
    assert torch.equal((got.novelty[1:].double() * n).round(), (want.novelty[1:] * n).round())
