"""Sampled estimates of the metrics with error bars, and the dataset summary.

``estimate_entropy``, ``estimate_diversity``, ``estimate_novelty`` and ``estimate_overlap``
take ``m`` uniformly sampled rows, each with its exact ``log p`` against all ``n`` (cost
``m n`` instead of ``n^2 / 2``), and return an :class:`~quests_torch.estimates.Estimate` with
a finite-population-corrected standard error (the statistics: :mod:`quests_torch.estimates`).
:func:`dataset_summary` gives ``H``, ``D`` and the overlaps of a set at once, exact or (with
``rows``) from these estimates. All are re-exported by :mod:`quests_torch.metrics`, their
public home.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from .checks import bind_arguments, check_bandwidths, check_generator, check_threshold
from .estimates import (
    Estimate,
    log_mean_exp_estimate,
    mean_estimate,
    resolve_rows,
    sample_rows,
    take_rows,
)
from .kde import DEFAULT_BANDWIDTH, ArrayLike, Bandwidth
from .kde.engine import Source, named_kernel_pass
from .metric_functions import diversity_from_log_p, entropy_from_log_p, overlap, self_log_p

__all__ = [
    "DatasetSummary",
    "check_summary_arguments",
    "dataset_summary",
    "estimate_diversity",
    "estimate_entropy",
    "estimate_novelty",
    "estimate_overlap",
]


def _scalar_h(h: Bandwidth, what: str) -> None:
    if check_bandwidths(h)[1]:
        raise ValueError(f"`h` must be a single bandwidth for {what}")


def _sampled_self_log_p(
    x: ArrayLike, h: Bandwidth, rows, generator, options
) -> tuple[torch.Tensor, int]:
    """Exact ``log p(x_i | X)`` of ``m`` uniformly sampled rows against all ``n``: ``([m], n)``.

    ``m = n`` takes the symmetric exact pass (``n^2 / 2`` pairs, the rows in order).
    """
    n = Source(x, "x").n
    m = resolve_rows(rows, n)
    with torch.no_grad():
        if m == n:
            return self_log_p(x, h, "x", options), n
        pick = sample_rows(n, m, check_generator(generator))
        return named_kernel_pass(take_rows(x, pick), x, h, names=("x", "x"), **options).log_p, n


def _entropy_estimate(log_p: torch.Tensor, n: int) -> Estimate:
    """``H = log n - mean_i log p_i`` from sampled ``log p_i`` (population ``n``)."""
    mean, se = mean_estimate(log_p, n, "entropy (log p)")
    return Estimate(math.log(n) - mean, se, int(log_p.shape[0]), n)


def _diversity_estimate(log_p: torch.Tensor, n: int) -> Estimate:
    """``D = log sum_i 1 / p_i = log n + log mean_i exp(-log p_i)`` from sampled ``log p_i``."""
    value, se = log_mean_exp_estimate(-log_p, n, "diversity (1/p)")
    return Estimate(math.log(n) + value, se, int(log_p.shape[0]), n)


def estimate_entropy(
    x: ArrayLike,
    h: float = DEFAULT_BANDWIDTH,
    rows: int | str | None = "auto",
    generator: torch.Generator | int | None = None,
    **options,
) -> Estimate:
    """Entropy from ``m`` uniformly sampled rows, each with its exact ``log p`` against all ``n``.

    ``H_S = log n - (1/m) sum_{i in S} log p(x_i | X)`` is unbiased for
    :func:`entropy`; its standard error is ``SE = (s / sqrt(m)) sqrt((n - m) / n)`` with ``s``
    the sample standard deviation of ``log p_i`` over ``S`` (sampling without replacement:
    the finite-population correction, equivalently ``sigma / sqrt(m) sqrt((n-m)/(n-1))``).
    Cost ``m n`` kernel evaluations instead of ``n^2 / 2``. ``m = n`` gives the exact value
    with ``stderr = 0``.

    Args:
        x: descriptors ``[n, d]`` (tensor, numpy array or memmap: only the sampled rows and
            the tiles of ``x`` are read).
        h: a single bandwidth (1/Å).
        rows: ``m`` in ``[2, n]`` (or ``n``); ``"auto"``: exact up to
            :data:`quests_torch.estimates.EXACT_MAX_ROWS` environments, else
            :data:`~quests_torch.estimates.AUTO_ROWS` rows; ``None``: exact.
        generator: CPU ``torch.Generator`` or int seed of the sample (``None``: random).
        **options: forwarded to :func:`quests_torch.kde.kernel_pass`.

    Returns:
        :class:`~quests_torch.estimates.Estimate` (nats); not differentiable.
    """
    _scalar_h(h, "estimate_entropy")
    return _entropy_estimate(*_sampled_self_log_p(x, h, rows, generator, options))


def estimate_diversity(x: ArrayLike, *args, **options) -> Estimate:
    """Diversity from ``m`` sampled rows (exact ``log p`` against all ``n``), delta method.

    ``D = log sum_i 1/p_i = log n + log u_bar`` with ``u_i = 1 / p(x_i | X)`` in ``(0, 1]``
    (``p_i >= 1``: the self term). The sample mean ``u_S`` is unbiased for ``u_bar`` with
    ``SE(u_S) = (s_u / sqrt(m)) sqrt((n - m) / n)``; ``D_S = log n + log u_S`` and, by the
    delta method (``d log u = du / u``)::

        SE(D_S) = SE(u_S) / u_S = s_u / (u_S sqrt(m)) * sqrt((n - m) / n)

    (computed with ``u_i`` scaled by ``exp(-max_S(-log p))``, which cancels). ``D_S`` is
    biased low by ``~SE^2 / 2``, negligible next to ``SE``. The normal interval needs
    ``u_S`` near normal: a few isolated environments (``u_i`` near 1 among many near 0, as
    in a thermal crystal) make ``u`` skewed and the interval undercovers until ``m > 25
    g1(u)^2`` (Cochran); an :class:`~quests_torch.estimates.EstimateWarning` says so.
    ``m = n`` gives the exact value with ``stderr = 0``.

    Args:
        x: descriptors ``[n, d]``.
        *args: ``h``, ``rows`` and ``generator``, as :func:`estimate_entropy`.
        **options: the keywords of :func:`estimate_entropy` (the same defaults and checks).

    Returns:
        :class:`~quests_torch.estimates.Estimate` (nats); not differentiable.
    """
    a = bind_arguments(estimate_entropy, "estimate_diversity", (x, *args), options)
    _scalar_h(a["h"], "estimate_diversity")
    sampled = _sampled_self_log_p(x, a["h"], a["rows"], a["generator"], a["options"])
    return _diversity_estimate(*sampled)


def estimate_novelty(
    y: ArrayLike,
    x: ArrayLike,
    h: float = DEFAULT_BANDWIDTH,
    threshold: float = 0.0,
    rows: int | str | None = "auto",
    generator: torch.Generator | int | None = None,
    **options,
) -> Estimate:
    """Novel fraction of ``y`` w.r.t. ``x`` from ``m`` sampled rows of ``y`` (exact dH).

    The fraction ``q_S`` of sampled ``y_i`` with ``dH(y_i | X) > threshold`` estimates
    :func:`novelty` without bias; binomial standard error with the finite-population
    correction, ``SE = sqrt(q_S (1 - q_S) / (m - 1)) sqrt((n_y - m) / n_y)``. Cost ``m n_x``.
    When no (or every) sampled row is novel ``SE = 0``: then ``3 / m`` (the rule of three)
    bounds the rarer fraction at 95 %.

    Args:
        y: test descriptors ``[n_y, d]`` (the rows sampled).
        x: reference descriptors ``[n_x, d]`` (all used).
        h: a single bandwidth (1/Å).
        threshold: dH above which an environment is novel (nats).
        rows: ``m`` (see :func:`estimate_entropy`; counted on ``y``).
        generator: CPU ``torch.Generator`` or int seed (``None``: random).
        **options: forwarded to :func:`quests_torch.kde.kernel_pass`.

    Returns:
        :class:`~quests_torch.estimates.Estimate` (a fraction).
    """
    _scalar_h(h, "estimate_novelty")
    threshold = check_threshold(threshold)
    n = Source(y, "y").n
    m = resolve_rows(rows, n)
    sub = y if m == n else take_rows(y, sample_rows(n, m, check_generator(generator)))
    with torch.no_grad():
        dh = -named_kernel_pass(sub, x, h, names=("y", "x"), **options).log_p
    value, se = mean_estimate(dh > threshold, n, "novelty/overlap")
    return Estimate(value, se, m, n)


def estimate_overlap(y: ArrayLike, x: ArrayLike, *args, **options) -> Estimate:
    """Covered fraction of ``y`` by ``x``: ``1 - estimate_novelty`` (same error bar).

    Args:
        y: test descriptors ``[n_y, d]`` (the rows sampled).
        x: reference descriptors ``[n_x, d]`` (all used).
        *args: ``h``, ``threshold``, ``rows`` and ``generator``, as :func:`estimate_novelty`.
        **options: the keywords of :func:`estimate_novelty` (the same defaults and checks).

    Returns:
        :class:`~quests_torch.estimates.Estimate` (a fraction).
    """
    est = estimate_novelty(y, x, *args, **options)
    return est._replace(value=1.0 - est.value)


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------


class DatasetSummary(NamedTuple):
    """Summary of a descriptor set (see :func:`dataset_summary`).

    Attributes:
        n: number of environments.
        entropy: ``H`` (nats), 0-d tensor (the estimate's value when sampled).
        log_n: ``log n``, the maximum entropy (nats).
        diversity: ``D`` (nats), 0-d tensor.
        overlap: fraction of ``x`` covered by ``other`` (``dH(x | other) <= threshold``) or
            ``None``.
        overlap_other: fraction of ``other`` covered by ``x``, or ``None``.
        estimates: ``None`` when exact; when rows were sampled, the
            :class:`~quests_torch.estimates.Estimate` of each sampled metric by name
            (``"entropy"``, ``"diversity"``, ``"overlap"``, ``"overlap_other"``).
    """

    n: int
    entropy: torch.Tensor
    log_n: float
    diversity: torch.Tensor
    overlap: torch.Tensor | None
    overlap_other: torch.Tensor | None
    estimates: dict[str, Estimate] | None = None

    @classmethod
    def from_log_p(
        cls,
        log_p: torch.Tensor,
        overlap: torch.Tensor | None = None,
        overlap_other: torch.Tensor | None = None,
    ) -> DatasetSummary:
        """The exact summary from ``log p(x_i | X)`` of every row (and the overlaps).

        Args:
            log_p: ``[n]`` log kernel sums of the set against itself.
            overlap: fraction of ``x`` covered by ``other``, or ``None``.
            overlap_other: fraction of ``other`` covered by ``x``, or ``None``.

        Returns:
            :class:`DatasetSummary` without estimates.
        """
        n = int(log_p.shape[0])
        h_x, d_x = entropy_from_log_p(log_p), diversity_from_log_p(log_p)
        return cls(n, h_x, math.log(n), d_x, overlap, overlap_other)


def check_summary_arguments(h: object, threshold: object) -> float:
    """The checks of :func:`dataset_summary`: one bandwidth, a finite threshold (returned).

    Args:
        h: the bandwidth (1/Å).
        threshold: the dH threshold of the overlaps (nats).

    Returns:
        ``threshold`` as a float.
    """
    threshold = check_threshold(threshold)
    _scalar_h(h, "dataset_summary")
    return threshold


def _other_rows(rows, n_other: int):
    """``rows`` for the second set of a summary: an int is capped at its size."""
    if isinstance(rows, numbers.Integral) and not isinstance(rows, bool):
        return min(int(rows), n_other)
    return rows


def dataset_summary(
    x: ArrayLike,
    h: float = DEFAULT_BANDWIDTH,
    other: ArrayLike | None = None,
    threshold: float = 0.0,
    rows: int | str | None = None,
    generator: torch.Generator | int | None = None,
    **options,
) -> DatasetSummary:
    """Size, entropy, ``log n`` and diversity of ``x`` and, with ``other``, overlaps both ways.

    ``H`` and ``D`` share one kernel pass. Exact by default (``rows=None``). With ``rows``
    (an int, or ``"auto"``: exact up to :data:`quests_torch.estimates.EXACT_MAX_ROWS`
    environments, :data:`~quests_torch.estimates.AUTO_ROWS` sampled rows above), ``H``, ``D``
    and the overlaps are estimated from sampled rows as in :func:`estimate_entropy`,
    :func:`estimate_diversity` and :func:`estimate_overlap` (``H`` and ``D`` from the same
    rows; an int ``rows`` is capped at the size of ``other`` for ``overlap_other``) and
    ``estimates`` holds their error bars; ``rows = n`` is exact.

    Args:
        x: descriptors ``[n, d]``.
        h: bandwidth (1/Å).
        other: optional second dataset ``[m, d]``.
        threshold: dH threshold of the overlaps (see :func:`novelty`).
        rows: ``None`` (exact), an int or ``"auto"``.
        generator: CPU ``torch.Generator`` or int seed of the samples (``None``: random).
        **options: forwarded to :func:`quests_torch.kde.kernel_pass`.

    Returns:
        :class:`DatasetSummary`.
    """
    threshold = check_summary_arguments(h, threshold)
    n = Source(x, "x").n
    if resolve_rows(rows, n) < n:
        gen = check_generator(generator)
        log_p, _ = _sampled_self_log_p(x, h, rows, gen, options)
        est = {"entropy": _entropy_estimate(log_p, n), "diversity": _diversity_estimate(log_p, n)}
        if other is not None:
            n_other = Source(other, "other").n
            est["overlap"] = estimate_overlap(x, other, h, threshold, rows, gen, **options)
            est["overlap_other"] = estimate_overlap(
                other, x, h, threshold, _other_rows(rows, n_other), gen, **options
            )

        def t(name: str) -> torch.Tensor | None:
            if name not in est:
                return None
            return torch.tensor(est[name].value, dtype=log_p.dtype, device=log_p.device)

        return DatasetSummary(
            n,
            t("entropy"),
            math.log(n),
            t("diversity"),
            t("overlap"),
            t("overlap_other"),
            est,
        )
    ov = ov_other = None
    if other is not None:
        ov = overlap(x, other, h, threshold, **options)
        ov_other = overlap(other, x, h, threshold, **options)
    return DatasetSummary.from_log_p(self_log_p(x, h, "x", options), ov, ov_other)
