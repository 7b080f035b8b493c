"""A descriptor store larger than memory: descriptors on disk, memory-mapped, read tile by tile.

A store is a folder (``name.qstore/`` by convention) holding

* ``descriptors.npy``: ``[n, d]`` descriptors, float32 or float64, in the ``.npy`` format, so
  that ``np.load(".../descriptors.npy", mmap_mode="r")`` opens a complete store without this
  package;
* ``n_atoms.npy``: ``[n_structures]`` int64 atoms per structure (the rows of structure ``s``
  follow those of structure ``s - 1``);
* ``meta.json``: ``k``, ``cutoff``, the storage ``dtype``, the width, ``multicomponent`` and
  ``species``, the source (trajectory path, ``size:sha256`` and selection), the package
  version, what is committed (rows, structures, SHA-256 of the committed bytes of both files)
  and a ``complete`` flag; always replaced atomically (:func:`quests_torch.io.atomic_write`).

Why this layout. Both ``.npy`` files start with a fixed :data:`HEADER_BYTES`-byte header
region, so rows can be appended at known offsets; the region holds :data:`WRITING_MARK`
(not the ``.npy`` magic: ``np.load`` refuses the file) until the store is completed, when the
real header with the final shape is written in place. A half-written store is therefore never
mistaken for a complete one: ``np.load`` refuses it, and :meth:`DescriptorStore.open` refuses
a ``meta.json`` without ``complete``. ``.npz`` cannot be appended to nor memory-mapped, and
a raw file plus JSON would not open with ``np.load``.

Writing is streamed and resumable under the rules of screening (:mod:`quests_torch.resume`):
the store is identified by the trajectory's content and every parameter; a rerun with the same
identity continues after the last committed batch (the files are cut back to the committed
bytes, whose SHA-256 is checked first), a different identity is refused with a message naming
what changed, ``overwrite=True`` builds the new store beside the old one
(:func:`replacement_path`) and swaps the two only once it is complete, and an exclusive
``flock`` on ``<store>.lock`` beside the folder (:func:`store_lock_path`; the file stays, the
lock of a dead writer frees itself) makes a second writer fail with :class:`StoreInUseError`;
a reader refuses a store whose lock is held.

What is trusted. Every entry of ``meta.json`` is checked when a store is opened: its type
(booleans are not numbers), its range, and its agreement with ``params``, the parameters the
store was written with, whose SHA-256 is ``key`` (:func:`check_meta`); the sizes and headers of
the data files against the metadata, and ``n_atoms`` against the rows. No file of a store is
read or written through a symbolic link. An opened store reads the files it opened, whatever
the path holds later; a file truncated while it is open would end the process with
``SIGBUS`` when read through the memory map, which
:meth:`DescriptorStore.check_files` sees before each long read.

Reading never loads the data: :attr:`DescriptorStore.x` is a read-only ``np.memmap`` and every
metric accepts the store itself (:class:`quests_torch.kde.source.Source` unwraps it), reading
rows tile by tile. Tiles are handed to the kernels in :attr:`DescriptorStore.compute_dtype`,
float64 unless :meth:`DescriptorStore.as_dtype` asks otherwise: float32 *storage* is a
compression of the float64 descriptors (half the bytes; each value rounded to 24 significant
bits, a relative error <= 6e-8), not a float32 *computation*. The writer is
:mod:`quests_torch.store_writer`.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .store_files import (
    DATA_FILE,
    HEADER_BYTES,
    KIND,
    META_FILE,
    N_ATOMS_FILE,
    STORE_FORMAT,
    STORE_SUFFIX,
    WRITING_MARK,
    StoreInUseError,
    check_meta,
    interrupted_swap,
    npy_header,
    open_store_file,
    params_key,
    read_meta,
    replaced_path,
    replacement_path,
    store_lock_path,
    store_width,
)

__all__ = [
    "DATA_FILE",
    "HEADER_BYTES",
    "KIND",
    "META_FILE",
    "N_ATOMS_FILE",
    "STORE_FORMAT",
    "STORE_SUFFIX",
    "WRITING_MARK",
    "DescriptorStore",
    "StoreInUseError",
    "check_meta",
    "interrupted_swap",
    "is_store",
    "lock_held",
    "npy_header",
    "open_store",
    "open_store_file",
    "params_key",
    "read_meta",
    "replaced_path",
    "replacement_path",
    "store_lock_path",
    "store_width",
]


def is_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a descriptor store: a folder with a ``meta.json`` (complete or
    not), or a path ending in :data:`STORE_SUFFIX`."""
    p = Path(path)
    if p.suffix.lower() == STORE_SUFFIX:
        return True
    return p.is_dir() and (p / META_FILE).is_file() and (p / DATA_FILE).exists()


def lock_held(folder: Path) -> bool:
    """Whether a writer holds the lock of the store in ``folder`` (never creates the file):
    :func:`store_lock_path`, or the ``descriptors.npy.lock`` inside the folder that earlier
    builds locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows)
        return False
    for path in (store_lock_path(folder), folder / f"{DATA_FILE}.lock"):
        try:
            fd = open_store_file(path)
        except (OSError, ValueError):
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # pragma: no cover
            pass
        finally:
            os.close(fd)
    return False


class _OpenFile:
    """A store file opened once (read-only, never through a link) and closed when the last
    store view holding it goes: every later read maps or reads this file, never the path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = open_store_file(path)
        weakref.finalize(self, os.close, self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def read(self, offset: int, n_bytes: int) -> bytes:
        return os.pread(self.fd, n_bytes, offset)

    def blocks(self, n_bytes: int, size: int = 1 << 22) -> Iterator[bytes]:
        """The ``n_bytes`` data bytes after the header, in blocks."""
        offset, end = HEADER_BYTES, HEADER_BYTES + n_bytes
        while offset < end and (block := self.read(offset, min(size, end - offset))):
            yield block
            offset += len(block)
        if offset < end:
            raise ValueError(f"{self.path}: shorter than its {n_bytes} committed bytes")

    def map(self, dtype: np.dtype, shape: tuple, mode: str) -> np.ndarray:
        """``np.memmap`` of the data after the header (``"r"`` read-only, ``"c"``
        copy-on-write)."""
        if shape[0] == 0:
            return np.zeros(shape, dtype)
        with os.fdopen(os.dup(self.fd), "rb") as fh:  # the mapping keeps its own descriptor
            return np.memmap(fh, dtype=dtype, mode=mode, offset=HEADER_BYTES, shape=shape)

    def check(self, dtype: np.dtype, shape: tuple, folder: Path) -> None:
        """The size and the ``.npy`` header against ``shape`` (computed in Python ints: no
        overflow whatever the metadata says)."""
        expected = HEADER_BYTES + math.prod(shape) * dtype.itemsize
        size = self.size()
        if size != expected:
            raise ValueError(
                f"{self.path}: {size} bytes, but the metadata ({shape[0]} rows of {dtype}"
                f"{' x ' + str(shape[1]) if len(shape) > 1 else ''}) needs {expected}: "
                "the data file does not match its metadata (damaged or edited store)"
            )
        if self.read(0, HEADER_BYTES) != npy_header(dtype, shape):
            raise ValueError(
                f"{self.path}: its .npy header does not record {dtype} {shape} as the "
                "metadata does (an unfinished or edited store)"
            )


def _read_counts(folder: Path, frames: int, rows: int) -> tuple[np.ndarray, _OpenFile]:
    """``n_atoms.npy`` read whole, checked: each count in ``[0, rows]`` and their sum ``rows``.

    ``rows`` fits the data file, so it is below 2**63: a running int64 sum of counts in
    ``[0, rows]`` that wraps around turns negative, and is seen.
    """
    counts_file = _OpenFile(folder / N_ATOMS_FILE)
    counts_file.check(np.dtype(np.int64), (frames,), folder)
    counts = np.frombuffer(b"".join(counts_file.blocks(frames * 8)), dtype=np.int64).copy()
    if ((counts < 0) | (counts > rows)).any():
        raise ValueError(
            f"{folder}: {N_ATOMS_FILE} holds counts outside [0, {rows}] ({DATA_FILE} holds "
            f"{rows} rows)"
        )
    running = np.cumsum(counts)
    total = int(running[-1]) if frames else 0
    if (running < 0).any() or total != rows:
        shown = "more than 2**63" if (running < 0).any() else str(total)
        raise ValueError(
            f"{folder}: {N_ATOMS_FILE} sums to {shown} atoms but {DATA_FILE} holds {rows} rows"
        )
    return counts, counts_file


class DescriptorStore:
    """A complete descriptor store opened read-only; the data stays on disk (``np.memmap``).

    Pass the store itself wherever descriptors are expected (``qt.entropy(store)``,
    ``qt.delta_entropy(query, store)``, estimates, overlap, ...): rows are read tile by tile.

    The files are opened once, by :meth:`open`: every later read (:attr:`x`, :meth:`tensor`,
    :meth:`verify`) goes to the files that were opened and checked, even when another process
    has since replaced the store at :attr:`path` (``--overwrite``). A file *truncated* while
    open is another matter: reading a row past its new end through the memory map ends the
    process with ``SIGBUS``, which Python cannot catch. :meth:`check_files` sees it; the
    metrics, :meth:`tensor` and :meth:`verify` call it where their reading starts, but a
    truncation during a long read cannot be guarded against: never truncate or edit a store
    that is being read.

    Attributes:
        path: the store folder.
        x: ``[n, d]`` read-only ``np.memmap`` of the descriptors (storage dtype).
        n_atoms: ``[n_structures]`` int64 atoms per structure.
        k: neighbours per environment.
        cutoff: cutoff radius (Å).
        dtype: storage dtype name, ``"float32"`` or ``"float64"``.
        compute_dtype: the dtype tiles are handed to the kernels in (float64 by default).
        species: chemical symbols (multicomponent: the block species, in column order;
            otherwise the elements present).
        multicomponent: whether rows hold the multicomponent descriptor.
        source: ``{"path", "key" (size:sha256), "index"}`` of the trajectory, or ``None``.
        version: quests-torch version that wrote the store.
        meta: the whole ``meta.json``.
    """

    def __init__(self, path: Path, meta: dict, x: np.ndarray, n_atoms: np.ndarray):
        self.path, self.meta, self.x, self.n_atoms = path, meta, x, n_atoms
        self.k, self.cutoff = int(meta["k"]), float(meta["cutoff"])
        self.dtype = str(meta["dtype"])
        self.compute_dtype = torch.float64
        self.species = tuple(meta["species"])
        self.multicomponent = bool(meta.get("multicomponent"))
        self.source = meta.get("source")
        self.version = str(meta.get("quests_torch", ""))
        self._start = 0  # first row of a view (``store[i:j]``)
        self._file: _OpenFile | None = None  # the opened descriptors file (set by open)
        self._counts_file: _OpenFile | None = None  # the opened n_atoms file

    @classmethod
    def open(cls, path: str | os.PathLike) -> DescriptorStore:
        """Open the complete store at ``path``, checking metadata against data.

        Raises:
            FileNotFoundError: no such store.
            StoreInUseError: a writer holds its lock.
            ValueError: not a store, an incomplete store, metadata that disagrees with the
                data (file sizes, ``.npy`` headers, ``sum(n_atoms)``, width vs ``k``, dtype)
                or with the parameters it was keyed with, a symbolic link among its files,
                or an overwrite stopped halfway (each names the store and the problem).
        """
        folder = Path(path)
        meta = read_meta(folder)
        if lock_held(folder):
            raise StoreInUseError(
                f"{folder}: being written by another process (its lock is held); wait for it "
                "to finish"
            )
        rows, width, dtype = check_meta(meta, folder)
        if meta["complete"] is not True:
            raise ValueError(
                f"{folder}: an incomplete descriptor store ({rows} rows of "
                f"{meta['frames']} structures committed); rerun the same "
                "`quests-torch descriptors` / write_descriptor_store to resume it, or "
                "overwrite it"
            )
        data = _OpenFile(folder / DATA_FILE)
        data.check(dtype, (rows, width), folder)
        n_atoms, counts_file = _read_counts(folder, meta["frames"], rows)
        store = cls(folder, meta, data.map(dtype, (rows, width), "r"), n_atoms)
        store._file, store._counts_file = data, counts_file
        return store

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        return (
            f"DescriptorStore({str(self.path)!r}, {len(self)} x {self.x.shape[1]} {self.dtype}, "
            f"{len(self.n_atoms)} structures, k={self.k}, cutoff={self.cutoff:g})"
        )

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, d)``."""
        return tuple(self.x.shape)

    @property
    def ndim(self) -> int:
        """2, as for an ``[n, d]`` array."""
        return 2

    @property
    def device(self) -> torch.device:
        """Always the CPU: the data is a file."""
        return torch.device("cpu")

    @property
    def n_structures(self) -> int:
        """Number of structures (``len(n_atoms)``)."""
        return int(self.n_atoms.size)

    def as_dtype(self, dtype: torch.dtype) -> DescriptorStore:
        """The same store whose tiles reach the kernels as ``dtype`` (no data is read).

        Args:
            dtype: ``torch.float64`` or ``torch.float32``.
        """
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}")
        view = copy.copy(self)
        view.compute_dtype = dtype
        return view

    def __getitem__(self, key):
        """Rows: a slice gives a store view (for sharding; its ``n_atoms`` is one structure
        of all its rows), anything else the selected rows as a numpy array (a copy)."""
        if isinstance(key, slice) and key.indices(len(self))[2] == 1:
            start, stop, _ = key.indices(len(self))
            view = copy.copy(self)
            view.x, view._start = self.x[start:stop], self._start + start
            view.n_atoms = np.array([view.x.shape[0]], dtype=np.int64)
            return view
        self.check_files()
        return np.asarray(self.x[key])

    def __array__(self, dtype=None, copy=None):
        """The memmap itself (no copy) for ``np.asarray(store)``; a copy when asked for one or
        for another dtype."""
        self.check_files()
        if copy or (dtype is not None and np.dtype(dtype) != self.x.dtype):
            return np.array(self.x, dtype=dtype)
        return self.x

    def _shape(self) -> tuple[int, int]:
        """``(rows, width)`` of the whole store (a view's too)."""
        return int(self.meta["rows"]), int(self.meta["width"])

    def check_files(self) -> None:
        """Check that the opened descriptors file still holds every row (call it before a
        long read: a row past the end of a truncated file kills the process with ``SIGBUS``
        when read through the memory map).

        Raises:
            ValueError: the file was truncated since the store was opened.
        """
        if self._file is None:
            return
        expected = HEADER_BYTES + math.prod(self._shape()) * self.x.dtype.itemsize
        size = self._file.size()
        if size < expected:
            raise ValueError(
                f"{self._file.path}: truncated to {size} bytes since the store was opened "
                f"(its {self._shape()[0]} rows need {expected}); reading it would end the "
                "process (SIGBUS): the store was damaged while in use"
            )

    def tensor(self) -> torch.Tensor:
        """The rows as a CPU tensor backed by the file opened by :meth:`open` (copy-on-write
        mapping: nothing is read until used, and writes to the tensor never reach the file)."""
        if self.x.shape[0] == 0 or self._file is None:
            return torch.from_numpy(np.array(self.x))
        self.check_files()
        mapped = self._file.map(self.x.dtype, self._shape(), "c")
        return torch.from_numpy(mapped[self._start : self._start + len(self)])

    def system_idx(self) -> torch.Tensor:
        """``[n]`` structure index of each row."""
        counts = torch.from_numpy(self.n_atoms)
        return torch.repeat_interleave(torch.arange(counts.numel()), counts)

    def verify(self) -> None:
        """Check the SHA-256 of both files' data against the metadata (reads everything once):
        the files opened by :meth:`open`, those this store reads, even when the path now
        holds others.

        Raises:
            ValueError: the data changed since it was written.
        """
        self.check_files()
        rows, width = self._shape()
        n_bytes = {
            "descriptors": rows * width * self.x.dtype.itemsize,
            "n_atoms": 8 * int(self.meta["frames"]),
        }
        for name, key, opened in (
            (DATA_FILE, "descriptors", self._file),
            (N_ATOMS_FILE, "n_atoms", self._counts_file),
        ):
            digest = hashlib.sha256()
            for block in opened.blocks(n_bytes[key]) if opened is not None else ():
                digest.update(block)
            if digest.hexdigest() != self.meta["sha256"][key]:
                raise ValueError(
                    f"{self.path / name}: its data changed since it was written (SHA-256)"
                )


def open_store(path: str | os.PathLike) -> DescriptorStore:
    """Open a complete descriptor store read-only (:meth:`DescriptorStore.open`).

    Args:
        path: the store folder (``name.qstore``).
    """
    return DescriptorStore.open(path)
