"""The one place that decides the device: :func:`resolve_device`, called by every entry point
of the package (re-exported by :mod:`quests_torch.structures`, its former home).

Computing happens where the inputs live: tensors decide the device, an explicit ``device``
that differs is refused, and nothing is moved behind the caller's back. For inputs that live
nowhere (numpy arrays, stores, files, ASE structures) ``"auto"`` means CUDA when available,
else MPS, else CPU. This module imports nothing from the package.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["canonical_device", "resolve_device"]


def canonical_device(device: torch.device | str) -> torch.device:
    """``device`` with its index filled in, so that it compares equal to a tensor's device.

    ``torch.device("cuda") != torch.device("cuda:0")``, while every CUDA tensor reports an
    indexed device: a bare ``"cuda"`` becomes the current CUDA device (``cuda:<current>``),
    any other bare accelerator type index 0; ``"cpu"`` and indexed devices are unchanged.
    """
    device = torch.device(device)
    if device.type == "cpu" or device.index is not None:
        return device
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device.type, 0)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and bool(mps.is_available())


def resolve_device(
    device: torch.device | str | None,
    *,
    inputs: Iterable[tuple[str, torch.device | None]] = (),
    default: torch.device | str = "auto",
    name: str = "device",
) -> torch.device:
    """The device to compute on: the one rule every entry point of the package calls.

    1. The ``inputs`` that live on a device (``(name, tensor.device)``; ``None`` for numpy
       arrays, stores, files) must share one, else ``ValueError`` naming them.
    2. ``device=None`` means ``default``. ``"auto"`` means the inputs' device when they have
       one, else CUDA when available, else MPS (Apple silicon) when available, else CPU (on
       MPS everything runs in float32: :func:`quests_torch._precision.float64_enabled`).
    3. A device given by name must be one torch knows (``ValueError`` naming the argument
       otherwise), exist in this torch build (``"cuda"`` without CUDA is a ``ValueError``) and,
       when the inputs live on a device, be that one: the work runs where the inputs live,
       nothing is moved behind the caller's back.

    Args:
        device: ``"auto"``, ``None``, a device name (``"cpu"``, ``"cuda"``, ``"cuda:1"``,
            ``"mps"``) or a ``torch.device``.
        inputs: ``(name, device)`` of each input, for rules 1 and 3.
        default: what ``device=None`` means (``"cpu"`` for the kernel sums on numpy inputs).
        name: the argument's name in error messages.

    Returns:
        The device, indexed (:func:`canonical_device`): it compares equal to a tensor's.
    """
    inputs = list(inputs)
    held = _inputs_device(inputs)
    if device is None:
        device = default if held is None else held
    if isinstance(device, str) and device == "auto":
        if held is not None:
            return held
        device = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    dev = _named_device(device, name)
    if held is not None:
        if canonical_device(dev) != held:
            names = ", ".join(f"`{n}`" for n, d in inputs if d is not None)
            raise ValueError(f"`{name}` is {dev} but the inputs live on {held} ({names})")
        return held
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`{name}` is {dev} but CUDA is not available in this torch build")
    if dev.type == "mps" and not _mps_available():
        raise ValueError(f"`{name}` is {dev} but MPS is not available on this machine")
    return canonical_device(dev)


def _named_device(device: object, name: str) -> torch.device:
    """``torch.device(device)``, or the error of a device that torch does not know."""
    if isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, str | int):
        raise TypeError(
            f"`{name}` must be a str, a torch.device or None, got {type(device).__name__}"
        )
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"`{name}` must be 'auto' or a device such as 'cpu', 'cuda', 'cuda:1' or 'mps', "
            f"got {device!r}"
        ) from None


def _inputs_device(inputs: list[tuple[str, torch.device | None]]) -> torch.device | None:
    """The one device the inputs live on, ``None`` when none lives on one."""
    placed = [(n, d) for n, d in inputs if d is not None]
    devices = {canonical_device(d) for _, d in placed}
    if len(devices) > 1:
        names = ", ".join(f"`{n}` on {d}" for n, d in placed)
        raise ValueError(f"inputs must be on one device, got {names}")
    return devices.pop() if devices else None
