"""Tiled kernel sums (quests_torch.kde): parity, tile independence, precision, gradients."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from quests_torch import kde
from quests_torch.kde import (
    RunningLogKernelSum,
    first_match_within,
    full_precision,
    kernel_pass,
    kernel_sum,
    log_kernel_sum,
    nearest_neighbors,
)
from quests_torch.kde.epilogue import Epilogue


def brute_log_p(x, y, h, log_w=None):
    """Direct-difference log-sum-exp in float64 (small sets only)."""
    x, y = x.double(), y.double()
    d2 = (x[:, None, :] - y[None, :, :]).square().sum(-1)
    h = torch.as_tensor(h, dtype=torch.float64)
    expo = -d2[..., None] / (2 * h.reshape(-1) ** 2)
    if log_w is not None:
        expo = expo + log_w.double()[None, :, None]
    out = torch.logsumexp(expo, dim=1)
    return out if h.ndim else out[:, 0]


def _f64(a) -> torch.Tensor:
    return torch.as_tensor(a).cpu().double()


def max_rel(a, b):
    a, b = _f64(a), _f64(b)
    return float(((a - b).abs() / b.abs()).max())


def log_err(log_a, log_b):
    """Error of log p: absolute where |log p| < 1 (relative error of p), else relative."""
    a, b = _f64(log_a), _f64(log_b)
    return float(((a - b).abs() / b.abs().clamp(min=1.0)).max())


# float32 on the device x dtype grid. A float32 squared distance is off by ~1e-7 |x|^2 and
# enters the exponent divided by 2 h^2, so the error of log p (the relative error of p)
# grows like 1/h^2. Measured on the thermal Cu data (CPU, torch 2.13): at most
# 6.6e-5 (0.015 / h)^2 (the 1536 x 1536 self sums, h = 0.005 ... 0.1), cross sums and tiles
# <= 2.5e-5 at h = 0.015. The bound is this file's float32 rule, 1e-4 at the default
# h = 0.015 (see test_float32_error_on_thermal_cu), scaled by (0.015 / h)^2 per bandwidth.
F32_LOG_P = 1e-4


def assert_float32_log_p(log_p, expected, h):
    """Per bandwidth column: |log p - expected| <= F32_LOG_P (0.015 / h)^2 max(1, |expected|)
    (absolute where |log p| < 1, i.e. the relative error of p; relative beyond)."""
    a, b = _f64(log_p), _f64(expected)
    err = ((a - b).abs() / b.abs().clamp(min=1.0)).reshape(b.shape[0], -1).amax(0)
    tol = F32_LOG_P * (0.015 / _f64(h).reshape(-1)).square()
    assert bool((err <= tol).all()), (err, tol)


# ---------------------------------------------------------------------------- parity


def test_parity_multi_bandwidth_self(ref, cu, device, dtype):
    """log p of all 1536 environments vs quests.entropy.kernel_sum_multi_bandwidth."""
    x = cu["all"].to(device, dtype)
    log_p = log_kernel_sum(x, x, ref["h_vector"])
    assert log_p.shape == (1536, len(ref["h_vector"]))
    assert log_p.dtype == dtype and log_p.device.type == device
    if dtype == torch.float64:
        assert max_rel(log_p.exp(), ref["kernel_sum_all_hvec"]) < 1e-9
    else:
        assert_float32_log_p(log_p, np.log(ref["kernel_sum_all_hvec"]), ref["h_vector"])


def test_parity_multi_bandwidth_cross(ref, cu, device, dtype):
    p = kernel_sum(cu["query"].to(device, dtype), cu["solid"].to(device, dtype), ref["h_vector"])
    assert p.dtype == dtype and p.device.type == device
    if dtype == torch.float64:
        assert max_rel(p, ref["kernel_sum_query_solid_hvec"]) < 1e-9
    else:
        expected = np.log(ref["kernel_sum_query_solid_hvec"])
        assert_float32_log_p(_f64(p).log(), expected, ref["h_vector"])


def test_parity_numpy_input(ref):
    x = ref["x_solid"]
    log_p = log_kernel_sum(x, x, 0.015)
    assert isinstance(log_p, torch.Tensor) and log_p.dtype == torch.float64
    assert log_p.shape == (768,)
    np.testing.assert_allclose(
        log_p.numpy(), log_kernel_sum(torch.from_numpy(x), torch.from_numpy(x)).numpy(), rtol=1e-13
    )


def test_against_direct_differences(cu, device, dtype):
    """Centred GEMM tiles agree with explicit differences to ~1e-13 on thermal data."""
    expected = brute_log_p(cu["query"], cu["all"][::3], 0.015)
    x, y = cu["query"].to(device, dtype), cu["all"][::3].to(device, dtype)
    for distance in ("matmul", "direct"):
        got = log_kernel_sum(x, y, distance=distance)
        if dtype == torch.float64:
            assert (got.cpu() - expected).abs().max() < 1e-11
        else:
            assert_float32_log_p(got, expected, 0.015)


# ---------------------------------------------------------------------------- tiles


@pytest.mark.parametrize("same", [True, False])
@pytest.mark.parametrize("h", [0.015, [0.01, 0.015, 0.1]])
def test_tile_size_independence(cu, same, h, device, dtype):
    x = cu["all"][::25].to(device, dtype)  # 62 rows: tile size 1 stays quick
    y = x if same else cu["all"][1::19].to(device, dtype)
    results = [kernel_sum(x, y, h, tile_size=t) for t in (1, 7, 1000, None, (5, 13), (64, 3))]
    for r in results[1:]:
        if dtype == torch.float64:
            assert max_rel(r, results[0]) <= 1e-12
        else:  # float32 tiles are centred on their own means: rounding differs per tiling
            assert_float32_log_p(_f64(r).log(), _f64(results[0]).log(), h)


def test_tile_size_independence_weights(cu, device, dtype):
    x, y = cu["query"][:40].to(device, dtype), cu["all"][::20].to(device, dtype)
    log_w = torch.linspace(-3.0, 2.0, y.shape[0], dtype=torch.float64).to(device, dtype)
    results = [kernel_sum(x, y, 0.02, log_weights=log_w, tile_size=t) for t in (1, 7, 1000)]
    for r in results[1:]:
        if dtype == torch.float64:
            assert max_rel(r, results[0]) <= 1e-12
        else:
            assert_float32_log_p(_f64(r).log(), _f64(results[0]).log(), 0.02)


def test_small_budget_streams_same_result(cu, device, dtype):
    x, y = cu["query"].to(device, dtype), cu["all"].to(device, dtype)
    expected = log_kernel_sum(x, y)
    got = log_kernel_sum(x, y, budget="256K")  # small tiles, references streamed in panels
    if dtype == torch.float64:
        assert (got - expected).abs().max() < 1e-12
    else:
        assert_float32_log_p(got, expected, 0.015)


def test_memmap_streaming(cu, tmp_path):
    y = cu["all"].numpy()
    path = tmp_path / "ref.npy"
    np.save(path, y)
    mm = np.load(path, mmap_mode="r")
    got = log_kernel_sum(cu["query"].numpy(), mm, 0.015, budget="1M")
    expected = log_kernel_sum(cu["query"], cu["all"])
    assert (got - expected).abs().max() < 1e-12
    # a memmap against itself (symmetric sweep)
    got_self = log_kernel_sum(mm, mm, budget="1M")
    assert (got_self - log_kernel_sum(cu["all"], cu["all"])).abs().max() < 1e-12
    # float32 arrays stream as float32 tiles
    got32 = log_kernel_sum(cu["query"].numpy().astype(np.float32), y.astype(np.float32))
    assert got32.dtype == torch.float32
    assert ((got32.double() - expected).exp() - 1).abs().max() < 1e-4


# ---------------------------------------------------------------------------- precision


def test_float32_error_on_thermal_cu(cu):
    """float32 tiles (centred, float64 accumulation): relative error of p(x) <= 1e-4."""
    x = cu["all"]
    p64 = log_kernel_sum(x, x)
    p32 = log_kernel_sum(x.float(), x.float())
    assert p32.dtype == torch.float32
    rel = ((p32.double() - p64).exp() - 1).abs()
    assert rel.max() <= 1e-4
    assert rel.median() <= 1e-5
    # float32 compute requested for float64 inputs: float64 output, same accuracy
    p32b = log_kernel_sum(x, x, dtype=torch.float32)
    assert p32b.dtype == torch.float64
    assert ((p32b - p64).exp() - 1).abs().max() <= 1e-4


def test_float32_direct_differences(cu):
    x = cu["liquid"]
    p64 = log_kernel_sum(x, x)
    p32 = log_kernel_sum(x.float(), x.float(), distance="direct")
    assert ((p32.double() - p64).exp() - 1).abs().max() <= 1e-5


def test_reduced_precision_flags_do_not_change_results(cu, restore_precision_flags):
    """TF32/bf16 matmul switched on globally: float32 results unchanged, flags restored."""
    x = cu["all"].float()
    clean = log_kernel_sum(x, x)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("medium")
    flags = {
        b: b.fp32_precision
        for b in (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
        if hasattr(b, "fp32_precision")
    }
    dirty = log_kernel_sum(x, x)
    assert torch.equal(clean, dirty)
    for b, v in flags.items():
        assert b.fp32_precision == v  # the caller's settings are back
    assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.get_float32_matmul_precision() == "medium"


def test_full_precision_context_restores():
    before = torch.backends.mkldnn.matmul.fp32_precision
    with full_precision():
        assert torch.backends.mkldnn.matmul.fp32_precision in ("ieee", "none")
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_far_outliers_stay_finite(cu, device, dtype):
    """Queries hundreds to millions of nats away: log-sum-exp, no underflow to -inf."""
    y = cu["solid"]
    far = torch.cat([y[:3] + 0.5, y[3:6] + 10.0, y[6:8] + 0.05])
    expected = brute_log_p(far, y, 0.015)
    got = log_kernel_sum(far.to(device, dtype), y.to(device, dtype))
    assert torch.isfinite(got).all()
    assert max_rel(got, expected) < (1e-12 if dtype == torch.float64 else 1e-5)
    # several bandwidths with the fallback rows mixed in
    got_h = log_kernel_sum(far.to(device, dtype), y.to(device, dtype), [0.015, 0.5])
    assert max_rel(got_h, brute_log_p(far, y, [0.015, 0.5])) < (
        1e-12 if dtype == torch.float64 else 1e-5
    )


# ---------------------------------------------------------------------------- weights, top-n


def test_weighted_sums(cu, device, dtype):
    x, y = cu["query"][:50], cu["solid"][:200]
    log_w = torch.randn(200, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    log_w[::7] = -torch.inf  # zero weights drop references
    hv = [0.01, 0.02, 0.05]
    expected, expected_h = brute_log_p(x, y, 0.02, log_w), brute_log_p(x, y, hv, log_w)
    x, y = x.to(device, dtype), y.to(device, dtype)
    got = log_kernel_sum(x, y, 0.02, log_weights=log_w.to(device, dtype))
    got_h = log_kernel_sum(x, y, hv, log_weights=log_w.numpy())
    if dtype == torch.float64:
        assert max_rel(got, expected) < 1e-12
        assert max_rel(got_h, expected_h) < 1e-12
    else:
        assert_float32_log_p(got, expected, 0.02)
        assert_float32_log_p(got_h, expected_h, hv)


def test_nearest_neighbors_exact(cu, device, dtype):
    dists = torch.cdist(cu["query"], cu["all"])  # float64 reference
    d_ref, i_ref = dists.topk(4, largest=False)
    x, y = cu["query"].to(device, dtype), cu["all"].to(device, dtype)
    dist, idx = nearest_neighbors(x, y, 4, tile_size=(100, 37))
    res = kernel_pass(x, y, 0.015, n_nearest=4)  # the same neighbours from a kernel pass
    assert idx.device == dist.device == res.nearest_index.device == x.device
    idx, dist = idx.cpu(), dist.cpu()  # the reference is on the CPU
    if dtype == torch.float64:
        assert torch.equal(idx, i_ref)
        assert (dist - d_ref).abs().max() < 1e-12
        assert torch.equal(res.nearest_index.cpu(), i_ref)
        assert (res.nearest_sq_dist.cpu().sqrt() - d_ref).abs().max() < 1e-6
        assert max_rel(res.log_p.exp(), kernel_sum(x, y)) < 1e-13
        return
    # float32 (measured on CPU: same indices; distances within 2.3e-7 of float64, log p
    # within 1.6e-6): float32 rounding may swap neighbours closer than its resolution, so
    # the chosen ones must lie at the k smallest float64 distances
    for i in (idx, res.nearest_index):
        assert (dists.gather(1, i.cpu()) - d_ref).abs().max() < 1e-6
    assert (_f64(dist) - d_ref).abs().max() < 1e-6
    assert (_f64(res.nearest_sq_dist).sqrt() - d_ref).abs().max() < 1e-6
    assert_float32_log_p(res.log_p, kernel_sum(cu["query"], cu["all"]).log(), 0.015)


def test_first_match_within(cu):
    x = cu["solid"][:100]
    dup = torch.cat([x, x[[5, 0, 5]] + 1e-7, x[:2] + 1e-3])
    first = first_match_within(dup, tol=1e-5, tile_size=16)
    expected = torch.full((105,), -1)
    expected[100:103] = torch.tensor([5, 0, 5])
    assert torch.equal(first, expected)
    against = first_match_within(x[:10] + 1e-8, x, tol=1e-6)
    assert torch.equal(against, torch.arange(10))


def test_progress_callback(cu):
    calls = []
    log_kernel_sum(
        cu["query"], cu["solid"], tile_size=100, progress=lambda d, t: calls.append((d, t))
    )
    assert calls[-1] == (256, 256) and len(calls) == 3


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("h", [0.2, [0.1, 0.3]])
@pytest.mark.parametrize("tile", [None, 2])
def test_gradcheck_x_y(h, tile, tiny):
    x, y = tiny(5, 4, 0), tiny(7, 4, 1)
    assert torch.autograd.gradcheck(lambda a, b: log_kernel_sum(a, b, h, tile_size=tile), (x, y))


@pytest.mark.parametrize("tile", [None, 3])
def test_gradcheck_self(tile, tiny):
    x = tiny(7, 3, 2)
    assert torch.autograd.gradcheck(lambda a: log_kernel_sum(a, a, 0.2, tile_size=tile), (x,))


def test_gradcheck_weights(tiny):
    x, y = tiny(4, 3, 3), tiny(6, 3, 4)
    log_w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, w: log_kernel_sum(a, b, 0.25, log_weights=w, tile_size=2), (x, y, log_w)
    )
    assert torch.autograd.gradcheck(
        lambda a, b, w: log_kernel_sum(a, b, [0.2, 0.4], log_weights=w), (x, y, log_w)
    )


def test_gradcheck_far_rows_and_float32_mode(tiny):
    x, y = tiny(4, 3, 5), tiny(6, 3, 6)
    with torch.no_grad():
        x[:2] += 2.0  # far: these rows take the shifted fallback
    assert torch.autograd.gradcheck(lambda a, b: log_kernel_sum(a, b, 0.05), (x, y))


def test_gradient_matches_autograd_of_brute_force(cu, device, dtype):
    def grads(fn, x, y):
        x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
        (fn(x, y) * torch.linspace(0, 1, 30, device=x.device)).sum().backward()
        return _f64(x.grad), _f64(y.grad)

    x, y = cu["query"][:30], cu["solid"][:80]
    gx, gy = grads(
        lambda a, b: log_kernel_sum(a, b, 0.015, tile_size=16),
        x.to(device, dtype),
        y.to(device, dtype),
    )
    rx, ry = grads(lambda a, b: brute_log_p(a, b, 0.015), x, y)  # float64 on the CPU
    # float32: measured 6e-7 (x) and 1.2e-6 (y) of the largest entry, 8.5e-5 relative
    rtol, atol = (1e-9, 1e-9) if dtype == torch.float64 else (1e-3, 1e-5)
    assert torch.allclose(gx, rx, rtol=rtol, atol=atol * rx.abs().max())
    assert torch.allclose(gy, ry, rtol=rtol, atol=atol * ry.abs().max())


def test_no_graph_without_requires_grad(cu):
    out = log_kernel_sum(cu["query"][:5], cu["solid"])
    assert not out.requires_grad


# ---------------------------------------------------------------------------- errors


def test_errors():
    x = torch.rand(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"`x` must be 2-D \[n, d\], got shape \(3,\)"):
        log_kernel_sum(torch.rand(3), x)
    with pytest.raises(ValueError, match="`x` and `y` must have the same descriptor width"):
        log_kernel_sum(x, torch.rand(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="`y` is empty"):
        log_kernel_sum(x, torch.rand(0, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="`h` must be positive and finite"):
        log_kernel_sum(x, x, 0.0)
    with pytest.raises(ValueError, match="`h` must be positive and finite"):
        log_kernel_sum(x, x, [0.1, float("nan")])
    with pytest.raises(TypeError, match="`h` must be a positive float"):
        log_kernel_sum(x, x, "0.1")
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="`y` contains NaN"):
        log_kernel_sum(x, bad)
    with pytest.raises(TypeError, match=r"`x` must be a torch\.Tensor or a numpy array"):
        log_kernel_sum([[0.0, 1.0]], x)
    with pytest.raises(TypeError, match="`x` must hold floating-point"):
        log_kernel_sum(torch.ones(2, 3, dtype=torch.long), x)
    with pytest.raises(ValueError, match="`tile_size` must be positive"):
        log_kernel_sum(x, x, tile_size=0)
    with pytest.raises(ValueError, match="`distance` must be"):
        log_kernel_sum(x, x, distance="cosine")
    with pytest.raises(ValueError, match=r"`log_weights` must have shape \(4,\)"):
        log_kernel_sum(x, x, log_weights=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="`n` = 5 exceeds"):
        nearest_neighbors(x, x, 5)
    with pytest.raises(ValueError, match="`tol` must be a positive"):
        first_match_within(x, tol=0.0)


# ---------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(cu, dtype, restore_precision_flags):
    torch.backends.cuda.matmul.allow_tf32 = True  # must not matter
    x, y = cu["query"].to(dtype), cu["all"].to(dtype)
    cpu = log_kernel_sum(x, y, [0.015, 0.03])
    gpu = log_kernel_sum(x.cuda(), y.cuda(), [0.015, 0.03])
    assert gpu.device.type == "cuda"
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert ((gpu.cpu().double() - cpu.double()).exp() - 1).abs().max() < tol


@pytest.mark.cuda
def test_cuda_streams_numpy_and_rejects_mixed_devices(cu):
    got = log_kernel_sum(cu["query"].numpy(), cu["all"].numpy(), device="cuda", budget="1M")
    assert got.device.type == "cuda"
    assert (got.cpu() - log_kernel_sum(cu["query"], cu["all"])).abs().max() < 1e-12
    with pytest.raises(ValueError, match="one device"):
        log_kernel_sum(cu["query"].cuda(), cu["all"])


def test_weighted_self_sums(cu):
    x = cu["solid"][:120]
    log_w = torch.linspace(-2.0, 1.0, 120, dtype=torch.float64)
    expected = brute_log_p(x, x, 0.015, log_w)
    for tile in (None, 16):
        got = log_kernel_sum(x, x, 0.015, log_weights=log_w, tile_size=tile)
        assert max_rel(got, expected) < 1e-12


def test_weighted_self_sums_far_fallback(cu):
    """Tiny weights push self sums below the unshifted range: the shifted rows stay exact."""
    x = cu["liquid"][:60].clone()
    x[0] += 1.0  # the one heavy point is far from all others
    log_w = torch.full((60,), -2000.0, dtype=torch.float64)
    log_w[0] = 0.0
    expected = brute_log_p(x, x, 0.015, log_w)
    assert (expected[1:] < -1000).all()
    for tile in (None, 7):
        got = log_kernel_sum(x, x, 0.015, log_weights=log_w, tile_size=tile)
        assert (got - expected).abs().max() < 1e-9


# ---------------------------------------------------------------------------- out of memory


@pytest.fixture
def inject_oom(monkeypatch):
    """Make chosen calls of the tile GEMM (``_Problem.exponent``) raise an OOM error.

    Returns a dict: ``fail`` (set of call numbers, or ``"always"``) and ``calls`` (count).
    """
    state = {"fail": {0}, "calls": 0}
    original = kde.engine.Problem.exponent

    def exponent(self, *args, **kwargs):
        n = state["calls"]
        state["calls"] += 1
        if state["fail"] == "always" or n in state["fail"]:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(kde.engine.Problem, "exponent", exponent)
    return state


def test_oom_is_constructible_on_cpu_builds():
    assert issubclass(torch.OutOfMemoryError, RuntimeError)
    assert "x" in str(torch.OutOfMemoryError("x"))


@pytest.mark.parametrize("case", ["self", "cross_weights_multi_h", "nearest"])
def test_oom_retry_halves_tiles_same_result(cu, inject_oom, case):
    x = cu["all"]
    log_w = torch.linspace(-2.0, 1.0, x.shape[0], dtype=torch.float64)

    def run(**kw):
        if case == "self":
            return kernel_pass(x, x, **kw).log_p[:, None]
        if case == "cross_weights_multi_h":
            return kernel_pass(cu["query"], x, [0.01, 0.02], log_weights=log_w, **kw).log_p
        res = kernel_pass(cu["query"], x, n_nearest=3, **kw)
        return torch.cat([res.log_p[:, None], res.nearest_sq_dist, res.nearest_index], 1)

    inject_oom["fail"] = set()
    expected = run()  # default CPU tiles: 1024 x 1024
    rows = min(1024, x.shape[0] if case == "self" else cu["query"].shape[0]) // 2
    halved = run(tile_size=(rows, 512))
    inject_oom["fail"], inject_oom["calls"] = {1}, 0  # fails mid-sweep, after partial sums
    with pytest.warns(RuntimeWarning, match=f"out of memory.*retrying with {rows} x 512 tiles"):
        got = run()
    assert torch.equal(got, halved)  # the whole sweep was redone with the halved tiles
    assert max_rel(got[:, 0], expected[:, 0]) < 1e-12
    if case == "nearest":
        assert max_rel(got[:, 1:4], expected[:, 1:4]) < 1e-12
        assert torch.equal(got[:, 4:], expected[:, 4:])


def test_oom_retry_in_backward(cu, inject_oom):
    x = cu["query"][:60].clone().requires_grad_(True)
    y = cu["all"][::4].clone().requires_grad_(True)
    inject_oom["fail"] = set()
    log_kernel_sum(x, y, tile_size=128).sum().backward()
    expected = x.grad.clone(), y.grad.clone()
    x.grad = y.grad = None
    lp = log_kernel_sum(x, y, tile_size=128)
    inject_oom["fail"], inject_oom["calls"] = {1}, 0  # the second tile of the backward
    with pytest.warns(RuntimeWarning, match="kernel-sum backward.*30 x 64 tiles"):
        lp.sum().backward()
    for got, want in zip((x.grad, y.grad), expected, strict=True):  # tiny entries cancel
        assert (got - want).abs().max() < 1e-12 * want.abs().max()


def test_oom_retry_first_match_and_running_sum(cu, inject_oom, monkeypatch):
    x = cu["solid"][:300]
    dup = torch.cat([x, x[[5, 0]] + 1e-7])
    inject_oom["fail"] = set()
    expected = first_match_within(dup, tol=1e-5, tile_size=128)
    inject_oom["fail"], inject_oom["calls"] = {3}, 0
    with pytest.warns(RuntimeWarning, match="first_match_within"):
        assert torch.equal(first_match_within(dup, tol=1e-5, tile_size=128), expected)

    running = RunningLogKernelSum(cu["all"], 0.015)
    reference = running.log_sum(x)
    original = RunningLogKernelSum._log_sum_tiles
    calls = []

    def tiles(self, *args):
        calls.append(self._cols_per_tile(x.shape[0]))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("injected")
        return original(self, *args)

    monkeypatch.setattr(RunningLogKernelSum, "_log_sum_tiles", tiles)
    with pytest.warns(RuntimeWarning, match="running kernel sum"):
        got = running.log_sum(x)
    assert calls[1] <= calls[0] // 2
    assert max_rel(got, reference) < 1e-12


def test_oom_gives_up_below_the_floor(cu, inject_oom):
    inject_oom["fail"] = "always"
    with (
        pytest.warns(RuntimeWarning, match="retrying"),
        pytest.raises(torch.OutOfMemoryError, match="even with the smallest tiles"),
    ):
        log_kernel_sum(cu["query"], cu["all"])
    # 1024 -> 512 -> 256 -> 128 -> 64 tiles, then the clear error
    assert inject_oom["calls"] == 5


# ---------------------------------------------------------------------------- block top-k


def _stable_top(a, k):
    v, ix = torch.sort(a, dim=1, descending=True, stable=True)
    return v[:, :k], ix[:, :k]


@pytest.mark.parametrize("width", [1, 5, 37, 300, 1000, 1024, 4099])
@pytest.mark.parametrize("k", [1, 3, 8, 40])
def test_tile_top_is_exact_with_ties(width, k, device):
    k = min(k, width)
    gen = torch.Generator().manual_seed(width * 100 + k)
    for levels, dtype in ((7, torch.float64), (200, torch.float64), (50, torch.float32)):
        a = torch.randint(-levels, 1, (33, width), generator=gen).to(dtype)  # many ties
        a[0] = 0.0  # a row that is one big tie
        v_ref, ix_ref = _stable_top(a, k)
        v, ix = kde.topk.tile_top(a.to(device), k)
        assert torch.equal(v.cpu(), v_ref) and torch.equal(ix.cpu(), ix_ref)
        # a strided view of a wider buffer, as in the sweeps
        wide = torch.zeros(33, width + 3, dtype=dtype, device=device)
        wide[:, :width] = a.to(device)
        v2, ix2 = kde.topk.tile_top(wide[:, :width], k)
        assert torch.equal(v2.cpu(), v_ref) and torch.equal(ix2.cpu(), ix_ref)


def _old_top_n(expo, k, tn):
    """The implementation before the block pre-selection: torch.topk per tile, merged."""
    best = torch.full((expo.shape[0], k), -torch.inf, dtype=expo.dtype)
    best_idx = torch.full((expo.shape[0], k), -1)
    for j0 in range(0, expo.shape[1], tn):
        v, ix = torch.topk(expo[:, j0 : j0 + tn], min(k, expo.shape[1] - j0), dim=1)
        v, sel = torch.topk(torch.cat([best, v], 1), k, dim=1)
        best, best_idx = v, torch.cat([best_idx, ix + j0], 1).gather(1, sel)
    return best, best_idx


@pytest.mark.parametrize("tile", [None, 64, (50, 300), 1000])
@pytest.mark.parametrize("k", [1, 3, 12])
def test_nearest_exact_with_ties_against_previous_topk(tile, k):
    """Dyadic data (every distance exact in float64): many exact ties, same values as the
    previous torch.topk implementation, ties resolved to the lowest reference index."""
    gen = torch.Generator().manual_seed(k)
    grid = torch.randint(-8, 9, (40, 5), generator=gen).double() / 8
    y = grid[torch.randint(0, 40, (2048,), generator=gen)]  # duplicated rows: exact ties
    x = torch.randint(-8, 9, (300, 5), generator=gen).double() / 8
    sq = (x[:, None, :] - y[None, :, :]).square().sum(-1)  # exact
    res = kernel_pass(x, y, 0.5, n_nearest=k, tile_size=tile)
    order = torch.sort(sq, dim=1, stable=True).indices[:, :k]  # (distance, index) order
    assert torch.equal(res.nearest_index, order)
    assert torch.equal(res.nearest_sq_dist, sq.gather(1, order))
    old_v, old_i = _old_top_n(-sq / 2, k, 1024)
    assert torch.equal(-2 * old_v, res.nearest_sq_dist)  # same values as before
    assert torch.equal(sq.gather(1, old_i), res.nearest_sq_dist)  # ties: same distances
    # nearest_neighbors uses h = 0.015 (inexact scale): ties between distinct rows are
    # then decided by rounding, but the distances are the exact k smallest, ties in index order
    dist, idx = nearest_neighbors(x, y, k, tile_size=tile)
    assert torch.equal(dist, sq.gather(1, order).sqrt())
    assert torch.equal(sq.gather(1, idx).sqrt(), dist)
    tied = dist[:, 1:] == dist[:, :-1]
    assert bool((idx[:, 1:][tied] > idx[:, :-1][tied]).all())


def test_nearest_neighbors_random_unchanged(cu):
    """No ties: identical indices to the previous implementation, block path included."""
    x, y = cu["query"], torch.cat([cu["all"], cu["all"][:800] * 1.01])  # 1024-wide tiles
    expo = -torch.cdist(x, y).square() / 2
    for k in (1, 3, 30):
        _, old_i = _old_top_n(expo, k, 1024)
        res = kernel_pass(x, y, n_nearest=k)
        assert torch.equal(res.nearest_index, old_i)


# ---------------------------------------------------------------------------- tile epilogue


@pytest.fixture
def fresh_epilogue(monkeypatch):
    """A clean compiled-epilogue state (restored after the test)."""
    monkeypatch.setattr(Epilogue, "fn", None)
    monkeypatch.setattr(Epilogue, "failed", False)
    monkeypatch.delenv("QUESTS_TORCH_COMPILE", raising=False)


def test_compile_switch(fresh_epilogue, monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv("QUESTS_TORCH_COMPILE", raising=False)
    assert not Epilogue.wanted(cuda) and not Epilogue.wanted(cpu)  # opt-in
    monkeypatch.setenv("QUESTS_TORCH_COMPILE", "0")
    assert not Epilogue.wanted(cuda) and not Epilogue.wanted(cpu)
    monkeypatch.setenv("QUESTS_TORCH_COMPILE", "1")
    assert Epilogue.wanted(cuda) and Epilogue.wanted(cpu)


@pytest.mark.parametrize("where", ["compile", "call"])
def test_compile_failure_falls_back_to_eager(cu, fresh_epilogue, monkeypatch, where):
    x = cu["all"][::2]
    expected = log_kernel_sum(x, x, [0.015, 0.03])
    monkeypatch.setenv("QUESTS_TORCH_COMPILE", "1")

    def broken(*args, **kwargs):
        raise RuntimeError("inductor: no working C++ compiler (simulated)")

    if where == "compile":
        monkeypatch.setattr(torch, "compile", broken)
    else:
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    with pytest.warns(RuntimeWarning, match="eager path"):
        got = log_kernel_sum(x, x, [0.015, 0.03])
    assert torch.equal(got, expected)
    assert Epilogue.failed and not Epilogue.wanted(torch.device("cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: eager from now on
        assert torch.equal(log_kernel_sum(x, x, [0.015, 0.03]), expected)


def test_unclamped_exp_matches_clamped(cu, monkeypatch):
    """The CUDA path drops the clamp: same results to 1e-12, far rows and zero weights too."""
    y = cu["solid"]
    far = torch.cat([y[:3] + 0.5, y[3:6] + 10.0, y[6:8] + 0.05, cu["query"][:40]])
    log_w = torch.randn(y.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    log_w[::5] = -torch.inf
    xg = far.clone().requires_grad_(True)

    def run():
        out = [
            log_kernel_sum(cu["all"], cu["all"]),
            log_kernel_sum(far, y, [0.015, 0.5]),
            log_kernel_sum(far, y, 0.02, log_weights=log_w),
            log_kernel_sum(far.float(), y.float()).double(),
        ]
        xg.grad = None
        log_kernel_sum(xg, y, [0.01, 0.03]).sum().backward()
        return out, xg.grad.clone()

    clamped, g_clamped = run()

    class Unclamped(kde.engine.Problem):  # built as on CUDA: no clamp at the floor before exp
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.clamp = False

    monkeypatch.setattr(kde.api, "Problem", Unclamped)
    free, g_free = run()
    for a, b, tol in zip(clamped, free, [1e-12, 1e-12, 1e-12, 1e-6], strict=True):
        assert torch.isfinite(b).all()
        assert log_err(b, a) < tol
    assert max_rel(g_free, g_clamped) < 1e-12


def _exp_sums_cases():
    gen = torch.Generator().manual_seed(3)
    a = -torch.rand(300, 170, dtype=torch.float64, generator=gen) * 900  # far tail included
    lw = -torch.rand(170, dtype=torch.float64, generator=gen) * 5
    mask = torch.rand(300, 170, generator=gen) < 0.3
    scale = torch.tensor(0.7, dtype=torch.float64)
    return a, [(None, None, None, True), (scale, lw, None, False), (None, None, mask, True)]


@pytest.mark.slow
def test_compiled_epilogue_matches_eager(cu, fresh_epilogue, monkeypatch):
    """torch.compile of the tile epilogue on the CPU: same sums to 1e-12 (compiles in
    ~15-90 s on the 2-core CPU, hence slow)."""
    a, cases = _exp_sums_cases()
    compiled = torch.compile(kde.epilogue.exp_sums, fullgraph=True)
    for scale, lw, mask, both in cases:
        ref_row, ref_col = kde.epilogue.exp_sums(a, scale, lw, mask, both)
        row, col = compiled(a, scale, lw, mask, both)
        assert max_rel(row, ref_row) < 1e-12
        if both:
            assert max_rel(col, ref_col) < 1e-12
    x, y = cu["all"], cu["solid"]
    far = torch.cat([y[:3] + 0.5, cu["query"]])
    log_w = torch.linspace(-3.0, 0.0, y.shape[0], dtype=torch.float64)
    runs = [
        lambda: log_kernel_sum(x, x),
        lambda: log_kernel_sum(far, y, [0.015, 0.5], log_weights=log_w),
        lambda: log_kernel_sum(x.float(), x.float()).double(),
    ]
    eager = [r() for r in runs]
    monkeypatch.setenv("QUESTS_TORCH_COMPILE", "1")
    calls = []
    original = Epilogue.get

    def counted():
        fn = original()
        return None if fn is None else (lambda *args: calls.append(1) or fn(*args))

    monkeypatch.setattr(Epilogue, "get", counted)
    fused = [r() for r in runs]
    assert calls and not Epilogue.failed
    for a_, b_, tol in zip(eager, fused, [1e-12, 1e-12, 1e-6], strict=True):
        assert log_err(b_, a_) < tol
