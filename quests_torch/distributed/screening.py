"""Trajectory screening: a block of frames per rank, parts merged by rank 0.

Each rank screens its block with the single-process core
(:func:`quests_torch.screening.screen_file`, its own resume state per part); this module only
splits the frames by rank and merges the parts.
"""

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
from ..checks import bind_arguments
from ..io import atomic_write, count_frames, iter_structures
from ..resume import ResumeState, TableInUseError, table_lock
from ..screening import (
    ScreenConfig,
    ScreenFiles,
    ScreeningResult,
    ScreenTimings,
    check_run_keywords,
    screen_file,
)
from . import comm


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
    parts: list[tuple[Path, Path | None]], files: ScreenFiles, header: str
) -> tuple[dict, dict]:
    """Concatenate the part files in order into ``table`` (and ``xyz_path``), each atomically;
    returns the ``bytes`` and ``sha256`` of the outputs, as the resume state records them."""
    n_bytes, sha = {}, {}
    table, xyz_path = files.table, files.extxyz
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
    keep_parts: bool = False,
    **options,
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

    Takes every keyword of :func:`quests_torch.screening.screen_trajectory` (the same
    defaults and checks; an unknown keyword is a ``TypeError`` naming it) except
    ``frame_offset`` (of :func:`quests_torch.screening.screen_file`), which the ranks set for
    their parts. Per rank: ``device`` is where
    each rank computes, ``batch_atoms`` its atoms per batch, ``progress`` a bar on rank 0
    only (of its own block); ``reference_key`` and ``trajectory_key``, when not given, are
    computed once on rank 0.

    Args:
        trajectory: any ASE-readable trajectory (the same path on every rank).
        reference: ``[m, 2k - 1]`` reference descriptors (the whole of them on every rank).
        table: merged per-frame output table (``.jsonl``: JSON lines, anything else CSV).
        keep_parts: keep ``<table>.parts/`` after the merge (default ``False``: deleted).
        **options: the keywords of :func:`quests_torch.screening.screen_trajectory`
            (``index`` is split over the ranks; ``extxyz`` is merged from the ranks' parts
            like the table).

    Returns:
        :class:`quests_torch.screening.ScreeningResult` of the merged table on every rank;
        ``frames_screened``/``frames_resumed`` summed over ranks, ``timings`` the largest per
        stage over ranks, ``batch_atoms`` this rank's.
    """
    args = bind_arguments(
        _screening.screen_trajectory, "screen_trajectory", (trajectory, reference, table), options
    )
    run = check_run_keywords(args["run"], "screen_trajectory", refuse=("frame_offset",))
    config = ScreenConfig.from_arguments(args)
    files = ScreenFiles.check(
        trajectory, table, index=args["index"], extxyz=args["extxyz"], readers=args["readers"],
        types=args["types"],
    )  # fmt: skip
    keys = {name: run[name] for name in ("trajectory_key", "reference_key")}
    overwrite, progress = run["overwrite"], run["progress"]
    if not comm.is_distributed():
        return screen_file(files, reference, config, **keys, overwrite=overwrite, progress=progress)
    t_start = time.perf_counter()
    # rank 0 decides (one view of the files), holding the table's lock for the whole run:
    # "done", or the frame range to screen; the content keys are computed once, there
    lock = ExitStack()
    decision: tuple = ("error", "ValueError", "")
    if comm.rank() == 0:
        decision = _decide(files, reference, config, keys, overwrite, lock)
    decision = comm.broadcast_object(decision)
    if decision[0] == "error":
        raise _DECISION_ERRORS.get(decision[1], ValueError)(decision[2])
    with lock:
        screened, resumed, timings, local_batch = _screen_parts(
            decision, files, reference, config, overwrite, progress, keep_parts
        )
    return _gathered(files, screened, resumed, timings, local_batch, t_start)


def _gathered(
    files: ScreenFiles,
    screened: int,
    resumed: int,
    timings: ScreenTimings,
    batch_atoms: int,
    t_start: float,
) -> ScreeningResult:
    """The result on every rank: frames summed over ranks, the largest time per stage."""
    stats = torch.tensor([float(screened), float(resumed)], dtype=torch.float64)
    screened, resumed = (int(v) for v in comm.all_reduce(stats, dist.ReduceOp.SUM).tolist())
    names = list(ScreenTimings.__dataclass_fields__)
    spent = torch.tensor([getattr(timings, f) for f in names], dtype=torch.float64)
    spent = comm.all_reduce(spent, dist.ReduceOp.MAX).tolist()
    return ScreeningResult.from_table(
        files,
        screened=screened,
        resumed=resumed,
        batch_atoms=batch_atoms,
        timings=ScreenTimings(**dict(zip(names, spent, strict=True))),
        t_start=t_start,
    )


def _decide(
    files: ScreenFiles, reference, config: ScreenConfig, keys: dict, overwrite: bool, lock
) -> tuple:
    """Rank 0's decision: ``("done", frames, params, key)`` for a complete screening (its
    outputs verified whole), ``("run", (start, stop, step), params, key)`` for the file
    positions to screen, or ``("error", type name, message)``; takes the table's lock into
    ``lock`` (released on error)."""
    try:
        lock.enter_context(table_lock(files.table))
        params, key = files.identity(config, reference, **keys)
        state = files.open_state(key, params, overwrite=overwrite)
        if state.is_complete:
            state.validate(exact=True)
            return ("done", state.frames_done, params, key)
        if state.record is not None:
            state.validate(missing_ok=True)  # the merge would replace the outputs
        frames = _selected_frames(files.trajectory, files.index)
        if len(frames) == 0:
            raise files.no_structures()
        return ("run", (frames.start, frames.stop, frames.step), params, key)
    except (ValueError, OSError) as exc:
        lock.close()
        return ("error", type(exc).__name__, str(exc))


def _part_files(files: ScreenFiles, frames: range, q: int, w: int) -> ScreenFiles:
    """The part of rank ``q`` of ``w``: its block of ``frames`` and its output files."""
    a, b = comm.shard_range(len(frames), q, w)
    folder, stem = _parts_folder(files.table), f"rank{q:05d}-of-{w:05d}"
    return ScreenFiles(
        files.trajectory,
        _index_of(frames[a:b]) if b > a else ":",
        folder / f"{stem}{'.jsonl' if files.jsonl else '.csv'}",
        None if files.extxyz is None else folder / f"{stem}.extxyz",
        files.readers,
        files.types,
    )


def _screen_parts(
    decision: tuple,
    files: ScreenFiles,
    reference,
    config: ScreenConfig,
    overwrite: bool,
    progress: bool,
    keep_parts: bool,
) -> tuple[int, int, ScreenTimings, int]:
    """Every rank screens its block into its part (resumable); rank 0 merges the parts.

    Returns:
        frames screened and resumed by this rank, its timings and ``batch_atoms``.
    """
    w, r = comm.world_size(), comm.rank()
    local_batch = config.batch_atoms or 0
    if decision[0] == "done":
        return 0, decision[1] if r == 0 else 0, ScreenTimings(), local_batch
    _, bounds, params, key = decision
    frames = range(*bounds)
    f0, f1 = comm.shard_range(len(frames))
    timings, screened, resumed, error = ScreenTimings(), 0, 0, None
    if f1 > f0:
        try:
            part = screen_file(
                _part_files(files, frames, r, w),
                reference,
                config,
                trajectory_key=params["trajectory"],
                reference_key=params["reference"],
                overwrite=overwrite,
                progress=progress and r == 0,
                frame_offset=f0,
            )
            screened, resumed = part.frames_screened, part.frames_resumed
            timings, local_batch = part.timings, part.batch_atoms
        except BaseException as exc:  # every rank must reach the status exchange below
            error = exc
    try:
        comm.raise_if_any_failed(error, "screening")
    except BaseException:
        if r == 0:
            try:  # only when empty: a run that failed on its input leaves nothing
                _parts_folder(files.table).rmdir()
            except OSError:
                pass
        raise
    outcome = None  # rank 0 merges; the others wait for its outcome
    if r == 0:
        try:
            t0 = time.perf_counter()
            state = ResumeState(
                files.table, files.extxyz, key=key, params=params, header=files.header
            )
            _merge(files, frames, state, local_batch or config.atoms_per_batch(), keep_parts)
            timings.write += time.perf_counter() - t0
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
    outcome = comm.broadcast_object(outcome)
    if outcome is not None:
        raise RuntimeError(f"merging the screening parts failed on rank 0: {outcome}")
    return screened, resumed, timings, local_batch


def _merge(
    files: ScreenFiles, frames: range, state: ResumeState, batch_atoms: int, keep_parts: bool
) -> None:
    """Concatenate the parts into the outputs between two writes of the table's state.

    First a state of this screening with nothing committed but the header, then the table
    and extxyz (each written atomically), then the state marking them complete; the parts
    are deleted only after that. A crash anywhere in between leaves a state of this
    screening that is not complete, so a rerun resumes the (finished) parts and merges
    them again.
    """
    w = comm.world_size()
    blocks = [comm.shard_range(len(frames), q, w) for q in range(w)]
    parts = [_part_files(files, frames, q, w) for q, (a, b) in enumerate(blocks) if b > a]
    state.begin(batch_atoms, trajectory_path=str(files.trajectory), world_size=w)
    state.save()
    n_bytes, sha = _merge_parts([(p.table, p.extxyz) for p in parts], files, files.header)
    state.complete(frames_done=len(frames), n_bytes=n_bytes, sha256=sha)
    if not keep_parts:
        shutil.rmtree(_parts_folder(files.table), ignore_errors=True)
