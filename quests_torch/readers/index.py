"""Where each frame of an (ext)xyz file (or a LAMMPS dump: the ``scanner`` of
:func:`frame_index`) starts and ends: a byte-offset index, scanned once.

The file is read in big blocks; numpy finds the newlines of a block and only the frame headers
(the atom-count lines) are parsed, one Python step per frame. The index of a file is cached in
``<cache dir>/frame-index/`` (:func:`quests_torch.io.default_cache_dir`) under a name made from
the file's resolved path, and is used again only while the file keeps its identity: size,
modification time (ns) and the SHA-256 of its first and last 64 KiB (:func:`file_identity`).
A selection (``":"``, ``"0:100:2"``, ``"-1"``) then maps to byte ranges without parsing frames.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._files import atomic_write, default_cache_dir
from ..checks import check_index

__all__ = ["FrameIndex", "file_identity", "frame_index", "scan_xyz", "select_frames"]

#: version of the cached index layout; an entry of another version is rescanned
INDEX_FORMAT = 1
_EDGE = 1 << 16  # bytes hashed at each end of the file for its identity


@dataclass(frozen=True)
class FrameIndex:
    """Byte ranges of the frames of an (ext)xyz file.

    Attributes:
        starts: ``[n_frames]`` offset of each frame's atom-count line (int64).
        stops: ``[n_frames]`` offset just after each frame's last line (int64).
        n_atoms: ``[n_frames]`` atoms each frame's header claims (int64).
        vec: whether some frame is followed by ``VEC`` cell lines (such frames are read by
            ASE; they belong to the frame before them).
    """

    starts: np.ndarray
    stops: np.ndarray
    n_atoms: np.ndarray
    vec: bool = False

    def __len__(self) -> int:
        return len(self.starts)


def scan_xyz(path: str | os.PathLike, block: int = 1 << 24) -> FrameIndex:
    """Scan an (ext)xyz file once for the byte range of every frame.

    A blank header line ends the frames (as in ASE); ``VEC`` lines after a frame's atoms are
    part of that frame. A header claiming more atoms than the file has lines left is found at
    the end of the file, never by a loop over the claimed count.

    Raises:
        ValueError: a header that is not a non-negative atom count, or a frame that runs past
            the end of the file (names the frame and the line).
    """
    starts: list[int] = []
    stops: list[int] = []
    counts: list[int] = []
    vec = False
    header = 0  # line number (0-based) of the next frame header
    line = 0  # line number of the first line starting in ``data``
    base = 0  # file offset of data[0]
    carry = b""  # the start of a line cut by the end of the previous piece
    claimed = 0
    open_line = False
    done = False
    line_start = 0  # file offset of line ``header`` once known
    with open(path, "rb") as fh:
        while not done:
            piece = fh.read(block)
            data = carry + piece
            ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 0x0A)
            if not piece:
                if open_line:  # a last line without newline still counts
                    ends = np.append(ends, len(data))
                done = True
            while header < line + len(ends):
                i = header - line
                first = int(ends[i - 1]) + 1 if i else 0
                text = data[first : int(ends[i])]
                line_start = base + first
                if starts:  # the previous frame ends where this line starts
                    stops[-1] = line_start
                if not text.strip():
                    return _finish(starts, stops, counts, vec, line_start)
                if text.lstrip().startswith(b"VEC"):
                    vec = True
                    header += 1
                    stops[-1] = base + min(int(ends[i]) + 1, len(data))
                    continue
                try:
                    claimed = int(text.split()[0])
                except ValueError:
                    claimed = -1
                if claimed < 0:
                    raise ValueError(
                        f"line {header + 1} should be the atom count of frame "
                        f"{len(starts) + 1}, got {text[:40].decode(errors='replace')!r}"
                    )
                starts.append(line_start)
                stops.append(-1)
                counts.append(claimed)
                header += claimed + 2
            tail = int(ends[-1]) + 1 if len(ends) else 0
            line += len(ends)
            if header == line:  # a cut line is a header: keep it
                carry = data[tail:]
                base += tail
            else:
                carry = b""
                base += len(data)
            open_line = open_line if not piece else tail < len(data)
            if len(carry) > 1 << 20:
                raise ValueError(f"line {line + 1} is not an xyz header (over 1 MiB)")
    if header > line:
        raise ValueError(
            f"frame {len(starts)} claims {claimed} atoms but the file ends "
            f"{header - line} lines short of it (truncated or malformed file)"
        )
    return _finish(starts, stops, counts, vec, base + len(carry))


def _finish(starts, stops, counts, vec, end: int) -> FrameIndex:
    if stops and stops[-1] < 0:
        stops[-1] = end
    as_array = lambda v: np.asarray(v, dtype=np.int64).reshape(-1)  # noqa: E731
    return FrameIndex(as_array(starts), as_array(stops), as_array(counts), vec)


def file_identity(path: str | os.PathLike) -> str:
    """``"<size>:<mtime_ns>:<sha256 of the first and last 64 KiB>"``: what says that a cached
    index still describes the file (cheap: reads at most 128 KiB)."""
    st = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(_EDGE))
        if st.st_size > _EDGE:
            fh.seek(max(_EDGE, st.st_size - _EDGE))
            digest.update(fh.read(_EDGE))
    return f"{st.st_size}:{st.st_mtime_ns}:{digest.hexdigest()}"


def _cache_file(path: Path, cache_dir: Path, kind: str) -> Path:
    key = str(path.resolve()) if kind == "scan_xyz" else f"{path.resolve()}|{kind}"
    name = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cache_dir / "frame-index" / f"{name}.npz"


def frame_index(
    path: str | os.PathLike,
    *,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    scanner: Callable[[str | os.PathLike], FrameIndex] | None = None,
) -> FrameIndex:
    """The :class:`FrameIndex` of an (ext)xyz file, from the cache while the file keeps its
    :func:`file_identity`, else scanned (:func:`scan_xyz`) and cached (atomically).

    Args:
        path: the (ext)xyz file.
        cache: read and write the cache (``False``: always scan, write nothing).
        cache_dir: the cache folder (default :func:`quests_torch.io.default_cache_dir`).
        scanner: what scans the file (default :func:`scan_xyz`; or
            :func:`quests_torch.readers.lammps.scan_dump` for a LAMMPS dump); the cache entry
            is kept per scanner (by its name).

    Raises:
        ValueError: as the scanner.
    """
    path = Path(path)
    kind = "scan_xyz" if scanner is None else scanner.__name__
    scanner = scan_xyz if scanner is None else scanner
    if not cache:
        return scanner(path)
    identity = file_identity(path)
    entry = _cache_file(path, Path(cache_dir) if cache_dir else default_cache_dir(), kind)
    try:
        with np.load(entry, allow_pickle=False) as npz:
            if int(npz["format"]) == INDEX_FORMAT and str(npz["identity"]) == identity:
                return FrameIndex(npz["starts"], npz["stops"], npz["n_atoms"], bool(npz["vec"]))
    except (OSError, KeyError, ValueError):
        pass  # no entry, or a damaged one: rescan
    index = scanner(path)
    if file_identity(path) != identity:  # changed while scanned: do not cache
        return index
    arrays = {
        "format": np.array(INDEX_FORMAT),
        "identity": np.array(identity),
        "starts": index.starts,
        "stops": index.stops,
        "n_atoms": index.n_atoms,
        "vec": np.array(index.vec),
    }

    def write(p: Path) -> None:
        with open(p, "wb") as fh:
            np.savez(fh, **arrays)

    try:
        atomic_write(entry, write)
    except OSError:
        pass  # a read-only cache only costs a rescan
    return index


def select_frames(n_frames: int, index: str) -> np.ndarray:
    """The frame numbers an ASE index string selects among ``n_frames`` (int64, in order).

    ``"-1"`` is the last frame, ``"0:100:2"`` every other of the first hundred, ``":"`` all;
    an integer out of range selects nothing (as :func:`quests_torch.io.count_frames` counts).

    Raises:
        ValueError: not an ASE index/slice string.
    """
    check_index(index)
    from ase.io.formats import string2index

    sel = string2index(index)
    if isinstance(sel, int):
        return np.array([sel % n_frames] if -n_frames <= sel < n_frames else [], dtype=np.int64)
    return np.arange(n_frames, dtype=np.int64)[sel]
