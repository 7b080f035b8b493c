"""Full-precision float32 matrix products, whatever the caller's global TF32/bf16 flags.

Every float32 matmul of quests-torch (pair search, cell wrapping, distance blocks, kernel-sum
tiles) runs inside :func:`full_precision`: TF32 on CUDA or bf16 on oneDNN would cost
~1e-3 relative error in squared distances, far above what the descriptors and kernels need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["full_precision"]


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
