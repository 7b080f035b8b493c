"""Running log kernel sums of fixed queries against a growing reference set."""

from __future__ import annotations

import math

import torch

from .._memory import memory_budget
from .._precision import float64_enabled, full_precision
from ..checks import check_bandwidths
from .problem import augment
from .source import Source
from .tiles import OOM_MIN_SIDE, retry_on_oom, wide_spans, wide_tile_columns


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
            In float32-only mode (:func:`quests_torch._precision.float64_enabled`) the
            tiles, the centring and ``log_k`` are float32 whatever ``dtype`` says.
        centre: subtract this ``[d]`` vector from queries and references (default: the
            mean of ``x``), which keeps the GEMM expansion of the distances accurate.
        budget: bytes a tile may use (see :func:`quests_torch._memory.memory_budget`).

    Attributes:
        log_k: ``[n]`` float64 (float32 in float32-only mode); ``-inf`` until something is
            added.
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
        src = Source(x, "x")
        if src.tensor is None:
            raise TypeError("`x` must be a torch.Tensor")
        hs, vector = check_bandwidths(h)
        if vector:
            raise ValueError("`h` must be a single bandwidth")
        self.dtype = x.dtype if dtype is None else dtype
        if self.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"`dtype` must be torch.float32 or torch.float64, got {self.dtype}")
        self.device = x.device
        # float32-only: float32 tiles and sums (each tile's exp-sum is a cascade sum of terms
        # <= 1; log_k is folded with logaddexp), no float64 tensor on the device
        self.acc = torch.float64 if float64_enabled(self.device) else torch.float32
        if self.acc == torch.float32:
            self.dtype = torch.float32
        xa = x.detach().to(self.acc)
        if not bool(torch.isfinite(xa).all()):
            raise ValueError("`x` contains NaN or infinite descriptor values")
        self.mu = xa.mean(0) if centre is None else centre.to(self.device, self.acc)
        xc = xa - self.mu
        self.scale = 1.0 / (2.0 * hs[0] ** 2)
        # augmented columns: [2 s y, 1, -s|y|^2] . [x, -s|x|^2, 1] = -s |x - y|^2 in one GEMM;
        # queries stored transposed ([d + 2, n]): the wide GEMM y_aug @ x_aug^T is ~2x faster
        # than the skinny x_aug @ y_aug^T on CPUs
        self.x_aug_t = augment(xc, None, -self.scale, norm_first=True).to(self.dtype).T.contiguous()
        self.d = int(x.shape[1])
        self.budget = memory_budget(self.device, budget)
        self.log_k = torch.full((x.shape[0],), -math.inf, dtype=self.acc, device=self.device)

    def _cols_per_tile(self, m: int) -> int:
        return wide_tile_columns(self.device, self.budget, m, self.dtype, self.x_aug_t.shape[1])

    def log_sum(self, y: torch.Tensor, self_start: int | None = None) -> torch.Tensor:
        """``log sum_{y_j in y} K(x_i, y_j)`` for every query ``[n]`` (``log_k``'s dtype), not
        folded in.

        ``self_start``: ``y`` is the queries ``x[self_start : self_start + m]`` themselves; the
        exponents of their self pairs are then exactly 0 (the GEMM expansion leaves rounding
        of ~eps |x_c|^2 / h^2 there: ~1e-13 in float64, ~1e-5 in float32).
        """
        if y.ndim != 2 or y.shape[1] != self.d:
            raise ValueError(f"`y` must be [m, {self.d}] like the queries, got {tuple(y.shape)}")
        out = torch.empty_like(self.log_k)
        if y.shape[0] == 0:
            return out.fill_(-math.inf)
        yc = y.detach().to(self.device, self.acc) - self.mu
        y_aug = augment(yc, 2.0 * self.scale, -self.scale, norm_first=False).to(self.dtype)
        m = y.shape[0]

        def shrink() -> str | None:  # halve the columns per tile (and keep the budget)
            cols = self._cols_per_tile(m)
            if cols <= OOM_MIN_SIDE:
                return None
            while self._cols_per_tile(m) > cols // 2 and self.budget > 1:
                self.budget //= 2
            return f"{self._cols_per_tile(m)}-column tiles"

        with full_precision():
            retry_on_oom(
                lambda: self._log_sum_tiles(y_aug, out, self_start),
                shrink,
                self.device,
                "running kernel sum",
            )
        return out

    def _log_sum_tiles(self, y_aug: torch.Tensor, out: torch.Tensor, start: int | None) -> None:
        n = self.x_aug_t.shape[1]
        cpu = self.device.type == "cpu"
        # sums below this are denormal-close: recomputed with the max shift
        tiny = 1e-290 if self.acc == torch.float64 else 1e-30
        for j0, j1 in wide_spans(self.device, self.budget, y_aug.shape[0], self.dtype, n):
            e = torch.mm(y_aug, self.x_aug_t[:, j0:j1]).clamp_(max=0.0)  # [m, cols] <= 0
            if start is not None:  # row r is query start + r: column start + r - j0
                e.diagonal(offset=start - j0).fill_(0.0)
            e = e.to(self.acc)
            if not cpu:
                out[j0:j1] = torch.logsumexp(e, 0)
                continue
            # CPU: exp and sum without the max shift (one pass fewer); the exponents are
            # <= 0, so only columns whose every term underflows need the shifted form
            sums = e.exp().sum(0)
            out[j0:j1] = sums.log()
            low = sums < tiny
            if bool(low.any()):
                out[j0:j1][low] = torch.logsumexp(e[:, low], 0)

    def add(self, y: torch.Tensor, self_start: int | None = None) -> None:
        """Fold the references ``y [m, d]`` into ``log_k`` (``self_start``: see :meth:`log_sum`)."""
        torch.logaddexp(self.log_k, self.log_sum(y, self_start), out=self.log_k)
