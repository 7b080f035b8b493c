"""Information metrics of descriptor sets: entropy, diversity, dH, overlap, summaries.

All metrics sit on the tiled kernel sums of :mod:`quests_torch.kde` with the Gaussian kernel
``K(x, y) = exp(-|x - y|^2 / (2 h^2))`` (``h`` in 1/Å, natural logarithms, nats)::

    p(x_i | Y)      = sum_j K(x_i, y_j)                     (Y = X for a dataset: self included)
    entropy    H(X) = -(1/n) sum_i log(p(x_i | X) / n)      0 <= H <= log n
    diversity  D(X) = log sum_i 1 / p(x_i | X)              0 <= D <= log n
    dH(y | X)       = -log p(y | X)                          > 0: y is novel w.r.t. X

Signatures put the test data first and the reference second (``delta_entropy(y, x)``).
Inputs are ``[n, d]`` torch tensors (any device; results stay there) or numpy arrays
(streamed, results on ``device``/CPU). Outputs are tensors in the input dtype and are
differentiable w.r.t. tensor descriptors (first derivatives). A vector of bandwidths gives one
result per bandwidth from a single pass over the distances (a trailing ``[n_h]`` dimension).
Extra keyword ``options`` (``dtype``, ``tile_size``, ``budget``, ``device``, ``progress``,
``centre``, ``distance``) are forwarded to :func:`quests_torch.kde.kernel_pass`.

Large sets: ``estimate_entropy``, ``estimate_diversity``, ``estimate_overlap`` and
``estimate_novelty`` (and ``rows=`` in ``dataset_summary`` / ``entropy_learning_curve``) take
``m`` uniformly sampled rows, each with its exact ``log p`` against all ``n`` (cost ``m n``
instead of ``n^2 / 2``), and return an :class:`~quests_torch.estimates.Estimate` with a
finite-population-corrected standard error (the statistics: :mod:`quests_torch.estimates`).

This module is the public face of the metrics: the functions live in
:mod:`quests_torch.metric_functions`, the estimates in :mod:`quests_torch.metric_estimates`
and the learning curves in :mod:`quests_torch.learning_curve`, each of which imports only the
modules below it.
"""

from __future__ import annotations

from .estimates import Estimate
from .learning_curve import (
    AsymptoteFit,
    LearningCurve,
    entropy_learning_curve,
    fit_entropy_asymptote,
    information_gap,
)
from .metric_estimates import (
    DatasetSummary,
    check_summary_arguments,
    dataset_summary,
    estimate_diversity,
    estimate_entropy,
    estimate_novelty,
    estimate_overlap,
)
from .metric_functions import (
    Duplicates,
    approx_delta_entropy,
    bandwidth,
    delta_entropy,
    diversity,
    diversity_from_log_p,
    entropy,
    entropy_from_log_p,
    entropy_per_structure,
    find_duplicates,
    fraction_above,
    novelty,
    overlap,
    self_log_p,
)

__all__ = [
    "AsymptoteFit",
    "DatasetSummary",
    "Duplicates",
    "Estimate",
    "LearningCurve",
    "approx_delta_entropy",
    "bandwidth",
    "check_summary_arguments",
    "dataset_summary",
    "delta_entropy",
    "diversity",
    "diversity_from_log_p",
    "entropy",
    "entropy_from_log_p",
    "entropy_learning_curve",
    "entropy_per_structure",
    "estimate_diversity",
    "estimate_entropy",
    "estimate_novelty",
    "estimate_overlap",
    "find_duplicates",
    "fit_entropy_asymptote",
    "fraction_above",
    "information_gap",
    "novelty",
    "overlap",
    "self_log_p",
]
