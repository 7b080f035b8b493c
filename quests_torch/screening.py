"""Screening of MD trajectories: per-atom dH against a reference, frame summaries, rare events.

Frames are streamed (``ase.io.iread``: the trajectory is never loaded whole), grouped into
batches of about ``batch_atoms`` atoms to fill the device, and for every batch

1. descriptors of all its atoms in one batched call,
2. ``dH(y | X) = -log sum_j exp(-|y - x_j|^2 / (2 h^2))`` of every atom against the
   reference descriptors ``X`` (tiled log-sum-exp, :func:`quests_torch.metrics.delta_entropy`),
3. the solid-like clusters: atoms with ``dH <= threshold`` joined when at most
   ``cluster_cutoff`` (3.0 Å) apart, periodic images included, connected components
   (:mod:`quests_torch.clusters`),

and per frame (:func:`quests_torch.uncertainty.per_structure_summary`): the largest and mean
dH, the fraction of atoms with ``dH > threshold`` (out of domain) and the size of the largest
cluster of covered atoms, the melting/nucleation indicator of the screening guide
(docs/guide/screening.md).

Library API: :func:`screen_frames` (an iterator of :class:`FrameScreen`, for notebooks and
integrations) and :func:`screen_trajectory` (the resumable file pipeline behind
``quests-torch screen``). Both take the screening parameters as keywords and validate them
once into a :class:`ScreenConfig`; :func:`screen_file` is the resumable core that
:func:`screen_trajectory` and :func:`quests_torch.distributed.screen_trajectory` (one block of
frames per rank) share.

Resumability of :func:`screen_trajectory`: results are appended to the table (CSV or JSON
lines) and the optional extxyz file one batch at a time, each append flushed and
``fsync``-ed, and only then a small state file ``<table>.state.json`` records, atomically,
how many frames and bytes are committed and the SHA-256 of those bytes
(:class:`quests_torch.resume.ResumeState`). A run killed at any instant and restarted with
the same arguments checks the committed bytes, truncates whatever was written after the last
commit, skips the committed frames and continues; batches restart at a committed batch
boundary with the same ``batch_atoms``, so every later batch, hence every number, is
bit-identical to an uninterrupted run's. The state is keyed on the content of the inputs
(:mod:`quests_torch.resume`): another trajectory under the same name, another reference,
other parameters or an edited table are refused (the message says which) unless
``overwrite=True``; ``<table>.lock`` keeps a second run off the table while one is running;
the outputs appear only once the first batch is computed.
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ._memory import memory_budget
from ._precision import compute_dtype, float64_enabled
from .checks import (
    DEFAULT_BANDWIDTH,
    DEFAULT_CLUSTER_CUTOFF,
    DEFAULT_CUTOFF,
    DEFAULT_K,
    bind_arguments,
    check_cutoff,
    check_dtype,
    check_h,
    check_k,
    check_positive_int,
    check_threshold,
)
from .clusters import largest_cluster
from .descriptors import descriptors_from_tensors
from .io import count_frames
from .metrics import delta_entropy
from .resume import ResumeState, table_lock
from .screen_io import (
    FRAME_COLUMNS,
    ScreenFiles,
    Staged,
    batches_of,
    extxyz_bytes,
    format_row,
    frames_after,
    prefetched,
    read_frame_table,
    staged_batches,
    summarize_frames,
)
from .structures import AtomsBatch, centred_copies, resolve_device
from .summaries import per_structure_summary

__all__ = [
    "FRAME_COLUMNS",
    "FrameScreen",
    "ScreenConfig",
    "ScreenFiles",
    "ScreenTimings",
    "ScreeningResult",
    "check_run_keywords",
    "default_batch_atoms",
    "read_frame_table",
    "screen_file",
    "screen_frames",
    "screen_trajectory",
    "summarize_frames",
]


@dataclass(frozen=True)
class ScreenConfig:
    """The parameters of a screening, validated once (:mod:`quests_torch.checks`).

    Attributes:
        h: bandwidth (1/Å).
        threshold: dH (nats) above which an atom is novel; atoms at or below it are covered
            and form the clusters (paper: 0).
        k: neighbours of the descriptors (must match the reference's; any ``k >= 1``).
        cutoff: descriptor cutoff (Å, must match the reference's).
        cluster_cutoff: largest edge of the cluster graph (Å).
        dtype: compute dtype of descriptors and kernel sums (:attr:`compute_dtype`: float32
            wherever float64 is off: MPS, slow-float64 CUDA cards, ``QUESTS_TORCH_FLOAT64=0``;
            the per-frame summaries are then float32 sums on the device); as requested, it
            identifies the screening in the resume state.
        device: where to compute, resolved (``"auto"``/``None``: CUDA, else MPS, else CPU).
        batch_atoms: atoms per batch, ``None`` for :func:`default_batch_atoms`.
    """

    h: float = DEFAULT_BANDWIDTH
    threshold: float = 0.0
    k: int = DEFAULT_K
    cutoff: float = DEFAULT_CUTOFF
    cluster_cutoff: float = DEFAULT_CLUSTER_CUTOFF
    dtype: torch.dtype = torch.float64
    device: torch.device | str | None = "cpu"
    batch_atoms: int | None = None

    #: the fields that identify a screening's results in its resume state (where and in what
    #: batches it computes do not change them)
    IDENTITY = ("h", "threshold", "k", "cutoff", "cluster_cutoff", "dtype")

    def __post_init__(self) -> None:
        checked = {
            "h": check_h(self.h),
            "threshold": check_threshold(self.threshold),
            "k": check_k(self.k),
            "cutoff": check_cutoff(self.cutoff),
            "cluster_cutoff": check_cutoff(self.cluster_cutoff, "cluster_cutoff"),
            "dtype": check_dtype(self.dtype),
            "batch_atoms": None
            if self.batch_atoms is None
            else check_positive_int(self.batch_atoms, "batch_atoms"),
            "device": resolve_device(self.device),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_arguments(cls, arguments: dict) -> ScreenConfig:
        """The config of the screening parameters among ``arguments`` (a function's
        arguments by name, such as :func:`screen_trajectory`'s)."""
        return cls(**{name: arguments[name] for name in cls.__dataclass_fields__})

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype computed in: :attr:`dtype`, float32 where float64 is off (MPS, ...)."""
        return compute_dtype(self.device, self.dtype)

    def atoms_per_batch(self) -> int:
        """:attr:`batch_atoms`, or :func:`default_batch_atoms` for ``k`` and the device."""
        if self.batch_atoms is not None:
            return self.batch_atoms
        return default_batch_atoms(self.k, self.device)


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
    """Wall-clock seconds spent per stage (accumulated over batches). ``io`` (parsing frames)
    and ``batching`` (the batch's tensors and their copy to the device) are measured in the
    thread that prefetches the next batch: they overlap the other stages (which can sum to
    more than the wall time)."""

    io: float = 0.0
    batching: float = 0.0
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


def _build_batch(frames: list, config: ScreenConfig) -> AtomsBatch:
    """The batch of ``frames`` on the device (centred copies where float64 is off)."""
    f64 = float64_enabled(config.device)
    return AtomsBatch.from_ase(frames if f64 else centred_copies(frames), device=config.device,
                               dtype=config.compute_dtype)  # fmt: skip


def _screen_batch(
    frames: list,
    staged: Staged | ValueError,
    first: int,
    reference: torch.Tensor,
    config: ScreenConfig,
    timings: ScreenTimings,
) -> list[FrameScreen]:
    """Descriptors, dH, clusters and per-frame summaries of one batch of frames (``staged``
    by :func:`~.screen_io.staged_batches`, or the ValueError its build raised)."""
    if isinstance(staged, ValueError):
        raise staged
    device = config.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    f64 = float64_enabled(device)
    batch = staged.take(device)
    x = descriptors_from_tensors(
        batch.positions, batch.cell, batch.pbc, batch.system_idx, k=config.k, cutoff=config.cutoff
    )
    sync()
    t1 = time.perf_counter()
    with torch.no_grad():
        dh = delta_entropy(x, reference, config.h)
    sync()
    t2 = time.perf_counter()
    sizes, labels = largest_cluster(
        batch.positions,
        batch.cell,
        batch.pbc,
        batch.system_idx,
        dh <= config.threshold,
        config.cluster_cutoff,
    )
    # the summaries accumulate in float64 on the device (float32 where float64 is off), in
    # sorted segments: the same bits on every run, deterministic mode included
    dh_acc = dh.to(torch.float64 if f64 else torch.float32)
    summary = per_structure_summary(dh_acc, batch.system_idx, batch.n_systems, config.threshold)
    bounds = np.cumsum([0, *(len(a) for a in frames)]).tolist()
    starts = torch.tensor(bounds[:-1], dtype=labels.dtype, device=labels.device)
    local = torch.where(labels >= 0, labels - starts[batch.system_idx], labels)
    sync()
    t3 = time.perf_counter()
    timings.descriptors += t1 - t0
    timings.kernel += t2 - t1
    timings.clusters += t3 - t2
    stats = torch.stack([summary.max_dH, summary.mean_dH, summary.fraction_above]).tolist()
    dh_cpu, local, sizes_l = dh_acc.cpu(), local.cpu(), sizes.tolist()
    return [
        FrameScreen(
            frame=first + s,
            atoms=frames[s],
            dh=dh_cpu[bounds[s] : bounds[s + 1]],
            cluster=local[bounds[s] : bounds[s + 1]],
            dH_max=stats[0][s],
            dH_mean=stats[1][s],
            novel_fraction=stats[2][s],
            largest_cluster=int(sizes_l[s]),
        )
        for s in range(len(frames))
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


def _screen_batches(
    frames: Iterable,
    reference,
    config: ScreenConfig,
    *,
    start: int,
    timings: ScreenTimings,
    source: str | None = None,
) -> Iterator[list[FrameScreen]]:
    """The :class:`FrameScreen` of ``frames`` (numbered from ``start``), one list per batch;
    an error in a frame names it (and ``source``, the file)."""
    ref = _prepare_reference(reference, config.device, config.compute_dtype)
    if ref.shape[1] != 2 * config.k - 1:
        raise ValueError(
            f"`reference` has {ref.shape[1]} columns but k = {config.k} descriptors have "
            f"{2 * config.k - 1}"
        )
    first = start
    chunks = batches_of(_timed(frames, timings), config.atoms_per_batch())
    build = functools.partial(_build_batch, config=config)
    for chunk, staged in prefetched(staged_batches(chunks, build, config.device, timings)):
        try:
            out = _screen_batch(chunk, staged, first, ref, config, timings)
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
    timings: ScreenTimings | None = None,
    **parameters,
) -> Iterator[FrameScreen]:
    """Screen frames against reference descriptors, one :class:`FrameScreen` per frame.

    Frames are consumed lazily (pass ``ase.io.iread(...)`` to stream a file) and processed in
    batches of about ``batch_atoms`` atoms. The parameters are the keywords of
    :class:`ScreenConfig`, validated once into one.

    Args:
        frames: an iterable of ``ase.Atoms``.
        reference: ``[m, 2k - 1]`` reference descriptors (e.g. of a solid).
        timings: accumulates the seconds spent per stage when given.
        **parameters: the screening parameters, keywords of :class:`ScreenConfig` (``h``,
            ``threshold``, ``k``, ``cutoff``, ``cluster_cutoff``, ``dtype``, ``device``,
            ``batch_atoms``; defaults as there).

    Yields:
        :class:`FrameScreen`, in frame order.

    Example::

        >>> frames = ase.io.iread("md.extxyz")
        >>> for f in screen_frames(frames, x_solid):
        ...     print(f.frame, f.dH_max, f.largest_cluster)
    """
    config = ScreenConfig(**bind_arguments(ScreenConfig, "screen_frames", (), parameters))
    timings = timings if timings is not None else ScreenTimings()
    for batch in _screen_batches(frames, reference, config, start=0, timings=timings):
        yield from batch


# --------------------------------------------------------------------------------------------
# the resumable file pipeline
# --------------------------------------------------------------------------------------------


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

    @classmethod
    def from_table(
        cls,
        files: ScreenFiles,
        *,
        screened: int,
        resumed: int,
        batch_atoms: int,
        timings: ScreenTimings,
        t_start: float,
    ) -> ScreeningResult:
        """The result of a screening whose table ``files.table`` is complete."""
        frames = read_frame_table(files.table)
        return cls(
            table=files.table,
            extxyz=files.extxyz,
            frames=frames,
            summary=summarize_frames(frames),
            frames_screened=screened,
            frames_resumed=resumed,
            batch_atoms=batch_atoms,
            timings=timings,
            seconds=time.perf_counter() - t_start,
        )


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
    readers: int = 0,
    types=None,
    **run,
) -> ScreeningResult:
    """Screen a trajectory file frame by frame into a per-frame table, resumably.

    Args:
        trajectory: any ASE-readable trajectory (streamed: ``.xyz``/``.extxyz`` by the fast
            reader of :mod:`quests_torch.readers`, other formats with ``ase.io.iread``).
        reference: ``[m, 2k - 1]`` reference descriptors.
        table: per-frame output table: ``.jsonl`` writes JSON lines, anything else CSV
            (columns :data:`FRAME_COLUMNS`, floats written exactly with ``repr``).
        index: ASE selection of frames.
        extxyz: also write every frame with ``arrays["dH"]`` (per-atom dH) and
            ``arrays["cluster"]`` (cluster label, -1 for novel atoms) to this extxyz file,
            for colouring in OVITO.
        h: bandwidth of the kernel (1/Å, default 0.015).
        threshold: dH (nats) above which an atom is novel (default 0, as in the paper).
        k: neighbours per environment of the descriptors (default 32; must match the
            reference's).
        cutoff: descriptor cutoff radius (Å, default 5.0; must match the reference's).
        cluster_cutoff: largest edge of the cluster graph of non-novel atoms (Å,
            default 3.0).
        dtype: compute dtype of descriptors and kernel sums (default float64).
        device: where to compute (default CPU; ``"auto"``/``None``: CUDA, else MPS, else
            CPU).
        batch_atoms: atoms per batch (``None``: :func:`default_batch_atoms`); on a resumed
            run the value stored at the start is reused (so batches, hence results, are
            those of an uninterrupted run).
        readers: reader processes parsing an ``.xyz``/``.extxyz`` trajectory (0 or 1: in
            this process; :func:`quests_torch.io.iter_structures`). The results do not depend
            on it. With ``extxyz``, frames are read by ASE so that the written file keeps
            their ``info`` and arrays.
        types: LAMMPS types to elements for a dump without an ``element`` column
            (``"1=Cu,2=Zr"``, ``"Cu,Zr"``, ``{1: "Cu"}``, ``["Cu", "Zr"]``;
            :func:`quests_torch.io.iter_structures`); part of the trajectory's identity.
        **run: how the run resumes and reports, the keywords of :func:`screen_file`:
            ``reference_key`` and ``trajectory_key`` (what identifies the inputs in the
            resume state), ``overwrite`` (start afresh over another screening's outputs),
            ``progress`` (a tqdm bar) and ``frame_offset``.

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
    fails before leaves no file behind. ``<table>.lock`` stays beside the table: the run holds
    its ``flock`` (a dead run's frees itself); never delete it.
    """
    return screen_file(
        ScreenFiles.check(
            trajectory, table, index=index, extxyz=extxyz, readers=readers, types=types
        ),
        reference,
        ScreenConfig(h, threshold, k, cutoff, cluster_cutoff, dtype, device, batch_atoms),
        **check_run_keywords(run, "screen_trajectory"),
    )


def check_run_keywords(run: dict, caller: str, *, refuse: tuple[str, ...] = ()) -> dict:
    """The run keywords of :func:`screen_file` among ``run``, defaults filled in; an unknown
    keyword (or one in ``refuse``) is the ``TypeError`` of a call of ``caller`` with it.

    Args:
        run: the keywords given to a front end for :func:`screen_file`.
        caller: the front end's name, as the message shows it.
        refuse: keywords of :func:`screen_file` the front end does not take.

    Returns:
        ``{keyword: value}`` for every run keyword of :func:`screen_file`.
    """
    args = bind_arguments(screen_file, caller, (None, None, None), run, refuse=refuse)
    return {name: args[name] for name in _RUN_KEYWORDS}


def screen_file(
    files: ScreenFiles,
    reference: torch.Tensor | np.ndarray,
    config: ScreenConfig,
    *,
    reference_key: str | None = None,
    trajectory_key: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    frame_offset: int = 0,
) -> ScreeningResult:
    """The resumable screening of :func:`screen_trajectory` on checked files and parameters.

    Holds the table's lock (:func:`quests_torch.resume.table_lock`) for the whole run, opens
    its resume state (refusing the outputs of another screening), resumes after the last
    committed batch or starts afresh, then appends and commits one batch at a time and marks
    the state complete. Errors: as :func:`screen_trajectory`.

    Args:
        files: the checked trajectory, selection and outputs (:class:`ScreenFiles`).
        reference: ``[m, 2k - 1]`` reference descriptors.
        config: the checked screening parameters (:class:`ScreenConfig`).
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
    """
    t_start = time.perf_counter()
    if isinstance(frame_offset, bool) or not isinstance(frame_offset, int) or frame_offset < 0:
        raise ValueError(f"`frame_offset` must be a non-negative int, got {frame_offset!r}")
    params, key = files.identity(
        config,
        reference,
        trajectory_key=trajectory_key,
        reference_key=reference_key,
        frame_offset=frame_offset,
    )
    with table_lock(files.table) as lock:
        state = files.open_state(key, params, overwrite=overwrite)
        state.lock = lock
        if state.frames_done > 0:
            done = state.rewind()  # never cuts an edited file; drops an uncommitted tail
        else:  # nothing committed: start afresh, with the recorded batch size if any
            done = 0
            state.begin(
                state.batch_atoms or config.atoms_per_batch(),
                trajectory_path=str(files.trajectory),
            )
        config = replace(config, batch_atoms=state.batch_atoms)
        timings = ScreenTimings()
        _screen_into(files, reference, config, state, timings, progress, frame_offset + done)
        if state.frames_done == 0:
            raise files.no_structures()
        state.complete()
    return ScreeningResult.from_table(
        files,
        screened=state.frames_done - done,
        resumed=done,
        batch_atoms=config.batch_atoms,
        timings=timings,
        t_start=t_start,
    )


_RUN_KEYWORDS = ("reference_key", "trajectory_key", "overwrite", "progress", "frame_offset")


def _screen_into(
    files: ScreenFiles,
    reference,
    config: ScreenConfig,
    state: ResumeState,
    timings: ScreenTimings,
    progress: bool,
    start: int,
) -> None:
    """Screen the frames after the committed ones, appending and committing each batch."""
    done = state.frames_done
    frames = frames_after(
        files.trajectory, files.index, done, readers=files.frame_readers, types=files.types
    )
    batches = _screen_batches(
        frames, reference, config, start=start, timings=timings, source=files.source
    )
    with _progress_bar(progress, files, done) as bar, state:
        for batch in batches:
            t0 = time.perf_counter()
            rows = "".join(format_row(r.row(), files.jsonl) for r in batch).encode()
            state.append(rows, None if files.extxyz is None else extxyz_bytes(batch))
            state.commit(len(batch))  # a kill before this leaves an uncommitted tail, cut later
            timings.write += time.perf_counter() - t0
            if bar is not None:
                bar.update(len(batch))


@contextmanager
def _progress_bar(progress: bool, files: ScreenFiles, done: int) -> Iterator:
    """A tqdm bar over the selected frames (``None`` without ``progress`` or tqdm)."""
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            total = count_frames(files.trajectory, files.index)
            bar = tqdm(total=total, initial=done, desc="screen", unit="frame")
        except ImportError:  # pragma: no cover - progress bars are optional
            bar = None
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()
