"""The descriptor store: streamed writing, resume, refusals, memory-mapped tile-wise reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc

import ase.io
import numpy as np
import pytest
import torch
from conftest import rattled_fcc

import quests_torch as qt
from quests_torch import store_writer
from quests_torch.cli.app import main
from quests_torch.io import is_descriptor_file, load_descriptors
from quests_torch.kde.source import Source
from quests_torch.store import HEADER_BYTES, StoreInUseError


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    """A trajectory of 10 frames of two sizes, and the frames as read back (extxyz rounds)."""
    d = tmp_path_factory.mktemp("store")
    frames = [rattled_fcc((2, 2, 2) if i % 3 else (2, 2, 3), stdev=0.05, seed=i) for i in range(10)]
    path = d / "traj.extxyz"
    ase.io.write(path, frames, format="extxyz")
    return path, ase.io.read(path, ":")


def per_batch(frames, batch_atoms, **kw):
    """Descriptors computed batch by batch as the writer batches them."""
    parts = [qt.get_descriptors(b, **kw) for b in store_writer.batches_of(frames, batch_atoms)]
    return torch.cat(parts)


def files_of(path):
    return {name: (path / name).read_bytes() for name in ("descriptors.npy", "n_atoms.npy")}


def test_round_trip_float64_is_bit_equal(traj, tmp_path):
    path, frames = traj
    one = qt.write_descriptor_store(path, tmp_path / "one.qstore", dtype=torch.float64)
    assert torch.equal(torch.from_numpy(np.array(one.x)), qt.get_descriptors(frames))
    small = qt.write_descriptor_store(
        path, tmp_path / "small.qstore", dtype=torch.float64, batch_atoms=70
    )
    assert torch.equal(torch.from_numpy(np.array(small.x)), per_batch(frames, 70))
    assert small.n_atoms.tolist() == [len(a) for a in frames]
    assert (small.k, small.cutoff, small.dtype, small.species) == (32, 5.0, "float64", ("Cu",))
    assert len(small) == sum(len(a) for a in frames) and small.shape == (len(small), 63)
    assert small.version == qt.__version__ and small.source["index"] == ":"
    assert small.source["key"].startswith(f"{path.stat().st_size}:")
    assert isinstance(small.x, np.memmap) and not small.x.flags.writeable
    plain = np.load(tmp_path / "small.qstore" / "descriptors.npy", mmap_mode="r")
    assert isinstance(plain, np.memmap) and np.array_equal(plain, small.x)
    assert np.array_equal(np.load(tmp_path / "small.qstore" / "n_atoms.npy"), small.n_atoms)
    assert np.array_equal(qt.open_store(tmp_path / "small.qstore").x, small.x)


def test_float32_store_is_the_rounded_float64(traj, tmp_path):
    path, frames = traj
    s = qt.write_descriptor_store(path, tmp_path / "f32.qstore", batch_atoms=70)
    assert s.dtype == "float32" and s.x.dtype == np.float32
    assert np.array_equal(s.x, per_batch(frames, 70).numpy().astype(np.float32))
    data = (tmp_path / "f32.qstore" / "descriptors.npy").stat().st_size - HEADER_BYTES
    assert data == len(s) * 63 * 4


def test_multicomponent_needs_species_and_round_trips(traj, tmp_path):
    path, frames = traj
    with pytest.raises(ValueError, match="`species` is required"):
        qt.write_descriptor_store(path, tmp_path / "m.qstore", multicomponent=True)
    s = qt.write_descriptor_store(
        path, tmp_path / "m.qstore", species=["Cu", "Ni"], dtype=torch.float64, batch_atoms=70
    )
    assert s.multicomponent and s.species == ("Cu", "Ni") and s.shape[1] == 3 * 63
    assert torch.equal(torch.from_numpy(np.array(s.x)), per_batch(frames, 70, species=["Cu", "Ni"]))


@pytest.fixture(scope="module")
def cu_stores(cu, tmp_path_factory):
    """Thermal Cu (300 K + 1500 K) as float64 and float32 stores, written by the writer."""
    d = tmp_path_factory.mktemp("cu")
    x = cu["all"].numpy()
    out = {}
    for dt in ("float64", "float32"):
        with qt.StoreWriter(d / f"{dt}.qstore", k=32, cutoff=5.0, dtype=dt) as w:
            for i in range(0, len(x), 500):  # structures of 500 rows (the last one shorter)
                w.append(x[i : i + 500], [len(x[i : i + 500])])
                w.commit()
            out[dt] = w.complete()
    return out


def test_metrics_on_the_store_equal_the_tensor(cu, cu_stores):
    s, x = cu_stores["float64"], cu["all"]
    q = cu["query"]
    assert float(qt.entropy(s)) == pytest.approx(float(qt.entropy(x)), rel=1e-13)
    assert float(qt.diversity(s)) == pytest.approx(float(qt.diversity(x)), rel=1e-13)
    torch.testing.assert_close(qt.delta_entropy(q, s), qt.delta_entropy(q, x), rtol=1e-13, atol=0)
    torch.testing.assert_close(qt.delta_entropy(s, q), qt.delta_entropy(x, q), rtol=1e-13, atol=0)
    assert float(qt.overlap(q, s)) == float(qt.overlap(q, x))
    e_s = qt.estimate_entropy(s, rows=100, generator=torch.Generator().manual_seed(3))
    e_x = qt.estimate_entropy(x, rows=100, generator=torch.Generator().manual_seed(3))
    assert e_s.value == pytest.approx(e_x.value, rel=1e-13) and e_s.n == len(s)
    summary = qt.dataset_summary(s)
    assert float(summary.entropy) == pytest.approx(float(qt.entropy(x)), rel=1e-13)


def test_float32_storage_costs_little_and_is_read_in_float64(cu, cu_stores):
    """The documented precision of float32 storage: thermal Cu, H and dH (liquid vs solid)."""
    s32, s64 = cu_stores["float32"], cu_stores["float64"]
    x32 = torch.from_numpy(np.array(s32.x))
    h32, h64 = qt.entropy(s32), qt.entropy(s64)
    assert h32.dtype == torch.float64  # tiles reach the kernels as float64
    assert float(h32) == pytest.approx(float(qt.entropy(x32.double())), rel=1e-13)
    assert abs(float(h32 - h64)) / float(h64) < 1e-8  # measured 1.9e-9
    n_solid = len(cu["solid"])
    dh32 = qt.delta_entropy(cu["liquid"], s32[:n_solid])
    dh64 = qt.delta_entropy(cu["liquid"], s64[:n_solid])
    assert float(((dh32 - dh64).abs() / dh64.abs()).max()) < 2e-6  # measured 4.0e-7
    h_f32 = qt.entropy(s32.as_dtype(torch.float32))  # float32 tiles when asked
    assert h_f32.dtype == torch.float32


def _interrupt_after(monkeypatch, frames: int):
    real = store_writer.frames_after

    def failing(trajectory, index, done, **kw):
        for i, atoms in enumerate(real(trajectory, index, done, **kw)):
            if i == frames:
                raise RuntimeError("interrupted")
            yield atoms

    monkeypatch.setattr(store_writer, "frames_after", failing)


def _interrupted_write(path, out, frames: int) -> None:
    """Write ``path`` into the store ``out``, stopped by an error after ``frames`` frames."""
    with pytest.MonkeyPatch.context() as m:
        _interrupt_after(m, frames)
        with pytest.raises(RuntimeError, match="interrupted"):
            qt.write_descriptor_store(path, out, batch_atoms=70)


def test_an_interrupted_write_resumes_bit_identically(traj, tmp_path, monkeypatch):
    path, _ = traj
    whole = qt.write_descriptor_store(path, tmp_path / "whole.qstore", batch_atoms=70)
    out = tmp_path / "cut.qstore"
    _interrupted_write(path, out, 5)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] is False and 0 < meta["frames"] < 10
    with pytest.raises(ValueError, match="incomplete descriptor store"):
        qt.open_store(out)
    with pytest.raises(ValueError, match="pickled"):  # the .npy magic is not there yet
        np.load(out / "descriptors.npy", mmap_mode="r")
    with open(out / "descriptors.npy", "ab") as fh:  # rows appended, never committed
        fh.write(b"\x01" * 1000)
    with monkeypatch.context() as m:
        seen = []
        real = store_writer.frames_after
        m.setattr(
            store_writer,
            "frames_after",
            lambda t, i, done, **kw: seen.append(done) or real(t, i, done, **kw),
        )
        resumed = qt.write_descriptor_store(path, out, batch_atoms=999)  # recorded one is kept
    assert seen == [meta["frames"]]
    assert files_of(out) == files_of(whole.path) and resumed.meta["batch_atoms"] == 70
    again = qt.write_descriptor_store(path, out)  # complete: nothing recomputed
    assert files_of(again.path) == files_of(whole.path)


@pytest.mark.slow
def test_a_killed_writer_resumes_bit_identically(traj, tmp_path):
    path, _ = traj
    whole = qt.write_descriptor_store(path, tmp_path / "whole.qstore", batch_atoms=70)
    out = tmp_path / "killed.qstore"
    script = textwrap.dedent(
        f"""
        import os, signal
        import quests_torch as qt
        from quests_torch.store_writer import StoreWriter
        commit, done = StoreWriter.commit, []
        def killing(self):
            commit(self)
            done.append(1)
            if len(done) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        StoreWriter.commit = killing
        qt.write_descriptor_store({str(path)!r}, {str(out)!r}, batch_atoms=70)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert json.loads((out / "meta.json").read_text())["frames"] > 0
    qt.write_descriptor_store(path, out, batch_atoms=70)
    assert files_of(out) == files_of(whole.path)


def test_a_changed_trajectory_or_parameter_refuses_to_resume(traj, tmp_path):
    path, frames = traj
    out = tmp_path / "s.qstore"
    _interrupted_write(path, out, 3)
    with pytest.raises(ValueError, match=r"parameter `k` changed \(32 -> 8\)"):
        qt.write_descriptor_store(path, out, k=8)
    with pytest.raises(ValueError, match=r"parameter `dtype` changed"):
        qt.write_descriptor_store(path, out, dtype=torch.float64)
    other = tmp_path / "other.extxyz"
    ase.io.write(other, frames[::-1], format="extxyz")
    with pytest.raises(ValueError, match=r"trajectory.s content changed.*overwrite=True"):
        qt.write_descriptor_store(other, out)
    fresh = qt.write_descriptor_store(other, out, overwrite=True, dtype=torch.float64)
    assert torch.equal(torch.from_numpy(np.array(fresh.x)), qt.get_descriptors(frames[::-1]))


def test_changed_committed_rows_are_refused_not_truncated(traj, tmp_path):
    path, _ = traj
    out = tmp_path / "s.qstore"
    _interrupted_write(path, out, 6)
    data = out / "descriptors.npy"
    with open(data, "r+b") as fh:
        fh.seek(HEADER_BYTES + 8)
        fh.write(b"\x07\x07")
    size = data.stat().st_size
    with pytest.raises(ValueError, match=r"committed rows changed.*refusing to truncate"):
        qt.write_descriptor_store(path, out, batch_atoms=70)
    assert data.stat().st_size == size


def test_a_locked_store_gives_a_clear_error(traj, tmp_path):
    path, _ = traj
    out = tmp_path / "s.qstore"
    qt.write_descriptor_store(path, out, batch_atoms=70)
    with qt.StoreWriter(out, k=32, cutoff=5.0, identity={"trajectory": "x"}, overwrite=True):
        with pytest.raises(StoreInUseError, match=r"s\.qstore: being written by another"):
            qt.open_store(out)
        with pytest.raises(StoreInUseError, match="being written by another process"):
            qt.write_descriptor_store(path, out)
    # the lock file stays beside the store (a dead writer's flock frees itself), unheld
    assert (tmp_path / "s.qstore.lock").exists() and not (out / "descriptors.npy.lock").exists()
    assert qt.open_store(out).n_structures == 10


def _complete(tmp_path, rows=12, frames=(5, 7)):
    x = np.random.default_rng(0).normal(size=(rows, 63))
    with qt.StoreWriter(tmp_path / "s.qstore", k=32, cutoff=5.0, dtype="float64") as w:
        w.append(x, list(frames))
        return w.complete()


def _edit_meta(store, **changes):
    meta = json.loads((store.path / "meta.json").read_text())
    meta.update(changes)
    (store.path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"rows": 13}, "does not match its metadata"),
        ({"width": 60}, "metadata width 60 does not fit k=32"),
        ({"k": 16}, "metadata width 63 does not fit k=16"),
        ({"dtype": "float32"}, "`dtype` is 'float32' but the parameters the store was written"),
        ({"dtype": "int8"}, "`dtype` must be float32 or float64"),
        ({"complete": False}, "incomplete descriptor store"),
        ({"kind": "x"}, "not the metadata of a quests-torch descriptor store"),
    ],
)
def test_metadata_that_disagrees_with_data_is_refused(tmp_path, change, match):
    store = _complete(tmp_path)
    _edit_meta(store, **change)
    with pytest.raises(ValueError, match=match) as err:
        qt.open_store(store.path)
    assert "s.qstore" in str(err.value)


def test_damaged_files_are_refused(tmp_path):
    store = _complete(tmp_path)
    with open(store.path / "n_atoms.npy", "r+b") as fh:
        fh.seek(HEADER_BYTES)
        fh.write(np.int64(6).tobytes())
    with pytest.raises(ValueError, match=r"sums to 13 atoms but descriptors\.npy holds 12 rows"):
        qt.open_store(store.path)
    with pytest.raises(ValueError, match="data changed since it was written"):
        store.verify()
    with open(store.path / "descriptors.npy", "r+b") as fh:
        fh.truncate(HEADER_BYTES + 100)
    with pytest.raises(ValueError, match="does not match its metadata"):
        qt.open_store(store.path)
    with pytest.raises(ValueError, match=r"no meta\.json"):
        qt.open_store(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such descriptor store"):
        qt.open_store(tmp_path / "missing.qstore")


def test_writer_checks_its_input(tmp_path, traj):
    with qt.StoreWriter(tmp_path / "w.qstore", k=32, cutoff=5.0) as w:
        with pytest.raises(ValueError, match=r"`x` must be \[r, 63\]"):
            w.append(np.zeros((3, 62)), [3])
        with pytest.raises(ValueError, match="`n_atoms` sums to 2, `x` has 3 rows"):
            w.append(np.zeros((3, 63)), [2])
        with pytest.raises(ValueError, match="no descriptors were appended"):
            w.complete()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a descriptor store"):
        qt.StoreWriter(tmp_path / "notes", k=32, cutoff=5.0, overwrite=True)
    with pytest.raises(ValueError, match="holds no structures"):
        qt.write_descriptor_store(traj[0], tmp_path / "e.qstore", index="20:")


def test_load_descriptors_and_source_accept_the_store(cu_stores):
    s = cu_stores["float32"]
    assert is_descriptor_file(s.path)
    ds = load_descriptors(s.path)
    assert (ds.k, ds.cutoff, ds.dtype) == (32, 5.0, "float32") and ds.meta["store"].path == s.path
    assert np.array_equal(ds.x.numpy(), s.x) and ds.x.dtype == torch.float32
    ds.x[0, 0] = 1e3  # a copy-on-write mapping: the file is untouched
    assert s.x[0, 0] != 1e3 and qt.open_store(s.path).x[0, 0] != 1e3
    src = Source(s, "x")
    assert (src.n, src.d, src.dtype, src.device) == (len(s), 63, torch.float64, None)
    assert src.rows(3, 5, torch.device("cpu")).dtype == torch.float64


def test_reading_is_tile_by_tile_and_memory_stays_bounded(tmp_path, monkeypatch):
    """1M rows (252 MB float32): the metrics read tiles sized from the memory budget (the
    default one is at most 1 GiB on the CPU), never the whole store."""
    rng = np.random.default_rng(1)
    n, block = 1_000_000, 100_000
    with qt.StoreWriter(tmp_path / "big.qstore", k=32, cutoff=5.0, dtype="float32") as w:
        for _ in range(n // block):
            w.append(rng.normal(scale=0.3, size=(block, 63)), [block])
            w.commit()
        store = w.complete()
    fetched = []
    real = Source.rows

    def counting(self, i0, i1, *args, **kwargs):
        fetched.append(i1 - i0)
        return real(self, i0, i1, *args, **kwargs)

    monkeypatch.setattr(Source, "rows", counting)
    query = torch.from_numpy(np.array(store.x[:16])).double()
    budget = 32 * 2**20
    tracemalloc.start()
    dh = qt.delta_entropy(query, store, budget=budget)
    est = qt.estimate_entropy(
        store, rows=30, generator=torch.Generator().manual_seed(0), budget=budget
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert dh.shape == (16,) and est.n == n and np.isfinite(est.value)
    assert max(fetched) * 63 * 8 <= budget and sum(fetched) >= 2 * n  # all rows, in tiles
    assert peak < budget  # far below the 252 MB of data


def _cli(*args):
    return main([str(a) for a in args])


def test_cli_round_trip(traj, tmp_path, capsys):
    path, frames = traj
    out = tmp_path / "t.qstore"
    assert (
        _cli("descriptors", path, "-o", out, "--dtype", "float32", "--batch-atoms", 70, "-q") == 0
    )
    s = qt.open_store(out)
    assert np.array_equal(s.x, per_batch(frames, 70).numpy().astype(np.float32))
    capsys.readouterr()
    assert _cli("descriptors", path, "-o", out, "--dtype", "float32") == 0
    assert "already complete, nothing computed" in capsys.readouterr().out
    assert _cli("descriptors", path, "-o", out, "--dtype", "float64", "-q") == 2
    assert "parameter `dtype` changed" in capsys.readouterr().err
    assert _cli("entropy", out, "-q", "-o", tmp_path / "e.json") == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["results"]["entropy"] == pytest.approx(float(qt.entropy(s)), rel=1e-12)
    assert res["inputs"]["input"]["kind"] == "descriptors"
    assert _cli("dh", path, "-r", out, "-q", "-o", tmp_path / "d.json") == 0
    res = json.loads((tmp_path / "d.json").read_text())
    expected = qt.delta_entropy(qt.get_descriptors(frames), s)
    assert res["results"]["dH_max"] == pytest.approx(float(expected.max()), rel=1e-12)
    assert _cli("overlap", out, "-r", out, "-q") == 0
    assert _cli("descriptors", path, "-o", out, "--dtype", "float64", "--overwrite", "-q") == 0
    assert qt.open_store(out).dtype == "float64"
    (out / "descriptors.npy.lock").write_text("")
    assert os.path.exists(out / "descriptors.npy.lock")
    assert _cli("entropy", out, "-q") == 0  # a lock file nobody holds is not a writer


def test_overwrite_replaces_a_damaged_store_and_accepts_numpy_dtypes(tmp_path):
    store = _complete(tmp_path)
    (store.path / "meta.json").write_text("{not json")
    (store.path / ".meta.json.0123abcd.json").write_text("")  # a crashed atomic write
    with pytest.raises(ValueError, match="unreadable store metadata"):
        qt.StoreWriter(store.path, k=32, cutoff=5.0)
    with qt.StoreWriter(store.path, k=32, cutoff=5.0, dtype=np.float32, overwrite=True) as w:
        w.append(np.ones((2, 63)), [2])
        again = w.complete()
    assert again.dtype == "float32" and len(again) == 2
    assert np.shares_memory(np.asarray(again), again.x)  # no copy
    assert np.asarray(again, dtype=np.float64).dtype == np.float64
    with pytest.raises(ValueError, match="`dtype` must be float32 or float64 storage"):
        qt.StoreWriter(tmp_path / "x.qstore", k=32, cutoff=5.0, dtype=torch.int64)


def test_bank_and_compression_take_a_store(traj, tmp_path):
    """``UncertaintyBank.from_descriptors`` / ``add`` and ``compress`` read a store as the
    tensor it holds (its k and cutoff checked, its structures as the groups)."""
    path, _ = traj
    store = qt.write_descriptor_store(path, tmp_path / "t.qstore", dtype="float64")
    x = store.tensor().clone()
    sid = store.system_idx()
    bank = qt.UncertaintyBank.from_descriptors(store)
    assert (bank.k, bank.cutoff, bank.dtype) == (32, 5.0, torch.float64)
    assert torch.equal(bank.descriptors, x)
    grown = qt.UncertaintyBank(x[:10]).add(store)
    assert torch.equal(grown.descriptors, torch.cat([x[:10], x]))
    with pytest.raises(ValueError, match=r"store .*t\.qstore.*cutoff"):
        qt.UncertaintyBank(cutoff=4.0).add(store)
    with pytest.raises(ValueError, match="cutoff"):
        qt.UncertaintyBank.from_descriptors(store, cutoff=4.0)
    for method in ("msc", "fps"):
        a = qt.compress(store, size=4, method=method, generator=0)
        b = qt.compress(x, sid, size=4, method=method, generator=0)
        assert torch.equal(a.indices, b.indices), method
        assert torch.allclose(a.curve.entropy, b.curve.entropy, rtol=1e-12, atol=0)
