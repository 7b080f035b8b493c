"""Hardening of the resumable screening (issue 14): a resume that cannot be fooled by another
trajectory, reference or an edited table, one writer per table, no leftovers from a failed
start, errors that name the frame and the file.

The guarantees hold for both front ends: the tests taking ``front`` run
:func:`quests_torch.screening.screen_trajectory` and the sharded
:func:`quests_torch.distributed.screen_trajectory` (on a one-rank gloo group, forced onto its
distributed path: part files, merge by rank 0).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import torch.distributed as dist
from ase import Atoms
from conftest import rattled_fcc

import quests_torch as qt
from quests_torch import distributed as qd
from quests_torch import screening
from quests_torch.cli import main
from quests_torch.screening import read_frame_table, screen_frames

KW = dict(batch_atoms=64)  # two 32-atom frames per batch


def _frames(n: int = 6, seed: int = 0) -> list:
    return [rattled_fcc((2, 2, 2), stdev=0.02 + 0.04 * i, seed=seed + i) for i in range(n)]


def _write(path: Path, frames: list) -> Path:
    ase.io.write(path, frames, format="extxyz")
    return path


@pytest.fixture(scope="module")
def ref() -> torch.Tensor:
    return qt.get_descriptors(rattled_fcc((2, 2, 2), stdev=0.02, seed=10))


@pytest.fixture(params=["single", "distributed"])
def front(request, tmp_path, monkeypatch):
    """The screening front end under test."""
    if request.param == "single":
        yield screening.screen_trajectory
        return
    dist.init_process_group(
        "gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1
    )
    monkeypatch.setattr(qd.comm, "is_distributed", lambda: True)
    try:
        yield qd.screen_trajectory
    finally:
        dist.destroy_process_group()


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ------------------------------------------------------------ item 2: resume keyed on content


def test_resume_refuses_another_trajectory_under_the_same_name(tmp_path, ref, front):
    traj = _write(tmp_path / "traj.extxyz", _frames())
    table = tmp_path / "t.csv"
    first = front(traj, ref, table, **KW)
    assert first.frames_screened == 6
    _write(traj, _frames(seed=100))  # another file, same name, same number of frames
    with pytest.raises(ValueError, match="trajectory's content changed") as info:
        front(traj, ref, table, **KW)
    assert str(table) in str(info.value) and "--overwrite" in str(info.value)
    # --overwrite starts afresh on the new file
    again = front(traj, ref, table, overwrite=True, **KW)
    assert (again.frames_screened, again.frames_resumed) == (6, 0)
    new = list(screen_frames(ase.io.read(traj, ":"), ref, **KW))
    np.testing.assert_array_equal(read_frame_table(table)["dH_max"], [f.dH_max for f in new])


def test_resume_refuses_a_trajectory_replaced_mid_run(tmp_path, ref):
    traj = _write(tmp_path / "traj.extxyz", _frames())
    table = tmp_path / "t.csv"
    screening.screen_trajectory(traj, ref, table, **KW)
    state_file = tmp_path / "t.csv.state.json"
    state = json.loads(state_file.read_text())
    state.update(complete=False)  # as if killed after the last batch
    state_file.write_text(json.dumps(state))
    _write(traj, _frames(seed=100))
    with pytest.raises(ValueError, match="trajectory's content changed"):
        screening.screen_trajectory(traj, ref, table, **KW)


def test_resume_refusal_names_the_reference_or_the_parameter(tmp_path, ref, front):
    traj = _write(tmp_path / "traj.extxyz", _frames())
    table = tmp_path / "t.csv"
    front(traj, ref, table, **KW)
    other = qt.get_descriptors(rattled_fcc((2, 2, 2), stdev=0.03, seed=11))
    with pytest.raises(ValueError, match="reference descriptors changed") as info:
        front(traj, other, table, **KW)
    assert "parameter" not in str(info.value) and "trajectory" not in str(info.value)
    with pytest.raises(ValueError, match=r"parameter `threshold` changed \(0.0 -> 1.0\)"):
        front(traj, ref, table, threshold=1.0, **KW)
    with pytest.raises(ValueError, match=r"parameter `cutoff` changed"):
        front(traj, ref, table, cutoff=4.0, **KW)
    # the same inputs under another path (a moved trajectory) still resume
    moved = tmp_path / "moved.extxyz"
    traj.rename(moved)
    res = front(moved, ref, table, **KW)
    assert (res.frames_screened, res.frames_resumed) == (0, 6)


# ------------------------------------------------------------ item 3: one writer per table


def _hold_lock(table: Path) -> int:
    fd = os.open(table.with_name(table.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_table_in_use_is_refused(tmp_path, ref, front):
    traj = _write(tmp_path / "traj.extxyz", _frames())
    table = tmp_path / "t.csv"
    fd = _hold_lock(table)
    try:
        with pytest.raises(OSError, match="in use by another screening") as info:
            front(traj, ref, table, **KW)
        assert str(table) in str(info.value)
        assert not table.exists() and not (tmp_path / "t.csv.state.json").exists()
    finally:
        os.close(fd)
    res = front(traj, ref, table, **KW)  # released: it runs
    assert res.frames_screened == 6
    # the lock file stays beside the table (the lock is its flock, which a dead run
    # releases): nothing stale for a user to delete while a run holds it
    assert (tmp_path / "t.csv.lock").exists()
    assert read_frame_table(table)["frame"].tolist() == list(range(6))


def test_cli_table_in_use_exits_2_with_one_line(tmp_path, ref, capsys):
    traj = _write(tmp_path / "traj.extxyz", _frames(2))
    _write(tmp_path / "ref.extxyz", [rattled_fcc((2, 2, 2), stdev=0.02, seed=10)])
    table = tmp_path / "t.csv"
    argv = ["screen", str(traj), "-r", str(tmp_path / "ref.extxyz"), "--table", str(table)]
    argv += ["--no-cache", "--device", "cpu", "-q"]
    fd = _hold_lock(table)
    try:
        assert main(argv) == 2
    finally:
        os.close(fd)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by another screening" in err[0] and str(table) in err[0]
    assert main(argv) == 0


# ------------------------------------------------- item 4: committed bytes verified by SHA-256


@pytest.mark.parametrize("complete", [True, False])
def test_an_edited_table_is_refused_never_truncated(tmp_path, ref, front, complete):
    traj = _write(tmp_path / "traj.extxyz", _frames())
    table = tmp_path / "t.csv"
    front(traj, ref, table, **KW)
    if not complete:  # a run killed after its last commit
        state_file = tmp_path / "t.csv.state.json"
        state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "complete": False}))
    crlf = table.read_bytes().replace(b"\n", b"\r\n")  # a spreadsheet saved it
    table.write_bytes(crlf)
    with pytest.raises(ValueError, match="committed rows changed") as info:
        front(traj, ref, table, **KW)
    assert str(table) in str(info.value)
    assert table.read_bytes() == crlf  # untouched, not cut mid-row


def test_an_edited_extxyz_is_refused(tmp_path, ref):
    traj = _write(tmp_path / "traj.extxyz", _frames())
    table, xyz = tmp_path / "t.csv", tmp_path / "dh.extxyz"
    screening.screen_trajectory(traj, ref, table, extxyz=xyz, **KW)
    edited = xyz.read_bytes().replace(b"Cu", b"Ni", 1)
    xyz.write_bytes(edited)
    with pytest.raises(ValueError, match=f"{xyz.name}: its committed rows changed"):
        screening.screen_trajectory(traj, ref, table, extxyz=xyz, **KW)
    assert xyz.read_bytes() == edited


# --------------------------------------------------- item 10: no outputs from a failed start


def test_a_selection_without_frames_leaves_no_outputs(tmp_path, ref, front):
    traj = _write(tmp_path / "traj.extxyz", _frames())
    with pytest.raises(ValueError, match="holds no structures"):
        front(traj, ref, tmp_path / "out" / "t.csv", index="10:", extxyz=tmp_path / "d.xyz")
    assert _leftovers(tmp_path, {"traj.extxyz", "store"}) == []


def test_a_bad_first_frame_leaves_no_outputs(tmp_path, ref, front):
    frames = _frames()
    frames[0].positions[1] = frames[0].positions[0]
    traj = _write(tmp_path / "traj.extxyz", frames)
    with pytest.raises(ValueError, match="coincident atoms in frame 0"):
        front(traj, ref, tmp_path / "t.csv", extxyz=tmp_path / "d.extxyz", **KW)
    assert _leftovers(tmp_path, {"traj.extxyz", "store"}) == []


# ---------------------------------------------------------- item 11: errors name the frame


def test_batch_errors_name_the_frame_not_the_structure_in_the_batch(tmp_path, ref):
    frames = _frames()
    frames[3].positions[1] = frames[3].positions[0]  # batch [2, 3]: structure 1 of it
    with pytest.raises(ValueError, match="coincident atoms in frame 3:") as info:
        list(screen_frames(frames, ref, **KW))
    assert "structure" not in str(info.value)
    traj = _write(tmp_path / "traj.extxyz", frames)
    with pytest.raises(ValueError, match="coincident atoms in frame 3:") as info:
        screening.screen_trajectory(traj, ref, tmp_path / "t.csv", **KW)
    assert str(traj) in str(info.value)
    assert read_frame_table(tmp_path / "t.csv")["frame"].tolist() == [0, 1]  # committed before
    frames = _frames()
    frames[3] = Atoms()  # batch [2, 3, 4]: structure 1 of it
    with pytest.raises(ValueError, match=r"^frame 3 has no atoms$"):
        list(screen_frames(frames, ref, **KW))


# ------------------------------------------------------ item 13: a state that is not a state


@pytest.mark.parametrize("text", ["[]", "3", "null", '"state"', "{", '{"key": 1}'])
def test_a_state_that_is_not_an_object_is_a_clear_error(tmp_path, ref, front, text):
    traj = _write(tmp_path / "traj.extxyz", _frames(2))
    table = tmp_path / "t.csv"
    table.write_text(",".join(screening.FRAME_COLUMNS) + "\n")
    state_file = tmp_path / "t.csv.state.json"
    state_file.write_text(text)
    with pytest.raises(ValueError, match="not a valid screening resume state") as info:
        front(traj, ref, table, **KW)
    assert str(state_file) in str(info.value)
    assert front(traj, ref, table, overwrite=True, **KW).frames_screened == 2


@pytest.mark.parametrize("field,value", [("frames_done", "2"), ("bytes", [1]), ("sha256", None)])
def test_a_state_with_bad_fields_is_a_clear_error(tmp_path, ref, field, value):
    traj = _write(tmp_path / "traj.extxyz", _frames(2))
    table = tmp_path / "t.csv"
    screening.screen_trajectory(traj, ref, table, **KW)
    state_file = tmp_path / "t.csv.state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), field: value}))
    with pytest.raises(ValueError, match=f"{state_file.name}: not a valid .*`{field}`"):
        screening.screen_trajectory(traj, ref, table, **KW)


def test_cli_state_not_an_object_exits_2_with_one_line(tmp_path, capsys):
    traj = _write(tmp_path / "traj.extxyz", _frames(2))
    _write(tmp_path / "ref.extxyz", [rattled_fcc((2, 2, 2), stdev=0.02, seed=10)])
    table = tmp_path / "t.csv"
    (tmp_path / "t.csv.state.json").write_text("[]")
    argv = ["screen", str(traj), "-r", str(tmp_path / "ref.extxyz"), "--table", str(table)]
    assert main([*argv, "--no-cache", "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "t.csv.state.json: not a valid screening resume state" in err[0]


# ------------------------------------------- item 14: a crash inside the distributed merge


@pytest.mark.parametrize("crash_at", [1, 2, 3])
def test_distributed_merge_crash_resumes(tmp_path, ref, monkeypatch, crash_at):
    """The merge writes the table's state and the merged table; a crash before the
    ``crash_at``-th of those writes is resumed by the rerun, whatever the order."""
    dist.init_process_group(
        "gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1
    )
    monkeypatch.setattr(qd.comm, "is_distributed", lambda: True)
    try:
        traj = _write(tmp_path / "traj.extxyz", _frames())
        table, xyz = tmp_path / "t.csv", tmp_path / "d.extxyz"
        targets = {table, tmp_path / "t.csv.state.json"}
        real_replace, writes = os.replace, []

        def crashing(src, dst, *args, **kwargs):
            if Path(dst) in targets:
                writes.append(Path(dst).name)
                if len(writes) == crash_at:
                    raise OSError("simulated crash")
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", crashing)
        with pytest.raises(RuntimeError, match="simulated crash"):
            qd.screen_trajectory(traj, ref, table, extxyz=xyz, **KW)
        monkeypatch.setattr(os, "replace", real_replace)
        res = qd.screen_trajectory(traj, ref, table, extxyz=xyz, **KW)
        assert (res.frames_screened, res.frames_resumed) == (0, 6)
        again = qd.screen_trajectory(traj, ref, table, extxyz=xyz, **KW)
        assert (again.frames_screened, again.frames_resumed) == (0, 6)
    finally:
        dist.destroy_process_group()
    one = tmp_path / "one.csv"
    screening.screen_trajectory(traj, ref, one, extxyz=tmp_path / "o.xyz", **KW)
    assert table.read_bytes() == one.read_bytes()
    assert xyz.read_bytes() == (tmp_path / "o.xyz").read_bytes()
    # and a single-process rerun finds the merged screening complete
    single = screening.screen_trajectory(traj, ref, table, extxyz=xyz, **KW)
    assert (single.frames_screened, single.frames_resumed) == (0, 6)
