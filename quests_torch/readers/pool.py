"""Frames of an (ext)xyz file parsed by a pool of reader processes and handed back in order.

The selected frames are cut into chunks of about ``chunk_atoms`` atoms (consecutive byte
ranges of the file, from its :class:`~quests_torch.readers.index.FrameIndex`); each chunk is
parsed by one reader process (:func:`~quests_torch.readers.extxyz.read_frames`) and the
chunks come back in the order of the selection. At most ``in_flight`` chunks are submitted
and not yet consumed: a slow consumer stops the readers, memory stays bounded. The processes
are started with ``forkserver`` (``spawn`` where there is none; torch is loaded in the
parent, so ``fork`` is not safe): the first pool of a process waits for the server to import
the package (~2 s), later pools start in milliseconds. They ignore
SIGINT (the parent handles an interrupt and shuts them down) and are joined when the
iteration ends, fails or is abandoned. ``readers`` of 0 or 1 parses in the calling process.
As with any ``spawn``/``forkserver`` pool, a script using readers keeps its top level under
``if __name__ == "__main__":`` (each reader imports the main module).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial

import numpy as np

from ..checks import check_readers
from .extxyz import FrameReadError, FrameRecord, read_frames
from .index import FrameIndex, frame_index, select_frames

__all__ = ["DEFAULT_CHUNK_ATOMS", "ReaderPool", "default_readers", "iter_records"]

#: atoms per chunk handed to one reader (~1 MB of extxyz text)
DEFAULT_CHUNK_ATOMS = 1 << 14
#: selections with fewer atoms are read in process (~1.5 s of parsing): starting the readers
#: (~2 s for the first pool of a process) would cost more than they save
MIN_POOL_ATOMS = 1 << 22


def default_readers(compute_threads: int | None = None) -> int:
    """The free cores minus the compute threads (``torch.get_num_threads()``), at least 1."""
    if compute_threads is None:
        import torch

        compute_threads = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - compute_threads)


def _context() -> multiprocessing.context.BaseContext:
    """``forkserver`` where there is one (readers are forked from a server process that
    imported this module once, not from the parent, whose torch threads make ``fork``
    unsafe), else ``spawn``."""
    if "forkserver" not in multiprocessing.get_all_start_methods():  # pragma: no cover
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


#: what reads the frames at byte ranges of a file: ``read(path, starts, stops)`` ->
#: records (picklable: a module-level function or a ``functools.partial`` of one)
FrameReader = Callable[[str, np.ndarray, np.ndarray], list[FrameRecord]]


def _read_packed(read: FrameReader, path: str, starts: np.ndarray, stops: np.ndarray) -> tuple:
    """A reader's chunk as five arrays (one pickle, not four per frame): the atoms of each
    frame, numbers and positions of all, cells and pbc per frame; and the CPU seconds the
    reader spent on it."""
    t0 = time.process_time()
    records = read(path, starts, stops)
    counts = np.array([len(r.numbers) for r in records], dtype=np.int64)
    return (
        counts,
        np.concatenate([r.numbers for r in records] or [np.zeros(0, np.int64)]),
        np.concatenate([r.positions for r in records] or [np.zeros((0, 3))]),
        np.stack([r.cell for r in records] or [np.zeros((3, 3))])[: len(records)],
        np.stack([r.pbc for r in records] or [np.zeros(3, bool)])[: len(records)],
        time.process_time() - t0,
    )


def _unpacked(packed: tuple) -> Iterator[FrameRecord]:
    counts, numbers, positions, cells, pbcs = packed[:5]
    ends = np.cumsum(counts).tolist()
    a = 0
    for i, b in enumerate(ends):
        yield FrameRecord(numbers[a:b], positions[a:b], cells[i], pbcs[i])
        a = b


def _chunks(n_atoms: np.ndarray, chunk_atoms: int) -> list[tuple[int, int]]:
    """``[start, stop)`` positions cutting ``n_atoms`` into runs of about ``chunk_atoms``."""
    out = []
    start = 0
    total = 0
    for i, n in enumerate(n_atoms.tolist()):
        total += n
        if total >= chunk_atoms:
            out.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(n_atoms):
        out.append((start, len(n_atoms)))
    return out


class ReaderPool:
    """Reader processes parsing (ext)xyz frames (a context manager; reusable across files).

    Args:
        readers: processes (0 or 1: parse in the calling process, no pool).
        in_flight: chunks submitted ahead of the consumer (default ``2 * readers``).
        chunk_atoms: atoms per chunk (default :data:`DEFAULT_CHUNK_ATOMS`).

    Attributes:
        max_ahead: the most chunks that were submitted and not yet consumed at once.
        reader_cpu_seconds: CPU seconds the reader processes spent parsing (for benchmarks:
            what the readers cost whatever else the machine runs).
    """

    def __init__(
        self, readers: int, *, in_flight: int | None = None, chunk_atoms: int = DEFAULT_CHUNK_ATOMS
    ) -> None:
        readers = check_readers(readers)
        self.readers = readers
        self.in_flight = max(1, in_flight if in_flight is not None else 2 * readers)
        self.chunk_atoms = max(1, int(chunk_atoms))
        self.max_ahead = 0
        self.reader_cpu_seconds = 0.0
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> ReaderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self.readers,
                mp_context=_context(),
                initializer=signal.signal,
                initargs=(signal.SIGINT, signal.SIG_IGN),
            )
        return self._executor

    def close(self) -> None:
        """Stop the reader processes (pending chunks are cancelled) and wait for them."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def records(
        self,
        path: str | os.PathLike,
        index: FrameIndex,
        frames: np.ndarray,
        *,
        fast: bool = True,
        read: FrameReader | None = None,
    ) -> Iterator[FrameRecord]:
        """The records of ``frames`` (frame numbers of the file ``index`` describes), in order.

        ``read`` parses a chunk (default: the extxyz reader,
        :func:`~quests_torch.readers.extxyz.read_frames` with ``fast``; a LAMMPS dump passes
        :func:`~quests_torch.readers.lammps.read_dump_frames` with its ``types``).

        Raises:
            ValueError: a frame neither the fast path nor ASE reads, naming its position in
                ``frames`` and its number in the file.
        """
        frames = np.asarray(frames, dtype=np.int64)
        starts, stops = index.starts[frames], index.stops[frames]
        chunks = _chunks(index.n_atoms[frames], self.chunk_atoms)
        path = os.fspath(path)
        read = partial(read_frames, fast=fast) if read is None else read

        def failed(exc: FrameReadError, first: int) -> ValueError:
            at = first + exc.frame
            return ValueError(
                f"{path}: cannot read structures (structure {at} of the selection, frame "
                f"{int(frames[at])} of the file: {exc.message})"
            )

        if self.readers <= 1:
            for a, b in chunks:
                try:
                    yield from read(path, starts[a:b], stops[a:b])
                except FrameReadError as exc:
                    raise failed(exc, a) from None
            return
        pool = self._pool()
        pending: deque[tuple[int, Future]] = deque()
        todo = iter(chunks)
        try:
            while True:
                while len(pending) < self.in_flight:
                    chunk = next(todo, None)
                    if chunk is None:
                        break
                    a, b = chunk
                    future = pool.submit(_read_packed, read, path, starts[a:b], stops[a:b])
                    pending.append((a, future))
                self.max_ahead = max(self.max_ahead, len(pending))
                if not pending:
                    return
                a, future = pending.popleft()
                try:
                    packed = future.result()
                except FrameReadError as exc:
                    raise failed(exc, a) from None
                self.reader_cpu_seconds += packed[5]
                yield from _unpacked(packed)
        finally:
            for _, future in pending:
                future.cancel()


def iter_records(
    path: str | os.PathLike,
    index: str = ":",
    *,
    readers: int = 0,
    pool: ReaderPool | None = None,
    cache: bool = True,
    fast: bool = True,
    scanner: Callable[[str | os.PathLike], FrameIndex] | None = None,
    read: FrameReader | None = None,
) -> Iterator[FrameRecord]:
    """The selected frames of an (ext)xyz file (or a LAMMPS dump: ``scanner`` and ``read``)
    as :class:`FrameRecord`, in order.

    Args:
        path: the (ext)xyz file.
        index: ASE selection (``":"``, ``"0:100:2"``, ``"-1"``).
        readers: reader processes (0 or 1: in process); a selection under
            :data:`MIN_POOL_ATOMS` atoms is read in process whatever ``readers`` says.
        pool: an open :class:`ReaderPool` to use instead of starting one.
        cache: use the index cache (:func:`~quests_torch.readers.index.frame_index`).
        fast: the fast parser (``False``: every frame through ASE).
        scanner: the frame index's scanner
            (:func:`~quests_torch.readers.index.frame_index`; default the (ext)xyz one).
        read: the chunk parser (:meth:`ReaderPool.records`; default the (ext)xyz one).

    Raises:
        ValueError: an unreadable file (``<path>: cannot read structures (...)``: a header
            that is not an atom count, a frame cut short) or frame (named).
    """
    try:
        fi = frame_index(path, cache=cache, scanner=scanner)
    except ValueError as exc:
        raise ValueError(f"{path}: cannot read structures ({exc})") from None
    frames = select_frames(len(fi), index)
    if pool is not None:
        yield from pool.records(path, fi, frames, fast=fast, read=read)
        return
    if readers > 1 and int(fi.n_atoms[frames].sum()) < MIN_POOL_ATOMS:
        readers = 0
    with ReaderPool(readers) as own:
        yield from own.records(path, fi, frames, fast=fast, read=read)
