"""Tiled Gaussian kernel sums in log space: the only place that knows about tiles and precision.

The core primitive is the log kernel density of query descriptors ``x`` given reference
descriptors ``y``::

    log p(x_i | Y) = log sum_j w_j exp(-|x_i - y_j|^2 / (2 h^2))          (w_j = 1 by default)

computed tile by tile so that no ``n x m`` matrix ever exists. Each tile is one matrix
multiplication of augmented rows (see below) followed by ``clamp``/``exp``/``sum`` on a
reused, cache-sized buffer; the row sums are accumulated in float64.

Numerics
--------
* Distances: ``-|x - y|^2 / 2 = x.y - |x|^2/2 - |y|^2/2`` is produced directly by one GEMM of
  ``[c x, c, -c|x|^2/2]`` with ``[y, -|y|^2/2, 1]`` (``c = 1/h^2``), after *centring* both sets
  on the mean of the reference set. Centring keeps the cancellation error of the expansion at
  the scale of the data spread instead of its norm. ``distance="direct"`` uses explicit
  differences instead (exact, ~6x slower).
* Log-sum-exp: every exponent is ``<= 0`` (up to rounding). On CPUs it is clamped from below
  at ``-700`` (float64) or ``-80`` (float32) so that ``exp`` never enters its slow denormal
  path; the clamp changes a sum by at most ``m * e^floor``. CUDA's ``exp`` has no slow path,
  so there the clamp is skipped (one pass fewer per tile); both differ by at most that bound.
  Rows whose sum is too small for that bound to be negligible
  (``log p < floor + log m + log(1/eps)``, i.e. queries with dH above ~650 nats in float64 or
  ~50 nats in float32) are recomputed with the fully shifted online log-sum-exp (running
  row maximum, rescaled running sum), so ``log p`` stays finite and accurate for arbitrarily
  distant outliers. The check costs one host sync per call.
* Tile epilogue: with ``QUESTS_TORCH_COMPILE=1``, ``exp`` and the row/column sums of a tile
  run as one ``torch.compile``-d function (:func:`_exp_sums`, one pass over the tile instead
  of 3-5), on every device. Off by default until a GPU run measures it (compiling costs tens
  of seconds on the first call). If compilation fails, a warning is issued and the eager
  path is used (same results to ~1e-15).
* When ``y`` is ``x`` (a dataset against itself, entropy/diversity) only the upper triangle of
  tiles is evaluated and each tile contributes to both its rows and its columns.
* float32 mode (``dtype=torch.float32`` or float32 inputs): tiles in float32, centring and all
  accumulation in float64. Relative error of ``p(x)`` against float64, measured on the thermal
  Cu descriptors of ``tests/data`` (EMT, 300 K solid + 1500 K liquid, 1,536 environments):
  median 8e-7, max 4.6e-5 (solid alone: max 2.7e-6); without centring max 1.5e-3; with
  ``distance="direct"`` max 1.6e-6. The test bound is 1e-4. The error scales like
  ``eps_32 |x - mean|^2 / h^2``: widely spread data in float32 needs ``distance="direct"``.
* float32-only mode (MPS, CUDA cards without full-rate float64, ``QUESTS_TORCH_FLOAT64=0``;
  :func:`quests_torch._precision.float64_enabled`): no float64 tensor is created on the
  device. Centring and the squared norms are float32; each tile's row/column sums (a
  pairwise/tree reduction in float32) are added to a float32 running sum with a Neumaier
  compensation term (also in the shifted sweep, rescaled with the sum), so the error does not
  grow with the number of tiles; results are float32 whatever the input dtype. Measured on
  the same Cu data against float64: ``H`` 4.1e-8 relative, ``log p`` max 4.6e-5 absolute
  (median 1.0e-6), dH of the queries against the solid max 1.5e-6 nats: the tile GEMM, not
  the accumulation, dominates. Tested in ``tests/test_float32_mode.py``.
* Matrix products always run in full precision: :func:`full_precision` disables TF32/bf16
  reduced-precision matmul (``torch.backends.*.fp32_precision``, ``allow_tf32``) for the
  duration of a call and restores the caller's settings afterwards (the flags are process-wide:
  do not toggle them from another thread during a call).

Memory and devices
------------------
Inputs are torch tensors (any device; compute happens where they live, mixing devices is an
error) or numpy arrays, including ``np.memmap``, which are streamed to the compute device tile
by tile. The prepared (centred, augmented) reference set is kept on the device when it fits in
half of :func:`quests_torch._memory.memory_budget`, otherwise it is rebuilt per tile from the
source. Tiles: on CPU cache-sized (default 1024 x 1024, the fastest measured on a 2-core Zen 4
with 1 MB L2 per core), on CUDA as large as the budget allows up to 8192 x 8192 (16384-wide
tiles measured no faster on an H200); a smaller budget shrinks them. Results do not depend on
the tile size beyond rounding (tested at 1e-12 relative), so a sweep that raises
``torch.OutOfMemoryError`` is redone with tiles halved in each direction (after
``torch.cuda.empty_cache()``, with a ``RuntimeWarning``) down to 64 per side, below which a
``torch.OutOfMemoryError`` with advice is raised.

Nearest references (``n_nearest``, :func:`nearest_neighbors`): each tile keeps the blocks of
128 columns with the ``n`` largest maxima and picks the top ``n`` among them (exact, see
:func:`_tile_top`); equal exponents go to the lower reference index.

Autograd
--------
:func:`log_kernel_sum` is differentiable with respect to ``x``, ``y`` and ``log_weights``
through a custom :class:`torch.autograd.Function` whose backward recomputes the tiles::

    d log p_i / d x_i = sum_j P_ij (y_j - x_i) / h^2,    P_ij = w_j K_ij / p_i  (softmax weights)

First derivatives only (``once_differentiable``); the bandwidth is a constant.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ._memory import memory_budget
from ._precision import float64_enabled, full_precision
from .checks import DEFAULT_BANDWIDTH, Progress, check_bandwidths
from .structures import canonical_device

__all__ = [
    "DEFAULT_BANDWIDTH",
    "KernelSums",
    "PreparedReferences",
    "RunningLogKernelSum",
    "first_match_within",
    "full_precision",
    "grouped_log_kernel_sum",
    "kernel_pass",
    "kernel_sum",
    "log_kernel_sum",
    "nearest_neighbors",
]


ArrayLike = torch.Tensor | np.ndarray
Bandwidth = float | Sequence[float] | torch.Tensor | np.ndarray

_CPU_TILE = (1024, 1024)
_CUDA_TILE_CAP = 8192  # 512 MiB per float64 buffer; larger tiles measured no faster
_FLOOR = {torch.float64: -700.0, torch.float32: -80.0}
_CPU_RUNNING_TILE = 1 << 17  # elements of one RunningLogKernelSum tile on a CPU (1 MB f64)
_OOM_MIN_SIDE = 64  # out-of-memory retries halve the tiles down to this side, then give up
_TOPK_BLOCK = 128  # columns per block of the block-maximum top-k pre-selection
_TOPK_ROUNDS = 8  # up to this k, k rounds of max beat a sort in the top-k selections
_COMPILE_ENV = "QUESTS_TORCH_COMPILE"


# --------------------------------------------------------------------------------------------
# validation and data sources
# --------------------------------------------------------------------------------------------


def _shape(a: ArrayLike) -> tuple[int, ...]:
    return tuple(a.shape)


class _Source:
    """A descriptor set ``[n, d]``: a torch tensor (any device) or a numpy array / memmap."""

    def __init__(self, data: ArrayLike, name: str):
        self.name = name
        if isinstance(data, torch.Tensor):
            self.tensor: torch.Tensor | None = data
            self.array: np.ndarray | None = None
            dtype = data.dtype
            if not dtype.is_floating_point:
                raise TypeError(f"`{name}` must hold floating-point descriptors, got {dtype}")
        elif isinstance(data, np.ndarray):
            self.tensor = None
            self.array = data
            if data.dtype not in (np.float64, np.float32):
                raise TypeError(
                    f"`{name}` must hold float32 or float64 descriptors, got {data.dtype}"
                )
        else:
            raise TypeError(
                f"`{name}` must be a torch.Tensor or a numpy array [n, d], "
                f"got {type(data).__name__}"
            )
        if data.ndim != 2:
            raise ValueError(f"`{name}` must be 2-D [n, d], got shape {_shape(data)}")
        if data.shape[0] == 0:
            raise ValueError(f"`{name}` is empty: shape {_shape(data)}, need at least one row")
        if data.shape[1] == 0:
            raise ValueError(f"`{name}` has no descriptor columns: shape {_shape(data)}")
        self.n, self.d = int(data.shape[0]), int(data.shape[1])

    @property
    def device(self) -> torch.device | None:
        return None if self.tensor is None else self.tensor.device

    @property
    def dtype(self) -> torch.dtype:
        if self.tensor is not None:
            return self.tensor.dtype
        return torch.float64 if self.array.dtype == np.float64 else torch.float32

    def rows(self, i0: int, i1: int, device: torch.device, dtype=torch.float64) -> torch.Tensor:
        """Rows ``i0:i1`` on ``device`` as ``dtype`` (detached)."""
        if self.tensor is not None:
            return self.tensor.detach()[i0:i1].to(device=device, dtype=dtype)
        block = self.array[i0:i1]
        if not (block.flags.c_contiguous and block.flags.writeable):
            block = np.array(block)  # read-only memmaps: torch wants writable memory
        chunk = torch.from_numpy(block)
        if device.type == "cuda":
            chunk = chunk.pin_memory()
            return chunk.to(device=device, dtype=dtype, non_blocking=True)
        return chunk.to(device=device, dtype=dtype)

    def take(self, index: torch.Tensor) -> _Source:
        """A new source holding the rows ``index`` (a 1-D long tensor)."""
        if self.tensor is not None:
            return _Source(
                self.tensor.detach().index_select(0, index.to(self.tensor.device)), self.name
            )
        return _Source(self.array[index.cpu().numpy()], self.name)

    def chunks(self, device: torch.device, size: int) -> Iterator[torch.Tensor]:
        for i0 in range(0, self.n, size):
            yield self.rows(i0, min(i0 + size, self.n), device)

    def check_finite_and_mean(
        self, device: torch.device, chunk: int, acc: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """Raise on NaN/inf; return the column mean ``[d]`` (in ``acc``) on ``device``."""
        return self.check_finite_mean_max(device, chunk, acc)[0]

    def check_finite_mean_max(
        self, device: torch.device, chunk: int, acc: torch.dtype = torch.float64
    ) -> tuple[torch.Tensor, float]:
        """Raise on NaN/inf; return the column mean ``[d]`` (in ``acc``, float64 unless
        float32-only) on ``device`` and the largest absolute value (one host sync for both).
        The mean only sets the centring point: its rounding does not reach the kernel sums."""
        total = torch.zeros(self.d, dtype=acc, device=device)
        amax = torch.zeros((), dtype=acc, device=device)
        for i0 in range(0, self.n, chunk):
            block = self.rows(i0, min(i0 + chunk, self.n), device, acc)
            amax = torch.maximum(amax, block.abs().max())  # NaN propagates
            total += block.sum(0)
        largest = float(amax)
        if not math.isfinite(largest):
            raise ValueError(f"`{self.name}` contains NaN or infinite descriptor values")
        return total / self.n, largest


def _compute_device(sources: Sequence[_Source], device) -> torch.device:
    devices = {s.device for s in sources if s.device is not None}
    if len(devices) > 1:
        names = ", ".join(f"`{s.name}` on {s.device}" for s in sources if s.device is not None)
        raise ValueError(f"inputs must be on one device, got {names}")
    if devices:
        (dev,) = devices
        if device is not None and canonical_device(device) != dev:
            raise ValueError(f"`device` is {torch.device(device)} but the inputs live on {dev}")
        return dev
    return canonical_device("cpu" if device is None else device)


def _progress_callback(progress: Progress, total: int, desc: str, unit: str = "row"):
    if progress is None or progress is False:
        return None, None
    if progress is True:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            return None, None
        bar = tqdm(total=total, desc=desc, unit=unit)
        state = {"done": 0}

        def update(done: int, _total: int) -> None:
            bar.update(done - state["done"])
            state["done"] = done

        return update, bar
    if not callable(progress):
        raise TypeError("`progress` must be a bool or a callable(done, total)")
    return progress, None


# --------------------------------------------------------------------------------------------
# the tiled problem
# --------------------------------------------------------------------------------------------


class KernelSums(NamedTuple):
    """Result of :func:`kernel_pass`.

    Attributes:
        log_p: ``[n]`` (scalar ``h``) or ``[n, n_h]`` (vector ``h``) log kernel sums
            ``log sum_j w_j exp(-|x_i - y_j|^2 / (2 h^2))``.
        nearest_sq_dist: ``[n, k]`` squared distances to the ``k`` nearest references in
            ascending order (from the same distance tiles), or ``None``.
        nearest_index: ``[n, k]`` indices into ``y`` of those references, or ``None``.
    """

    log_p: torch.Tensor
    nearest_sq_dist: torch.Tensor | None
    nearest_index: torch.Tensor | None


class _Groups(NamedTuple):
    """Pair mask for per-group sums: only pairs with equal labels count.

    Rows and columns are sorted by label, so each row's partners form one contiguous column
    range ``[lo[i], hi[i])``; a row tile visits only the union of its rows' ranges.
    """

    rows: torch.Tensor  # [n] labels of the rows, on the device
    cols: torch.Tensor  # [m] labels of the columns, on the device
    lo: np.ndarray  # [n] first column of each row's group
    hi: np.ndarray  # [n] one past the last column of each row's group


def _auto_tiles(device_type: str, budget: int, itemsize: int) -> tuple[int, int]:
    """Default tile ``(rows, cols)`` for a memory budget in bytes.

    CPU: cache-sized :data:`_CPU_TILE`. CUDA: square, ``budget / 8`` bytes per tile (up to 4
    tile buffers live in a multi-bandwidth backward), capped at :data:`_CUDA_TILE_CAP` per
    side. Either way a small budget halves the tiles until 4 buffers fit in it.
    """
    if device_type == "cuda":
        side = int(math.sqrt(budget / (8 * itemsize)))
        tm = tn = max(64, min(_CUDA_TILE_CAP, side))
    else:
        tm, tn = _CPU_TILE
    while tm * tn * itemsize * 4 > budget and (tm > 1 or tn > 1):
        if tn >= tm:
            tn = max(1, tn // 2)
        else:
            tm = max(1, tm // 2)
    return tm, tn


class _Problem:
    """Everything a tiled sweep needs: sources, prepared blocks, tile sizes and scales."""

    def __init__(
        self,
        xs: _Source,
        ys: _Source,
        hs: list[float],
        *,
        log_weights: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        centre: bool = True,
        distance: str = "matmul",
        tile_size=None,
        budget=None,
        device=None,
        same: bool = False,
        n_nearest: int = 0,
        groups: _Groups | None = None,
        want_sums: bool = True,
    ):
        if xs.d != ys.d:
            raise ValueError(
                f"`{xs.name}` and `{ys.name}` must have the same descriptor width, "
                f"got {xs.d} and {ys.d}"
            )
        if distance not in ("matmul", "direct"):
            raise ValueError(f"`distance` must be 'matmul' or 'direct', got {distance!r}")
        self.device = _compute_device([xs, ys], device)
        self.f64 = float64_enabled(self.device)  # False: float32-only (no float64 on device)
        self.xs, self.ys = xs, ys
        self.self_pairs = xs is ys  # pair (i, i) is a point with itself: distance exactly 0
        self.n, self.m, self.d = xs.n, ys.n, xs.d
        self.out_dtype = torch.promote_types(xs.dtype, ys.dtype)
        if dtype is None and self.out_dtype not in (torch.float32, torch.float64):
            name = xs.name if xs.dtype not in (torch.float32, torch.float64) else ys.name
            raise TypeError(
                f"`{name}` must hold float32 or float64 descriptors, got {self.out_dtype} "
                "(or pass `dtype`)"
            )
        self.dtype = self.out_dtype if dtype is None else dtype
        if self.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"`dtype` must be torch.float32 or torch.float64, got {self.dtype}")
        if not self.f64:  # float32 tiles, compensated float32 sums, float32 results
            self.dtype = self.out_dtype = torch.float32
        self.acc = torch.float64 if self.f64 else torch.float32
        self.floor = _FLOOR[self.dtype]
        # the clamp at the floor only avoids the slow denormal path of CPU exp(); CUDA has none
        self.clamp = self.device.type != "cuda"
        self.fused = _Epilogue.wanted(self.device)
        self.eps = torch.finfo(self.dtype).eps
        self.hs = hs
        self.multi = len(hs) > 1
        # single h: the GEMM yields -d^2/(2h^2) directly; several h: -d^2/2, scaled per h
        self.c0 = 1.0 if self.multi else 1.0 / hs[0] ** 2
        self.scales = [1.0 / h**2 for h in hs] if self.multi else [1.0]
        self.scale_tensors = (
            [torch.tensor(s, dtype=self.dtype, device=self.device) for s in self.scales]
            if self.multi
            else [None]
        )
        self.direct = distance == "direct"
        self.n_nearest = n_nearest
        self.groups = groups
        self.want_sums = want_sums
        self.same = same and log_weights is None and n_nearest == 0 and groups is None
        self.budget = memory_budget(self.device, budget)
        self._set_tiles(tile_size)

        chunk = max(1, self.budget // (64 * self.d))
        mu, y_max = ys.check_finite_mean_max(self.device, chunk, self.acc)
        x_max = xs.check_finite_mean_max(self.device, chunk, self.acc)[1] if xs is not ys else y_max
        self._check_magnitude(xs.name, x_max)
        self._check_magnitude(ys.name, y_max)
        self.mu = mu if centre else torch.zeros_like(mu)

        # weights: lw' = lw - max(lw) <= 0 enters the exponent, max(lw) is added at the end
        self.lw: torch.Tensor | None = None
        self.lw_max = torch.zeros((), dtype=self.acc, device=self.device)
        if log_weights is not None:
            lw = log_weights.detach().to(device=self.device, dtype=self.acc)
            if lw.shape != (self.m,):
                raise ValueError(
                    f"`log_weights` must have shape ({self.m},) like the rows of `{ys.name}`, "
                    f"got {tuple(lw.shape)}"
                )
            if bool(torch.isnan(lw).any()) or bool(torch.isposinf(lw).any()):
                raise ValueError("`log_weights` must not contain NaN or +inf")
            self.lw_max = lw.max()
            if not bool(torch.isfinite(self.lw_max)):
                raise ValueError("`log_weights` are all -inf (every weight is zero)")
            lowest = torch.finfo(self.dtype).min / 4  # finite stand-in for log(0)
            self.lw = (lw - self.lw_max).clamp_(min=lowest).to(self.dtype)
        self.fold_lw = self.lw is not None and not self.multi and n_nearest == 0

        self.width = self.d + 2 + (1 if self.fold_lw else 0)
        elt = self.dtype.itemsize
        self.cols_resident: torch.Tensor | None = None
        if self.m * self.width * elt <= self.budget // 2:
            self.cols_resident = self._build_cols(0, self.m)

    def _check_magnitude(self, name: str, largest: float) -> None:
        """Refuse values whose squared distances (over ``2 h^2`` for a single ``h``) overflow
        the compute dtype: they would come back as inf - inf = NaN, not as an answer."""
        # centred values are at most 2 max|v|; the GEMM terms add up to 16 max|v|^2 d
        bound = math.sqrt(torch.finfo(self.dtype).max / (64 * self.d * max(self.c0, 1.0)))
        if largest > bound:
            raise ValueError(
                f"`{name}` has descriptor values up to {largest:.3g}: their squared distances "
                f"overflow {self.dtype} at h = {min(self.hs):.3g} (at most {bound:.3g} here); "
                "QUESTS descriptors are of order 1"
            )

    # tiles ----------------------------------------------------------------------------------
    def _set_tiles(self, tile_size) -> None:
        if tile_size is None:
            tm, tn = _auto_tiles(self.device.type, self.budget, self.dtype.itemsize)
        elif isinstance(tile_size, int) and not isinstance(tile_size, bool):
            tm = tn = tile_size
        elif isinstance(tile_size, Sequence) and len(tile_size) == 2:
            tm, tn = (int(v) for v in tile_size)
        else:
            raise TypeError(f"`tile_size` must be an int or a pair (rows, cols), got {tile_size!r}")
        if tm < 1 or tn < 1:
            raise ValueError(f"`tile_size` must be positive, got {tile_size!r}")
        if self.same:
            tn = tm  # the triangular sweep needs square tiles
        self.tm, self.tn = min(tm, self.n), min(tn, self.m)

    def shrink(self) -> str | None:
        """Halve the tiles (and the budget) after an out-of-memory error; ``None`` at the floor."""
        if max(self.tm, self.tn) <= _OOM_MIN_SIDE:
            return None
        self.budget = max(1, self.budget // 4)
        self.tm, self.tn = max(1, self.tm // 2), max(1, self.tn // 2)
        if self.same:
            self.tn = self.tm
        if self.cols_resident is not None and self.cols_resident.nbytes > self.budget // 2:
            self.cols_resident = None  # rebuilt per tile from the source from now on
        return f"{self.tm} x {self.tn} tiles"

    def subset_rows(self, index: torch.Tensor) -> _Problem:
        """The same problem restricted to the query rows ``index`` (no top-k, no symmetry)."""
        sub = copy.copy(self)
        sub.xs = self.xs.take(index)
        sub.n = sub.xs.n
        sub.same = False
        sub.self_pairs = False
        sub.n_nearest = 0
        sub.tm = min(self.tm, sub.n)
        if self.groups is not None:
            host = index.cpu().numpy()
            sub.groups = _Groups(
                self.groups.rows.index_select(0, index),
                self.groups.cols,
                self.groups.lo[host],
                self.groups.hi[host],
            )
        return sub

    # prepared blocks ------------------------------------------------------------------------
    def _centred(self, src: _Source, i0: int, i1: int) -> torch.Tensor:
        return (src.rows(i0, i1, self.device, self.acc) - self.mu).to(self.dtype)

    def result_dtype(self, a: torch.dtype, b: torch.dtype) -> torch.dtype:
        """The promoted dtype of the inputs; float32 in float32-only mode."""
        return torch.promote_types(a, b) if self.f64 else torch.float32

    def _build_cols(self, j0: int, j1: int) -> torch.Tensor:
        """Column block ``[y_c, -|y_c|^2/2, 1, (lw')]`` in the compute dtype."""
        y = self._centred(self.ys, j0, j1)
        q = y.to(self.acc).square().sum(1).mul(-0.5).to(self.dtype)
        parts = [y, q[:, None], torch.ones_like(q)[:, None]]
        if self.fold_lw:
            parts.append(self.lw[j0:j1, None])
        return torch.cat(parts, 1)

    def cols(self, j0: int, j1: int) -> torch.Tensor:
        if self.cols_resident is not None:
            return self.cols_resident[j0:j1]
        return self._build_cols(j0, j1)

    def rows(self, i0: int, i1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row block ``[c x_c, c, -c|x_c|^2/2, (1)]`` and the centred rows ``x_c``."""
        if self.same and self.cols_resident is not None:
            x = self.cols_resident[i0:i1, : self.d]
            q = self.cols_resident[i0:i1, self.d]
        else:
            x = self._centred(self.xs, i0, i1)
            q = x.to(self.acc).square().sum(1).mul(-0.5).to(self.dtype)
        c = self.c0
        parts = [x * c, torch.full_like(q, c)[:, None], (q * c)[:, None]]
        if self.fold_lw:
            parts.append(torch.ones_like(q)[:, None])
        return torch.cat(parts, 1), x

    def exponent(self, xr, xraw, yc, out: torch.Tensor) -> torch.Tensor:
        """``out[i, j] = -c0 |x_i - y_j|^2 / 2`` (``+ lw'_j`` when folded) for one tile."""
        if self.direct:
            d = torch.cdist(
                xraw[None], yc[None, :, : self.d], compute_mode="donot_use_mm_for_euclid_dist"
            )[0]
            torch.mul(d.square_(), -0.5 * self.c0, out=out)
            if self.fold_lw:
                out.add_(yc[:, -1])
            return out
        return torch.mm(xr, yc.T, out=out)

    def exponent_tile(self, i0, i1, j0, j1, xr, xraw, yc, out: torch.Tensor) -> torch.Tensor:
        """:meth:`exponent`, with the self pairs set to exactly 0 when ``x is y``.

        The GEMM expansion leaves ~eps c |x_c|^2 of rounding in ``a_ii``; the self term is
        the largest of its row, so pinning it keeps e.g. ``H = log n`` exact for distant points.
        """
        self.exponent(xr, xraw, yc, out)
        if self.self_pairs and i0 < j1 and j0 < i1:
            diag = out.diagonal(offset=i0 - j0)
            if self.fold_lw:
                diag.copy_(self.lw[max(i0, j0) : min(i1, j1)])
            else:
                diag.fill_(0.0)
        return out

    def col_range(self, i0: int, i1: int, triangular: bool = False) -> tuple[int, int]:
        """Columns a row tile visits: all, its groups' range, or ``j >= i0`` (triangular)."""
        if self.groups is None:
            return (i0 if triangular else 0), self.m
        return int(self.groups.lo[i0]), int(self.groups.hi[i1 - 1])

    def group_mask(self, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor | None:
        """``True`` where a pair belongs to different groups (to be zeroed)."""
        if self.groups is None:
            return None
        return self.groups.rows[i0:i1, None] != self.groups.cols[None, j0:j1]

    def buffers(self, count: int) -> list[torch.Tensor]:
        """Flat tile buffers, reused for every tile (views of the right shape are cut)."""
        size = self.tm * self.tn
        return [torch.empty(size, dtype=self.dtype, device=self.device) for _ in range(count)]

    def terms(self, buf: torch.Tensor, tmp: torch.Tensor | None, j0: int, j1: int, k: int):
        """Exponents ``-|x-y|^2/(2 h_k^2) + lw'`` of one tile (in ``buf`` itself for one h)."""
        if not self.multi:
            if self.lw is not None and not self.fold_lw:
                buf.add_(self.lw[j0:j1])
            return buf
        s = self.scales[k]
        if self.lw is not None:
            return torch.add(self.lw[None, j0:j1], buf, alpha=s, out=tmp)
        return torch.mul(buf, s, out=tmp)


def _view(storage: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor | None:
    return None if storage is None else storage[: rows * cols].view(rows, cols)


# --------------------------------------------------------------------------------------------
# tile epilogue (exp + sums), block top-k, out-of-memory retries
# --------------------------------------------------------------------------------------------


def _exp_sums(
    a: torch.Tensor,
    scale: torch.Tensor | None,
    lw: torch.Tensor | None,
    mask: torch.Tensor | None,
    both: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row (and column) sums of ``exp(a * scale + lw)`` over one tile, masked pairs dropped.

    The epilogue of a kernel-sum tile written as one function so that ``torch.compile``
    fuses it into a single pass over the tile (the eager path makes 3-5 passes). No clamp:
    it is used where ``exp`` has no slow denormal path (CUDA) or where the caller accepts it.
    """
    t = a if scale is None else a * scale
    if lw is not None:
        t = t + lw
    e = t.exp()
    if mask is not None:
        e = e.masked_fill(mask, 0.0)
    return e.sum(1), (e.sum(0) if both else None)


class _Epilogue:
    """The compiled :func:`_exp_sums`, built on first use; eager forever after a failure."""

    fn: Callable | None = None
    failed: bool = False

    @classmethod
    def wanted(cls, device: torch.device) -> bool:
        """``$QUESTS_TORCH_COMPILE``: ``1`` on every device, anything else (default) never.

        Opt-in until a GPU run of ``benchmarks/gpu_check.py`` shows the gain: compiling costs
        tens of seconds on the first call (86 s cold on a 2-core CPU), which a one-off
        entropy or the first MD step would pay, and no GPU has timed the result yet.
        """
        mode = os.environ.get(_COMPILE_ENV, "0").strip().lower()
        if cls.failed:
            return False
        return mode in ("1", "true", "on", "yes")

    @classmethod
    def get(cls) -> Callable | None:
        if cls.failed:
            return None
        if cls.fn is None:
            try:
                cls.fn = torch.compile(_exp_sums, fullgraph=True)
            except Exception as err:  # torch.compile unavailable (e.g. unsupported Python)
                cls.disable(err)
                return None
        return cls.fn

    @classmethod
    def disable(cls, err: BaseException) -> None:
        cls.failed = True
        warnings.warn(
            f"torch.compile of the kernel-sum tile epilogue failed ({type(err).__name__}: "
            f"{str(err).strip()[:200]}); using the eager path (same results, slower on GPUs). "
            f"Set {_COMPILE_ENV}=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=4,
        )


def _top_first(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of every row of ``a`` and their columns, in the order value
    descending then column ascending (ties go to the lower column).

    Small ``k``: ``k`` rounds of ``max`` (which returns the first maximal column) on a copy,
    each removing its pick. Larger ``k``: ``topk`` finds the ``k``-th value ``v``; the entries
    above ``v`` and the first ones equal to it are kept in column order, then sorted stably.
    """
    if k > _TOPK_ROUNDS:
        rows, width = a.shape
        kth = torch.topk(a, k, dim=1, sorted=False).values.amin(1, keepdim=True)
        above, tied = a > kth, a == kth
        need = k - above.sum(1, keepdim=True)
        keep = above | (tied & (tied.cumsum(1) <= need))  # exactly k per row
        slot = torch.where(keep, keep.cumsum(1) - 1, k)  # the rest lands in a spare slot k
        every = torch.arange(width, device=a.device).expand(rows, width)
        cols = torch.zeros(rows, k + 1, dtype=torch.long, device=a.device)
        cols = cols.scatter_(1, slot, every)[:, :k]
        v, order = torch.sort(a.gather(1, cols), dim=1, descending=True, stable=True)
        return v, cols.gather(1, order)
    work = a.clone()
    values, cols = [], []
    for _ in range(k):
        v, j = work.max(1, keepdim=True)
        values.append(v)
        cols.append(j)
        work.scatter_(1, j, -math.inf)
    return torch.cat(values, 1), torch.cat(cols, 1)


def _tile_top(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of every row of ``a`` ``[rows, L]`` and their columns.

    Order: value descending, then column ascending (ties go to the lower column). Exact, by
    a block pre-selection instead of a selection over the whole tile: the row is cut into
    blocks of ``B ~ sqrt(L/k)`` (8 to 128) columns, the ``k`` blocks with the largest maxima
    (ties: lower block) are kept and the answer is picked from their ``k B`` entries. Every
    top-``k`` entry lies in those blocks: a block left out has ``k`` kept blocks whose maxima
    precede its own maximum, hence ``k`` entries that precede each of its entries. Cost: one
    ``amax`` pass over the tile plus selections on ``[rows, L/B]`` and ``[rows, k B]``.
    """
    width = a.shape[1]
    # the selections cost ~ k (L/B + k B) per row: B ~ sqrt(L/k), fewer than L/4 candidates
    block = min(_TOPK_BLOCK, width // (4 * k), max(8, math.isqrt(width // k)))
    if block < 8:  # narrow tile or large k: select on the whole tile
        return _top_first(a, k)
    full = width // block
    maxima = a[:, : full * block].unflatten(1, (full, block)).amax(2)
    if full * block < width:
        maxima = torch.cat([maxima, a[:, full * block :].amax(1, keepdim=True)], 1)
    chosen = _top_first(maxima, k)[1].sort(dim=1).values  # ascending: candidates in order
    cols = (chosen[:, :, None] * block + torch.arange(block, device=a.device)).flatten(1)
    inside = cols < width  # the last block may be short
    cand = a.gather(1, cols.clamp(max=width - 1)).masked_fill_(~inside, -math.inf)
    v, sel = _top_first(cand, k)
    return v, cols.gather(1, sel)


def _merge_top(
    best: torch.Tensor, best_idx: torch.Tensor, v: torch.Tensor, ix: torch.Tensor, k: int
) -> None:
    """Fold a tile's top entries ``(v, ix)`` into the running ``(best, best_idx)`` in place.

    ``best`` holds earlier (lower) columns, so a stable sort of ``[best, v]`` keeps the
    lower-column-first rule of :func:`_tile_top` across tiles.
    """
    v = torch.cat([best, v], 1)
    ix = torch.cat([best_idx, ix], 1)
    v, sel = torch.sort(v, dim=1, descending=True, stable=True)
    best.copy_(v[:, :k])
    best_idx.copy_(ix.gather(1, sel[:, :k]))


def _release_cached(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _retry_on_oom(run: Callable, shrink: Callable[[], str | None], device, what: str):
    """``run()``; after a ``torch.OutOfMemoryError`` shrink the tiles and run it again.

    ``shrink()`` halves the tiles (results do not depend on them) and describes the new
    size, or returns ``None`` at the floor, where the error is re-raised with advice.
    """
    while True:
        try:
            return run()
        except torch.OutOfMemoryError as err:
            smaller = shrink()
            if smaller is None:
                raise torch.OutOfMemoryError(
                    f"{what} ran out of memory on {device} even with the smallest tiles "
                    f"({_OOM_MIN_SIDE} per side): free memory on the device (other processes, "
                    f"tensors held by the caller) or compute on another device. "
                    f"Original error: {err}"
                ) from err
        # the failed attempt's tiles are unreachable once the except block is left
        _release_cached(torch.device(device))
        warnings.warn(
            f"{what}: out of memory on {device}; retrying with {smaller} "
            "(results do not depend on the tile size)",
            RuntimeWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# sweeps
# --------------------------------------------------------------------------------------------


def _tile_sums(p: _Problem, buf, tmp, j0: int, j1: int, k: int, mask, both: bool):
    """Row (and, for ``both``, column) sums of ``exp`` of one tile's exponents for ``h_k``.

    Compiled (one fused pass, no clamp) when :class:`_Epilogue` is wanted and works, else
    eager in place in ``buf``/``tmp`` (clamped at the floor off CUDA). Both agree to ~1e-15.
    """
    if p.fused:
        fn = _Epilogue.get()
        if fn is not None:
            lw = p.lw[j0:j1] if p.lw is not None and not p.fold_lw else None
            try:
                return fn(buf, p.scale_tensors[k], lw, mask, both)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # compilation failed: eager from now on
                _Epilogue.disable(err)
                p.fused = False
    t = p.terms(buf, tmp, j0, j1, k)
    if p.clamp:
        t.clamp_(min=p.floor)
    t.exp_()
    if mask is not None:
        t.masked_fill_(mask, 0.0)
    return t.sum(1), (t.sum(0) if both else None)


def _sweep_plain(p: _Problem, progress) -> KernelSums:
    """Unshifted sums (clamped at the floor off CUDA); optional exact top-k; triangular
    when ``x is y``."""
    n_h = len(p.hs)
    dev = p.device
    sums = torch.zeros(p.n, n_h, dtype=p.acc, device=dev)
    comp = None if p.f64 else torch.zeros_like(sums)  # float32-only: Neumaier compensation
    k_nn = min(p.n_nearest, p.m)
    best = best_idx = None
    if k_nn:
        best = torch.full((p.n, k_nn), -math.inf, dtype=p.dtype, device=dev)
        best_idx = torch.full((p.n, k_nn), -1, dtype=torch.long, device=dev)
    storage, tmp_storage = p.buffers(2) if p.multi else (*p.buffers(1), None)
    for i0 in range(0, p.n, p.tm):
        i1 = min(i0 + p.tm, p.n)
        xr, xraw = p.rows(i0, i1)
        lo, hi = p.col_range(i0, i1, triangular=p.same)
        for j0 in range(lo, hi, p.tn):
            j1 = min(j0 + p.tn, hi)
            buf = _view(storage, i1 - i0, j1 - j0)
            tmp = _view(tmp_storage, i1 - i0, j1 - j0)
            p.exponent_tile(i0, i1, j0, j1, xr, xraw, p.cols(j0, j1), buf)
            if k_nn:
                v, ix = _tile_top(buf, min(k_nn, j1 - j0))
                _merge_top(best[i0:i1], best_idx[i0:i1], v, ix.add_(j0), k_nn)
            if not p.want_sums:
                continue
            mask = p.group_mask(i0, i1, j0, j1)
            both = p.same and j0 != i0  # off-diagonal tile of a symmetric sweep
            row_parts, col_parts = [], []
            for k in range(n_h):
                row, col = _tile_sums(p, buf, tmp, j0, j1, k, mask, both)
                row_parts.append(row)
                if both:
                    col_parts.append(col)
            _accumulate(sums, comp, i0, i1, torch.stack(row_parts, 1))
            if both:
                _accumulate(sums, comp, j0, j1, torch.stack(col_parts, 1))
        if progress is not None:
            progress(i1, p.n)
    nearest = None
    if k_nn:
        nearest = (best.to(p.acc) * (-2.0 / p.c0)).clamp_(min=0.0)
    if comp is not None:
        sums += comp
    return KernelSums(sums.log_(), nearest, best_idx)


def _accumulate(
    sums: torch.Tensor, comp: torch.Tensor | None, i0: int, i1: int, values: torch.Tensor
) -> None:
    """``sums[i0:i1] += values``; with ``comp`` (float32-only mode) Neumaier-compensated:
    ``comp`` collects the low-order bits each addition drops, ``sums + comp`` is the total
    (error ~eps_32 instead of ~eps_32 x number of tiles)."""
    if comp is None:
        sums[i0:i1] += values
        return
    s = sums[i0:i1]
    t = s + values
    lost = torch.where(s.abs() >= values.abs(), (s - t) + values, (values - t) + s)
    comp[i0:i1] += lost
    s.copy_(t)


def _sweep_shifted(p: _Problem) -> torch.Tensor:
    """Online log-sum-exp with a running row maximum: accurate for arbitrarily far rows."""
    n_h = len(p.hs)
    dev = p.device
    out = torch.empty(p.n, n_h, dtype=p.acc, device=dev)
    lowest = torch.finfo(p.dtype).min / 4
    storage, tmp_storage = p.buffers(2) if p.multi else (*p.buffers(1), None)
    for i0 in range(0, p.n, p.tm):
        i1 = min(i0 + p.tm, p.n)
        xr, xraw = p.rows(i0, i1)
        run_max = torch.full((i1 - i0, n_h), -math.inf, dtype=p.dtype, device=dev)
        run_sum = torch.zeros(i1 - i0, n_h, dtype=p.acc, device=dev)
        run_comp = None if p.f64 else torch.zeros_like(run_sum)
        lo, hi = p.col_range(i0, i1)
        for j0 in range(lo, hi, p.tn):
            j1 = min(j0 + p.tn, hi)
            buf = _view(storage, i1 - i0, j1 - j0)
            tmp = _view(tmp_storage, i1 - i0, j1 - j0)
            p.exponent(xr, xraw, p.cols(j0, j1), buf)
            mask = p.group_mask(i0, i1, j0, j1)
            for k in range(n_h):
                t = p.terms(buf, tmp, j0, j1, k)
                if mask is not None:
                    t.masked_fill_(mask, lowest)  # finite: keeps the rescale factors NaN-free
                new_max = torch.maximum(run_max[:, k], t.amax(1))
                t.sub_(new_max[:, None])
                if p.clamp:
                    t.clamp_(min=p.floor)
                t.exp_()
                if mask is not None:
                    t.masked_fill_(mask, 0.0)
                rescale = torch.exp((run_max[:, k] - new_max).to(p.acc))
                if run_comp is None:
                    run_sum[:, k] = run_sum[:, k] * rescale + t.sum(1)
                else:  # rescale sum and compensation, then a Neumaier step
                    s = run_sum[:, k] * rescale
                    run_comp[:, k] *= rescale
                    v = t.sum(1)
                    tot = s + v
                    run_comp[:, k] += torch.where(s.abs() >= v.abs(), (s - tot) + v, (v - tot) + s)
                    run_sum[:, k] = tot
                run_max[:, k] = new_max
        if run_comp is not None:
            run_sum += run_comp
        out[i0:i1] = run_max.to(p.acc) + run_sum.log()
    return out


def _forward(p: _Problem, progress: Progress) -> KernelSums:
    """Plain sweep, then the shifted sweep for the rows whose sums are too small.

    Each sweep is redone with smaller tiles after an out-of-memory error.
    """
    callback, bar = _progress_callback(progress, p.n, "kernel sums")
    try:
        with full_precision(), torch.no_grad():
            res = _retry_on_oom(
                lambda: _sweep_plain(p, callback), p.shrink, p.device, "kernel sums"
            )
            log_p = res.log_p
            if not p.want_sums:
                return res
            threshold = p.floor + math.log(p.m) - math.log(p.eps)
            far = (log_p < threshold).any(1).nonzero().squeeze(1)  # the one host sync
            if far.numel() > 0:
                sub = p.subset_rows(far)
                log_p[far] = _retry_on_oom(
                    lambda: _sweep_shifted(sub), sub.shrink, p.device, "kernel sums (far rows)"
                )
            log_p += p.lw_max
    finally:
        if bar is not None:
            bar.close()
    return KernelSums(log_p, res.nearest_sq_dist, res.nearest_index)


def _backward(p: _Problem, log_p: torch.Tensor, grad: torch.Tensor, need: Sequence[bool]):
    """Gradients of ``sum(grad * log_p)`` w.r.t. ``x``, ``y`` and the log weights.

    With ``P_ijk = w_j K_k(x_i, y_j) / p_k(x_i)`` and ``W_ij = sum_k grad_ik P_ijk / h_k^2``::

        dL/dx_i  = sum_j W_ij (y_j - x_i)
        dL/dy_j  = sum_i W_ij (x_i - y_j)
        dL/dlw_j = sum_ik grad_ik P_ijk
    """
    need_x, need_y, need_w = need
    dev, dt = p.device, p.dtype
    n_h = len(p.hs)
    gx = torch.zeros(p.n, p.d, dtype=p.acc, device=dev) if need_x else None
    gy = torch.zeros(p.m, p.d, dtype=p.acc, device=dev) if need_y else None
    gw = torch.zeros(p.m, dtype=p.acc, device=dev) if need_w else None
    lp = (log_p.to(p.acc) - p.lw_max).to(dt)  # log sums of the exponents actually evaluated
    g = grad.to(dt)
    storage, tmp_storage, w_storage, v_storage = p.buffers(4 if p.multi else 1) + [None] * (
        0 if p.multi else 3
    )
    for i0 in range(0, p.n, p.tm):
        i1 = min(i0 + p.tm, p.n)
        xr, xraw = p.rows(i0, i1)
        gxi = torch.zeros(i1 - i0, p.d, dtype=dt, device=dev) if need_x else None
        lo, hi = p.col_range(i0, i1)
        for j0 in range(lo, hi, p.tn):
            j1 = min(j0 + p.tn, hi)
            yc = p.cols(j0, j1)
            yraw = yc[:, : p.d]
            buf = _view(storage, i1 - i0, j1 - j0)
            tmp = _view(tmp_storage, i1 - i0, j1 - j0)
            p.exponent_tile(i0, i1, j0, j1, xr, xraw, yc, buf)
            mask = p.group_mask(i0, i1, j0, j1)
            if not p.multi:
                t = p.terms(buf, tmp, j0, j1, 0)
                t.sub_(lp[i0:i1, :1])
                if p.clamp:
                    t.clamp_(min=p.floor)
                t.exp_()
                if mask is not None:
                    t.masked_fill_(mask, 0.0)
                v = w = t.mul_(g[i0:i1, :1])  # V = grad * P, W = c0 * V
                scale = p.c0
            else:
                w = _view(w_storage, i1 - i0, j1 - j0).zero_()
                v = _view(v_storage, i1 - i0, j1 - j0).zero_() if need_w else None
                for k in range(n_h):
                    t = p.terms(buf, tmp, j0, j1, k)
                    t.sub_(lp[i0:i1, k : k + 1])
                    if p.clamp:
                        t.clamp_(min=p.floor)
                    t.exp_()
                    if mask is not None:
                        t.masked_fill_(mask, 0.0)
                    t.mul_(g[i0:i1, k : k + 1])
                    if v is not None:
                        v.add_(t)
                    w.add_(t, alpha=p.scales[k])
                scale = 1.0
            if need_w:
                gw[j0:j1] += v.sum(0).to(p.acc)
            if need_x:
                gxi.add_(torch.mm(w, yraw) - w.sum(1)[:, None] * xraw, alpha=scale)
            if need_y:
                part = torch.mm(w.T, xraw) - w.sum(0)[:, None] * yraw
                gy[j0:j1] += part.to(p.acc).mul_(scale)
        if need_x:
            gx[i0:i1] = gxi.to(p.acc)
    return gx, gy, gw


class _LogKernelSumFn(torch.autograd.Function):
    """``log p`` with a tile-recomputing backward; inputs ``x``, ``y``, ``log_w`` (or None)."""

    @staticmethod
    def forward(ctx, x, y, log_w, problem: _Problem, progress):
        res = _forward(problem, progress)
        ctx.problem = problem
        ctx.save_for_backward(res.log_p)
        extra = [t for t in (res.nearest_sq_dist, res.nearest_index) if t is not None]
        ctx.mark_non_differentiable(*extra)
        return (res.log_p, *extra)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, *_ignored):
        (log_p,) = ctx.saved_tensors
        p: _Problem = ctx.problem
        need = ctx.needs_input_grad[:3]
        with full_precision(), torch.no_grad():
            gx, gy, gw = _retry_on_oom(
                lambda: _backward(p, log_p, grad, need), p.shrink, p.device, "kernel-sum backward"
            )
        return (
            None if gx is None else gx.to(p.xs.dtype),
            None if gy is None else gy.to(p.ys.dtype),
            gw,
            None,
            None,
        )


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def _as_log_weights(log_weights, device) -> torch.Tensor | None:
    if log_weights is None:
        return None
    if isinstance(log_weights, np.ndarray):
        return torch.from_numpy(np.asarray(log_weights, dtype=np.float64))
    if isinstance(log_weights, torch.Tensor):
        if log_weights.ndim != 1:
            raise ValueError(f"`log_weights` must be 1-D [m], got shape {tuple(log_weights.shape)}")
        return log_weights
    raise TypeError(
        f"`log_weights` must be a tensor or numpy array, got {type(log_weights).__name__}"
    )


def _kernel_pass(
    x: ArrayLike,
    y: ArrayLike,
    h: Bandwidth = DEFAULT_BANDWIDTH,
    *,
    names: tuple[str, str] = ("x", "y"),
    log_weights=None,
    n_nearest: int = 0,
    dtype: torch.dtype | None = None,
    centre: bool = True,
    distance: str = "matmul",
    tile_size=None,
    budget=None,
    device=None,
    progress: Progress = None,
    groups: _Groups | None = None,
    want_sums: bool = True,
) -> KernelSums:
    """:func:`kernel_pass` with the argument names used in error messages."""
    hs, vector = check_bandwidths(h)
    same = y is x
    xs = _Source(x, names[0])
    ys = xs if same else _Source(y, names[1])
    if not isinstance(n_nearest, int) or n_nearest < 0:
        raise ValueError(f"`n_nearest` must be a non-negative int, got {n_nearest!r}")
    lw = _as_log_weights(log_weights, device)
    problem = _Problem(
        xs,
        ys,
        hs,
        log_weights=lw,
        dtype=dtype,
        centre=centre,
        distance=distance,
        tile_size=tile_size,
        budget=budget,
        device=device,
        same=same,
        n_nearest=n_nearest,
        groups=groups,
        want_sums=want_sums,
    )
    tensors = [t if isinstance(t, torch.Tensor) else None for t in (x, y, lw)]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out = _LogKernelSumFn.apply(*tensors, problem, progress)
        log_p = out[0]
        nn_d, nn_i = (out[1], out[2]) if n_nearest else (None, None)
    else:
        log_p, nn_d, nn_i = _forward(problem, progress)
    log_p = log_p.to(problem.out_dtype)
    if nn_d is not None:
        nn_d = nn_d.to(problem.out_dtype)
    return KernelSums(log_p if vector else log_p[:, 0], nn_d, nn_i)


def kernel_pass(
    x: ArrayLike,
    y: ArrayLike,
    h: Bandwidth = DEFAULT_BANDWIDTH,
    *,
    log_weights: torch.Tensor | np.ndarray | None = None,
    n_nearest: int = 0,
    dtype: torch.dtype | None = None,
    centre: bool = True,
    distance: str = "matmul",
    tile_size: int | tuple[int, int] | None = None,
    budget: int | str | None = None,
    device: torch.device | str | None = None,
    progress: Progress = None,
) -> KernelSums:
    """One tiled pass over all pairs: log kernel sums and, optionally, exact nearest references.

    ``log p_k(x_i | Y) = log sum_j w_j exp(-|x_i - y_j|^2 / (2 h_k^2))`` for every bandwidth
    ``h_k`` from a single evaluation of the distances, plus the ``n_nearest`` smallest
    ``|x_i - y_j|^2`` picked from the same tiles.

    Args:
        x: queries ``[n, d]``: tensor (any device) or numpy array / memmap (streamed).
        y: references ``[m, d]``, same kinds. Passing the same object as ``x`` (``y is x``)
            uses the symmetric half-cost sweep.
        h: bandwidth ``> 0`` (1/Å), or a 1-D sequence/tensor of bandwidths.
        log_weights: optional ``[m]`` log weights ``log w_j`` (``-inf`` drops a reference).
        n_nearest: number of nearest references to return (0: none).
        dtype: compute dtype; default the promoted input dtype. ``torch.float32`` tiles are
            accumulated in float64 (relative error of ``p`` ~1e-6 on thermal Cu data), or in
            compensated float32 where float64 is off (MPS, slow-float64 CUDA cards,
            ``QUESTS_TORCH_FLOAT64=0``: float32 results, see the module notes).
        centre: subtract the mean of ``y`` from both sets before the GEMM expansion
            (recommended, essential in float32).
        distance: ``"matmul"`` (GEMM expansion, fast) or ``"direct"`` (explicit differences).
        tile_size: rows and columns per tile (an int for square tiles); default from the
            memory budget and the caches. Results do not depend on it beyond rounding.
        budget: bytes a tile's temporaries may use (see :func:`quests_torch._memory.memory_budget`).
        device: compute device when neither input is a tensor (default CPU).
        progress: ``True`` for a tqdm bar or a callable ``(rows_done, rows_total)``.

    Returns:
        :class:`KernelSums` with ``log_p`` of shape ``[n]`` (scalar ``h``) or ``[n, n_h]``
        (vector ``h``), in the promoted input dtype; differentiable w.r.t. ``x``, ``y`` and
        ``log_weights`` when they are tensors requiring grad.
    """
    return _kernel_pass(
        x,
        y,
        h,
        log_weights=log_weights,
        n_nearest=n_nearest,
        dtype=dtype,
        centre=centre,
        distance=distance,
        tile_size=tile_size,
        budget=budget,
        device=device,
        progress=progress,
    )


def log_kernel_sum(
    x: ArrayLike,
    y: ArrayLike,
    h: Bandwidth = DEFAULT_BANDWIDTH,
    *,
    log_weights: torch.Tensor | np.ndarray | None = None,
    dtype: torch.dtype | None = None,
    centre: bool = True,
    distance: str = "matmul",
    tile_size: int | tuple[int, int] | None = None,
    budget: int | str | None = None,
    device: torch.device | str | None = None,
    progress: Progress = None,
) -> torch.Tensor:
    """Log kernel density ``log p(x_i | Y) = logsumexp_j(log w_j - |x_i - y_j|^2 / (2 h^2))``.

    Tiled, never builds ``n x m``; finite for arbitrarily distant queries. See
    :func:`kernel_pass` for the arguments.

    Returns:
        ``[n]`` for a scalar ``h``, ``[n, n_h]`` for a vector of bandwidths.
    """
    return _kernel_pass(
        x,
        y,
        h,
        log_weights=log_weights,
        dtype=dtype,
        centre=centre,
        distance=distance,
        tile_size=tile_size,
        budget=budget,
        device=device,
        progress=progress,
    ).log_p


def kernel_sum(
    x: ArrayLike,
    y: ArrayLike,
    h: Bandwidth = DEFAULT_BANDWIDTH,
    **kwargs,
) -> torch.Tensor:
    """Kernel density ``p(x_i | Y) = sum_j w_j exp(-|x_i - y_j|^2 / (2 h^2))``.

    ``exp`` of :func:`log_kernel_sum` (same keyword arguments); underflows to 0 for queries
    more than ~38 h from every reference, where :func:`log_kernel_sum` stays finite.

    Returns:
        ``[n]`` for a scalar ``h``, ``[n, n_h]`` for a vector of bandwidths.
    """
    return log_kernel_sum(x, y, h, **kwargs).exp()


def _gather_rows(src: ArrayLike, index: torch.Tensor, device: torch.device, dtype) -> torch.Tensor:
    if isinstance(src, torch.Tensor):
        return src[index.to(src.device)].to(dtype)
    rows = np.asarray(src[index.cpu().numpy().ravel()])
    return torch.from_numpy(rows).to(device=device, dtype=dtype).view(*index.shape, -1)


def _nearest_neighbors(
    x: ArrayLike,
    y: ArrayLike,
    n: int = 3,
    *,
    names: tuple[str, str] = ("x", "y"),
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"`n` must be a positive int, got {n!r}")
    ys_n = int(y.shape[0]) if hasattr(y, "shape") and len(y.shape) == 2 else None
    if ys_n is not None and ys_n < n:
        raise ValueError(f"`n` = {n} exceeds the number of rows of `{names[1]}` ({ys_n})")
    with torch.no_grad():
        res = _kernel_pass(
            x, y, DEFAULT_BANDWIDTH, names=names, n_nearest=n, want_sums=False, **kwargs
        )
    idx = res.nearest_index
    dev = idx.device
    out_dtype = res.log_p.dtype
    xt = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x)).to(dev)
    yg = _gather_rows(y, idx, dev, out_dtype)  # [n_x, n, d]
    dist = (xt.to(out_dtype)[:, None, :] - yg).square().sum(-1).sqrt()
    idx, by_index = idx.sort(dim=1)  # exact ties in distance: lower index first
    dist = dist.gather(1, by_index)
    order = dist.detach().argsort(dim=1, stable=True)
    return dist.gather(1, order), idx.gather(1, order)


def nearest_neighbors(
    x: ArrayLike,
    y: ArrayLike,
    n: int = 3,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``n`` nearest references of every query, found from the tiled distances.

    The candidates come from the same GEMM tiles as the kernel sums (running top-n per row,
    no index structure); the returned distances are then recomputed by explicit differences
    ``|x_i - y_j|`` (exact and differentiable w.r.t. ``x`` and ``y``).

    Args:
        x: queries ``[n_x, d]`` (tensor or numpy).
        y: references ``[m, d]`` with ``m >= n``.
        n: neighbours per query.
        **kwargs: ``dtype``, ``centre``, ``tile_size``, ``budget``, ``device``, ``progress``
            as in :func:`kernel_pass`.

    Returns:
        ``(distances [n_x, n], indices [n_x, n])`` sorted by increasing distance.
    """
    return _nearest_neighbors(x, y, n, **kwargs)


def _first_match_within(
    x: ArrayLike,
    y: ArrayLike | None = None,
    tol: float = 1e-5,
    *,
    names: tuple[str, str] = ("x", "y"),
    tile_size=None,
    budget=None,
    device=None,
) -> torch.Tensor:
    if not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"`tol` must be a positive finite float, got {tol!r}")
    xs = _Source(x, names[0])
    same = y is None or y is x
    ys = xs if same else _Source(y, names[1])
    p = _Problem(
        xs, ys, [1.0], dtype=torch.float64, tile_size=tile_size, budget=budget, device=device
    )
    limit = -0.5 * tol * tol
    dev = p.device
    big = p.m

    def sweep() -> torch.Tensor:
        first = torch.full((p.n,), big, dtype=torch.long, device=dev)
        (storage,) = p.buffers(1)
        for i0 in range(0, p.n, p.tm):
            i1 = min(i0 + p.tm, p.n)
            xr, xraw = p.rows(i0, i1)
            hi = i1 if same else p.m  # earlier rows only: the lower triangle
            for j0 in range(0, hi, p.tn):
                j1 = min(j0 + p.tn, hi)
                buf = p.exponent(xr, xraw, p.cols(j0, j1), _view(storage, i1 - i0, j1 - j0))
                hit = buf >= limit
                cols = torch.arange(j0, j1, device=dev)
                if same and j1 > i0:
                    hit &= cols[None, :] < torch.arange(i0, i1, device=dev)[:, None]
                cand = torch.where(hit, cols[None, :], big).amin(1)
                torch.minimum(first[i0:i1], cand, out=first[i0:i1])
        return first

    with full_precision(), torch.no_grad():
        first = _retry_on_oom(sweep, p.shrink, dev, "first_match_within")
    first[first == big] = -1
    return first


def first_match_within(
    x: ArrayLike,
    y: ArrayLike | None = None,
    tol: float = 1e-5,
    **kwargs,
) -> torch.Tensor:
    """Index of the first reference within ``tol`` of each query (``-1`` if none).

    With ``y`` omitted (or ``y is x``) the references are the *earlier* rows of ``x``:
    ``first[i] = min{j < i : |x_i - x_j| <= tol}``, so ``first >= 0`` marks duplicates.
    Distances come from centred float64 GEMM tiles (absolute error of ``|x-y|^2`` ~1e-16
    times the squared spread of the data, far below ``tol^2`` for ``tol >= 1e-7``).

    Args:
        x: descriptors ``[n, d]``.
        y: references ``[m, d]`` or ``None``.
        tol: distance tolerance ``> 0`` (descriptor units, 1/Å).
        **kwargs: ``tile_size``, ``budget``, ``device`` as in :func:`kernel_pass`.

    Returns:
        ``[n]`` int64 indices into ``y`` (or ``x``).
    """
    return _first_match_within(x, y, tol, **kwargs)


# --------------------------------------------------------------------------------------------
# a reference set prepared once, queried many times
# --------------------------------------------------------------------------------------------


def _default_tile_elements(p: _Problem) -> int:
    """Elements of one default tile of ``p``'s device and budget (the tiling rule's area)."""
    probe = copy.copy(p)
    probe.n = probe.m = 1 << 40
    probe.same = False
    probe._set_tiles(None)
    return probe.tm * probe.tn


class PreparedReferences:
    """A reference set checked, centred and augmented once, for many small query batches.

    ``prepared.log_kernel_sum(x)`` is :func:`log_kernel_sum` ``(x, y, h, dtype=dtype,
    budget=budget)`` through the same engine (centring on the mean of ``y``, the GEMM
    expansion ``[c x_c, c, -c|x_c|^2/2] . [y_c, -|y_c|^2/2, 1]``, floor-clamped sums, the
    shifted recomputation of far rows, a tile-recomputing backward), but the NaN/inf check of
    ``y``, its float64 mean and its augmented column block are computed here, once. A call
    prepares only the queries, and its tiles are sized from the query: ``min(n, T)`` rows and
    as many columns as the default tile area allows, so a short query (one MD frame against
    a bank) spans the bank in one or two tiles. Results agree with :func:`log_kernel_sum` to
    rounding (the row sums are split at other column boundaries).

    The prepared block is a snapshot of ``y`` when it fits in half of the memory budget (else
    it is rebuilt per tile from ``y``): after changing ``y`` build a new object
    (:class:`quests_torch.uncertainty.UncertaintyBank` does so when its buffer changes).

    Args:
        y: references ``[m, d]`` (tensor on the compute device, or numpy array: CPU).
        h: bandwidth ``> 0`` (1/Å), or a 1-D sequence of bandwidths.
        dtype: compute dtype of the tiles (default that of ``y``); sums accumulate in float64.
        centre: subtract the mean of ``y`` before the GEMM expansion.
        distance: ``"matmul"`` or ``"direct"`` as in :func:`kernel_pass`.
        budget: bytes a tile's temporaries may use (see :func:`quests_torch._memory.memory_budget`).
        name: the name of ``y`` in error messages.

    Raises:
        ValueError: ``y`` is empty, not 2-D or holds NaN/inf; bad ``h``.
    """

    def __init__(
        self,
        y: ArrayLike,
        h: Bandwidth = DEFAULT_BANDWIDTH,
        *,
        dtype: torch.dtype | None = None,
        centre: bool = True,
        distance: str = "matmul",
        budget: int | str | None = None,
        name: str = "y",
    ):
        hs, self.vector = check_bandwidths(h)
        ys = _Source(y, name)
        # xs is ys: the references' own checks and mean only; queries replace xs per call
        self._template = _Problem(
            ys, ys, hs, dtype=dtype, centre=centre, distance=distance, budget=budget
        )
        self._template.self_pairs = False
        self._tile_elements = _default_tile_elements(self._template)

    @property
    def n_references(self) -> int:
        return self._template.m

    @property
    def device(self) -> torch.device:
        return self._template.device

    def problem(
        self,
        x: ArrayLike,
        *,
        name: str = "x",
        check_finite: bool = True,
        tile_size: int | tuple[int, int] | None = None,
    ) -> _Problem:
        """The tiled problem of queries ``x`` against the prepared references."""
        t = self._template
        xs = _Source(x, name)
        if xs.d != t.d:
            raise ValueError(
                f"`{name}` and `{t.ys.name}` must have the same descriptor width, "
                f"got {xs.d} and {t.d}"
            )
        if xs.device is not None and xs.device != t.device:
            raise ValueError(
                f"inputs must be on one device, got `{name}` on {xs.device}, "
                f"`{t.ys.name}` on {t.device}"
            )
        if check_finite:
            if xs.tensor is not None:
                if not bool(torch.isfinite(xs.tensor).all()):
                    raise ValueError(f"`{name}` contains NaN or infinite descriptor values")
            else:
                xs.check_finite_and_mean(t.device, max(1, t.budget // (64 * t.d)), t.acc)
        p = copy.copy(t)
        p.xs, p.n = xs, xs.n
        p.out_dtype = t.result_dtype(xs.dtype, t.ys.dtype)
        p._set_tiles(tile_size)
        if tile_size is None:  # a short query leaves tile area to the columns
            p.tn = min(p.m, max(p.tn, self._tile_elements // p.tm))
        return p

    def log_kernel_sum(
        self,
        x: ArrayLike,
        *,
        name: str = "x",
        check_finite: bool = True,
        tile_size: int | tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``log p(x_i | Y) = log sum_j exp(-|x_i - y_j|^2 / (2 h^2))`` against the references.

        Args:
            x: queries ``[n, d]`` on the references' device (tensor, or numpy on CPU).
            name: the name of ``x`` in error messages.
            check_finite: raise on NaN/inf in ``x`` (one host sync); ``False`` when ``x`` is
                finite by construction (descriptors of validated positions).
            tile_size: rows and columns per tile; default sized from the query.

        Returns:
            ``[n]`` (``[n, n_h]`` for a vector ``h``) in the promoted dtype of ``x`` and ``y``,
            differentiable with respect to ``x`` (first derivatives).
        """
        p = self.problem(x, name=name, check_finite=check_finite, tile_size=tile_size)
        if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
            log_p = _LogKernelSumFn.apply(x, None, None, p, None)[0]
        else:
            log_p = _forward(p, None).log_p
        log_p = log_p.to(p.out_dtype)
        return log_p if self.vector else log_p[:, 0]


# --------------------------------------------------------------------------------------------
# block-diagonal sums: every row against its own group only, equal-size groups batched
# --------------------------------------------------------------------------------------------


class GroupBlocks(NamedTuple):
    """``count`` consecutive groups of ``size`` rows each, starting at row ``start``."""

    start: int
    count: int
    size: int


def _block_terms(p: _Problem, e: torch.Tensor) -> torch.Tensor:
    """Floor-clamped kernel sums ``[..., n_h]`` over the last (column) dim of exponents ``e``."""
    tmp = torch.empty_like(e) if p.multi else None
    parts = []
    for k in range(len(p.hs)):
        t = p.terms(e, tmp, 0, 0, k)  # no weights here: the column range is not used
        parts.append(t.clamp_(min=p.floor).exp_().sum(-1))
    return torch.stack(parts, -1)


def _sweep_blocks(
    p: _Problem, blocks: Sequence[GroupBlocks], elements: int, progress
) -> torch.Tensor:
    """Plain log sums ``[n, n_h]`` of each row over its own group (``p.xs is p.ys``).

    Equal-size groups are stacked into ``[G, size, size]`` exponent tiles, one batched GEMM
    each (``G`` from the tile area), so the number of kernels does not grow with the number
    of groups; a group too large for one tile of ``elements`` gets ``[rows, size]`` tiles of
    its own.
    """
    sums = torch.empty(p.n, len(p.hs), dtype=p.acc, device=p.device)
    done = 0
    for start, count, size in blocks:
        if count == 0 or size == 0:
            continue
        per = elements // (size * size)
        if per >= 1:  # whole groups, batched
            for g0 in range(0, count, per):
                g = min(per, count - g0)
                i0 = start + g0 * size
                i1 = i0 + g * size
                xr, xraw = p.rows(i0, i1)
                yc = p.cols(i0, i1)
                if p.direct:
                    xb = xraw.view(g, size, p.d)
                    dist = torch.cdist(xb, xb, compute_mode="donot_use_mm_for_euclid_dist")
                    e = dist.square_().mul_(-0.5 * p.c0)
                else:
                    e = torch.bmm(xr.view(g, size, -1), yc.view(g, size, -1).transpose(1, 2))
                if p.self_pairs:
                    e.diagonal(dim1=1, dim2=2).fill_(0.0)
                sums[i0:i1] = _block_terms(p, e).view(i1 - i0, -1)
                done += i1 - i0
                if progress is not None:
                    progress(done, p.n)
            continue
        rows = max(1, elements // size)  # one large group: row tiles spanning the group
        for a in range(start, start + count * size, size):
            yc = p.cols(a, a + size)
            for i0 in range(a, a + size, rows):
                i1 = min(i0 + rows, a + size)
                xr, xraw = p.rows(i0, i1)
                out = torch.empty(i1 - i0, size, dtype=p.dtype, device=p.device)
                e = p.exponent_tile(i0, i1, a, a + size, xr, xraw, yc, out)
                sums[i0:i1] = _block_terms(p, e)
                done += i1 - i0
                if progress is not None:
                    progress(done, p.n)
    return sums.log_()


def _forward_blocks(p: _Problem, blocks, elements: int, progress) -> torch.Tensor:
    """:func:`_forward` for block-diagonal groups: batched plain sums, then far rows shifted."""
    callback, bar = _progress_callback(progress, p.n, "kernel sums")
    try:
        with full_precision(), torch.no_grad():
            log_p = _sweep_blocks(p, blocks, elements, callback)
            threshold = p.floor + math.log(p.m) - math.log(p.eps)
            far = (log_p < threshold).any(1).nonzero().squeeze(1)  # the one host sync
            if far.numel() > 0:
                log_p[far] = _sweep_shifted(p.subset_rows(far))
    finally:
        if bar is not None:
            bar.close()
    return log_p


class _BlockLogKernelSumFn(torch.autograd.Function):
    """Block-diagonal ``log p`` of ``x`` against itself; the backward is :func:`_backward`."""

    @staticmethod
    def forward(ctx, x, problem: _Problem, blocks, elements, progress):
        log_p = _forward_blocks(problem, blocks, elements, progress)
        ctx.problem = problem
        ctx.save_for_backward(log_p)
        return log_p

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (log_p,) = ctx.saved_tensors
        p: _Problem = ctx.problem
        with full_precision(), torch.no_grad():
            gx, gy, _ = _backward(p, log_p, grad, (True, True, False))
        # x is both the rows and the columns
        return (gx + gy).to(p.xs.dtype), None, None, None, None


def grouped_log_kernel_sum(
    x: ArrayLike,
    group_sizes: Sequence[int] | np.ndarray | torch.Tensor,
    h: Bandwidth = DEFAULT_BANDWIDTH,
    *,
    name: str = "x",
    dtype: torch.dtype | None = None,
    centre: bool = True,
    distance: str = "matmul",
    tile_size: int | tuple[int, int] | None = None,
    budget: int | str | None = None,
    device: torch.device | str | None = None,
    progress: Progress = None,
) -> torch.Tensor:
    """Log kernel sums of each row over its own group: ``log p(x_i | X_g(i))``.

    ``log p(x_i | X_g) = log sum_{j in g} exp(-|x_i - x_j|^2 / (2 h^2))`` (self pair
    included), where the rows of ``x`` form consecutive groups of ``group_sizes`` rows. Runs
    of equal-size groups are evaluated as ``[G, size, size]`` batched GEMMs (``G`` from the
    tile area), so the number of kernels depends on the number of such runs (sort the groups
    by size to make them few), not on the number of groups. Same numerics as
    :func:`kernel_pass` (centring on the mean of all of ``x``, GEMM expansion, self pairs
    exactly 0, floor-clamped sums, far rows recomputed shifted); the backward recomputes the
    tiles (first derivatives, w.r.t. ``x``).

    Args:
        x: descriptors ``[n, d]`` sorted by group.
        group_sizes: ``[G]`` rows of each consecutive group (``>= 0``, summing to ``n``).
        h: bandwidth (1/Å) or a 1-D sequence of bandwidths.
        name: the name of ``x`` in error messages.
        dtype, centre, distance, tile_size, budget, device, progress: as in
            :func:`kernel_pass` (an explicit ``tile_size`` bounds the elements of a tile).

    Returns:
        ``[n]`` (``[n, n_h]`` for a vector ``h``) in the dtype of ``x``.
    """
    hs, vector = check_bandwidths(h)
    xs = _Source(x, name)
    if isinstance(group_sizes, torch.Tensor):
        group_sizes = group_sizes.cpu().numpy()
    sizes = np.asarray(group_sizes, dtype=np.int64).ravel()
    if (sizes < 0).any() or int(sizes.sum()) != xs.n:
        raise ValueError(
            f"`group_sizes` must be non-negative and sum to the {xs.n} rows of `{name}`, "
            f"got a sum of {int(sizes.sum())}"
        )
    ends = np.cumsum(sizes)
    starts = ends - sizes
    problem_device = _compute_device([xs], device)
    labels = torch.from_numpy(np.repeat(np.arange(sizes.size), sizes)).to(problem_device)
    groups = _Groups(labels, labels, np.repeat(starts, sizes), np.repeat(ends, sizes))
    explicit = tile_size is not None
    if not explicit:
        # the grouped 2-D tiles (backward, far rows) visit the union of their rows' groups:
        # keep them near the group size so small groups do not pay for 1024-wide tiles
        largest = max(1, int(sizes.max(initial=1)))
        tile_size = min(1024, max(64, 1 << (largest - 1).bit_length()))
    p = _Problem(
        xs,
        xs,
        hs,
        dtype=dtype,
        centre=centre,
        distance=distance,
        tile_size=tile_size,
        budget=budget,
        device=device,
        groups=groups,
    )
    elements = p.tm * p.tn if explicit else _default_tile_elements(p)
    # runs of consecutive non-empty groups of equal size, found with numpy (no Python loop
    # over the groups: a dataset may hold millions of structures)
    keep = np.flatnonzero(sizes > 0)
    size_k, start_k = sizes[keep], starts[keep]
    head = np.ones(keep.size, dtype=bool)
    head[1:] = (size_k[1:] != size_k[:-1]) | (start_k[1:] != start_k[:-1] + size_k[:-1])
    heads = np.flatnonzero(head)
    counts = np.diff(np.append(heads, keep.size))
    blocks = [
        GroupBlocks(int(start_k[h]), int(c), int(size_k[h]))
        for h, c in zip(heads.tolist(), counts.tolist(), strict=True)
    ]
    if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
        log_p = _BlockLogKernelSumFn.apply(x, p, blocks, elements, progress)
    else:
        log_p = _forward_blocks(p, blocks, elements, progress)
    log_p = log_p.to(p.out_dtype)
    return log_p if vector else log_p[:, 0]


# --------------------------------------------------------------------------------------------
# running sums against a growing reference set
# --------------------------------------------------------------------------------------------


def wide_tile_columns(device: torch.device, budget: int, m: int, dtype: torch.dtype, n: int) -> int:
    """Columns of an ``[m, cols]`` tile for the wide ``[m, d] x [d, n]`` products.

    Three ``[m, cols]`` temporaries fit the memory budget; on a CPU the tile is also capped
    at ~1 MB so the GEMM and the passes that follow stay in the L2 cache.
    """
    cols = budget // (3 * dtype.itemsize * max(1, m))
    if torch.device(device).type == "cpu":
        cols = min(cols, max(256, _CPU_RUNNING_TILE // max(1, m)))
    return max(1, min(n, cols))


class RunningLogKernelSum:
    """``log K_i = log sum_{y in added} exp(-|x_i - y|^2 / (2 h^2))`` for fixed queries ``x``.

    The queries are prepared once (centred, squared norms cached); each :meth:`add` of a
    block of references ``Y`` costs one GEMM per row tile of ``x`` (tiles sized from the
    memory budget) and folds ``log sum_{y in Y}`` into ``log_k`` with ``logaddexp``, so
    earlier references are never revisited. This is the engine of greedy dataset
    compression and of per-generation statistics; it is not differentiable (use
    :func:`log_kernel_sum` for gradients).

    Args:
        x: queries ``[n, d]`` (tensor; the computation runs on its device).
        h: bandwidth (1/Å).
        dtype: compute dtype of the tiles (default ``x.dtype``); ``log_k`` is float64.
        centre: subtract this ``[d]`` vector from queries and references (default: the
            mean of ``x``), which keeps the GEMM expansion of the distances accurate.
        budget: bytes a tile may use (see :func:`quests_torch._memory.memory_budget`).

    Attributes:
        log_k: ``[n]`` float64; ``-inf`` until something is added.
    """

    def __init__(
        self,
        x: torch.Tensor,
        h: float,
        *,
        dtype: torch.dtype | None = None,
        centre: torch.Tensor | None = None,
        budget: int | str | None = None,
    ):
        src = _Source(x, "x")
        if src.tensor is None:
            raise TypeError("`x` must be a torch.Tensor")
        hs, vector = check_bandwidths(h)
        if vector:
            raise ValueError("`h` must be a single bandwidth")
        self.dtype = x.dtype if dtype is None else dtype
        if self.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"`dtype` must be torch.float32 or torch.float64, got {self.dtype}")
        self.device = x.device
        x64 = x.detach().to(torch.float64)
        if not bool(torch.isfinite(x64).all()):
            raise ValueError("`x` contains NaN or infinite descriptor values")
        self.mu = x64.mean(0) if centre is None else centre.to(self.device, torch.float64)
        xc = x64 - self.mu
        self.scale = 1.0 / (2.0 * hs[0] ** 2)
        # augmented columns: [2 s y, 1, -s|y|^2] . [x, -s|x|^2, 1] = -s |x - y|^2 in one GEMM;
        # queries stored transposed ([d + 2, n]): the wide GEMM y_aug @ x_aug^T is ~2x faster
        # than the skinny x_aug @ y_aug^T on CPUs
        self.x_aug_t = (
            torch.cat(
                [xc, (-self.scale * (xc * xc).sum(1))[:, None], torch.ones_like(xc[:, :1])], 1
            )
            .to(self.dtype)
            .T.contiguous()
        )
        self.d = int(x.shape[1])
        self.budget = memory_budget(self.device, budget)
        self.log_k = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=self.device)

    def _cols_per_tile(self, m: int) -> int:
        return wide_tile_columns(self.device, self.budget, m, self.dtype, self.x_aug_t.shape[1])

    def log_sum(self, y: torch.Tensor) -> torch.Tensor:
        """``log sum_{y_j in y} K(x_i, y_j)`` for every query ``[n]`` (float64), not folded in."""
        if y.ndim != 2 or y.shape[1] != self.d:
            raise ValueError(f"`y` must be [m, {self.d}] like the queries, got {tuple(y.shape)}")
        out = torch.empty_like(self.log_k)
        if y.shape[0] == 0:
            return out.fill_(-math.inf)
        yc = y.detach().to(self.device, torch.float64) - self.mu
        y_aug = torch.cat(
            [
                2.0 * self.scale * yc,
                torch.ones_like(yc[:, :1]),
                -self.scale * (yc * yc).sum(1)[:, None],
            ],
            1,
        ).to(self.dtype)
        m = y.shape[0]

        def shrink() -> str | None:  # halve the columns per tile (and keep the budget)
            cols = self._cols_per_tile(m)
            if cols <= _OOM_MIN_SIDE:
                return None
            while self._cols_per_tile(m) > cols // 2 and self.budget > 1:
                self.budget //= 2
            return f"{self._cols_per_tile(m)}-column tiles"

        with full_precision():
            _retry_on_oom(
                lambda: self._log_sum_tiles(y_aug, out), shrink, self.device, "running kernel sum"
            )
        return out

    def _log_sum_tiles(self, y_aug: torch.Tensor, out: torch.Tensor) -> None:
        n = self.x_aug_t.shape[1]
        cols = self._cols_per_tile(y_aug.shape[0])
        cpu = self.device.type == "cpu"
        for j0 in range(0, n, cols):
            j1 = min(j0 + cols, n)
            e = torch.mm(y_aug, self.x_aug_t[:, j0:j1]).clamp_(max=0.0)  # [m, cols] <= 0
            e = e.to(torch.float64)
            if not cpu:
                out[j0:j1] = torch.logsumexp(e, 0)
                continue
            # CPU: exp and sum without the max shift (one pass fewer); the exponents are
            # <= 0, so only columns whose every term underflows need the shifted form
            sums = e.exp().sum(0)
            out[j0:j1] = sums.log()
            low = sums < 1e-290
            if bool(low.any()):
                out[j0:j1][low] = torch.logsumexp(e[:, low], 0)

    def add(self, y: torch.Tensor) -> None:
        """Fold the references ``y [m, d]`` into ``log_k``."""
        torch.logaddexp(self.log_k, self.log_sum(y), out=self.log_k)
