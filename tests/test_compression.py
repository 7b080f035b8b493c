"""Dataset compression and active-learning analytics against upstream ``quests``.

Reference data: ``tests/data/generate_compression_reference.py`` (quests 2026.2.22): 40
thermal EMT Cu structures of 31-32 atoms at 300-1500 K, 6 more at 300 K as the prior
dataset of ``msc_conditional``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase.io import read
from conftest import DATA, load_reference

from quests_torch import get_descriptors
from quests_torch.compression import (
    METHODS,
    compress,
    compress_structures,
    generation_report,
    selection_summary,
)
from quests_torch.kde import RunningLogKernelSum, log_kernel_sum
from quests_torch.metrics import diversity, entropy, novelty, overlap


@pytest.fixture(scope="module")
def reference():
    return load_reference("compression")


@pytest.fixture(scope="module")
def frames(reference):
    allf = read(DATA / "compression_structures.extxyz", ":")
    n = int(reference["n_dataset"])
    return allf[:n], allf[n:]


@pytest.fixture(scope="module")
def data(frames):
    dataset, prior = frames
    x = get_descriptors(dataset)
    counts = torch.tensor([len(a) for a in dataset])
    sid = torch.repeat_interleave(torch.arange(len(dataset)), counts)
    return x, sid, get_descriptors(prior)


def _prefix_descriptors(x, sid, indices):
    return torch.cat([x[sid == int(i)] for i in indices])


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("method", ["msc", "msc_conditional", "fps"])
def test_selection_order_matches_upstream(data, reference, method, device):
    x, sid, prior = data
    ref = prior.to(device) if method == "msc_conditional" else None
    res = compress(x.to(device), sid.to(device), 1.0, method, reference=ref, curve=False)
    assert res.indices.tolist() == reference[f"order_{method}"].tolist()


def test_structure_entropies_match_upstream(data, reference):
    x, sid, _ = data
    res = compress(x, sid, 1, "msc", curve=False)
    np.testing.assert_allclose(
        res.structure_entropy.numpy(), reference["entropy_per_structure"], rtol=1e-9
    )


def test_selection_summary_matches_upstream(data, reference):
    x, sid, _ = data
    m = int(reference["summary_size"])
    # upstream counts an environment as covered when dH < 1e-5
    below = float(np.nextafter(1e-5, 0.0))
    s = selection_summary(x, sid, reference["order_msc"][:m], threshold=below)
    assert s["entropy"] == pytest.approx(float(reference["summary_entropy"]), rel=1e-10)
    assert s["diversity"] == pytest.approx(float(reference["summary_diversity"]), rel=1e-10)
    assert s["overlap"] == float(reference["summary_overlap_1e-5"])
    assert s["compressed_envs"] == int(reference["summary_compressed_envs"])
    assert s["original_envs"] == int(reference["summary_original_envs"])
    assert (s["original_size"], s["compressed_size"]) == (40, m)


# ------------------------------------------------------------------------------ curve


@pytest.mark.parametrize("method", METHODS)
def test_curve_matches_direct_metrics(data, method):
    x, sid, prior = data
    ref = prior if method == "msc_conditional" else None
    res = compress(x, sid, 10, method, reference=ref, generator=7)
    curve = res.curve
    assert curve.n_structures.tolist() == list(range(1, 11))
    for m in (1, 4, 10):
        xs = _prefix_descriptors(x, sid, res.indices[:m])
        assert int(curve.n_environments[m - 1]) == xs.shape[0]
        assert float(curve.entropy[m - 1]) == pytest.approx(float(entropy(xs)), rel=1e-12)
        assert float(curve.diversity[m - 1]) == pytest.approx(float(diversity(xs)), rel=1e-12)
        n = x.shape[0]  # same covered count (the two means round differently)
        assert round(float(curve.overlap[m - 1]) * n) == round(float(overlap(x, xs)) * n)
    summary = res.summary()
    direct = selection_summary(x, sid, res.indices)
    for key in ("entropy", "diversity"):
        assert summary[key] == pytest.approx(direct[key], rel=1e-12)
    assert summary["overlap"] == pytest.approx(direct["overlap"], abs=1e-15)
    for key in ("original_size", "compressed_size", "original_envs", "compressed_envs"):
        assert summary[key] == direct[key]


def test_msc_beats_random_on_entropy_and_diversity(data):
    x, sid, _ = data
    msc = compress(x, sid, 8, "msc").summary()
    rnd = [compress(x, sid, 8, "random", generator=s).summary() for s in range(5)]
    assert msc["entropy"] > max(r["entropy"] for r in rnd)
    assert msc["diversity"] > max(r["diversity"] for r in rnd)


# ------------------------------------------------------------------------------ invariants


@pytest.mark.parametrize("method", METHODS)
def test_full_compression_returns_every_structure_once(data, method):
    x, sid, prior = data
    ref = prior if method == "msc_conditional" else None
    res = compress(x, sid, 1.0, method, reference=ref, generator=0, curve=False)
    assert sorted(res.indices.tolist()) == list(range(40))


@pytest.mark.parametrize("method", ["random", "k_means"])
def test_seeded_methods_are_deterministic(data, method):
    x, sid, _ = data
    a = compress(x, sid, 9, method, generator=3, curve=False).indices
    b = compress(x, sid, 9, method, generator=3, curve=False).indices
    assert torch.equal(a, b)
    assert len(set(a.tolist())) == 9
    others = {
        tuple(compress(x, sid, 9, method, generator=s, curve=False).indices.tolist())
        for s in range(4, 8)
    }
    assert len(others) > 1


def test_fraction_rounds_up_like_upstream(data):
    x, sid, _ = data
    assert compress(x, sid, 0.3, "msc", curve=False).indices.numel() == 12
    assert compress(x, sid, 0.01, "msc", curve=False).indices.numel() == 1
    assert compress(x, sid, 0.25, "fps", curve=False).indices.numel() == 10


def test_result_does_not_depend_on_tiles_or_input_order(data):
    x, sid, _ = data
    base = compress(x, sid, 12, "msc")
    small = compress(x, sid, 12, "msc", budget=200_000)
    assert torch.equal(base.indices, small.indices)
    torch.testing.assert_close(small.curve.entropy, base.curve.entropy, rtol=1e-13, atol=0)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    shuffled = compress(x[perm], sid[perm], 12, "msc")
    assert torch.equal(base.indices, shuffled.indices)
    torch.testing.assert_close(shuffled.curve.diversity, base.curve.diversity, rtol=1e-12, atol=0)


def test_list_input_and_structures_api(data, frames):
    x, sid, _ = data
    parts = [x[sid == s] for s in range(40)]
    a = compress(parts, size=7, method="fps", curve=False)
    b = compress(x, sid, 7, "fps", curve=False)
    assert torch.equal(a.indices, b.indices)
    c = compress_structures(frames[0], 7, "msc_conditional", reference=frames[1], curve=False)
    ref = compress(x, sid, 7, "msc_conditional", reference=data[2], curve=False)
    assert torch.equal(c.indices, ref.indices)


def test_float32_close_to_float64(data):
    x, sid, _ = data
    a = compress(x, sid, 10, "msc")
    b = compress(x.float(), sid, 10, "msc")
    assert a.indices[:5].tolist() == b.indices[:5].tolist()
    torch.testing.assert_close(b.curve.entropy, a.curve.entropy, rtol=1e-5, atol=0)


def test_empty_reference_falls_back_to_msc(data):
    x, sid, _ = data
    a = compress(x, sid, 6, "msc_conditional", reference=x[:0], curve=False)
    b = compress(x, sid, 6, "msc", curve=False)
    assert torch.equal(a.indices, b.indices)


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("size", "exc", "match"),
    [
        (0, ValueError, "between 1 and 40"),
        (41, ValueError, "between 1 and 40"),
        (0.0, ValueError, r"fraction must be in \(0, 1\]"),
        (1.5, ValueError, r"fraction must be in \(0, 1\]"),
        (True, TypeError, "`size`"),
        ("10", TypeError, "`size`"),
    ],
)
def test_size_out_of_range(data, size, exc, match):
    x, sid, _ = data
    with pytest.raises(exc, match=match):
        compress(x, sid, size, "msc")


def test_bad_inputs(data):
    x, sid, prior = data
    with pytest.raises(ValueError, match="`x` is empty"):
        compress(x[:0], sid[:0], 1)
    with pytest.raises(ValueError, match="`x` is empty: no structures"):
        compress([], size=1)
    with pytest.raises(ValueError, match="`method` must be one of"):
        compress(x, sid, 3, "kmeans")
    with pytest.raises(ValueError, match="needs a `reference`"):
        compress(x, sid, 3, "msc_conditional")
    with pytest.raises(ValueError, match="'msc_conditional' only"):
        compress(x, sid, 3, "msc", reference=prior)
    with pytest.raises(ValueError, match="descriptor width 61 but `x` has 63"):
        compress(x, sid, 3, "msc_conditional", reference=prior[:, :61])
    with pytest.raises(ValueError, match="structure 3 has no environments"):
        compress(x, torch.where(sid == 3, 40, sid), 3)
    with pytest.raises(ValueError, match="`system_idx` must have shape"):
        compress(x, sid[:-1], 3)
    bad = x.clone()
    bad[5, 2] = math.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        compress(bad, sid, 3)
    with pytest.raises(ValueError, match="`selected` repeats"):
        selection_summary(x, sid, [1, 1])


# ------------------------------------------------------------------------------ generations


def test_generation_report_matches_direct_metrics(data):
    x, sid, _ = data
    gen = sid // 10  # the four temperatures as four generations
    rep = generation_report(x, gen, labels=["300K", "700K", "1100K", "1500K"])
    assert rep.labels == ["300K", "700K", "1100K", "1500K"]
    for g in range(4):
        cum = x[gen <= g]
        assert int(rep.cumulative_environments[g]) == cum.shape[0]
        assert float(rep.entropy[g]) == pytest.approx(float(entropy(cum)), rel=1e-12)
        assert float(rep.diversity[g]) == pytest.approx(float(diversity(cum)), rel=1e-12)
        if g == 0:
            assert math.isnan(float(rep.novelty[0])) and rep.rows()[0]["novelty"] is None
        else:
            new, prev = x[gen == g], x[gen < g]
            assert float(rep.novelty[g]) == float(novelty(new, prev))
            dh = -log_kernel_sum(new, prev)
            assert float(rep.max_dh[g]) == pytest.approx(float(dh.max()), rel=1e-12)
    # hotter generations are more novel than a repeat of the first temperature
    assert float(rep.novelty[3]) > 0.5
    parts = [x[gen == g] for g in range(4)]
    again = generation_report(parts, None)
    torch.testing.assert_close(again.entropy, rep.entropy, rtol=1e-14, atol=0)


# ------------------------------------------------------------------------------ engine


def test_running_log_kernel_sum_equals_one_pass(data):
    x, _, prior = data
    run = RunningLogKernelSum(x, 0.015, budget=20_000)
    blocks = [prior[:40], x[100:164], x[:1]]
    for b in blocks:
        run.add(b)
    full = log_kernel_sum(x, torch.cat(blocks))
    torch.testing.assert_close(run.log_k, full, rtol=1e-12, atol=0)
    far = prior + 10.0  # every kernel underflows: the log stays finite
    assert torch.isfinite(RunningLogKernelSum(x, 0.015).log_sum(far)).all()
    r32 = RunningLogKernelSum(x.float(), 0.015)
    r32.add(prior.float())
    torch.testing.assert_close(r32.log_k, log_kernel_sum(x, prior), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------ resume


class _Stop(Exception):
    pass


@pytest.mark.parametrize("method", ["msc", "msc_conditional", "fps"])
def test_checkpoint_resumes_to_the_uninterrupted_result(data, tmp_path, method):
    x, sid, prior = data
    ref = prior if method == "msc_conditional" else None
    want = compress(x, sid, 14, method, reference=ref)
    path = tmp_path / f"{method}.ckpt"

    def stop_after_5(done, total):
        if done == 5:
            raise _Stop

    with pytest.raises(_Stop):
        compress(x, sid, 14, method, reference=ref, checkpoint=path, progress=stop_after_5)
    assert path.exists()  # the completed steps were saved on the way out
    seen = []
    got = compress(
        x, sid, 14, method, reference=ref, checkpoint=path, progress=lambda d, t: seen.append(d)
    )
    assert seen[0] == 5 and seen[-1] == 14  # resumed, not restarted
    assert torch.equal(got.indices, want.indices)
    for name in ("entropy", "diversity", "overlap", "n_environments"):
        torch.testing.assert_close(
            getattr(got.curve, name), getattr(want.curve, name), rtol=0, atol=0
        )


def test_checkpoint_extends_and_answers_prefixes(data, tmp_path):
    x, sid, _ = data
    path = tmp_path / "msc.ckpt"
    compress(x, sid, 6, "msc", checkpoint=path, checkpoint_every=0.0)
    longer = compress(x, sid, 12, "msc", checkpoint=path)
    assert torch.equal(longer.indices, compress(x, sid, 12, "msc").indices)
    shorter = compress(x, sid, 4, "msc", checkpoint=path)
    assert torch.equal(shorter.indices, longer.indices[:4])
    assert shorter.curve.entropy.numel() == 4
    with pytest.raises(ValueError, match="written for other data or parameters"):
        compress(x, sid, 12, "msc", h=0.02, checkpoint=path)
    with pytest.raises(ValueError, match="written for other data or parameters"):
        compress(x[:-31], sid[:-31], 12, "msc", checkpoint=path)
    with pytest.raises(ValueError, match="applies to msc, msc_conditional and fps"):
        compress(x, sid, 3, "random", checkpoint=tmp_path / "r.ckpt")


def test_fraction_ignores_floating_point_noise(data):
    x, sid, _ = data
    first = sid < 25  # 25 structures; 25 * 0.28 = 7.000000000000001 in floating point
    assert 25 * 0.28 > 7
    assert compress(x[first], sid[first], 0.28, "msc", curve=False).indices.numel() == 7


def test_unreadable_checkpoint_is_refused_and_kept(data, tmp_path):
    x, sid, _ = data
    path = tmp_path / "bad.ckpt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is not a compression checkpoint"):
        compress(x, sid, 3, "msc", checkpoint=path)
    assert path.read_text() == "not a checkpoint"  # never overwritten


def test_generation_report_and_running_sum_errors(data):
    x, sid, _ = data
    gen = sid // 10
    with pytest.raises(ValueError, match="`labels` has 2 entries for 4 generations"):
        generation_report(x, gen, labels=["a", "b"])
    with pytest.raises(ValueError, match="single bandwidth"):
        generation_report(x, gen, h=[0.01, 0.02])
    with pytest.raises(ValueError, match="`h` must be positive"):
        generation_report(x, gen, h=-1.0)
    bad = x.clone()
    bad[0, 0] = math.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        generation_report(bad, gen)
    with pytest.raises(ValueError, match="`x` is empty"):
        generation_report(x[:0], gen[:0])
    with pytest.raises(ValueError, match="generation 1 has no environments"):
        generation_report(x[gen != 1], torch.where(gen[gen != 1] > 1, gen[gen != 1], 0))
    run = RunningLogKernelSum(x, 0.015)
    with pytest.raises(ValueError, match=r"`y` must be \[m, 63\]"):
        run.add(x[:, :10])
    with pytest.raises(TypeError, match=r"`x` must be a torch\.Tensor"):
        RunningLogKernelSum(x.numpy(), 0.015)
    with pytest.raises(ValueError, match="NaN or infinite"):
        RunningLogKernelSum(bad, 0.015)
