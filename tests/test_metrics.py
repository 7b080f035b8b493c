"""Information metrics (quests_torch.metrics): parity with upstream quests, properties, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quests_torch.metrics import (
    approx_delta_entropy,
    bandwidth,
    dataset_summary,
    delta_entropy,
    diversity,
    entropy,
    entropy_learning_curve,
    entropy_per_structure,
    find_duplicates,
    fit_entropy_asymptote,
    information_gap,
    novelty,
    overlap,
)

RTOL = 1e-9

# float32 on the device x dtype grid, measured on the thermal Cu data (CPU, torch 2.13) and
# given ~50x room (GPU reductions round differently): H and D within 2.2e-7 relative,
# per-structure H 3.1e-7, the bandwidth 9.5e-8; dH within 1.4e-6 nats of float64 where
# |dH| < 20 (its relative error is large near dH = 0, so dH takes an absolute bound: log p in
# float32 is good to 1e-4 at h = 0.015, see tests/test_kde.py; measured 1.4e-6 here).
F32_RTOL = 1e-5
F32_DH_ATOL = 1e-4


def close(actual, expected, rtol=RTOL, atol=0.0):
    actual = actual.detach().cpu() if isinstance(actual, torch.Tensor) else actual
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=atol)


def grid_close(dtype, actual, expected, rtol=RTOL, f32_atol=0.0):
    """``close`` at ``rtol`` in float64; in float32 at F32_RTOL (and ``f32_atol``)."""
    if dtype == torch.float64:
        close(actual, expected, rtol)
    else:
        assert actual.dtype == torch.float32
        close(actual, expected, F32_RTOL, f32_atol)


# ---------------------------------------------------------------------------- parity


def test_reference_file_provenance(ref):
    assert str(ref["quests_version"]) == "2026.2.22"
    assert "EMT Cu" in str(ref["parameters"])


@pytest.fixture
def on(cu, device, dtype):
    """The thermal Cu descriptors (``cu``) on the device, in the dtype of the grid."""
    return {
        k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in cu.items()
    }


def test_entropy_parity(ref, on, dtype):
    grid_close(dtype, entropy(on["solid"]), ref["entropy_solid"])
    grid_close(dtype, entropy(on["liquid"]), ref["entropy_liquid"])
    grid_close(dtype, entropy(on["all"]), ref["entropy_all"])
    grid_close(dtype, entropy(on["all"], ref["h_vector"]), ref["entropy_all_hvec"])


def test_entropy_parity_numpy_input(ref):
    close(entropy(ref["x_solid"]), ref["entropy_solid"])  # numpy in, tensor out


def test_diversity_parity(ref, on, dtype):
    grid_close(dtype, diversity(on["solid"]), ref["diversity_solid"])
    grid_close(dtype, diversity(on["liquid"]), ref["diversity_liquid"])
    grid_close(dtype, diversity(on["all"], ref["h_vector"]), ref["diversity_all_hvec"])


def test_delta_entropy_parity(ref, on, dtype):
    def check(actual, expected):
        grid_close(dtype, actual, expected, f32_atol=F32_DH_ATOL)

    check(delta_entropy(on["query"], on["solid"]), ref["dh_query_solid"])
    check(delta_entropy(on["liquid"], on["solid"]), ref["dh_liquid_solid"])
    check(delta_entropy(on["solid"], on["liquid"]), ref["dh_solid_liquid"])
    both = delta_entropy(on["liquid"], on["solid"], [0.015, 0.1])
    check(both[:, 0], ref["dh_liquid_solid"])
    check(both[:, 1], ref["dh_liquid_solid_h01"])


def test_entropy_per_structure_parity(ref, on, dtype):
    idx = on["system_idx"]
    expected = ref["entropy_per_structure_solid"]
    grid_close(dtype, entropy_per_structure(on["solid"], idx), expected)
    perm = torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(1))
    perm = perm.to(idx.device)
    shuffled = entropy_per_structure(on["solid"][perm], idx[perm], tile_size=7)
    grid_close(dtype, shuffled, expected)
    vec = entropy_per_structure(on["solid"], idx, [0.015, 0.03], n_systems=10)
    assert vec.shape == (10, 2)
    grid_close(dtype, vec[:8, 0], expected)
    assert torch.isnan(vec[8:]).all()  # structures without environments


def test_bandwidth_parity(ref):
    close([bandwidth(float(v)) for v in ref["volumes"]], ref["bandwidth_gaussian"], 1e-14)
    close([bandwidth(float(v), "cutoff") for v in ref["volumes"]], ref["bandwidth_cutoff"], 1e-14)


def test_bandwidth_parity_tensor(ref, device, dtype):
    vols = torch.from_numpy(ref["volumes"]).to(device, dtype)
    rtol = 1e-14 if dtype == torch.float64 else F32_RTOL
    close(bandwidth(vols, "cutoff"), ref["bandwidth_cutoff"], rtol)
    close(bandwidth(vols), ref["bandwidth_gaussian"], rtol)


# ---------------------------------------------------------------------------- properties


def test_entropy_bounds(cu):
    for x in (cu["solid"], cu["liquid"], cu["all"]):
        h = entropy(x)
        assert 0.0 <= float(h) <= math.log(x.shape[0])
        d = diversity(x)
        assert 0.0 <= float(d) <= math.log(x.shape[0]) + 1e-12


def test_identical_environments_have_zero_entropy(cu):
    x = cu["solid"][3].repeat(50, 1)
    assert abs(float(entropy(x))) < 1e-12
    assert abs(float(diversity(x))) < 1e-12  # log(50 * 1/50)


def test_distant_points_reach_log_n():
    n = 40
    x = torch.eye(n, dtype=torch.float64) * 10.0  # mutually 14 apart, h = 0.015
    assert abs(float(entropy(x)) - math.log(n)) < 1e-12
    assert abs(float(diversity(x)) - math.log(n)) < 1e-12


def test_permutation_invariance(cu):
    x = cu["all"]
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    assert abs(float(entropy(x[perm]) - entropy(x))) < 1e-12
    assert abs(float(diversity(x[perm]) - diversity(x))) < 1e-12
    dh = delta_entropy(cu["query"], x)
    assert torch.allclose(delta_entropy(cu["query"], x[perm]), dh, rtol=1e-12, atol=1e-12)


def test_members_are_covered(cu):
    for x in (cu["solid"], cu["all"]):
        assert (delta_entropy(x, x) <= 0).all()
        assert float(overlap(x, x)) == 1.0
        assert float(novelty(x, x)) == 0.0


def test_novelty_threshold_and_overlap(on, dtype):
    dh = delta_entropy(on["liquid"], on["solid"])
    ulp = {} if dtype == torch.float64 else {"abs": 1e-6}  # a float32 fraction, 1 - frac
    for t in (0.0, 1.0, 20.0):
        frac = float((dh > t).double().mean())
        got = float(novelty(on["liquid"], on["solid"], threshold=t))
        assert got == pytest.approx(frac, **ulp)
        got = float(overlap(on["liquid"], on["solid"], threshold=t))
        assert got == pytest.approx(1 - frac, **ulp)
    # the 1500 K liquid is novel w.r.t. the 300 K solid; the later solid frames are covered
    assert float(novelty(on["liquid"], on["solid"])) == 1.0
    assert float(overlap(on["query"], on["solid"])) > 0.95


def test_delta_entropy_finite_for_far_outliers(cu, device, dtype):
    far = cu["solid"][:4] + torch.tensor([0.3, 1.0, 5.0, 50.0], dtype=torch.float64)[:, None]
    d2 = (far[:, None] - cu["solid"][None]).square().sum(-1)
    expected = -torch.logsumexp(-d2 / (2 * 0.015**2), dim=1)
    far, solid = far.to(device, dtype), cu["solid"].to(device, dtype)
    dh = delta_entropy(far, solid)
    assert torch.isfinite(dh).all() and (dh > 100).all()
    grid_close(dtype, dh, expected.numpy(), 1e-12)
    assert torch.isfinite(approx_delta_entropy(far, solid)).all()


def test_approx_delta_entropy(cu, device, dtype):
    y, x = cu["query"], cu["solid"]
    d, _ = (y[:, None] - x[None]).square().sum(-1).sqrt().topk(3, largest=False)
    expected = -torch.logsumexp(-d.square() / (2 * 0.015**2), dim=1)  # float64
    y, x = y.to(device, dtype), x.to(device, dtype)
    exact = delta_entropy(y, x)
    approx = approx_delta_entropy(y, x, n=3)
    atol = 1e-12 if dtype == torch.float64 else F32_DH_ATOL
    assert (approx >= exact - atol).all()  # fewer terms: larger dH
    grid_close(dtype, approx, expected.numpy(), 1e-12, f32_atol=F32_DH_ATOL)
    small = x[:20]
    expected_small = delta_entropy(y, small)
    got_small = approx_delta_entropy(y, small, n=20)
    grid_close(dtype, got_small, expected_small.cpu().numpy(), 1e-12, f32_atol=F32_DH_ATOL)
    assert approx_delta_entropy(y, x, [0.01, 0.02]).shape == (256, 2)


def test_find_duplicates(cu):
    x = cu["solid"][:64]
    data = torch.cat([x, x[[3, 10]] + 1e-8, x[[3]], x[:5] + 1e-2])
    dup = find_duplicates(data)
    assert dup.index.tolist() == [64, 65, 66]
    assert dup.first.tolist() == [3, 10, 3]
    assert find_duplicates(data, tol=1.0).index.numel() > 3


def test_learning_curve_and_gap(cu):
    x = cu["solid"]
    curve = entropy_learning_curve(x, sizes=[20, 50, 100, 200, 400, 768], repeats=3, generator=7)
    assert curve.values.shape == (6, 3)
    assert torch.equal(curve.sizes, torch.tensor([20, 50, 100, 200, 400, 768]))
    close(curve.mean[-1], float(entropy(x)), 1e-12)
    assert float(curve.std[-1]) == 0.0
    again = entropy_learning_curve(x, sizes=[20, 50, 100, 200, 400, 768], repeats=3, generator=7)
    assert torch.equal(curve.values, again.values)  # seeded
    default = entropy_learning_curve(x, repeats=2, generator=torch.Generator().manual_seed(3))
    assert default.sizes[0] == 10 and default.sizes[-1] == 768 and default.sizes.numel() == 16
    fit = fit_entropy_asymptote(default.sizes, default.mean)
    assert fit.n_points == 10  # first and last three discarded
    assert fit.h_inf >= float(default.mean[-4]) and fit.b >= 0 and fit.c >= 0
    gap = information_gap(default, fit)
    close(gap, (fit.h_inf - default.mean).numpy(), 1e-15)
    assert (gap[-3:] > -0.1).all()


def test_asymptote_fit_recovers_known_curve():
    n = np.geomspace(10, 1e5, 20)
    fit = fit_entropy_asymptote(n, 5.0 - 3.0 * n**-0.5)
    assert fit.h_inf == pytest.approx(5.0, rel=1e-8)
    assert fit.b == pytest.approx(3.0, rel=1e-6) and fit.c == pytest.approx(0.5, rel=1e-6)
    flat = fit_entropy_asymptote(n[:5], np.full(5, 2.0))
    assert flat.h_inf == pytest.approx(2.0) and flat.n_points == 5


def test_dataset_summary(cu):
    s = dataset_summary(cu["solid"], other=cu["query"])
    assert s.n == 768 and s.log_n == pytest.approx(math.log(768))
    close(s.entropy, float(entropy(cu["solid"])), 1e-15)
    close(s.diversity, float(diversity(cu["solid"])), 1e-15)
    close(s.overlap, float(overlap(cu["solid"], cu["query"])), 1e-15)
    close(s.overlap_other, float(overlap(cu["query"], cu["solid"])), 1e-15)
    alone = dataset_summary(cu["liquid"])
    assert alone.overlap is None and alone.overlap_other is None


def test_float32_inputs_give_float32_metrics(cu):
    x = cu["all"].float()
    h32 = entropy(x)
    assert h32.dtype == torch.float32
    assert abs(float(h32) - float(entropy(cu["all"]))) < 1e-4


# ---------------------------------------------------------------------------- gradients


def test_gradcheck_metrics(tiny):
    x, y = tiny(6, 3, 0), tiny(4, 3, 1)
    h = 0.15
    gc = torch.autograd.gradcheck
    assert gc(lambda a: entropy(a, h), (x,))
    assert gc(lambda a: entropy(a, [0.1, 0.3], tile_size=4), (x,))
    assert gc(lambda a: diversity(a, h), (x,))
    assert gc(lambda b, a: delta_entropy(b, a, h), (y, x))
    assert gc(lambda b, a: approx_delta_entropy(b, a, h, n=2), (y, x))
    idx = torch.tensor([0, 1, 0, 1, 1, 0])
    assert gc(lambda a: entropy_per_structure(a, idx, h, tile_size=2), (x,))
    assert gc(
        lambda v: bandwidth(v, "cutoff"),
        (torch.tensor([9.0, 12.0], dtype=torch.float64, requires_grad=True),),
    )


# ---------------------------------------------------------------------------- errors


def test_errors_name_the_argument(cu):
    x = cu["solid"][:10]
    with pytest.raises(ValueError, match=r"`x` must be 2-D \[n, d\], got shape \(3,\)"):
        entropy(torch.rand(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"`y` must be 2-D"):
        delta_entropy(torch.rand(2, 3, 4), x)
    with pytest.raises(ValueError, match="`y` and `x` must have the same descriptor width"):
        delta_entropy(x[:, :10], x)
    with pytest.raises(ValueError, match="`x` is empty"):
        diversity(x[:0])
    with pytest.raises(ValueError, match="`h` must be positive and finite"):
        entropy(x, -0.1)
    with pytest.raises(ValueError, match="`h` must be positive and finite"):
        entropy(x, float("inf"))
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="`x` contains NaN"):
        novelty(x, bad)
    with pytest.raises(ValueError, match="`threshold` must be finite"):
        novelty(x, x, threshold=float("nan"))
    with pytest.raises(ValueError, match=r"`system_idx` must have shape \(10,\)"):
        entropy_per_structure(x, torch.zeros(9, dtype=torch.long))
    with pytest.raises(TypeError, match="`system_idx` must hold integers"):
        entropy_per_structure(x, torch.zeros(10))
    with pytest.raises(ValueError, match="`method` must be"):
        bandwidth(10.0, "linear")
    with pytest.raises(ValueError, match="`volume` must be positive"):
        bandwidth(-1.0)
    with pytest.raises(ValueError, match=r"`sizes` must lie in \[1, 10\]"):
        entropy_learning_curve(x, sizes=[5, 11])
    with pytest.raises(ValueError, match="`repeats` must be a positive int"):
        entropy_learning_curve(x, repeats=0)
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_entropy_asymptote([1, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="`n` must be a positive int"):
        approx_delta_entropy(x, x, n=0)
