"""Triton plumbing shared by the fused kernels: which implementation runs, whether Triton is
importable, and whether its interpreter runs kernels on CPU tensors.

``$QUESTS_TORCH_KERNEL`` = ``torch`` (the default until a GPU run of
``benchmarks/gpu_check.py`` decides), ``triton`` (the fused kernels wherever they cover the
call: on CUDA, or on CPU tensors under Triton's interpreter, ``TRITON_INTERPRET=1``) or
``auto`` (today: ``torch``). Used by :mod:`quests_torch.kde.fused` (kernel sums) and
:mod:`quests_torch.neighbors.fused` (the MD step's descriptors).
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["KERNEL_ENV", "interpreting", "jit", "kernel_choice", "runs_fused", "triton_available"]

KERNEL_ENV = "QUESTS_TORCH_KERNEL"
"""The environment variable that picks the kernel implementation."""
_CHOICES = ("auto", "torch", "triton")


def kernel_choice() -> str:
    """``"torch"`` or ``"triton"`` from ``$QUESTS_TORCH_KERNEL`` (``auto``/unset: ``torch``
    until a GPU run measures the fused kernels).

    Raises:
        ValueError: an unknown value, or ``triton`` where Triton is not importable.
    """
    value = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"${KERNEL_ENV} must be one of {', '.join(_CHOICES)}, got {value!r}")
    if value == "auto":
        return "torch"
    if value == "triton" and not triton_available():
        raise ValueError(
            f"${KERNEL_ENV}=triton but Triton is not importable (pip install triton, or unset "
            f"${KERNEL_ENV})"
        )
    return value


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works (it ships with the CUDA builds of torch)."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # a broken install is as good as none
        return False
    return True


def interpreting() -> bool:
    """Whether ``$TRITON_INTERPRET`` asks for Triton's interpreter (kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def runs_fused(device: torch.device) -> bool:
    """Whether a fused kernel may run on ``device`` now: :func:`kernel_choice` is ``triton``
    and the device is CUDA, or CPU under the interpreter."""
    if device.type == "cuda":
        runs_here = True
    else:
        runs_here = device.type == "cpu" and interpreting()
    return runs_here and kernel_choice() == "triton"


def jit(namespace: dict, kernel, helpers=(), interpret: bool = False):
    """``triton.jit(kernel)``, with ``tl`` and the jitted ``helpers`` (plain functions the
    kernel calls by name) bound in ``namespace``, the kernel module's globals, where Triton
    resolves them. Call it once per process (cache the result).

    Raises:
        RuntimeError: ``interpret`` but Triton was imported before ``TRITON_INTERPRET=1`` was
            set (its interpreter reads the variable at import).
    """
    import triton
    import triton.language as tl

    if interpret and type(tl.zeros).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported: Triton's interpreter needs it "
            "in the environment before (e.g. when the process starts)"
        )
    namespace["tl"] = tl
    for fn in helpers:
        namespace[fn.__name__] = triton.jit(fn)
    return triton.jit(kernel)
