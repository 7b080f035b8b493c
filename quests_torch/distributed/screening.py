"""Trajectory screening: a block of frames per rank, parts merged by rank 0."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import screening as _screening
from ..clusters import DEFAULT_CLUSTER_CUTOFF
from ..descriptors import DEFAULT_CUTOFF, DEFAULT_K
from ..io import atomic_write, check_index, count_frames, iter_structures
from ..kde import (
    DEFAULT_BANDWIDTH,
)
from ..resume import (
    TableInUseError,
    new_state,
    reference_hash,
    resume_state,
    screening_identity,
    state_path,
    table_lock,
    verify_committed,
    write_state,
)
from ..resume import trajectory_key as _content_key
from ..screening import ScreeningResult, ScreenTimings, default_batch_atoms
from ..structures import resolve_device
from . import comm

# --------------------------------------------------------------------------------------------
# trajectory screening
# --------------------------------------------------------------------------------------------


def _selected_frames(trajectory: Path, index: str) -> range:
    """The positions in the file of the frames selected by ``index``."""
    from ase.io.formats import string2index

    sel = string2index(index)
    total = count_frames(trajectory, ":")
    if total is None:  # a format without a cheap count: parse the file once
        total = sum(1 for _ in iter_structures(trajectory, ":"))
    if isinstance(sel, int):
        if not -total <= sel < total:
            return range(0)
        i = sel % total
        return range(i, i + 1)
    return range(total)[sel]


def _index_of(block: range) -> str:
    """An ASE slice string selecting exactly the file positions in ``block`` (non-empty)."""
    stop = block[-1] + block.step
    return f"{block.start}:{'' if stop < 0 else stop}:{block.step}"


def _parts_folder(table: Path) -> Path:
    return table.with_name(table.name + ".parts")


def _concatenate(out_path: Path, sources: list[Path], head: str) -> tuple[int, str]:
    """Write ``head`` then every source (without its first ``len(head)`` bytes, the same
    header) into ``out_path`` atomically; returns its size and SHA-256."""
    digest = hashlib.sha256(head.encode())
    size = len(head.encode())

    def write(p: Path) -> None:
        nonlocal size
        with open(p, "wb") as out:
            out.write(head.encode())
            for source in sources:
                with open(source, "rb") as fh:
                    fh.seek(len(head.encode()))
                    while block := fh.read(1 << 24):
                        out.write(block)
                        digest.update(block)
                        size += len(block)

    atomic_write(out_path, write)
    return size, digest.hexdigest()


def _merge_parts(
    parts: list[tuple[Path, Path | None]], table: Path, xyz_path: Path | None, header: str
) -> tuple[dict, dict]:
    """Concatenate the part files in order into ``table`` (and ``xyz_path``), each atomically;
    returns the ``bytes`` and ``sha256`` of the outputs, as the resume state records them."""
    n_bytes, sha = {}, {}
    n_bytes["table"], sha["table"] = _concatenate(table, [t for t, _ in parts], header)
    n_bytes["extxyz"], sha["extxyz"] = 0, hashlib.sha256().hexdigest()
    if xyz_path is not None:
        n_bytes["extxyz"], sha["extxyz"] = _concatenate(xyz_path, [x for _, x in parts], "")
    return n_bytes, sha


#: exception types rank 0's decision can report to the other ranks (default ValueError)
_DECISION_ERRORS = {
    "FileNotFoundError": FileNotFoundError,
    "TableInUseError": TableInUseError,
    "OSError": OSError,
}


def screen_trajectory(
    trajectory: str | os.PathLike,
    reference: torch.Tensor | np.ndarray,
    table: str | os.PathLike,
    *,
    index: str = ":",
    extxyz: str | os.PathLike | None = None,
    h: float = DEFAULT_BANDWIDTH,
    threshold: float = 0.0,
    k: int = DEFAULT_K,
    cutoff: float = DEFAULT_CUTOFF,
    cluster_cutoff: float = DEFAULT_CLUSTER_CUTOFF,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = "cpu",
    batch_atoms: int | None = None,
    reference_key: str | None = None,
    trajectory_key: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    keep_parts: bool = False,
) -> ScreeningResult:
    """:func:`quests_torch.screening.screen_trajectory` with the frames split over ranks.

    The ``F`` selected frames are cut into ``W`` contiguous blocks (:func:`shard_range`); rank
    ``r`` screens its block with :func:`quests_torch.screening.screen_trajectory` into
    ``<table>.parts/rank<r>-of-<W><suffix>`` (and an extxyz part), with its own resume state
    and the ``frame`` column numbered in the whole selection. When every rank is done, rank 0
    concatenates the parts in rank (= frame) order into ``table`` and ``extxyz`` (each written
    atomically) between two writes of ``<table>.state.json``: one of this screening with
    nothing committed, before, and one marking it complete, after; the parts are then
    deleted (``keep_parts=False``). Every frame is in exactly one block, so none is lost or
    duplicated, and a crash during the merge is resumed by merging again. Rank 0 holds the
    table's lock (:func:`quests_torch.resume.table_lock`) for the whole run, and the state's
    rules (content keys, verified committed bytes) are those of the single-process run.

    Interrupted runs: rerun the same command with the same number of ranks; every rank
    resumes its part from its last committed batch. A rerun of a finished screening (with any
    number of ranks, or :func:`quests_torch.screening.screen_trajectory` in one process)
    screens nothing. A rank that raises makes every rank raise (no rank waits forever);
    a rank killed outright is handled by ``torchrun``, which stops the others.

    Several nodes need a shared filesystem for the folder of ``table`` (rank 0 reads the
    other ranks' parts). Each rank needs the whole ``reference``.

    Args:
        keep_parts: keep ``<table>.parts/`` after the merge.
        Other arguments: as in :func:`quests_torch.screening.screen_trajectory`;
        ``progress`` shows rank 0's bar only.

    Returns:
        :class:`quests_torch.screening.ScreeningResult` of the merged table on every rank;
        ``frames_screened``/``frames_resumed`` summed over ranks, ``timings`` the largest per
        stage over ranks, ``batch_atoms`` this rank's.
    """
    if not comm.is_distributed():
        return _screening.screen_trajectory(
            trajectory,
            reference,
            table,
            index=index,
            extxyz=extxyz,
            h=h,
            threshold=threshold,
            k=k,
            cutoff=cutoff,
            cluster_cutoff=cluster_cutoff,
            dtype=dtype,
            device=device,
            batch_atoms=batch_atoms,
            reference_key=reference_key,
            trajectory_key=trajectory_key,
            overwrite=overwrite,
            progress=progress,
        )
    t_start = time.perf_counter()
    _screening._check_screen_params(h, threshold, k, cutoff, cluster_cutoff, batch_atoms)
    check_index(index)
    trajectory = Path(trajectory)
    if not trajectory.exists():
        raise FileNotFoundError(f"{trajectory}: no such file")
    table = Path(table)
    jsonl = table.suffix.lower() == ".jsonl"
    xyz_path = Path(extxyz) if extxyz is not None else None
    header = "" if jsonl else ",".join(_screening.FRAME_COLUMNS) + "\n"
    r = comm.rank()

    # rank 0 decides (one view of the files), holding the table's lock for the whole run:
    # "done", or the frame range to screen; the content keys are computed once, here
    lock = ExitStack()
    decision: tuple = ("error", "ValueError", "")
    params: dict = {}
    key = ""
    if r == 0:
        try:
            lock.enter_context(table_lock(table))
            keys = (
                _content_key(trajectory) if trajectory_key is None else trajectory_key,
                reference_hash(reference) if reference_key is None else reference_key,
            )
            params, key = screening_identity(
                trajectory_key=keys[0],
                reference_key=keys[1],
                index=index,
                h=h,
                threshold=threshold,
                k=k,
                cutoff=cutoff,
                cluster_cutoff=cluster_cutoff,
                dtype=dtype,
                jsonl=jsonl,
                xyz_path=xyz_path,
            )
            state = resume_state(table, key, params, overwrite=overwrite, header=header)
            if state is not None and state.get("complete") is True:
                for name, path in (("table", table), ("extxyz", xyz_path)):
                    if path is not None:
                        verify_committed(path, state, name, exact=True)
                decision = ("done", state["frames_done"], keys)
            else:
                for name, path in (("table", table), ("extxyz", xyz_path)):
                    if state is not None and path is not None and path.exists():
                        verify_committed(path, state, name)  # the merge would replace it
                frames = _selected_frames(trajectory, index)
                if len(frames) == 0:
                    raise ValueError(f"{trajectory}: the selection {index!r} holds no structures")
                decision = ("run", (frames.start, frames.stop, frames.step), keys)
        except (ValueError, OSError) as exc:
            lock.close()
            decision = ("error", type(exc).__name__, str(exc))
    decision = comm.broadcast_object(decision)
    if decision[0] == "error":
        raise _DECISION_ERRORS.get(decision[1], ValueError)(decision[2])
    with lock:
        screened, resumed, timings, local_batch = _screen_parts(
            decision,
            trajectory,
            reference,
            table,
            xyz_path,
            params=params,
            key=key,
            header=header,
            h=h,
            threshold=threshold,
            k=k,
            cutoff=cutoff,
            cluster_cutoff=cluster_cutoff,
            dtype=dtype,
            device=device,
            batch_atoms=batch_atoms,
            overwrite=overwrite,
            progress=progress,
            keep_parts=keep_parts,
        )
    stats = torch.tensor([float(screened), float(resumed)], dtype=torch.float64)
    screened, resumed = (int(v) for v in comm.all_reduce(stats, dist.ReduceOp.SUM).tolist())
    names = list(ScreenTimings.__dataclass_fields__)
    spent = torch.tensor([getattr(timings, f) for f in names], dtype=torch.float64)
    spent = comm.all_reduce(spent, dist.ReduceOp.MAX).tolist()
    frames_table = _screening.read_frame_table(table)
    return ScreeningResult(
        table=table,
        extxyz=xyz_path,
        frames=frames_table,
        summary=_screening.summarize_frames(frames_table),
        frames_screened=screened,
        frames_resumed=resumed,
        batch_atoms=local_batch,
        timings=ScreenTimings(**dict(zip(names, spent, strict=True))),
        seconds=time.perf_counter() - t_start,
    )


def _screen_parts(
    decision: tuple,
    trajectory: Path,
    reference,
    table: Path,
    xyz_path: Path | None,
    *,
    params: dict,
    key: str,
    header: str,
    batch_atoms: int | None,
    overwrite: bool,
    progress: bool,
    keep_parts: bool,
    device,
    **kw,
) -> tuple[int, int, ScreenTimings, int]:
    """Every rank screens its block into its part (resumable); rank 0 merges the parts.

    Rank 0 writes the table's state *before* the merged files: first a state with nothing
    committed but the header, then the table and extxyz, then the state marking them
    complete; the parts are deleted only after that. A crash anywhere in between leaves a
    state of this screening that is not complete, so a rerun resumes the (finished) parts
    and merges them again.

    Returns:
        frames screened and resumed by this rank, its timings and ``batch_atoms``.
    """
    w, r = comm.world_size(), comm.rank()
    if decision[0] == "done":
        return 0, decision[1] if r == 0 else 0, ScreenTimings(), batch_atoms or 0
    traj_key, ref_key = decision[2]
    timings = ScreenTimings()
    screened = resumed = 0
    local_batch = batch_atoms or 0
    frames = range(*decision[1])
    f0, f1 = comm.shard_range(len(frames))
    folder = _parts_folder(table)
    suffix = ".csv" if header else ".jsonl"
    name = f"rank{r:05d}-of-{w:05d}"
    error: BaseException | None = None
    if f1 > f0:
        try:
            part = _screening.screen_trajectory(
                trajectory,
                reference,
                folder / f"{name}{suffix}",
                index=_index_of(frames[f0:f1]),
                extxyz=None if xyz_path is None else folder / f"{name}.extxyz",
                device=device,
                batch_atoms=batch_atoms,
                reference_key=ref_key,
                trajectory_key=traj_key,
                overwrite=overwrite,
                progress=progress and r == 0,
                frame_offset=f0,
                **kw,
            )
            screened, resumed = part.frames_screened, part.frames_resumed
            timings, local_batch = part.timings, part.batch_atoms
        except BaseException as exc:  # every rank must reach the status exchange below
            error = exc
    try:
        comm.raise_if_any_failed(error, "screening")
    except BaseException:
        if r == 0:
            try:
                folder.rmdir()  # only when empty: a run that failed on its input leaves nothing
            except OSError:
                pass
        raise

    # rank 0 merges; the others wait for its outcome
    outcome = None
    if r == 0:
        try:
            t0 = time.perf_counter()
            parts = []
            for q in range(w):
                a, b = comm.shard_range(len(frames), q, w)
                if b > a:
                    stem = f"rank{q:05d}-of-{w:05d}"
                    parts.append(
                        (
                            folder / f"{stem}{suffix}",
                            None if xyz_path is None else folder / f"{stem}.extxyz",
                        )
                    )
            state = new_state(
                key,
                params,
                local_batch or default_batch_atoms(params["k"], resolve_device(device)),
                header,
                trajectory_path=str(trajectory),
                world_size=w,
            )
            write_state(state_path(table), state)  # first: nothing committed but the header
            n_bytes, sha = _merge_parts(parts, table, xyz_path, header)
            state.update(frames_done=len(frames), complete=True, bytes=n_bytes, sha256=sha)
            write_state(state_path(table), state)
            if not keep_parts:
                shutil.rmtree(_parts_folder(table), ignore_errors=True)
            timings.write += time.perf_counter() - t0
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
    outcome = comm.broadcast_object(outcome)
    if outcome is not None:
        raise RuntimeError(f"merging the screening parts failed on rank 0: {outcome}")
    return screened, resumed, timings, local_batch
