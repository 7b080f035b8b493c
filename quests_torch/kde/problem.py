"""The prepared problem: sources checked, centred and augmented once for the tile GEMMs."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .._memory import memory_budget
from .._precision import float64_enabled
from ..checks import check_keywords
from .epilogue import Epilogue
from .source import Source, compute_device
from .tiles import OOM_MIN_SIDE, auto_tiles

FLOOR = {torch.float64: -700.0, torch.float32: -80.0}


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


def augment(
    v: torch.Tensor, factor: float | None, norm: float, *, norm_first: bool
) -> torch.Tensor:
    """Augmented rows for the one-GEMM expansion of squared distances of the wide tiles.

    ``norm_first``: ``[v, norm |v|^2, 1]``; else ``[factor v, 1, norm |v|^2]`` (``factor``
    ``None``: ``v`` as is). The product of a ``norm_first`` block of ``a`` with the other
    block of ``b`` is ``factor a.b + norm_a |a|^2 + norm_b |b|^2``: ``-s |a - b|^2`` for
    ``(factor, norm) = (2 s, -s)`` on both sides (running sums, ``s = 1 / (2 h^2)``) and
    ``|a - b|^2`` for ``(-2, 1)`` (mean distances). Computed in the dtype of ``v``.
    """
    sq = (norm * (v * v).sum(1))[:, None]
    ones = torch.ones_like(v[:, :1])
    if norm_first:
        return torch.cat([v, sq, ones], 1)
    return torch.cat([v if factor is None else factor * v, ones, sq], 1)


class Groups(NamedTuple):
    """Pair mask for per-group sums: only pairs with equal labels count.

    Rows and columns are sorted by label, so each row's partners form one contiguous column
    range ``[lo[i], hi[i])``; a row tile visits only the union of its rows' ranges.
    """

    rows: torch.Tensor  # [n] labels of the rows, on the device
    cols: torch.Tensor  # [m] labels of the columns, on the device
    lo: np.ndarray  # [n] first column of each row's group
    hi: np.ndarray  # [n] one past the last column of each row's group


SWEEP_OPTIONS = ("dtype", "centre", "distance", "tile_size", "budget", "device")
"""The keywords of a sweep's numerics and tiles, shared by every kernel-sum entry point (their
meaning: :func:`quests_torch.kde.kernel_pass`)."""


def check_sweep_options(options: dict, caller: str, extra: tuple[str, ...] = ()) -> dict:
    """``options`` when every key is one of :data:`SWEEP_OPTIONS` (or ``extra``); otherwise the
    ``TypeError`` Python raises for a call of ``caller`` with the unknown keyword."""
    return check_keywords(options, SWEEP_OPTIONS + extra, caller)


def check_pair(xs: Source, ys: Source) -> None:
    """Queries and references must have the same descriptor width."""
    if xs.d != ys.d:
        raise ValueError(
            f"`{xs.name}` and `{ys.name}` must have the same descriptor width, "
            f"got {xs.d} and {ys.d}"
        )


def check_log_weights_shape(lw: torch.Tensor, ys: Source) -> None:
    """``log_weights`` must have one entry per reference row."""
    if tuple(lw.shape) != (ys.n,):
        raise ValueError(
            f"`log_weights` must have shape ({ys.n},) like the rows of `{ys.name}`, "
            f"got {tuple(lw.shape)}"
        )


def input_dtypes(xs: Source, ys: Source, dtype: torch.dtype | None):
    """``(result dtype, compute dtype)``: the promoted input dtype and ``dtype`` (default the
    promoted one), both float32 or float64 (before the float32-only override)."""
    out_dtype = torch.promote_types(xs.dtype, ys.dtype)
    if dtype is None and out_dtype not in (torch.float32, torch.float64):
        name = xs.name if xs.dtype not in (torch.float32, torch.float64) else ys.name
        raise TypeError(
            f"`{name}` must hold float32 or float64 descriptors, got {out_dtype} (or pass `dtype`)"
        )
    dtype = out_dtype if dtype is None else dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}")
    return out_dtype, dtype


class Problem:
    """Everything a tiled sweep needs: sources, prepared blocks, tile sizes and scales."""

    def __init__(
        self,
        xs: Source,
        ys: Source,
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
        groups: Groups | None = None,
        want_sums: bool = True,
        mu: torch.Tensor | None = None,
        offsets: tuple[int, int] = (0, 0),
        pin: bool = False,
    ):
        """Check and prepare ``xs`` against ``ys`` for bandwidths ``hs``.

        The sharded sums (:mod:`quests_torch.distributed`) evaluate blocks of a larger
        problem: ``mu`` is then the centring point of the whole reference set (default: the
        mean of ``ys``), ``offsets`` the global indices of the first row and column, and
        ``pin`` says that rows and columns are blocks of one set, so the self pairs (global
        row = global column) get an exponent of exactly 0 as in the symmetric sweep.
        :attr:`owned` (set by the caller) restricts the triangular sweep to some row tiles.
        """
        check_pair(xs, ys)
        if distance not in ("matmul", "direct"):
            raise ValueError(f"`distance` must be 'matmul' or 'direct', got {distance!r}")
        self.device = compute_device([xs, ys], device)
        self.f64 = float64_enabled(self.device)  # False: float32-only (no float64 on device)
        self.xs, self.ys = xs, ys
        # pair (i, i) is a point with itself: distance exactly 0
        self.self_pairs = xs is ys or pin
        self.row_offset, self.col_offset = offsets
        self.owned: np.ndarray | None = None
        self.n, self.m, self.d = xs.n, ys.n, xs.d
        self.out_dtype, self.dtype = input_dtypes(xs, ys, dtype)
        if not self.f64:  # float32 tiles, compensated float32 sums, float32 results
            self.dtype = self.out_dtype = torch.float32
        self.acc = torch.float64 if self.f64 else torch.float32
        self.floor = FLOOR[self.dtype]
        # the clamp at the floor only avoids the slow denormal path of CPU exp(); CUDA has none
        self.clamp = self.device.type != "cuda"
        self.fused = Epilogue.wanted(self.device)
        self.eps = torch.finfo(self.dtype).eps
        self._set_scales(hs)
        self.direct = distance == "direct"
        self.n_nearest = n_nearest
        self.groups = groups
        self.want_sums = want_sums
        self.same = same and log_weights is None and n_nearest == 0 and groups is None
        self.budget = memory_budget(self.device, budget)
        self.set_tiles(tile_size)
        self._check_and_centre(centre, mu)
        self._set_weights(log_weights)
        self.fold_lw = self.lw is not None and not self.multi and n_nearest == 0
        self.width = self.d + 2 + (1 if self.fold_lw else 0)
        self.cols_resident: torch.Tensor | None = None
        if self.m * self.width * self.dtype.itemsize <= self.budget // 2:
            self.cols_resident = self._build_cols(0, self.m)

    def _set_scales(self, hs: list[float]) -> None:
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

    def _check_and_centre(self, centre: bool, mu: torch.Tensor | None) -> None:
        """NaN/inf and magnitude checks of both sets (one host sync each); the centring mean."""
        xs, ys = self.xs, self.ys
        chunk = max(1, self.budget // (64 * self.d))
        mean, y_max = ys.check_finite_mean_max(self.device, chunk, self.acc)
        x_max = xs.check_finite_mean_max(self.device, chunk, self.acc)[1] if xs is not ys else y_max
        self._check_magnitude(xs.name, x_max)
        self._check_magnitude(ys.name, y_max)
        if not centre:
            self.mu = torch.zeros_like(mean)
        elif mu is not None:
            self.mu = mu.to(device=self.device, dtype=self.acc)
        else:
            self.mu = mean

    def _set_weights(self, log_weights: torch.Tensor | None) -> None:
        """``lw' = lw - max(lw) <= 0`` enters the exponent, ``max(lw)`` is added at the end."""
        self.lw: torch.Tensor | None = None
        self.lw_max = torch.zeros((), dtype=self.acc, device=self.device)
        if log_weights is None:
            return
        lw = log_weights.detach().to(device=self.device, dtype=self.acc)
        check_log_weights_shape(lw, self.ys)
        if bool(torch.isnan(lw).any()) or bool(torch.isposinf(lw).any()):
            raise ValueError("`log_weights` must not contain NaN or +inf")
        self.lw_max = lw.max()
        if not bool(torch.isfinite(self.lw_max)):
            raise ValueError("`log_weights` are all -inf (every weight is zero)")
        lowest = torch.finfo(self.dtype).min / 4  # finite stand-in for log(0)
        self.lw = (lw - self.lw_max).clamp_(min=lowest).to(self.dtype)

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
    def set_tiles(self, tile_size) -> None:
        """Tile ``(rows, cols)``: ``None`` (from the memory budget, :func:`auto_tiles`), an
        int (square) or a pair; square when the sweep is triangular; at most ``(n, m)``."""
        if tile_size is None:
            tm, tn = auto_tiles(self.device.type, self.budget, self.dtype.itemsize)
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
        if max(self.tm, self.tn) <= OOM_MIN_SIDE:
            return None
        self.budget = max(1, self.budget // 4)
        self.tm, self.tn = max(1, self.tm // 2), max(1, self.tn // 2)
        if self.same:
            self.tn = self.tm
        if self.cols_resident is not None and self.cols_resident.nbytes > self.budget // 2:
            self.cols_resident = None  # streamed in column panels from now on
        return f"{self.tm} x {self.tn} tiles"

    def subset_rows(self, index: torch.Tensor) -> Problem:
        """The same problem restricted to the query rows ``index`` (no top-k, no symmetry)."""
        sub = copy.copy(self)
        sub.xs = self.xs.take(index)
        sub.n = sub.xs.n
        sub.same = False
        sub.self_pairs = False  # the subset's rows are no longer aligned with the columns
        sub.owned = None
        sub.n_nearest = 0
        sub.tm = min(self.tm, sub.n)
        if self.groups is not None:
            host = index.cpu().numpy()
            sub.groups = Groups(
                self.groups.rows.index_select(0, index),
                self.groups.cols,
                self.groups.lo[host],
                self.groups.hi[host],
            )
        return sub

    # prepared blocks ------------------------------------------------------------------------
    def _centred(self, src: Source, i0: int, i1: int) -> torch.Tensor:
        return (src.rows(i0, i1, self.device, self.acc) - self.mu).to(self.dtype)

    def result_dtype(self, a: torch.dtype, b: torch.dtype) -> torch.dtype:
        """The promoted dtype of the inputs; float32 in float32-only mode."""
        return torch.promote_types(a, b) if self.f64 else torch.float32

    def _build_cols(self, j0: int, j1: int) -> torch.Tensor:
        return self.build_cols(j0, j1, self.ys.rows(j0, j1, self.device, None))

    def build_cols(self, j0: int, j1: int, raw: torch.Tensor) -> torch.Tensor:
        """Column block ``[y_c, -|y_c|^2/2, 1, (lw')]`` in the compute dtype from the rows
        ``raw`` of ``y[j0:j1]`` as read (on the device, in the source's storage dtype)."""
        y = (raw.to(self.acc) - self.mu).to(self.dtype)
        q = y.to(self.acc).square().sum(1).mul(-0.5).to(self.dtype)
        parts = [y, q[:, None], torch.ones_like(q)[:, None]]
        if self.fold_lw:
            parts.append(self.lw[j0:j1, None])
        return torch.cat(parts, 1)

    def cols(self, j0: int, j1: int) -> torch.Tensor:
        if self.cols_resident is not None:
            return self.cols_resident[j0:j1]
        return self._build_cols(j0, j1)

    def panel_sizes(self) -> tuple[int, int]:
        """``(row tiles per row panel, columns per column panel)`` of the sweeps.

        Resident columns: one row tile and all columns (the plain tile loop). Otherwise half
        the budget holds the panels: two column panels in flight (prepared and as read), at
        least one column tile, a quarter of it at most; the rest a row panel of as many row
        tiles (prepared and centred rows, and the gradient rows of a backward) as fit, at
        least one. Each column panel is read once per row panel: ``ceil(n / (tiles * tm))``
        passes over the references.
        """
        if self.cols_resident is not None:
            return 1, self.m
        item = self.dtype.itemsize
        per_col = 2 * (self.width * item + self.d * self.ys.storage_dtype.itemsize)
        per_row = (self.width + 2 * self.d) * item  # xr, x_c and a backward's gradient rows
        half = self.budget // 2
        cols = min(self.m, max(self.tn, (half // 4) // (per_col * self.tn) * self.tn))
        tiles = max(1, (half - cols * per_col) // (per_row * self.tm))
        return min(tiles, -(-self.n // self.tm)), cols

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
        if not self.self_pairs:
            return out
        gi0, gj0 = i0 + self.row_offset, j0 + self.col_offset  # global indices
        lo, hi = max(gi0, gj0), min(i1 + self.row_offset, j1 + self.col_offset)
        if lo < hi:
            diag = out.diagonal(offset=gi0 - gj0)
            if self.fold_lw:  # the exponent of a self pair is its log weight, exactly
                diag.copy_(self.lw[lo - self.col_offset : hi - self.col_offset])
            else:
                diag.fill_(0.0)
        return out

    def col_range(self, i0: int, i1: int, triangular: bool = False) -> tuple[int, int]:
        """Columns a row tile visits: all, its groups' range, or ``j >= i0`` (triangular;
        none for a row tile another rank owns, see :attr:`owned`)."""
        if triangular and self.owned is not None and not self.owned[i0 // self.tm]:
            return i0, i0
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
