"""The process group and the collectives of the distributed paths (no-ops on one rank)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

_BACKEND_ENV = "QUESTS_TORCH_DIST_BACKEND"


# --------------------------------------------------------------------------------------------
# process group
# --------------------------------------------------------------------------------------------


def is_distributed() -> bool:
    """``True`` when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank (0 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Contiguous block ``[i0, i1)`` of ``n`` items owned by a rank.

    ``i0 = floor(r n / W)``, ``i1 = floor((r + 1) n / W)``: blocks in rank order, sizes differ
    by at most one, empty blocks when ``n < W``.

    Args:
        n: number of items.
        rank_: the rank (default this process's).
        world: the world size (default the current one).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"`n` must be a non-negative int, got {n!r}")
    w = world_size() if world is None else int(world)
    r = rank() if rank_ is None else int(rank_)
    if not 0 <= r < w:
        raise ValueError(f"`rank_` must lie in [0, {w}), got {r}")
    return r * n // w, (r + 1) * n // w


def shard_counts(n: int) -> list[int]:
    w = world_size()
    return [shard_range(n, r, w)[1] - shard_range(n, r, w)[0] for r in range(w)]


def comm_device() -> torch.device:
    """Device of the collectives: ``cuda:<current>`` for a pure NCCL group, else CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(backend: str | None = None, timeout: float | None = None) -> bool:
    """Initialise the default process group from ``torchrun``'s environment, if there is one.

    Does nothing (returns ``False``) when a group already exists or ``WORLD_SIZE`` is unset or
    1. Otherwise: backend ``backend``, else ``$QUESTS_TORCH_DIST_BACKEND``, else NCCL when
    CUDA is available and gloo otherwise; with NCCL the current CUDA device is set to
    ``LOCAL_RANK`` first (one GPU per process). Rendezvous via ``MASTER_ADDR``/``MASTER_PORT``
    (``init_method="env://"``), as set by ``torchrun``.

    Args:
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (automatic).
        timeout: collective timeout in seconds (default torch's).

    Returns:
        ``True`` when this call created the group (the caller should then
        ``torch.distributed.destroy_process_group()`` at the end).
    """
    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or os.environ.get(_BACKEND_ENV) or None
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
    dist.init_process_group(backend, init_method="env://", **kwargs)
    return True


# --------------------------------------------------------------------------------------------
# collectives (no-ops on one rank)
# --------------------------------------------------------------------------------------------


def all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    """A reduced copy of ``t`` (same device as ``t``); ``t`` itself is not modified."""
    if not is_distributed():
        return t
    buf = t.detach().to(comm_device(), copy=True)
    dist.all_reduce(buf, op=op)
    return buf.to(t.device)


def all_gather_rows(local: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Concatenate every rank's ``local`` (``counts[r]`` rows each) in rank order.

    Shapes are padded to the largest block (gloo needs equal shapes).
    """
    if not is_distributed():
        return local
    dev = comm_device()
    most = max(counts)
    if most == 0:
        return local
    buf = torch.zeros((most, *local.shape[1:]), dtype=local.dtype, device=dev)
    buf[: local.shape[0]] = local.detach().to(dev)
    out = [torch.empty_like(buf) for _ in range(world_size())]
    dist.all_gather(out, buf)
    return torch.cat([o[:c] for o, c in zip(out, counts, strict=True)]).to(local.device)


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


def logsumexp_ranks(log_p: torch.Tensor) -> torch.Tensor:
    """Exact combination of partial log sums: ``M + log sum_r exp(log p^(r) - M)``."""
    if not is_distributed():
        return log_p
    m = all_reduce(log_p, dist.ReduceOp.MAX)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows -inf on every rank
    s = all_reduce(torch.exp(log_p - shift), dist.ReduceOp.SUM)
    return shift + torch.log(s)


def raise_if_any_failed(error: BaseException | None, what: str) -> None:
    """Collective: re-raise ``error`` here, or fail on every rank when another rank failed."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    flag = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64)
    failed = all_reduce(flag, dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if float(failed[0]) > 0:
        raise RuntimeError(f"{what} failed on another rank (see its error message)")
