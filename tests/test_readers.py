"""quests_torch.readers: the (ext)xyz frame index, the fast parser against ASE bit for bit,
the reader pool (order, bounded read-ahead, errors) and the wiring into the readers of
trajectories."""

from __future__ import annotations

import os

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from quests_torch.readers import frame_index, parse_frame, read_frames, scan_xyz, select_frames

LATTICE = 'Lattice="4.1 0.0 0.0 0.0 4.2 0.0 0.0 0.0 4.3"'
TRICLINIC = 'Lattice="4.0 0.1 0.0 0.7 3.9 0.2 -0.3 0.4 5.1"'

#: name -> (file text, whether every frame takes the fast path)
CORPUS = {
    "plain_xyz_molecule": (
        "3\nwater\nO 0.0 0.0 0.1173\nH 0.0 0.7572 -0.4692\nH 0 -0.7572 -0.4692\n",
        True,
    ),
    "empty_comment": ("2\n\nC 0 0 0\nO 0 0 1.128\n", True),
    "lattice_default_pbc": (
        f"2\n{LATTICE} Properties=species:S:1:pos:R:3\nCu 0 0 0\nCu 2.05 2.1 2.15\n",
        True,
    ),
    "pbc_mixed": (
        f'2\n{LATTICE} Properties=species:S:1:pos:R:3 pbc="T F T"\nCu 0 0 0\nAu 1 2 3\n',
        True,
    ),
    "pbc_no_lattice": ('1\nProperties=species:S:1:pos:R:3 pbc="F F F"\nNe 0.5 0.25 0.125\n', True),
    "triclinic": (
        f"2\n{TRICLINIC} Properties=species:S:1:pos:R:3\nSi 0.1 0.2 0.3\nSi 1.1e0 2.2E-1 -3.3\n",
        True,
    ),
    "integer_lattice": (
        '1\nLattice="5 0 0 0 5 0 0 0 5" Properties=species:S:1:pos:R:3\nAr 1 2 3\n',
        True,
    ),
    "pos_before_species": (
        f"2\n{LATTICE} Properties=pos:R:3:species:S:1\n0 0 0 Cu\n1.5 1.5 1.5 Zn\n",
        True,
    ),
    "forces_masses_after": (
        f"2\n{LATTICE} Properties=species:S:1:pos:R:3:forces:R:3:masses:R:1 energy=-1.5\n"
        "Cu 0 0 0 0.1 0.2 0.3 63.5\nCu 1 1 1 -0.1 -0.2 -0.3 63.5\n",
        True,
    ),
    "ids_before": (
        f"2\n{LATTICE} Properties=id:I:1:species:S:1:pos:R:3\n1 Cu 0 0 0\n2 Cu 1 1 1\n",
        True,
    ),
    "logical_column": (
        f"2\n{LATTICE} Properties=species:S:1:pos:R:3:fix:L:1\nCu 0 0 0 T\nFe 1 1 1 F\n",
        True,
    ),
    "info_quotes_spaces": (
        f"1\n{LATTICE} comment=\"a frame with spaces\" name='x y' Properties=species:S:1:pos:R:3 "
        'tag={1 2 3} pbc="T T T"\nCu 0.5 0.5 0.5\n',
        True,
    ),
    "lowercase_symbols": ("2\n\ncu 0 0 0\nFE 1 1 1\n", True),
    "blank_trailing_lines": ("1\nx\nH 0 0 0\n1\ny\nH 0 0 1\n\n\n\n", True),
    "windows_line_endings": (
        f"2\r\n{LATTICE} Properties=species:S:1:pos:R:3\r\nCu 0 0 0\r\nCu 1 1 1\r\n",
        True,
    ),
    "no_final_newline": ("1\nx\nH 0 0 0\n1\ny\nH 0 0 1", True),
    "varying_sizes": (
        "1\na\nH 0 0 0\n3\nb\nH 0 0 0\nH 0 0 1\nO 0 1 0\n2\nc\nC 0 0 0\nC 0 0 1.2\n",
        True,
    ),
    # read by ASE: layouts the fast path does not map
    "plain_xyz_extra_columns": ("2\nno properties\nCu 0 0 0 9 9\nCu 1 1 1 9 9\n", False),
    "z_column": (f"2\n{LATTICE} Properties=Z:I:1:pos:R:3\n29 0 0 0\n29 1 1 1\n", False),
    "vec_lines": ("2\ncell\nC 0 0 0\nC 1 1 1\nVEC1 3.0 0 0\nVEC2 0 3.0 0\nVEC3 0 0 3.0\n", False),
}


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / f"{name}.extxyz"
    path.write_bytes(text.encode())
    return str(path)


def _assert_same(got: list, ref: list) -> None:
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(g.numbers, r.numbers)
        assert g.positions.dtype == np.float64
        assert g.positions.tobytes() == np.asarray(r.positions, dtype=np.float64).tobytes()
        assert g.cell.tobytes() == np.asarray(r.cell.array, dtype=np.float64).tobytes()
        np.testing.assert_array_equal(g.pbc, r.pbc)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_fast_reader_gives_the_frames_ase_gives_bit_for_bit(tmp_path, name):
    text, fast = CORPUS[name]
    path = _write(tmp_path, name, text)
    index = scan_xyz(path)
    got = read_frames(path, index.starts, index.stops)
    _assert_same(got, ase.io.read(path, ":"))
    with open(path, "rb") as fh:
        blob = fh.read()
    parsed = [parse_frame(blob[a:b]) for a, b in zip(index.starts, index.stops, strict=True)]
    assert all(p is not None for p in parsed) == fast


def test_fast_reader_matches_ase_on_written_trajectories(tmp_path):
    rng = np.random.default_rng(3)
    frames = []
    for i in range(6):
        a = Atoms(
            ["Cu", "Zn", "O"][: 1 + i % 3] * 4,
            positions=rng.normal(size=(4 * (1 + i % 3), 3)) * 3,
            cell=rng.normal(size=(3, 3)) + 6 * np.eye(3) if i % 2 else None,
            pbc=[True, i % 3 == 0, True] if i % 2 else False,
        )
        a.calc = SinglePointCalculator(a, energy=float(i), forces=rng.normal(size=(len(a), 3)))
        a.info["note"] = f"frame {i} of six"
        a.arrays["charge_like"] = rng.normal(size=len(a))
        frames.append(a)
    path = tmp_path / "written.extxyz"
    ase.io.write(path, frames, format="extxyz")
    index = scan_xyz(path)
    _assert_same(read_frames(path, index.starts, index.stops), ase.io.read(path, ":"))


def test_fast_path_off_reads_through_ase(tmp_path):
    path = _write(tmp_path, "x", CORPUS["forces_masses_after"][0])
    index = scan_xyz(path)
    _assert_same(read_frames(path, index.starts, index.stops, fast=False), ase.io.read(path, ":"))


@pytest.mark.parametrize("block", [7, 64, 1 << 20])
def test_scan_finds_every_frame_at_any_block_size(tmp_path, block):
    text = CORPUS["varying_sizes"][0] * 5
    path = _write(tmp_path, "v", text)
    index = scan_xyz(path, block=block)
    assert index.n_atoms.tolist() == [1, 3, 2] * 5
    blob = text.encode()
    assert all(blob[a : a + 1].strip() for a in index.starts)  # each starts at its count
    assert index.stops[-1] == len(blob)
    assert (index.starts[1:] == index.stops[:-1]).all()


def test_scan_refuses_a_truncated_frame_and_a_bad_header(tmp_path):
    bad = _write(tmp_path, "short", "3\nx\nH 0 0 0\n")
    with pytest.raises(ValueError, match="frame 1 claims 3 atoms"):
        scan_xyz(bad)
    bad = _write(tmp_path, "header", "1\nx\nH 0 0 0\nten\nx\n")
    with pytest.raises(ValueError, match="line 4 should be the atom count of frame 2"):
        scan_xyz(bad)


@pytest.mark.parametrize("index", [":", "0:3", "1::2", "-1", "-2:", "::-1", "7", "2:1", "-3:-1"])
def test_selection_maps_to_the_frames_ase_selects(tmp_path, index):
    frames = [Atoms("H", positions=[[0, 0, i]]) for i in range(5)]
    path = tmp_path / "h.extxyz"
    ase.io.write(path, frames)
    chosen = select_frames(5, index)
    ref = ase.io.read(path, index) if index != "7" else []
    ref = ref if isinstance(ref, list) else [ref]
    assert [float(a.positions[0, 2]) for a in ref] == chosen.astype(float).tolist()


def test_select_frames_refuses_a_bad_index():
    with pytest.raises(ValueError, match="invalid index"):
        select_frames(3, "a:b")


def test_index_is_cached_and_refused_once_the_file_changes(tmp_path, monkeypatch):
    from quests_torch.readers import index as index_module

    cache = tmp_path / "cache"
    path = _write(tmp_path, "c", CORPUS["varying_sizes"][0])
    first = frame_index(path, cache_dir=cache)
    assert len(list((cache / "frame-index").glob("*.npz"))) == 1
    scans = []
    real = index_module.scan_xyz
    monkeypatch.setattr(index_module, "scan_xyz", lambda p: scans.append(p) or real(p))
    again = frame_index(path, cache_dir=cache)  # a hit: no rescan
    assert scans == [] and again.starts.tolist() == first.starts.tolist()
    # rewritten with the same size: the identity (mtime, head hash) changes, the entry is refused
    text = CORPUS["varying_sizes"][0].replace("O 0 1 0", "N 0 1 0")  # same size
    with open(path, "wb") as fh:
        fh.write(text.encode())
    os.utime(path, ns=(0, 0))
    assert frame_index(path, cache_dir=cache).n_atoms.tolist() == [1, 3, 2]
    assert len(scans) == 1  # the entry was refused: rescanned
    frame_index(path, cache_dir=cache)
    assert len(scans) == 1  # and replaced
    with open(path, "ab") as fh:  # grown by a frame
        fh.write(b"1\nd\nH 0 0 0\n")
    assert frame_index(path, cache_dir=cache).n_atoms.tolist() == [1, 3, 2, 1]


# --- the reader pool: one pool of 2 processes for the module (spawn costs ~1-2 s each) ---


def _numbered(tmp_path, n_frames: int, name: str = "numbered", garbage_at: int | None = None):
    """Frames of 1-3 atoms whose z coordinate is the frame number."""
    parts = []
    for i in range(n_frames):
        atoms = 1 + i % 3
        lines = [f"{'Xx' if i == garbage_at else 'H'} 0.5 0.25 {i}" for _ in range(atoms)]
        if i == garbage_at:
            lines = ["H 0.5 0.25 nope-not-a-number"] * atoms
        parts.append(f"{atoms}\n{LATTICE} Properties=species:S:1:pos:R:3\n" + "\n".join(lines))
    path = tmp_path / f"{name}.extxyz"
    path.write_text("\n".join(parts) + "\n")
    return path


@pytest.fixture(scope="module")
def pool():
    from quests_torch.readers.pool import ReaderPool

    with ReaderPool(2, in_flight=3, chunk_atoms=4) as p:
        yield p


def test_pool_hands_frames_back_in_order(tmp_path, pool):
    path = _numbered(tmp_path, 60)
    index = frame_index(path, cache=False)
    for selection in (":", "5:50:3", "::-2"):
        frames = select_frames(len(index), selection)
        got = [int(r.positions[0, 2]) for r in pool.records(path, index, frames)]
        assert got == frames.tolist()
    ref = read_frames(path, index.starts, index.stops)
    _assert_same(list(pool.records(path, index, np.arange(60))), [r.to_atoms() for r in ref])


def test_pool_reads_ahead_a_bounded_number_of_chunks(tmp_path, pool):
    import time

    path = _numbered(tmp_path, 40, "slow")
    index = frame_index(path, cache=False)
    pool.max_ahead = 0
    for i, _ in enumerate(pool.records(path, index, np.arange(40))):
        if i < 6:
            time.sleep(0.05)  # a slow consumer: the readers wait for it
    assert 1 <= pool.max_ahead <= pool.in_flight == 3


def test_pool_error_names_the_frame_and_leaves_no_process(tmp_path, pool):
    import multiprocessing

    path = _numbered(tmp_path, 30, "garbage", garbage_at=17)
    index = frame_index(path, cache=False)
    with pytest.raises(ValueError, match=r"structure 17 of the selection, frame 17 of the file"):
        list(pool.records(path, index, np.arange(30)))
    with pytest.raises(ValueError, match=r"structure 7 of the selection, frame 17 of the file"):
        list(pool.records(path, index, np.arange(10, 30)))
    # an abandoned iteration: the pool stays usable
    records = pool.records(path, index, np.arange(10))
    next(records)
    records.close()
    assert [int(r.positions[0, 2]) for r in pool.records(path, index, np.arange(3))] == [0, 1, 2]
    pool.close()
    assert multiprocessing.active_children() == []


def test_in_process_reader_names_the_bad_frame(tmp_path):
    from quests_torch.readers.pool import iter_records

    path = _numbered(tmp_path, 8, "bad", garbage_at=5)
    with pytest.raises(ValueError, match=r"structure 3 of the selection, frame 5 of the file"):
        list(iter_records(path, "2:", cache=False))


@pytest.mark.parametrize("bad", [-1, 2.5, "2", True, None])
def test_readers_must_be_a_count(bad, tmp_path):
    """Every entry point refuses a `readers` that is not a count, with the same message and
    before reading or writing anything (a string or a float was a TypeError or accepted)."""
    import quests_torch as qt
    from quests_torch.readers.pool import ReaderPool

    path = _numbered(tmp_path, 3, "ok")
    calls = [
        lambda: ReaderPool(bad),
        lambda: qt.write_descriptor_store(path, tmp_path / "s.qstore", readers=bad),
    ]
    if bad is not None:  # None is iter_structures' "read with ASE"
        calls.append(lambda: next(qt.io.iter_structures(path, readers=bad)))
    for call in calls:
        with pytest.raises(ValueError, match="`readers` must be an integer >= 0"):
            call()
    assert not (tmp_path / "s.qstore").exists()


# --- wiring: iter_structures, the descriptor store and the screening read through the readers


@pytest.fixture
def md(tmp_path):
    """12 rattled fcc frames of two sizes, with forces and an energy (written by ASE)."""
    from ase.build import bulk

    rng = np.random.default_rng(7)
    frames = []
    for i in range(12):
        a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2 + i % 2))
        a.positions += rng.normal(scale=0.08, size=a.positions.shape)
        a.calc = SinglePointCalculator(a, energy=-float(i), forces=rng.normal(size=(len(a), 3)))
        frames.append(a)
    path = tmp_path / "md.extxyz"
    ase.io.write(path, frames, format="extxyz")
    return path


@pytest.fixture
def pool_for_small_files(monkeypatch):
    """Reader processes for any selection (they start only above MIN_POOL_ATOMS atoms)."""
    from quests_torch.readers import pool as pool_module

    monkeypatch.setattr(pool_module, "MIN_POOL_ATOMS", 0)


@pytest.mark.parametrize("index", [":", "3:9:2", "-1"])
def test_iter_structures_fast_gives_ases_frames(md, index):
    from quests_torch import io

    ref = list(io.iter_structures(md, index))
    _assert_same(list(io.iter_structures(md, index, readers=0)), ref)


def test_iter_structures_fast_refuses_nan_and_bad_headers(tmp_path):
    from quests_torch import io

    nan = _write(tmp_path, "t", "1\nx\nH 0 0 0\n1\nx\nH nan 0 0\n")
    with pytest.raises(ValueError, match=r"t\.extxyz: structure 1 .* non-finite positions"):
        list(io.iter_structures(nan, readers=0))
    bad = _write(tmp_path, "bad", "1\nx\nH 0 0 0\n100000000000\nx\nH 0 0 0\n")
    with pytest.raises(ValueError, match=r"bad\.extxyz: cannot read structures \(frame 2 claims"):
        next(io.iter_structures(bad, readers=2))


def test_store_resumed_with_readers_equals_the_in_process_store(md, tmp_path, monkeypatch,
                                                                pool_for_small_files):  # fmt: skip
    import quests_torch as qt
    from quests_torch import store_writer

    whole = qt.write_descriptor_store(md, tmp_path / "whole.qstore", batch_atoms=70)
    ase_frames = ase.io.read(md, ":")
    real = store_writer.frames_after
    out = tmp_path / "cut.qstore"
    with monkeypatch.context() as m:

        def failing(trajectory, index, done, **kw):
            for i, atoms in enumerate(real(trajectory, index, done, **kw)):
                if i == 7:
                    raise RuntimeError("interrupted")
                yield atoms

        m.setattr(store_writer, "frames_after", failing)
        with pytest.raises(RuntimeError, match="interrupted"):
            qt.write_descriptor_store(md, out, batch_atoms=70, readers=2)
    seen = []
    with monkeypatch.context() as m:
        m.setattr(store_writer, "frames_after",
                  lambda t, i, d, **kw: seen.append((d, kw)) or real(t, i, d, **kw))  # fmt: skip
        resumed = qt.write_descriptor_store(md, out, readers=2)
    assert 0 < seen[0][0] < 12 and seen[0][1] == {"readers": 2, "types": None}
    for name in ("descriptors.npy", "n_atoms.npy"):
        assert (out / name).read_bytes() == (whole.path / name).read_bytes()
    assert resumed.n_atoms.tolist() == [len(a) for a in ase_frames]


def test_screening_tables_do_not_depend_on_the_reader(md, tmp_path, pool_for_small_files):
    import torch

    import quests_torch as qt

    reference = qt.get_descriptors(ase.io.read(md, "0:2"), dtype=torch.float64)
    tables = {}
    for name, kw in {
        "ase": {"extxyz": tmp_path / "ase.extxyz"},  # a per-atom extxyz: frames read by ASE
        "fast": {"readers": 0},
        "pool": {"readers": 2},
    }.items():
        qt.screen_trajectory(md, reference, tmp_path / f"{name}.csv", batch_atoms=100, **kw)
        tables[name] = (tmp_path / f"{name}.csv").read_bytes()
    assert tables["fast"] == tables["ase"] and tables["pool"] == tables["ase"]
    with pytest.raises(ValueError, match="`readers` must be an integer >= 0"):
        qt.screen_trajectory(md, reference, tmp_path / "x.csv", readers=-1)


def test_an_interrupted_consumer_leaves_no_reader_process(tmp_path):
    import multiprocessing

    from quests_torch.readers.pool import ReaderPool

    path = _numbered(tmp_path, 200, "interrupted")
    index = frame_index(path, cache=False)
    with pytest.raises(KeyboardInterrupt), ReaderPool(2, in_flight=2, chunk_atoms=4) as pool:
        for i, _ in enumerate(pool.records(path, index, np.arange(200))):
            if i == 5:
                raise KeyboardInterrupt
    assert multiprocessing.active_children() == []


def test_readers_option_and_default():
    import argparse

    from quests_torch.cli.options import readers_option
    from quests_torch.readers.pool import default_readers

    assert readers_option("0") == 0 and readers_option("3") == 3
    for bad in ("-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError, match="integer >= 0"):
            readers_option(bad)
    assert default_readers(compute_threads=10**6) == 1
    assert default_readers(compute_threads=0) >= 1
