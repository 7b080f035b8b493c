"""Several processes, GPUs and nodes: the kernel sums, metrics, descriptors and screening
sharded with :mod:`torch.distributed` (NCCL on GPUs, gloo on CPUs, launched with ``torchrun``).

Every public function here has the signature of its single-process counterpart and, when no
process group is initialised (or the world has one rank), simply calls it: the same code runs
under ``python`` and under ``torchrun --nproc-per-node N``. With ``W > 1`` ranks each rank
computes a share and the shares are combined with collectives; **every rank returns the whole
result** (the same tensor on every rank). The inputs (descriptor tensors, numpy arrays or
``np.memmap`` files) must be the same on every rank; each rank reads only the rows it needs.

Kernel sums ``log p(x_i | Y) = log sum_j exp(-|x_i - y_j|^2 / (2 h^2))`` are split three ways
(``shard=`` option; ``"auto"`` picks by size):

* ``"tiles"`` (an unweighted set against itself, entropy/diversity; ``"rows"`` otherwise): the
  upper triangle of square tiles of
  the single-process symmetric sweep is dealt out to the ranks (row blocks ``b`` and
  ``B - 1 - b`` paired, so every pair costs ``B + 1`` tiles), each rank accumulates row and
  column sums of its tiles, and the partial log sums are combined exactly across ranks::

      M_i = max_r log p_i^(r)                       (all_reduce MAX)
      S_i = sum_r exp(log p_i^(r) - M_i)            (all_reduce SUM)
      log p_i = M_i + log S_i

  Cost per rank ``n^2 / (2 W)`` pairs (the single process pays ``n^2 / 2``). Rows whose sum is
  too small for the clamped fast path (``dH`` above ~650 nats) are then recomputed exactly
  with the shifted online log-sum-exp, those rows split over the ranks.
* ``"rows"`` (queries): rank ``r`` takes the rows :func:`shard_range` of ``x`` against all of
  ``y``; the ``[n]`` results are all-gathered (padded to equal sizes for gloo) in order.
* ``"cols"`` (references too large for one device): rank ``r`` keeps only its block of
  reference rows resident, computes exact partial log sums of every query against it and the
  partials are combined with the cross-rank log-sum-exp above. Centring uses the global mean
  (all_reduce SUM), so the numbers are those of one process up to summation order.

``"auto"``: a set against itself uses ``"tiles"`` when the prepared set fits in half of the
device budget (:func:`quests_torch._memory.memory_budget`), else ``"cols"``; queries against
references use ``"rows"`` unless the references do not fit (or there are fewer than 64 query
rows per rank), then ``"cols"``. Results agree with one process to ~1e-15 relative in
float64 (tested at 1e-12); they differ only by the order of float64 additions.

Collectives run on the backend's device (``cuda:LOCAL_RANK`` for NCCL, CPU for gloo); results
are returned on the compute device of the inputs. The distributed paths are forward only
(``no_grad``): for gradients call :mod:`quests_torch.metrics` on each rank's own data.

Descriptors (:func:`get_descriptors`) are split by structure (contiguous blocks balanced by
atom count) and all-gathered in input order. Trajectory screening (:func:`screen_trajectory`)
gives each rank a contiguous block of the selected frames, screened by
:func:`quests_torch.screening.screen_trajectory` into its own part files with its own resume
state (``<table>.parts/``); after all ranks finish, rank 0 concatenates the parts, in frame
order, into the one table (and extxyz) atomically between two writes of the table's resume
state (one before, one marking it complete after), so a crash during the merge is resumed
by merging again and a later run with any number of ranks (or none) finds the screening
complete. Rank 0 holds the table's lock for the whole run; the resume rules are those of
:mod:`quests_torch.resume`, shared with the single-process screening.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import metrics as _metrics
from . import screening as _screening
from ._memory import memory_budget
from .checks import check_bandwidths, check_threshold
from .clusters import DEFAULT_CLUSTER_CUTOFF
from .descriptors import DEFAULT_CUTOFF, DEFAULT_K
from .descriptors import get_descriptors as _get_descriptors
from .estimates import resolve_rows
from .io import atomic_write, check_index, count_frames, iter_structures
from .kde import (
    DEFAULT_BANDWIDTH,
    ArrayLike,
    Bandwidth,
    _as_log_weights,
    _compute_device,
    _forward,
    _Problem,
    _progress_callback,
    _Source,
    _sweep_plain,
    _sweep_shifted,
    full_precision,
)
from .metrics import (
    DatasetSummary,
    LearningCurve,
    _generator,
    diversity_from_log_p,
    entropy_from_log_p,
    fraction_above,
)
from .resume import (
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
from .resume import trajectory_key as _content_key
from .screening import ScreeningResult, ScreenTimings, default_batch_atoms
from .structures import AtomsBatch, resolve_device

__all__ = [
    "comm_device",
    "dataset_summary",
    "delta_entropy",
    "diversity",
    "entropy",
    "entropy_learning_curve",
    "get_descriptors",
    "init_from_env",
    "is_distributed",
    "log_kernel_sum",
    "novelty",
    "overlap",
    "rank",
    "screen_trajectory",
    "shard_range",
    "world_size",
]

_SHARDS = ("auto", "tiles", "rows", "cols")
#: below this many query rows per rank, "auto" shards the references instead of the queries
_MIN_ROWS_PER_RANK = 64
#: learning-curve subsets with more pairs than this are computed by all ranks together
_COLLECTIVE_PAIRS = 1 << 24
_BACKEND_ENV = "QUESTS_TORCH_DIST_BACKEND"


# --------------------------------------------------------------------------------------------
# process group
# --------------------------------------------------------------------------------------------


def is_distributed() -> bool:
    """``True`` when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank (0 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Contiguous block ``[i0, i1)`` of ``n`` items owned by a rank.

    ``i0 = floor(r n / W)``, ``i1 = floor((r + 1) n / W)``: blocks in rank order, sizes differ
    by at most one, empty blocks when ``n < W``.

    Args:
        n: number of items.
        rank_: the rank (default this process's).
        world: the world size (default the current one).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"`n` must be a non-negative int, got {n!r}")
    w = world_size() if world is None else int(world)
    r = rank() if rank_ is None else int(rank_)
    if not 0 <= r < w:
        raise ValueError(f"`rank_` must lie in [0, {w}), got {r}")
    return r * n // w, (r + 1) * n // w


def _counts(n: int) -> list[int]:
    w = world_size()
    return [shard_range(n, r, w)[1] - shard_range(n, r, w)[0] for r in range(w)]


def comm_device() -> torch.device:
    """Device of the collectives: ``cuda:<current>`` for a pure NCCL group, else CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(backend: str | None = None, timeout: float | None = None) -> bool:
    """Initialise the default process group from ``torchrun``'s environment, if there is one.

    Does nothing (returns ``False``) when a group already exists or ``WORLD_SIZE`` is unset or
    1. Otherwise: backend ``backend``, else ``$QUESTS_TORCH_DIST_BACKEND``, else NCCL when
    CUDA is available and gloo otherwise; with NCCL the current CUDA device is set to
    ``LOCAL_RANK`` first (one GPU per process). Rendezvous via ``MASTER_ADDR``/``MASTER_PORT``
    (``init_method="env://"``), as set by ``torchrun``.

    Args:
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (automatic).
        timeout: collective timeout in seconds (default torch's).

    Returns:
        ``True`` when this call created the group (the caller should then
        ``torch.distributed.destroy_process_group()`` at the end).
    """
    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or os.environ.get(_BACKEND_ENV) or None
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
    dist.init_process_group(backend, init_method="env://", **kwargs)
    return True


# --------------------------------------------------------------------------------------------
# collectives (no-ops on one rank)
# --------------------------------------------------------------------------------------------


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    """A reduced copy of ``t`` (same device as ``t``); ``t`` itself is not modified."""
    if not is_distributed():
        return t
    buf = t.detach().to(comm_device(), copy=True)
    dist.all_reduce(buf, op=op)
    return buf.to(t.device)


def _all_gather_rows(local: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Concatenate every rank's ``local`` (``counts[r]`` rows each) in rank order.

    Shapes are padded to the largest block (gloo needs equal shapes).
    """
    if not is_distributed():
        return local
    dev = comm_device()
    most = max(counts)
    if most == 0:
        return local
    buf = torch.zeros((most, *local.shape[1:]), dtype=local.dtype, device=dev)
    buf[: local.shape[0]] = local.detach().to(dev)
    out = [torch.empty_like(buf) for _ in range(world_size())]
    dist.all_gather(out, buf)
    return torch.cat([o[:c] for o, c in zip(out, counts, strict=True)]).to(local.device)


def _broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


def _logsumexp_ranks(log_p: torch.Tensor) -> torch.Tensor:
    """Exact combination of partial log sums: ``M + log sum_r exp(log p^(r) - M)``."""
    if not is_distributed():
        return log_p
    m = _all_reduce(log_p, dist.ReduceOp.MAX)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows -inf on every rank
    s = _all_reduce(torch.exp(log_p - shift), dist.ReduceOp.SUM)
    return shift + torch.log(s)


def _raise_if_any_failed(error: BaseException | None, what: str) -> None:
    """Collective: re-raise ``error`` here, or fail on every rank when another rank failed."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    flag = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64)
    failed = _all_reduce(flag, dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if float(failed[0]) > 0:
        raise RuntimeError(f"{what} failed on another rank (see its error message)")


# --------------------------------------------------------------------------------------------
# sharded kernel sums
# --------------------------------------------------------------------------------------------


class _ShardProblem(_Problem):
    """:class:`quests_torch.kde._Problem` with global row/column offsets.

    * ``pin``: rows and columns are blocks of one set (global indices ``row_offset + i`` and
      ``col_offset + j``): the self pairs get an exponent of exactly 0, like the single-process
      symmetric sweep.
    * ``mu``: the centring mean to use (the global mean when the references are sharded).
    * ``owned``: for the triangular sweep, the row blocks this rank evaluates.
    """

    def __init__(
        self,
        xs: _Source,
        ys: _Source,
        hs: list[float],
        *,
        row_offset: int = 0,
        col_offset: int = 0,
        pin: bool = False,
        mu: torch.Tensor | None = None,
        centre: bool = True,
        **kwargs,
    ):
        super().__init__(xs, ys, hs, centre=centre and mu is None, **kwargs)
        self.row_offset, self.col_offset = row_offset, col_offset
        self.pin = pin
        self.owned: np.ndarray | None = None
        if mu is not None and centre:
            self.mu = mu.to(device=self.device, dtype=torch.float64)
            if self.cols_resident is not None:
                self.cols_resident = self._build_cols(0, self.m)

    def exponent_tile(self, i0, i1, j0, j1, xr, xraw, yc, out):
        if not self.pin:
            return super().exponent_tile(i0, i1, j0, j1, xr, xraw, yc, out)
        self.exponent(xr, xraw, yc, out)
        gi0, gj0 = i0 + self.row_offset, j0 + self.col_offset
        lo, hi = max(gi0, gj0), min(i1 + self.row_offset, j1 + self.col_offset)
        if lo < hi:
            diag = out.diagonal(offset=gi0 - gj0)
            if self.fold_lw:  # the exponent of a self pair is its log weight, exactly
                diag.copy_(self.lw[lo - self.col_offset : hi - self.col_offset])
            else:
                diag.fill_(0.0)
        return out

    def col_range(self, i0: int, i1: int, triangular: bool = False) -> tuple[int, int]:
        if triangular and self.owned is not None and not self.owned[i0 // self.tm]:
            return i0, i0  # another rank's row block
        return super().col_range(i0, i1, triangular)

    def subset_rows(self, index: torch.Tensor) -> _Problem:
        sub = super().subset_rows(index)
        sub.pin = False  # the subset's rows are no longer aligned with the columns
        sub.owned = None
        return sub


def _owned_blocks(n_blocks: int, world: int, rank_: int) -> np.ndarray:
    """Row blocks of the triangular sweep for ``rank_``: blocks ``b`` and ``B - 1 - b`` are
    paired (``B + 1`` tiles per pair), pairs dealt by longest-processing-time first."""
    units = []
    for b in range((n_blocks + 1) // 2):
        pair = (b,) if b == n_blocks - 1 - b else (b, n_blocks - 1 - b)
        units.append((sum(n_blocks - i for i in pair), pair))
    load = [0] * world
    owned = np.zeros(n_blocks, dtype=bool)
    for cost, pair in sorted(units, key=lambda u: (-u[0], u[1])):
        r = min(range(world), key=lambda q: (load[q], q))
        load[r] += cost
        if r == rank_:
            owned[list(pair)] = True
    return owned


def _rows_of(a: ArrayLike, i0: int, i1: int) -> ArrayLike:
    return a[i0:i1]  # a view for tensors and (mem)maps: only these rows are ever read


def _check_shard(shard: str) -> str:
    if shard not in _SHARDS:
        raise ValueError(f"`shard` must be one of {', '.join(map(repr, _SHARDS))}, got {shard!r}")
    return shard


def _plan(shard: str, same: bool, n: int, m: int, width: int, itemsize: int, budget: int) -> str:
    fits = m * width * itemsize <= budget // 2
    if shard == "auto":
        if same:
            return "tiles" if fits else "cols"
        if not fits or n < _MIN_ROWS_PER_RANK * world_size():
            return "cols"
        return "rows"
    if shard == "tiles" and not same:
        return "rows"  # the triangular sweep needs an unweighted set against itself
    return shard


def _sharded_log_p(
    x: ArrayLike,
    y: ArrayLike,
    h: Bandwidth,
    *,
    names: tuple[str, str],
    log_weights=None,
    shard: str = "auto",
    dtype: torch.dtype | None = None,
    centre: bool = True,
    distance: str = "matmul",
    tile_size=None,
    budget=None,
    device=None,
    progress=None,
) -> torch.Tensor:
    """``log p(x_i | y)`` computed by all ranks together; the whole result on every rank."""
    _check_shard(shard)
    hs, vector = check_bandwidths(h)
    same = y is x
    xs = _Source(x, names[0])
    ys = xs if same else _Source(y, names[1])
    if xs.d != ys.d:
        raise ValueError(
            f"`{names[0]}` and `{names[1]}` must have the same descriptor width, "
            f"got {xs.d} and {ys.d}"
        )
    lw = _as_log_weights(log_weights, device)
    if lw is not None and tuple(lw.shape) != (ys.n,):
        raise ValueError(
            f"`log_weights` must have shape ({ys.n},) like the rows of `{names[1]}`, "
            f"got {tuple(lw.shape)}"
        )
    if device is None and xs.device is None and ys.device is None:
        device = comm_device()
    dev = _compute_device([xs, ys], device)
    out_dtype = torch.promote_types(xs.dtype, ys.dtype)
    compute_dtype = out_dtype if dtype is None else dtype
    if compute_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"`dtype` must be torch.float32 or torch.float64, got {compute_dtype}")
    plan = _plan(
        shard,
        same and lw is None,
        xs.n,
        ys.n,
        ys.d + 3,
        compute_dtype.itemsize,
        memory_budget(dev, budget),
    )
    lead = rank() == 0
    common = dict(
        dtype=dtype,
        distance=distance,
        tile_size=tile_size,
        budget=budget,
        device=dev,
        centre=centre,
    )
    n_h = len(hs)
    w, r = world_size(), rank()

    if plan == "tiles":
        p = _ShardProblem(xs, xs, hs, same=True, **common)
        if not p.same:  # pragma: no cover - guarded by _plan
            raise RuntimeError("internal: the triangular sweep needs an unweighted self pass")
        n_blocks = -(-p.n // p.tm)
        if tile_size is None:
            # a multiple of 2W blocks (at least 4W): the folded pairs divide evenly over the
            # ranks; tiles only shrink, never below 64 rows
            target = -(-max(n_blocks, 4 * w) // (2 * w)) * (2 * w)
            p._set_tiles(min(p.tm, max(64, -(-p.n // target))))
            n_blocks = -(-p.n // p.tm)
        p.owned = _owned_blocks(n_blocks, w, r)
        callback, bar = _progress_callback(progress if lead else None, p.n, "kernel sums")
        try:
            with full_precision(), torch.no_grad():
                log_p = _logsumexp_ranks(_sweep_plain(p, callback).log_p)
                threshold = p.floor + math.log(p.m) - math.log(p.eps)
                far_flag = (log_p < threshold).any(1).to(torch.float64)
                far = (_all_reduce(far_flag, dist.ReduceOp.MAX) > 0).nonzero().squeeze(1)
                if far.numel() > 0:
                    f0, f1 = shard_range(int(far.numel()))
                    if f1 > f0:
                        part = _sweep_shifted(p.subset_rows(far[f0:f1]))
                    else:
                        part = torch.empty(0, n_h, dtype=p.acc, device=dev)
                    log_p[far] = _all_gather_rows(part, _counts(int(far.numel())))
        finally:
            if bar is not None:
                bar.close()
    elif plan == "rows":
        r0, r1 = shard_range(xs.n)
        if r1 > r0:
            xl = _Source(_rows_of(x, r0, r1), names[0])
            p = _ShardProblem(
                xl, ys, hs, log_weights=lw, pin=same, row_offset=r0, col_offset=0, **common
            )
            local = _forward(p, progress if lead else None).log_p
        else:
            local = torch.empty(0, n_h, dtype=torch.float64, device=dev)
        log_p = _all_gather_rows(local, _counts(xs.n))
    else:  # cols
        c0, c1 = shard_range(ys.n)
        mu = None
        if centre:
            total = torch.zeros(ys.d, dtype=torch.float64, device=dev)
            if c1 > c0:
                yl = _Source(_rows_of(y, c0, c1), names[1])
                chunk = max(1, (1 << 24) // (8 * ys.d))
                total = yl.check_finite_and_mean(dev, chunk) * (c1 - c0)
            mu = _all_reduce(total, dist.ReduceOp.SUM) / ys.n
        lw_l = None if lw is None else lw[c0:c1]
        empty = c1 <= c0 or (lw_l is not None and not bool(torch.isfinite(lw_l).any()))
        if empty:
            local = torch.full((xs.n, n_h), -math.inf, dtype=torch.float64, device=dev)
        else:
            yl = _Source(_rows_of(y, c0, c1), names[1])
            p = _ShardProblem(
                xs, yl, hs, log_weights=lw_l, pin=same, col_offset=c0, mu=mu, **common
            )
            local = _forward(p, progress if lead else None).log_p
        log_p = _logsumexp_ranks(local)
        if lw is not None and not bool(torch.isfinite(log_p).any()):
            raise ValueError("`log_weights` are all -inf (every weight is zero)")
    log_p = log_p.to(out_dtype)
    return log_p if vector else log_p[:, 0]


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def log_kernel_sum(
    x: ArrayLike,
    y: ArrayLike,
    h: Bandwidth = DEFAULT_BANDWIDTH,
    *,
    log_weights: torch.Tensor | np.ndarray | None = None,
    shard: str = "auto",
    **options,
) -> torch.Tensor:
    """:func:`quests_torch.kde.log_kernel_sum` computed by all ranks together.

    ``log p(x_i | Y) = logsumexp_j(log w_j - |x_i - y_j|^2 / (2 h^2))``; ``y is x`` uses the
    symmetric sweep (``shard="tiles"``).

    Args:
        x: queries ``[n, d]``, the same on every rank (tensor, numpy array or memmap).
        y: references ``[m, d]``, the same on every rank.
        h: bandwidth (1/Å) or a 1-D sequence of bandwidths.
        log_weights: optional ``[m]`` log weights of the references.
        shard: ``"auto"``, ``"tiles"`` (``y is x`` only), ``"rows"`` or ``"cols"`` (see the
            module docstring).
        **options: ``dtype``, ``centre``, ``distance``, ``tile_size``, ``budget``, ``device``,
            ``progress`` as in :func:`quests_torch.kde.kernel_pass`.

    Returns:
        ``[n]`` (``[n, n_h]`` for a vector ``h``) on every rank; not differentiable when
        distributed.
    """
    if not is_distributed():
        _check_shard(shard)
        from .kde import log_kernel_sum as _single

        return _single(x, y, h, log_weights=log_weights, **options)
    return _sharded_log_p(x, y, h, names=("x", "y"), log_weights=log_weights, **options)


def _same_seed(generator):
    """``generator`` itself, or for ``None`` a seed drawn on rank 0 and broadcast."""
    if generator is None:
        return int(_broadcast_object(int(torch.randint(0, 2**62, (1,)).item())))
    return generator


def _self_log_p(x: ArrayLike, h: Bandwidth, options: dict) -> torch.Tensor:
    return _sharded_log_p(x, x, h, names=("x", "x"), **options)


def entropy(x: ArrayLike, h: Bandwidth = DEFAULT_BANDWIDTH, **options) -> torch.Tensor:
    """:func:`quests_torch.metrics.entropy` computed by all ranks together.

    ``H(X) = log n - (1/n) sum_i log p(x_i | X)``, the sum over all ``n`` rows gathered on
    every rank in order, then reduced exactly as in one process.

    Args:
        x: descriptors ``[n, d]``, the same on every rank.
        h: bandwidth (1/Å) or a 1-D sequence of bandwidths.
        **options: ``shard`` plus the options of :func:`quests_torch.kde.kernel_pass`.

    Returns:
        0-d tensor (``[n_h]`` for a vector ``h``), the same on every rank.
    """
    if not is_distributed():
        _check_shard(options.pop("shard", "auto"))
        return _metrics.entropy(x, h, **options)
    return entropy_from_log_p(_self_log_p(x, h, options))


def diversity(x: ArrayLike, h: Bandwidth = DEFAULT_BANDWIDTH, **options) -> torch.Tensor:
    """:func:`quests_torch.metrics.diversity` (``D = log sum_i 1 / p(x_i | X)``), all ranks
    together; see :func:`entropy`."""
    if not is_distributed():
        _check_shard(options.pop("shard", "auto"))
        return _metrics.diversity(x, h, **options)
    return diversity_from_log_p(_self_log_p(x, h, options))


def delta_entropy(
    y: ArrayLike, x: ArrayLike, h: Bandwidth = DEFAULT_BANDWIDTH, **options
) -> torch.Tensor:
    """:func:`quests_torch.metrics.delta_entropy` (``dH(y_i | X) = -log p(y_i | X)``), all
    ranks together.

    Args:
        y: test descriptors ``[n_y, d]``, the same on every rank.
        x: reference descriptors ``[n_x, d]``, the same on every rank.
        h: bandwidth (1/Å) or a 1-D sequence of bandwidths.
        **options: ``shard`` plus the options of :func:`quests_torch.kde.kernel_pass`.

    Returns:
        ``[n_y]`` (``[n_y, n_h]``) on every rank.
    """
    if not is_distributed():
        _check_shard(options.pop("shard", "auto"))
        return _metrics.delta_entropy(y, x, h, **options)
    return -_sharded_log_p(y, x, h, names=("y", "x"), **options)


def novelty(
    y: ArrayLike,
    x: ArrayLike,
    h: Bandwidth = DEFAULT_BANDWIDTH,
    threshold: float = 0.0,
    **options,
) -> torch.Tensor:
    """:func:`quests_torch.metrics.novelty` (fraction with ``dH > threshold``), all ranks."""
    threshold = check_threshold(threshold)
    with torch.no_grad():
        return fraction_above(delta_entropy(y, x, h, **options), threshold)


def overlap(
    y: ArrayLike,
    x: ArrayLike,
    h: Bandwidth = DEFAULT_BANDWIDTH,
    threshold: float = 0.0,
    **options,
) -> torch.Tensor:
    """:func:`quests_torch.metrics.overlap` (``1 - novelty``), all ranks together."""
    return 1.0 - novelty(y, x, h, threshold, **options)


def dataset_summary(
    x: ArrayLike,
    h: float = DEFAULT_BANDWIDTH,
    other: ArrayLike | None = None,
    threshold: float = 0.0,
    **options,
) -> DatasetSummary:
    """:func:`quests_torch.metrics.dataset_summary` (size, ``H``, ``log n``, ``D``, overlaps),
    all ranks together; ``H`` and ``D`` share one sharded kernel pass.

    With ``rows`` (sampled estimates, ``m n`` pairs) every rank computes the same estimates
    from the same sampled rows (an int seed, or with ``generator=None`` a seed drawn on rank 0
    and broadcast); the exact path is sharded."""
    if not is_distributed():
        _check_shard(options.pop("shard", "auto"))
        return _metrics.dataset_summary(x, h, other, threshold, **options)
    rows, generator = options.pop("rows", None), options.pop("generator", None)
    if resolve_rows(rows, _Source(x, "x").n) < _Source(x, "x").n:
        options.pop("shard", None)
        return _metrics.dataset_summary(
            x, h, other, threshold, rows=rows, generator=_same_seed(generator), **options
        )
    threshold = check_threshold(threshold)
    _, vector = check_bandwidths(h)
    if vector:
        raise ValueError("`h` must be a single bandwidth for dataset_summary")
    log_p = _self_log_p(x, h, options)
    n = int(log_p.shape[0])
    ov = ov_other = None
    if other is not None:
        ov = overlap(x, other, h, threshold, **options)
        ov_other = overlap(other, x, h, threshold, **options)
    return DatasetSummary(
        n, entropy_from_log_p(log_p), math.log(n), diversity_from_log_p(log_p), ov, ov_other
    )


def _curve_sizes(n: int, sizes) -> torch.Tensor:
    if sizes is None:
        grid = np.unique(np.round(np.geomspace(min(10, n), n, 16)).astype(np.int64))
        return torch.from_numpy(grid)
    sizes_t = torch.as_tensor(sizes).flatten().to(torch.int64).sort().values
    if sizes_t.numel() == 0:
        raise ValueError("`sizes` is empty")
    if int(sizes_t.min()) < 1 or int(sizes_t.max()) > n:
        raise ValueError(f"`sizes` must lie in [1, {n}] (the rows of `x`), got {sizes_t.tolist()}")
    return sizes_t


def entropy_learning_curve(
    x: ArrayLike,
    h: Bandwidth = DEFAULT_BANDWIDTH,
    sizes: Sequence[int] | torch.Tensor | None = None,
    repeats: int = 3,
    generator: torch.Generator | int | None = None,
    **options,
) -> LearningCurve:
    """:func:`quests_torch.metrics.entropy_learning_curve` with the subsets spread over ranks.

    Every rank draws the same random subsets in the same order as one process (an ``int``
    seed, or with ``None`` a seed drawn on rank 0 and broadcast; a ``torch.Generator`` must be
    in the same state on every rank). Subsets with at most ``2^24`` pairs are dealt out whole
    to the ranks (largest first, to the least loaded rank) and computed by
    :func:`quests_torch.metrics.entropy`, so their values are bit-identical to one process;
    larger subsets (and the whole set) are computed by all ranks together with
    :func:`entropy`. Values are shared with one all_reduce SUM (each slot is written by one
    rank, the others add 0.0).

    Returns:
        :class:`quests_torch.metrics.LearningCurve`, the same on every rank.
    """
    if not is_distributed():
        _check_shard(options.pop("shard", "auto"))
        return _metrics.entropy_learning_curve(x, h, sizes, repeats, generator, **options)
    rows = options.pop("rows", None)
    if rows is not None:  # sampled estimates: every rank computes the same
        options.pop("shard", None)
        return _metrics.entropy_learning_curve(
            x, h, sizes, repeats, _same_seed(generator), rows=rows, **options
        )
    src = _Source(x, "x")
    n = src.n
    sizes_t = _curve_sizes(n, sizes)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be a positive int, got {repeats!r}")
    if generator is None:
        generator = int(_broadcast_object(int(torch.randint(0, 2**62, (1,)).item())))
    gen = _generator(generator)
    hs, vector = check_bandwidths(h)
    if isinstance(x, torch.Tensor):
        dev = x.device
    else:
        dev = torch.device(options.get("device") or comm_device())
    opts = {key: v for key, v in options.items() if key != "shard"}
    if not isinstance(x, torch.Tensor):
        opts["device"] = dev
    tasks = []  # (slot, size, pick or None for the whole set, shared by all ranks?)
    for si, s in enumerate(sizes_t.tolist()):
        for rep in range(repeats):
            if s == n:
                tasks.append(((si, rep), s, None, True))
            else:
                pick = torch.randperm(n, generator=gen)[:s].sort().values
                tasks.append(((si, rep), s, pick, s * s / 2 > _COLLECTIVE_PAIRS))
    load = [0.0] * world_size()
    mine = []
    for t in sorted((t for t in tasks if not t[3]), key=lambda t: (-t[1], t[0])):
        q = min(range(world_size()), key=lambda v: (load[v], v))
        load[q] += float(t[1]) ** 2
        if q == rank():
            mine.append(t)

    def subset(pick: torch.Tensor) -> ArrayLike:
        if isinstance(x, torch.Tensor):
            return x.index_select(0, pick.to(x.device))
        return np.ascontiguousarray(x[pick.numpy()])

    shape = (len(sizes_t), repeats) + ((len(hs),) if vector else ())
    values = torch.zeros(shape, dtype=src.dtype, device=dev)
    for slot, _size, pick, _shared in mine:
        values[slot] = _metrics.entropy(subset(pick), h, **opts).to(dev)
    values = _all_reduce(values, dist.ReduceOp.SUM)
    full = None
    for slot, _size, pick, shared in tasks:  # the same order on every rank
        if not shared:
            continue
        if pick is None:
            if full is None:
                full = entropy(x, h, **options)
            values[slot] = full.to(dev)
        else:
            values[slot] = entropy(subset(pick), h, **options).to(dev)
    mean = values.mean(1)
    std = values.std(1, correction=0)
    return LearningCurve(sizes_t, mean, std, values)


# --------------------------------------------------------------------------------------------
# descriptors
# --------------------------------------------------------------------------------------------


def _structure_blocks(atoms_per_structure: Sequence[int], world: int) -> list[tuple[int, int]]:
    """Contiguous structure blocks per rank balanced by atom count (cumulative split)."""
    cum = np.concatenate([[0], np.cumsum(np.asarray(atoms_per_structure, dtype=np.int64))])
    total = int(cum[-1])
    cuts = [0]
    for r in range(1, world):
        cuts.append(max(cuts[-1], int(np.searchsorted(cum, r * total / world, side="left"))))
    cuts.append(len(atoms_per_structure))
    return [(cuts[r], max(cuts[r], cuts[r + 1])) for r in range(world)]


def get_descriptors(
    structures: object,
    k: int = DEFAULT_K,
    cutoff: float = DEFAULT_CUTOFF,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = "cpu",
    multicomponent: bool = False,
    species: Sequence[str | int] | None = None,
    budget: int | str | None = None,
    gather: bool = True,
) -> torch.Tensor:
    """:func:`quests_torch.descriptors.get_descriptors` with the structures split over ranks.

    Rank ``r`` computes a contiguous block of structures (blocks balanced by atom count, see
    :func:`shard_range` for the idea); the rows are all-gathered in input order. The species of
    the multicomponent blocks are fixed from all structures first, so every rank builds the
    same columns. One structure is never split: a single huge cell is computed by one rank.

    Args:
        structures: ``ase.Atoms``, a list of them, or an :class:`AtomsBatch` (the same on
            every rank).
        k, cutoff, dtype, device, multicomponent, species, budget: as in
            :func:`quests_torch.descriptors.get_descriptors`.
        gather: ``False`` returns only this rank's rows (its structures' atoms, in order).

    Returns:
        ``[n_atoms, width]`` on ``device`` (every rank), or this rank's block.
    """
    if not is_distributed():
        return _get_descriptors(
            structures,
            k,
            cutoff,
            dtype=dtype,
            device=device,
            multicomponent=multicomponent,
            species=species,
            budget=budget,
        )
    if isinstance(structures, AtomsBatch):
        counts = structures.n_atoms_per_system.tolist()
        numbers = torch.unique(structures.numbers).tolist()
    else:
        items = structures if isinstance(structures, list | tuple) else [structures]
        counts = [len(a) for a in items]
        numbers = sorted({int(z) for a in items for z in np.unique(a.numbers)})
    spec = species
    if multicomponent and species is None:
        spec = sorted(numbers)  # every element of the whole data, not of this rank's block
    s0, s1 = _structure_blocks(counts, world_size())[rank()]
    dev = resolve_device(device)
    if s1 > s0:
        if isinstance(structures, AtomsBatch):
            block = structures.select(torch.arange(s0, s1))
        else:
            block = list(items[s0:s1])
        local = _get_descriptors(
            block,
            k,
            cutoff,
            dtype=dtype,
            device=dev,
            multicomponent=multicomponent,
            species=spec,
            budget=budget,
        )
    else:
        local = torch.empty(0, 0, dtype=dtype, device=dev)
    if not gather:
        return local
    width = int(_all_reduce(torch.tensor([local.shape[1]], dtype=torch.int64), dist.ReduceOp.MAX))
    if local.shape[1] != width:
        local = torch.empty(0, width, dtype=dtype, device=dev)
    cum = np.concatenate([[0], np.cumsum(counts)])
    blocks = _structure_blocks(counts, world_size())
    return _all_gather_rows(local, [int(cum[b] - cum[a]) for a, b in blocks])


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
    if not is_distributed():
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
    r = rank()

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
    decision = _broadcast_object(decision)
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
    screened, resumed = (int(v) for v in _all_reduce(stats, dist.ReduceOp.SUM).tolist())
    names = list(ScreenTimings.__dataclass_fields__)
    spent = torch.tensor([getattr(timings, f) for f in names], dtype=torch.float64)
    spent = _all_reduce(spent, dist.ReduceOp.MAX).tolist()
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
    w, r = world_size(), rank()
    if decision[0] == "done":
        return 0, decision[1] if r == 0 else 0, ScreenTimings(), batch_atoms or 0
    traj_key, ref_key = decision[2]
    timings = ScreenTimings()
    screened = resumed = 0
    local_batch = batch_atoms or 0
    frames = range(*decision[1])
    f0, f1 = shard_range(len(frames))
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
        _raise_if_any_failed(error, "screening")
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
                a, b = shard_range(len(frames), q, w)
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
    outcome = _broadcast_object(outcome)
    if outcome is not None:
        raise RuntimeError(f"merging the screening parts failed on rank 0: {outcome}")
    return screened, resumed, timings, local_batch
