"""Writing a descriptor store (:mod:`quests_torch.store`): batches appended, committed, resumed.

:class:`StoreWriter` is the library writer: append descriptor batches with their atoms per
structure, :meth:`~StoreWriter.commit` (both files ``fsync``-ed, then ``meta.json`` replaced
atomically with the committed rows, structures and SHA-256 digests), and finally
:meth:`~StoreWriter.complete` (the ``.npy`` headers written in place, then ``complete``).
:func:`write_descriptor_store` streams a trajectory through it: frames read one at a time
(:func:`quests_torch.io.iter_structures`), grouped into batches of about ``batch_atoms``
atoms read ahead by a background thread, descriptors computed per batch and committed per
batch; a rerun resumes after the last committed frame.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from ._version import __version__
from .checks import DEFAULT_CUTOFF, DEFAULT_K
from .io import DESCRIPTOR_FORMAT, atomic_write, check_index, count_frames
from .resume import TableInUseError, describe_change, table_lock, trajectory_key
from .screen_io import batches_of, frames_after, prefetched
from .store import (
    DATA_FILE,
    HEADER_BYTES,
    META_FILE,
    N_ATOMS_FILE,
    STORE_FORMAT,
    WRITING_MARK,
    DescriptorStore,
    StoreInUseError,
    npy_header,
    read_meta,
    store_width,
)

__all__ = ["DEFAULT_BATCH_ATOMS", "StoreWriter", "file_digest", "write_descriptor_store"]

DEFAULT_BATCH_ATOMS = 100_000
"""Atoms per batch of :func:`write_descriptor_store` (about 50 MB of float64 rows at k=32)."""
_OVERWRITE = "overwrite=True (--overwrite)"
_MARK = WRITING_MARK.ljust(HEADER_BYTES, b" ")


def file_digest(path: Path, n_bytes: int):
    """A ``hashlib`` SHA-256 object fed with the ``n_bytes`` data bytes of ``path`` after its
    header region (to compare, or to continue appending)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(HEADER_BYTES)
        left = n_bytes
        while left and (block := fh.read(min(1 << 22, left))):
            digest.update(block)
            left -= len(block)
    if left:
        raise ValueError(f"{path}: shorter than its {n_bytes} committed bytes")
    return digest


def _storage_dtype(dtype) -> str:
    """``"float32"`` or ``"float64"`` from a torch dtype, a numpy dtype or a name."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    if name not in ("float32", "float64"):
        raise ValueError(f"`dtype` must be float32 or float64 storage, got {dtype}")
    return name


class StoreWriter:
    """Append descriptor batches to the store at ``path``; resumable, locked while open.

    Opening takes the store's lock (:class:`~quests_torch.store.StoreInUseError` when another
    writer holds it) and then either starts a fresh store, continues an incomplete one with
    the same identity (files cut back to the committed bytes, checked by SHA-256), or finds it
    complete (:attr:`done`; :meth:`complete` then just opens it). Use it as a context manager
    or call :meth:`close`.

    Args:
        path: the store folder (``name.qstore``); created when missing.
        k: neighbours per environment.
        cutoff: cutoff radius (Å).
        dtype: storage dtype, ``"float32"`` / ``"float64"`` (or the torch/numpy dtype).
        multicomponent: rows hold the multicomponent descriptor of ``species``.
        species: the block species (multicomponent), else elements known up front.
        identity: further parameters identifying the store (the trajectory's key, the
            selection, ...): a rerun with other values is refused.
        source: recorded as the store's ``source``.
        overwrite: discard an existing store and start again.
        batch_atoms: recorded, so that a resumed run batches as the first one did.

    Raises:
        ValueError: the existing store has another identity (the message names what changed),
            its committed bytes changed, or ``path`` exists and is not a store.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        k: int,
        cutoff: float,
        dtype="float32",
        multicomponent: bool = False,
        species=(),
        identity: dict | None = None,
        source: dict | None = None,
        overwrite: bool = False,
        batch_atoms: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(_storage_dtype(dtype))
        species = sorted(species) if not multicomponent else list(species)
        self.width = store_width(int(k), species, multicomponent)
        self.params = {
            "k": int(k),
            "cutoff": float(cutoff),
            "dtype": self.dtype.name,
            "width": self.width,
            "multicomponent": bool(multicomponent),
            "block_species": species if multicomponent else None,
            "descriptor_format": DESCRIPTOR_FORMAT,
            **(identity or {}),
        }
        self.key = hashlib.sha256(json.dumps(self.params, sort_keys=True).encode()).hexdigest()
        self._stack = ExitStack()
        self._handles: dict = {}
        self._digests: dict = {}
        self._pending = [0, 0]  # rows, structures appended since the last commit
        try:
            self._lock()
            self.meta = self._open_meta(overwrite, species, source, batch_atoms)
        except BaseException:
            self._stack.close()
            raise

    @property
    def rows(self) -> int:
        """Rows committed."""
        return self.meta["rows"]

    @property
    def frames(self) -> int:
        """Structures committed."""
        return self.meta["frames"]

    @property
    def done(self) -> bool:
        """The store was already complete when opened (nothing to append)."""
        return self.meta["complete"] is True

    @property
    def batch_atoms(self) -> int | None:
        """Atoms per batch recorded when the store was started."""
        return self.meta.get("batch_atoms")

    def _lock(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path}: exists and is not a descriptor store folder")
        try:
            self._stack.enter_context(table_lock(self.path / DATA_FILE))
        except TableInUseError:
            raise StoreInUseError(
                f"{self.path}: being written by another process (its lock "
                f"{self.path / (DATA_FILE + '.lock')} is held); wait for it to finish or use "
                "another output name"
            ) from None

    def _open_meta(self, overwrite: bool, species, source, batch_atoms) -> dict:
        folder = self.path
        known = {DATA_FILE, N_ATOMS_FILE, META_FILE, DATA_FILE + ".lock"}
        temporary = tuple(f".{name}." for name in known)  # atomic_write's, left by a crash
        foreign = [
            p.name
            for p in folder.iterdir()
            if p.name not in known and not p.name.startswith(temporary)
        ]
        if foreign:  # never discarded, not even with overwrite: not a store's files
            raise ValueError(
                f"{folder}: exists and is not a descriptor store (it holds {foreign[0]!r}); "
                "use another output name"
            )
        meta = read_meta(folder) if (folder / META_FILE).exists() and not overwrite else None
        if meta is not None:
            if meta.get("key") != self.key:
                change = describe_change(meta.get("params") or {}, self.params)
                raise ValueError(
                    f"{folder}: holds descriptors of another run ({change}, per {META_FILE}); "
                    f"rerun with the original inputs, use another output name or {_OVERWRITE}"
                )
            if meta.get("complete") is not True:
                self._rewind(meta)
            return meta
        return self._start(species, source, batch_atoms)

    def _start(self, species, source, batch_atoms) -> dict:
        for name in (DATA_FILE, N_ATOMS_FILE, META_FILE):
            (self.path / name).unlink(missing_ok=True)
        meta = {
            "kind": "quests-torch descriptor store",
            "store_format": STORE_FORMAT,
            "quests_torch": __version__,
            "key": self.key,
            "params": self.params,
            **{n: self.params[n] for n in ("k", "cutoff", "dtype", "width", "multicomponent")},
            "species": list(species),
            "source": source,
            "batch_atoms": batch_atoms,
            "rows": 0,
            "frames": 0,
            "complete": False,
            "sha256": {"descriptors": hashlib.sha256().hexdigest(), "n_atoms": None},
        }
        meta["sha256"]["n_atoms"] = meta["sha256"]["descriptors"]
        for name in (DATA_FILE, N_ATOMS_FILE):
            atomic_write(self.path / name, lambda p: p.write_bytes(_MARK))
        self._save(meta)
        return meta

    def _rewind(self, meta: dict) -> None:
        """Check the committed bytes of both files and cut what follows them."""
        sizes = {DATA_FILE: meta["rows"] * self.width * self.dtype.itemsize}
        sizes[N_ATOMS_FILE] = meta["frames"] * 8
        for (name, n_bytes), key in zip(sizes.items(), ("descriptors", "n_atoms"), strict=True):
            path = self.path / name
            try:
                digest = file_digest(path, n_bytes)
            except (FileNotFoundError, ValueError):
                raise ValueError(
                    f"{path}: missing or shorter than the {n_bytes} bytes committed in "
                    f"{META_FILE}; use {_OVERWRITE}"
                ) from None
            if digest.hexdigest() != meta["sha256"][key]:
                raise ValueError(
                    f"{path}: its committed rows changed since they were written (SHA-256 "
                    f"differs from {META_FILE}); refusing to truncate it; use {_OVERWRITE}"
                )
            with open(path, "r+b") as fh:
                fh.write(_MARK)  # a completion cut short may have written the header
                fh.truncate(HEADER_BYTES + n_bytes)
                os.fsync(fh.fileno())
            self._digests[key] = digest

    def _save(self, meta: dict) -> None:
        atomic_write(self.path / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=1)))

    def _open_files(self) -> None:
        if not self._digests:
            self._digests = {"descriptors": hashlib.sha256(), "n_atoms": hashlib.sha256()}
        for key, name in (("descriptors", DATA_FILE), ("n_atoms", N_ATOMS_FILE)):
            fh = self._stack.enter_context(open(self.path / name, "r+b"))
            fh.seek(0, os.SEEK_END)
            self._handles[key] = fh

    def append(self, x, n_atoms, *, species=()) -> None:
        """Append rows (not committed until :meth:`commit`).

        Args:
            x: ``[r, d]`` descriptors (tensor or array), cast to the storage dtype.
            n_atoms: atoms per structure of these rows (sums to ``r``).
            species: chemical symbols present in these rows (recorded when not
                multicomponent).

        Raises:
            ValueError: wrong width or ``n_atoms`` that does not sum to ``r``.
        """
        if self.done:
            raise ValueError(f"{self.path}: the store is complete; nothing can be appended")
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.ascontiguousarray(x, dtype=self.dtype)
        counts = np.ascontiguousarray(n_atoms, dtype=np.int64).reshape(-1)
        if x.ndim != 2 or x.shape[1] != self.width:
            raise ValueError(f"`x` must be [r, {self.width}], got shape {x.shape}")
        if (counts < 0).any() or int(counts.sum()) != x.shape[0]:
            raise ValueError(f"`n_atoms` sums to {int(counts.sum())}, `x` has {x.shape[0]} rows")
        if not self._handles:
            self._open_files()
        for key, data in (("descriptors", x), ("n_atoms", counts)):
            self._handles[key].write(data.tobytes())
            self._digests[key].update(data.tobytes())
        self._pending[0] += x.shape[0]
        self._pending[1] += counts.size
        if not self.meta["multicomponent"]:
            self.meta["species"] = sorted(set(self.meta["species"]) | set(species))

    def commit(self) -> None:
        """Make the rows appended so far durable: files flushed and ``fsync``-ed, then the
        metadata (rows, structures, digests) replaced atomically."""
        for fh in self._handles.values():
            fh.flush()
            os.fsync(fh.fileno())
        self.meta["rows"] += self._pending[0]
        self.meta["frames"] += self._pending[1]
        self._pending = [0, 0]
        if self._digests:
            self.meta["sha256"] = {k: d.hexdigest() for k, d in self._digests.items()}
        self._save(self.meta)

    def complete(self) -> DescriptorStore:
        """Commit, write the ``.npy`` headers, mark the store complete, release the lock and
        return it opened (:meth:`DescriptorStore.open`).

        Raises:
            ValueError: the store holds no rows.
        """
        if not self.done:
            self.commit()
            if self.rows == 0:
                raise ValueError(f"{self.path}: no descriptors were appended; nothing to complete")
            for key, shape, dtype in (
                ("descriptors", (self.rows, self.width), self.dtype),
                ("n_atoms", (self.frames,), np.dtype(np.int64)),
            ):
                if key not in self._handles:
                    self._open_files()
                fh = self._handles[key]
                fh.seek(0)
                fh.write(npy_header(dtype, shape))
                fh.flush()
                os.fsync(fh.fileno())
            self.meta["complete"] = True
            self._save(self.meta)
        self.close()
        return DescriptorStore.open(self.path)

    def close(self) -> None:
        """Close the files and release the lock (what was not committed is dropped at the
        next open)."""
        self._handles = {}
        self._stack.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _species_of(frames: list) -> set[str]:
    return {s for atoms in frames for s in set(atoms.get_chemical_symbols())}


def write_descriptor_store(
    trajectory: str | os.PathLike,
    path: str | os.PathLike,
    *,
    index: str = ":",
    k: int = DEFAULT_K,
    cutoff: float = DEFAULT_CUTOFF,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    batch_atoms: int | None = None,
    multicomponent: bool = False,
    species=None,
    overwrite: bool = False,
    progress: bool = False,
) -> DescriptorStore:
    """Stream the descriptors of a trajectory into a store; resume an interrupted run.

    Frames are read one at a time, descriptors computed in float64 per batch of about
    ``batch_atoms`` atoms, stored as ``dtype`` and committed per batch, so memory holds one
    batch whatever the trajectory's size. A rerun with the same trajectory content and
    parameters continues after the last committed frame (or returns the complete store).

    Args:
        trajectory: any file ASE reads frame by frame (extxyz, .traj, LAMMPS dump, ...).
        path: the store folder (``name.qstore``).
        index: ASE selection (``":"``, ``"0:1000"``, ``"::10"``).
        k: neighbours per environment.
        cutoff: cutoff radius (Å).
        dtype: storage dtype, ``torch.float32`` (half the bytes) or ``torch.float64``.
        device: where descriptors are computed.
        batch_atoms: atoms per batch (default :data:`DEFAULT_BATCH_ATOMS`; a resumed run
            keeps the recorded one).
        multicomponent: store the multicomponent descriptor; needs ``species`` (a stream
            cannot see every element in advance).
        species: element symbols or atomic numbers of the multicomponent blocks.
        overwrite: discard an existing store and start again.
        progress: show a progress bar over frames (``tqdm``).

    Returns:
        the complete :class:`~quests_torch.store.DescriptorStore`.

    Raises:
        FileNotFoundError: no such trajectory.
        ValueError: bad parameters, an empty selection, a store of another run (names what
            changed) or with changed committed bytes.
        StoreInUseError: another process is writing the store.
    """
    from .descriptors import get_descriptors

    check_index(index)
    trajectory = Path(trajectory)
    if not trajectory.is_file():
        raise FileNotFoundError(f"{trajectory}: no such file")
    block = _block_species(multicomponent, species)
    if batch_atoms is not None and (isinstance(batch_atoms, bool) or int(batch_atoms) < 1):
        raise ValueError(f"`batch_atoms` must be a positive integer, got {batch_atoms!r}")
    key = trajectory_key(trajectory)
    writer = StoreWriter(
        path,
        k=k,
        cutoff=cutoff,
        dtype=dtype,
        multicomponent=block is not None,
        species=block or (),
        identity={"trajectory": key, "index": index},
        source={"path": str(trajectory.resolve()), "key": key, "index": index},
        overwrite=overwrite,
        batch_atoms=int(batch_atoms or DEFAULT_BATCH_ATOMS),
    )
    with writer:
        if not writer.done:
            _stream(writer, trajectory, index, k, cutoff, device, block, progress,
                    get_descriptors)  # fmt: skip
        if writer.rows == 0 and not writer.done:
            raise ValueError(f"{trajectory}: the selection {index!r} holds no structures")
        return writer.complete()


def _block_species(multicomponent: bool, species) -> list[str] | None:
    """The multicomponent block species (symbols, in column order), or ``None``."""
    from .descriptors import species_numbers

    if not multicomponent and species is None:
        return None
    if species is None:
        raise ValueError(
            "`species` is required with `multicomponent=True` when streaming: the block "
            "species must be known before the first frame"
        )
    from ase.data import chemical_symbols

    return [chemical_symbols[z] for z in species_numbers(species)]


def _stream(writer, trajectory, index, k, cutoff, device, block, progress, describe) -> None:
    total = count_frames(trajectory, index) if progress else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=writer.frames, desc="descriptors", unit="frame")
    frames = frames_after(trajectory, index, writer.frames)
    try:
        for batch in prefetched(batches_of(frames, writer.batch_atoms)):
            x = describe(batch, k, cutoff, dtype=torch.float64, device=device, species=block)
            writer.append(x, [len(a) for a in batch], species=_species_of(batch))
            writer.commit()
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
