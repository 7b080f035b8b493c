"""Property-based fuzzing of the public entry points (issue 14).

Random shapes, dtypes, NaN/inf positions and parameters for ``get_descriptors`` /
``descriptors_from_tensors`` and the metrics (``entropy``, ``diversity``, ``delta_entropy``,
``log_kernel_sum``). Whatever the input, a call either raises a ValueError/TypeError whose
message names an argument in backticks, or returns a result without NaN; it never hangs or
crashes. ``derandomize=True``: the same examples on every run, so CI cannot flake.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quests_torch as qt
from quests_torch import kde, metrics

FUZZ = settings(
    derandomize=True,
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

NAMED = re.compile(r"`\w+(\[\d+\])?`")  # the message names the argument, vesin style

SPECIAL = [math.nan, math.inf, -math.inf]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.bool]


def _check(call):
    """Run ``call``: a clear ValueError/TypeError, or a result free of NaN."""
    try:
        out = call()
    except (ValueError, TypeError) as exc:
        assert NAMED.search(str(exc)), f"error does not name the argument: {exc!r}"
        return None
    results = out if isinstance(out, tuple) else (out,)
    for r in results:
        if isinstance(r, torch.Tensor) and r.is_floating_point():
            assert not bool(torch.isnan(r).any()), f"NaN in the result of a valid call: {r}"
    return out


@st.composite
def tensors(draw, ndim=None, max_side=5, finite_only=False, dtypes=DTYPES):
    """A tensor of random shape and dtype, with NaN/inf at random positions (floats)."""
    nd = draw(st.sampled_from([0, 1, 2, 2, 2, 3])) if ndim is None else ndim
    shape = tuple(draw(st.lists(st.integers(0, max_side), min_size=nd, max_size=nd)))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 10.0, 1e3, 1e30, 1e200]))
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if not finite_only and t.numel() and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, t.numel() - 1))
            t.view(-1)[i] = draw(st.sampled_from(SPECIAL))
    if dtype == torch.bool:
        return t > 0
    if not dtype.is_floating_point:
        return torch.nan_to_num(t, posinf=9, neginf=-9).round().to(dtype)
    return t.to(dtype)


BANDWIDTHS = st.one_of(
    st.sampled_from([0.0, -0.5, math.nan, math.inf, -math.inf, 1e-300, 1e-30, 1e300, 0.015]),
    st.floats(min_value=1e-4, max_value=10.0),
    st.just(True),
    st.just("0.1"),
    st.lists(st.sampled_from([0.01, 0.1, 0.0, math.nan, 1.0]), min_size=0, max_size=3),
)


def _descriptor_like(draw_tensor, as_numpy: bool):
    return draw_tensor.numpy() if as_numpy and draw_tensor.dtype != torch.bfloat16 else draw_tensor


@FUZZ
@given(x=tensors(), h=BANDWIDTHS, as_numpy=st.booleans(), which=st.sampled_from(["H", "D"]))
def test_fuzz_entropy_and_diversity(x, h, as_numpy, which):
    x = _descriptor_like(x, as_numpy)
    fn = metrics.entropy if which == "H" else metrics.diversity
    _check(lambda: fn(x, h))


@FUZZ
@given(
    y=tensors(),
    x=tensors(),
    h=BANDWIDTHS,
    as_numpy=st.booleans(),
    entry=st.sampled_from(["dH", "log_kernel_sum"]),
)
def test_fuzz_delta_entropy_and_log_kernel_sum(y, x, h, as_numpy, entry):
    y, x = _descriptor_like(y, as_numpy), _descriptor_like(x, as_numpy)
    fn = metrics.delta_entropy if entry == "dH" else kde.log_kernel_sum
    _check(lambda: fn(y, x, h))


@st.composite
def descriptor_pairs(draw):
    """``(y, x)`` of one width: mostly valid shapes, NaN/inf/empty/integer sometimes."""
    d = draw(st.integers(0, 4))
    ny, nx = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    floats = [torch.float64, torch.float32]
    y = draw(tensors(ndim=0, dtypes=[*floats, torch.int64])).expand(ny, d).clone()
    x = draw(tensors(ndim=0, dtypes=floats)).expand(nx, d).clone()
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([1.0, 1.0, 1e20, 1e200]))
    noise = torch.randn((max(ny, nx), d), generator=g, dtype=torch.float64) * scale
    y = y + noise[:ny].to(y.dtype) if y.is_floating_point() else y
    x = x + noise[:nx].to(x.dtype)
    for t in (y, x):
        if t.numel() and t.is_floating_point() and draw(st.booleans()):
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(SPECIAL))
    return y, x


@FUZZ
@given(pair=descriptor_pairs(), h=BANDWIDTHS, entry=st.sampled_from(["H", "D", "dH", "lks"]))
def test_fuzz_same_width_metrics(pair, h, entry):
    y, x = pair
    fn = {
        "H": lambda: metrics.entropy(x, h),
        "D": lambda: metrics.diversity(x, h),
        "dH": lambda: metrics.delta_entropy(y, x, h),
        "lks": lambda: kde.log_kernel_sum(y, x, h),
    }[entry]
    _check(fn)


@FUZZ
@given(
    x=tensors(ndim=2, finite_only=True, dtypes=[torch.float64, torch.float32]),
    h=st.floats(min_value=1e-3, max_value=1e3),
    entry=st.sampled_from(["H", "D", "dH", "log_kernel_sum"]),
)
def test_fuzz_valid_metric_inputs_give_finite_results(x, h, entry):
    """Finite, non-empty descriptors and a sane bandwidth always give a finite answer."""
    fn = {
        "H": lambda: metrics.entropy(x, h),
        "D": lambda: metrics.diversity(x, h),
        "dH": lambda: metrics.delta_entropy(x * 2, x, h),
        "log_kernel_sum": lambda: kde.log_kernel_sum(x, x, h),
    }[entry]
    if x.shape[0] == 0 or x.shape[1] == 0:
        with pytest.raises(ValueError, match=r"`(x|y)`"):
            fn()
        return
    try:
        out = fn()
    except ValueError as exc:  # refused only far beyond descriptor values (or inf in float32)
        largest = float(x.abs().max())
        assert largest * max(1.0, 1 / h) > 1e15, exc
        assert re.search(r"`(x|y)` (has descriptor values up to|contains NaN or inf)", str(exc))
        return
    assert bool(torch.isfinite(out).all()), out


CELLS = st.one_of(
    st.sampled_from(["cubic", "zero", "singular", "tiny"]),
    tensors(max_side=3, dtypes=[torch.float64, torch.float32, torch.int64]),
)


def _cell(spec, dtype):
    if isinstance(spec, torch.Tensor):
        return spec
    return {
        "cubic": torch.eye(3, dtype=dtype) * 6.0,
        "zero": torch.zeros(3, 3, dtype=dtype),
        "singular": torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 0, 5.0]], dtype=dtype),
        "tiny": torch.eye(3, dtype=dtype) * 0.3,
    }[spec]


@FUZZ
@given(
    positions=st.one_of(
        tensors(max_side=6),
        tensors(ndim=2, max_side=6, dtypes=[torch.float64]).map(
            lambda t: t[:, :3] if t.ndim == 2 and t.shape[1] >= 3 else t
        ),
    ),
    cell=CELLS,
    pbc=st.one_of(
        st.sampled_from([[True] * 3, [False] * 3, [True, False, True]]).map(torch.tensor),
        tensors(max_side=3, dtypes=[torch.bool, torch.int64, torch.float64]),
    ),
    k=st.one_of(
        st.integers(-2, 40),
        st.sampled_from([1025, 10**9, True, 2.5, "8", None]),
    ),
    cutoff=st.one_of(
        st.floats(min_value=0.1, max_value=8.0),
        st.sampled_from([0.0, -1.0, math.nan, math.inf, 1e-300, 1e6, True, "5"]),
    ),
)
def test_fuzz_descriptors_from_tensors(positions, cell, pbc, k, cutoff):
    dtype = positions.dtype if positions.is_floating_point() else torch.float64
    cell_t = _cell(cell, dtype)
    out = _check(lambda: qt.descriptors_from_tensors(positions, cell_t, pbc, k=k, cutoff=cutoff))
    if out is not None:
        assert out.shape == (positions.shape[0], 2 * k - 1)
        assert bool(torch.isfinite(out).all())


@FUZZ
@given(
    n=st.integers(0, 6),
    box=st.sampled_from([0.0, 0.5, 4.0, 12.0]),
    pbc=st.sampled_from([True, False, (True, False, False)]),
    bad=st.sampled_from([None, math.nan, math.inf]),
    k=st.sampled_from([1, 2, 8, 32, 0, 2000]),
    cutoff=st.sampled_from([0.5, 3.0, 5.0, 0.0, math.nan]),
    seed=st.integers(0, 1000),
)
def test_fuzz_get_descriptors(n, box, pbc, bad, k, cutoff, seed):
    from ase import Atoms

    rng = np.random.default_rng(seed)
    atoms = Atoms(
        "Cu" * n, positions=rng.uniform(0, max(box, 1.0), (n, 3)), cell=[box] * 3, pbc=pbc
    )
    if bad is not None and n:
        atoms.positions[rng.integers(n), rng.integers(3)] = bad
    out = _check(lambda: qt.get_descriptors(atoms, k=k, cutoff=cutoff))
    if out is not None:
        assert out.shape == (n, 2 * k - 1) and bool(torch.isfinite(out).all())
