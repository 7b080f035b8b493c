"""Issue 14 hardening of the file layer: no code execution from descriptor files, no hang on a
malformed xyz header, output permissions, cache keys, descriptor file checks, bank state."""

from __future__ import annotations

import os
import stat
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
