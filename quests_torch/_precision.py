"""Full-precision float32 matrix products, and the float32-only mode of slow-float64 devices.

Every float32 matmul of quests-torch (pair search, cell wrapping, distance blocks, kernel-sum
tiles) runs inside :func:`full_precision`: TF32 on CUDA or bf16 on oneDNN would cost
~1e-3 relative error in squared distances, far above what the descriptors and kernels need.

float32-only mode (:func:`float64_enabled` is ``False``): on Apple MPS (no float64), on CUDA
devices whose float64 runs at a fraction of the float32 rate (:func:`float64_is_fast`), and
anywhere with ``QUESTS_TORCH_FLOAT64=0``, no float64 tensor is created on the compute device:
the kernel sums accumulate float32 tiles with a Neumaier-compensated float32 running sum
instead of float64, and results come back float32. ``QUESTS_TORCH_FLOAT64=1`` forces float64
on a CUDA device that :func:`float64_is_fast` rejects (never on MPS, which has none).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator

import torch

__all__ = ["FLOAT64_ENV", "compute_dtype", "float64_enabled", "float64_is_fast", "full_precision"]

FLOAT64_ENV = "QUESTS_TORCH_FLOAT64"
#: compute capabilities of the data-centre parts with full-rate (1/2 of float32) float64
_FAST_FP64_CAPABILITIES = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})
#: export variants of those capabilities whose float64 was cut (H20, H800: ~1 TFLOP/s)
_SLOW_FP64_NAMES = re.compile(r"\bH(20|800)\b", re.IGNORECASE)


@functools.cache
def _cuda_fp64_fast(index: int) -> bool:
    major_minor = tuple(torch.cuda.get_device_capability(index))
    name = torch.cuda.get_device_name(index)
    return major_minor in _FAST_FP64_CAPABILITIES and not _SLOW_FP64_NAMES.search(name)


def float64_is_fast(device: torch.device | str) -> bool:
    """Whether ``device`` computes float64 at full rate (half the float32 rate or better).

    The rule: CPUs yes; MPS no (Apple GPUs have no float64 at all); CUDA only the data-centre
    parts with compute capability exactly sm_60 (P100), sm_70 (V100, Titan V), sm_80 (A100,
    A30), sm_90 (H100, H200) or sm_100 (B200, GB200: float64 at half the float32 rate), and
    not the export variants H20/H800 whose float64 was cut (matched on
    ``torch.cuda.get_device_name``). Every other CUDA capability (sm_61, sm_75, sm_86, sm_89,
    sm_103 (B300, float64 cut), sm_120: GeForce/RTX/workstation cards and L4/L40/A10/T4) runs
    float64 at 1/32-1/64 of the float32 rate or less. Other device types: no.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`device` is not a torch device: {device!r}") from err
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return _cuda_fp64_fast(index)
    return False


def float64_enabled(device: torch.device | str) -> bool:
    """Whether quests-torch may create float64 tensors on ``device``.

    ``$QUESTS_TORCH_FLOAT64``: ``0``/``false``/``off`` never; ``1``/``true``/``on`` always
    except on MPS (which has no float64); unset (or anything else): :func:`float64_is_fast`.
    """
    device = torch.device(device)
    mode = os.environ.get(FLOAT64_ENV, "").strip().lower()
    if mode in ("0", "false", "off", "no"):
        return False
    if device.type == "mps":
        return False
    if mode in ("1", "true", "on", "yes"):
        return True
    return float64_is_fast(device)


def compute_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """``dtype``, or float32 where :func:`float64_enabled` is ``False`` for ``device``."""
    if dtype == torch.float64 and not float64_enabled(device):
        return torch.float32
    return dtype


def _legacy_tf32_flags() -> tuple[bool, str] | None:
    """The caller's ``(allow_tf32, float32_matmul_precision)`` if the legacy API is readable.

    torch >= 2.9 refuses to read the legacy flags once the new ``fp32_precision`` API was used
    to set them (and vice versa it tracks which API set them last): ``None`` then.
    """
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32), torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Run float32 matrix products in IEEE precision whatever the global flags say.

    Disables TF32 (CUDA) and bf16/TF32 (oneDNN on CPU) matmul for the duration of the block
    and restores the caller's settings on exit, through the API the caller used: the legacy
    ``allow_tf32``/``set_float32_matmul_precision`` when it is readable (torch < 2.9, or a
    caller that set it), else the ``fp32_precision`` API. Mixing the two makes torch raise
    when the caller reads its own flags, so the block never does. Nothing is touched when
    the flags already ask for full precision. float64 products are never affected.
    """
    legacy = _legacy_tf32_flags()
    if legacy is None:
        with _full_precision_new_api():
            yield
        return
    allow, precision = legacy
    mkldnn = getattr(torch.backends.mkldnn.matmul, "fp32_precision", None)
    reduced_cpu = precision != "highest" if mkldnn is None else mkldnn not in ("none", "ieee")
    if reduced_cpu:  # set_float32_matmul_precision sets the CPU and the CUDA flags
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(precision)
            if bool(torch.backends.cuda.matmul.allow_tf32) != allow:
                torch.backends.cuda.matmul.allow_tf32 = allow
    elif allow:  # only the CUDA flag: touch nothing else
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = True
    else:
        yield


@contextlib.contextmanager
def _full_precision_new_api() -> Iterator[None]:
    saved = []
    try:
        for name in ("cuda", "mkldnn"):
            b = getattr(getattr(torch.backends, name, None), "matmul", None)
            if b is not None and hasattr(b, "fp32_precision"):
                saved.append((b, b.fp32_precision))
                b.fp32_precision = "ieee"
        yield
    finally:
        for b, value in reversed(saved):
            b.fp32_precision = value
