"""CUDA-path fixes that a CPU can check (issue 19): device names, precision flags set through
either torch API, deterministic per-structure reductions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from quests_torch import kde
from quests_torch.kde import full_precision, log_kernel_sum
from quests_torch.structures import canonical_device, resolve_device, segment_sum
from quests_torch.uncertainty import per_structure_summary


# ------------------------------------------------------------------ device names
def test_canonical_device_fills_the_cuda_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert canonical_device("cuda") == torch.device("cuda", 3)
    assert canonical_device(torch.device("cuda")) == torch.device("cuda:3")
    assert canonical_device("cuda:1") == torch.device("cuda:1")  # an explicit index is kept
    assert canonical_device("cpu") == torch.device("cpu")
    assert canonical_device("mps") == torch.device("mps:0")
    # what tensors report compares equal to the normalised name, not to the bare one
    assert torch.device("cuda") != torch.device("cuda:3")


def test_canonical_device_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    assert canonical_device("cuda") == torch.device("cuda:0")
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_compute_device_accepts_a_bare_cuda_name_for_cuda_inputs(monkeypatch):
    """The comparison that raised for `device="cuda"` on cuda:0 tensors, checked without a GPU."""

    class FakeSource:
        name = "x"
        device = torch.device("cuda:0")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert kde.engine.compute_device([FakeSource()], "cuda") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="inputs live on cuda:0"):
        kde.engine.compute_device([FakeSource()], "cuda:1")


# ------------------------------------------------------------------ precision flags
@pytest.fixture
def restore_all_flags():
    """Full precision again afterwards, set through the legacy API: torch then reads the flags
    through either API (setting them through the new one would make the legacy getters of
    the next test raise)."""
    yield
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False


def _ieee_matmul_inside() -> bool:
    a = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    exact = (a.double() @ a.double()).float()
    return bool((a @ a - exact).abs().max() < 1e-4)


@pytest.mark.parametrize(
    "set_flags",
    [
        pytest.param(lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True), id="allow"),
        pytest.param(lambda: torch.set_float32_matmul_precision("high"), id="precision-high"),
        pytest.param(lambda: torch.set_float32_matmul_precision("medium"), id="precision-medium"),
    ],
)
def test_full_precision_with_legacy_api_caller(set_flags, restore_all_flags):
    """A caller of the legacy API can read its flags inside the block and gets them back."""
    set_flags()
    before = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    with full_precision():
        # used to raise "you have used mix of the legacy and new APIs"
        assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.get_float32_matmul_precision() == "highest"
        assert _ieee_matmul_inside()
    assert (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()) == before


def test_full_precision_with_new_api_caller(restore_all_flags):
    if not hasattr(torch.backends.mkldnn.matmul, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    with full_precision():
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        assert _ieee_matmul_inside()
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"


def test_full_precision_leaves_default_flags_untouched(restore_all_flags):
    if not hasattr(torch.backends.mkldnn.matmul, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    before = torch.backends.mkldnn.matmul.fp32_precision
    with full_precision():
        assert torch.backends.mkldnn.matmul.fp32_precision == before
        assert _ieee_matmul_inside()
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_kernel_sums_under_legacy_tf32_flags(cu, restore_all_flags):
    x = cu["all"][:400].float()
    clean = log_kernel_sum(x, x)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("medium")
    assert torch.equal(log_kernel_sum(x, x), clean)
    assert torch.get_float32_matmul_precision() == "medium"


# ------------------------------------------------------------------ deterministic sums
def test_segment_sum_matches_index_add_and_is_order_independent():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(1000, 3, dtype=torch.float64, generator=g)
    index = torch.randint(0, 17, (1000,), generator=g)
    index[index == 5] = 6  # an empty segment
    ref = torch.zeros(17, 3, dtype=torch.float64).index_add_(0, index, values)
    out = segment_sum(values, index, 17)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    assert torch.equal(out[5], torch.zeros(3, dtype=torch.float64))
    # sorted input: the same bits as the unsorted call (each segment summed in row order)
    order = torch.sort(index, stable=True).indices
    assert torch.equal(segment_sum(values[order], index[order], 17, is_sorted=True), out)


def test_segment_sum_is_differentiable():
    values = torch.randn(20, dtype=torch.float64, requires_grad=True)
    index = torch.arange(20) // 7
    torch.autograd.gradcheck(lambda v: segment_sum(v, index, 3, is_sorted=True), (values,))


def test_per_structure_summary_with_unsorted_index():
    g = torch.Generator().manual_seed(2)
    dh = torch.randn(300, dtype=torch.float64, generator=g)
    idx = torch.randint(0, 9, (300,), generator=g)
    s = per_structure_summary(dh, idx, 9, threshold=0.5)
    for i in range(9):
        sel = dh[idx == i]
        assert s.max_dH[i] == sel.max()
        assert torch.isclose(s.mean_dH[i], sel.mean(), rtol=0, atol=1e-14)
        assert s.fraction_above[i] == (sel > 0.5).double().mean()


def test_screening_summaries_under_deterministic_algorithms():
    """bincount with float weights raises on CUDA in deterministic mode: counted without them."""
    from ase.build import bulk

    from quests_torch import get_descriptors, screen_frames

    ref_atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    ref = get_descriptors(ref_atoms)
    hot = ref_atoms.copy()
    hot.rattle(0.3, seed=1)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        rows = list(screen_frames([ref_atoms, hot, ref_atoms], ref))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(rows) == 3
    for r in rows:
        assert r.novel_fraction == pytest.approx(float((r.dh > 0).double().mean()), abs=1e-15)
        assert r.dH_mean == pytest.approx(float(r.dh.mean()), abs=1e-12)
    assert rows[0].novel_fraction == 0.0 and rows[1].novel_fraction > 0.5


def test_k_means_representatives_do_not_depend_on_rounding():
    """A 2-structure cluster's members are equidistant from its centroid: the tie must not be
    broken by rounding, which differs between CPU and CUDA (seen on an H200: [2, 0, 6] there,
    [2, 0, 1] here). Rounding-sized perturbations stand in for the other device."""
    from conftest import rattled_fcc

    from quests_torch import compress, get_descriptors

    rng = np.random.default_rng(0)
    cells = []
    for i in range(6):
        atoms = rattled_fcc((2, 2, 2), stdev=float(rng.uniform(0.02, 0.25)), seed=i)
        atoms.set_cell(atoms.cell * rng.uniform(0.97, 1.05), scale_atoms=True)
        cells.append(atoms)
    cells.append(rattled_fcc((3, 3, 3), seed=5))
    x = get_descriptors(cells)
    sid = torch.repeat_interleave(torch.arange(7), torch.tensor([len(c) for c in cells]))
    base = compress(x, sid, size=3, method="k_means", generator=0, curve=False).indices.tolist()
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        noisy = x + 1e-13 * torch.randn(x.shape, generator=g, dtype=x.dtype)
        got = compress(noisy, sid, size=3, method="k_means", generator=0, curve=False)
        assert got.indices.tolist() == base


# ------------------------------------------------------------------ TF32 reach
class _ReducedPrecisionMatmuls(TorchDispatchMode):
    """Records every float32 matrix product that runs while the flags allow TF32/bf16."""

    OPS = ("mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "dot", "mv")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.OPS and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args
        ):
            flags = (torch.backends.cuda.matmul.fp32_precision,)
            flags += (torch.backends.mkldnn.matmul.fp32_precision,)
            if any(f not in ("ieee", "none") for f in flags):
                self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(
    not hasattr(torch.backends.mkldnn.matmul, "fp32_precision"), reason="needs fp32_precision"
)
@pytest.mark.parametrize("search", ["grid", "pairs"])
def test_no_float32_matmul_escapes_full_precision(search, restore_all_flags):
    """TF32 must not reach the neighbour search, the cluster search or the backward of the
    periodic-image term (float32 frames under TF32 got 0.01-0.05 Å distance errors)."""
    from conftest import rattled_fcc

    from quests_torch import descriptors_from_tensors, largest_cluster
    from quests_torch.structures import AtomsBatch

    batch = AtomsBatch.from_ase(rattled_fcc((3, 3, 3), seed=3), dtype=torch.float32)
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    pos = batch.positions.clone().requires_grad_(True)
    cell = batch.cell.clone().requires_grad_(True)
    with _ReducedPrecisionMatmuls() as watch:
        x = descriptors_from_tensors(pos, cell, batch.pbc, search=search)
        x.square().sum().backward()
        small = AtomsBatch.from_ase(rattled_fcc((2, 2, 2), seed=4), dtype=torch.float32)
        mask = torch.ones(small.positions.shape[0], dtype=torch.bool)  # dense pair search
        largest_cluster(small.positions, small.cell, small.pbc, small.system_idx, mask)
    assert watch.seen == []
    assert cell.grad is not None and torch.isfinite(cell.grad).all()


# ------------------------------------------------------------------ screening prefetch
def test_prefetch_reads_ahead_in_order_and_stops_with_the_consumer():
    import threading

    from quests_torch.screen_io import prefetched as _prefetched

    read: list[int] = []
    consumer_has: list[int] = []
    second_read = threading.Event()

    def source():
        for i in range(100):
            read.append(i)
            if i == 1:
                second_read.set()
            yield [i]

    it = _prefetched(source())
    first = next(it)
    consumer_has.append(first[0])
    # the reader fetches the next batch while the consumer still holds the first one
    assert second_read.wait(5.0)
    assert [next(it)[0] for _ in range(3)] == [1, 2, 3]
    it.close()  # an early exit ends the reader: it stops within a batch or two
    assert len(read) <= 7


def test_prefetch_reraises_reader_errors_in_the_consumer():
    from quests_torch.screen_io import prefetched as _prefetched

    def source():
        yield [0]
        raise ValueError("frame 1: bad")

    it = _prefetched(source())
    assert next(it) == [0]
    with pytest.raises(ValueError, match="frame 1: bad"):
        next(it)


def test_screening_errors_still_name_the_frame_with_prefetch(tmp_path):
    from ase.build import bulk
    from ase.io import write

    from quests_torch import get_descriptors, screen_trajectory

    good = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    bad = good.copy()
    bad.positions[1] = bad.positions[0]  # coincident atoms
    traj = tmp_path / "t.extxyz"
    write(traj, [good, good, bad, good])
    with pytest.raises(ValueError, match="frame 2"):
        screen_trajectory(traj, get_descriptors(good), table=tmp_path / "t.csv", batch_atoms=32)


def test_segment_sum_refuses_an_index_beyond_the_segments():
    with pytest.raises(ValueError, match="`index` holds values >= `n_segments` \\(2\\)"):
        segment_sum(torch.ones(3), torch.tensor([0, 5, 1]), 2)


def test_float64_is_fast_names_a_bad_device():
    from quests_torch import float64_is_fast

    with pytest.raises(ValueError, match="`device` is not a torch device: 'banana'"):
        float64_is_fast("banana")
