"""The metrics as pure functions of descriptor sets: entropy, diversity, dH, overlap,
novelty, per-structure entropies, duplicates and the bandwidth rule.

The formulas, shapes and options are those of :mod:`quests_torch.metrics`, the public module,
which re-exports these functions with the sampled estimates
(:mod:`quests_torch.metric_estimates`) and the learning curves
(:mod:`quests_torch.learning_curve`). They live here, below both, so that the estimates and the
curves build on them without importing the module that re-exports them (no import circle).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
import torch

from .checks import check_bandwidths, check_threshold
from .kde import (
    DEFAULT_BANDWIDTH,
    ArrayLike,
    Bandwidth,
    grouped_log_kernel_sum,
)
from .kde.engine import (
    Source,
    named_first_match_within,
    named_kernel_pass,
    named_nearest_neighbors,
)
from .structures import resolve_device, segment_sum

__all__ = [
    "Duplicates",
    "approx_delta_entropy",
    "bandwidth",
    "delta_entropy",
    "diversity",
    "diversity_from_log_p",
    "entropy",
    "entropy_from_log_p",
    "entropy_per_structure",
    "find_duplicates",
    "fraction_above",
    "novelty",
    "overlap",
    "self_log_p",
]


# --------------------------------------------------------------------------------------------
# dataset metrics
# --------------------------------------------------------------------------------------------


def self_log_p(x: ArrayLike, h: Bandwidth, name: str, options: dict) -> torch.Tensor:
    """``log p(x_i | X)`` of every row of ``x`` against the whole set (self included).

    Args:
        x: descriptors ``[n, d]``.
        h: bandwidth (1/Å) or a 1-D sequence of bandwidths.
        name: the name of ``x`` in error messages.
        options: the options of :func:`quests_torch.kde.kernel_pass`.

    Returns:
        ``[n]``, or ``[n, n_h]`` for a vector ``h``.
    """
    return named_kernel_pass(x, x, h, names=(name, name), **options).log_p


def entropy_from_log_p(log_p: torch.Tensor) -> torch.Tensor:
    r"""Entropy from the log kernel sums of a set against itself.

    ``H = -(1/n) sum_i log(p_i / n) = log n - mean_i log p_i`` (nats), where
    ``log p_i = log sum_j K(x_i, x_j)`` over all n rows (self-pair included).

    Args:
        log_p: ``[n]`` or ``[n, n_h]`` (one column per bandwidth).

    Returns:
        0-d, or ``[n_h]``.
    """
    n = log_p.shape[0]
    return math.log(n) - log_p.mean(0)


def diversity_from_log_p(log_p: torch.Tensor) -> torch.Tensor:
    r"""Diversity from the log kernel sums of a set against itself.

    ``D = log sum_i 1 / p_i`` (nats), with ``p_i = sum_j K(x_i, x_j)``, computed as a
    log-sum-exp of ``-log p_i`` so it never overflows.

    Args:
        log_p: ``[n]`` or ``[n, n_h]``.

    Returns:
        0-d, or ``[n_h]``.
    """
    return torch.logsumexp(-log_p, dim=0)


def entropy(x: ArrayLike, h: Bandwidth = DEFAULT_BANDWIDTH, **options) -> torch.Tensor:
    """Information entropy of a descriptor set (nats).

    ``H(X) = -(1/n) sum_i log(p(x_i | X) / n) = log n - mean_i log p(x_i | X)``, with
    ``p(x_i | X) = sum_j exp(-|x_i - x_j|^2 / (2 h^2))`` including ``j = i``;
    ``0 <= H <= log n`` (0 for identical environments, ``log n`` for mutually distant ones).

    Args:
        x: descriptors ``[n, d]``.
        h: bandwidth (1/Å) or a 1-D sequence of bandwidths.
        **options: forwarded to :func:`quests_torch.kde.kernel_pass`.

    Returns:
        0-d tensor, or ``[n_h]`` for a vector ``h``.
    """
    return entropy_from_log_p(self_log_p(x, h, "x", options))


def diversity(x: ArrayLike, h: Bandwidth = DEFAULT_BANDWIDTH, **options) -> torch.Tensor:
    """Diversity of a descriptor set: ``D(X) = log sum_i 1 / p(x_i | X)`` (nats).

    ``exp(D)`` approximates the number of distinct environments at resolution ``h``;
    ``0 <= D <= log n``. Arguments and result as :func:`entropy`.
    """
    return diversity_from_log_p(self_log_p(x, h, "x", options))


def delta_entropy(
    y: ArrayLike, x: ArrayLike, h: Bandwidth = DEFAULT_BANDWIDTH, **options
) -> torch.Tensor:
    """Differential entropy of test environments w.r.t. a reference set.

    ``dH(y_i | X) = -log p(y_i | X) = -log sum_j exp(-|y_i - x_j|^2 / (2 h^2))`` (not divided
    by ``n``). ``dH > 0``: ``y_i`` is novel (extrapolation); ``dH <= 0``: covered. Computed
    with a log-sum-exp, so it stays finite (and accurate) for arbitrarily distant outliers,
    where ``exp`` underflows.

    Args:
        y: test descriptors ``[n_y, d]``.
        x: reference descriptors ``[n_x, d]``.
        h: bandwidth (1/Å) or a 1-D sequence of bandwidths.
        **options: forwarded to :func:`quests_torch.kde.kernel_pass`.

    Returns:
        ``[n_y]``, or ``[n_y, n_h]`` for a vector ``h``.
    """
    return -named_kernel_pass(y, x, h, names=("y", "x"), **options).log_p


def fraction_above(dh: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fraction of rows with ``dH > threshold`` (per bandwidth column for a vector ``h``).

    Args:
        dh: ``[n]`` or ``[n, n_h]`` differential entropies (nats).
        threshold: dH above which a row counts (nats).

    Returns:
        0-d, or ``[n_h]``, in ``dh``'s dtype.
    """
    return (dh > threshold).to(dh.dtype).mean(0)


def novelty(
    y: ArrayLike,
    x: ArrayLike,
    h: Bandwidth = DEFAULT_BANDWIDTH,
    threshold: float = 0.0,
    **options,
) -> torch.Tensor:
    """Fraction of test environments that are novel: ``mean_i [dH(y_i | X) > threshold]``.

    The paper's criterion is ``threshold = 0``; the reference CLI uses ``1e-5``.

    Args:
        y: test descriptors ``[n_y, d]``.
        x: reference descriptors ``[n_x, d]``.
        h: bandwidth (1/Å) or a 1-D sequence of bandwidths.
        threshold: dH above which an environment counts as novel (nats).
        **options: forwarded to :func:`quests_torch.kde.kernel_pass`.

    Returns:
        0-d tensor in ``[0, 1]`` (``[n_h]`` for a vector ``h``); not differentiable.
    """
    threshold = check_threshold(threshold)
    with torch.no_grad():
        return fraction_above(delta_entropy(y, x, h, **options), threshold)


def overlap(y: ArrayLike, x: ArrayLike, *args, **options) -> torch.Tensor:
    """Fraction of test environments covered by the reference: ``1 - novelty(y, x)``.

    ``overlap(x, x) == 1`` since ``dH(x_i | X) <= 0`` for every member of ``X``.

    Args:
        y: test descriptors ``[n_y, d]``.
        x: reference descriptors ``[n_x, d]``.
        *args: ``h`` and ``threshold``, as :func:`novelty`.
        **options: the keywords of :func:`novelty` (the same defaults and checks).

    Returns:
        0-d tensor in ``[0, 1]`` (``[n_h]`` for a vector ``h``).
    """
    return 1.0 - novelty(y, x, *args, **options)


def approx_delta_entropy(
    y: ArrayLike,
    x: ArrayLike,
    h: Bandwidth = DEFAULT_BANDWIDTH,
    n: int = 3,
    **options,
) -> torch.Tensor:
    """dH from the ``n`` nearest reference environments only.

    ``dH_n(y_i | X) = -log sum_{j in NN_n(y_i)} exp(-|y_i - x_j|^2 / (2 h^2)) >= dH(y_i | X)``.
    The neighbours are exact (running top-n over the same distance tiles as the kernel sums,
    no approximate index), the distances are recomputed by explicit differences, and the
    result is differentiable w.r.t. ``y`` and ``x``. Finite for far outliers. A kernel term
    that is 1 in the dtype (a reference equal to ``y_i`` up to rounding) counts as exactly 1,
    as in the exact kernel sums: a duplicate's ``dH_n`` is ``<= 0``, never rounding noise
    above 0.

    Args:
        y: test descriptors ``[n_y, d]``.
        x: reference descriptors ``[n_x, d]`` with ``n_x >= n``.
        h: bandwidth (1/Å) or a 1-D sequence of bandwidths.
        n: number of nearest references.
        **options: ``dtype``, ``centre``, ``tile_size``, ``budget``, ``device``, ``progress``.

    Returns:
        ``[n_y]``, or ``[n_y, n_h]`` for a vector ``h``.
    """
    hs, vector = check_bandwidths(h)
    dist, _ = named_nearest_neighbors(y, x, n, names=("y", "x"), **options)
    h_t = torch.tensor(hs, dtype=dist.dtype, device=dist.device)
    expo = -dist.square()[:, :, None] / (2.0 * h_t**2)  # [n_y, n, n_h]
    return _neg_log_sum_exp(expo) if vector else _neg_log_sum_exp(expo)[:, 0]


def _neg_log_sum_exp(expo: torch.Tensor) -> torch.Tensor:
    """``-log sum_j exp(expo[:, j])`` over dim 1, shifted by the largest exponent ``m``
    (finite for far outliers) unless ``exp(m)`` is 1 in the dtype: then the kernel terms are
    summed unshifted, as the exact kernel sums evaluate them, so a reference that duplicates
    a row up to rounding (``0 < |m| < eps/2``) contributes exactly 1 and its dH carries no
    positive rounding noise (``dH > 0`` would count the duplicate as novel)."""
    m = expo.amax(1, keepdim=True)
    shift = torch.where(torch.exp(m.detach()) == 1.0, torch.zeros_like(m), m)
    return -(torch.log(torch.exp(expo - shift).sum(1)) + shift[:, 0])


# --------------------------------------------------------------------------------------------
# per-structure entropy
# --------------------------------------------------------------------------------------------


def _as_index(system_idx, n: int, device) -> torch.Tensor:
    if isinstance(system_idx, np.ndarray):
        system_idx = torch.from_numpy(system_idx)
    if not isinstance(system_idx, torch.Tensor):
        raise TypeError(
            f"`system_idx` must be an integer tensor [n], got {type(system_idx).__name__}"
        )
    if system_idx.dtype.is_floating_point or system_idx.dtype == torch.bool:
        raise TypeError(f"`system_idx` must hold integers, got {system_idx.dtype}")
    if system_idx.shape != (n,):
        raise ValueError(
            f"`system_idx` must have shape ({n},) like the rows of `x`, "
            f"got {tuple(system_idx.shape)}"
        )
    idx = system_idx.to(device=device, dtype=torch.long)
    if bool((idx < 0).any()):
        raise ValueError("`system_idx` must be non-negative")
    return idx


def entropy_per_structure(
    x: ArrayLike,
    system_idx: torch.Tensor | np.ndarray,
    h: Bandwidth = DEFAULT_BANDWIDTH,
    n_systems: int | None = None,
    **options,
) -> torch.Tensor:
    """Entropy of each structure's own environments.

    For structure ``s`` with environments ``X_s`` (``n_s`` of them)::

        H_s = -(1/n_s) sum_{i in s} log(p(x_i | X_s) / n_s)

    Only pairs within one structure are evaluated: structures with the same number of
    environments are stacked and evaluated together (batched GEMMs, see
    :func:`quests_torch.kde.grouped_log_kernel_sum`), so the number of kernels grows with the
    number of distinct structure sizes, not with the number of structures.

    Args:
        x: descriptors ``[n, d]`` of all environments of all structures.
        system_idx: ``[n]`` structure index of each environment, ``0 <= s < n_systems``
            (any order).
        h: bandwidth (1/Å) or a 1-D sequence of bandwidths.
        n_systems: number of structures; default ``max(system_idx) + 1``.
        **options: forwarded to :func:`quests_torch.kde.kernel_pass`.

    Returns:
        ``[n_systems]`` (``[n_systems, n_h]`` for a vector ``h``); NaN for structures without
        environments.
    """
    src = Source(x, "x")
    device = resolve_device(options.get("device"), inputs=[("x", src.device)], default="cpu")
    idx = _as_index(system_idx, src.n, device)
    n_sys = int(idx.max()) + 1 if n_systems is None else int(n_systems)
    if n_systems is not None and int(idx.max()) >= n_sys:
        raise ValueError(f"`system_idx` has values >= `n_systems` ({n_sys})")
    counts = torch.bincount(idx, minlength=n_sys).cpu().numpy()
    # structures ranked by (environment count, index): equal sizes become consecutive groups,
    # evaluated together as batched [G, n_s, n_s] tiles (kernels independent of their number)
    by_size = np.argsort(counts, kind="stable")
    rank = np.empty(n_sys, dtype=np.int64)
    rank[by_size] = np.arange(n_sys)
    rank_t = torch.from_numpy(rank).to(device)
    label = rank_t.index_select(0, idx)
    order = torch.sort(label, stable=True).indices
    groups_sorted = label.index_select(0, order)
    if isinstance(x, torch.Tensor):
        xs = x.index_select(0, order)
    else:
        xs = np.ascontiguousarray(x[order.cpu().numpy()])
    sizes = counts[by_size]
    log_p = grouped_log_kernel_sum(xs, sizes, h, **options)
    vector = log_p.ndim == 2
    lp = log_p if vector else log_p[:, None]
    sums = segment_sum(lp, groups_sorted.to(lp.device), n_sys, is_sorted=True)
    cnt = torch.from_numpy(sizes).to(device=lp.device, dtype=lp.dtype)[:, None]
    h_s = (torch.log(cnt) - sums / cnt).index_select(0, rank_t.to(lp.device))  # NaN: empty
    return h_s if vector else h_s[:, 0]


# --------------------------------------------------------------------------------------------
# duplicates and bandwidth
# --------------------------------------------------------------------------------------------


class Duplicates(NamedTuple):
    """Environments that repeat an earlier one (see :func:`find_duplicates`).

    Attributes:
        index: ``[n_dup]`` ascending indices ``i`` with an earlier environment within ``tol``.
        first: ``[n_dup]`` for each, the smallest such earlier index ``j < i``.
    """

    index: torch.Tensor
    first: torch.Tensor


def find_duplicates(x: ArrayLike, tol: float = 1e-5, **options) -> Duplicates:
    """Find environments within ``tol`` (descriptor distance) of an earlier environment.

    ``i`` is a duplicate when ``min_{j < i} |x_i - x_j| <= tol``; keeping the rows not in
    ``index`` leaves one representative of each group of near-identical environments (the
    upstream ``find_equal`` uses ``1e-5`` too).

    Args:
        x: descriptors ``[n, d]``.
        tol: distance tolerance ``> 0``.
        **options: ``tile_size``, ``budget``, ``device``.

    Returns:
        :class:`Duplicates` (int64 tensors).
    """
    first = named_first_match_within(x, None, tol, **options)
    index = torch.nonzero(first >= 0).squeeze(1)
    return Duplicates(index, first[index])


def _cutoff_weight(r, rc: float):
    z = (torch.clamp(r, max=rc) if isinstance(r, torch.Tensor) else min(r, rc)) / rc
    return (1.0 - z**2) ** 2


def bandwidth(volume: float | torch.Tensor, method: str = "gaussian") -> float | torch.Tensor:
    """Bandwidth rule from the volume per atom ``V`` (Å^3/atom).

    * ``"gaussian"``: ``h = 0.0897141 exp(-0.5 (V / 10.896)^2) + 0.0119417``
    * ``"cutoff"``: ``h = 0.086164 w((ln V)^2; r_c = 11.61172) + 0.016`` with
      ``w(r; r_c) = (1 - (min(r, r_c)/r_c)^2)^2``

    Args:
        volume: volume per atom ``> 0``: a float or a tensor (elementwise, differentiable).
        method: ``"gaussian"`` or ``"cutoff"``.

    Returns:
        ``h`` in 1/Å, a float for a float input, else a tensor like ``volume``.
    """
    if method not in ("gaussian", "cutoff"):
        raise ValueError(f"`method` must be 'gaussian' or 'cutoff', got {method!r}")
    if isinstance(volume, torch.Tensor):
        if not volume.dtype.is_floating_point:
            volume = volume.to(torch.get_default_dtype())
        if not bool((volume > 0).all()) or not bool(torch.isfinite(volume).all()):
            raise ValueError("`volume` must be positive and finite")
        if method == "gaussian":
            return 0.0897141 * torch.exp(-0.5 * (volume / 10.896) ** 2) + 0.0119417
        return 0.086164 * _cutoff_weight(torch.log(volume) ** 2, 11.61172) + 0.016
    if isinstance(volume, bool) or not isinstance(volume, numbers.Real):
        raise TypeError(f"`volume` must be a float or a tensor, got {type(volume).__name__}")
    if not math.isfinite(volume) or volume <= 0:
        raise ValueError(f"`volume` must be positive and finite, got {volume}")
    if method == "gaussian":
        return 0.0897141 * math.exp(-0.5 * (volume / 10.896) ** 2) + 0.0119417
    return 0.086164 * _cutoff_weight(math.log(volume) ** 2, 11.61172) + 0.016
