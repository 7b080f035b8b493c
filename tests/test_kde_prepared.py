"""PreparedReferences and grouped_log_kernel_sum against the general tiled kernel sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quests_torch.kde import PreparedReferences, grouped_log_kernel_sum, log_kernel_sum


def _data(n, d=5, seed=0, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, dtype=torch.float64, generator=gen) * scale


def _close(a, b, tol=1e-12):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.allclose(a, b, rtol=tol, atol=tol), float((a - b).abs().max())


# ---------------------------------------------------------------------------- prepared


@pytest.mark.parametrize("h", [0.02, [0.01, 0.03]])
@pytest.mark.parametrize("tile_size", [None, 3, (2, 7)])
def test_prepared_equals_log_kernel_sum(h, tile_size, device):
    y, x = _data(40, seed=1).to(device), _data(11, seed=2).to(device)
    x[3] += 5.0  # a far query: the shifted recomputation
    prep = PreparedReferences(y, h)
    _close(prep.log_kernel_sum(x, tile_size=tile_size), log_kernel_sum(x, y, h))
    _close(prep.log_kernel_sum(x.numpy() if device == "cpu" else x), log_kernel_sum(x, y, h))


def test_prepared_float32_and_gradient():
    y, x = _data(40, seed=3), _data(9, seed=4)
    prep = PreparedReferences(y.float(), 0.02)
    _close(prep.log_kernel_sum(x.float()), log_kernel_sum(x.float(), y.float(), 0.02), 1e-6)
    prep64 = PreparedReferences(y, 0.02)
    a = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(prep64.log_kernel_sum(a).square().sum(), a)
    b = x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(log_kernel_sum(b, y, 0.02).square().sum(), b)
    _close(g, g_ref)
    small = PreparedReferences(_data(6, 3, seed=5), 0.1)
    assert torch.autograd.gradcheck(
        lambda q: small.log_kernel_sum(q, tile_size=2), (_data(4, 3, seed=6).requires_grad_(),)
    )


def test_prepared_errors():
    with pytest.raises(ValueError, match="`bank` contains NaN"):
        PreparedReferences(torch.tensor([[0.0, float("nan")]]), name="bank")
    prep = PreparedReferences(_data(5), 0.1)
    with pytest.raises(ValueError, match="same descriptor width, got 4 and 5"):
        prep.log_kernel_sum(_data(2, 4))
    bad = _data(3)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="`q` contains NaN or infinite"):
        prep.log_kernel_sum(bad, name="q")


# ---------------------------------------------------------------------------- grouped


def _loop(x, sizes, h):
    parts, i = [], 0
    for s in sizes:
        if s:
            xs = x[i : i + s]
            parts.append(log_kernel_sum(xs, xs, h))
        i += s
    return torch.cat(parts)


@pytest.mark.parametrize("h", [0.02, [0.01, 0.03]])
@pytest.mark.parametrize("tile_size", [None, 7, 2])
def test_grouped_equals_a_loop_over_groups(h, tile_size, device):
    sizes = [4, 4, 4, 0, 1, 9, 9, 4, 1]
    x = _data(sum(sizes), seed=7).to(device)
    x[14] += 3.0  # a far row of a 9-group: the shifted recomputation
    # the loop centres each group on its own mean: agreement to rounding
    got = grouped_log_kernel_sum(x, sizes, h, tile_size=tile_size)
    _close(got, _loop(x, sizes, h), 1e-10)
    _close(grouped_log_kernel_sum(x, torch.tensor(sizes), h, distance="direct"), got, 1e-10)


def test_grouped_gradient_and_errors():
    sizes = [3, 3, 5]
    x = _data(11, 3, seed=8)
    a = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(grouped_log_kernel_sum(a, sizes, 0.03).square().sum(), a)
    b = x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(_loop(b, sizes, 0.03).square().sum(), b)
    _close(g, g_ref, 1e-9)
    assert torch.autograd.gradcheck(
        lambda q: grouped_log_kernel_sum(q, sizes, 0.3, tile_size=2), (x.requires_grad_(),)
    )
    with pytest.raises(ValueError, match="sum to the 11 rows of `x`, got a sum of 10"):
        grouped_log_kernel_sum(x.detach(), [5, 5])
    with pytest.raises(ValueError, match="non-negative"):
        grouped_log_kernel_sum(x.detach(), np.array([12, -1]))
