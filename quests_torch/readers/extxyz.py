"""A fast extxyz/xyz frame parser: the comment line by ASE's own key=value parser, the atom
block by ``bytes.split`` and Python's ``float`` (correctly rounded, as ASE's), no per-atom
tuples or structured arrays.

It maps the common layouts: ``Properties`` with ``species:S:1`` and ``pos:R:3`` anywhere among
other per-atom columns (forces, masses, ...) without spaces inside a value, ``Lattice``
present or absent, ``pbc`` given or ASE's default (periodic when a ``Lattice`` is given), and
plain xyz (no ``Properties``: species and positions). Anything else (a frame it cannot map,
quoted per-atom strings, more columns than the properties name, ``VEC`` cell lines, a number
``float`` refuses) is read by ASE from that frame's bytes, so the frames are always those ASE
gives: numbers, positions, cell and pbc equal bit for bit. Only these four are carried
(:class:`FrameRecord`); ``info``, calculators and other per-atom arrays are not.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["FrameReadError", "FrameRecord", "parse_frame", "read_frame_ase", "read_frames"]


@dataclass(frozen=True)
class FrameRecord:
    """What a reader hands back for one frame (plain arrays: cheap to pickle).

    Attributes:
        numbers: ``[n]`` atomic numbers (int64).
        positions: ``[n, 3]`` Cartesian positions (Å, float64).
        cell: ``[3, 3]`` cell rows (Å, float64; zeros without a cell).
        pbc: ``[3]`` periodicity (bool).
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray

    @classmethod
    def from_atoms(cls, atoms) -> FrameRecord:
        return cls(
            np.asarray(atoms.numbers, dtype=np.int64),
            np.asarray(atoms.positions, dtype=np.float64),
            np.asarray(atoms.cell.array, dtype=np.float64),
            np.asarray(atoms.pbc, dtype=bool),
        )

    def to_atoms(self):
        """The frame as ``ase.Atoms`` (numbers, positions, cell, pbc)."""
        from ase import Atoms

        return Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)


_DEFAULT_PROPERTIES = "species:S:1:pos:R:3"
_NUMBERS: dict[bytes, int] = {}


def _number(symbol: bytes) -> int:
    z = _NUMBERS.get(symbol)
    if z is None:
        from ase.data import atomic_numbers

        z = _NUMBERS[symbol] = atomic_numbers[symbol.decode().capitalize()]  # KeyError: ASE's
    return z


def _columns(properties: str) -> tuple[int, int, int, bool] | None:
    """``(species column, first position column, columns, loose)`` of a Properties string,
    or None when it has no ``species:S:1`` and ``pos:R:3`` (or a field it does not know);
    ``loose``: another string or logical column (``F`` is also fluorine), so that a line
    shifted by a token could still read as species and numbers."""
    fields = properties.split(":")
    if len(fields) % 3:
        return None
    species = pos = None
    col = 0
    loose = False
    for name, kind, width in zip(fields[::3], fields[1::3], fields[2::3], strict=True):
        if kind not in ("R", "I", "S", "L") or not width.isdigit():
            return None
        if name == "species" and kind == "S" and width == "1":
            species = col
        elif name == "pos" and kind == "R" and width == "3":
            pos = col
        elif name in ("species", "pos", "Z", "move_mask"):  # another meaning: ASE decides
            return None
        else:
            loose = loose or kind in ("S", "L")
        col += int(width)
    if species is None or pos is None:
        return None
    return species, pos, col, loose


#: the last comment line parsed and what it held, as one tuple (replaced whole: a reader
#: thread never sees a line paired with another line's values)
_LAST_COMMENT: list[tuple] = [(None, None)]


def _comment_info(line: bytes) -> dict:
    """``Lattice``, ``Properties`` and ``pbc`` of a comment line, by ASE's key=value parser
    (the previous line's result again when the line repeats, as in most trajectories)."""
    last_line, last_info = _LAST_COMMENT[0]
    if line == last_line:
        return last_info
    from ase.io.extxyz import key_val_str_to_dict

    comment = line.decode().strip()
    info = key_val_str_to_dict(comment) if comment else {}
    info = {key: info[key] for key in ("Lattice", "Properties", "pbc") if key in info}
    _LAST_COMMENT[0] = (line, info)
    return info


def parse_frame(data: bytes) -> FrameRecord | None:
    """One frame (its header, comment and atom lines, as bytes) by the fast path, or ``None``
    when it is not a layout the fast path maps (then :func:`read_frame_ase` reads it)."""
    lines = data.split(b"\n", 2)
    try:
        n = int(lines[0].split()[0])
        info = _comment_info(lines[1])
    except Exception:
        return None
    properties = info.get("Properties", _DEFAULT_PROPERTIES)
    columns = _columns(properties) if isinstance(properties, str) else None
    if columns is None or len(lines) < 3:
        return None
    species, pos, width, loose = columns
    block = lines[2]
    if block.count(b"\n") not in (n - 1, n):
        return None  # VEC lines, or a frame cut short: ASE's
    flat = block.split()
    if len(flat) != n * width:
        return None
    if loose and n:  # a string or logical column could hide a shifted line: count per line
        b = np.frombuffer(block, dtype=np.uint8)
        space = b <= 32
        first = ~space
        first[1:] &= space[:-1]
        per_line = np.bincount(np.cumsum(b == 10)[first], minlength=n)
        if len(per_line) != n or (per_line != width).any():
            return None
    try:
        symbols = flat[species::width]
        lut = {s: _number(s) for s in set(symbols)}
        numbers = np.fromiter(map(lut.__getitem__, symbols), dtype=np.int64, count=n)
        columns = flat[pos::width] + flat[pos + 1 :: width] + flat[pos + 2 :: width]
        xyz = np.fromiter(map(float, columns), dtype=np.float64, count=3 * n)
    except (KeyError, ValueError, UnicodeDecodeError):
        return None
    positions = xyz.reshape(3, n).T
    cell = np.zeros((3, 3))
    pbc = np.zeros(3, dtype=bool)
    try:
        if "Lattice" in info:
            cell[:] = np.asarray(info["Lattice"], dtype=np.float64).T  # ASE: Lattice.T
            pbc[:] = True
        if "pbc" in info:
            pbc[:] = np.asarray(info["pbc"], dtype=bool)
    except (ValueError, TypeError):
        return None
    return FrameRecord(numbers, np.ascontiguousarray(positions), cell, pbc)


def read_frame_ase(data: bytes) -> FrameRecord:
    """One frame read by ASE's extxyz reader from its bytes (universal newlines, as a file)."""
    import ase.io

    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    return FrameRecord.from_atoms(ase.io.read(text, format="extxyz", index=0))


def read_frames(
    path: str | os.PathLike, starts: np.ndarray, stops: np.ndarray, *, fast: bool = True
) -> list[FrameRecord]:
    """The frames at the byte ranges ``[starts[i], stops[i])`` of ``path``, in order.

    Consecutive ranges are read with one ``read``; each frame goes through
    :func:`parse_frame`, or ASE when the fast path does not map it (or ``fast=False``).

    Raises:
        ValueError: a frame neither reads (``ValueError: frame <i> of the ranges: ...``,
            ``i`` counting from 0 in ``starts``).
    """
    out: list[FrameRecord] = []
    for i, data in frame_bytes(path, starts, stops):
        record = parse_frame(data) if fast else None
        if record is None:
            try:
                record = read_frame_ase(data)
            except Exception as exc:
                raise FrameReadError(i, f"{type(exc).__name__}: {exc}") from None
        out.append(record)
    return out


def frame_bytes(path: str | os.PathLike, starts: np.ndarray, stops: np.ndarray):
    """``(i, bytes)`` of the byte ranges ``starts[i]:stops[i]`` of ``path``, in order: one read
    when the ranges follow each other (a reader's chunk of consecutive frames), one seek and
    read per range otherwise. Shared by the frame parsers of every indexed text format."""
    if not len(starts):
        return
    with open(path, "rb") as fh:
        lo, hi = int(starts[0]), int(max(stops))
        contiguous = bool(np.all(starts[1:] >= stops[:-1]))
        if contiguous:
            fh.seek(lo)
            blob = fh.read(hi - lo)
        for i, (a, b) in enumerate(zip(starts.tolist(), stops.tolist(), strict=True)):
            if contiguous:
                yield i, blob[a - lo : b - lo]
            else:
                fh.seek(a)
                yield i, fh.read(b - a)


class FrameReadError(ValueError):
    """A frame that neither the fast path nor ASE reads (raised by :func:`read_frames`).

    Attributes:
        frame: its position among the ranges read (from 0).
        message: what went wrong (ASE's error).
    """

    def __init__(self, frame: int, message: str) -> None:
        super().__init__(message)
        self.frame = frame
        self.message = message

    def __reduce__(self):  # picklable across reader processes
        return (FrameReadError, (self.frame, self.message))
