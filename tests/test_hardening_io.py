"""Issue 14 hardening of the file layer: no code execution from descriptor files, no hang on a
malformed xyz header, output permissions, cache keys, descriptor file checks, bank state."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

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
    with pytest.raises(ValueError, match=r"bad\.xyz: frame 1 claims 100000000000 atoms"):
        io.read_structures(bad)
    with pytest.raises(ValueError, match=r"bad\.xyz: frame 1 claims 100000000000 atoms"):
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
    with pytest.raises(ValueError, match=r"bad\.xyz: line 1 should be the atom count of frame 1"):
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
    with pytest.raises(ValueError, match=r"t\.extxyz: frame 4 claims 3 atoms but the file ends"):
        io.read_structures(path)
    assert io.count_frames(path) is None
