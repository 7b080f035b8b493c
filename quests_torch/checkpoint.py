"""Resumable checkpoints of a greedy compression (:func:`quests_torch.compression.compress`).

A checkpoint is keyed on sha256 hashes of the data and on the selection's parameters, so a
file written for other data or parameters is refused rather than resumed or overwritten.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from .grouped import GroupedDescriptors

__all__ = ["HASH_CHUNK", "Checkpoint", "checkpoint_key", "tensor_digest"]


class Checkpoint:
    """Resumable state of a greedy selection, saved atomically every ``every`` seconds.

    The state is saved between steps only (never half a step), so a crash loses at most
    ``every`` seconds of work; an interrupt (``KeyboardInterrupt``, an exception from a
    progress callback) saves the last completed step first. ``key`` identifies the data and
    parameters: a checkpoint written for anything else is refused, not overwritten. The
    target size is not part of the key: a checkpoint extends to a larger size, and a smaller
    size is answered from its prefix.
    """

    def __init__(self, path, key: str, every: float):
        self.path = Path(path)
        self.key = key
        self.every = float(every)
        self.last = time.monotonic()

    def load(self) -> dict | None:
        """The saved state, ``None`` without a file; a foreign or damaged file is refused."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file: say so, do not overwrite it
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValueError(
                f"`checkpoint` {self.path} is not a compression checkpoint "
                f"({type(exc).__name__}: {first[:120]}); delete it or choose another path"
            ) from None
        if not isinstance(state, dict) or state.get("key") != self.key:
            raise ValueError(
                f"`checkpoint` {self.path} was written for other data or parameters "
                "(method, h, threshold, dtype, curve, dataset or reference); delete it or "
                "choose another path"
            )
        return state

    def due(self) -> bool:
        """Whether ``every`` seconds have passed since the last save."""
        return time.monotonic() - self.last >= self.every

    def save(self, state: dict) -> None:
        """Write ``state`` (with the key) atomically."""
        from .io import atomic_write

        atomic_write(self.path, lambda p: torch.save({"key": self.key, **state}, p))
        self.last = time.monotonic()


#: bytes hashed per step: large (or CUDA) tensors are streamed to the host in pieces this big
HASH_CHUNK = 64 << 20


def tensor_digest(t: torch.Tensor, chunk_bytes: int = HASH_CHUNK) -> str:
    """sha256 of a tensor's dtype, shape and values (row-major bytes), streamed in chunks.

    The bytes are those of the contiguous tensor, so the digest does not depend on the memory
    layout or the chunk size; CUDA tensors are copied to the host one chunk at a time.
    """
    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.detach().contiguous().reshape(-1)
    step = max(1, chunk_bytes // max(1, flat.element_size()))
    for i0 in range(0, flat.numel(), step):
        piece = flat[i0 : i0 + step].cpu().contiguous()
        digest.update(piece.view(torch.uint8).numpy())
    return digest.hexdigest()


def checkpoint_key(
    method: str, data: GroupedDescriptors, ref: torch.Tensor | None, parameters: dict
) -> str:
    """What a checkpoint must match to be resumed: every parameter that changes the selection
    and sha256 hashes of the descriptors (grouped by structure), the environments per
    structure and the reference. Equal keys mean the same problem, not just equal moments."""
    parts = [
        "quests-torch compression v2",
        method,
        *(f"{name}={value!r}" for name, value in sorted(parameters.items())),
        f"x={tensor_digest(data.x)}",
        f"counts={tensor_digest(data.counts)}",
        f"reference={None if ref is None else tensor_digest(ref)}",
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()
