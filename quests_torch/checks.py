"""The method's defaults and one validator per parameter.

Every public function checks its arguments at the boundary through these functions, so a
parameter means the same thing and fails with the same message everywhere (library, CLI,
screening, torch-sim models). Errors name the argument in backticks: ``TypeError`` for a
wrong type, ``ValueError`` for a wrong value.

The defaults are those of the QUESTS paper (Schwalbe-Koda et al., Nat. Commun. 2025): the
k = 32 nearest neighbours within 5 Å, a Gaussian kernel of bandwidth h = 0.015 1/Å, and
solid-like clusters joined within 3 Å.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "DEFAULT_BANDWIDTH",
    "DEFAULT_CLUSTER_CUTOFF",
    "DEFAULT_CUTOFF",
    "DEFAULT_K",
    "MAX_K",
    "Progress",
    "bind_arguments",
    "check_bandwidths",
    "check_cutoff",
    "check_descriptor_matrix",
    "check_dtype",
    "check_generator",
    "check_h",
    "check_index",
    "check_integer",
    "check_k",
    "check_keywords",
    "check_positive_float",
    "check_positive_int",
    "check_readers",
    "check_single_bandwidth",
    "check_threshold",
    "parameter_mismatch",
    "require_same_parameters",
]

DEFAULT_K = 32
"""Neighbours per environment of the descriptor (the paper's k)."""
DEFAULT_CUTOFF = 5.0
"""Neighbour cutoff radius of the descriptor (Å)."""
DEFAULT_BANDWIDTH = 0.015
"""Bandwidth h of the Gaussian kernel (1/Å)."""
DEFAULT_CLUSTER_CUTOFF = 3.0
"""Largest edge length of the solid-like cluster graph (Å)."""
MAX_K = 1024
"""Largest accepted k: beyond the neighbours within the cutoff a larger k only adds zero
columns."""
H_RANGE = (1e-150, 1e150)
"""Accepted bandwidths ``(low, high)``: outside it 1/h^2 overflows or vanishes in float64."""

Progress = bool | Callable[[int, int], None] | None
"""``True`` for a tqdm bar on stderr, a callable ``(done, total)``, or ``None``/``False``."""


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_integer(
    v: object, name: str, *, error: type[Exception] = TypeError, expected: str = "an int"
) -> int:
    """``v`` as an int when it is an integer (``bool`` is not); else ``error`` saying that
    ``name`` must be ``expected``."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        got = repr(v) if error is ValueError else type(v).__name__
        raise error(f"`{name}` must be {expected}, got {got}")
    return int(v)


def check_k(k: object, name: str = "k") -> int:
    """``k`` as an int in ``[1, MAX_K]``."""
    k = check_integer(k, name)
    if k < 1:
        raise ValueError(f"`{name}` must be >= 1, got {k}")
    if k > MAX_K:
        raise ValueError(
            f"`{name}` must be <= {MAX_K}, got {k} (beyond the neighbours within the cutoff a "
            "larger k only adds zero columns)"
        )
    return k


def check_positive_float(v: object, name: str) -> float:
    """``v`` as a finite float > 0."""
    if not _is_real(v):
        raise TypeError(f"`{name}` must be a number, got {type(v).__name__}")
    v = float(v)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"`{name}` must be a finite number > 0, got {v}")
    return v


def check_cutoff(cutoff: object, name: str = "cutoff") -> float:
    """A cutoff radius (Å) as a finite float > 0."""
    return check_positive_float(cutoff, name)


def check_bandwidths(h: object, name: str = "h") -> tuple[list[float], bool]:
    """Validate a bandwidth or a 1-D sequence of them; return the values and whether ``h``
    was a vector."""
    if isinstance(h, bool):
        raise TypeError(f"`{name}` must be a positive float or a 1-D sequence of them, got bool")
    if isinstance(h, torch.Tensor | np.ndarray):
        if h.ndim > 1:
            raise ValueError(f"`{name}` must be a scalar or 1-D, got shape {tuple(h.shape)}")
        vector = h.ndim == 1
        values = [float(v) for v in (h.tolist() if vector else [h.item()])]
    elif isinstance(h, numbers.Real):
        vector, values = False, [float(h)]
    elif isinstance(h, Sequence) and not isinstance(h, str):
        vector, values = True, []
        for v in h:
            if not _is_real(v):
                raise TypeError(f"`{name}` must contain numbers, got {type(v).__name__}")
            values.append(float(v))
    else:
        raise TypeError(
            f"`{name}` must be a positive float or a 1-D sequence of them, got {type(h).__name__}"
        )
    if not values:
        raise ValueError(f"`{name}` is empty: give at least one bandwidth")
    lo, hi = H_RANGE
    for v in values:
        if not math.isfinite(v) or v <= 0.0:
            raise ValueError(f"`{name}` must be positive and finite, got {v}")
        if not lo <= v <= hi:  # 1/h^2 must be a finite, non-zero float64
            raise ValueError(f"`{name}` must be within [{lo:g}, {hi:g}] 1/Å, got {v}")
    return values, vector


def check_h(h: object, name: str = "h") -> float:
    """One bandwidth (1/Å) as a float."""
    if not _is_real(h):
        raise TypeError(f"`{name}` must be a positive float, got {type(h).__name__}")
    return check_bandwidths(float(h), name)[0][0]


def check_threshold(
    threshold: object, name: str = "threshold", *, allow_inf: bool = False
) -> float:
    """A dH threshold (nats) as a finite float (``allow_inf``: or +-inf, never NaN)."""
    if not _is_real(threshold):
        raise TypeError(f"`{name}` must be a float, got {type(threshold).__name__}")
    if math.isnan(threshold) or not (allow_inf or math.isfinite(threshold)):
        raise ValueError(
            f"`{name}` must be {'a number' if allow_inf else 'finite'}, got {threshold}"
        )
    return float(threshold)


def check_positive_int(v: object, name: str) -> int:
    """``v`` as an int >= 1."""
    v = check_integer(v, name, expected="a positive int")
    if v < 1:
        raise ValueError(f"`{name}` must be a positive int, got {v}")
    return v


def check_readers(readers: object) -> int:
    """``readers`` (reader processes of :mod:`quests_torch.readers`) as an int >= 0."""
    readers = check_integer(readers, "readers", error=ValueError, expected="an integer >= 0")
    if readers < 0:
        raise ValueError(f"`readers` must be an integer >= 0, got {readers!r}")
    return readers


def check_dtype(dtype: object, name: str = "dtype") -> torch.dtype:
    """A floating dtype the library computes in: float32 or float64."""
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"`{name}` must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def check_generator(generator: object, name: str = "generator") -> torch.Generator:
    """A CPU ``torch.Generator`` as given, a new one seeded with an int, or (``None``) one
    seeded at random."""
    if isinstance(generator, torch.Generator):
        return generator
    gen = torch.Generator()
    if generator is None:
        gen.seed()
    elif isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        gen.manual_seed(int(generator))
    else:
        raise TypeError(
            f"`{name}` must be a torch.Generator, an int seed or None, got {generator!r}"
        )
    return gen


def check_single_bandwidth(h: object, name: str = "h") -> float:
    """One positive bandwidth (1/Å), also given as a 1-element sequence; several are refused
    (the greedy compression and the per-generation running sums take one ``h``)."""
    hs, vector = check_bandwidths(h, name)
    if vector:
        raise ValueError(f"`{name}` must be a single bandwidth here, got several")
    return hs[0]


def bind_arguments(
    func: Callable, caller: str, args: tuple, options: dict, *, refuse: Sequence[str] = ()
) -> dict:
    """The arguments of the call ``func(*args, **options)`` by name, defaults filled in.

    For a front end that takes the keywords of ``func`` as ``**options`` and forwards them
    (the distributed twins of the single-process functions): a keyword ``func`` does not
    take, or one in ``refuse``, raises the ``TypeError`` Python raises for a call of
    ``caller`` with it (``caller() got an unexpected keyword argument 'name'``).

    Args:
        func: the function whose signature the call is checked against.
        caller: the name of the front end, as the message shows it.
        args: the positional arguments.
        options: the keyword arguments.
        refuse: keywords of ``func`` the front end does not take.

    Returns:
        ``{parameter name: value}`` for every parameter of ``func``.
    """
    for name in refuse:
        if name in options:
            raise TypeError(f"{caller}() got an unexpected keyword argument '{name}'")
    try:
        bound = inspect.signature(func).bind(*args, **options)
    except TypeError as exc:
        raise TypeError(f"{caller}() {exc}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def check_descriptor_matrix(
    data: object,
    name: str,
    *,
    expected: str = "a torch.Tensor or a numpy array [n, d]",
    allow_empty: bool = False,
) -> tuple[int, int]:
    """A descriptor matrix ``[n, d]``: a floating-point tensor or a float32/float64 numpy
    array, 2-D, with columns and (unless ``allow_empty``) rows; its shape.

    Args:
        data: the descriptors.
        name: the argument's name in the messages.
        expected: what ``data`` must be, for the ``TypeError`` of another type.
        allow_empty: accept ``n = 0``.

    Returns:
        ``(n, d)``.
    """
    if isinstance(data, torch.Tensor):
        if not data.dtype.is_floating_point:
            raise TypeError(f"`{name}` must hold floating-point descriptors, got {data.dtype}")
    elif isinstance(data, np.ndarray):
        if data.dtype not in (np.float32, np.float64):
            raise TypeError(f"`{name}` must hold float32 or float64 descriptors, got {data.dtype}")
    else:
        raise TypeError(f"`{name}` must be {expected}, got {type(data).__name__}")
    shape = tuple(data.shape)
    if len(shape) != 2:
        raise ValueError(f"`{name}` must be 2-D [n, d], got shape {shape}")
    if shape[0] == 0 and not allow_empty:
        raise ValueError(f"`{name}` is empty: shape {shape}, need at least one row")
    if shape[1] == 0:
        raise ValueError(f"`{name}` has no descriptor columns: shape {shape}")
    return shape


def check_keywords(options: dict, allowed: Sequence[str], caller: str) -> dict:
    """``options`` when every key is in ``allowed``; otherwise the ``TypeError`` Python raises
    for a call of ``caller`` with the unknown keyword.

    Args:
        options: the keywords a front end took as ``**options``.
        allowed: the keywords it accepts.
        caller: its name, as the message shows it.

    Returns:
        ``options``.
    """
    for name in options:
        if name not in allowed:
            raise TypeError(f"{caller}() got an unexpected keyword argument '{name}'")
    return options


def parameter_mismatch(
    k: int | None, cutoff: float | None, expected_k: int, expected_cutoff: float
) -> tuple[str, object, object] | None:
    """The first of ``k`` and ``cutoff`` (where given) that differs from the expected value
    (cutoffs to 1e-12 relative), as ``(name, given, expected)``; ``None`` when both agree."""
    if k is not None and int(k) != expected_k:
        return "k", k, expected_k
    if cutoff is not None and not math.isclose(float(cutoff), expected_cutoff, rel_tol=1e-12):
        return "cutoff", cutoff, expected_cutoff
    return None


def require_same_parameters(
    given: tuple[int | None, float | None],
    expected: tuple[int, float],
    message: Callable[[str, object, object], str],
) -> None:
    """Raise ``ValueError(message(name, given, expected))`` for the first of ``k`` and
    ``cutoff`` that differs (:func:`parameter_mismatch`).

    Args:
        given: ``(k, cutoff)`` to check, ``None`` where not given.
        expected: the ``(k, cutoff)`` they must equal.
        message: the error message of the parameter's name, given and expected values.
    """
    bad = parameter_mismatch(*given, *expected)
    if bad is not None:
        raise ValueError(message(*bad))


def check_index(index: str) -> None:
    """Raise ``ValueError`` unless ``index`` is an ASE index/slice string."""
    from ase.io.formats import string2index

    try:
        ok = isinstance(string2index(index), int | slice)
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise ValueError(
            f"invalid index {index!r}: expected an ASE index/slice such as ':', '0:10', "
            "'-1' or '::2'"
        )
