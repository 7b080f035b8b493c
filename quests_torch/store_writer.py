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
import shutil
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from ._version import __version__
from .checks import (
    DEFAULT_CUTOFF,
    DEFAULT_K,
    check_cutoff,
    check_k,
    check_positive_int,
    check_readers,
)
from .io import DESCRIPTOR_FORMAT, atomic_write, check_index, count_frames
from .resume import HeldLock, TableInUseError, describe_change, table_lock, trajectory_key
from .screen_io import batches_of, frames_after, prefetched
from .store import DescriptorStore
from .store_files import (
    DATA_FILE,
    HEADER_BYTES,
    KIND,
    META_FILE,
    N_ATOMS_FILE,
    STORE_FORMAT,
    WRITING_MARK,
    StoreInUseError,
    check_meta,
    check_store_contents,
    check_unused,
    discard_replacement,
    finish_swap,
    npy_header,
    open_store_file,
    params_key,
    read_meta,
    replacement_path,
    species_digest,
    store_lock_path,
    store_width,
    swap_in,
    try_flock,
)
from .structures import resolve_device

__all__ = [
    "DEFAULT_BATCH_ATOMS",
    "StoreWriter",
    "file_digest",
    "write_descriptor_store",
]

DEFAULT_BATCH_ATOMS = 100_000
"""Atoms per batch of :func:`write_descriptor_store` (about 50 MB of float64 rows at k=32)."""
_OVERWRITE = "overwrite=True (--overwrite)"
_MARK = WRITING_MARK.ljust(HEADER_BYTES, b" ")
_DIGESTS = ("descriptors", "n_atoms")


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
    writer holds it), finishes or undoes an overwrite stopped during its swap
    (:func:`finish_swap`), and then either starts a fresh store, continues an incomplete one
    with the same identity (files cut back to the committed bytes, checked by SHA-256), or
    finds it complete (:attr:`done`; :meth:`complete` then just opens it). Use it as a
    context manager or call :meth:`close`.

    With ``overwrite``, the new store is written beside the old one, in
    :func:`~quests_torch.store.replacement_path` (``.<name>.overwrite``), and :meth:`complete`
    swaps the two: until then the old store stays whole, a failure leaves it as it was, and
    a rerun with the same identity and ``overwrite`` resumes the new one.

    Every file the writer writes, truncates or replaces is opened without following a
    symbolic link and must be a regular file with no other hard link; its data files also
    hold an exclusive ``flock`` while open, so a second writer is refused even if the lock
    file was deleted, and :meth:`commit` / :meth:`complete` stop when the lock file at its
    path is no longer the one locked (:meth:`quests_torch.resume.HeldLock.check`).

    Args:
        path: the store folder (``name.qstore``); created when missing.
        k: neighbours per environment.
        cutoff: cutoff radius (Å).
        dtype: storage dtype, ``"float32"`` / ``"float64"`` (or the torch/numpy dtype).
        multicomponent: rows hold the multicomponent descriptor of ``species``.
        species: the block species (multicomponent), else elements known up front
            (chemical symbols).
        identity: further parameters identifying the store (the trajectory's key, the
            selection, ...; JSON values): a rerun with other values is refused.
        source: recorded as the store's ``source`` (a JSON object or ``None``).
        overwrite: replace an existing store (built beside it, swapped in when complete).
        batch_atoms: recorded, so that a resumed run batches as the first one did.

    Raises:
        TypeError: a parameter of the wrong type (``k`` not an int, ...).
        ValueError: a bad parameter (checked before anything is written), the existing store
            has another identity (the message names what changed), its committed bytes
            changed, ``path`` exists and is not a store, or one of its files is a symbolic
            link or not a regular file.
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
        self.params = _params(k, cutoff, dtype, multicomponent, species, identity)
        self.dtype = np.dtype(self.params["dtype"])
        self.width = self.params["width"]
        species = self.params["block_species"] or sorted(set(_symbols(species, "species")))
        if not isinstance(source, dict | None):
            raise TypeError(f"`source` must be a dict or None, got {type(source).__name__}")
        if batch_atoms is not None:
            batch_atoms = check_positive_int(batch_atoms, "batch_atoms")
        try:
            self.key = params_key(self.params)
            json.dumps(source)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"`identity` and `source` must hold JSON values ({exc})") from None
        self._stack = ExitStack()
        self._handles: dict = {}
        self._digests: dict = {}
        self._pending = [0, 0]  # rows, structures appended since the last commit
        self._dir = self.path  # the folder written: the store, or its replacement
        self._closed = False
        try:
            self._lock = self._take_lock()
            finish_swap(self.path)
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

    def _take_lock(self) -> HeldLock:
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path}: exists and is not a descriptor store folder")
        try:
            return self._stack.enter_context(table_lock(Path(os.path.realpath(self.path))))
        except TableInUseError:
            raise StoreInUseError(
                f"{self.path}: being written by another process (its lock "
                f"{store_lock_path(self.path)} is held); wait for it to finish or use "
                "another output name"
            ) from None

    def _open_meta(self, overwrite: bool, species, source, batch_atoms) -> dict:
        check_store_contents(self.path)  # never discarded, not even with overwrite
        if overwrite:
            self._dir = replacement_path(self.path)
            meta = self._resumable(self._dir)
            if meta is None:
                discard_replacement(self._dir)
        elif os.path.lexists(self.path / META_FILE):
            meta = read_meta(self.path)
            check_meta(meta, self.path)
            if meta["key"] != self.key:
                raise self._another_run(meta)
        else:
            meta = None
        if meta is None:
            return self._start(species, source, batch_atoms)
        if meta["complete"] is not True:
            self._open_data()
            self._rewind(meta)
        return meta

    def _resumable(self, folder: Path) -> dict | None:
        """The metadata of an interrupted overwrite in ``folder`` with this identity."""
        if not folder.exists():
            return None
        check_store_contents(folder)
        try:
            meta = read_meta(folder)
            check_meta(meta, folder)
        except (OSError, ValueError):
            return None
        return meta if meta["key"] == self.key else None

    def _another_run(self, meta: dict) -> ValueError:
        change = describe_change(meta["params"], self.params)
        hint = ""
        if self._resumable(new := replacement_path(self.path)) is not None:
            hint = f"; an interrupted overwrite with these inputs waits in {new}"
        return ValueError(
            f"{self.path}: holds descriptors of another run ({change}, per {META_FILE}); "
            f"rerun with the original inputs, use another output name or {_OVERWRITE}{hint}"
        )

    def _start(self, species, source, batch_atoms) -> dict:
        folder = self._dir
        check_unused(folder)
        for name in (DATA_FILE, N_ATOMS_FILE, META_FILE):
            (folder / name).unlink(missing_ok=True)  # a link is removed, never followed
        meta = {
            "kind": KIND,
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
            "sha256": {key: hashlib.sha256().hexdigest() for key in _DIGESTS},
        }
        meta["sha256"]["species"] = species_digest(meta["species"])
        for name in (DATA_FILE, N_ATOMS_FILE):
            atomic_write(folder / name, lambda p: p.write_bytes(_MARK))
        self._save(meta)
        self._open_data()
        self._digests = {key: hashlib.sha256() for key in _DIGESTS}
        return meta

    def _open_data(self) -> None:
        """Open both data files for writing (never through a link) and ``flock`` them."""
        for key, name in zip(_DIGESTS, (DATA_FILE, N_ATOMS_FILE), strict=True):
            path = self._dir / name
            try:
                fd = open_store_file(path, write=True)
            except FileNotFoundError:
                raise ValueError(
                    f"{path}: missing, but {META_FILE} records committed rows; use {_OVERWRITE}"
                ) from None
            fh = self._stack.enter_context(os.fdopen(fd, "r+b"))
            if not try_flock(fd):
                raise StoreInUseError(
                    f"{path}: being written by another process (the file is locked although "
                    f"the store's lock {store_lock_path(self.path)} was free: was that lock "
                    "file deleted?); wait for it to finish"
                )
            fh.seek(0, os.SEEK_END)  # rows are appended (_rewind cuts first when resuming)
            self._handles[key] = fh

    def _rewind(self, meta: dict) -> None:
        """Check the committed bytes of both files and cut what follows them."""
        sizes = {"descriptors": meta["rows"] * self.width * self.dtype.itemsize}
        sizes["n_atoms"] = meta["frames"] * 8
        for key, fh in self._handles.items():
            path = self._dir / (DATA_FILE if key == "descriptors" else N_ATOMS_FILE)
            fh.seek(0)
            head = fh.read(HEADER_BYTES)
            if head != _MARK and not head.startswith(b"\x93NUMPY"):
                raise ValueError(
                    f"{path}: does not start with a store's header or its writing mark: not "
                    f"a file of this store; refusing to truncate it; use {_OVERWRITE}"
                )
            digest = hashlib.sha256()
            left = sizes[key]
            while left and (block := fh.read(min(1 << 22, left))):
                digest.update(block)
                left -= len(block)
            if left:
                raise ValueError(
                    f"{path}: shorter than the {sizes[key]} bytes committed in {META_FILE}; "
                    f"use {_OVERWRITE}"
                )
            if digest.hexdigest() != meta["sha256"][key]:
                raise ValueError(
                    f"{path}: its committed rows changed since they were written (SHA-256 "
                    f"differs from {META_FILE}); refusing to truncate it; use {_OVERWRITE}"
                )
            fh.seek(0)
            fh.write(_MARK)  # a completion cut short may have written the header
            fh.truncate(HEADER_BYTES + sizes[key])
            fh.flush()
            os.fsync(fh.fileno())
            fh.seek(0, os.SEEK_END)
            self._digests[key] = digest

    def _save(self, meta: dict) -> None:
        atomic_write(self._dir / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=1)))

    def append(self, x, n_atoms, *, species=()) -> None:
        """Append rows (not committed until :meth:`commit`).

        Args:
            x: ``[r, d]`` descriptors (tensor or array), cast to the storage dtype; finite.
            n_atoms: atoms per structure of these rows (integers summing to ``r``).
            species: chemical symbols present in these rows (recorded when not
                multicomponent).

        Raises:
            ValueError: wrong width, a row with NaN or infinite values (after the cast: a
                float64 value beyond the float32 range too; names the row), or ``n_atoms``
                that does not sum to ``r``.
            TypeError: ``n_atoms`` not integers.
        """
        if self.done:
            raise ValueError(f"{self.path}: the store is complete; nothing can be appended")
        x, counts = _checked_batch(x, n_atoms, self.dtype, self.width)
        symbols = _symbols(species, "species")
        self._lock.check()
        for key, data in (("descriptors", x), ("n_atoms", counts)):
            self._handles[key].write(data.tobytes())
            self._digests[key].update(data.tobytes())
        self._pending[0] += x.shape[0]
        self._pending[1] += counts.size
        if not self.meta["multicomponent"]:
            self.meta["species"] = sorted(set(self.meta["species"]) | set(symbols))

    def commit(self) -> None:
        """Make the rows appended so far durable: files flushed and ``fsync``-ed, then the
        metadata (rows, structures, digests) replaced atomically.

        Raises:
            quests_torch.resume.TableInUseError: the lock file was removed or replaced while
                this writer held it (nothing more is committed).
        """
        self._lock.check()
        for fh in self._handles.values():
            fh.flush()
            os.fsync(fh.fileno())
        self.meta["rows"] += self._pending[0]
        self.meta["frames"] += self._pending[1]
        self._pending = [0, 0]
        if self._digests:
            self.meta["sha256"] = {k: d.hexdigest() for k, d in self._digests.items()}
        self.meta["sha256"]["species"] = species_digest(self.meta["species"])
        self._save(self.meta)

    def complete(self) -> DescriptorStore:
        """Commit, write the ``.npy`` headers, mark the store complete (an overwrite: swap it
        in for the old one), release the lock and return it opened
        (:meth:`DescriptorStore.open`).

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
                fh = self._handles[key]
                fh.seek(0)
                fh.write(npy_header(dtype, shape))
                fh.flush()
                os.fsync(fh.fileno())
            self.meta["complete"] = True
            self._save(self.meta)
        if self._dir != self.path:
            self._lock.check()
            self._close_files()
            swap_in(self._dir, self.path)
            self._dir = self.path
        self.close()
        return DescriptorStore.open(self.path)

    def _close_files(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles = {}

    def close(self) -> None:
        """Close the files and release the lock (what was not committed is dropped at the
        next open; an overwrite that committed nothing is removed, the old store untouched)."""
        if self._closed:
            return
        self._closed = True
        self._close_files()
        try:
            if self._dir != self.path and not self.done and self.rows == 0:
                shutil.rmtree(self._dir, ignore_errors=True)  # nothing to resume in it
        finally:
            self._stack.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _params(k, cutoff, dtype, multicomponent, species, identity) -> dict:
    """The checked parameters identifying a store (its ``params``; their hash is its key)."""
    k, cutoff = check_k(k), check_cutoff(cutoff)
    if not isinstance(multicomponent, bool | np.bool_):
        raise TypeError(f"`multicomponent` must be a bool, got {type(multicomponent).__name__}")
    if identity is not None and not isinstance(identity, dict):
        raise TypeError(f"`identity` must be a dict or None, got {type(identity).__name__}")
    block = _symbols(species, "species") if multicomponent else None
    if block is not None and len(set(block)) != len(block):
        raise ValueError(f"`species` must be distinct chemical symbols, got {block}")
    name = _storage_dtype(dtype)
    return {
        "k": k,
        "cutoff": cutoff,
        "dtype": name,
        "width": store_width(k, block or [], bool(multicomponent)),
        "multicomponent": bool(multicomponent),
        "block_species": block,
        "descriptor_format": DESCRIPTOR_FORMAT,
        **(identity or {}),
    }


def _symbols(species, name: str) -> list[str]:
    """``species`` as a list of chemical symbols (strings ASE knows)."""
    from ase.data import atomic_numbers

    if isinstance(species, str):
        raise TypeError(f"`{name}` must be a sequence of chemical symbols, got a str")
    symbols = list(species)
    bad = [s for s in symbols if not (isinstance(s, str) and s in atomic_numbers and s != "X")]
    if bad:
        raise ValueError(f"`{name}` must be chemical symbols, got {bad[0]!r}")
    return symbols


def _checked_batch(x, n_atoms, dtype: np.dtype, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``x`` cast to the storage dtype and ``n_atoms`` as int64, checked."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != width:
        raise ValueError(f"`x` must be [r, {width}], got shape {x.shape}")
    if x.dtype.kind not in "fiu":
        raise TypeError(f"`x` must hold real numbers, got {x.dtype}")
    with np.errstate(over="ignore"):  # beyond float32: infinite, refused below
        x = np.ascontiguousarray(x, dtype=dtype)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"`x` row {row} holds NaN or infinite values (as {dtype}); a store holds finite "
            "descriptors"
        )
    counts = np.asarray(n_atoms).reshape(-1)
    if counts.size and counts.dtype.kind not in "iu":
        raise TypeError(f"`n_atoms` must be integers, got {counts.dtype}")
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    if ((counts < 0) | (counts > x.shape[0])).any() or int(counts.sum()) != x.shape[0]:
        raise ValueError(f"`n_atoms` sums to {int(counts.sum())}, `x` has {x.shape[0]} rows")
    return x, counts


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
    readers: int = 0,
    types=None,
) -> DescriptorStore:
    """Stream the descriptors of a trajectory into a store; resume an interrupted run.

    Frames are read one at a time, descriptors computed in float64 per batch of about
    ``batch_atoms`` atoms, stored as ``dtype`` and committed per batch, so memory holds one
    batch whatever the trajectory's size. A rerun with the same trajectory content and
    parameters continues after the last committed frame (or returns the complete store).

    Args:
        trajectory: any file ASE reads frame by frame (extxyz, .traj, LAMMPS dump, ...);
            ``.xyz``/``.extxyz`` are read by the fast reader of :mod:`quests_torch.readers`.
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
        readers: reader processes parsing an ``.xyz``/``.extxyz`` trajectory (0 or 1: in
            this process, by the fast reader; :func:`quests_torch.io.iter_structures`); the
            stored descriptors do not depend on it.
        types: LAMMPS types to elements for a dump without an ``element`` column
            (:func:`quests_torch.io.iter_structures`); part of the trajectory's identity.

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
    if batch_atoms is not None:
        batch_atoms = check_positive_int(batch_atoms, "batch_atoms")
    readers = check_readers(readers)
    from .readers.lammps import parse_types

    types = parse_types(types)
    device = resolve_device(device)  # refused before anything is written
    key = trajectory_key(trajectory)
    if types is not None:  # other elements: another store
        key += f"|types={sorted(types.items())}"
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
                    get_descriptors, readers, types)  # fmt: skip
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


def _stream(
    writer, trajectory, index, k, cutoff, device, block, progress, describe, readers, types
) -> None:
    total = count_frames(trajectory, index) if progress else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=writer.frames, desc="descriptors", unit="frame")
    frames = frames_after(trajectory, index, writer.frames, readers=readers, types=types)
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
