"""The fused Triton kernel sums (issue 29) against the torch path, under Triton's interpreter.

``TRITON_INTERPRET=1`` runs the kernel on CPU tensors (numpy per program), so every variant is
checked here at small sizes: odd sizes, one row, one column, no column, far outliers, several
bandwidths, log weights (``-inf`` included), self pairs of ``x is y`` and of a block of a
sharded problem, float64 and float32 tiles, gradients, and the public metrics with
``QUESTS_TORCH_KERNEL=triton``. The torch path is the reference: ``log p`` agrees to 1e-12
relative in ``p`` (absolute in ``log p``, scaled by ``max(1, |log p|)``) in float64 and within
the float32 path's own error to float64 in float32.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import quests_torch as qt
from quests_torch.kde import fused
from quests_torch.kde.problem import Problem
from quests_torch.kde.source import Source
from quests_torch.kde.sweeps import forward

pytest.importorskip("triton")


@pytest.fixture
def interpret(monkeypatch):
    """The fused kernel on CPU tensors: Triton's interpreter, chosen explicitly."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(fused.KERNEL_ENV, "triton")


def _data(n: int, m: int, d: int = 63, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    y = 0.3 + 0.05 * torch.randn(m, d, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _torch(fn):
    old = os.environ.pop(fused.KERNEL_ENV, None)
    try:
        return fn()
    finally:
        if old is not None:
            os.environ[fused.KERNEL_ENV] = old


def _both(x, y, hs, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p`` of the fused kernel and of the torch path for the same problem."""
    same = kw.pop("same", False)
    xs = Source(x, "x")
    ys = xs if same else Source(y, "y")

    def problem():
        return Problem(xs, ys, hs, same=same, **kw)

    p = problem()
    assert fused.covers(p)
    got = fused.fused_log_sums(p) + p.lw_max
    with torch.no_grad():
        want = _torch(lambda: forward(problem(), None).log_p)
    return got, want


def _close(got, want, tol=1e-12):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    err = ((got - want).abs() / want.abs().clamp_min(1.0))[fin]
    assert err.numel() == 0 or float(err.max()) <= tol, float(err.max())


@pytest.mark.parametrize(("n", "m"), [(1, 1), (1, 200), (7, 3), (130, 1), (257, 129)])
def test_cross_sums_match_the_torch_path(interpret, n, m):
    x, y = _data(n, m)
    _close(*_both(x, y, [0.015]))


@pytest.mark.parametrize(
    "hs", [[0.015, 0.03], [0.01, 0.015, 0.02, 0.05, 0.1], [0.005 * (k + 1) for k in range(8)]]
)
def test_several_bandwidths_in_one_pass(interpret, hs):
    x, y = _data(70, 90, seed=1)
    got, want = _both(x, y, hs)
    assert got.shape == (70, len(hs))
    _close(got, want)


def test_self_sums_pin_the_self_pair(interpret):
    """``x is y``: the self pair is exactly exp(0) = 1 (H = log n for distant points)."""
    x, _ = _data(99, 1, seed=2)
    _close(*_both(x, x, [0.015], same=True))
    far = torch.eye(5, 63, dtype=torch.float64) * 50.0  # every pair 70 Å apart
    got, want = _both(far, far, [0.015], same=True)
    assert torch.equal(got, torch.zeros(5, 1, dtype=torch.float64)) and torch.equal(got, want)
    _close(*_both(x, x, [0.015, 0.05], same=True))


@pytest.mark.parametrize("n", [1, 63, 64, 65, 300])
@pytest.mark.parametrize("hs", [[0.015], [0.01, 0.015, 0.04]])
def test_symmetric_self_sums(interpret, n, hs):
    """``x is y`` walks the upper triangle of blocks (each block above the diagonal counts for
    its rows and its columns): equal to the torch path and to the all-pairs kernel."""
    x = _close_data(n)
    got, want = _both(x, x, hs, same=True)
    _close(got, want)
    p = Problem(Source(x, "x"), Source(x.clone(), "y"), hs)  # not `x is y`: every pair
    assert not fused.symmetric(p)
    all_pairs = fused.fused_log_sums(p)
    _close(got, all_pairs)  # the same sums from half the pairs


def _close_data(n: int, seed: int = 11) -> torch.Tensor:
    """Rows of the thermal Cu descriptors (tests/data), a few h apart: the kernel terms matter,
    unlike far random rows."""
    from conftest import load_reference

    ref = load_reference("kde")
    x = torch.from_numpy(np.concatenate([ref["x_solid"], ref["x_liquid"]]))
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(x.shape[0], generator=g)[:n]].contiguous()


def test_symmetric_self_sums_in_panels_are_repeatable(interpret, monkeypatch):
    """Row blocks cut into panels (each program's column sums in its own slot, summed in a
    fixed order): the same numbers as one panel, and bit for bit the same on a second run."""
    x = _close_data(400)
    xs = Source(x, "x")
    one = fused.fused_log_sums(Problem(xs, xs, [0.015], same=True))
    block = fused._blocks(Problem(xs, xs, [0.015], same=True))[0]
    n_blocks = -(-400 // block)
    assert fused.panel_blocks(Problem(xs, xs, [0.015], same=True), block) == n_blocks
    monkeypatch.setattr(fused, "panel_blocks", lambda p, block: 2)
    calls = []
    panels = fused.fused_log_sums(Problem(xs, xs, [0.015], same=True), lambda d, t: calls.append(d))
    assert n_blocks >= 3 and calls == [min(400, b * block) for b in range(2, n_blocks + 2, 2)]
    _close(panels, one)
    assert torch.equal(panels, fused.fused_log_sums(Problem(xs, xs, [0.015], same=True)))
    want = _torch(lambda: forward(Problem(xs, xs, [0.015], same=True), None).log_p)
    _close(panels, want)


def test_symmetric_float32_tiles(interpret):
    x = _close_data(200)
    exact = _torch(lambda: qt.kde.log_kernel_sum(x, x, 0.015))
    got, want = _both(x.float(), x.float(), [0.015], same=True)
    own = float((want[:, 0] - exact).abs().max())
    assert float((got[:, 0] - exact).abs().max()) <= 2 * own + 1e-12


def test_block_of_a_sharded_problem_pins_its_global_diagonal(interpret):
    x, _ = _data(60, 1, seed=3)
    xs, ys = Source(x[20:45], "x"), Source(x[10:60], "y")
    mu = x.mean(0)
    p = Problem(xs, ys, [0.015], mu=mu, offsets=(20, 10), pin=True)
    got = fused.fused_log_sums(p)
    want = _torch(
        lambda: forward(Problem(xs, ys, [0.015], mu=mu, offsets=(20, 10), pin=True), None)
    )
    _close(got, want.log_p)


def test_log_weights_and_dropped_references(interpret):
    x, y = _data(40, 50, seed=4)
    lw = torch.linspace(-3.0, 2.0, 50, dtype=torch.float64)
    lw[::7] = -math.inf
    _close(*_both(x, y, [0.015], log_weights=lw))
    _close(*_both(x, y, [0.015, 0.04], log_weights=lw))
    _close(*_both(x, x, [0.015], log_weights=lw[:40], same=False))


def test_far_rows_stay_finite(interpret):
    """A query ~1000 h from every reference: every exponential underflows, the online
    log-sum-exp keeps log p finite and equal to the torch path's shifted rescue."""
    x, y = _data(6, 80, seed=5)
    x[2] += 15.0
    x[4] -= 3.0
    got, want = _both(x, y, [0.015])
    assert torch.isfinite(got).all() and float(got[2]) < -1e6
    _close(got, want)


def test_one_column_and_empty_inputs_behave_as_today(interpret):
    x, y = _data(5, 3)
    _close(*_both(x, y[:1], [0.015]))
    for args in ((x, y[:0]), (x[:0], y)):  # refused by the problem's checks, as before
        with pytest.raises(ValueError, match="is empty"):
            qt.kde.log_kernel_sum(*args, 0.015)


def test_float32_tiles_within_the_float32_error(interpret):
    """float32 tiles, float64 sums: the fused kernel is as close to float64 as the torch
    float32 path is (its exponents round like the GEMM's, ~eps_32 |x - y|^2 / h^2)."""
    for spread in (0.002, 0.05):
        x, y = _data(120, 150, seed=6)
        x, y = 0.3 + (x - 0.3) * spread / 0.05, 0.3 + (y - 0.3) * spread / 0.05
        exact = _torch(lambda x=x, y=y: qt.kde.log_kernel_sum(x, y, 0.015))
        got, want = _both(x.float(), y.float(), [0.015])
        assert got.dtype == want.dtype == torch.float64  # float64 sums of float32 tiles
        own = float((want[:, 0] - exact).abs().max())
        assert float((got[:, 0] - exact).abs().max()) <= 2 * own + 1e-12
        assert float(((got[:, 0] - exact).abs() / exact.abs().clamp_min(1.0)).max()) < 1e-6


@pytest.mark.filterwarnings("ignore::quests_torch.estimates.EstimateWarning")  # 40 of 90 rows
def test_public_metrics_take_the_fused_path(interpret, monkeypatch):
    """With the kernel chosen, entropy, dH, overlap, the estimates and the bank equal the torch
    path; the fused kernel really ran (counted)."""
    x, y = _data(90, 110, seed=7)
    calls = []
    real = fused.fused_log_sums

    def counted(p, progress=None, out_dtype=None):
        calls.append(p.n)
        return real(p, progress, out_dtype)

    monkeypatch.setattr("quests_torch.kde.sweeps.fused_log_sums", counted)
    results = {
        "H": lambda: qt.entropy(x),
        "D": lambda: qt.diversity(x),
        "dH": lambda: qt.delta_entropy(x, y),
        "overlap": lambda: torch.as_tensor(qt.overlap(x, y)),
        "estimate": lambda: torch.tensor(qt.estimate_entropy(x, rows=40, generator=0).value),
        "bank": lambda: qt.UncertaintyBank(y).delta_entropy(x),
    }
    for name, fn in results.items():
        calls.clear()
        got = fn()
        assert calls, f"{name}: the fused kernel did not run"
        want = _torch(fn)
        assert torch.allclose(
            torch.as_tensor(got), torch.as_tensor(want), rtol=1e-12, atol=1e-12
        ), name


def test_gradients_through_the_fused_forward(interpret):
    x, y = _data(30, 40, seed=8)
    xg = x.clone().requires_grad_(True)
    qt.kde.log_kernel_sum(xg, y, 0.015).sum().backward()
    xt = x.clone().requires_grad_(True)
    _torch(lambda: qt.kde.log_kernel_sum(xt, y, 0.015).sum().backward())
    assert torch.allclose(xg.grad, xt.grad, rtol=1e-10, atol=1e-12)


def test_progress_per_row_tile(interpret):
    x, y = _data(256, 40, seed=9)
    calls = []
    qt.kde.log_kernel_sum(x, y, tile_size=100, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(100, 256), (200, 256), (256, 256)]


def test_kernel_choice(monkeypatch):
    monkeypatch.delenv(fused.KERNEL_ENV, raising=False)
    assert fused.kernel_choice() == "torch"  # auto: the torch path until a GPU run decides
    monkeypatch.setenv(fused.KERNEL_ENV, "Triton")
    assert fused.kernel_choice() == "triton"
    monkeypatch.setenv(fused.KERNEL_ENV, "cuda")
    with pytest.raises(ValueError, match="QUESTS_TORCH_KERNEL must be one of auto, torch, triton"):
        fused.kernel_choice()


def test_cpu_without_the_interpreter_keeps_the_torch_path(monkeypatch):
    monkeypatch.setenv(fused.KERNEL_ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, y = _data(10, 12)
    p = Problem(Source(x, "x"), Source(y, "y"), [0.015])
    assert not fused.covers(p)
    assert torch.equal(forward(p, None).log_p, _torch(lambda: forward(p, None).log_p))


def test_uncovered_problems_keep_the_torch_path(interpret):
    x, y = _data(10, 12)
    xs, ys = Source(x, "x"), Source(y, "y")
    assert not fused.covers(Problem(xs, ys, [0.015], n_nearest=2))
    assert not fused.covers(Problem(xs, ys, [0.015], distance="direct"))
    assert not fused.covers(Problem(xs, ys, [0.01 * (k + 1) for k in range(9)]))
    assert not fused.covers(Problem(Source(x.numpy(), "x"), ys, [0.015]))  # streamed rows
