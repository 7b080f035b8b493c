"""Memory policy (quests_torch._memory) and default tile sizes, CUDA simulated on a CPU."""

from __future__ import annotations

import pytest
import torch

from quests_torch import _memory
from quests_torch._memory import memory_budget, parse_bytes, parse_fraction
from quests_torch.kde.tiles import CUDA_TILE_CAP, auto_tiles

GiB, MiB = 1 << 30, 1 << 20


@pytest.fixture
def fake_cuda(monkeypatch):
    """``torch.cuda`` memory queries answering from a dict (free, reserved, allocated)."""
    state = {"free": 10 * GiB, "reserved": 6 * GiB, "allocated": 2 * GiB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], 141 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.delenv("QUESTS_TORCH_MEMORY_BUDGET", raising=False)
    monkeypatch.delenv("QUESTS_TORCH_MEMORY_FRACTION", raising=False)
    return state


def test_cuda_budget_counts_cached_blocks(fake_cuda):
    # half of free + (reserved - allocated) = (10 + 4) / 2 GiB
    assert memory_budget("cuda") == 7 * GiB
    assert memory_budget(torch.device("cuda", 1)) == 7 * GiB
    fake_cuda["allocated"] = 8 * GiB  # more allocated than reserved: never negative
    assert memory_budget("cuda") == 5 * GiB


def test_cuda_budget_floor_near_a_full_gpu(fake_cuda):
    fake_cuda.update(free=100 * MiB, reserved=2 * GiB, allocated=2 * GiB)
    assert memory_budget("cuda") == 256 * MiB


def test_cuda_budget_fraction_and_overrides(fake_cuda, monkeypatch):
    monkeypatch.setenv("QUESTS_TORCH_MEMORY_FRACTION", "0.25")
    assert memory_budget("cuda") == int(0.25 * 14 * GiB)
    monkeypatch.setenv("QUESTS_TORCH_MEMORY_FRACTION", "10%")
    assert memory_budget("cuda") == int(0.1 * 14 * GiB)
    monkeypatch.setenv("QUESTS_TORCH_MEMORY_BUDGET", "2G")  # absolute cap wins, no floor
    assert memory_budget("cuda") == 2 * GiB
    monkeypatch.setenv("QUESTS_TORCH_MEMORY_BUDGET", "64M")
    assert memory_budget("cuda") == 64 * MiB
    assert memory_budget("cuda", budget="1G") == GiB  # the argument wins over both


def test_cpu_budget_fraction(monkeypatch):
    monkeypatch.delenv("QUESTS_TORCH_MEMORY_BUDGET", raising=False)
    monkeypatch.setattr(_memory, "_available_ram", lambda: 8 * GiB)
    monkeypatch.delenv("QUESTS_TORCH_MEMORY_FRACTION", raising=False)
    assert memory_budget("cpu") == GiB  # a quarter, capped at 1 GiB
    monkeypatch.setenv("QUESTS_TORCH_MEMORY_FRACTION", "0.05")
    assert memory_budget("cpu") == int(0.05 * 8 * GiB)


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.1", "half", "0%"])
def test_fraction_errors(bad):
    with pytest.raises(ValueError, match="QUESTS_TORCH_MEMORY_FRACTION"):
        parse_fraction(bad)


def test_parse_bytes():
    assert parse_bytes("512M") == 512 * MiB
    assert parse_bytes("2GiB") == 2 * GiB
    with pytest.raises(ValueError, match="memory budget"):
        parse_bytes("lots")


def test_cuda_tiles_capped_and_floored(fake_cuda):
    # an idle H200 (half of ~140 GiB): capped, not 16k x 16k
    assert auto_tiles("cuda", memory_budget("cuda"), 8) == (CUDA_TILE_CAP, CUDA_TILE_CAP)
    assert CUDA_TILE_CAP == 8192
    fake_cuda.update(free=141 * GiB, reserved=0, allocated=0)
    assert auto_tiles("cuda", memory_budget("cuda"), 4) == (8192, 8192)
    # a nearly full GPU: the 256 MiB floor still gives 2048-wide float64 tiles
    fake_cuda.update(free=10 * MiB, reserved=0, allocated=0)
    assert auto_tiles("cuda", memory_budget("cuda"), 8) == (2048, 2048)
    # an explicit small budget shrinks them (4 buffers fit)
    tm, tn = auto_tiles("cuda", 4 * MiB, 8)
    assert tm * tn * 8 * 4 <= 4 * MiB
    assert auto_tiles("cpu", GiB, 8) == (1024, 1024)
