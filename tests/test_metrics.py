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


def close(actual, expected, rtol=RTOL):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=0)


# ---------------------------------------------------------------------------- parity


def test_reference_file_provenance(ref):
    assert str(ref["quests_version"]) == "2026.2.22"
    assert "EMT Cu" in str(ref["parameters"])


def test_entropy_parity(ref, cu):
    close(entropy(cu["solid"]), ref["entropy_solid"])
    close(entropy(cu["liquid"]), ref["entropy_liquid"])
    close(entropy(cu["all"]), ref["entropy_all"])
    close(entropy(cu["all"], ref["h_vector"]), ref["entropy_all_hvec"])
    close(entropy(ref["x_solid"]), ref["entropy_solid"])  # numpy in, tensor out


def test_diversity_parity(ref, cu):
    close(diversity(cu["solid"]), ref["diversity_solid"])
    close(diversity(cu["liquid"]), ref["diversity_liquid"])
    close(diversity(cu["all"], ref["h_vector"]), ref["diversity_all_hvec"])


def test_delta_entropy_parity(ref, cu):
    close(delta_entropy(cu["query"], cu["solid"]), ref["dh_query_solid"])
    close(delta_entropy(cu["liquid"], cu["solid"]), ref["dh_liquid_solid"])
    close(delta_entropy(cu["solid"], cu["liquid"]), ref["dh_solid_liquid"])
    both = delta_entropy(cu["liquid"], cu["solid"], [0.015, 0.1])
    close(both[:, 0], ref["dh_liquid_solid"])
    close(both[:, 1], ref["dh_liquid_solid_h01"])


def test_entropy_per_structure_parity(ref, cu):
    idx = cu["system_idx"]
    close(entropy_per_structure(cu["solid"], idx), ref["entropy_per_structure_solid"])
    perm = torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(1))
    shuffled = entropy_per_structure(cu["solid"][perm], idx[perm], tile_size=7)
    close(shuffled, ref["entropy_per_structure_solid"])
    vec = entropy_per_structure(cu["solid"], idx, [0.015, 0.03], n_systems=10)
    assert vec.shape == (10, 2)
    close(vec[:8, 0], ref["entropy_per_structure_solid"])
    assert torch.isnan(vec[8:]).all()  # structures without environments


def test_bandwidth_parity(ref):
    close([bandwidth(float(v)) for v in ref["volumes"]], ref["bandwidth_gaussian"], 1e-14)
    close([bandwidth(float(v), "cutoff") for v in ref["volumes"]], ref["bandwidth_cutoff"], 1e-14)
    vols = torch.from_numpy(ref["volumes"])
    close(bandwidth(vols, "cutoff"), ref["bandwidth_cutoff"], 1e-14)
    close(bandwidth(vols), ref["bandwidth_gaussian"], 1e-14)


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


def test_novelty_threshold_and_overlap(cu):
    dh = delta_entropy(cu["liquid"], cu["solid"])
    for t in (0.0, 1.0, 20.0):
        frac = float((dh > t).double().mean())
        assert float(novelty(cu["liquid"], cu["solid"], threshold=t)) == pytest.approx(frac)
        assert float(overlap(cu["liquid"], cu["solid"], threshold=t)) == pytest.approx(1 - frac)
    # the 1500 K liquid is novel w.r.t. the 300 K solid; the later solid frames are covered
    assert float(novelty(cu["liquid"], cu["solid"])) == 1.0
    assert float(overlap(cu["query"], cu["solid"])) > 0.95


def test_delta_entropy_finite_for_far_outliers(cu):
    far = cu["solid"][:4] + torch.tensor([0.3, 1.0, 5.0, 50.0], dtype=torch.float64)[:, None]
    dh = delta_entropy(far, cu["solid"])
    assert torch.isfinite(dh).all() and (dh > 100).all()
    d2 = (far[:, None] - cu["solid"][None]).square().sum(-1)
    expected = -torch.logsumexp(-d2 / (2 * 0.015**2), dim=1)
    close(dh, expected.numpy(), 1e-12)
    assert torch.isfinite(approx_delta_entropy(far, cu["solid"])).all()


def test_approx_delta_entropy(cu):
    y, x = cu["query"], cu["solid"]
    exact = delta_entropy(y, x)
    approx = approx_delta_entropy(y, x, n=3)
    assert (approx >= exact - 1e-12).all()  # fewer terms: larger dH
    d, _ = (y[:, None] - x[None]).square().sum(-1).sqrt().topk(3, largest=False)
    expected = -torch.logsumexp(-d.square() / (2 * 0.015**2), dim=1)
    close(approx, expected.numpy(), 1e-12)
    small = x[:20]
    close(approx_delta_entropy(y, small, n=20), delta_entropy(y, small).numpy(), 1e-12)
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


def _tiny(n, d, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=g, dtype=torch.float64) * scale).requires_grad_()


def test_gradcheck_metrics():
    x, y = _tiny(6, 3, 0), _tiny(4, 3, 1)
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
