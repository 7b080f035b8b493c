"""The kernel-sum engine as an internal API for the other stages of ``quests_torch``.

The public entry points (:func:`quests_torch.kde.log_kernel_sum` and friends) cover users;
the stages built on the engine (metrics, compression, uncertainty, screening, distributed)
need a little more: the argument names of their own callers in error messages, a checked
descriptor source without a kernel pass, and for the sharded sums the sweeps themselves.
These are the names they may import; everything else in :mod:`quests_torch.kde` is private
to the package.

Inputs and problems:

* :class:`Source` -- a checked ``[n, d]`` descriptor set (tensor on any device, numpy
  array or memmap streamed tile by tile); ``Source(x, "x").n`` is the row count.
* :func:`compute_device` -- the one device the sources live on (mixing is an error).
* :func:`as_log_weights` -- ``log_weights`` as a 1-D tensor (or ``None``).
* :class:`Problem` -- sources checked (NaN/inf, magnitude), centred on the references' mean
  and augmented for the tile GEMM, plus the tile sizes from the memory budget.
  ``mu``, ``offsets`` and ``pin`` make it a block of a larger problem (sharded sums);
  ``owned`` restricts its triangular sweep to some row tiles.
* :func:`check_pair`, :func:`check_log_weights_shape`, :func:`input_dtypes` -- the checks
  :class:`Problem` makes, for a caller that plans before building one.
* :data:`SWEEP_OPTIONS`, :func:`check_sweep_options` -- the keywords of a sweep's numerics
  and tiles (``dtype``, ``centre``, ``distance``, ``tile_size``, ``budget``, ``device``), which
  the front ends take as ``**options`` and pass to :class:`Problem`.
* :class:`Groups` -- a pair mask for per-group sums (rows and columns sorted by label).

Sweeps (each runs on the tile iterator :func:`spans`; call them inside
:func:`full_precision` and ``torch.no_grad()``):

* :func:`sweep_plain` -- unshifted sums (triangular when ``x is y``), optional top-k.
* :func:`far_rows` -- the rows whose plain sums are too small for the floor clamp to be
  negligible (one host sync); :func:`sweep_shifted` recomputes them with the online
  log-sum-exp.
* :func:`forward` -- both, with out-of-memory retries (:func:`retry_on_oom`).

Calls with caller-chosen argument names:

* :func:`named_kernel_pass`, :func:`named_nearest_neighbors`,
  :func:`named_first_match_within` -- :func:`quests_torch.kde.kernel_pass`,
  :func:`~quests_torch.kde.nearest_neighbors` and :func:`~quests_torch.kde.first_match_within`
  with ``names=(name_of_x, name_of_y)`` for the error messages (``kernel_pass`` also takes
  ``groups`` and ``want_sums``).
* :func:`progress_callback`, :func:`progress_ticker` -- ``progress`` (bool or callable)
  as ``(callback(done, total), bar)`` or ``(tick(done), bar)``.
* :func:`wide_tile_columns`, :func:`wide_spans`, :func:`augment` -- the wide ``[m, cols]``
  tiles of running sums and mean distances (``[m, d + 2] x [d + 2, n]`` GEMMs of
  augmented rows) and their tile iterator.
"""

from __future__ import annotations

from .._precision import full_precision
from .api import named_first_match_within, named_kernel_pass, named_nearest_neighbors
from .problem import (
    SWEEP_OPTIONS,
    Groups,
    KernelSums,
    Problem,
    augment,
    check_log_weights_shape,
    check_pair,
    check_sweep_options,
    input_dtypes,
)
from .source import (
    ArrayLike,
    Bandwidth,
    Source,
    as_log_weights,
    compute_device,
    progress_callback,
    progress_ticker,
)
from .sweeps import far_rows, forward, sweep_plain, sweep_shifted
from .tiles import retry_on_oom, spans, wide_spans, wide_tile_columns

__all__ = [
    "SWEEP_OPTIONS",
    "ArrayLike",
    "Bandwidth",
    "Groups",
    "KernelSums",
    "Problem",
    "Source",
    "as_log_weights",
    "augment",
    "check_log_weights_shape",
    "check_pair",
    "check_sweep_options",
    "compute_device",
    "far_rows",
    "forward",
    "full_precision",
    "input_dtypes",
    "named_first_match_within",
    "named_kernel_pass",
    "named_nearest_neighbors",
    "progress_callback",
    "progress_ticker",
    "retry_on_oom",
    "spans",
    "sweep_plain",
    "sweep_shifted",
    "wide_spans",
    "wide_tile_columns",
]
