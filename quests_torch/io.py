"""Files: structures from ASE, descriptor files (.npz/.pt), a content-keyed descriptor cache.

A *descriptor file* holds ``descriptors [n_atoms, d]``, ``n_atoms`` per structure and the
parameters that made it (``k``, ``cutoff``, ``dtype``, package version), so that comparing
descriptors made with different parameters is caught as an error instead of giving
meaningless numbers. Descriptor files hold plain data only (a ``.pt`` is read with
``torch.load(weights_only=True)``, a ``.npz`` without pickles): reading one cannot run code.
Every file is written atomically (temporary file + ``os.replace``) with the permissions the
user's umask gives.

The reference cache stores the descriptors of a structure file under a key made of the
SHA-256 of the file's *content*, the ASE index selection, ``k``, ``cutoff``, ``dtype``, the
package version and :data:`DESCRIPTOR_FORMAT`; renaming or touching the file keeps the cache
valid, editing it or upgrading the package does not.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ._files import atomic_write, default_cache_dir, file_sha256, fsync_dir
from ._version import __version__
from .checks import check_index, check_readers
from .readers.formats import ALWAYS_NATIVE, iter_records, native_format
from .readers.formats import count_frames as native_count
from .readers.index import scan_xyz
from .readers.lammps import parse_types
from .store import is_store, open_store

__all__ = [
    "DESCRIPTOR_FORMAT",
    "DESCRIPTOR_SUFFIXES",
    "DescriptorSet",
    "atomic_write",
    "cached_descriptors",
    "check_index",
    "count_frames",
    "default_cache_dir",
    "file_sha256",
    "fsync_dir",
    "is_descriptor_file",
    "iter_structures",
    "load_descriptors",
    "read_structures",
    "save_descriptors",
]

#: file suffixes read as precomputed descriptors instead of structures
DESCRIPTOR_SUFFIXES = (".npz", ".pt")
#: version of what a descriptor file holds (the descriptor definition and the file layout);
#: raised when either changes, so that old files and cache entries are not taken for new ones
DESCRIPTOR_FORMAT = 1


@dataclass
class DescriptorSet:
    """Descriptors with the parameters that produced them.

    Attributes:
        x: ``[n_atoms, d]`` descriptors (CPU tensor).
        n_atoms: ``[n_structures]`` atoms per structure (int64 numpy array).
        k: neighbours per environment.
        cutoff: cutoff radius (Å).
        dtype: ``"float64"`` or ``"float32"``: the dtype they were computed in.
        source: where they came from (a path), for messages.
        meta: any further metadata stored with them.
    """

    x: torch.Tensor
    n_atoms: np.ndarray
    k: int
    cutoff: float
    dtype: str
    source: str = ""
    meta: dict = field(default_factory=dict)


def is_descriptor_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a descriptor file (by its suffix: ``.npz`` or ``.pt``) or a
    descriptor store (:func:`quests_torch.store.is_store`: ``.qstore`` or a store folder)."""
    return Path(path).suffix.lower() in DESCRIPTOR_SUFFIXES or is_store(path)


def _check_exists(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if p.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, expected a file")
    return p


def _is_xyz(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in (".xyz", ".extxyz")


def _check_xyz(path: str | os.PathLike) -> None:
    """Refuse an (ext)xyz file whose frame headers do not fit the file before ASE reads it."""
    if _is_xyz(path):
        try:
            _count_xyz_frames(Path(path))
        except ValueError as exc:
            raise ValueError(f"{path}: cannot read structures ({exc})") from None


def read_structures(path: str | os.PathLike, index: str = ":", *, types=None) -> list:
    """All selected structures of a file ASE can read, as a list of ``ase.Atoms``.

    Args:
        path: any ASE-readable file (extxyz, traj, POSCAR, ...); LAMMPS dumps and torch-sim
            HDF5 trajectories by their native readers (:mod:`quests_torch.readers.formats`).
        index: ASE index/slice string (``":"``, ``"0:10"``, ``"-1"``, ``"::2"``).
        types: LAMMPS types to elements, for a dump without an ``element`` column
            (``"1=Cu,2=Zr"``, ``"Cu,Zr"``, ``{1: "Cu"}``, ``["Cu", "Zr"]``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file (an xyz frame header that does not fit the file
            included), an empty selection, or NaN/inf positions or cell.
    """
    import ase.io

    _check_exists(path)
    check_index(index)
    if native_format(path, None) in ALWAYS_NATIVE:
        frames = list(iter_structures(path, index, types=types))
        if not frames:
            raise ValueError(f"{path}: the selection {index!r} holds no structures")
        return frames
    _check_xyz(path)
    try:
        frames = ase.io.read(path, index=index)
    except Exception as exc:  # ASE raises many types for unreadable files
        raise ValueError(
            f"{path}: cannot read structures ({type(exc).__name__}: {exc})".rstrip()
        ) from None
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise ValueError(f"{path}: the selection {index!r} holds no structures")
    for i, atoms in enumerate(frames):
        _check_finite(atoms, path, i)
    return frames


def _check_finite(atoms, path: str | os.PathLike, i: int) -> None:
    """Refuse a structure with NaN or inf positions or cell (a damaged number in the file)."""
    for name, value in (("positions", atoms.positions), ("cell", atoms.cell.array)):
        if not np.isfinite(value).all():
            raise ValueError(
                f"{path}: structure {i} of the selection has non-finite {name} (NaN or inf)"
            )


def iter_structures(
    path: str | os.PathLike, index: str = ":", *, readers: int | None = None, types=None
) -> Iterator:
    """Stream the selected structures of a file one at a time.

    Only one frame (or, with reader processes, a bounded number of chunks of frames) is held
    in memory at a time.

    Args:
        path: any file ASE reads frame by frame (extxyz, xyz, ASE .traj, LAMMPS dumps, ...).
        index: ASE index/slice string (``":"``, ``"0:10"``, ``"-1"``, ``"::2"``).
        readers: ``None`` (default): ASE's frames (``info``, calculator, per-atom arrays).
            An integer: (ext)xyz and ``.traj`` files by the native readers of
            :mod:`quests_torch.readers` (numbers, positions, cell and pbc, ASE's bit for
            bit), (ext)xyz in process for 0 or 1, by that many reader processes otherwise.
            LAMMPS dumps (reader processes as xyz) and torch-sim HDF5 files are always read
            natively (:mod:`quests_torch.readers.formats`); other formats by ASE.
        types: LAMMPS types to elements for a dump without an ``element`` column
            (:func:`quests_torch.readers.lammps.parse_types`); ignored for other formats.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file (raised when the first frame is read; an xyz file's
            frame headers are all checked then), a frame that cannot be read (named), or a
            frame with NaN/inf positions or cell.
    """
    _check_exists(path)
    check_index(index)
    if readers is not None:
        readers = check_readers(readers)
    types = parse_types(types)
    fmt = native_format(path, readers)
    if fmt is not None:
        yield from _iter_native(path, index, readers or 0, fmt, types)
        return
    import ase.io

    _check_xyz(path)
    frames = ase.io.iread(str(path), index=index)
    for i in itertools.count():
        try:
            atoms = next(frames)
        except StopIteration:
            return
        except (FileNotFoundError, MemoryError):
            raise
        except Exception as exc:
            raise ValueError(
                f"{path}: cannot read structures ({type(exc).__name__}: {exc})".rstrip()
            ) from None
        _check_finite(atoms, path, i)
        yield atoms


def _iter_native(path, index: str, readers: int, fmt: str, types) -> Iterator:
    """The selected frames of a trajectory by its native reader in :mod:`quests_torch.readers`
    (index cached, ``readers`` processes for xyz and dumps), each checked for NaN/inf."""
    records = iter_records(path, index, fmt=fmt, readers=readers, types=types)
    for i, record in enumerate(records):
        atoms = record.to_atoms()
        _check_finite(atoms, path, i)
        yield atoms


def _count_xyz_frames(path: Path, block: int = 1 << 24) -> int:
    """Frames of an (ext)xyz file, checking every frame header against the lines left
    (:func:`quests_torch.readers.index.scan_xyz`: one read in ``block``-byte pieces, never a
    loop over a claimed count; ASE's own frame index would spin through ``range(n_atoms)``
    of empty reads on a header of ``10**11`` atoms).

    Raises:
        ValueError: a header that is not a non-negative atom count, or a frame that runs past
            the end of the file (names the frame and the line).
    """
    return len(scan_xyz(path, block))


def count_frames(path: str | os.PathLike, index: str = ":") -> int | None:
    """Number of frames selected by ``index`` without parsing them, or ``None`` if unknown.

    Cheap for extxyz/xyz, LAMMPS dumps (the readers' frame index, cached: a resume does not
    rescan), ASE ``.traj`` and torch-sim files (their headers); other formats return
    ``None`` (progress bars then show no ETA). Used for progress bars only.
    """
    total: int | None = None
    try:
        total = native_count(path)
    except Exception:
        return None
    if total is None:
        return None
    try:
        from ase.io.formats import string2index

        sel = string2index(index)
    except Exception:
        return None
    if isinstance(sel, int):
        return 1 if -total <= sel < total else 0
    if isinstance(sel, slice):
        return len(range(total)[sel])
    return None


def save_descriptors(
    path: str | os.PathLike,
    x: torch.Tensor,
    n_atoms: np.ndarray | list[int],
    *,
    k: int,
    cutoff: float,
    dtype: str | None = None,
    extra: dict | None = None,
) -> None:
    """Write descriptors and their parameters to ``.npz`` (numpy) or ``.pt`` (torch), atomically.

    Both hold plain data only: arrays/tensors, numbers and strings (a ``.pt`` file loads with
    ``torch.load(path, weights_only=True)``). The file records ``k``, ``cutoff``, ``dtype``,
    the package version and :data:`DESCRIPTOR_FORMAT`.

    Args:
        path: output path; ``.pt`` writes a ``torch.save`` dict, anything else ``np.savez``.
        x: ``[n_atoms, d]`` descriptors, ``d = 2k - 1`` (times ``S + 1`` for ``S >= 2``
            species, the multicomponent form).
        n_atoms: atoms per structure (sums to ``n_atoms``).
        k: neighbours used.
        cutoff: cutoff used (Å).
        dtype: dtype name recorded (default: that of ``x``).
        extra: further scalar/string metadata to store.

    Raises:
        ValueError: ``n_atoms`` does not sum to the rows of ``x``, or its width does not fit
            ``k``.
    """
    x = x.detach().cpu()
    counts = np.asarray(n_atoms, dtype=np.int64).reshape(-1)
    if int(counts.sum()) != x.shape[0]:
        raise ValueError(f"`n_atoms` sums to {int(counts.sum())}, `x` has {x.shape[0]} rows")
    meta = {
        "k": int(k),
        "cutoff": float(cutoff),
        "dtype": dtype or str(x.dtype).removeprefix("torch."),
        "quests_torch": __version__,
        "descriptor_format": DESCRIPTOR_FORMAT,
        **{key: _plain(v) for key, v in (extra or {}).items()},
    }
    if x.ndim == 2 and (problem := _width_problem(x.shape[1], meta["k"], meta.get("species"))):
        raise ValueError(f"`x` {problem}")
    path = Path(path)
    if path.suffix.lower() == ".pt":
        data = {"descriptors": x, "n_atoms": torch.from_numpy(counts), **meta}
        atomic_write(path, lambda p: torch.save(data, p))
    else:
        arrays = {"descriptors": x.numpy(), "n_atoms": counts}
        arrays.update({key: np.asarray(v) for key, v in meta.items()})

        def write(p: Path) -> None:
            with open(p, "wb") as fh:  # a file object: np.savez would append ".npz" to a path
                np.savez(fh, **arrays)

        atomic_write(path, write)


def _plain(value: object) -> object:
    """numpy scalars and arrays as Python numbers and lists (what ``weights_only`` loads)."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    return value


def _width_problem(width: int, k: int, species: object = None) -> str | None:
    """Why ``width`` columns cannot be descriptors made with ``k`` (and ``species``), or None."""
    from .descriptors import descriptor_width

    plain = descriptor_width(k)
    if isinstance(species, list | tuple) and len(species) > 1:
        expected = descriptor_width(k, len(species))
        if width != expected:
            return (
                f"has {width} columns but k={k} and {len(species)} species give "
                f"(2k-1)(S+1) = {expected}"
            )
        return None
    multiple, rest = divmod(width, plain)
    if rest or multiple == 2 or multiple == 0:  # S + 1 >= 3 copies for S >= 2 species
        return (
            f"has {width} columns but k={k} gives 2k-1 = {plain} (or (S+1)(2k-1) with S >= 2 "
            "species for the multicomponent form): not descriptors made with this k"
        )
    return None


def _numpy_array_globals() -> contextlib.AbstractContextManager:
    """Allow ``weights_only`` loading to rebuild numpy arrays, and nothing else.

    quests-torch 0.1 stored ``n_atoms`` of ``.pt`` files as a numpy array; rebuilding one needs
    the array reconstructor, ``ndarray``, ``dtype`` and the numeric dtype classes, none of
    which can run code. Newer files hold tensors only.
    """
    safe = getattr(torch.serialization, "safe_globals", None)
    if safe is None:  # pragma: no cover - torch < 2.5: numpy arrays are refused
        return contextlib.nullcontext()
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core.multiarray import _reconstruct
    kinds = [type(np.dtype(c)) for c in "?bhilqBHILQefd"]  # the numeric dtypes' classes
    return safe([_reconstruct, np.ndarray, np.dtype, *dict.fromkeys(kinds)])


def _read_descriptor_file(p: Path, path: str | os.PathLike) -> dict:
    """The raw dict of a descriptor file, unpickling plain data only."""
    try:
        if p.suffix.lower() == ".pt":
            with _numpy_array_globals():
                data = torch.load(p, map_location="cpu", weights_only=True)
        else:
            with np.load(p, allow_pickle=False) as npz:
                data = {key: npz[key] for key in npz.files}
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
        what = (
            f"it needs `{found.group(1)}`"
            if found
            else detail.group(1)[:200]
            if detail
            else str(exc).splitlines()[0][:200]
        )
        raise ValueError(
            f"{path}: not a plain-data descriptor file ({what}); a .pt file is read with "
            "torch.load(weights_only=True), which refuses anything but tensors, numbers and "
            "strings so that a file cannot run code: write descriptor files with "
            "quests_torch.io.save_descriptors or `quests-torch descriptors`"
        ) from None
    except Exception as exc:
        raise ValueError(
            f"{path}: cannot read a descriptor file ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
        raise ValueError(
            f"{path}: not a descriptor file (holds a {type(data).__name__}, expected a dict "
            "of named arrays)"
        )
    return data


def _as_array(value: object, path: str | os.PathLike, key: str) -> np.ndarray:
    try:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        return np.asarray(value)
    except Exception as exc:
        raise ValueError(f"{path}: `{key}` is not an array ({type(exc).__name__}: {exc})") from None


def _as_number(value: object, path: str | os.PathLike, key: str, kind: type) -> int | float:
    a = _as_array(value, path, key)
    ok = a.ndim == 0 and a.dtype.kind in ("iu" if kind is int else "iuf")
    if kind is int and a.ndim == 0 and a.dtype.kind == "f":  # k stored as 32.0
        ok = bool(np.isfinite(a)) and float(a).is_integer()
    if not ok:
        raise ValueError(f"{path}: `{key}` must be a number, got {value!r:.80}")
    return kind(a.item())


def load_descriptors(path: str | os.PathLike) -> DescriptorSet:
    """Read a descriptor file written by :func:`save_descriptors` (or ``quests-torch descriptors``).

    Only plain data is read: a ``.pt`` file is loaded with ``weights_only=True`` and a ``.npz``
    without pickles, so a file cannot run code. The content is checked: floating-point,
    finite ``[n, d]`` descriptors whose width fits ``k``, ``n_atoms`` summing to ``n``,
    ``k >= 1``, ``cutoff > 0``.

    A descriptor store (:mod:`quests_torch.store`) is opened instead: ``x`` is then a CPU
    tensor backed by its file (nothing is read until used; NaN/inf are caught by the kernels,
    tile by tile) and ``meta["store"]`` the :class:`~quests_torch.store.DescriptorStore`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a (plain-data) descriptor file, missing ``k``/``cutoff``, or content
            that does not hold together (the message names the file and the entry).
        quests_torch.store.StoreInUseError: a store being written by another process.
    """
    if is_store(path):
        store = open_store(path)
        meta = {key: v for key, v in store.meta.items() if key not in ("k", "cutoff", "dtype")}
        if not store.multicomponent:
            meta.pop("species", None)  # descriptor files name multicomponent blocks only
        meta["store"] = store
        x = store.tensor()
        return DescriptorSet(x, store.n_atoms, store.k, store.cutoff, store.dtype, str(path), meta)
    p = _check_exists(path)
    raw = _read_descriptor_file(p, path)
    if "descriptors" not in raw:
        raise ValueError(f"{path}: not a descriptor file (no `descriptors` array)")
    for key in ("k", "cutoff"):
        if key not in raw:
            raise ValueError(
                f"{path}: descriptor file does not record `{key}`; write it with "
                "`quests-torch descriptors` so parameters can be checked"
            )
    x = _as_array(raw.pop("descriptors"), path, "descriptors")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(
            f"{path}: `descriptors` must be a non-empty [n, d] array, got shape {x.shape}"
        )
    if x.dtype.kind != "f" or x.dtype.itemsize not in (4, 8):
        raise ValueError(f"{path}: `descriptors` must be float32 or float64, got {x.dtype}")
    x = x.astype(x.dtype.newbyteorder("="), copy=False)  # torch reads native byte order only
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: `descriptors` contain NaN or inf (a damaged file?)")
    k = _as_number(raw.pop("k"), path, "k", int)
    cutoff = _as_number(raw.pop("cutoff"), path, "cutoff", float)
    if k < 1:
        raise ValueError(f"{path}: `k` must be >= 1, got {k}")
    if not (math.isfinite(cutoff) and cutoff > 0):
        raise ValueError(f"{path}: `cutoff` must be a positive distance, got {cutoff}")
    n_atoms = _as_array(raw.pop("n_atoms", np.array([x.shape[0]])), path, "n_atoms")
    if n_atoms.ndim > 1 or n_atoms.dtype.kind not in "iu" or (n_atoms < 0).any():
        raise ValueError(
            f"{path}: `n_atoms` must be a 1-D array of atom counts >= 0, got "
            f"{n_atoms.dtype} of shape {n_atoms.shape}"
        )
    n_atoms = n_atoms.astype(np.int64).reshape(-1)
    if int(n_atoms.sum()) != x.shape[0]:
        raise ValueError(
            f"{path}: `n_atoms` sums to {int(n_atoms.sum())} but `descriptors` has "
            f"{x.shape[0]} rows"
        )

    def scalar(v):
        v = v.detach().cpu() if isinstance(v, torch.Tensor) else v
        return v.tolist() if isinstance(v, np.ndarray | np.generic | torch.Tensor) else v

    meta = {key: scalar(v) for key, v in raw.items()}
    if problem := _width_problem(x.shape[1], k, meta.get("species")):
        raise ValueError(f"{path}: `descriptors` {problem}")
    fmt = meta.get("descriptor_format", DESCRIPTOR_FORMAT)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt > DESCRIPTOR_FORMAT:
        raise ValueError(
            f"{path}: descriptor format {fmt!r} is not one this quests-torch "
            f"{__version__} reads (format <= {DESCRIPTOR_FORMAT}): written by a newer version?"
        )
    dtype = str(meta.pop("dtype", str(x.dtype)))
    return DescriptorSet(torch.from_numpy(x), n_atoms, k, cutoff, dtype, str(path), meta)


def cached_descriptors(
    path: str | os.PathLike,
    *,
    index: str = ":",
    k: int,
    cutoff: float,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    types=None,
) -> tuple[DescriptorSet, bool]:
    """Descriptors of the structures of a file, computed once and cached on disk.

    The cache file is ``<cache_dir>/<sha256(content)[:16]>-<hash of parameters>.npz``, the
    parameters being the index, ``k``, ``cutoff``, ``dtype``, the package version and
    :data:`DESCRIPTOR_FORMAT`; a hit is used only when the entry records the same ones (an
    entry of another version, or a damaged one, is recomputed and replaced).

    Args:
        path: ASE-readable structure file.
        index: ASE selection.
        k: neighbours.
        cutoff: cutoff (Å).
        dtype: compute dtype.
        device: where to compute when not cached.
        cache_dir: cache folder (default :func:`default_cache_dir`).
        use_cache: ``False`` computes without reading or writing the cache.
        types: LAMMPS types to elements (:func:`read_structures`); part of the parameters
            when given.

    Returns:
        ``(descriptors, hit)`` where ``hit`` says whether they came from the cache.
    """
    from .descriptors import get_descriptors

    dtype_name = str(dtype).removeprefix("torch.")
    cache_file = None
    if use_cache:
        content = file_sha256(path)
        key = f"{index}|{k}|{cutoff!r}|{dtype_name}|{__version__}|{DESCRIPTOR_FORMAT}"
        if types is not None:
            key += f"|types={sorted(parse_types(types).items())}"
        params = hashlib.sha256(key.encode()).hexdigest()
        cache_file = Path(cache_dir or default_cache_dir()) / f"{content[:16]}-{params[:16]}.npz"
        if cache_file.exists():
            try:
                ds = load_descriptors(cache_file)
                if (
                    ds.k == k
                    and ds.cutoff == cutoff
                    and ds.dtype == dtype_name
                    and ds.meta.get("index") == index
                    and ds.meta.get("quests_torch") == __version__
                    and ds.meta.get("descriptor_format") == DESCRIPTOR_FORMAT
                ):
                    ds.source = str(path)
                    return ds, True
            except ValueError:
                pass  # a damaged or foreign cache entry is recomputed and replaced
    frames = read_structures(path, index, types=types)
    x = get_descriptors(frames, k=k, cutoff=cutoff, dtype=dtype, device=device)
    counts = np.array([len(a) for a in frames], dtype=np.int64)
    if cache_file is not None:
        try:
            save_descriptors(
                cache_file,
                x,
                counts,
                k=k,
                cutoff=cutoff,
                dtype=dtype_name,
                extra={"source": str(Path(path).resolve()), "index": index},
            )
        except OSError:
            pass  # a read-only cache only costs recomputation
    return DescriptorSet(x.cpu(), counts, k, cutoff, dtype_name, str(path)), False
