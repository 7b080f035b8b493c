"""Screening of MD trajectories: per-atom dH against a reference, frame summaries, rare events.

Frames are streamed (``ase.io.iread``: the trajectory is never loaded whole), grouped into
batches of about ``batch_atoms`` atoms to fill the device, and for every batch

1. descriptors of all its atoms in one batched call,
2. ``dH(y | X) = -log sum_j exp(-|y - x_j|^2 / (2 h^2))`` of every atom against the
   reference descriptors ``X`` (tiled log-sum-exp, :func:`quests_torch.metrics.delta_entropy`),
3. the solid-like clusters: atoms with ``dH <= threshold`` joined when at most
   ``cluster_cutoff`` (3.0 Å) apart, periodic images included, connected components
   (:mod:`quests_torch.clusters`),

and per frame: the largest and mean dH, the fraction of atoms with ``dH > threshold``
(out of domain) and the size of the largest cluster of covered atoms (SPEC section 4).

Library API: :func:`screen_frames` (an iterator of :class:`FrameScreen`, for notebooks and
integrations) and :func:`screen_trajectory` (the resumable file pipeline behind
``quests-torch screen``).

Resumability of :func:`screen_trajectory`: results are appended to the table (CSV or JSON
lines) and the optional extxyz file one batch at a time, each append flushed and
``fsync``-ed, and only then a small state file ``<table>.state.json`` records, atomically,
how many frames and bytes are committed and the SHA-256 of those bytes. A run killed at any
instant and restarted with the same arguments checks the committed bytes, truncates whatever
was written after the last commit, skips the committed frames and continues; batches restart
at a committed batch boundary with the same ``batch_atoms``, so every later batch, hence
every number, is bit-identical to an uninterrupted run's. The state is keyed on the content
of the inputs (:mod:`quests_torch.resume`): another trajectory under the same name, another
reference, other parameters or an edited table are refused (the message says which) unless
``overwrite=True``; ``<table>.lock`` keeps a second run off the table while one is running;
the outputs appear only once the first batch is computed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import queue
import re
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ._memory import memory_budget
from ._precision import compute_dtype, float64_enabled
from .clusters import DEFAULT_CLUSTER_CUTOFF, largest_cluster
from .descriptors import DEFAULT_CUTOFF, DEFAULT_K, descriptors_from_tensors
from .io import atomic_write, check_index, count_frames, iter_structures
from .kde import DEFAULT_BANDWIDTH
from .metrics import delta_entropy
from .resume import (
    new_state,
    reference_hash,
    resume_state,
    screening_identity,
    state_path,
    table_lock,
    verify_committed,
    write_state,
)
from .resume import trajectory_key as _content_key
from .structures import AtomsBatch, centred_copies, resolve_device, segment_sum

__all__ = [
    "FRAME_COLUMNS",
    "FrameScreen",
    "ScreenTimings",
    "ScreeningResult",
    "default_batch_atoms",
    "read_frame_table",
    "screen_frames",
    "screen_trajectory",
    "summarize_frames",
]

#: columns of the per-frame table, in order
FRAME_COLUMNS = ("frame", "n_atoms", "dH_max", "dH_mean", "novel_fraction", "largest_cluster")

#: test hook: seconds to sleep after a batch is appended but before it is committed
_PAUSE_ENV = "QUESTS_TORCH_SCREEN_TEST_PAUSE"


@dataclass
class FrameScreen:
    """Screening result of one frame.

    Attributes:
        frame: position of the frame in the screened selection (0-based).
        atoms: the ``ase.Atoms`` of the frame.
        dh: ``[n_atoms]`` per-atom dH (nats, CPU, float64; float32 in float32-only mode,
            see :func:`quests_torch._precision.float64_enabled`).
        cluster: ``[n_atoms]`` int64 cluster of each covered atom (smallest atom index of
            its cluster, within the frame), ``-1`` for novel atoms.
        dH_max: largest dH in the frame.
        dH_mean: mean dH.
        novel_fraction: fraction of atoms with ``dH > threshold``.
        largest_cluster: atoms in the largest cluster of covered atoms.
    """

    frame: int
    atoms: object
    dh: torch.Tensor
    cluster: torch.Tensor
    dH_max: float
    dH_mean: float
    novel_fraction: float
    largest_cluster: int

    def row(self) -> dict:
        """The per-frame table row (:data:`FRAME_COLUMNS`)."""
        return {
            "frame": self.frame,
            "n_atoms": len(self.atoms),
            "dH_max": self.dH_max,
            "dH_mean": self.dH_mean,
            "novel_fraction": self.novel_fraction,
            "largest_cluster": self.largest_cluster,
        }


@dataclass
class ScreenTimings:
    """Wall-clock seconds spent per stage (accumulated over batches).

    ``io`` (parsing frames) is measured in the reader thread that prefetches the next batch:
    it overlaps the other stages, so the stages can sum to more than the wall time.
    """

    io: float = 0.0
    descriptors: float = 0.0
    kernel: float = 0.0
    clusters: float = 0.0
    write: float = 0.0

    def as_dict(self) -> dict:
        return {key: round(getattr(self, key), 4) for key in self.__dataclass_fields__}


def default_batch_atoms(
    k: int = DEFAULT_K,
    device: torch.device | str = "cpu",
    budget: int | str | None = None,
) -> int:
    """Atoms per screening batch that fill the memory budget of ``device``.

    Working set per atom: its ``k x k`` neighbour-distance block and sort buffers (about
    ``4 k^2`` numbers) plus the descriptor row; float64 sizes. Bounded to [2,000, 500,000].
    """
    per_atom = 8 * (4 * k * k + 8 * k)
    return int(min(500_000, max(2_000, memory_budget(device, budget) // per_atom)))


def _timed(frames: Iterable, timings: ScreenTimings) -> Iterator:
    it = iter(frames)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            timings.io += time.perf_counter() - t0
            return
        timings.io += time.perf_counter() - t0
        yield item


def _batches(frames: Iterable, batch_atoms: int) -> Iterator[list]:
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


def _prefetched(batches: Iterator[list], depth: int = 1) -> Iterator[list]:
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


def _screen_batch(
    frames: list,
    first: int,
    reference: torch.Tensor,
    *,
    h: float,
    threshold: float,
    k: int,
    cutoff: float,
    cluster_cutoff: float,
    dtype: torch.dtype,
    device: torch.device,
    timings: ScreenTimings,
) -> list[FrameScreen]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    f64 = float64_enabled(device)
    acc = torch.float64 if f64 else torch.float32  # of the per-frame summaries on the device
    batch = AtomsBatch.from_ase(frames if f64 else centred_copies(frames), device=device,
                                dtype=dtype)  # fmt: skip
    x = descriptors_from_tensors(
        batch.positions, batch.cell, batch.pbc, batch.system_idx, k=k, cutoff=cutoff
    )
    sync()
    t1 = time.perf_counter()
    with torch.no_grad():
        dh = delta_entropy(x, reference, h)
    sync()
    t2 = time.perf_counter()
    covered = dh <= threshold
    sizes, labels = largest_cluster(
        batch.positions, batch.cell, batch.pbc, batch.system_idx, covered, cluster_cutoff
    )
    n_sys = batch.n_systems
    sidx = batch.system_idx
    counts = torch.bincount(sidx, minlength=n_sys)
    starts = torch.cumsum(counts, 0) - counts
    dh64 = dh.to(acc)
    dmax = torch.full((n_sys,), -math.inf, dtype=acc, device=device)
    dmax.scatter_reduce_(0, sidx, dh64, reduce="amax", include_self=True)
    # deterministic on CUDA: a sorted segment sum (no float atomics), and novel atoms counted
    # as the odd bins of 2*sidx + novel (bincount with float weights refuses deterministic mode)
    dmean = segment_sum(dh64, sidx, n_sys, is_sorted=True) / counts
    pair_counts = torch.bincount(2 * sidx + (~covered).long(), minlength=2 * n_sys)
    novel = pair_counts.view(n_sys, 2)[:, 1] / counts
    local = torch.where(labels >= 0, labels - starts[sidx], labels)
    sync()
    t3 = time.perf_counter()
    timings.descriptors += t1 - t0
    timings.kernel += t2 - t1
    timings.clusters += t3 - t2
    dh_cpu = dh64.cpu()
    local = local.cpu()
    bounds = [0, *torch.cumsum(counts, 0).tolist()]
    dmax_l, dmean_l, novel_l = dmax.tolist(), dmean.tolist(), novel.tolist()
    sizes_l = sizes.tolist()
    return [
        FrameScreen(
            frame=first + s,
            atoms=frames[s],
            dh=dh_cpu[bounds[s] : bounds[s + 1]],
            cluster=local[bounds[s] : bounds[s + 1]],
            dH_max=dmax_l[s],
            dH_mean=dmean_l[s],
            novel_fraction=novel_l[s],
            largest_cluster=int(sizes_l[s]),
        )
        for s in range(n_sys)
    ]


def _prepare_reference(reference, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(reference, np.ndarray):
        reference = torch.from_numpy(np.ascontiguousarray(reference))
    if not isinstance(reference, torch.Tensor):
        raise TypeError(
            f"`reference` must be a tensor or numpy array [m, d], got {type(reference).__name__}"
        )
    if reference.ndim != 2 or reference.shape[0] == 0:
        raise ValueError(
            f"`reference` must be a non-empty 2-D [m, d] array, got {tuple(reference.shape)}"
        )
    return reference.detach().to(device=device, dtype=dtype)


def _check_screen_params(h, threshold, k, cutoff, cluster_cutoff, batch_atoms) -> None:
    for name, v in (("h", h), ("cutoff", cutoff), ("cluster_cutoff", cluster_cutoff)):
        if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise ValueError(f"`{name}` must be a positive number, got {v!r}")
    if not (isinstance(threshold, int | float) and math.isfinite(threshold)):
        raise ValueError(f"`threshold` must be a finite number, got {threshold!r}")
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"`k` must be an int >= 2, got {k!r}")
    if batch_atoms is not None and (not isinstance(batch_atoms, int) or batch_atoms < 1):
        raise ValueError(f"`batch_atoms` must be a positive int, got {batch_atoms!r}")


def _screen_batches(
    frames: Iterable,
    reference,
    *,
    h: float,
    threshold: float,
    k: int,
    cutoff: float,
    cluster_cutoff: float,
    dtype: torch.dtype,
    device,
    batch_atoms: int | None,
    start: int,
    timings: ScreenTimings,
    source: str | None = None,
) -> Iterator[list[FrameScreen]]:
    _check_screen_params(h, threshold, k, cutoff, cluster_cutoff, batch_atoms)
    device = resolve_device(device)
    dtype = compute_dtype(device, dtype)  # float32 where float64 is off (MPS, ...)
    ref = _prepare_reference(reference, device, dtype)
    if ref.shape[1] != 2 * k - 1:
        raise ValueError(
            f"`reference` has {ref.shape[1]} columns but k = {k} descriptors have {2 * k - 1}"
        )
    if batch_atoms is None:
        batch_atoms = default_batch_atoms(k, device)
    first = start
    for chunk in _prefetched(_batches(_timed(frames, timings), batch_atoms)):
        try:
            out = _screen_batch(
                chunk,
                first,
                ref,
                h=h,
                threshold=threshold,
                k=k,
                cutoff=cutoff,
                cluster_cutoff=cluster_cutoff,
                dtype=dtype,
                device=device,
                timings=timings,
            )
        except ValueError as exc:
            named = _name_frames(str(exc), first, len(chunk))
            raise ValueError(named if source is None else f"{source}: {named}") from exc
        first += len(chunk)
        yield out


_EMPTY_STRUCTURE = re.compile(r"`atoms\[(\d+)\]` is empty \(structure \d+ has no atoms\)")
_STRUCTURE = re.compile(r"`atoms\[(\d+)\]`|\bstructure (\d+)")


def _name_frames(message: str, first: int, n: int) -> str:
    """An error about structure ``s`` of a batch, told about frame ``first + s`` instead
    (the batch is an implementation detail; the frame is what the user can find)."""

    def frame(m: re.Match) -> str:
        return f"frame {first + int(m.group(1) or m.group(2))}"

    named, empty = _EMPTY_STRUCTURE.subn(lambda m: f"{frame(m)} has no atoms", message)
    named, hits = _STRUCTURE.subn(frame, named)
    if empty or hits:
        return named
    return f"frames {first}..{first + n - 1}: {message}"


def screen_frames(
    frames: Iterable,
    reference: torch.Tensor | np.ndarray,
    *,
    h: float = DEFAULT_BANDWIDTH,
    threshold: float = 0.0,
    k: int = DEFAULT_K,
    cutoff: float = DEFAULT_CUTOFF,
    cluster_cutoff: float = DEFAULT_CLUSTER_CUTOFF,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = "cpu",
    batch_atoms: int | None = None,
    timings: ScreenTimings | None = None,
) -> Iterator[FrameScreen]:
    """Screen frames against reference descriptors, one :class:`FrameScreen` per frame.

    Frames are consumed lazily (pass ``ase.io.iread(...)`` to stream a file) and processed in
    batches of about ``batch_atoms`` atoms.

    Args:
        frames: an iterable of ``ase.Atoms``.
        reference: ``[m, 2k - 1]`` reference descriptors (e.g. of a solid).
        h: bandwidth (1/Å).
        threshold: dH above which an atom is novel; atoms at or below it are covered and form
            the clusters (paper: 0).
        k: neighbours of the descriptors (must match the reference's).
        cutoff: descriptor cutoff (Å, must match the reference's).
        cluster_cutoff: largest edge of the cluster graph (Å).
        dtype: compute dtype of descriptors and kernel sums (float32 wherever float64 is off:
            MPS, slow-float64 CUDA cards, ``QUESTS_TORCH_FLOAT64=0``; the per-frame summaries
            are then float32 sums on the device, returned as Python floats).
        device: where to compute (``"auto"``: CUDA, else MPS, else CPU).
        batch_atoms: atoms per batch (default :func:`default_batch_atoms`).
        timings: accumulates the seconds spent per stage when given.

    Yields:
        :class:`FrameScreen`, in frame order.

    Example::

        >>> frames = ase.io.iread("md.extxyz")
        >>> for f in screen_frames(frames, x_solid):
        ...     print(f.frame, f.dH_max, f.largest_cluster)
    """
    for batch in _screen_batches(
        frames,
        reference,
        h=h,
        threshold=threshold,
        k=k,
        cutoff=cutoff,
        cluster_cutoff=cluster_cutoff,
        dtype=dtype,
        device=device,
        batch_atoms=batch_atoms,
        start=0,
        timings=timings if timings is not None else ScreenTimings(),
    ):
        yield from batch


# --------------------------------------------------------------------------------------------
# the resumable file pipeline
# --------------------------------------------------------------------------------------------


def _format_row(row: dict, jsonl: bool) -> str:
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


@dataclass
class ScreeningResult:
    """What :func:`screen_trajectory` produced.

    Attributes:
        table: path of the per-frame table.
        extxyz: path of the per-atom extxyz file, or ``None``.
        frames: the whole per-frame table (:func:`read_frame_table`).
        summary: :func:`summarize_frames` of it.
        frames_screened: frames computed by this call.
        frames_resumed: frames found already committed (resumed run), 0 for a fresh run.
        batch_atoms: atoms per batch used.
        timings: seconds per stage of this call.
        seconds: wall time of this call.
    """

    table: Path
    extxyz: Path | None
    frames: dict[str, np.ndarray]
    summary: dict
    frames_screened: int
    frames_resumed: int
    batch_atoms: int
    timings: ScreenTimings = field(default_factory=ScreenTimings)
    seconds: float = 0.0


def _append(fh, text: str | bytes) -> None:
    fh.write(text)
    fh.flush()
    os.fsync(fh.fileno())


def _write_extxyz(fh, results: list[FrameScreen]) -> bytes:
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
    data = buf.getvalue().encode()
    _append(fh, data)
    return data


def _skip_frames(trajectory: Path, index: str, done: int) -> Iterator:
    """The selected frames after the first ``done``; the reader skips them unparsed when the
    selection is a forward slice (``":"``, ``"10:"``, ``"::2"``), else they are parsed and
    dropped."""
    from ase.io.formats import string2index

    sel = string2index(index)
    if done and isinstance(sel, slice) and (sel.step or 1) > 0 and (sel.start or 0) >= 0:
        start = (sel.start or 0) + done * (sel.step or 1)
        if sel.stop is not None and sel.stop >= 0 and start >= sel.stop:
            return iter(())
        stop = "" if sel.stop is None else str(sel.stop)
        step = "" if sel.step is None else str(sel.step)
        return iter_structures(trajectory, f"{start}:{stop}:{step}")
    return itertools.islice(iter_structures(trajectory, index), done, None)


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
    frame_offset: int = 0,
) -> ScreeningResult:
    """Screen a trajectory file frame by frame into a per-frame table, resumably.

    Args:
        trajectory: any ASE-readable trajectory (streamed with ``ase.io.iread``).
        reference: ``[m, 2k - 1]`` reference descriptors.
        table: per-frame output table: ``.jsonl`` writes JSON lines, anything else CSV
            (columns :data:`FRAME_COLUMNS`, floats written exactly with ``repr``).
        index: ASE selection of frames.
        extxyz: also write every frame with ``arrays["dH"]`` (per-atom dH) and
            ``arrays["cluster"]`` (cluster label, -1 for novel atoms) to this extxyz file,
            for colouring in OVITO.
        h, threshold, k, cutoff, cluster_cutoff, dtype, device: as in
            :func:`screen_frames`.
        batch_atoms: on a resumed run the value stored at the start is reused (so batches,
            hence results, are those of an uninterrupted run).
        reference_key: identifies the reference in the resume state (default:
            :func:`quests_torch.resume.reference_hash` of its values). Restarting with
            another reference is refused.
        trajectory_key: identifies the trajectory's content in the resume state (default:
            :func:`quests_torch.resume.trajectory_key`, its size and SHA-256). Restarting
            on a different file under the same name is refused.
        overwrite: start afresh even when outputs of a different screening exist.
        progress: show a tqdm progress bar (ETA when the frame count is cheap to get).
        frame_offset: added to the ``frame`` column (used by
            :func:`quests_torch.distributed.screen_trajectory`, whose ranks each screen a
            block of the selection into a part file numbered like the whole selection).

    Returns:
        :class:`ScreeningResult`.

    Raises:
        ValueError: outputs of a different screening exist (without ``overwrite``; the
            message names the changed trajectory, reference or parameter), the committed
            outputs were modified since, the state file is not valid, bad parameters, an
            unreadable or empty trajectory, or a frame that cannot be screened (named by its
            number in the selection).
        quests_torch.resume.TableInUseError: another run is writing ``table`` (an
            :class:`OSError`).

    The outputs and the state are created once the first batch is computed: a run that
    fails before leaves no file behind. ``<table>.lock`` exists while the run holds it.
    """
    t_start = time.perf_counter()
    _check_screen_params(h, threshold, k, cutoff, cluster_cutoff, batch_atoms)
    check_index(index)
    trajectory = Path(trajectory)
    if not trajectory.exists():
        raise FileNotFoundError(f"{trajectory}: no such file")
    table = Path(table)
    jsonl = table.suffix.lower() == ".jsonl"
    xyz_path = Path(extxyz) if extxyz is not None else None
    device = resolve_device(device)
    if isinstance(frame_offset, bool) or not isinstance(frame_offset, int) or frame_offset < 0:
        raise ValueError(f"`frame_offset` must be a non-negative int, got {frame_offset!r}")
    if trajectory_key is None:
        trajectory_key = _content_key(trajectory)
    params, key = screening_identity(
        trajectory_key=trajectory_key,
        reference_key=reference_hash(reference) if reference_key is None else reference_key,
        index=index,
        h=h,
        threshold=threshold,
        k=k,
        cutoff=cutoff,
        cluster_cutoff=cluster_cutoff,
        dtype=dtype,
        jsonl=jsonl,
        xyz_path=xyz_path,
        frame_offset=frame_offset,
    )
    with table_lock(table):
        return _screen_locked(
            trajectory,
            reference,
            table,
            xyz_path,
            key=key,
            params=params,
            index=index,
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
            frame_offset=frame_offset,
            t_start=t_start,
        )


def _screen_locked(
    trajectory: Path,
    reference,
    table: Path,
    xyz_path: Path | None,
    *,
    key: str,
    params: dict,
    index: str,
    h: float,
    threshold: float,
    k: int,
    cutoff: float,
    cluster_cutoff: float,
    dtype: torch.dtype,
    device: torch.device,
    batch_atoms: int | None,
    overwrite: bool,
    progress: bool,
    frame_offset: int,
    t_start: float,
) -> ScreeningResult:
    """:func:`screen_trajectory` once the table's lock is held."""
    jsonl = params["table_format"] == "jsonl"
    header = "" if jsonl else ",".join(FRAME_COLUMNS) + "\n"
    state_file = state_path(table)
    state = resume_state(table, key, params, overwrite=overwrite, header=header)
    digests: dict = {}
    if state is not None and state["frames_done"] == 0:  # nothing committed: start afresh
        batch_atoms = state["batch_atoms"]
        state = None
    if state is not None:
        done = state["frames_done"]
        batch_atoms = state["batch_atoms"]
        for name, path in (("table", table), ("extxyz", xyz_path)):
            if path is None:
                continue
            digests[name] = verify_committed(path, state, name)  # never cut an edited file
            with open(path, "r+b") as fh:  # drop anything after the last committed batch
                fh.truncate(state["bytes"][name])
                os.fsync(fh.fileno())
    else:
        done = 0
        if batch_atoms is None:
            batch_atoms = default_batch_atoms(k, device)
        state = new_state(key, params, batch_atoms, header, trajectory_path=str(trajectory))

    timings = ScreenTimings()
    pause = float(os.environ.get(_PAUSE_ENV, "0") or 0)
    total = count_frames(trajectory, index)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=done, desc="screen", unit="frame")
        except ImportError:  # pragma: no cover - progress bars are optional
            bar = None
    screened = 0
    frames = _skip_frames(trajectory, index, done)
    try:
        with ExitStack() as files:
            tab = xyz = None
            for batch in _screen_batches(
                frames,
                reference,
                h=h,
                threshold=threshold,
                k=k,
                cutoff=cutoff,
                cluster_cutoff=cluster_cutoff,
                dtype=dtype,
                device=device,
                batch_atoms=batch_atoms,
                start=frame_offset + done,
                timings=timings,
                source=str(trajectory) if index == ":" else f"{trajectory} (selection {index!r})",
            ):
                t0 = time.perf_counter()
                if tab is None:
                    if not digests:  # a fresh start: the outputs appear with the first batch
                        digests = _create_outputs(table, xyz_path, header, state, state_file)
                    tab = files.enter_context(open(table, "ab"))
                    if xyz_path is not None:
                        xyz = files.enter_context(open(xyz_path, "ab"))
                rows = "".join(_format_row(r.row(), jsonl) for r in batch).encode()
                _append(tab, rows)
                digests["table"].update(rows)
                if xyz is not None:
                    digests["extxyz"].update(_write_extxyz(xyz, batch))
                if pause > 0:
                    time.sleep(pause)  # test hook: a kill here leaves an uncommitted tail
                done += len(batch)
                screened += len(batch)
                state["frames_done"] = done
                state["bytes"] = {
                    "table": tab.tell(),
                    "extxyz": xyz.tell() if xyz is not None else 0,
                }
                state["sha256"] = {name: d.hexdigest() for name, d in digests.items()}
                write_state(state_file, state)
                timings.write += time.perf_counter() - t0
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    if done == 0:
        raise ValueError(f"{trajectory}: the selection {index!r} holds no structures")
    state["complete"] = True
    write_state(state_file, state)
    frames_table = read_frame_table(table)
    return ScreeningResult(
        table=table,
        extxyz=xyz_path,
        frames=frames_table,
        summary=summarize_frames(frames_table),
        frames_screened=screened,
        frames_resumed=done - screened,
        batch_atoms=batch_atoms,
        timings=timings,
        seconds=time.perf_counter() - t_start,
    )


def _create_outputs(
    table: Path, xyz_path: Path | None, header: str, state: dict, state_file: Path
) -> dict:
    """Fresh outputs (the table's header, an empty extxyz) and their state; returns the
    running SHA-256 of each."""
    atomic_write(table, lambda p: p.write_text(header))
    if xyz_path is not None:
        atomic_write(xyz_path, lambda p: p.write_bytes(b""))
    write_state(state_file, state)
    return {"table": hashlib.sha256(header.encode()), "extxyz": hashlib.sha256()}
