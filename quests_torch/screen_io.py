"""The files of a trajectory screening (:class:`ScreenFiles`): frames read in prefetched batches,
the per-frame table and the per-atom extxyz written, and the table read back and summarised.

The table has the columns :data:`FRAME_COLUMNS`, one row per frame, as CSV (floats written
exactly with ``repr``) or JSON lines (``.jsonl``); the screening itself is
:mod:`quests_torch.screening`.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .checks import check_readers
from .io import check_index, iter_structures
from .resume import ResumeState, reference_hash, screening_identity
from .resume import trajectory_key as content_key


class Identified(Protocol):
    """What :meth:`ScreenFiles.identity` reads of a screening's configuration (a
    :class:`quests_torch.screening.ScreenConfig`): the names of its identifying fields."""

    IDENTITY: tuple[str, ...]


__all__ = [
    "FRAME_COLUMNS",
    "ScreenFiles",
    "batches_of",
    "extxyz_bytes",
    "format_row",
    "frames_after",
    "prefetched",
    "read_frame_table",
    "staged_batches",
    "summarize_frames",
]

#: columns of the per-frame table, in order
FRAME_COLUMNS = ("frame", "n_atoms", "dH_max", "dH_mean", "novel_fraction", "largest_cluster")


def batches_of(frames: Iterable, batch_atoms: int) -> Iterator[list]:
    """Consecutive lists of ``frames`` holding at least ``batch_atoms`` atoms each (the last
    one: what is left)."""
    batch: list = []
    n = 0
    for atoms in frames:
        batch.append(atoms)
        n += len(atoms)
        if n >= batch_atoms:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def prefetched(batches: Iterator[list], depth: int = 1) -> Iterator[list]:
    """``batches``, read by a background thread up to ``depth`` batches ahead.

    Parsing frames (Python, ASE) then overlaps the device work and the host syncs of the
    previous batch instead of running in series with them. Order, errors (re-raised in the
    consumer, with their traceback) and early exits are those of the plain iterator: when the
    consumer stops, the reader finishes the batch it is reading and ends.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for batch in batches:
                if not put(("batch", batch)):
                    return
            put(("end", None))
        except BaseException as exc:  # handed to the consumer, raised there
            put(("error", exc))

    reader = threading.Thread(target=read, name="quests-torch-prefetch", daemon=True)
    reader.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "batch":
                yield value
            elif kind == "end":
                return
            else:
                raise value
    finally:
        stop.set()
        reader.join()
        close = getattr(batches, "close", None)
        if close is not None:
            close()


@dataclass
class Staged:
    """A batch of frames built for the device, and the event its copies finish at (CUDA)."""

    batch: object  # an AtomsBatch (or anything whose fields are tensors)
    ready: object = None  # torch.cuda.Event recorded on the side stream, or None

    def take(self, device: torch.device):
        """The batch, once its copies are done, as far as the caller's stream is concerned:
        the current stream waits for them (no host sync) and owns the tensors from here."""
        if self.ready is not None:
            stream = torch.cuda.current_stream(device)
            stream.wait_event(self.ready)
            for value in vars(self.batch).values():
                if isinstance(value, torch.Tensor):
                    value.record_stream(stream)
        return self.batch


def staged_batches(
    chunks: Iterator[list], build: Callable[[list], object], device: torch.device, timings=None
) -> Iterator[tuple[list, Staged | ValueError]]:
    """``(chunk, Staged)`` for each chunk of frames, built where this is iterated: in the
    thread of :func:`prefetched`, so parsing, assembling the batch (``build(chunk)``) and, on
    CUDA, copying it to the device from pinned memory on a side stream overlap the compute of
    the batch before. A ValueError of ``build`` is handed on in place of the batch, for the
    consumer to raise with the frames named. ``timings.batching`` gains the build's seconds."""
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    for chunk in chunks:
        t0 = time.perf_counter()
        try:
            if side is None:
                staged: Staged | ValueError = Staged(build(chunk))
            else:
                with torch.cuda.stream(side):
                    batch = build(chunk)
                    ready = torch.cuda.Event()
                    ready.record(side)
                staged = Staged(batch, ready)
        except ValueError as exc:
            staged = exc
        if timings is not None:
            timings.batching += time.perf_counter() - t0
        yield chunk, staged


def format_row(row: dict, jsonl: bool) -> str:
    """One table line: JSON, or CSV with floats written exactly (``repr``)."""
    if jsonl:
        return json.dumps(row) + "\n"
    cells = (repr(v) if isinstance(v, float) else str(v) for v in (row[c] for c in FRAME_COLUMNS))
    return ",".join(cells) + "\n"


def read_frame_table(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a per-frame table written by :func:`screen_trajectory` (CSV or JSON lines).

    Returns:
        ``{column: [n_frames] array}`` for :data:`FRAME_COLUMNS`.
    """
    path = Path(path)
    rows: list[dict] = []
    with open(path) as fh:
        if path.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in fh if line.strip()]
        else:
            header = fh.readline().strip().split(",")
            for line in fh:
                if line.strip():
                    rows.append(dict(zip(header, line.strip().split(","), strict=True)))
    out = {}
    for c in FRAME_COLUMNS:
        kind = np.int64 if c in ("frame", "n_atoms", "largest_cluster") else np.float64
        out[c] = np.array([r[c] for r in rows], dtype=kind) if rows else np.zeros(0, kind)
    return out


def summarize_frames(table: dict[str, np.ndarray], top: int = 5) -> dict:
    """Whole-trajectory summary of a per-frame table (rare events, extremes, melting onset).

    Returns:
        a JSON-ready dict: ``n_frames``, ``n_atoms``, the largest dH and its frame, the mean
        dH and the novel fraction over all atoms, frames with any novel atom, the ``top``
        frames by largest dH, the range of the largest cluster and the first frame where it
        holds less than half of the atoms (``null`` when none).
    """
    n = table["n_atoms"]
    if n.size == 0:
        return {"n_frames": 0, "n_atoms": 0}
    order = np.argsort(-table["dH_max"], kind="stable")[:top]
    frac = table["largest_cluster"] / n
    below = np.nonzero(frac < 0.5)[0]
    return {
        "n_frames": int(n.size),
        "n_atoms": int(n.sum()),
        "dH_max": float(table["dH_max"].max()),
        "dH_max_frame": int(table["frame"][int(np.argmax(table["dH_max"]))]),
        "dH_mean": float((table["dH_mean"] * n).sum() / n.sum()),
        "novel_fraction": float((table["novel_fraction"] * n).sum() / n.sum()),
        "frames_with_novel_atoms": int((table["novel_fraction"] > 0).sum()),
        "top_frames_by_dH_max": [
            {"frame": int(table["frame"][i]), "dH_max": float(table["dH_max"][i])} for i in order
        ],
        "largest_cluster_min": int(table["largest_cluster"].min()),
        "largest_cluster_max": int(table["largest_cluster"].max()),
        "first_frame_largest_cluster_below_half": int(table["frame"][below[0]])
        if below.size
        else None,
    }


def extxyz_bytes(results: list) -> bytes:
    """The frames of :class:`~quests_torch.screening.FrameScreen` ``results`` as extxyz, with
    per-atom ``dH`` and ``cluster`` arrays and the frame's summary in ``info``."""
    import io

    import ase.io

    buf = io.StringIO()
    frames = []
    for r in results:
        atoms = r.atoms.copy()
        atoms.calc = None
        atoms.arrays["dH"] = r.dh.numpy().copy()
        atoms.arrays["cluster"] = r.cluster.numpy().copy()
        atoms.info.update(
            frame=r.frame,
            dH_max=r.dH_max,
            dH_mean=r.dH_mean,
            novel_fraction=r.novel_fraction,
            largest_cluster=r.largest_cluster,
        )
        frames.append(atoms)
    ase.io.write(buf, frames, format="extxyz")
    return buf.getvalue().encode()


def frames_after(
    trajectory: Path, index: str, done: int, *, readers: int | None = None, types=None
) -> Iterator:
    """The selected frames after the first ``done``; the reader skips them unparsed when the
    selection is a forward slice (``":"``, ``"10:"``, ``"::2"``), else they are parsed and
    dropped. ``readers`` and ``types``: as :func:`quests_torch.io.iter_structures`."""
    from ase.io.formats import string2index

    sel = string2index(index)
    if done and isinstance(sel, slice) and (sel.step or 1) > 0 and (sel.start or 0) >= 0:
        start = (sel.start or 0) + done * (sel.step or 1)
        if sel.stop is not None and sel.stop >= 0 and start >= sel.stop:
            return iter(())
        stop = "" if sel.stop is None else str(sel.stop)
        step = "" if sel.step is None else str(sel.step)
        return iter_structures(trajectory, f"{start}:{stop}:{step}", readers=readers, types=types)
    frames = iter_structures(trajectory, index, readers=readers, types=types)
    return itertools.islice(frames, done, None)


@dataclass(frozen=True)
class ScreenFiles:
    """The files of one resumable screening: the trajectory and its frame selection, the
    per-frame table and the optional per-atom extxyz (see :func:`screen_trajectory`), and
    how the trajectory is read (``readers``, ``types``: :func:`quests_torch.io.iter_structures`;
    ``types`` as :func:`quests_torch.readers.lammps.parse_types` gives it)."""

    trajectory: Path
    index: str
    table: Path
    extxyz: Path | None = None
    readers: int = 0
    types: dict | None = None

    @property
    def frame_readers(self) -> int | None:
        """The ``readers`` the frames are read with: ``None`` (ASE, the frames' ``info`` and
        arrays kept) when a per-atom extxyz is written, so that it carries them as before."""
        return None if self.extxyz is not None else self.readers

    @classmethod
    def check(
        cls,
        trajectory: str | os.PathLike,
        table: str | os.PathLike,
        *,
        index: str = ":",
        extxyz: str | os.PathLike | None = None,
        readers: int = 0,
        types=None,
    ) -> ScreenFiles:
        """The files, checked: a valid ASE selection, an existing trajectory, a count of
        reader processes (``readers >= 0``) and a map of LAMMPS types (or ``None``)."""
        from .readers.lammps import parse_types

        check_index(index)
        readers = check_readers(readers)
        types = parse_types(types)
        trajectory = Path(trajectory)
        if not trajectory.exists():
            raise FileNotFoundError(f"{trajectory}: no such file")
        return cls(
            trajectory, index, Path(table), None if extxyz is None else Path(extxyz), readers,
            types,
        )  # fmt: skip

    @property
    def jsonl(self) -> bool:
        """The table is written as JSON lines (``.jsonl``), else CSV."""
        return self.table.suffix.lower() == ".jsonl"

    @property
    def header(self) -> str:
        return "" if self.jsonl else ",".join(FRAME_COLUMNS) + "\n"

    @property
    def source(self) -> str:
        """The trajectory (and selection) as errors about its frames name it."""
        if self.index == ":":
            return str(self.trajectory)
        return f"{self.trajectory} (selection {self.index!r})"

    def no_structures(self) -> ValueError:
        return ValueError(f"{self.trajectory}: the selection {self.index!r} holds no structures")

    def identity(
        self,
        config: Identified,
        reference,
        *,
        trajectory_key: str | None = None,
        reference_key: str | None = None,
        frame_offset: int = 0,
    ) -> tuple[dict, str]:
        """The screening's parameters and key (:func:`quests_torch.resume.screening_identity`);
        the trajectory and the reference are hashed unless their keys are given. A map of
        LAMMPS types is part of the trajectory's key (other elements, another screening)."""
        if trajectory_key is None:
            trajectory_key = content_key(self.trajectory)
        types = "" if self.types is None else f"|types={sorted(self.types.items())}"
        if not trajectory_key.endswith(types):  # once (a rank's part gets rank 0's key)
            trajectory_key += types
        return screening_identity(
            trajectory_key=trajectory_key,
            reference_key=reference_hash(reference) if reference_key is None else reference_key,
            index=self.index,
            jsonl=self.jsonl,
            xyz_path=self.extxyz,
            frame_offset=frame_offset,
            **{name: getattr(config, name) for name in config.IDENTITY},
        )

    def open_state(self, key: str, params: dict, *, overwrite: bool) -> ResumeState:
        """The resume state of these outputs (:meth:`quests_torch.resume.ResumeState.open`)."""
        return ResumeState.open(
            self.table, self.extxyz, key=key, params=params, header=self.header,
            overwrite=overwrite,
        )  # fmt: skip
