"""Descriptor sources, device resolution, weights and progress: the inputs of every sweep."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..checks import Progress, check_descriptor_matrix
from ..store import DescriptorStore
from ..structures import resolve_device
from .tiles import spans

ArrayLike = torch.Tensor | np.ndarray
Bandwidth = float | Sequence[float] | torch.Tensor | np.ndarray


class Source:
    """A descriptor set ``[n, d]``: a torch tensor (any device), a numpy array / memmap, or a
    :class:`~quests_torch.store.DescriptorStore` (its memmap, read tile by tile; its tiles
    reach the kernels in the store's ``compute_dtype``, float64 unless asked otherwise)."""

    def __init__(self, data: ArrayLike | DescriptorStore, name: str):
        self.name = name
        self.store_dtype: torch.dtype | None = None  # a store's compute dtype
        if isinstance(data, DescriptorStore):
            data.check_files()  # a truncated file would end the process (SIGBUS) mid-read
            self.store_dtype = data.compute_dtype
            data = data.x
        check_descriptor_matrix(
            data, name, expected="a torch.Tensor or a numpy array [n, d] (or a DescriptorStore)"
        )
        is_tensor = isinstance(data, torch.Tensor)
        self.tensor: torch.Tensor | None = data if is_tensor else None
        self.array: np.ndarray | None = None if is_tensor else data
        self.n, self.d = int(data.shape[0]), int(data.shape[1])

    @property
    def device(self) -> torch.device | None:
        return None if self.tensor is None else self.tensor.device

    @property
    def dtype(self) -> torch.dtype:
        if self.tensor is not None:
            return self.tensor.dtype
        if self.store_dtype is not None:
            return self.store_dtype
        return torch.float64 if self.array.dtype == np.float64 else torch.float32

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype the rows are held in (the tensor's or the array's, not a store's compute
        dtype): what a read moves from the host to the device."""
        if self.tensor is not None:
            return self.tensor.dtype
        return torch.float64 if self.array.dtype == np.float64 else torch.float32

    def host_rows(self, i0: int, i1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``i0:i1`` of an array source as a CPU tensor in :attr:`storage_dtype`: the one
        host read of every array or memmap access (into ``out``, e.g. pinned memory, if given)."""
        block = self.array[i0:i1]
        if out is not None:
            np.copyto(out.numpy(), block)
            return out
        if not (block.flags.c_contiguous and block.flags.writeable):
            block = np.array(block)  # read-only memmaps: torch wants writable memory
        return torch.from_numpy(block)

    def rows(self, i0: int, i1: int, device: torch.device, dtype=torch.float64) -> torch.Tensor:
        """Rows ``i0:i1`` on ``device`` as ``dtype`` (``None``: :attr:`storage_dtype`), detached.

        Array rows cross to the device in their storage dtype (a float32 memmap moves 4 bytes
        a value, through pinned memory on CUDA) and are converted there.
        """
        if self.tensor is not None:
            block = self.tensor.detach()[i0:i1]
            return block.to(device=device, dtype=block.dtype if dtype is None else dtype)
        chunk = self.host_rows(i0, i1)
        if device.type == "cuda":
            chunk = chunk.pin_memory().to(device=device, non_blocking=True)
        else:
            chunk = chunk.to(device=device)
        return chunk if dtype is None else chunk.to(dtype)

    def take(self, index: torch.Tensor) -> Source:
        """A new source holding the rows ``index`` (a 1-D long tensor)."""
        if self.tensor is not None:
            return Source(
                self.tensor.detach().index_select(0, index.to(self.tensor.device)), self.name
            )
        taken = Source(self.array[index.cpu().numpy()], self.name)
        taken.store_dtype = self.store_dtype
        return taken

    def chunks(self, device: torch.device, size: int) -> Iterator[torch.Tensor]:
        for i0, i1 in spans(0, self.n, size):
            yield self.rows(i0, i1, device)

    def check_finite_and_mean(
        self, device: torch.device, chunk: int, acc: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """Raise on NaN/inf; return the column mean ``[d]`` (in ``acc``) on ``device``."""
        return self.check_finite_mean_max(device, chunk, acc)[0]

    def check_finite_mean_max(
        self, device: torch.device, chunk: int, acc: torch.dtype = torch.float64
    ) -> tuple[torch.Tensor, float]:
        """Raise on NaN/inf; return the column mean ``[d]`` (in ``acc``, float64 unless
        float32-only) on ``device`` and the largest absolute value (one host sync for both).
        The mean only sets the centring point: its rounding does not reach the kernel sums."""
        total = torch.zeros(self.d, dtype=acc, device=device)
        amax = torch.zeros((), dtype=acc, device=device)
        for i0, i1 in spans(0, self.n, chunk):
            block = self.rows(i0, i1, device, acc)
            amax = torch.maximum(amax, block.abs().max())  # NaN propagates
            total += block.sum(0)
        largest = float(amax)
        if not math.isfinite(largest):
            raise ValueError(f"`{self.name}` contains NaN or infinite descriptor values")
        return total / self.n, largest


def compute_device(sources: Sequence[Source], device) -> torch.device:
    """Where the sources live (one device), else ``device`` (default CPU): the package's one
    rule, :func:`quests_torch.devices.resolve_device`."""
    return resolve_device(device, inputs=[(s.name, s.device) for s in sources], default="cpu")


def progress_callback(progress: Progress, total: int, desc: str, unit: str = "row"):
    if progress is None or progress is False:
        return None, None
    if progress is True:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            return None, None
        bar = tqdm(total=total, desc=desc, unit=unit)
        state = {"done": 0}

        def update(done: int, _total: int) -> None:
            bar.update(done - state["done"])
            state["done"] = done

        return update, bar
    if not callable(progress):
        raise TypeError("`progress` must be a bool or a callable(done, total)")
    return progress, None


def as_log_weights(log_weights, device) -> torch.Tensor | None:
    if log_weights is None:
        return None
    if isinstance(log_weights, np.ndarray):
        return torch.from_numpy(np.asarray(log_weights, dtype=np.float64))
    if isinstance(log_weights, torch.Tensor):
        if log_weights.ndim != 1:
            raise ValueError(f"`log_weights` must be 1-D [m], got shape {tuple(log_weights.shape)}")
        return log_weights
    raise TypeError(
        f"`log_weights` must be a tensor or numpy array, got {type(log_weights).__name__}"
    )


def progress_ticker(progress: Progress, total: int, desc: str, unit: str = "structure"):
    """``(tick(done), bar)``: :func:`progress_callback` as a one-argument ``tick`` (a no-op
    for no progress) and the bar to close (or ``None``)."""
    update, bar = progress_callback(progress, total, desc, unit=unit)
    if update is None:
        return lambda done: None, None
    return lambda done: update(done, total), bar
