"""Dataset compression: which structures of a dataset carry information.

Which structures of a dataset carry information and which are redundant:

* :func:`compress` selects whole structures to a target size with ``msc`` (the
  minimum-set-cover-like greedy of Yu, Lordi & Schwalbe-Koda 2025), ``msc_conditional``
  (the same, given a prior dataset), ``fps`` (farthest-point sampling on mean pairwise
  descriptor distances), and the baselines ``random`` and ``k_means``; it returns the
  selection order and the compression curve (entropy, diversity and overlap of the
  selection after every selected structure).
* :func:`selection_summary` summarises any selection. (:func:`generation_report`, the
  generations of an active-learning loop, lives in :mod:`quests_torch.generations` and is
  re-exported here.)

Both keep one running log kernel sum per environment,
``log K_e = log sum_{y in selected} exp(-|x_e - y|^2 / (2 h^2))``, on the descriptors'
device, and update it with one tiled kernel pass per selected structure (earlier kernels
are never recomputed). ``msc`` selects ``argmax_s [ -min_{e in s} log K_e + H_s ]``;
since ``dH(e | selection) = -log K_e``, the same sums give the entropy, diversity and overlap
of every prefix of the selection for free.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from ._memory import memory_budget
from ._precision import compute_dtype
from .checkpoint import Checkpoint, checkpoint_key
from .checks import Progress, check_generator, check_single_bandwidth, check_threshold
from .compression_baselines import MeanDistances, k_means
from .generations import GenerationReport, generation_report
from .grouped import GroupedDescriptors, as_descriptor_tensor, concat_groups, group_descriptors
from .kde import DEFAULT_BANDWIDTH, RunningLogKernelSum, engine
from .metrics import (
    diversity_from_log_p,
    entropy_from_log_p,
    entropy_per_structure,
)
from .structures import segment_sum

__all__ = [
    "METHODS",
    "Compression",
    "CompressionCurve",
    "GenerationReport",
    "compress",
    "compress_structures",
    "generation_report",
    "selection_summary",
]

#: compression methods understood by :func:`compress`
METHODS = ("msc", "msc_conditional", "fps", "random", "k_means")
"""The selection methods of :func:`compress`."""


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _target_size(size, n: int) -> int:
    """A count (int, 1..n) or a fraction (float in (0, 1]) -> number of structures."""
    if isinstance(size, bool) or not isinstance(size, numbers.Real):
        raise TypeError(f"`size` must be an int count or a float fraction, got {size!r}")
    if isinstance(size, numbers.Integral):
        if not 1 <= int(size) <= n:
            raise ValueError(f"`size` must be between 1 and {n} structures, got {size}")
        return int(size)
    f = float(size)
    if not (0.0 < f <= 1.0):
        raise ValueError(f"`size` as a fraction must be in (0, 1], got {size}")
    return max(1, min(n, math.ceil(n * f - 1e-9)))


# --------------------------------------------------------------------------------------------
# running kernel sums and the compression curve
# --------------------------------------------------------------------------------------------


def _running(x: torch.Tensor, h: float, options: dict) -> RunningLogKernelSum:
    return RunningLogKernelSum(x, h, dtype=options.get("dtype"), budget=options.get("budget"))


def _self_start(data: GroupedDescriptors, s: int) -> int | None:
    """The first row of structure ``s`` in float32-only mode, where the running sums pin its
    self pairs to an exponent of 0 (float32 rounding, ~1e-5, would otherwise decide whether
    an environment with dH near 0 is covered); ``None`` in float64, whose bits stay as they
    were (its rounding there is ~1e-13)."""
    f32 = compute_dtype(data.x.device, torch.float64) == torch.float32
    return int(data.start[s]) if f32 else None


class _CurveRecorder:
    """Entropy, diversity and overlap of the selection after every step, kept on the device.

    Per step: a gather of the selected environments' running sums (entropy, diversity) and
    one comparison pass over all environments (overlap); no host transfer until the end.
    """

    def __init__(self, data: GroupedDescriptors, running: RunningLogKernelSum, threshold: float):
        self.data, self.running, self.threshold = data, running, threshold
        self.idx = torch.empty(0, dtype=torch.long, device=data.x.device)
        self.n_env = 0
        self.rows: list[torch.Tensor] = []
        self.envs: list[int] = []

    def record(self, s: int) -> None:
        d = self.data
        a, b = int(d.start[s]), int(d.end[s])
        self.idx = torch.cat([self.idx, torch.arange(a, b, device=self.idx.device)])
        self.n_env += b - a
        log_k = self.running.log_k
        sel = log_k[self.idx]
        h = entropy_from_log_p(sel)  # n_env rows: the selection against itself
        div = diversity_from_log_p(sel)
        # covered: dH = -log K <= threshold  <=>  log K >= -threshold (exact in IEEE)
        covered = (log_k >= -self.threshold).sum().to(log_k.dtype) / d.n
        self.rows.append(torch.stack([h, div, covered]))
        self.envs.append(self.n_env)

    def curve(self, size: int | None = None) -> CompressionCurve:
        m = len(self.envs) if size is None else min(size, len(self.envs))
        values = torch.stack(self.rows[:m]).cpu()
        return CompressionCurve(
            n_structures=torch.arange(1, m + 1),
            n_environments=torch.tensor(self.envs[:m]),
            entropy=values[:, 0],
            diversity=values[:, 1],
            overlap=values[:, 2],
        )


@dataclass
class CompressionCurve:
    """Entropy, diversity and overlap of the first ``m`` selected structures, for every ``m``.

    Attributes (all ``[size]`` CPU tensors):
        n_structures: ``1..size``.
        n_environments: environments in the first ``m`` structures.
        entropy: ``H`` of the selection (nats).
        diversity: ``D`` of the selection (nats).
        overlap: fraction of the *whole* dataset's environments covered by the selection,
            ``dH(x | selection) <= threshold``.
    """

    n_structures: torch.Tensor
    n_environments: torch.Tensor
    entropy: torch.Tensor
    diversity: torch.Tensor
    overlap: torch.Tensor

    def as_dict(self) -> dict[str, list]:
        """The curve as plain lists, one per field (for JSON)."""
        return {f.name: getattr(self, f.name).tolist() for f in fields(self)}

    def __repr__(self) -> str:
        m = int(self.n_structures.numel())
        return (
            f"CompressionCurve({m} points, H {float(self.entropy[0]):.3f}->"
            f"{float(self.entropy[-1]):.3f}, overlap {float(self.overlap[-1]):.3f})"
        )


@dataclass
class Compression:
    """Result of :func:`compress`.

    Attributes:
        indices: ``[size]`` long CPU tensor: the selected structures, in selection order (for
            the greedy methods every prefix is the method's selection of that size).
        method: the method used.
        structure_entropy: ``[n_structures]`` entropy ``H_s`` of each structure's own
            environments (what ``msc`` and ``fps`` seed from).
        n_structures: structures in the dataset.
        n_environments: environments in the dataset.
        curve: :class:`CompressionCurve` of the selection (``None`` with ``curve=False``).
        threshold: dH threshold of the overlap.
    """

    indices: torch.Tensor
    method: str
    structure_entropy: torch.Tensor
    n_structures: int
    n_environments: int
    selected_environments: int
    threshold: float = 0.0
    curve: CompressionCurve | None = field(default=None, repr=False)

    def summary(self) -> dict:
        """Entropy, diversity, overlap and sizes of the selection (needs the curve)."""
        out = {
            "method": self.method,
            "original_size": self.n_structures,
            "compressed_size": int(self.indices.numel()),
            "original_envs": self.n_environments,
            "compressed_envs": self.selected_environments,
        }
        if self.curve is not None:
            out["entropy"] = float(self.curve.entropy[-1])
            out["diversity"] = float(self.curve.diversity[-1])
            out["overlap"] = float(self.curve.overlap[-1])
        return out


# --------------------------------------------------------------------------------------------
# greedy methods
# --------------------------------------------------------------------------------------------


def _segment_min(values: torch.Tensor, data: GroupedDescriptors) -> torch.Tensor:
    out = torch.full((data.n_structures,), math.inf, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, data.sid, values, "amin", include_self=True)


class _GreedySelection:
    """State of a greedy selection (msc, msc_conditional, fps), kept on the device.

    :meth:`prepare` computes a step's updates and :meth:`commit` applies them together, so
    the state between steps is always consistent (what :meth:`snapshot` saves).
    """

    def __init__(
        self,
        method: str,
        data: GroupedDescriptors,
        h: float,
        reference: torch.Tensor | None,
        curve: bool,
        threshold: float,
        options: dict,
    ):
        S = data.n_structures
        dev = data.x.device
        self.method, self.data = method, data
        self.taken = torch.zeros(S, dtype=torch.bool, device=dev)
        self.running = None
        if method in ("msc", "msc_conditional"):
            self.running = _running(data.x, h, options)
            if reference is not None:
                self.running.add(reference)
        self.recorder = None
        if curve:
            tracked = self.running if method == "msc" else _running(data.x, h, options)
            self.recorder = _CurveRecorder(data, tracked, threshold)
        budget = memory_budget(dev, options.get("budget"))
        self.acc = compute_dtype(dev, torch.float64)  # float32 in float32-only mode
        self.min_dist = torch.full((S,), math.inf, dtype=self.acc, device=dev)
        self.mean_dist = MeanDistances(data.x, budget, self.acc) if method == "fps" else None
        recorder = self.recorder
        self.shared = recorder is not None and recorder.running is self.running
        self.separate = recorder.running if recorder is not None and not self.shared else None
        self.order: list[int] = []

    def snapshot(self) -> dict:
        state = {"order": list(self.order), "min_dist": self.min_dist.cpu()}
        if self.running is not None:
            state["log_k"] = self.running.log_k.cpu()
        recorder = self.recorder
        if recorder is not None:
            state["curve_idx"] = recorder.idx.cpu()
            state["curve_rows"] = (
                torch.stack(recorder.rows).cpu() if recorder.rows else torch.zeros(0, 3)
            )
            state["curve_envs"] = list(recorder.envs)
            if self.separate is not None:
                state["curve_log_k"] = self.separate.log_k.cpu()
        return state

    def restore(self, state: dict) -> None:
        dev = self.data.x.device
        self.order = [int(i) for i in state["order"]]
        if self.order:
            self.taken[torch.tensor(self.order, device=dev)] = True
        self.min_dist = state["min_dist"].to(dev, self.acc)
        if self.running is not None:
            self.running.log_k = state["log_k"].to(dev, self.running.log_k.dtype)
        recorder = self.recorder
        if recorder is not None:
            recorder.idx = state["curve_idx"].to(dev)
            recorder.rows = list(state["curve_rows"].to(dev, self.acc).unbind(0))
            recorder.envs = [int(e) for e in state["curve_envs"]]
            recorder.n_env = recorder.envs[-1] if recorder.envs else 0
            if self.separate is not None:
                self.separate.log_k = state["curve_log_k"].to(dev, self.acc)

    def choose(self, step: int, h_s: torch.Tensor, seed: bool) -> int:
        """The structure of ``step``; ``seed``: the first step seeds with ``argmax_s H_s``."""
        if step == 0 and seed:
            # seed: the structure with the most diverse environments
            score = h_s
        elif self.method == "fps":
            score = torch.where(self.taken, -math.inf, self.min_dist)
        else:
            score = -_segment_min(self.running.log_k, self.data) + h_s
            score = torch.where(self.taken, -math.inf, score)
        return int(torch.argmax(score))  # the one host sync of the step: which rows to add

    def prepare(self, s: int, last: bool) -> tuple:
        """The updates of selecting ``s`` (``last``: skip those no later step reads)."""
        rows, start = self.data.rows(s), _self_start(self.data, s)
        running, separate = self.running, self.separate
        new_log_k = new_min = new_curve = None
        if running is not None and not (last and not self.shared):
            new_log_k = torch.logaddexp(running.log_k, running.log_sum(rows, start))
        if self.method == "fps" and not last:
            per_struct = segment_sum(
                self.mean_dist(rows), self.data.sid, self.data.n_structures, is_sorted=True
            )  # over the integer counts: the same bits as over float64 counts
            new_min = torch.minimum(self.min_dist, per_struct / self.data.counts)
        if separate is not None:
            new_curve = torch.logaddexp(separate.log_k, separate.log_sum(rows, start))
        return new_log_k, new_min, new_curve

    def commit(self, s: int, updates: tuple) -> None:
        new_log_k, new_min, new_curve = updates
        self.order.append(s)
        self.taken[s] = True
        if new_log_k is not None:
            self.running.log_k = new_log_k
        if new_min is not None:
            self.min_dist = new_min
        if new_curve is not None:
            self.separate.log_k = new_curve
        if self.recorder is not None:
            self.recorder.record(s)


def _greedy(
    method: str,
    data: GroupedDescriptors,
    h_s: torch.Tensor,
    size: int,
    h: float,
    reference: torch.Tensor | None,
    curve: bool,
    threshold: float,
    options: dict,
    progress: Progress,
    checkpoint: Checkpoint | None = None,
) -> tuple[list[int], CompressionCurve | None]:
    """msc, msc_conditional and fps: one structure per step, selection on the device.

    Each step computes its updates first and commits them together, so the state between
    steps is always consistent (what a checkpoint saves).
    """
    run = _GreedySelection(method, data, h, reference, curve, threshold, options)
    if checkpoint is not None:
        state = checkpoint.load()
        if state is not None:
            run.restore(state)
    # with a checkpoint every update is made (the state can then grow to any size later)
    complete = checkpoint is not None
    tick, bar = engine.progress_ticker(progress, size, method)
    committing = False
    try:
        if run.order:
            tick(min(len(run.order), size))  # resumed steps count as done
        for step in range(len(run.order), size):
            s = run.choose(step, h_s, reference is None)
            updates = run.prepare(s, last=step + 1 == size and not complete)
            committing = True  # the step's updates, together
            run.commit(s, updates)
            committing = False
            if checkpoint is not None and checkpoint.due():
                checkpoint.save(run.snapshot())
            tick(step + 1)
        if checkpoint is not None:
            checkpoint.save(run.snapshot())
    except BaseException:
        if checkpoint is not None and not committing and run.order:
            checkpoint.save(run.snapshot())  # keep every completed step
        raise
    finally:
        if bar is not None:
            bar.close()
    crv = run.recorder.curve(size) if run.recorder is not None else None
    return run.order[:size], crv


# --------------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------------


def _curve_for(
    order: list[int], data: GroupedDescriptors, h: float, threshold: float, options: dict
):
    running = _running(data.x, h, options)
    recorder = _CurveRecorder(data, running, threshold)
    for s in order:
        running.add(data.rows(s), _self_start(data, s))
        recorder.record(s)
    return recorder.curve()


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def _reference(method: str, reference, data: GroupedDescriptors) -> torch.Tensor | None:
    """``reference`` as a descriptor tensor on the data's device (``None`` if empty), checked."""
    ref = None
    if reference is not None:
        if method != "msc_conditional":
            raise ValueError(
                f"`reference` is used by method 'msc_conditional' only, not {method!r}"
            )
        if isinstance(reference, (list, tuple)):
            ref = (
                concat_groups(reference, "reference", data.x.device)[0] if len(reference) else None
            )
        else:
            ref = as_descriptor_tensor(reference, "reference", None)
            ref = ref.to(data.x.device) if ref.shape[0] else None
        if ref is not None:
            if ref.shape[1] != data.x.shape[1]:
                raise ValueError(
                    f"`reference` has descriptor width {ref.shape[1]} but `x` has "
                    f"{data.x.shape[1]}: they were computed with different k or species"
                )
            if not bool(torch.isfinite(ref).all()):
                raise ValueError("`reference` contains NaN or infinite descriptor values")
    elif method == "msc_conditional":
        raise ValueError("method 'msc_conditional' needs a `reference` dataset")
    return ref


def _centre(data: GroupedDescriptors, ref: torch.Tensor | None) -> torch.Tensor | None:
    """Centre ``data.x`` in place (exact distances through the GEMM expansion); ``ref``
    shares the shift and is returned centred. In float64; in float32-only mode in float32,
    where the mean (a pairwise/tree reduction in torch) only sets the shift, which distances
    do not depend on, and each difference is rounded once, as the float64 path rounds it."""
    acc = compute_dtype(data.x.device, torch.float64)
    mu = data.x.to(acc).mean(0)
    data.x = (data.x.to(acc) - mu).to(data.x.dtype)
    if ref is not None:
        ref = (ref.to(acc) - mu).to(ref.dtype)
    return ref


def _baseline_order(
    method: str, data: GroupedDescriptors, n_sel: int, generator, budget, k_means_iter: int
) -> list[int]:
    """The selection of ``random`` or ``k_means``."""
    gen = check_generator(generator)
    if method == "random":
        return torch.randperm(data.n_structures, generator=gen)[:n_sel].tolist()
    acc = compute_dtype(data.x.device, torch.float64)  # float32 in float32-only mode
    means = segment_sum(data.x.to(acc), data.sid, data.n_structures, is_sorted=True)
    means /= data.counts[:, None]  # integer counts: the same bits as float64 ones
    budget_b = memory_budget(data.x.device, budget)
    return k_means(means, n_sel, gen, budget_b, k_means_iter)


def compress(
    x,
    system_idx=None,
    size: int | float = 0.1,
    method: str = "msc",
    *,
    h: float = DEFAULT_BANDWIDTH,
    reference=None,
    generator: torch.Generator | int | None = None,
    curve: bool = True,
    threshold: float = 0.0,
    k_means_iter: int = 100,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    tile_size: int | tuple[int, int] | None = None,
    budget: int | str | None = None,
    progress: Progress = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
) -> Compression:
    """Select the structures of a dataset that carry its information.

    Methods (Yu, Lordi & Schwalbe-Koda 2025; ``H_s`` is the entropy of structure ``s``'s own
    environments and ``log K_e`` the running log kernel sum of environment ``e`` against the
    selection):

    * ``"msc"``: seed with ``argmax_s H_s``; then repeatedly select
      ``argmax_s [ -min_{e in s} log K_e + H_s ]`` (its least-covered environment is novel
      and the structure is diverse) and add its environments to the running sums.
    * ``"msc_conditional"``: as ``msc`` but ``log K_e`` starts from ``reference`` (a dataset
      you already have) and there is no seeding step. An empty reference falls back to
      ``msc``, as upstream does.
    * ``"fps"``: farthest-point sampling from ``argmax_s H_s`` with the structure distance
      ``mean_{i in s, j in t} |x_i - y_j|`` (greedy max-min).
    * ``"random"``: a uniform random sample (``generator`` seeds it).
    * ``"k_means"``: k-means (k-means++ init, Lloyd) on the structures' mean descriptors
      with ``size`` clusters; each cluster contributes the structure nearest its centroid.

    The selection order of ``msc``, ``msc_conditional`` and ``fps`` equals upstream
    ``quests`` (tested); unlike upstream, ``-log K_e`` is computed in the log domain and
    stays finite for environments more than ~38 h from every selected one (upstream's
    ``-log(0) = inf`` ties are then broken by the first index).

    Args:
        x: descriptors ``[n, d]`` of all environments (with ``system_idx``), or a list of
            per-structure ``[n_s, d]`` arrays/tensors.
        system_idx: ``[n]`` structure of each environment, structures numbered
            ``0..S-1`` (ignored for a list ``x``).
        size: number of structures (int, ``1 <= size <= S``) or a fraction of them (float in
            ``(0, 1]``, rounded up).
        method: one of :data:`METHODS`.
        h: bandwidth (1/Å).
        reference: ``msc_conditional`` only: descriptors ``[m, d]`` of the prior dataset
            (same ``k``, cutoff and species as ``x``).
        generator: seed or ``torch.Generator`` for ``random`` and ``k_means``.
        curve: compute the compression curve (one extra tiled pass per selected structure
            for ``fps``, ``random`` and ``k_means``; free for ``msc``).
        threshold: dH threshold of the overlap (covered: ``dH <= threshold``; upstream's
            compressor uses ``dH < 1e-5``).
        k_means_iter: maximum Lloyd iterations.
        dtype: compute dtype of the kernel tiles (default the descriptors' dtype). In
            float32-only mode (:func:`quests_torch._precision.float64_enabled`) everything
            runs in float32 and the entropies and curve come back float32.
        device: compute device for numpy inputs (tensors are used where they live).
        tile_size: kernel tile size (results do not depend on it).
        budget: memory budget of the tiles (bytes or ``"512M"``).
        progress: ``True`` for a tqdm bar or a callable ``(done, total)``.
        checkpoint: ``msc``, ``msc_conditional``, ``fps``: a file where the selection's state
            is saved atomically every ``checkpoint_every`` seconds, at the end, and on an
            interrupt. Calling again with the same data and parameters resumes from it
            (the result equals an uninterrupted run's); a larger ``size`` extends it, a
            smaller one is answered from its prefix. A checkpoint of other data or
            parameters is refused: it is keyed on sha256 hashes of the descriptors, the
            environments per structure and ``reference``, and on ``method``, ``h``,
            ``threshold``, ``dtype`` and ``curve`` (hashing reads the data once, ~1 s/GB).
        checkpoint_every: seconds between checkpoint saves.

    Returns:
        :class:`Compression` (``indices`` in selection order, ``curve``, ``summary()``).
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(METHODS)}; got {method!r}")
    h = check_single_bandwidth(h)
    threshold = check_threshold(threshold)
    data = group_descriptors(x, system_idx, "x", device)
    n_sel = _target_size(size, data.n_structures)
    options = {"dtype": dtype, "tile_size": tile_size, "budget": budget}
    ref = _reference(method, reference, data)

    key = None
    if checkpoint is not None and method in ("msc", "msc_conditional", "fps"):
        # of the data as given (before centring), the problem as solved (``effective``)
        effective = "msc" if method == "msc_conditional" and ref is None else method
        parameters = {"h": h, "threshold": threshold, "dtype": dtype, "curve": curve}
        if compute_dtype(data.x.device, torch.float64) != torch.float64:
            parameters["float32_only"] = True  # float32 state: never resumed in float64
        key = checkpoint_key(effective, data, ref, parameters)

    ref = _centre(data, ref)
    acc = compute_dtype(data.x.device, torch.float64)  # float32 in float32-only mode
    h_s = entropy_per_structure(data.x, data.sid, h, centre=False, **options).to(acc)

    if method in ("msc", "msc_conditional", "fps"):
        effective = "msc" if method == "msc_conditional" and ref is None else method
        ckpt = None
        if checkpoint is not None:
            if isinstance(checkpoint_every, bool) or not checkpoint_every >= 0:
                raise ValueError(f"`checkpoint_every` must be >= 0 s, got {checkpoint_every!r}")
            ckpt = Checkpoint(checkpoint, key, checkpoint_every)
        order, crv = _greedy(
            effective, data, h_s, n_sel, h, ref, curve, threshold, options, progress, ckpt
        )
    else:
        if checkpoint is not None:
            raise ValueError(
                f"`checkpoint` applies to msc, msc_conditional and fps, not {method!r}"
            )
        order = _baseline_order(method, data, n_sel, generator, budget, k_means_iter)
        crv = _curve_for(order, data, h, threshold, options) if curve else None

    idx = torch.tensor(order, dtype=torch.long)
    counts = data.counts.cpu()
    return Compression(
        indices=idx,
        method=method,
        structure_entropy=h_s.cpu(),
        n_structures=data.n_structures,
        n_environments=data.n,
        selected_environments=int(counts[idx].sum()),
        threshold=threshold,
        curve=crv,
    )


def compress_structures(
    structures: Sequence,
    size: int | float = 0.1,
    method: str = "msc",
    *,
    reference: Sequence | None = None,
    k: int | None = None,
    cutoff: float | None = None,
    **kwargs,
) -> Compression:
    """:func:`compress` for a list of ``ase.Atoms`` (descriptors computed here).

    Args:
        structures: the dataset.
        size: structures to select: a count (int) or a fraction of the dataset (float).
        method: one of :data:`METHODS` (see :func:`compress`).
        reference: ``msc_conditional``: the prior dataset as a list of ``ase.Atoms``.
        k: neighbours of the descriptors (default 32).
        cutoff: descriptor cutoff radius (Å, default 5).
        **kwargs: forwarded to :func:`compress` (``dtype`` and ``device`` also to the
            descriptors).
    """
    from .descriptors import DEFAULT_CUTOFF, DEFAULT_K, get_descriptors

    if len(structures) == 0:
        raise ValueError("`structures` is empty")
    k = DEFAULT_K if k is None else k
    cutoff = DEFAULT_CUTOFF if cutoff is None else cutoff
    desc_kw = {"dtype": kwargs.get("dtype") or torch.float64, "device": kwargs.get("device", "cpu")}
    x = get_descriptors(list(structures), k=k, cutoff=cutoff, **desc_kw)
    counts = torch.tensor([len(a) for a in structures], device=x.device)
    sid = torch.repeat_interleave(torch.arange(len(structures), device=x.device), counts)
    ref = None
    if reference is not None:
        ref = get_descriptors(list(reference), k=k, cutoff=cutoff, **desc_kw)
    kwargs.pop("device", None)
    return compress(x, sid, size, method, reference=ref, **kwargs)


def selection_summary(
    x,
    system_idx=None,
    selected=None,
    *,
    h: float = DEFAULT_BANDWIDTH,
    threshold: float = 0.0,
    **options,
) -> dict:
    """Entropy, diversity and overlap of a selection of structures, and its sizes.

    ``overlap`` is the fraction of the *whole* dataset's environments covered by the
    selection (``dH(x | selection) <= threshold``).

    Args:
        x: ``[n, d]`` descriptors of the dataset, as in :func:`compress`.
        system_idx: ``[n]`` structure index of each environment, as in :func:`compress`.
        selected: indices of the selected structures.
        h: bandwidth (1/Å).
        threshold: dH threshold of the overlap.
        **options: forwarded to :func:`quests_torch.kde.kernel_pass`.

    Returns:
        dict with ``entropy``, ``diversity``, ``overlap``, ``original_size``,
        ``compressed_size``, ``original_envs``, ``compressed_envs``.
    """
    from .metrics import diversity, entropy, overlap

    data = group_descriptors(x, system_idx, "x", options.pop("device", None))
    if selected is None:
        raise ValueError("`selected` is required: indices of the selected structures")
    sel = torch.as_tensor(selected, dtype=torch.long).flatten().cpu()
    if sel.numel() == 0:
        raise ValueError("`selected` is empty")
    if bool((sel < 0).any()) or bool((sel >= data.n_structures).any()):
        raise ValueError(f"`selected` must index structures 0..{data.n_structures - 1}")
    if sel.unique().numel() != sel.numel():
        raise ValueError("`selected` repeats a structure")
    mask = torch.zeros(data.n_structures, dtype=torch.bool, device=data.x.device)
    mask[sel.to(data.x.device)] = True
    xs = data.x[mask[data.sid]]
    threshold = check_threshold(threshold)
    return {
        "entropy": float(entropy(xs, h, **options)),
        "diversity": float(diversity(xs, h, **options)),
        "overlap": float(overlap(data.x, xs, h, threshold, **options)),
        "original_size": data.n_structures,
        "compressed_size": int(sel.numel()),
        "original_envs": data.n,
        "compressed_envs": int(xs.shape[0]),
    }
