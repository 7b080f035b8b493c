"""Sampled estimates with error bars: the statistics behind ``metrics.estimate_*``.

The exact metrics need ``log p_i`` of every environment against all ``n`` (``n^2 / 2`` kernel
evaluations). A uniform random sample ``S`` of ``m`` rows drawn without replacement, each
with its exact ``log p_i`` against all ``n``, costs ``m n`` and gives unbiased means with a
central-limit error bar. For per-row values ``v_i`` (population of ``n``, sample ``S``)::

    v_S    = (1/m) sum_{i in S} v_i                            unbiased for the population mean
    s^2    = (1/(m-1)) sum_{i in S} (v_i - v_S)^2              sample variance
    SE     = (s / sqrt(m)) sqrt((n - m) / n)                   finite-population correction

(equivalently ``(sigma / sqrt(m)) sqrt((n - m) / (n - 1))`` with ``sigma`` the population
standard deviation). At ``m = n`` the sample is the population and ``SE = 0``. The 95 %
interval is ``value +- 1.96 SE``. The pure functions here take the sampled values; the kernel
sums and the metric formulas stay in :mod:`quests_torch.metrics`.

The normal interval needs the sample mean to be near normal. Cochran's rule for sampling
without replacement (*Sampling Techniques*, 1977, sec. 2.15) asks for ``m > 25 g1^2`` with
``g1`` the skewness of the values; an :class:`EstimateWarning` says when the sample's own
skewness breaks it (or when every sampled value is equal, so that ``SE = 0`` says nothing).
This matters for the diversity: ``u = 1/p`` of a thermal crystal is dominated by a few
isolated environments (skewness ~13 in the 300 K Cu test set, where ``m = 300`` of 768 rows
covers ``D`` in only ~86 % of samples, and the warning fires in 99 % of them).
"""

from __future__ import annotations

import math
import numbers
import warnings
from statistics import NormalDist
from typing import NamedTuple

import numpy as np
import torch

from .checks import check_integer

__all__ = [
    "AUTO_ROWS",
    "EXACT_MAX_ROWS",
    "Estimate",
    "EstimateWarning",
    "check_rows",
    "log_mean_exp_estimate",
    "mean_estimate",
    "resolve_rows",
    "sample_rows",
    "take_rows",
]

EXACT_MAX_ROWS = 200_000
"""``rows="auto"``: sets up to this many environments are computed exactly."""
AUTO_ROWS = 20_000
"""``rows="auto"``: rows sampled above :data:`EXACT_MAX_ROWS` (``SE ~ std(log p) / 141``)."""


class Estimate(NamedTuple):
    """A sampled estimate with its standard error (nats, or a fraction for overlaps).

    Attributes:
        value: the estimate (the exact value when ``rows == n``).
        stderr: its standard error, finite-population corrected (0 when ``rows == n``).
        rows: sampled rows ``m``.
        n: rows of the whole set.

    ``float(est)`` is ``est.value``; ``est.low``/``est.high`` bound the 95 % interval,
    :meth:`interval` gives other levels (normal approximation).
    """

    value: float
    stderr: float
    rows: int
    n: int

    def __float__(self) -> float:
        return float(self.value)

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """``value -+ z stderr`` with ``z`` the normal quantile of ``(1 + level) / 2``."""
        if not (isinstance(level, numbers.Real) and 0.0 < level < 1.0):
            raise ValueError(f"`level` must lie in (0, 1), got {level!r}")
        z = NormalDist().inv_cdf(0.5 + 0.5 * float(level))
        return self.value - z * self.stderr, self.value + z * self.stderr

    @property
    def low(self) -> float:
        """Lower end of the 95 % interval."""
        return self.interval()[0]

    @property
    def high(self) -> float:
        """Upper end of the 95 % interval."""
        return self.interval()[1]

    @property
    def exact(self) -> bool:
        """True when every row was used (``rows == n``)."""
        return self.rows == self.n

    def as_dict(self, level: float = 0.95) -> dict:
        """``value``, ``stderr``, ``rows``, ``n``, ``level``, ``low``, ``high`` (for JSON)."""
        low, high = self.interval(level)
        return {
            "value": self.value,
            "stderr": self.stderr,
            "rows": self.rows,
            "n": self.n,
            "level": level,
            "low": low,
            "high": high,
        }


def check_rows(rows, n: int, name: str = "rows") -> int:
    """``rows`` as an int in ``[1, n]`` (``[2, n]`` when sampling, for a variance).

    Raises ValueError naming the argument for non-integers (floats, bools, strings), values
    below 1 or above ``n``, and for ``rows = 1 < n`` (no variance from one row).
    """
    rows = check_integer(rows, name, error=ValueError, expected="an integer number of rows")
    if rows < 1:
        raise ValueError(f"`{name}` must be positive, got {rows}")
    if rows > n:
        raise ValueError(f"`{name}` must be at most n = {n} (the rows of the set), got {rows}")
    if rows == 1 and n > 1:
        raise ValueError(f"`{name}` must be at least 2 to estimate an error bar, got 1")
    return rows


def resolve_rows(rows, n: int, name: str = "rows") -> int:
    """Rows to sample from a set of ``n``: ``None`` -> ``n`` (exact); ``"auto"`` -> ``n`` up
    to :data:`EXACT_MAX_ROWS`, else :data:`AUTO_ROWS`; an int is checked by :func:`check_rows`.
    """
    if rows is None:
        return n
    if isinstance(rows, str):
        if rows != "auto":
            raise ValueError(f"`{name}` must be an int, 'auto' or None, got {rows!r}")
        return n if n <= EXACT_MAX_ROWS else min(AUTO_ROWS, n)
    return check_rows(rows, n, name)


def sample_rows(n: int, rows: int, generator: torch.Generator) -> torch.Tensor:
    """``rows`` distinct indices of ``range(n)``, uniform without replacement, ascending."""
    return torch.randperm(n, generator=generator)[:rows].sort().values


def take_rows(x, index: torch.Tensor):
    """Rows ``index`` of a tensor (on its device) or a numpy array / memmap (a copy)."""
    if isinstance(x, torch.Tensor):
        return x.index_select(0, index.to(x.device))
    return np.ascontiguousarray(x[index.numpy()])


class EstimateWarning(UserWarning):
    """A sampled estimate whose normal 95 % interval is not to be trusted (see module doc)."""


def _check_normal(v: torch.Tensor, n: int, what: str) -> None:
    """Warn when ``m < n`` and Cochran's ``m > 25 g1^2`` fails for the sample ``v``."""
    m = v.shape[0]
    if m >= n:
        return
    d = v - v.mean()
    var = float(d.square().mean())
    if var <= 0.0:
        warnings.warn(
            f"{what}: all {m} sampled values are equal, so the standard error is 0; for a "
            f"fraction, the other outcome is below 3/m = {3 / m:.2g} at 95 % (rule of three)",
            EstimateWarning,
            stacklevel=3,
        )
        return
    g1 = float(d.pow(3).mean()) / var**1.5
    if m < 25.0 * g1 * g1:
        warnings.warn(
            f"{what}: the sampled values are skewed (g1 = {g1:.1f}), the 95 % interval from "
            f"{m:,} rows may undercover; Cochran's rule asks for more than 25 g1^2 = "
            f"{math.ceil(25.0 * g1 * g1):,} rows",
            EstimateWarning,
            stacklevel=3,
        )


def _fpc_stderr(values: torch.Tensor, n: int) -> float:
    m = values.shape[0]
    if m >= n:
        return 0.0
    s = float(values.std(correction=1))
    return s / math.sqrt(m) * math.sqrt((n - m) / n)


def mean_estimate(values: torch.Tensor, n: int, what: str = "estimate") -> tuple[float, float]:
    """Population mean of ``v`` from a sample without replacement: ``(v_S, SE)``.

    ``SE = (s / sqrt(m)) sqrt((n - m) / n)`` (module docstring); for 0/1 values this is the
    binomial proportion's ``sqrt(p (1 - p) / (m - 1)) sqrt((n - m) / n)``.

    Args:
        values: ``[m]`` sampled per-row values (computed in float64).
        n: population size ``>= m``.
        what: the name in an :class:`EstimateWarning`.
    """
    v = values.detach().to(torch.float64).flatten()
    _check_normal(v, n, what)
    return float(v.mean()), _fpc_stderr(v, n)


def log_mean_exp_estimate(
    values: torch.Tensor, n: int, what: str = "estimate"
) -> tuple[float, float]:
    """``log((1/n) sum_i exp(v_i))`` from a sample, by the delta method: ``(value, SE)``.

    With ``u_i = exp(v_i - c)`` (``c = max_S v``, for range; it cancels), ``u_S`` estimates
    the population mean ``u_bar`` without bias, and ``log u_S + c`` estimates ``log u_bar +
    c``. The delta method (``d log u / du = 1 / u``) gives::

        SE(log u_S) = SE(u_S) / u_S = (s_u / u_S) / sqrt(m) * sqrt((n - m) / n)

    with ``s_u`` the sample standard deviation of ``u`` (a coefficient of variation; ``c``
    cancels). The log of an unbiased mean is biased by ``-SE^2 / 2`` to leading order, second
    order in ``SE`` and negligible next to it. At ``m = n`` it is the exact log-mean-exp.

    Args:
        values: ``[m]`` sampled per-row values ``v_i``.
        n: population size ``>= m``.
        what: the name in an :class:`EstimateWarning` (checked on ``u``).
    """
    v = values.detach().to(torch.float64).flatten()
    c = float(v.max())
    u = torch.exp(v - c)
    _check_normal(u, n, what)
    u_mean = float(u.mean())
    return math.log(u_mean) + c, _fpc_stderr(u, n) / u_mean
