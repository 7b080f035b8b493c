"""Entropy learning curves: the entropy of random subsets of growing size, and its asymptote.

A curve is computed in two steps. :func:`plan_learning_curve` draws, once, everything random:
for each size ``s`` and repeat ``r`` the subset ``perm_r[:s]`` of the ``n`` rows (and, for a
subset estimated from sampled rows, the state of the generator those rows are drawn from).
A front end then computes each task's entropy and :meth:`LearningCurvePlan.curve` assembles
them: :func:`entropy_learning_curve` in one process, and
:func:`quests_torch.distributed.entropy_learning_curve`, which deals the same tasks out to
the ranks, so both see the same subsets by construction.

The saturation ``H(N) -> H_inf`` (:func:`fit_entropy_asymptote`) and the information gap
``H_inf - H(N)`` (:func:`information_gap`) follow the QUESTS paper's learning-curve analysis.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .checks import DEFAULT_BANDWIDTH, check_bandwidths, check_generator, check_positive_int
from .estimates import resolve_rows, sample_rows, take_rows
from .kde import ArrayLike, Bandwidth, engine
from .metric_estimates import estimate_entropy
from .metric_functions import entropy

__all__ = [
    "AsymptoteFit",
    "CurveTask",
    "LearningCurve",
    "LearningCurvePlan",
    "entropy_learning_curve",
    "fit_entropy_asymptote",
    "information_gap",
    "plan_learning_curve",
]


class LearningCurve(NamedTuple):
    """Entropy of random subsets of growing size (see :func:`entropy_learning_curve`).

    Attributes:
        sizes: ``[m]`` int64 subset sizes, ascending.
        mean: ``[m]`` mean entropy over the repeats (``[m, n_h]`` for a vector ``h``).
        std: ``[m]`` standard deviation over the repeats (population, ``ddof = 0``).
        values: ``[m, repeats]`` every entropy (``[m, repeats, n_h]``).
        stderr: ``None`` when every entropy is exact; else ``[m, repeats]`` float64 standard
            errors of the sampled estimates (0 for the exact ones).
    """

    sizes: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    values: torch.Tensor
    stderr: torch.Tensor | None = None


class CurveTask(NamedTuple):
    """One entropy of a learning curve: repeat ``repeat`` of size ``sizes[size_index]``.

    Attributes:
        size_index, repeat: its slot in :attr:`LearningCurve.values`.
        size: rows of the subset.
        rows: ``[size]`` ascending rows of ``x`` in the subset; ``None``: the whole set
            (entropy is permutation invariant: computed once for every repeat).
        sampled: rows the entropy is estimated from (``== size``: exact).
        sample_state: the state of the CPU generator the estimate draws its ``sampled``
            rows from (:func:`quests_torch.metrics.estimate_entropy`); ``None`` when exact.
    """

    size_index: int
    repeat: int
    size: int
    rows: torch.Tensor | None
    sampled: int
    sample_state: torch.Tensor | None = None

    def generator(self) -> torch.Generator:
        """A generator in :attr:`sample_state` (the estimate's rows)."""
        gen = torch.Generator()
        gen.set_state(self.sample_state)
        return gen


class LearningCurvePlan(NamedTuple):
    """Everything random of a learning curve, drawn once (:func:`plan_learning_curve`).

    Attributes:
        n: rows of ``x``.
        dtype: dtype of ``x`` (of the curve's values).
        sizes: ``[m]`` int64 subset sizes, ascending.
        repeats: subsets per size.
        tasks: one :class:`CurveTask` per size and repeat, in the order they were drawn.
    """

    n: int
    dtype: torch.dtype
    sizes: torch.Tensor
    repeats: int
    tasks: tuple[CurveTask, ...]

    def subset(self, x: ArrayLike, task: CurveTask) -> ArrayLike:
        """The rows of ``x`` of ``task`` (``x`` itself for the whole set)."""
        return x if task.rows is None else take_rows(x, task.rows)

    def curve(self, values: torch.Tensor, stderr: torch.Tensor | None = None) -> LearningCurve:
        """The :class:`LearningCurve` of the tasks' ``values`` ``[m, repeats(, n_h)]``."""
        if stderr is not None and not bool(stderr.any()):
            stderr = None
        return LearningCurve(
            self.sizes, values.mean(1), values.std(1, correction=0), values, stderr
        )


def _curve_sizes(n: int, sizes) -> torch.Tensor:
    if sizes is None:  # 16 log-spaced sizes from min(10, n) to n
        grid = np.unique(np.round(np.geomspace(min(10, n), n, 16)).astype(np.int64))
        return torch.from_numpy(grid)
    sizes_t = torch.as_tensor(sizes).flatten().to(torch.int64).sort().values
    if sizes_t.numel() == 0:
        raise ValueError("`sizes` is empty")
    if int(sizes_t.min()) < 1 or int(sizes_t.max()) > n:
        raise ValueError(f"`sizes` must lie in [1, {n}] (the rows of `x`), got {sizes_t.tolist()}")
    return sizes_t


def _subset_rows(rows, s: int):
    """``rows`` for a subset of ``s`` rows: an int is capped at ``s`` (checked on ``n``)."""
    if isinstance(rows, numbers.Integral) and not isinstance(rows, bool):
        return min(int(rows), s)
    return rows


def _drawn(gen: torch.Generator, n: int, m: int) -> torch.Tensor:
    """The generator's state, then advanced past the ``m`` of ``n`` rows an estimate draws."""
    state = gen.get_state()
    sample_rows(n, m, gen)
    return state


#: bytes a planned subset holds beside its row indices (the task, its generator state)
_TASK_BYTES = 512


def _check_plan_memory(n: int, sizes: torch.Tensor, repeats: int) -> None:
    """Refuse, before drawing anything, a plan whose subsets cannot be held in memory: each
    repeat of a size below ``n`` keeps its ``size`` int64 row indices and a task."""
    from ._memory import available_memory

    per_repeat = sum(8 * s + _TASK_BYTES for s in sizes.tolist() if s < n) + _TASK_BYTES
    need, have = repeats * per_repeat, available_memory()
    if need > have:
        raise ValueError(
            f"`repeats` = {repeats} needs the row indices of {repeats} subsets per size, "
            f"{need / 2**30:.3g} GiB, more than the {have / 2**30:.3g} GiB available; "
            f"use fewer repeats (at most {max(1, have // per_repeat)} here)"
        )


def plan_learning_curve(
    x: ArrayLike,
    sizes: Sequence[int] | torch.Tensor | None = None,
    repeats: int = 3,
    generator: torch.Generator | int | None = None,
    rows: int | str | None = None,
) -> LearningCurvePlan:
    """Draw the subsets of a learning curve of ``x`` (see :func:`entropy_learning_curve`).

    For each size (ascending) and repeat, in this order: the subset, uniform without
    replacement (:func:`quests_torch.estimates.sample_rows`), then, when the subset is
    estimated from sampled rows, those rows; the whole set is one subset for every repeat.

    Returns:
        :class:`LearningCurvePlan`.
    """
    src = engine.Source(x, "x")
    n = src.n
    sizes_t = _curve_sizes(n, sizes)
    repeats = check_positive_int(repeats, "repeats")
    _check_plan_memory(n, sizes_t, repeats)
    resolve_rows(rows, n)  # checks `rows` once, against the whole set
    gen = check_generator(generator)
    tasks: list[CurveTask] = []
    whole = None  # (sampled, state) of the whole set, drawn once
    for si, s in enumerate(sizes_t.tolist()):
        m = resolve_rows(_subset_rows(rows, s), s)
        if s == n:
            if whole is None:
                whole = (m, _drawn(gen, n, m) if m < n else None)
            tasks += [CurveTask(si, r, s, None, *whole) for r in range(repeats)]
            continue
        for r in range(repeats):
            pick = sample_rows(n, s, gen)
            tasks.append(CurveTask(si, r, s, pick, m, _drawn(gen, s, m) if m < s else None))
    return LearningCurvePlan(n, src.dtype, sizes_t, repeats, tuple(tasks))


def entropy_learning_curve(
    x: ArrayLike,
    h: Bandwidth = DEFAULT_BANDWIDTH,
    sizes: Sequence[int] | torch.Tensor | None = None,
    repeats: int = 3,
    generator: torch.Generator | int | None = None,
    rows: int | str | None = None,
    **options,
) -> LearningCurve:
    """Entropy of random subsets (without replacement) of growing size.

    For each size ``s`` and repeat ``r``, ``H(X[perm_r[:s]])``; a subset of the full size is
    the whole set (entropy is permutation invariant), computed once. Exact by default
    (``rows=None``); with ``rows`` (an int ``m``: subsets larger than ``m`` are estimated from
    ``m`` sampled rows; ``"auto"``: subsets above
    :data:`quests_torch.estimates.EXACT_MAX_ROWS` from
    :data:`~quests_torch.estimates.AUTO_ROWS` rows) large subsets cost ``m s`` instead of
    ``s^2 / 2`` (:func:`~quests_torch.metrics.estimate_entropy`; scalar ``h`` only) and
    ``stderr`` holds their standard errors. Smaller subsets, and all subsets with
    ``rows=None``, are exact and identical to a run without ``rows``. The subsets are drawn
    by :func:`plan_learning_curve`.

    Args:
        x: descriptors ``[n, d]``.
        h: bandwidth (1/Å) or a 1-D sequence of bandwidths.
        sizes: subset sizes in ``[1, n]``; default 16 log-spaced sizes from ``min(10, n)`` to
            ``n``.
        repeats: random subsets per size.
        generator: a CPU ``torch.Generator`` or an int seed (``None``: random seed).
        rows: ``None`` (exact), an int in ``[2, n]`` or ``"auto"``.
        **options: forwarded to :func:`quests_torch.kde.kernel_pass`.

    Returns:
        :class:`LearningCurve`.
    """
    plan = plan_learning_curve(x, sizes, repeats, generator, rows)
    if any(t.sample_state is not None for t in plan.tasks) and check_bandwidths(h)[1]:
        raise ValueError(
            "`h` must be a single bandwidth for entropy_learning_curve with sampled rows"
        )
    values: list[torch.Tensor] = []
    errors: list[float] = []
    whole = None
    for task in plan.tasks:
        if task.rows is None and whole is not None:
            value = whole
        elif task.sample_state is None:
            value = (entropy(plan.subset(x, task), h, **options), 0.0)
        else:
            est = estimate_entropy(
                plan.subset(x, task), h, task.sampled, task.generator(), **options
            )
            value = (torch.tensor(est.value, dtype=plan.dtype), est.stderr)
        if task.rows is None:
            whole = value
        values.append(value[0])
        errors.append(value[1])
    device = values[0].device
    shape = (len(plan.sizes), plan.repeats)
    stacked = torch.stack([v.to(device) for v in values])
    stacked = stacked.reshape(shape + tuple(stacked.shape[1:]))
    stderr = torch.tensor(errors, dtype=torch.float64).reshape(shape)
    return plan.curve(stacked, stderr)


class AsymptoteFit(NamedTuple):
    """Saturating fit ``H(N) = a - b N^(-c)`` of an entropy learning curve.

    Attributes:
        h_inf: the asymptote ``a = lim H(N)`` (nats).
        a, b, c: the non-negative parameters.
        rmse: root-mean-square residual over the fitted points (nats).
        n_points: number of points used after discarding.
    """

    h_inf: float
    a: float
    b: float
    c: float
    rmse: float
    n_points: int


def _fit_ab(n: np.ndarray, hv: np.ndarray, c: float) -> tuple[float, float, float]:
    """Best non-negative ``(a, b)`` of ``H ~ a - b n^-c`` for a fixed ``c``; returns SSE too."""
    z = n ** (-c)
    basis = np.stack([np.ones_like(z), -z], 1)
    candidates = []
    sol, *_ = np.linalg.lstsq(basis, hv, rcond=None)
    if sol[0] >= 0 and sol[1] >= 0:
        candidates.append((float(sol[0]), float(sol[1])))
    candidates.append((max(float(hv.mean()), 0.0), 0.0))  # b = 0
    b0 = float(-(z @ hv) / (z @ z))  # a = 0
    candidates.append((0.0, max(b0, 0.0)))
    best = None
    for a, b in candidates:
        sse = float(np.sum((a - b * z - hv) ** 2))
        if best is None or sse < best[2]:
            best = (a, b, sse)
    return best


def fit_entropy_asymptote(
    sizes: Sequence[int] | torch.Tensor | np.ndarray,
    entropies: Sequence[float] | torch.Tensor | np.ndarray,
    discard: int = 3,
    c_max: float = 5.0,
) -> AsymptoteFit:
    """Fit ``H(N) = a - b N^(-c)`` (``a, b, c >= 0``) to a learning curve; ``H_inf = a``.

    The paper fits a three-parameter saturating form with non-negative parameters by
    non-linear least squares, discarding the first and last three points; its equation was
    lost from the text available to us, so this saturating power law is our choice. The fit
    is exact non-linear least squares by variable projection: for fixed ``c`` the best
    non-negative ``(a, b)`` is a 2-variable constrained linear problem; ``c`` in ``[0, c_max]``
    is found by a log-spaced scan refined by golden-section search. An unsaturated curve
    (still growing like ``log N``) drives ``c -> 0`` and ``a`` up: check ``rmse`` and the
    curve.

    Args:
        sizes: ``[m]`` subset sizes ``N > 0``.
        entropies: ``[m]`` mean entropies ``H(N)``.
        discard: points dropped at each end when at least ``2 * discard + 3`` points are
            given (3 remain to fit); with fewer points every point is used.
        c_max: upper bound of the exponent.

    Returns:
        :class:`AsymptoteFit`.
    """
    n = np.asarray(torch.as_tensor(sizes).detach().cpu(), dtype=np.float64).ravel()
    hv = np.asarray(torch.as_tensor(entropies).detach().cpu(), dtype=np.float64)
    if hv.ndim != 1:
        raise ValueError(f"`entropies` must be 1-D [m], got shape {hv.shape}")
    if n.shape != hv.shape:
        raise ValueError(
            f"`sizes` and `entropies` must have the same length, got {n.size} and {hv.size}"
        )
    if n.size < 3:
        raise ValueError(f"need at least 3 points to fit 3 parameters, got {n.size}")
    if np.any(n <= 0) or not np.all(np.isfinite(hv)):
        raise ValueError("`sizes` must be positive and `entropies` finite")
    order = np.argsort(n)
    n, hv = n[order], hv[order]
    if discard > 0 and n.size >= 2 * discard + 3:
        n, hv = n[discard:-discard], hv[discard:-discard]
    grid = np.concatenate([[0.0], np.geomspace(1e-4, c_max, 120)])
    sse = np.array([_fit_ab(n, hv, c)[2] for c in grid])
    k = int(np.argmin(sse))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c1, c2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    f1, f2 = _fit_ab(n, hv, c1)[2], _fit_ab(n, hv, c2)[2]
    for _ in range(80):
        if f1 < f2:
            hi, c2, f2 = c2, c1, f1
            c1 = hi - ratio * (hi - lo)
            f1 = _fit_ab(n, hv, c1)[2]
        else:
            lo, c1, f1 = c1, c2, f2
            c2 = lo + ratio * (hi - lo)
            f2 = _fit_ab(n, hv, c2)[2]
    candidates = [(grid[k], sse[k]), (c1, f1), (c2, f2)]
    c_best = min(candidates, key=lambda t: t[1])[0]
    a, b, s = _fit_ab(n, hv, float(c_best))
    return AsymptoteFit(a, a, b, float(c_best), math.sqrt(s / n.size), int(n.size))


def information_gap(curve: LearningCurve, fit: AsymptoteFit | None = None) -> torch.Tensor:
    """Information gap ``H_inf - H(N)`` along a learning curve.

    Args:
        curve: from :func:`entropy_learning_curve` (scalar ``h``).
        fit: an asymptote fit; default :func:`fit_entropy_asymptote` of ``curve``.

    Returns:
        ``[m]`` gaps (nats) for ``curve.sizes``; the last entry is the gap of the full set
        when the curve ends at ``n``.
    """
    if curve.mean.ndim != 1:
        raise ValueError("`curve` must come from a scalar bandwidth (mean of shape [m])")
    if fit is None:
        fit = fit_entropy_asymptote(curve.sizes, curve.mean)
    return fit.h_inf - curve.mean.detach()
