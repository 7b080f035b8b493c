"""A reference set prepared once (checked, centred, augmented) for many query batches."""

from __future__ import annotations

import copy

import torch

from ..checks import DEFAULT_BANDWIDTH, check_bandwidths
from ..structures import resolve_device
from .problem import Problem
from .source import ArrayLike, Bandwidth, Source
from .sweeps import LogKernelSumFn, forward


def default_tile_elements(p: Problem) -> int:
    """Elements of one default tile of ``p``'s device and budget (the tiling rule's area)."""
    probe = copy.copy(p)
    probe.n = probe.m = 1 << 40
    probe.same = False
    probe.set_tiles(None)
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
    it is streamed from ``y`` in column panels): after changing ``y`` build a new object
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
        ys = Source(y, name)
        # xs is ys: the references' own checks and mean only; queries replace xs per call
        self._template = Problem(
            ys, ys, hs, dtype=dtype, centre=centre, distance=distance, budget=budget
        )
        self._template.self_pairs = False
        self._tile_elements = default_tile_elements(self._template)

    @property
    def n_references(self) -> int:
        """Number of reference rows ``m``."""
        return self._template.m

    @property
    def device(self) -> torch.device:
        """The device the prepared references live on."""
        return self._template.device

    def problem(
        self,
        x: ArrayLike,
        *,
        name: str = "x",
        check_finite: bool = True,
        tile_size: int | tuple[int, int] | None = None,
    ) -> Problem:
        """The tiled problem of queries ``x`` against the prepared references.

        Args:
            x: queries ``[n, d]`` on the references' device (tensor, or numpy on CPU).
            name: the name of ``x`` in error messages.
            check_finite: raise on NaN/inf in ``x`` (one host sync); ``False`` when ``x`` is
                finite by construction (descriptors of validated positions).
            tile_size: rows and columns per tile; default sized from the query.

        Returns:
            The :class:`~quests_torch.kde.engine.Problem` (a copy of the prepared one).
        """
        t = self._template
        xs = Source(x, name)
        if xs.d != t.d:
            raise ValueError(
                f"`{name}` and `{t.ys.name}` must have the same descriptor width, "
                f"got {xs.d} and {t.d}"
            )
        resolve_device(None, inputs=[(name, xs.device), (t.ys.name, t.device)])  # one device
        if check_finite:
            if xs.tensor is not None:
                if not bool(torch.isfinite(xs.tensor).all()):
                    raise ValueError(f"`{name}` contains NaN or infinite descriptor values")
            else:
                xs.check_finite_and_mean(t.device, max(1, t.budget // (64 * t.d)), t.acc)
        p = copy.copy(t)
        p.xs, p.n = xs, xs.n
        p.out_dtype = t.result_dtype(xs.dtype, t.ys.dtype)
        p.set_tiles(tile_size)
        if tile_size is None:  # a short query leaves tile area to the columns
            p.tn = min(p.m, max(p.tn, self._tile_elements // p.tm))
        return p

    def log_kernel_sum(self, x: ArrayLike, **options) -> torch.Tensor:
        """``log p(x_i | Y) = log sum_j exp(-|x_i - y_j|^2 / (2 h^2))`` against the references.

        Args:
            x: queries ``[n, d]`` on the references' device (tensor, or numpy on CPU).
            **options: ``name``, ``check_finite`` and ``tile_size``, as in :meth:`problem`.

        Returns:
            ``[n]`` (``[n, n_h]`` for a vector ``h``) in the promoted dtype of ``x`` and ``y``,
            differentiable with respect to ``x`` (first derivatives).
        """
        p = self.problem(x, **options)
        if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
            log_p = LogKernelSumFn.apply(x, None, None, p, None)[0]
        else:
            log_p = forward(p, None, p.out_dtype).log_p
        log_p = log_p.to(p.out_dtype)
        return log_p if self.vector else log_p[:, 0]
