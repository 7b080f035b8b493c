"""Streaming references that do not fit the budget: row panels, column panels read once each.

A budget too small for the prepared references makes the sweeps keep a row panel of several
row tiles and read each column panel once per row panel. The counts of the host reads
(:meth:`Source.host_rows`, the one read of every array or memmap access) show
``ceil(n / row_panel)`` passes over the references, not one per row tile; the panels arrive in
the source's dtype; and the results match the resident sweep bit for bit (same tiles) and the
upstream reference values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quests_torch.kde import kernel_pass, log_kernel_sum
from quests_torch.kde.engine import Groups, Problem, Source, forward, named_kernel_pass, spans
from quests_torch.kde.sweeps import sweep_shifted
from quests_torch.metrics import delta_entropy, entropy

# prepared float64 references of 768 x 63 (399 KB) and 1536 x 63 do not fit half of this
# budget; it holds 32-column panels and row panels of a few 64-row tiles
STREAM = {"budget": 780_000, "tile_size": (64, 32)}
# the same column panels and row panels of one tile: the tile order of the plain tile loop.
# Compared bit for bit without centring: the centring mean is summed in budget-sized chunks
ONE_TILE = {"budget": 300_000, "tile_size": (64, 32), "centre": False}
STREAM_RAW = {**STREAM, "centre": False}
RESIDENT = {"tile_size": (64, 32)}  # the default budget: the references stay on the device


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs() / b.double().abs()).max().item()


@pytest.fixture
def reads(monkeypatch):
    """Every host read of an array source: ``(name, i0, i1, dtype of what it hands out)``."""
    log = []
    real = Source.host_rows

    def counting(self, i0, i1, out=None):
        block = real(self, i0, i1, out)
        log.append((self.name, i0, i1, block.dtype))
        return block

    monkeypatch.setattr(Source, "host_rows", counting)
    return log


def memmap(tmp_path, a: np.ndarray, name: str = "y") -> np.memmap:
    np.save(tmp_path / f"{name}.npy", a)
    return np.load(tmp_path / f"{name}.npy", mmap_mode="r")


def streamed(x, y, h=0.015, **extra) -> Problem:
    p = Problem(Source(x, "x"), Source(y, "y"), [h] if np.isscalar(h) else list(h), **STREAM)
    assert p.cols_resident is None  # the budget really is too small for the references
    return p


def column_reads(log, name="y"):
    return [(i0, i1) for who, i0, i1, _ in log if who == name]


def test_each_column_panel_is_read_once_per_row_panel(cu, tmp_path, reads):
    x, y = cu["liquid"].numpy(), memmap(tmp_path, cu["solid"].numpy())
    n, m = len(x), len(y)
    p = streamed(x, y)
    tiles, width = p.panel_sizes()
    row_panel = tiles * p.tm
    assert (p.tm, p.tn, width, tiles) == (64, 32, 32, 3)
    passes = math.ceil(n / row_panel)
    assert passes < math.ceil(n / p.tm)  # 4 passes here where the row tiles would make 12
    reads.clear()
    log_p = forward(p, None).log_p[:, 0]
    cols = column_reads(reads)
    assert cols == list(spans(0, m, width)) * passes  # each pass reads every column once
    assert sum(b - a for a, b in cols) == passes * m
    assert column_reads(reads, "x") == list(spans(0, n, p.tm))  # the query rows: once
    # each row meets the same tiles in the same order as in row panels of one tile (the plain
    # tile loop): the same bits; and the resident sweep to rounding
    one = Problem(Source(x, "x"), Source(y, "y"), [0.015], **{**ONE_TILE, "centre": True}, mu=p.mu)
    assert one.panel_sizes() == (1, width) and one.cols_resident is None
    assert torch.equal(log_p, forward(one, None).log_p[:, 0])
    assert rel(log_p, log_kernel_sum(x, cu["solid"], 0.015, **RESIDENT)) < 1e-12


def test_far_rows_and_backward_stream_by_panels(cu, tmp_path, reads):
    x, y = cu["liquid"], memmap(tmp_path, cu["solid"].numpy())
    p = streamed(x.numpy(), y)
    tiles, _ = p.panel_sizes()
    sub = p.subset_rows(torch.arange(0, 768, 2))  # 384 rows: 6 row tiles, 2 panels
    reads.clear()
    far = sweep_shifted(sub)
    passes = math.ceil(sub.n / (tiles * sub.tm))
    assert passes == 2 and sum(b - a for a, b in column_reads(reads)) == passes * p.m
    full = forward(p, None).log_p
    torch.testing.assert_close(far, full[::2], rtol=1e-13, atol=0)

    def value_and_grad(y_, options):
        xg = x.clone().requires_grad_()
        log_p = log_kernel_sum(xg, y_, [0.015, 0.03], **options)
        return log_p.detach(), torch.autograd.grad(log_p.sum(), xg)[0]

    reads.clear()
    value_and_grad(y, STREAM)
    rows_read = sum(b - a for a, b in column_reads(reads))
    # the NaN check and centring mean, the forward and the backward: each one pass, or
    # one per row panel
    assert rows_read == p.m + 2 * math.ceil(p.n / (tiles * p.tm)) * p.m
    for got, one in zip(value_and_grad(y, STREAM_RAW), value_and_grad(y, ONE_TILE), strict=True):
        assert torch.equal(got, one)
    for got, res in zip(
        value_and_grad(y, STREAM), value_and_grad(cu["solid"], RESIDENT), strict=True
    ):
        torch.testing.assert_close(got, res, rtol=1e-12, atol=1e-12 * res.abs().max().item())


def test_symmetric_sweep_reads_the_upper_columns_once_per_panel(cu, tmp_path, reads):
    y = memmap(tmp_path, cu["all"].numpy())
    src = Source(y, "y")
    p = Problem(src, src, [0.015], same=True, **STREAM)
    assert p.same and p.cols_resident is None and p.tm == p.tn == 64  # square tiles
    tiles, _ = p.panel_sizes()
    row_panel = tiles * p.tm
    reads.clear()
    got = log_kernel_sum(y, y, 0.015, **STREAM_RAW)  # y is y: the triangular sweep
    starts = range(0, len(y), row_panel)
    # the NaN check, the rows once per row tile, and for each panel its columns j >= its
    # first row
    expected = len(y) + len(y) + sum(len(y) - a for a in starts)
    assert sum(b - a for _, a, b, _ in reads) == expected
    assert len(starts) < math.ceil(len(y) / p.tm)
    assert torch.equal(got, log_kernel_sum(y, y, 0.015, **ONE_TILE))
    centred = log_kernel_sum(y, y, 0.015, **STREAM)
    assert rel(centred, log_kernel_sum(cu["all"], cu["all"], 0.015, **RESIDENT)) < 1e-12


def test_float32_memmap_is_read_as_float32(cu, tmp_path, reads):
    y32 = cu["solid"].numpy().astype(np.float32)
    mm = memmap(tmp_path, y32)
    x = cu["query"].numpy()
    reads.clear()
    got = log_kernel_sum(x, mm, 0.015, **STREAM)
    dtypes = {dt for who, _, _, dt in reads if who == "y"}
    assert dtypes == {torch.float32}  # 4 bytes a value cross to the device, not 8
    assert got.dtype == torch.float64  # computed in the promoted dtype, converted on the device
    # converting float32 to float64 is exact wherever it happens: the same bits
    assert torch.equal(got, log_kernel_sum(x, y32.astype(np.float64), 0.015, **STREAM))


@pytest.mark.parametrize(
    "options",
    [STREAM, {"budget": 600_000, "tile_size": 48}, {"budget": 700_000, "tile_size": (100, 64)}],
)
def test_metrics_match_the_tensor_and_the_reference_values(cu, ref, tmp_path, options):
    solid, liquid, both = cu["solid"], cu["liquid"], cu["all"]
    mm_solid, mm_all = memmap(tmp_path, solid.numpy()), memmap(tmp_path, both.numpy(), "all")

    h_all = entropy(both)
    assert rel(entropy(mm_all, **options), h_all) < 1e-12
    assert rel(entropy(mm_all, ref["h_vector"], **options), entropy(both, ref["h_vector"])) < 1e-12
    np.testing.assert_allclose(entropy(mm_all, **options).item(), ref["entropy_all"], rtol=1e-9)
    dh = delta_entropy(liquid, solid)
    assert rel(delta_entropy(liquid.numpy(), mm_solid, **options), dh) < 1e-12
    np.testing.assert_allclose(
        delta_entropy(liquid, mm_solid, **options).numpy(), ref["dh_liquid_solid"], rtol=1e-9
    )
    lw = torch.linspace(-3.0, 1.0, len(solid), dtype=torch.float64)
    for h in (0.015, [0.015, 0.03, 0.1]):
        expected = log_kernel_sum(cu["query"], solid, h, log_weights=lw)
        got = log_kernel_sum(cu["query"].numpy(), mm_solid, h, log_weights=lw, **options)
        assert rel(got, expected) < 1e-12
    np.testing.assert_allclose(
        log_kernel_sum(mm_all, mm_all, ref["h_vector"], **options).exp().numpy(),
        ref["kernel_sum_all_hvec"],
        rtol=1e-9,
    )


def test_top_n_and_groups_stream_to_the_same_answer(cu, tmp_path):
    mm = memmap(tmp_path, cu["solid"].numpy())
    res = kernel_pass(cu["query"].numpy(), mm, 0.015, n_nearest=4, **ONE_TILE)
    got = kernel_pass(cu["query"].numpy(), mm, 0.015, n_nearest=4, **STREAM_RAW)
    assert torch.equal(got.log_p, res.log_p) and torch.equal(got.nearest_index, res.nearest_index)
    assert torch.equal(got.nearest_sq_dist, res.nearest_sq_dist)
    exact = kernel_pass(cu["query"], cu["solid"], 0.015, n_nearest=4)
    centred = kernel_pass(cu["query"].numpy(), mm, 0.015, n_nearest=4, **STREAM)
    assert torch.equal(centred.nearest_index, exact.nearest_index)
    assert rel(centred.log_p, exact.log_p) < 1e-12
    # squared distances from the GEMM: absolute rounding ~eps times the squared spread
    torch.testing.assert_close(centred.nearest_sq_dist, exact.nearest_sq_dist, rtol=0, atol=1e-15)
    # uneven groups: their column ranges start anywhere, so a panel edge may cut a tile
    sizes = np.array([50, 170, 130, 200, 118, 100])
    ends = np.cumsum(sizes)
    label = torch.from_numpy(np.repeat(np.arange(len(sizes)), sizes))
    groups = Groups(label, label, np.repeat(ends - sizes, sizes), np.repeat(ends, sizes))
    for h in (0.015, [0.015, 0.05]):
        expected = named_kernel_pass(cu["solid"], cu["solid"], h, groups=groups).log_p
        streamed_sums = named_kernel_pass(mm, mm, h, groups=groups, **STREAM).log_p
        torch.testing.assert_close(streamed_sums, expected, rtol=1e-12, atol=0)
        # each row against its own group only, from the definition
        i = 400  # in the fourth group, rows 350:550
        d2 = (cu["solid"][350:550] - cu["solid"][i]).square().sum(1)
        hh = torch.tensor(h, dtype=torch.float64).reshape(-1)
        brute = torch.logsumexp(-d2[:, None] / (2 * hh**2), 0)
        torch.testing.assert_close(streamed_sums[i].reshape(-1), brute, rtol=1e-12, atol=0)


def test_first_match_within_streams_the_earlier_rows_by_panels(cu, tmp_path, reads):
    from quests_torch.kde import first_match_within

    x = cu["all"].numpy().copy()
    x[1000:1010] = x[100:110]  # duplicates of earlier rows
    mm = memmap(tmp_path, x)
    src = Source(mm, "x")
    tiles, _ = Problem(src, src, [1.0], dtype=torch.float64, **STREAM).panel_sizes()
    reads.clear()
    got = first_match_within(mm, tol=1e-6, **STREAM)
    assert torch.equal(got, first_match_within(torch.from_numpy(x), tol=1e-6))
    assert got[1000:1010].tolist() == list(range(100, 110)) and (got[:1000] == -1).all()
    # the NaN check, the rows once, and for each panel the columns before its last row
    ends = [b for _, b in spans(0, len(x), tiles * 64)]
    assert sum(b - a for _, a, b, _ in reads) == 2 * len(x) + sum(ends)
