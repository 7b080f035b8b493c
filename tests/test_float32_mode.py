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
    from quests_torch import structures

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(structures, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps", 0)
    monkeypatch.setattr(structures, "_mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
