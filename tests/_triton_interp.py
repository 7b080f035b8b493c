"""Speed for Triton's interpreter in the tests: ``tl.sort`` as numpy's sort.

Under the interpreter ``tl.sort`` runs its bitonic network op by op in Python, with xor
reductions evaluated element by element (``ReduceOps.generic_reduce``): the fused MD-step
kernel (``quests_torch/neighbors/fused.py``, three sorts per atom) took ~1 s per atom. The
patch replaces the network, under the interpreter only, by ``numpy.sort`` of the same values
along the same (last) axis: the values a sort returns do not depend on how it sorts (ties are
equal values), so the kernels' results are unchanged and the tests check their own logic.
On a GPU Triton's own network runs (``benchmarks/gpu_check.py`` compares it with the torch
path).
"""

from __future__ import annotations

import numpy as np


def _unwrap(value):
    return getattr(value, "value", value)


def speed_up_interpreter() -> bool:
    """Patch ``triton.language.standard.sort_impl`` (once); ``False`` when Triton is not
    importable or has another shape (then nothing is changed)."""
    try:
        from triton.language import core, standard
        from triton.runtime import interpreter
    except Exception:
        return False
    original = getattr(standard, "sort_impl", None)
    if original is None or not hasattr(interpreter, "TensorHandle"):
        return False
    if getattr(original, "_quests_patched", False):
        return True

    def sort_impl(x, k=None, dim=None, descending=False):
        data = x.handle.data
        axis = data.ndim - 1 if _unwrap(dim) is None else _unwrap(dim)
        if axis != data.ndim - 1:
            raise ValueError("only the last dimension is sorted (as tl.sort)")
        out = np.sort(data, axis=axis)
        if _unwrap(descending):
            out = np.flip(out, axis=axis)
        if _unwrap(k) is not None:
            raise NotImplementedError("top-k is not patched")
        handle = interpreter.TensorHandle(np.ascontiguousarray(out), x.handle.dtype)
        return core.tensor(handle, x.type)

    sort_impl._quests_patched = True
    standard.sort_impl = sort_impl
    return True
