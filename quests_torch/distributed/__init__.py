"""Several processes, GPUs and nodes: the kernel sums, metrics, descriptors and screening
sharded with :mod:`torch.distributed` (NCCL on GPUs, gloo on CPUs, launched with ``torchrun``).

Every public function here has the signature of its single-process counterpart and, when no
process group is initialised (or the world has one rank), simply calls it: the same code runs
under ``python`` and under ``torchrun --nproc-per-node N``. With ``W > 1`` ranks each rank
computes a share and the shares are combined with collectives; **every rank returns the whole
result** (the same tensor on every rank). The inputs (descriptor tensors, numpy arrays or
``np.memmap`` files) must be the same on every rank; each rank reads only the rows it needs.

Kernel sums ``log p(x_i | Y) = log sum_j exp(-|x_i - y_j|^2 / (2 h^2))`` are split three ways
(``shard=`` option; ``"auto"`` picks by size):

* ``"tiles"`` (an unweighted set against itself, entropy/diversity; ``"rows"`` otherwise): the
  upper triangle of square tiles of
  the single-process symmetric sweep is dealt out to the ranks (row blocks ``b`` and
  ``B - 1 - b`` paired, so every pair costs ``B + 1`` tiles), each rank accumulates row and
  column sums of its tiles, and the partial log sums are combined exactly across ranks::

      M_i = max_r log p_i^(r)                       (all_reduce MAX)
      S_i = sum_r exp(log p_i^(r) - M_i)            (all_reduce SUM)
      log p_i = M_i + log S_i

  Cost per rank ``n^2 / (2 W)`` pairs (the single process pays ``n^2 / 2``). Rows whose sum is
  too small for the clamped fast path (``dH`` above ~650 nats) are then recomputed exactly
  with the shifted online log-sum-exp, those rows split over the ranks.
* ``"rows"`` (queries): rank ``r`` takes the rows :func:`shard_range` of ``x`` against all of
  ``y``; the ``[n]`` results are all-gathered (padded to equal sizes for gloo) in order.
* ``"cols"`` (references too large for one device): rank ``r`` keeps only its block of
  reference rows resident, computes exact partial log sums of every query against it and the
  partials are combined with the cross-rank log-sum-exp above. Centring uses the global mean
  (all_reduce SUM), so the numbers are those of one process up to summation order.

``"auto"``: a set against itself uses ``"tiles"`` when the prepared set fits in half of the
device budget (:func:`quests_torch._memory.memory_budget`), else ``"cols"``; queries against
references use ``"rows"`` unless the references do not fit (or there are fewer than 64 query
rows per rank), then ``"cols"``. Results agree with one process to ~1e-15 relative in
float64 (tested at 1e-12); they differ only by the order of float64 additions.

Collectives run on the backend's device (``cuda:LOCAL_RANK`` for NCCL, CPU for gloo); results
are returned on the compute device of the inputs. The distributed paths are forward only
(``no_grad``): for gradients call :mod:`quests_torch.metrics` on each rank's own data.

Descriptors (:func:`get_descriptors`) are split by structure (contiguous blocks balanced by
atom count) and all-gathered in input order. Trajectory screening (:func:`screen_trajectory`)
gives each rank a contiguous block of the selected frames, screened by
:func:`quests_torch.screening.screen_trajectory` into its own part files with its own resume
state (``<table>.parts/``); after all ranks finish, rank 0 concatenates the parts, in frame
order, into the one table (and extxyz) atomically between two writes of the table's resume
state (one before, one marking it complete after), so a crash during the merge is resumed
by merging again and a later run with any number of ranks (or none) finds the screening
complete. Rank 0 holds the table's lock for the whole run; the resume rules are those of
:mod:`quests_torch.resume`, shared with the single-process screening.
"""

from __future__ import annotations

__all__ = [
    "comm_device",
    "dataset_summary",
    "delta_entropy",
    "diversity",
    "entropy",
    "entropy_learning_curve",
    "get_descriptors",
    "init_from_env",
    "is_distributed",
    "log_kernel_sum",
    "novelty",
    "overlap",
    "rank",
    "screen_trajectory",
    "shard_range",
    "world_size",
]

from .comm import comm_device, init_from_env, is_distributed, rank, shard_range, world_size
from .curves import entropy_learning_curve
from .descriptors import get_descriptors
from .kernels import (
    dataset_summary,
    delta_entropy,
    diversity,
    entropy,
    log_kernel_sum,
    novelty,
    overlap,
)
from .screening import screen_trajectory
