"""Tiled Gaussian kernel sums in log space: the only place that knows about tiles and precision.

Layout of the package (one engine: every kernel sum goes through :class:`~.problem.Problem`
and the tile iterator :func:`~.tiles.spans`):

* :mod:`.source` -- descriptor sources (tensor, numpy, memmap), device resolution, weights.
* :mod:`.tiles` -- the tile plan: default sizes from the memory budget, the tile iterator,
  out-of-memory retries with halved tiles.
* :mod:`.problem` -- the prepared problem: checks, centring, augmented GEMM blocks.
* :mod:`.fused` -- the fused Triton kernel sums (every pair in registers, an online
  log-sum-exp per row), chosen by ``QUESTS_TORCH_KERNEL=triton``; the torch path below stays
  the default and the reference.
* :mod:`.epilogue`, :mod:`.topk` -- what one tile does after its GEMM (``exp`` and sums,
  nearest references).
* :mod:`.sweeps` -- plain/triangular and shifted sweeps, the forward driver (far-row rescue)
  and the tile-recomputing backward.
* :mod:`.api`, :mod:`.prepared`, :mod:`.blocks`, :mod:`.running` -- the entry points below.
* :mod:`.engine` -- the documented internal API used by the other stages of the package
  (metrics, compression, distributed): the only names they import from here.

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
  run as one ``torch.compile``-d function (:func:`.epilogue.exp_sums`, one pass over the tile
  instead of 3-5), on every device. Off by default until a GPU run measures it (compiling costs tens
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
half of :func:`quests_torch._memory.memory_budget`; otherwise the sweeps keep a row panel of as
many row tiles as that half allows and stream the references in column panels, each read once
per row panel (``ceil(n / row panel)`` passes, not one per row tile), in the source's own dtype
(a float32 memmap moves 4 bytes a value; converted and centred on the device) and, on CUDA,
prefetched into pinned memory and copied on a side stream while the previous panel computes
(:mod:`quests_torch.kde.panels`). Tiles: on CPU cache-sized (default 1024 x 1024, the fastest
measured on a 2-core Zen 4 with 1 MB L2 per core), on CUDA as large as the budget allows up to
8192 x 8192 (16384-wide tiles measured no faster on an H200); a smaller budget shrinks them.
Results do not depend on the tile size beyond rounding (tested at 1e-12 relative), so a sweep
that raises ``torch.OutOfMemoryError`` is redone with tiles halved in each direction (after
``torch.cuda.empty_cache()``, with a ``RuntimeWarning``) down to 64 per side, below which a
``torch.OutOfMemoryError`` with advice is raised.

Nearest references (``n_nearest``, :func:`nearest_neighbors`): each tile keeps the blocks of
128 columns with the ``n`` largest maxima and picks the top ``n`` among them (exact, see
:func:`quests_torch.kde.topk.tile_top`); equal exponents go to the lower reference index.

Autograd
--------
:func:`log_kernel_sum` is differentiable with respect to ``x``, ``y`` and ``log_weights``
through a custom :class:`torch.autograd.Function` whose backward recomputes the tiles::

    d log p_i / d x_i = sum_j P_ij (y_j - x_i) / h^2,    P_ij = w_j K_ij / p_i  (softmax weights)

First derivatives only (``once_differentiable``); the bandwidth is a constant.
"""

from .._precision import full_precision
from ..checks import DEFAULT_BANDWIDTH
from . import engine as engine
from .api import first_match_within, kernel_pass, kernel_sum, log_kernel_sum, nearest_neighbors
from .blocks import GroupBlocks as GroupBlocks
from .blocks import grouped_log_kernel_sum
from .prepared import PreparedReferences
from .problem import KernelSums
from .running import RunningLogKernelSum
from .source import ArrayLike as ArrayLike
from .source import Bandwidth as Bandwidth
from .tiles import wide_tile_columns as wide_tile_columns

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
