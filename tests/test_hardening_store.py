"""Hardening, second round (issue 25): the descriptor store loses no data and tells no lies.

Each test reproduces a finding of the audit and fails without its fix. The command-line
tests call :func:`quests_torch.cli.main` in-process (no subprocess: torch is imported once).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

import quests_torch as qt
from quests_torch import store_files, store_writer
from quests_torch.cli import main
from quests_torch.resume import TableInUseError, table_lock
from quests_torch.store import (
    DATA_FILE,
    HEADER_BYTES,
    META_FILE,
    N_ATOMS_FILE,
    StoreInUseError,
    npy_header,
    replaced_path,
    replacement_path,
    store_lock_path,
)
from quests_torch.store_files import finish_swap


def _cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def md(tmp_path_factory):
    """The audit's folder: ``md.xyz`` (ten rattled 32-atom Cu cells), ``far.xyz`` (two
    atoms), ``bad.xyz`` (not a structure file) and the complete store ``md.qstore``."""
    d = tmp_path_factory.mktemp("md")
    frames = []
    for i in range(10):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
        atoms.rattle(0.05, seed=i)
        frames.append(atoms)
    ase.io.write(d / "md.xyz", frames)
    ase.io.write(d / "far.xyz", Atoms("Cu2", positions=[[0, 0, 0], [10, 0, 0]]))
    (d / "bad.xyz").write_text("garbage\n")
    assert _cli("descriptors", d / "md.xyz", "-o", d / "md.qstore", "-q") == 0
    return d


@pytest.fixture
def store(md, tmp_path):
    """A copy of the complete ``md.qstore`` (320 rows, float32) to damage."""
    shutil.copytree(md / "md.qstore", tmp_path / "md.qstore")
    return tmp_path / "md.qstore"


def _meta(path):
    return json.loads((path / META_FILE).read_text())


def _write_meta(path, meta) -> None:
    (path / META_FILE).write_text(json.dumps(meta))


def _files(path) -> dict:
    return {n: (path / n).read_bytes() for n in (DATA_FILE, N_ATOMS_FILE)}


def _one_line_naming(exc: BaseException, path) -> str:
    text = str(exc)
    assert "\n" not in text and str(path) in text, text
    return text


# --------------------------------------------------------------------------------------------
# 1. no file of a store is written (or read) through a symbolic link
# --------------------------------------------------------------------------------------------


def test_a_resume_never_writes_through_a_symlinked_data_file(md, tmp_path, capsys):
    out = tmp_path / "s.qstore"
    argv = ("descriptors", md / "md.xyz", "-i", "100:", "-o", out, "-q")
    assert _cli(*argv) == 2  # an empty selection: a store with 0 rows committed
    victim = tmp_path / "victim.dat"
    victim.write_bytes(b"precious data\n" * 1000)
    (out / DATA_FILE).unlink()
    (out / DATA_FILE).symlink_to(victim)
    capsys.readouterr()
    assert _cli(*argv) == 2
    err = capsys.readouterr().err
    assert "descriptors.npy: a symbolic link" in err and "refusing to write" in err
    assert victim.read_bytes() == b"precious data\n" * 1000


def test_a_resume_never_truncates_a_hard_linked_or_foreign_file(md, tmp_path):
    out = tmp_path / "s.qstore"
    with pytest.raises(ValueError, match="holds no structures"):
        qt.write_descriptor_store(md / "md.xyz", out, index="100:")
    victim = tmp_path / "victim.dat"
    victim.write_bytes(b"precious data\n" * 1000)
    (out / DATA_FILE).unlink()
    os.link(victim, out / DATA_FILE)  # a hard link: a regular file, 0 committed bytes
    with pytest.raises(ValueError, match="other hard link"):
        qt.write_descriptor_store(md / "md.xyz", out, index="100:")
    (out / DATA_FILE).unlink()
    shutil.copy(victim, out / DATA_FILE)  # a copy: not a file this store wrote
    with pytest.raises(ValueError, match="not a file of this store; refusing to truncate"):
        qt.write_descriptor_store(md / "md.xyz", out, index="100:")
    assert victim.read_bytes() == (out / DATA_FILE).read_bytes() == b"precious data\n" * 1000


@pytest.mark.parametrize("name", [DATA_FILE, N_ATOMS_FILE, META_FILE])
def test_a_reader_refuses_a_symlinked_file(store, tmp_path, name):
    moved = tmp_path / f"elsewhere-{name}"
    (store / name).rename(moved)
    (store / name).symlink_to(moved)
    with pytest.raises(ValueError, match=f"{name}: a symbolic link"):
        qt.open_store(store)


# --------------------------------------------------------------------------------------------
# 2. --overwrite builds the new store beside the old one and swaps only when it is complete
# --------------------------------------------------------------------------------------------


def test_overwrite_with_unreadable_input_keeps_the_old_store(md, store, capsys):
    before = _files(store)
    assert _cli("descriptors", md / "bad.xyz", "-o", store, "--overwrite", "-q") == 2
    assert _files(store) == before and len(qt.open_store(store)) == 320
    assert not replacement_path(store).exists()  # nothing committed: nothing left
    assert not replaced_path(store).exists()


def _interrupt_after(monkeypatch, frames: int) -> None:
    real = store_writer.frames_after

    def failing(trajectory, index, done, **kw):
        for i, atoms in enumerate(real(trajectory, index, done, **kw)):
            if i == frames:
                raise RuntimeError("interrupted")
            yield atoms

    monkeypatch.setattr(store_writer, "frames_after", failing)


def test_an_interrupted_overwrite_keeps_the_old_store_and_resumes(md, store, tmp_path):
    before = _files(store)
    whole = qt.write_descriptor_store(md / "md.xyz", tmp_path / "whole.qstore", index="::2",
                                      batch_atoms=64)  # fmt: skip
    with pytest.MonkeyPatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(RuntimeError, match="interrupted"):
            qt.write_descriptor_store(
                md / "md.xyz", store, index="::2", batch_atoms=64, overwrite=True
            )
    assert _files(store) == before and len(qt.open_store(store)) == 320  # old store intact
    partial = _meta(replacement_path(store))
    assert partial["complete"] is False and partial["frames"] == 2  # two batches committed
    with pytest.MonkeyPatch.context() as m:
        seen = []
        real = store_writer.frames_after
        m.setattr(
            store_writer,
            "frames_after",
            lambda t, i, d, **kw: seen.append(d) or real(t, i, d, **kw),
        )
        new = qt.write_descriptor_store(md / "md.xyz", store, index="::2", overwrite=True)
    assert seen == [2]  # resumed after the committed frames, not recomputed
    assert _files(store) == _files(whole.path) and len(new) == 160
    assert not replacement_path(store).exists() and not replaced_path(store).exists()


def _stop_at_sync(monkeypatch, call: int) -> None:
    """Make the ``call``-th folder sync of a swap fail (the process 'dies' there)."""
    calls = []
    real = store_files.sync_folder

    def failing(folder):
        real(folder)
        calls.append(folder)
        if len(calls) == call:
            raise KeyboardInterrupt("killed during the swap")

    monkeypatch.setattr(store_files, "sync_folder", failing)


def test_an_overwrite_stopped_between_the_renames_is_finished_by_the_next_writer(md, store):
    with pytest.MonkeyPatch.context() as m:
        _stop_at_sync(m, 1)  # the old store moved aside, the new one not yet in
        with pytest.raises(KeyboardInterrupt):
            qt.write_descriptor_store(md / "far.xyz", store, overwrite=True)
    assert not store.exists() and replaced_path(store).exists()
    with pytest.raises(ValueError, match="an overwrite was stopped while it replaced") as err:
        qt.open_store(store)
    assert str(replaced_path(store)) in _one_line_naming(err.value, store)
    assert _cli("entropy", store, "-q") == 2  # a reader reports it, changes nothing
    again = qt.write_descriptor_store(md / "far.xyz", store)  # any writer finishes the swap
    assert len(again) == 2 and not replaced_path(store).exists()
    assert not replacement_path(store).exists()


def test_an_overwrite_stopped_before_removing_the_old_store(md, store):
    with pytest.MonkeyPatch.context() as m:
        _stop_at_sync(m, 2)  # the new store in place, the old one not yet removed
        with pytest.raises(KeyboardInterrupt):
            qt.write_descriptor_store(md / "far.xyz", store, overwrite=True)
    assert len(qt.open_store(store)) == 2 and replaced_path(store).exists()
    with qt.StoreWriter(store, k=32, cutoff=5.0, identity={"x": 1}, overwrite=True):
        assert not replaced_path(store).exists()  # removed under the lock
    assert len(qt.open_store(store)) == 2


def test_a_store_left_aside_without_a_complete_replacement_is_moved_back(store):
    before = _files(store)
    store.rename(replaced_path(store))  # as if stopped with no complete new store
    assert finish_swap(store).startswith("moved the old store")
    assert _files(store) == before and len(qt.open_store(store)) == 320
    assert finish_swap(store) is None


# --------------------------------------------------------------------------------------------
# 4. an opened store reads the files it opened, whatever the path holds later
# --------------------------------------------------------------------------------------------


def test_an_open_store_keeps_reading_what_it_opened(md, store):
    s = qt.open_store(store)
    x = np.array(s.x)
    assert _cli("descriptors", md / "far.xyz", "-o", store, "--overwrite", "-q") == 0
    assert len(qt.open_store(store)) == 2  # the path holds the new store ...
    assert len(s) == 320 and torch.equal(s.tensor(), torch.from_numpy(x))  # ... s the old one
    assert s[10:20].tensor().shape == (10, 63)
    bank = qt.UncertaintyBank.from_descriptors(s)
    assert len(bank.descriptors) == 320
    s.verify()  # the files it opened are intact


# --------------------------------------------------------------------------------------------
# 5. the store's parameters are checked against the parameters it was keyed with
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"cutoff": 4.0}, r"`cutoff` is 4\.0 but the parameters the store was written with"),
        ({"cutoff": True}, "`cutoff` must be a finite positive distance, got True"),
        ({"k": True}, r"`k` must be an integer in \[1, 1024\], got True"),
        ({"multicomponent": 0}, "`multicomponent` must be true or false"),
        ({"species": ["Ni"]}, r'`species` \["Ni"\] do not match their SHA-256'),
        ({"species": ["Cu", "Cu"]}, "`species` must be a list of distinct chemical symbols"),
        ({"species": [29]}, "`species` must be a list of distinct chemical symbols"),
    ],
)
def test_edited_parameters_are_refused(md, store, capsys, change, match):
    meta = _meta(store)
    meta.update(change)
    _write_meta(store, meta)
    with pytest.raises(ValueError, match=match) as err:
        qt.open_store(store)
    _one_line_naming(err.value, store)
    assert _cli("dh", md / "md.xyz", "-r", store, "-q") == 2
    assert str(store) in capsys.readouterr().err


def test_params_that_do_not_hash_to_the_key_are_refused(store):
    meta = _meta(store)
    meta["params"]["cutoff"] = meta["cutoff"] = 4.0  # both edited, the key not
    _write_meta(store, meta)
    with pytest.raises(ValueError, match="`params` do not hash to its `key`"):
        qt.open_store(store)


# --------------------------------------------------------------------------------------------
# 6. n_atoms cannot overflow its sum
# --------------------------------------------------------------------------------------------


def test_atom_counts_that_wrap_around_int64_are_refused(store, capsys):
    counts = np.array([2**62, 2**62, 2**62, 2**62 + 320], dtype=np.int64)
    assert int(counts.sum()) == 320  # int64 arithmetic wraps around
    (store / N_ATOMS_FILE).write_bytes(npy_header(counts.dtype, (4,)) + counts.tobytes())
    meta = _meta(store)
    meta["frames"] = 4
    meta["sha256"]["n_atoms"] = hashlib.sha256(counts.tobytes()).hexdigest()
    _write_meta(store, meta)
    with pytest.raises(ValueError, match=r"n_atoms\.npy holds counts outside \[0, 320\]"):
        qt.open_store(store)
    assert _cli("compress", store, "-o", store.parent / "c.json", "-q") == 2
    assert "counts outside" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# 9. a store truncated while open is refused before a read through the map (SIGBUS)
# --------------------------------------------------------------------------------------------


def test_a_store_truncated_while_open_is_refused_before_reading(store):
    s = qt.open_store(store)
    with open(store / DATA_FILE, "r+b") as fh:
        fh.truncate(HEADER_BYTES + 63 * 4 * 100)
    for read in (qt.entropy, lambda s: s.tensor(), lambda s: s.verify(), np.array):
        with pytest.raises(ValueError, match=r"truncated to .* since the store was opened"):
            read(s)
    with pytest.raises(ValueError, match="truncated"):
        qt.delta_entropy(torch.zeros(3, 63, dtype=torch.float64), s)


# --------------------------------------------------------------------------------------------
# 11. StoreWriter checks its parameters when it is made and every row when it is appended
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"cutoff": float("nan")}, ValueError, "`cutoff` must be a finite number > 0"),
        ({"cutoff": True}, TypeError, "`cutoff` must be a number"),
        ({"k": 0}, ValueError, "`k` must be >= 1"),
        ({"k": 2.7}, TypeError, "`k` must be an int"),
        ({"multicomponent": "yes"}, TypeError, "`multicomponent` must be a bool"),
        ({"species": ["Cu", "Xx"]}, ValueError, "`species` must be chemical symbols"),
        ({"batch_atoms": 0}, ValueError, "`batch_atoms` must be a positive int"),
        ({"identity": {"when": object()}}, TypeError, "must hold JSON values"),
    ],
)
def test_writer_parameters_are_checked_before_anything_is_written(tmp_path, kwargs, error, match):
    out = tmp_path / "w.qstore"
    with pytest.raises(error, match=match):
        qt.StoreWriter(out, **{"k": 32, "cutoff": 5.0, **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_non_finite_rows_naming_them(tmp_path):
    x = np.ones((4, 63))
    with qt.StoreWriter(tmp_path / "w.qstore", k=32, cutoff=5.0, dtype="float32") as w:
        x[2, 5] = np.nan
        with pytest.raises(ValueError, match="`x` row 2 holds NaN or infinite values"):
            w.append(x, [4])
        x[2, 5] = 1e39  # finite in float64, infinite as float32
        with pytest.raises(ValueError, match=r"`x` row 2 .*\(as float32\)"):
            w.append(x, [4])
        with pytest.raises(TypeError, match="`n_atoms` must be integers"):
            w.append(np.ones((4, 63)), [2.7, 1.3])
        with pytest.raises(ValueError, match="`n_atoms` sums to"):
            w.append(np.ones((4, 63)), [2**62, 2**62, 2**62, 2**62 + 4])
        w.append(np.ones((4, 63)), [4])
        store = w.complete()
    assert len(store) == 4 and store.n_structures == 1


# --------------------------------------------------------------------------------------------
# 12. a deleted lock file lets no second writer corrupt the store
# --------------------------------------------------------------------------------------------


def test_deleting_the_lock_of_a_running_writer_corrupts_nothing(tmp_path):
    out = tmp_path / "s.qstore"
    rows = np.random.default_rng(0).normal(size=(64, 63))
    kw = {"k": 32, "cutoff": 5.0, "dtype": "float64", "identity": {"run": 1}}
    first = qt.StoreWriter(out, **kw)
    first.append(rows[:32], [32])
    first.commit()
    first.append(rows[32:], [32])  # appended, not committed yet
    store_lock_path(out).unlink()  # "stale", says the user
    with pytest.raises(StoreInUseError, match="the file is locked although the store's lock"):
        qt.StoreWriter(out, **kw)  # its data files are locked too
    with pytest.raises(TableInUseError, match="removed or replaced"):
        first.commit()  # the first writer stops instead of writing beside another
    first.close()
    with qt.StoreWriter(out, **kw) as again:  # a rerun resumes after the committed rows
        assert again.rows == 32
        again.append(rows[32:], [32])
        store = again.complete()
    store.verify()
    assert np.array_equal(store.x, rows) and store_lock_path(out).exists()


# --------------------------------------------------------------------------------------------
# 13. metadata that is not what it should be: one line naming the store and the entry
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("dtype", ["float64"], r'`dtype` must be float32 or float64, got \["float64"\]'),
        ("rows", 2**61, r"rows of float\d\d x 63\) needs \d{20,}: the data file"),
        ("batch_atoms", "many", "`batch_atoms` must be an integer >= 1, got 'many'"),
        ("source", "deep", "unreadable store metadata .*nested too deeply"),
    ],
)
def test_metadata_messages_name_the_store_and_the_entry(store, capsys, field, value, match):
    meta = _meta(store)
    meta[field] = value
    text = json.dumps(meta) if value != "deep" else _deep_json(meta)
    (store / META_FILE).write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        qt.open_store(store)
    _one_line_naming(err.value, store)
    assert _cli("entropy", store, "-q") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(store) in err[0]


def _deep_json(meta: dict) -> str:
    """``meta`` as JSON with ``source`` nested beyond what ``json.dumps`` writes."""
    meta = dict(meta, source="@")
    return json.dumps(meta).replace('"@"', "[" * 5000 + "1" + "]" * 5000)


# --------------------------------------------------------------------------------------------
# fuzz: every entry of meta.json, wrong in every way
# --------------------------------------------------------------------------------------------

_DEEP = "@DEEP@"
_VALUES = [
    None, True, False, 0, 1, -1, 2, 31, 32, 33, 63, 2**31, 2**63, 2**64 + 5, -(2**63), 10**40,
    0.0, -0.0, 5, 5.0, 4.0, 3.5, 1e308, -1e308, float("nan"), float("inf"), float("-inf"),
    "", "x", "NaN", "inf", "5.0", "32", "float32", "float64", "Cu", "0" * 64, "f" * 64,
    [], {}, ["float64"], ["Cu"], ["Cu", "Cu"], [29], {"descriptors": None}, {"k": 32},
    [[[[[]]]]], {"a": {"b": {"c": {}}}}, _DEEP,
]  # fmt: skip
_FIELDS = [
    "k", "cutoff", "dtype", "width", "multicomponent", "species", "rows", "frames",
    "complete", "key", "params", "sha256", "batch_atoms", "source", "store_format", "kind",
    "quests_torch",
]  # fmt: skip


def _fuzzed_text(meta: dict, field: str, value) -> str:
    if isinstance(value, str) and value == _DEEP:
        return json.dumps(dict(meta, **{field: _DEEP})).replace(
            json.dumps(_DEEP), "[" * 3000 + "]" * 3000
        )
    changed = dict(meta, **{field: value})
    if field in ("params", "sha256"):  # also one level down
        return json.dumps(changed)
    return json.dumps(changed)


def _fuzz_cases(meta: dict):
    for field in _FIELDS:
        for value in _VALUES:
            yield f"{field}={value!r:.30}", _fuzzed_text(meta, field, value)
        yield f"{field} missing", json.dumps({k: v for k, v in meta.items() if k != field})
        for sub in ("params", "sha256"):
            nested = copy.deepcopy(meta)
            if field in nested[sub]:
                for value in (None, True, "x", [1], 2**64):
                    nested[sub][field] = value
                    yield f"{sub}.{field}={value!r}", json.dumps(nested)
    for whole in ("[]", "1", '"x"', "null", "{", "[" * 3000 + "]" * 3000, ""):
        yield f"document {whole[:8]!r}", whole


def _same_store(s, reference) -> None:
    """A store that opened despite the edit reads exactly as the reference."""
    assert (s.k, s.cutoff, s.dtype, s.species, s.multicomponent) == (
        reference.k,
        reference.cutoff,
        reference.dtype,
        reference.species,
        reference.multicomponent,
    )
    assert np.array_equal(s.n_atoms, reference.n_atoms)
    assert np.array_equal(np.asarray(s.x), np.asarray(reference.x))
    s.verify()


def test_fuzzed_metadata_opens_the_same_store_or_is_refused_in_one_line(store):
    reference = qt.open_store(store)
    original = (store / META_FILE).read_text()
    meta = json.loads(original)
    opened, refused = 0, 0
    for case, text in _fuzz_cases(meta):
        (store / META_FILE).write_text(text)
        try:
            s = qt.open_store(store)
        except ValueError as exc:
            assert "\n" not in str(exc) and str(store) in str(exc), (case, str(exc)[:300])
            assert len(str(exc)) < 600, (case, str(exc)[:300])
            refused += 1
        else:
            _same_store(s, reference)
            opened += 1
    (store / META_FILE).write_text(original)
    _same_store(qt.open_store(store), reference)
    assert refused > 500 and opened > 10  # source, batch_atoms, quests_torch, ... may vary


def test_fuzzed_metadata_of_an_interrupted_store_resumes_or_is_refused(md, tmp_path):
    out = tmp_path / "s.qstore"
    rows = np.random.default_rng(1).normal(size=(8, 63))
    kw = {"k": 32, "cutoff": 5.0, "dtype": "float64", "identity": {"run": 1}, "batch_atoms": 4}
    with qt.StoreWriter(out, **kw) as w:
        w.append(rows[:4], [4])
        w.commit()
    meta = _meta(out)
    before = _files(out)
    resumed = 0
    for case, text in _fuzz_cases(meta):
        (out / META_FILE).write_text(text)
        try:
            with qt.StoreWriter(out, **kw) as w:
                assert (w.rows, w.frames) == (4, 1), case
                resumed += 1
        except ValueError as exc:
            assert "\n" not in str(exc) and str(out) in str(exc), (case, str(exc)[:300])
        assert _files(out) == before, case  # nothing truncated on a refusal
    assert resumed > 10


# --------------------------------------------------------------------------------------------
# 12. a lock is an flock on a file that stays; a holder sees its file removed or replaced
# --------------------------------------------------------------------------------------------


def test_a_deleted_lock_file_is_seen_by_its_holder(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("frame\n")
    with table_lock(table) as held:
        held.check()  # still the file at the path
        held.path.unlink()  # a user "cleaning up" a lock that looks stale
        with table_lock(table) as second:  # a second run gets in on a new file ...
            with pytest.raises(TableInUseError, match="removed or replaced while this process"):
                held.check()  # ... and the first one stops instead of writing beside it
            second.check()
    assert held.path.exists()  # beside an output, the lock file stays: nothing to clean up


def test_a_lock_without_output_leaves_nothing(tmp_path):
    table = tmp_path / "new" / "t.csv"
    with table_lock(table):
        with pytest.raises(TableInUseError, match="in use by another screening"):
            with table_lock(table):
                pass
    assert not (tmp_path / "new").exists()
