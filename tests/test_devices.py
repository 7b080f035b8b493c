"""One place decides the device (issue 27): every entry point that takes a ``device`` calls
:func:`quests_torch.devices.resolve_device`, computes where it says, and refuses a device
that does not exist with the same message, naming the argument."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch

from quests_torch import devices
from quests_torch.devices import resolve_device

ase = pytest.importorskip("ase")


@pytest.fixture
def data(tmp_path):
    """The inputs of every entry point, made before the device is decided (on the CPU)."""
    from ase.build import bulk

    from quests_torch import get_descriptors

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=1)
    trajectory = tmp_path / "traj.extxyz"
    ase.io.write(trajectory, [atoms, atoms])
    rng = np.random.default_rng(0)
    return {
        "atoms": atoms,
        "x": rng.normal(size=(24, 5)),
        "y": rng.normal(size=(16, 5)),
        "sid": np.repeat(np.arange(4), 6),
        "reference": get_descriptors(atoms, k=4, cutoff=3.0, device="cpu"),
        "trajectory": trajectory,
        "out": tmp_path,
    }


def _entry_points():
    """Each entry point that takes a device: ``call(device, data)`` returning what holds the
    result's device (a batch, a bank, a tensor), or ``None`` where the result keeps none (a
    store is a file: on the CPU whatever computed it)."""
    import quests_torch as qt

    kw = {"k": 4, "cutoff": 3.0}
    return {
        "AtomsBatch.from_ase": lambda d, a: qt.AtomsBatch.from_ase(a["atoms"], device=d),
        "AtomsBatch.to": lambda d, a: qt.AtomsBatch.from_ase(a["atoms"]).to(d),
        "get_descriptors": lambda d, a: qt.get_descriptors(a["atoms"], **kw, device=d),
        "log_kernel_sum": lambda d, a: qt.log_kernel_sum(a["x"], a["y"], device=d),
        "grouped_log_kernel_sum": lambda d, a: qt.kde.grouped_log_kernel_sum(
            a["x"], [6, 6, 12], device=d
        ),
        "entropy": lambda d, a: qt.entropy(a["x"], device=d),
        "entropy_per_structure": lambda d, a: qt.metrics.entropy_per_structure(
            a["x"], a["sid"], device=d
        ),
        "estimate_entropy": lambda d, a: qt.estimate_entropy(a["x"], rows=20, device=d).value,
        "compress": lambda d, a: qt.compress(a["x"], a["sid"], 2, "fps", device=d).indices,
        "UncertaintyBank": lambda d, a: qt.UncertaintyBank(**kw, device=d),
        "UncertaintyBank.from_descriptors": lambda d, a: qt.UncertaintyBank.from_descriptors(
            a["reference"].numpy(), **kw, device=d
        ),
        "screen_trajectory": lambda d, a: qt.screen_trajectory(
            a["trajectory"], a["reference"], a["out"] / "t.tsv", **kw, device=d
        ),
        "write_descriptor_store": lambda d, a: (
            qt.write_descriptor_store(a["trajectory"], a["out"] / "s.qstore", **kw, device=d)
            and None
        ),
    }


ENTRY_POINTS = sorted(_entry_points())


def _where(result) -> torch.device | None:
    if isinstance(result, torch.Tensor):
        return result.device
    device = getattr(result, "device", None)
    return device if isinstance(device, torch.device) else None


def _decisions(call):
    """Run ``call()``; the devices :func:`resolve_device` returned meanwhile, and the result."""
    code = devices.resolve_device.__code__
    returned: list[torch.device] = []

    def profile(frame, event, arg):
        if event == "return" and frame.f_code is code and arg is not None:
            returned.append(arg)

    sys.setprofile(profile)
    try:
        result = call()
    finally:
        sys.setprofile(None)
    return returned, result


@pytest.mark.parametrize("device", ["cpu", "auto"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_decides_the_device_through_the_one_function(entry, device, data):
    """``resolve_device`` is called, and the result lives where it said (``"auto"`` included)."""
    call = _entry_points()[entry]
    returned, result = _decisions(lambda: call(device, data))
    assert returned, f"{entry} did not call resolve_device"
    chosen = resolve_device(device)
    assert set(returned) == {chosen}, (entry, returned)
    where = _where(result)
    if where is not None:
        assert devices.canonical_device(where) == chosen, (entry, where)


#: (device, the message every entry point gives), as tuples: conftest skips a test whose
#: string parameter names a CUDA device, and these run without one
BAD = {
    "bare-cuda": ("cuda", "`device` is cuda but CUDA is not available in this torch build"),
    "indexed-cuda": ("cuda:1", "`device` is cuda:1 but CUDA is not available in this torch build"),
    "unknown": (
        "gpu",
        "`device` must be 'auto' or a device such as 'cpu', 'cuda', 'cuda:1' or 'mps', got 'gpu'",
    ),
}


@pytest.mark.parametrize("bad", list(BAD.values()), ids=list(BAD))
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_device_that_does_not_exist_is_one_error_everywhere(entry, bad, data, monkeypatch):
    """The same ``ValueError`` from every entry point, before anything is written."""
    call = _entry_points()[entry]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, message = bad
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call(device, data)
    assert [p.name for p in data["out"].iterdir()] == ["traj.extxyz"]


def test_the_command_line_gives_the_same_error(data, monkeypatch, capsys):
    from quests_torch.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = data["trajectory"]
    assert main(["entropy", str(path), "-k", "4", "-c", "3", "--device", "cuda", "-q"]) == 2
    assert BAD["bare-cuda"][1] in capsys.readouterr().err


# ------------------------------------------------------------------ the rule itself


def test_auto_follows_the_inputs_then_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")  # None means the default, "auto"
    assert resolve_device(None, default="cpu") == torch.device("cpu")
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps:0")
    assert resolve_device(None, default="cpu") == torch.device("cpu")
    # inputs on a device decide "auto" and None; numpy inputs (None) do not
    on_cpu = [("x", torch.device("cpu")), ("y", None)]
    assert resolve_device("auto", inputs=on_cpu) == torch.device("cpu")
    assert resolve_device(None, inputs=on_cpu) == torch.device("cpu")
    assert resolve_device(None, inputs=[("x", None)], default="cpu") == torch.device("cpu")


def test_inputs_on_a_device_decide_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    on_gpu = [("x", torch.device("cuda:0")), ("y", None)]
    assert resolve_device("cuda", inputs=on_gpu) == torch.device("cuda:0")
    assert resolve_device(None, inputs=on_gpu, default="cpu") == torch.device("cuda:0")
    with pytest.raises(
        ValueError, match=re.escape("`device` is cpu but the inputs live on cuda:0 (`x`)")
    ):
        resolve_device("cpu", inputs=on_gpu)
    mixed = [("x", torch.device("cuda:0")), ("y", torch.device("cpu"))]
    with pytest.raises(
        ValueError, match=r"^inputs must be on one device, got `x` on cuda:0, `y` on cpu$"
    ):
        resolve_device(None, inputs=mixed)


def test_structures_still_exports_the_rule():
    from quests_torch import structures

    assert structures.resolve_device is resolve_device
    assert structures.canonical_device is devices.canonical_device


def test_a_bad_device_names_the_argument():
    with pytest.raises(ValueError, match=r"^`where` must be 'auto' or a device"):
        resolve_device("gpu", name="where")
    with pytest.raises(
        TypeError, match=r"^`device` must be a str, a torch\.device or None, got float$"
    ):
        resolve_device(1.5)
    with pytest.raises(TypeError, match="got bool"):
        resolve_device(True)
