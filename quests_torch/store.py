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
what changed, ``overwrite=True`` starts again, and an exclusive lock
(``descriptors.npy.lock``) makes a second writer fail with :class:`StoreInUseError`; a reader
refuses a store whose lock is held.

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
import json
import os
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATA_FILE",
    "HEADER_BYTES",
    "META_FILE",
    "N_ATOMS_FILE",
    "STORE_FORMAT",
    "STORE_SUFFIX",
    "WRITING_MARK",
    "DescriptorStore",
    "StoreInUseError",
    "is_store",
    "npy_header",
    "open_store",
    "store_width",
]

STORE_FORMAT = 1
"""Layout version of a store (raised when the files change meaning)."""
STORE_SUFFIX = ".qstore"
"""Conventional suffix of a store folder (a path ending in it is taken for a store)."""
DATA_FILE = "descriptors.npy"
"""The ``[n, d]`` descriptors in a store folder."""
N_ATOMS_FILE = "n_atoms.npy"
"""The ``[n_structures]`` atoms per structure in a store folder."""
META_FILE = "meta.json"
"""The metadata of a store folder."""
HEADER_BYTES = 128
"""Bytes reserved for the ``.npy`` header at the start of both data files (a multiple of 64,
so rows stay aligned as numpy writes them)."""
WRITING_MARK = b"QUESTS-TORCH STORE: BEING WRITTEN, NOT A COMPLETE .npy FILE\n"
"""What the header region holds until the store is complete (not the ``.npy`` magic)."""
_KIND = "quests-torch descriptor store"
_DTYPES = {"float32": np.float32, "float64": np.float64}


class StoreInUseError(OSError):
    """The store is being written by another process (its lock is held)."""


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A ``.npy`` version 1.0 header for ``dtype`` and ``shape``, padded to
    :data:`HEADER_BYTES` (C order, native byte order written explicitly)."""
    dtype = np.dtype(dtype)
    text = repr({"descr": dtype.str, "fortran_order": False, "shape": tuple(shape)})
    pad = HEADER_BYTES - 10 - len(text) - 1
    if pad < 0:  # pragma: no cover - a shape with ~30-digit sizes
        raise ValueError(f"shape {shape}: its .npy header does not fit {HEADER_BYTES} bytes")
    body = (text + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


def store_width(k: int, species: list | tuple, multicomponent: bool) -> int:
    """Columns of a store's rows: ``2k - 1``, times ``S + 1`` for the multicomponent form."""
    from .descriptors import descriptor_width

    return descriptor_width(k, len(species) if multicomponent else 0)


def is_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a descriptor store: a folder with a ``meta.json`` (complete or
    not), or a path ending in :data:`STORE_SUFFIX`."""
    p = Path(path)
    if p.suffix.lower() == STORE_SUFFIX:
        return True
    return p.is_dir() and (p / META_FILE).is_file() and (p / DATA_FILE).exists()


def lock_held(folder: Path) -> bool:
    """Whether a writer holds the lock of the store in ``folder`` (never creates the file)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows)
        return False
    try:
        fd = os.open(folder / f"{DATA_FILE}.lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # pragma: no cover
        return False
    finally:
        os.close(fd)
    return False


def read_meta(folder: Path) -> dict:
    """``meta.json`` of the store in ``folder``, checked to be a store's JSON object.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: not a store folder, or an unreadable ``meta.json``.
    """
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such descriptor store")
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a descriptor store (a store is a folder)")
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise ValueError(f"{folder}: not a descriptor store (no {META_FILE})")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{meta_file}: unreadable store metadata ({exc})") from None
    if not isinstance(meta, dict) or meta.get("kind") != _KIND:
        raise ValueError(f"{meta_file}: not the metadata of a {_KIND}")
    fmt = meta.get("store_format")
    if not isinstance(fmt, int) or fmt > STORE_FORMAT:
        raise ValueError(
            f"{folder}: store format {fmt!r} is not one this version reads (<= {STORE_FORMAT})"
        )
    return meta


def _count(meta: dict, name: str, folder: Path) -> int:
    v = meta.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{folder}: metadata `{name}` must be a count >= 0, got {v!r}")
    return v


def check_meta(meta: dict, folder: Path) -> tuple[int, int, np.dtype]:
    """``(rows, width, dtype)`` of a store's metadata, checked to hold together.

    Raises:
        ValueError: bad ``k``/``cutoff``/``dtype``/``species`` or a width that ``k`` (and the
            species, multicomponent) does not give; names the store and the entry.
    """
    k, cutoff = meta.get("k"), meta.get("cutoff")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"{folder}: metadata `k` must be an integer >= 1, got {k!r}")
    if not isinstance(cutoff, int | float) or not cutoff > 0:
        raise ValueError(f"{folder}: metadata `cutoff` must be a positive distance, got {cutoff!r}")
    if meta.get("dtype") not in _DTYPES:
        raise ValueError(
            f"{folder}: metadata `dtype` must be float32 or float64, got {meta.get('dtype')!r}"
        )
    species = meta.get("species")
    if not isinstance(species, list) or not all(isinstance(s, str) for s in species):
        raise ValueError(f"{folder}: metadata `species` must be a list of symbols")
    width = _count(meta, "width", folder)
    expected = store_width(k, species, bool(meta.get("multicomponent")))
    if width != expected:
        raise ValueError(
            f"{folder}: metadata width {width} does not fit k={k} (2k-1 = {2 * k - 1}"
            + (f", {len(species)} species: {expected}" if meta.get("multicomponent") else "")
            + ")"
        )
    return _count(meta, "rows", folder), width, np.dtype(_DTYPES[meta["dtype"]])


def _load_npy(path: Path, dtype: np.dtype, shape: tuple, folder: Path) -> np.ndarray:
    """``path`` memory-mapped read-only, its header and size checked against ``shape``."""
    expected = HEADER_BYTES + int(np.prod(shape)) * dtype.itemsize
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ValueError(f"{folder}: {path.name} is missing") from None
    if size != expected:
        raise ValueError(
            f"{path}: {size} bytes, but the metadata ({shape[0]} rows of {dtype}"
            f"{' x ' + str(shape[1]) if len(shape) > 1 else ''}) needs {expected}: "
            "the data file does not match its metadata (damaged or edited store)"
        )
    with open(path, "rb") as fh:
        if fh.read(HEADER_BYTES) != npy_header(dtype, shape):
            raise ValueError(
                f"{path}: its .npy header does not record {dtype} {shape} as the metadata "
                "does (an unfinished or edited store)"
            )
    if shape[0] == 0:
        return np.zeros(shape, dtype)
    return np.load(path, mmap_mode="r", allow_pickle=False)


class DescriptorStore:
    """A complete descriptor store opened read-only; the data stays on disk (``np.memmap``).

    Pass the store itself wherever descriptors are expected (``qt.entropy(store)``,
    ``qt.delta_entropy(query, store)``, estimates, overlap, ...): rows are read tile by tile.

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

    @classmethod
    def open(cls, path: str | os.PathLike) -> DescriptorStore:
        """Open the complete store at ``path``, checking metadata against data.

        Raises:
            FileNotFoundError: no such store.
            StoreInUseError: a writer holds its lock.
            ValueError: not a store, an incomplete store, or metadata that disagrees with the
                data (file sizes, ``.npy`` headers, ``sum(n_atoms)``, width vs ``k``, dtype).
        """
        folder = Path(path)
        meta = read_meta(folder)
        if lock_held(folder):
            raise StoreInUseError(
                f"{folder}: being written by another process (its lock is held); wait for it "
                "to finish"
            )
        rows, width, dtype = check_meta(meta, folder)
        if meta.get("complete") is not True:
            raise ValueError(
                f"{folder}: an incomplete descriptor store ({rows} rows of "
                f"{meta.get('frames', '?')} structures committed); rerun the same "
                "`quests-torch descriptors` / write_descriptor_store to resume it, or "
                "overwrite it"
            )
        frames = _count(meta, "frames", folder)
        x = _load_npy(folder / DATA_FILE, dtype, (rows, width), folder)
        n_atoms = np.array(_load_npy(folder / N_ATOMS_FILE, np.dtype(np.int64), (frames,), folder))
        if (n_atoms < 0).any() or int(n_atoms.sum()) != rows:
            raise ValueError(
                f"{folder}: {N_ATOMS_FILE} sums to {int(n_atoms.sum())} atoms but "
                f"{DATA_FILE} holds {rows} rows"
            )
        return cls(folder, meta, x, n_atoms)

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
        return np.asarray(self.x[key])

    def __array__(self, dtype=None, copy=None):
        """The memmap itself (no copy) for ``np.asarray(store)``; a copy when asked for one or
        for another dtype."""
        if copy or (dtype is not None and np.dtype(dtype) != self.x.dtype):
            return np.array(self.x, dtype=dtype)
        return self.x

    def tensor(self) -> torch.Tensor:
        """The rows as a CPU tensor backed by the file (copy-on-write mapping: nothing is
        read until used, and writes to the tensor never reach the file)."""
        if self.x.shape[0] == 0:
            return torch.from_numpy(np.array(self.x))
        mapped = np.load(self.path / DATA_FILE, mmap_mode="c", allow_pickle=False)
        return torch.from_numpy(mapped[self._start : self._start + len(self)])

    def system_idx(self) -> torch.Tensor:
        """``[n]`` structure index of each row."""
        counts = torch.from_numpy(self.n_atoms)
        return torch.repeat_interleave(torch.arange(counts.numel()), counts)

    def verify(self) -> None:
        """Check the SHA-256 of both files' data against the metadata (reads everything once).

        Raises:
            ValueError: the data changed since it was written.
        """
        from .store_writer import file_digest

        for name, key in ((DATA_FILE, "descriptors"), (N_ATOMS_FILE, "n_atoms")):
            path = self.path / name
            digest = file_digest(path, path.stat().st_size - HEADER_BYTES).hexdigest()
            if digest != self.meta.get("sha256", {}).get(key):
                raise ValueError(f"{path}: its data changed since it was written (SHA-256)")


def open_store(path: str | os.PathLike) -> DescriptorStore:
    """Open a complete descriptor store read-only (:meth:`DescriptorStore.open`).

    Args:
        path: the store folder (``name.qstore``).
    """
    return DescriptorStore.open(path)
