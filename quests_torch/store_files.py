"""The files of a descriptor store (:mod:`quests_torch.store`): names, layout, safe opening,
and the metadata with its checks.

Shared by the reader (:mod:`quests_torch.store`, which re-exports every name here) and the
writer (:mod:`quests_torch.store_writer`). Every entry of ``meta.json`` is checked by
:func:`check_meta`: its JSON type (booleans are not numbers), its range, and, for the
parameters (``k``, ``cutoff``, ``dtype``, ``width``, ``multicomponent``, the block species),
its agreement with ``params``, whose SHA-256 is the store's ``key``; a failure is one
``ValueError`` line naming the store and the entry. No file of a store is opened through a
symbolic link (:func:`open_store_file`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np

from ._files import fsync_dir
from .checks import MAX_K
from .resume import lock_path

__all__ = [
    "DATA_FILE",
    "HEADER_BYTES",
    "KIND",
    "META_FILE",
    "N_ATOMS_FILE",
    "STORE_FORMAT",
    "STORE_SUFFIX",
    "WRITING_MARK",
    "StoreInUseError",
    "check_meta",
    "check_store_contents",
    "check_unused",
    "discard_replacement",
    "finish_swap",
    "interrupted_swap",
    "is_complete",
    "npy_header",
    "open_store_file",
    "params_key",
    "read_meta",
    "replaced_path",
    "replacement_path",
    "species_digest",
    "store_lock_path",
    "store_width",
    "swap_in",
    "sync_folder",
    "try_flock",
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
KIND = "quests-torch descriptor store"
"""The ``kind`` entry of a store's ``meta.json``."""
_DTYPES = {"float32": np.float32, "float64": np.float64}
_DIGESTS = ("descriptors", "n_atoms")
_HEX = re.compile("[0-9a-f]{64}")
_META_LIMIT = 1 << 24  # bytes of meta.json (a store's is about 1 kB)


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


def store_lock_path(path: str | os.PathLike) -> Path:
    """``<store>.lock`` beside the store folder (the folder's real path: a store reached through
    a symbolic link has one lock). The file stays: the lock is its ``flock``
    (:func:`quests_torch.resume.table_lock`), held by the writer for its whole run."""
    return lock_path(Path(os.path.realpath(path)))


def replacement_path(path: str | os.PathLike) -> Path:
    """``.<store>.overwrite`` beside the store: where an overwrite builds the new store."""
    real = Path(os.path.realpath(path))
    return real.with_name(f".{real.name}.overwrite")


def replaced_path(path: str | os.PathLike) -> Path:
    """``.<store>.replaced`` beside the store: where an overwrite moves the old store for the
    moment of the swap."""
    real = Path(os.path.realpath(path))
    return real.with_name(f".{real.name}.replaced")


def open_store_file(path: Path, *, write: bool = False) -> int:
    """A file descriptor on ``path``, a regular file of a store, opened without following a
    symbolic link (``O_NOFOLLOW``): a store never reads or writes through one. For writing,
    the file must also have no other hard link (a store's files are its own).

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``path`` is a symbolic link, not a regular file, or (``write``) a file
            with other hard links (names it).
    """
    flags = os.O_RDWR if write else os.O_RDONLY
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        fd = -1
    st = os.fstat(fd) if fd >= 0 else None
    if st is not None and stat.S_ISREG(st.st_mode) and not (write and st.st_nlink > 1):
        return fd
    if fd >= 0:
        os.close(fd)
    if st is None:
        problem = "a symbolic link"
    elif not stat.S_ISREG(st.st_mode):
        problem = "not a regular file"
    else:
        problem = f"a file with {st.st_nlink - 1} other hard link(s)"
    raise ValueError(
        f"{path}: {problem}; a descriptor store's files must be its own regular files "
        f"(refusing to {'write' if write else 'read'} through it)"
    )


def interrupted_swap(folder: Path) -> str | None:
    """What an overwrite of the store ``folder`` left when it was stopped between moving the
    old store aside and removing it (``None`` when the folder is in place or nothing is left)."""
    old, new = replaced_path(folder), replacement_path(folder)
    if folder.exists() or not old.exists():
        return None
    return (
        f"{folder}: an overwrite was stopped while it replaced this store: the old store is "
        f"in {old}" + (f", the new one in {new}" if new.exists() else "") + "; rerun the "
        "writer on this path (`quests-torch descriptors ... -o` it, any options) to finish or "
        "undo the swap"
    )


def read_meta(folder: Path) -> dict:
    """``meta.json`` of the store in ``folder``, checked to be a store's JSON object.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: not a store folder, an unreadable ``meta.json``, or a store whose
            overwrite was stopped halfway (:func:`interrupted_swap`).
    """
    if not folder.exists():
        if (swap := interrupted_swap(folder)) is not None:
            raise ValueError(swap)
        raise FileNotFoundError(f"{folder}: no such descriptor store")
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a descriptor store (a store is a folder)")
    meta_file = folder / META_FILE
    if not os.path.lexists(meta_file):
        raise ValueError(f"{folder}: not a descriptor store (no {META_FILE})")
    fd = open_store_file(meta_file)
    try:
        with os.fdopen(fd, "rb") as fh:
            text = fh.read(_META_LIMIT + 1)
        if len(text) > _META_LIMIT:
            raise ValueError(f"larger than {_META_LIMIT} bytes")
        meta = json.loads(text)
    except (OSError, ValueError, RecursionError) as exc:
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ValueError(f"{meta_file}: unreadable store metadata ({problem})") from None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise ValueError(f"{meta_file}: not the metadata of a {KIND}")
    fmt = meta.get("store_format")
    if isinstance(fmt, bool) or not isinstance(fmt, int) or not 1 <= fmt <= STORE_FORMAT:
        raise ValueError(
            f"{folder}: metadata `store_format` {_show(fmt)} is not one this version reads "
            f"(1 to {STORE_FORMAT})"
        )
    return meta


def _show(v) -> str:
    """A short, one-line picture of a metadata value."""
    if isinstance(v, dict | list):
        try:
            text = json.dumps(v)
        except (ValueError, RecursionError):
            text = ""
        if 0 < len(text) <= 40:
            return text
        return f"a JSON {'object' if isinstance(v, dict) else 'list'}"
    text = repr(v)
    return text if len(text) <= 40 else text[:36] + "...'"[: 4 if isinstance(v, str) else 3]


def _bad(folder: Path, name: str, expected: str, v) -> ValueError:
    return ValueError(f"{folder}: metadata `{name}` must be {expected}, got {_show(v)}")


def _count(meta: dict, name: str, folder: Path, least: int = 0) -> int:
    v = meta.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or v < least:
        raise _bad(folder, name, f"an integer >= {least}", v)
    return v


def params_key(params: dict) -> str:
    """SHA-256 of a store's parameters (its ``key``): their JSON with sorted keys."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _check_keyed(meta: dict, folder: Path) -> dict:
    """``params`` and ``key`` checked against each other and against the top-level entries."""
    params, key = meta.get("params"), meta.get("key")
    if not isinstance(params, dict):
        raise _bad(folder, "params", "a JSON object", params)
    if not (isinstance(key, str) and _HEX.fullmatch(key)):
        raise _bad(folder, "key", "a SHA-256 hex digest", key)
    try:
        digest = params_key(params)
    except (TypeError, ValueError, RecursionError):
        raise _bad(folder, "params", "a plain JSON object", params) from None
    if digest != key:
        raise ValueError(f"{folder}: metadata `params` do not hash to its `key` (edited metadata)")
    for name in ("k", "cutoff", "dtype", "width", "multicomponent"):
        top, keyed = meta.get(name), params.get(name)
        if type(top) is not type(keyed) or top != keyed:
            raise ValueError(
                f"{folder}: metadata `{name}` is {_show(top)} but the parameters the store "
                f"was written with (`params`, covered by `key`) say {_show(keyed)} (edited "
                "metadata)"
            )
    return params


def _check_species(meta: dict, folder: Path) -> list:
    from ase.data import atomic_numbers

    species = meta.get("species")
    if not (
        isinstance(species, list)
        and all(isinstance(s, str) and s in atomic_numbers and s != "X" for s in species)
        and len(set(species)) == len(species)
    ):
        raise _bad(folder, "species", "a list of distinct chemical symbols", species)
    return species


def species_digest(species: list) -> str:
    """SHA-256 of a store's ``species`` (``sha256["species"]`` in its metadata: the elements of
    a plain store are found while writing, so they are not among the keyed parameters)."""
    return hashlib.sha256(json.dumps(species).encode()).hexdigest()


def _check_block_species(species: list, params: dict, folder: Path, multicomponent: bool):
    block = params.get("block_species")
    if multicomponent and block != species:
        raise ValueError(
            f"{folder}: metadata `species` {_show(species)} are not the block species the "
            f"store was written with ({_show(block)}; edited metadata)"
        )
    if not multicomponent and (block is not None or species != sorted(species)):
        raise _bad(folder, "species", "the sorted elements of a plain store", species)


def _check_parameters(meta: dict, folder: Path) -> tuple:
    """``k``, ``cutoff``, ``dtype``, ``multicomponent`` and ``species``, each of its type and
    in its range."""
    k, cutoff, dtype = meta.get("k"), meta.get("cutoff"), meta.get("dtype")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise _bad(folder, "k", f"an integer in [1, {MAX_K}]", k)
    try:
        ok = not isinstance(cutoff, bool) and math.isfinite(cutoff) and cutoff > 0
    except (TypeError, OverflowError):  # not a number; an integer beyond any float
        ok = False
    if not ok:
        raise _bad(folder, "cutoff", "a finite positive distance", cutoff)
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise _bad(folder, "dtype", "float32 or float64", dtype)
    multicomponent = meta.get("multicomponent")
    if not isinstance(multicomponent, bool):
        raise _bad(folder, "multicomponent", "true or false", multicomponent)
    return k, dtype, multicomponent, _check_species(meta, folder)


def check_meta(meta: dict, folder: Path) -> tuple[int, int, np.dtype]:
    """``(rows, width, dtype)`` of a store's metadata, every entry checked: its type, its
    range, and its agreement with the parameters the store was keyed with.

    ``k``, ``cutoff``, ``dtype``, ``width`` and ``multicomponent`` must equal those of
    ``params`` (booleans are not numbers), ``key`` must be the SHA-256 of ``params``, the
    species must be chemical symbols (the block species of ``params`` for a multicomponent
    store), and the counts, flags, digests, ``batch_atoms`` and ``source`` must have their
    types.

    Raises:
        ValueError: one line naming the store and the entry.
    """
    k, dtype, multicomponent, species = _check_parameters(meta, folder)
    width = _count(meta, "width", folder)
    expected = store_width(k, species, multicomponent)
    if width != expected:
        raise ValueError(
            f"{folder}: metadata width {width} does not fit k={k} (2k-1 = {2 * k - 1}"
            + (f", {len(species)} species: {expected}" if multicomponent else "")
            + ")"
        )
    params = _check_keyed(meta, folder)
    _check_block_species(species, params, folder, multicomponent)
    _check_state(meta, folder)
    return _count(meta, "rows", folder), width, np.dtype(_DTYPES[dtype])


def _check_state(meta: dict, folder: Path) -> None:
    """The committed state's entries: counts, flag, digests, batch size, source."""
    _count(meta, "frames", folder)
    if not isinstance(meta.get("complete"), bool):
        raise _bad(folder, "complete", "true or false", meta.get("complete"))
    sha = meta.get("sha256")
    if not (
        isinstance(sha, dict)
        and all(isinstance(sha.get(n), str) and _HEX.fullmatch(sha[n]) for n in _DIGESTS)
    ):
        raise _bad(folder, "sha256", "an object of `descriptors` and `n_atoms` digests", sha)
    # the species digest is absent in stores of earlier builds
    if "species" in sha and sha["species"] != species_digest(meta["species"]):
        raise ValueError(
            f"{folder}: metadata `species` {_show(meta['species'])} do not match their "
            "SHA-256 in `sha256` (edited metadata)"
        )
    if meta.get("batch_atoms") is not None:
        _count(meta, "batch_atoms", folder, least=1)
    if not isinstance(meta.get("source"), dict | None):
        raise _bad(folder, "source", "a JSON object or null", meta.get("source"))
    if not isinstance(meta.get("quests_torch", ""), str):
        raise _bad(folder, "quests_torch", "a version string", meta.get("quests_torch"))


def finish_swap(path: str | os.PathLike) -> str | None:
    """Finish or undo an overwrite of the store at ``path`` that was stopped during its swap.

    An overwrite moves the old store to :func:`~quests_torch.store.replaced_path`, moves the
    complete new one from :func:`~quests_torch.store.replacement_path` to ``path``, then
    removes the old one. Stopped after the first move, the new store is moved in (it is
    complete) or, if it is not there complete, the old one is moved back; stopped after the
    second, the old one is removed. Every :class:`StoreWriter` calls this under the store's
    lock before anything else, so no store is ever left only aside.

    Returns:
        what was done, in words, or ``None`` when there was nothing to do.
    """
    real = Path(os.path.realpath(path))
    old, new = replaced_path(path), replacement_path(path)
    if not old.exists():
        return None
    if real.exists():
        done = f"removed {old}, the store an overwrite replaced"
    elif is_complete(new):
        os.rename(new, real)
        sync_folder(real.parent)
        done = f"moved the complete new store {new} to {real}"
    else:
        os.rename(old, real)
        sync_folder(real.parent)
        return f"moved the old store {old} back to {real} (the new one was not complete)"
    shutil.rmtree(old, ignore_errors=True)
    return done


def swap_in(new: Path, path: Path) -> None:
    """Put the complete store ``new`` at ``path``: the old one aside, the new one in, the old
    one removed (each step undone or finished by :func:`finish_swap` if stopped)."""
    real = Path(os.path.realpath(path))
    old = replaced_path(path)
    if old.exists():
        shutil.rmtree(old)
    if real.exists():
        os.rename(real, old)
        sync_folder(real.parent)
    os.rename(new, real)
    sync_folder(real.parent)
    shutil.rmtree(old, ignore_errors=True)


def is_complete(folder: Path) -> bool:
    try:
        meta = read_meta(folder)
        check_meta(meta, folder)
    except (OSError, ValueError):
        return False
    return meta["complete"] is True


def sync_folder(folder: Path) -> None:
    """``fsync`` a folder, so that the renames in it are durable (as :mod:`quests_torch.io`
    does after its atomic writes)."""
    fsync_dir(folder)


def check_store_contents(folder: Path) -> None:
    """Refuse a folder holding anything but a store's files (never discarded, not even with
    overwrite)."""
    if not folder.is_dir():
        return
    known = {DATA_FILE, N_ATOMS_FILE, META_FILE, DATA_FILE + ".lock"}  # .lock: older stores
    temporary = tuple(f".{name}." for name in known)  # atomic_write's, left by a crash
    foreign = [
        p.name for p in folder.iterdir() if p.name not in known and not p.name.startswith(temporary)
    ]
    if foreign:
        raise ValueError(
            f"{folder}: exists and is not a descriptor store (it holds {foreign[0]!r}); "
            "use another output name"
        )


def try_flock(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd`` without waiting; ``False`` when another holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def check_unused(folder: Path) -> None:
    """Refuse to replace the data files of ``folder`` while a writer holds them."""
    for name in (DATA_FILE, N_ATOMS_FILE):
        try:
            fd = open_store_file(folder / name)
        except (OSError, ValueError):
            continue
        try:
            if not try_flock(fd):
                raise StoreInUseError(
                    f"{folder / name}: being written by another process; wait for it to finish"
                )
        finally:
            os.close(fd)  # releases the lock just taken


def discard_replacement(folder: Path) -> None:
    """Remove an overwrite's folder that cannot be resumed (another identity, damaged)."""
    if folder.exists():
        check_unused(folder)
        shutil.rmtree(folder)
