"""Issue 14 hardening of the file layer: no code execution from descriptor files, no hang on a
malformed xyz header, output permissions, cache keys, descriptor file checks, bank state."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import quests_torch as qt
from quests_torch import io


@pytest.fixture
def umask():
    """Set a umask for one test, restoring the previous one."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(saved)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------ item 7: output permissions
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_write_new_file_gets_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    out = tmp_path / "table.tsv"
    io.atomic_write(out, lambda p: p.write_text("a\tb\n"))
    assert out.read_text() == "a\tb\n"
    assert _mode(out) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["table.tsv"]  # no temporary file left


@pytest.mark.parametrize("mode", [0o600, 0o664, 0o640])
def test_atomic_write_overwrite_keeps_the_file_mode(tmp_path, umask, mode):
    umask(0o022)
    out = tmp_path / "result.json"
    out.write_text("old")
    out.chmod(mode)
    io.atomic_write(out, lambda p: p.write_text("new"))
    assert out.read_text() == "new"
    assert _mode(out) == mode


def test_atomic_write_failure_leaves_no_temporary_file(tmp_path):
    out = tmp_path / "x.json"

    def boom(p: Path) -> None:
        p.write_text("half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        io.atomic_write(out, boom)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ item 6: no hang on xyz
def _frames(sizes=(4, 2, 5, 3)):
    from conftest import rattled_fcc

    frames = []
    for i, n in enumerate(sizes):
        atoms = rattled_fcc((1, 1, 1), seed=i)[:n]
        atoms.pbc = True
        frames.append(atoms)
    return frames


def test_xyz_header_claiming_1e11_atoms_fails_fast_everywhere(tmp_path):
    bad = tmp_path / "bad.xyz"
    bad.write_text("100000000000\n\nH 0 0 0\nH 0 0 1\n")
    t0 = time.perf_counter()
    assert io.count_frames(bad) is None  # progress bars only: unknown, not a hang
    with pytest.raises(
        ValueError, match=r"bad\.xyz: cannot read structures \(frame 1 claims 100000000000 atoms"
    ):
        io.read_structures(bad)
    with pytest.raises(
        ValueError, match=r"bad\.xyz: cannot read structures \(frame 1 claims 100000000000 atoms"
    ):
        next(io.iter_structures(bad))
    assert time.perf_counter() - t0 < 1.0


def test_xyz_header_after_a_good_frame_is_checked(tmp_path):
    import ase.io

    path = tmp_path / "t.extxyz"
    ase.io.write(path, _frames((3,)), format="extxyz")
    path.write_text(path.read_text() + "99999999999\ncomment\nH 0 0 0\n")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="frame 2 claims 99999999999 atoms"):
        io.read_structures(path)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("header", ["-3", "abc", "1e5"])
def test_xyz_header_that_is_not_a_count_is_refused(tmp_path, header):
    bad = tmp_path / "bad.xyz"
    bad.write_text(f"{header}\n\nH 0 0 0\n")
    with pytest.raises(
        ValueError, match=r"bad\.xyz: cannot read structures \(line 1 should be the atom count"
    ):
        io.read_structures(bad)
    assert io.count_frames(bad) is None


@pytest.mark.parametrize("block", [7, 64, 1 << 24])
def test_xyz_count_of_frames_of_varying_size_at_any_block_size(tmp_path, block):
    import ase.io

    path = tmp_path / "t.extxyz"
    ase.io.write(path, _frames(), format="extxyz")
    assert io._count_xyz_frames(path, block=block) == 4
    # a blank line ends the frames (ASE ignores what follows); no trailing newline is fine
    path.write_text(path.read_text() + "\n\ngarbage\n")
    assert io._count_xyz_frames(path, block=block) == 4
    text = path.read_text().split("\n\n\n")[0].rstrip("\n")
    path.write_text(text)
    assert io._count_xyz_frames(path, block=block) == 4
    assert len(io.read_structures(path)) == 4
    assert io.count_frames(path, "1:") == 3


def test_xyz_truncated_last_frame_is_refused(tmp_path):
    import ase.io

    path = tmp_path / "t.extxyz"
    ase.io.write(path, _frames(), format="extxyz")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]))
    with pytest.raises(
        ValueError, match=r"t\.extxyz: cannot read structures \(frame 4 claims 3 atoms but the file"
    ):
        io.read_structures(path)
    assert io.count_frames(path) is None


# ------------------------------------------------------------------ item 1: no code from a .pt
class _Touch:
    """Unpickling this calls ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _PathTouch:
    """Unpickling this calls ``pathlib.Path(<marker>).touch()``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _evil_pt(tmp_path: Path, payload: type, where: str) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    x = torch.rand(8, 5, dtype=torch.float64)
    data = {"descriptors": x, "n_atoms": torch.tensor([8]), "k": 3, "cutoff": 5.0}
    if where == "value":
        data["note"] = payload(marker)
    else:
        data = payload(marker)
    path = tmp_path / "evil.pt"
    torch.save(data, path)
    assert not marker.exists()
    return path, marker


@pytest.mark.parametrize("payload", [_Touch, _PathTouch])
@pytest.mark.parametrize("where", ["value", "top"])
def test_load_descriptors_refuses_a_pickle_that_runs_code(tmp_path, payload, where):
    path, marker = _evil_pt(tmp_path, payload, where)
    with pytest.raises(ValueError, match=r"evil\.pt: not a plain-data descriptor file"):
        io.load_descriptors(path)
    assert not marker.exists()


def test_refused_even_when_a_library_forces_unsafe_loads(tmp_path, monkeypatch):
    """mace sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 for the whole process when imported; it
    only changes torch.load calls that do not pass weights_only, and ours always do."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path, marker = _evil_pt(tmp_path, _Touch, "value")
    with pytest.raises(ValueError, match="not a plain-data descriptor file"):
        io.load_descriptors(path)
    assert not marker.exists()


def test_bank_from_file_and_add_refuse_a_pickle_that_runs_code(tmp_path):
    from quests_torch import UncertaintyBank

    path, marker = _evil_pt(tmp_path, _Touch, "value")
    with pytest.raises(ValueError, match="not a plain-data descriptor file"):
        UncertaintyBank.from_file(path)
    with pytest.raises(ValueError, match="not a plain-data descriptor file"):
        UncertaintyBank(k=3, cutoff=5.0).add(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["entropy", "{x}"],
        ["dh", "{x}", "-r", "{x}"],
        ["compress", "-s", "1", "{x}"],
        ["generations", "{x}", "{x}"],
    ],
)
def test_cli_refuses_a_pickle_that_runs_code_with_exit_2(tmp_path, capsys, command):
    from quests_torch.cli import main

    path, marker = _evil_pt(tmp_path, _Touch, "value")
    assert main([a.format(x=path) for a in command]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a plain-data descriptor file" in err and "evil.pt" in err
    assert len(err.splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_descriptor_file_round_trip(tmp_path, suffix, dtype):
    x = torch.rand(7, 9, dtype=dtype)  # k=5: 2k-1 = 9
    path = tmp_path / f"d{suffix}"
    io.save_descriptors(path, x, [3, 4], k=5, cutoff=4.5, extra={"note": "run 1"})
    if suffix == ".pt":  # plain data: torch's safe loader reads it as is
        assert torch.load(path, weights_only=True)["k"] == 5
    ds = io.load_descriptors(path)
    assert torch.equal(ds.x, x) and ds.x.dtype == dtype
    assert ds.n_atoms.tolist() == [3, 4] and ds.n_atoms.dtype == np.int64
    assert (ds.k, ds.cutoff, ds.dtype) == (5, 4.5, str(dtype).removeprefix("torch."))
    assert ds.meta["note"] == "run 1"
    assert ds.meta["quests_torch"] == qt.__version__
    assert ds.meta["descriptor_format"] == io.DESCRIPTOR_FORMAT


def test_descriptor_pt_file_of_version_0_1_still_loads(tmp_path):
    """Files of quests-torch 0.1 held ``n_atoms`` as a numpy array inside the .pt pickle."""
    x = torch.rand(6, 5, dtype=torch.float64)
    old = {
        "descriptors": x,
        "n_atoms": np.array([2, 4], dtype=np.int64),
        "k": 3,
        "cutoff": 5.0,
        "dtype": "float64",
        "quests_torch": "0.1.0",
    }
    path = tmp_path / "old.pt"
    torch.save(old, path)
    ds = io.load_descriptors(path)
    assert torch.equal(ds.x, x) and ds.n_atoms.tolist() == [2, 4] and ds.k == 3


# ------------------------------------------------------------------ item 9: file content checks
def _write_raw(path: Path, **entries) -> Path:
    if path.suffix == ".pt":
        torch.save(entries, path)
    else:
        np.savez(path, **entries)
    return path


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
@pytest.mark.parametrize(
    ("width", "k", "ok"),
    [(5, 3, True), (15, 3, True), (25, 3, True), (10, 3, False), (6, 3, False), (4, 3, False)],
)
def test_load_descriptors_checks_the_width_against_k(tmp_path, suffix, width, k, ok):
    """2k-1 columns, or (S+1)(2k-1) for S >= 2 species; 2(2k-1) (S = 1) is not a width."""
    path = _write_raw(
        tmp_path / f"d{suffix}",
        descriptors=np.random.default_rng(0).random((4, width)),
        n_atoms=np.array([4]),
        k=np.asarray(k),
        cutoff=np.asarray(5.0),
    )
    if ok:
        assert io.load_descriptors(path).x.shape == (4, width)
    else:
        with pytest.raises(ValueError, match=rf"d\{suffix}: `descriptors` has {width} columns "):
            io.load_descriptors(path)


def test_load_descriptors_checks_the_width_against_recorded_species(tmp_path):
    x = torch.rand(4, 15, dtype=torch.float64)  # k=3, 2 species: (2+1)*5
    io.save_descriptors(tmp_path / "a.npz", x, [4], k=3, cutoff=5.0, extra={"species": [1, 8]})
    assert io.load_descriptors(tmp_path / "a.npz").meta["species"] == [1, 8]
    _write_raw(
        tmp_path / "b.pt",
        descriptors=torch.rand(4, 15, dtype=torch.float64),
        k=3,
        cutoff=5.0,
        species=[1, 6, 8],
    )
    with pytest.raises(ValueError, match=r"has 15 columns but k=3 and 3 species give"):
        io.load_descriptors(tmp_path / "b.pt")


def test_save_descriptors_refuses_a_width_that_does_not_fit_k(tmp_path):
    with pytest.raises(ValueError, match=r"`x` has 6 columns but k=3 gives 2k-1 = 5"):
        io.save_descriptors(tmp_path / "d.npz", torch.rand(4, 6), [4], k=3, cutoff=5.0)
    assert not (tmp_path / "d.npz").exists()


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
@pytest.mark.parametrize(
    ("n_atoms", "match"),
    [
        (np.array([2, 3]), r"`n_atoms` sums to 5 but `descriptors` has 6 rows"),
        (np.array([3, 4]), r"`n_atoms` sums to 7 but `descriptors` has 6 rows"),
        (np.array([8, -2]), r"`n_atoms` must be a 1-D array of atom counts >= 0"),
        (np.array([3.0, 3.0]), r"`n_atoms` must be a 1-D array of atom counts >= 0"),
        (np.array([[3, 3]]), r"`n_atoms` must be a 1-D array of atom counts >= 0"),
    ],
)
def test_load_descriptors_checks_n_atoms_against_the_rows(tmp_path, suffix, n_atoms, match):
    path = _write_raw(
        tmp_path / f"d{suffix}",
        descriptors=np.random.default_rng(0).random((6, 5)),
        n_atoms=n_atoms,
        k=np.asarray(3),
        cutoff=np.asarray(5.0),
    )
    with pytest.raises(ValueError, match=rf"d\{suffix}: {match}"):
        io.load_descriptors(path)


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ({"descriptors": np.ones((4, 5), dtype=np.int64)}, r"must be float32 or float64"),
        ({"descriptors": np.full((4, 5), np.nan)}, r"contain NaN or inf"),
        ({"descriptors": np.ones(5)}, r"must be a non-empty \[n, d\] array"),
        ({"k": np.asarray("three")}, r"`k` must be a number"),
        ({"k": np.asarray(0)}, r"`k` must be >= 1"),
        ({"cutoff": np.asarray(-1.0)}, r"`cutoff` must be a positive distance"),
        ({"descriptor_format": np.asarray(99)}, r"descriptor format 99 is not one"),
    ],
)
def test_load_descriptors_refuses_inconsistent_content(tmp_path, entries, match):
    base = {"descriptors": np.ones((4, 5)), "k": np.asarray(3), "cutoff": np.asarray(5.0)}
    path = _write_raw(tmp_path / "d.npz", **{**base, **entries})
    with pytest.raises(ValueError, match=rf"d\.npz: .*{match}"):
        io.load_descriptors(path)


# ------------------------------------------------------------------ item 8: cache key and hit
@pytest.fixture
def small_xyz(tmp_path):
    import ase.io

    path = tmp_path / "s.extxyz"
    ase.io.write(path, _frames((4, 4)), format="extxyz")
    return path


def _cached(path, cache):
    return io.cached_descriptors(path, k=3, cutoff=4.0, cache_dir=cache)


def test_cache_key_holds_the_package_version(tmp_path, small_xyz, monkeypatch):
    cache = tmp_path / "cache"
    first, hit = _cached(small_xyz, cache)
    assert not hit and _cached(small_xyz, cache)[1]
    monkeypatch.setattr(io, "__version__", "99.0.0")
    again, hit = _cached(small_xyz, cache)
    assert not hit  # another version does not trust this version's entries
    assert torch.equal(again.x, first.x)
    assert len(list(cache.iterdir())) == 2


def test_cache_key_holds_the_descriptor_format(tmp_path, small_xyz, monkeypatch):
    cache = tmp_path / "cache"
    _cached(small_xyz, cache)
    monkeypatch.setattr(io, "DESCRIPTOR_FORMAT", io.DESCRIPTOR_FORMAT + 1)
    assert not _cached(small_xyz, cache)[1]


@pytest.mark.parametrize(
    "stale",
    [{"quests_torch": "0.0.1"}, {"descriptor_format": 0}, {"index": "0:1"}, {"quests_torch": None}],
)
def test_cache_hit_checks_version_and_format_recorded_in_the_entry(tmp_path, small_xyz, stale):
    """An entry under the right name but written by another version is recomputed."""
    cache = tmp_path / "cache"
    first, _ = _cached(small_xyz, cache)
    (entry,) = cache.iterdir()
    extra = {"index": ":", **stale}
    if stale.get("quests_torch", "") is None:  # an entry of 0.1: no version/format recorded
        np.savez(entry, descriptors=first.x.numpy() + 1, n_atoms=first.n_atoms, k=3, cutoff=4.0)
    else:
        io.save_descriptors(entry, first.x + 1, first.n_atoms, k=3, cutoff=4.0, extra=extra)
    again, hit = _cached(small_xyz, cache)
    assert not hit
    assert torch.equal(again.x, first.x)
    assert _cached(small_xyz, cache)[1]  # the entry was replaced by a good one


# ------------------------------------------------------------------ item 16: bank state at load
def _bank_state():
    from quests_torch import UncertaintyBank

    x = torch.rand(6, 5, dtype=torch.float64)
    return UncertaintyBank.from_descriptors(x, k=3, cutoff=4.0), x


@pytest.mark.parametrize("same_shape", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bank_load_state_dict_refuses_non_finite_descriptors(same_shape, bad):
    from quests_torch import UncertaintyBank

    bank, x = _bank_state()
    state = bank.state_dict()
    incoming = x.clone() if same_shape else torch.rand(9, 5, dtype=torch.float64)
    incoming[2, 1] = bad
    state["descriptors"] = incoming
    target = bank if same_shape else UncertaintyBank()
    before = target.descriptors.clone()
    with pytest.raises(ValueError, match=r"`descriptors` contains NaN or inf"):
        target.load_state_dict(state)
    assert torch.equal(target.descriptors, before)  # nothing of the bank changed


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_bank_load_state_dict_refuses_integer_descriptors(dtype):
    from quests_torch import UncertaintyBank

    bank, x = _bank_state()
    state = bank.state_dict()
    state["descriptors"] = (x * 10).to(dtype)
    with pytest.raises(TypeError, match=rf"`descriptors` must hold floating-point .*{dtype}"):
        UncertaintyBank().load_state_dict(state)
    with pytest.raises(TypeError, match="must hold floating-point"):
        bank.load_state_dict(state)


def test_bank_state_dict_round_trip_through_a_weights_only_file(tmp_path):
    from quests_torch import UncertaintyBank

    bank, x = _bank_state()
    torch.save(bank.state_dict(), tmp_path / "bank.pt")
    fresh = UncertaintyBank()
    fresh.load_state_dict(torch.load(tmp_path / "bank.pt", weights_only=True))
    assert torch.equal(fresh.descriptors, x) and (fresh.k, fresh.cutoff) == (3, 4.0)


# ------------------------------------------------------------------ fuzz finding: inf positions
def test_structures_with_non_finite_positions_are_refused(tmp_path):
    """A damaged digit (``1.808`` -> ``1e808``) parses as inf; found by the fuzz suite."""
    import ase.io

    path = tmp_path / "t.extxyz"
    ase.io.write(path, _frames((3, 3)), format="extxyz")
    lines = path.read_text().splitlines()
    lines[-1] = lines[-1].rsplit(None, 1)[0] + " 1e808"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"t\.extxyz: structure 1 .* non-finite positions"):
        io.read_structures(path)
    stream = io.iter_structures(path)
    assert len(next(stream)) == 3  # the good frame streams, the damaged one is refused
    with pytest.raises(ValueError, match=r"t\.extxyz: structure 1 .* non-finite positions"):
        next(stream)
