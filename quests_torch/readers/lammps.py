"""LAMMPS dump text (``.lammpstrj``, ``.dump``, ``dump*``) read straight into arrays.

A frame runs from its ``ITEM: TIMESTEP`` line to the next one. Its atoms are read from the
``ITEM: ATOMS`` columns in any order; the frames are those ``ase.io.read(path,
format="lammps-dump-text", specorder=...)`` gives (numbers, positions, cell and pbc equal bit
for bit), following ASE's conventions:

- atoms sorted by ``id`` when there is an ``id`` column (else in file order);
- positions from ``x y z``, else scaled ``xs ys zs`` (times the cell, no origin added),
  else unwrapped ``xu yu zu``, else ``xsu ysu zsu``; unscaled positions are kept as written
  (the box origin is not subtracted);
- the cell from ``ITEM: BOX BOUNDS``: the bounds with tilt (``xlo_bound xhi_bound xy`` ...)
  give the rows ``[lx, 0, 0], [xy, ly, 0], [xz, yz, lz]`` with ``lx = xhi_bound - xlo_bound -
  |xy| - |xz|``, ``ly = yhi_bound - ylo_bound - |yz|``; a general triclinic box (``abc
  origin``, LAMMPS >= 17Apr2024) gives its rows as written; no ``BOX BOUNDS``, no cell;
- pbc from the boundary flags after ``BOX BOUNDS`` (``pp ff fs``: periodic where ``p``).

Elements: an ``element`` column when there is one; else a ``types`` map of LAMMPS types to
elements (:func:`parse_types`); else a ``mass`` column, as ASE, the element of the nearest
atomic mass. ASE's own default, a type ``t`` read as the element of atomic number ``t``,
is refused: a dump without ``element`` or ``mass`` needs ``types``. One deliberate
difference: where a dump has both ``mass`` and ``type`` columns and ``types`` is given, the
map decides (ASE prefers the masses over its ``specorder``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .extxyz import FrameReadError, FrameRecord, frame_bytes
from .index import FrameIndex

__all__ = [
    "DUMP_SUFFIXES",
    "check_dump_types",
    "dump_columns",
    "is_dump",
    "parse_dump_frame",
    "parse_types",
    "read_dump_frames",
    "scan_dump",
]

#: file suffixes read as LAMMPS dump text (names starting with ``dump`` too, by content)
DUMP_SUFFIXES = (".lammpstrj", ".dump")
_MARK = b"ITEM: TIMESTEP"
_HEADER_MAX = 1 << 14  # bytes from a frame's TIMESTEP line to the end of its ATOMS line
_POSITIONS = (("x", "y", "z"), ("xs", "ys", "zs"), ("xu", "yu", "zu"), ("xsu", "ysu", "zsu"))


def is_dump(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a LAMMPS dump text file: a ``.lammpstrj``/``.dump`` suffix, or
    a name starting with ``dump`` (``dump.atom``, ``dump_cu.0``) whose first line is an
    ``ITEM:`` line (``dump.xyz``, LAMMPS' xyz style, stays xyz)."""
    p = Path(path)
    if p.suffix.lower() in DUMP_SUFFIXES:
        return True
    if not p.name.lower().startswith("dump") or p.suffix.lower() in (".xyz", ".extxyz"):
        return False
    try:
        with open(p, "rb") as fh:
            return fh.read(64).lstrip().startswith(b"ITEM:")
    except OSError:
        return False


def parse_types(types) -> dict[int, int] | None:
    """A map of LAMMPS types to atomic numbers, from what a caller gives.

    Accepted: ``None``; a string ``"1=Cu,2=Zr"`` or ``"Cu,Zr"`` (type 1, 2, ... in order);
    a mapping ``{1: "Cu", 2: 40}``; a sequence ``["Cu", "Zr"]`` (types 1, 2, ...). Elements
    are chemical symbols (any case) or atomic numbers >= 1.

    Raises:
        ValueError: anything else, naming ``types`` and the offending entry.
    """
    if types is None:
        return None
    if isinstance(types, str):
        items = [t.strip() for t in types.split(",") if t.strip()]
        if not items:
            raise ValueError(
                f"`types` must name elements, e.g. '1=Cu,2=Zr' or 'Cu,Zr', got {types!r}"
            )
        keyed = ["=" in t for t in items]
        if any(keyed) and not all(keyed):
            raise ValueError(
                f"`types` {types!r}: give every entry as TYPE=ELEMENT, or only elements in type "
                "order, not both"
            )
        if all(keyed):
            pairs = [tuple(s.strip() for s in t.split("=", 1)) for t in items]
            try:
                types = {int(k): v for k, v in pairs}
            except ValueError:
                bad = next(k for k, _ in pairs if not k.lstrip("-").isdigit())
                raise ValueError(f"`types` {types!r}: type {bad!r} is not an integer") from None
            if len(types) != len(pairs):
                raise ValueError(f"`types` {items!r}: a type is given twice")
        else:
            types = items
    if isinstance(types, Mapping):
        entries = list(types.items())
    elif isinstance(types, Sequence) and not isinstance(types, bytes):
        entries = list(enumerate(types, start=1))
    else:
        raise ValueError(
            f"`types` must be a string such as '1=Cu,2=Zr', a mapping or a sequence of "
            f"elements, got {type(types).__name__}"
        )
    if not entries:
        raise ValueError("`types` must map at least one LAMMPS type")
    return {_type_key(k): _element(v) for k, v in entries}


def _type_key(key) -> int:
    if isinstance(key, bool) or not isinstance(key, int | np.integer) or key < 1:
        raise ValueError(f"`types`: a LAMMPS type is an integer >= 1, got {key!r}")
    return int(key)


def _element(value) -> int:
    from ase.data import atomic_numbers, chemical_symbols

    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        if 1 <= value < len(chemical_symbols):
            return int(value)
    elif isinstance(value, str):
        z = atomic_numbers.get(value.strip().capitalize(), 0)
        if z >= 1:
            return z
    raise ValueError(f"`types`: {value!r} is not a chemical element")


def _header(data: bytes, i: int, eof: bool) -> tuple[int, int] | None:
    """``(atoms, offset of the first atom row)`` of the frame whose TIMESTEP marker is at
    ``data[i]``, or ``None`` when its header runs past the end of ``data`` (not at EOF).

    Raises:
        ValueError: a header without a count or an ``ITEM: ATOMS`` line.
    """
    seg = data[i : i + _HEADER_MAX]
    off, n, first = 0, None, True
    while True:
        e = seg.find(b"\n", off)
        if e < 0:
            if len(seg) == _HEADER_MAX:
                raise ValueError("a frame header longer than 16 KiB (not a LAMMPS dump?)")
            if not eof:
                return None
            if off >= len(seg):
                raise ValueError("a frame without an ITEM: ATOMS line (truncated file?)")
            e = len(seg)
        line = seg[off:e].strip()
        off = e + 1
        if line.startswith(_MARK) and not first:
            raise ValueError("a frame without an ITEM: ATOMS line")
        first = False
        if line.startswith(b"ITEM: NUMBER OF ATOMS"):
            e = seg.find(b"\n", off)
            if e < 0 and not eof and len(seg) < _HEADER_MAX:
                return None
            text = seg[off : e if e >= 0 else len(seg)]
            off = e + 1 if e >= 0 else len(seg)
            try:
                n = int(text.split()[0])
            except (ValueError, IndexError):
                n = -1
            if n < 0:
                raise ValueError(f"ITEM: NUMBER OF ATOMS is followed by {text[:40]!r}")
        elif line.startswith(b"ITEM: ATOMS"):
            if n is None:
                raise ValueError("ITEM: ATOMS before ITEM: NUMBER OF ATOMS")
            return n, i + min(off, len(seg))


def scan_dump(path: str | os.PathLike, block: int = 1 << 24) -> FrameIndex:
    """Scan a LAMMPS dump text file once for the byte range of every frame
    (:class:`~quests_torch.readers.index.FrameIndex`, ``starts`` at the ``ITEM: TIMESTEP``
    lines). Only the frame headers are parsed; a frame whose atom rows run past the end of the
    file is found here, before any frame is read.

    Raises:
        ValueError: no frame, a header without a count or an ``ITEM: ATOMS`` line, or a
            frame cut short (names the frame).
    """
    starts: list[int] = []
    counts: list[int] = []
    start_lines: list[int] = []
    atom_lines: list[int] = []
    base = lines = 0  # file offset and newlines before data[0]
    carry = b""
    with open(path, "rb") as fh:
        while True:
            piece = fh.read(block)
            eof = not piece
            data = carry + piece
            pos = counted = 0  # search from pos; newlines counted in data[:counted]
            cut = None
            while (i := data.find(_MARK, pos)) >= 0:
                ls = data.rfind(b"\n", 0, i) + 1
                try:
                    head = _header(data, i, eof)
                except ValueError as exc:
                    raise ValueError(f"frame {len(starts) + 1}: {exc}") from None
                if head is None:
                    cut = ls
                    break
                n, first_row = head
                lines += data.count(b"\n", counted, ls)
                start_lines.append(lines)
                lines += data.count(b"\n", ls, first_row)
                counted = first_row
                starts.append(base + ls)
                counts.append(n)
                atom_lines.append(lines)
                pos = first_row
            if eof:
                lines += data.count(b"\n", counted)
                lines += bool(data) and not data.endswith(b"\n")
                break
            if cut is None:
                cut = max(pos, len(data) - len(_MARK) + 1, counted)
            lines += data.count(b"\n", counted, cut)
            base += cut
            carry = data[cut:]
        size = base + len(data)
    if not starts:
        raise ValueError("no ITEM: TIMESTEP line: not a LAMMPS dump text file")
    ends = [*start_lines[1:], lines]
    for k, (n, first, end) in enumerate(zip(counts, atom_lines, ends, strict=True)):
        if end - first < n:
            raise ValueError(
                f"frame {k + 1} claims {n} atoms but the file ends {n - (end - first)} rows "
                "short of it (truncated or malformed file)"
            )
    as_array = lambda v: np.asarray(v, dtype=np.int64).reshape(-1)  # noqa: E731
    return FrameIndex(as_array(starts), as_array([*starts[1:], size]), as_array(counts))


def _box(item: bytes, rows: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Cell rows and pbc of an ``ITEM: BOX BOUNDS`` line and its three rows (ASE's
    arithmetic, in ASE's order, so that the cell is equal bit for bit)."""
    flags = item.decode().split()[3:]
    pbc = np.array(["p" in f.lower() for f in flags[-3:]] if len(flags) >= 3 else [False] * 3)
    values = [[float(v) for v in r.split()] for r in rows]
    width = {len(v) for v in values}
    if len(width) != 1 or width.pop() not in (2, 3, 4):
        raise ValueError(f"ITEM: BOX BOUNDS rows {rows!r} are not 2, 3 or 4 numbers each")
    data = np.array(values)
    if flags and flags[0] == "abc":  # general triclinic: the rows, then the origin
        return np.ascontiguousarray(data[:, :3]), pbc
    xlo, xhi, ylo, yhi, zlo, zhi = data[:, :2].flatten()
    xy = xz = yz = 0.0
    if data.shape[1] > 2:
        offdiag = data[:, 2]
        if len(flags) >= 3:
            offdiag = offdiag[[flags.index(t) for t in ("xy", "xz", "yz")]]
        xy, xz, yz = offdiag
    cell = np.array(
        [
            [(xhi - xlo) - abs(xy) - abs(xz), 0, 0],
            [xy, (yhi - ylo) - abs(yz), 0],
            [xz, yz, zhi - zlo],
        ]
    )
    return cell, pbc


def _lines(data: bytes, pos: int, count: int) -> tuple[list[bytes], int]:
    """``count`` lines of ``data`` from ``pos`` (fewer at its end) and the offset after them."""
    out = []
    for _ in range(count):
        e = data.find(b"\n", pos)
        if e < 0:
            if pos < len(data):
                out.append(data[pos:])
            return out, len(data)
        out.append(data[pos:e])
        pos = e + 1
    return out, pos


def _frame_header(data: bytes) -> tuple[int, list[str], np.ndarray, np.ndarray, int]:
    """``(atoms, column names, cell, pbc, offset of the first atom row)`` of one frame."""
    n = None
    cell, pbc = np.zeros((3, 3)), np.zeros(3, dtype=bool)
    pos = 0
    while pos < len(data):
        (line,), pos = _lines(data, pos, 1)
        line = line.strip()
        if line.startswith(b"ITEM: NUMBER OF ATOMS"):
            (text,), pos = _lines(data, pos, 1) if pos < len(data) else ([b""], pos)
            n = int(text.split()[0])
        elif line.startswith(b"ITEM: BOX BOUNDS"):
            rows, pos = _lines(data, pos, 3)
            cell, pbc = _box(line, rows)
        elif line.startswith(b"ITEM: ATOMS"):
            if n is None:
                raise ValueError("ITEM: ATOMS before ITEM: NUMBER OF ATOMS")
            return n, line.decode().split()[2:], cell, pbc, pos
    raise ValueError("no ITEM: ATOMS line")


def _atom_rows(data: bytes, pos: int, n: int, width: int) -> list[bytes]:
    """The ``n * width`` values of the ``n`` atom rows from ``data[pos]``, flat (the rows end
    at the frame's end or at the ``ITEM:`` lines of the next frame's header).

    Raises:
        ValueError: fewer rows than ``n``, or a row without ``width`` values.
    """
    if not n:
        return []
    stop = data.find(b"ITEM:", pos)
    block = data[pos : len(data) if stop < 0 else stop]
    flat = block.split()
    if len(flat) == n * width:
        return flat
    rows = [r for r in block.splitlines() if r.strip()]
    if len(rows) < n:
        raise ValueError(f"ITEM: ATOMS holds {len(rows)} of the {n} rows (truncated file?)")
    bad = next((i for i, r in enumerate(rows) if len(r.split()) != width), n)
    if bad >= n:
        raise ValueError(f"ITEM: ATOMS holds {len(rows)} rows, more than the {n} atoms")
    raise ValueError(
        f"atom row {bad + 1} holds {len(rows[bad].split())} values for the {width} columns"
    )


_COUNTING: list[list[bytes]] = [[]]


def _counting(n: int) -> list[bytes]:
    """``[b"1", ..., b"n"]`` (the last one asked for, kept: frames of a dump share ``n``)."""
    if len(_COUNTING[0]) != n:
        _COUNTING[0] = [str(i).encode() for i in range(1, n + 1)]
    return _COUNTING[0]


def _numbers(flat, names, n, order, types) -> np.ndarray:
    """Atomic numbers: the ``element`` column, else ``types`` of the ``type`` column, else
    the nearest atomic ``mass`` (as ASE)."""
    from ase.data import atomic_masses, atomic_numbers

    width = len(names)
    if "element" in names:
        symbols = flat[names.index("element") :: width]
        try:
            lut = {s: atomic_numbers[s.decode()] for s in set(symbols)}
        except (KeyError, UnicodeDecodeError):
            bad = next(s for s in symbols if atomic_numbers.get(s.decode(errors="replace")) is None)
            raise ValueError(
                f"column `element` holds {bad.decode(errors='replace')!r}, not an element"
            ) from None
        return np.fromiter(map(lut.__getitem__, symbols), np.int64, count=n)[order]
    if types is not None and "type" in names:
        tokens = flat[names.index("type") :: width]
        kinds = {t: int(t) for t in set(tokens)}  # a few distinct types: each parsed once
        missing = sorted(k for k in kinds.values() if k not in types)
        if missing:
            raise ValueError(
                f"LAMMPS type {missing[0]} is not in `types` (maps "
                f"{', '.join(map(str, sorted(types)))})"
            )
        lut = {t: types[k] for t, k in kinds.items()}
        return np.fromiter(map(lut.__getitem__, tokens), np.int64, count=n)[order]
    if "mass" in names:
        masses = np.fromiter(map(float, flat[names.index("mass") :: width]), float, count=n)
        return np.abs(atomic_masses[None, :] - masses[order, None]).argmin(axis=1).astype(np.int64)
    if "type" in names:
        raise ValueError(
            "a dump without an `element` column needs `types` (--types 1=Cu,2=Zr): the map "
            "of LAMMPS types to elements"
        )
    raise ValueError("no `element`, `type` or `mass` column: the elements are unknown")


def parse_dump_frame(data: bytes, types: Mapping[int, int] | None = None) -> FrameRecord:
    """One LAMMPS dump text frame (its bytes, from ``ITEM: TIMESTEP``) as a
    :class:`~quests_torch.readers.extxyz.FrameRecord`, the one ASE reads.

    Args:
        data: the frame's bytes.
        types: LAMMPS type -> atomic number (:func:`parse_types`); needed unless the frame
            has an ``element`` or a ``mass`` column.

    Raises:
        ValueError: a malformed or truncated frame, unknown elements (names the problem).
    """
    n, names, cell, pbc, pos = _frame_header(data)
    width = len(names)
    flat = _atom_rows(data, pos, n, width)
    order = slice(None)
    if "id" in names:
        ids = flat[names.index("id") :: width]
        if ids != _counting(n):  # not already 1..n in order (dump_modify sort id)
            order = np.argsort(np.fromiter(map(int, ids), np.int64, n))
    numbers = _numbers(flat, names, n, order, types)
    axes = next((a for a in _POSITIONS if a[0] in names), None)
    if axes is None or any(a not in names for a in axes):
        raise ValueError(
            f"no complete x y z, xs ys zs, xu yu zu or xsu ysu zsu columns among {names}"
        )
    cols = [flat[names.index(a) :: width] for a in axes]
    xyz = np.fromiter(map(float, cols[0] + cols[1] + cols[2]), np.float64, count=3 * n)
    positions = np.ascontiguousarray(xyz.reshape(3, n).T[order])
    if axes[0] in ("xs", "xsu"):
        positions = np.dot(positions, cell)  # as ase.Atoms(scaled_positions=..., cell=...)
    return FrameRecord(numbers, positions, cell, pbc)


def read_dump_frames(
    path: str | os.PathLike,
    starts: np.ndarray,
    stops: np.ndarray,
    *,
    types: Mapping[int, int] | None = None,
) -> list[FrameRecord]:
    """The frames at the byte ranges ``[starts[i], stops[i])`` of a dump, in order
    (:func:`parse_dump_frame`; consecutive ranges read with one ``read``).

    Raises:
        FrameReadError: a frame that does not read (its position in ``starts``, the problem).
    """
    out: list[FrameRecord] = []
    for i, data in frame_bytes(path, starts, stops):
        try:
            out.append(parse_dump_frame(data, types))
        except (ValueError, IndexError, KeyError) as exc:
            raise FrameReadError(i, f"{type(exc).__name__}: {exc}") from None
    return out


def dump_columns(path: str | os.PathLike) -> list[str]:
    """The ``ITEM: ATOMS`` column names of a dump's first frame (reads its first 64 KiB).

    Raises:
        ValueError: no ``ITEM: ATOMS`` line there.
    """
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    i = head.find(b"ITEM: ATOMS")
    if i < 0:
        raise ValueError("no ITEM: ATOMS line in its first 64 KiB: not a LAMMPS dump text file")
    e = head.find(b"\n", i)
    return head[i : e if e >= 0 else len(head)].decode(errors="replace").split()[2:]


def check_dump_types(path: str | os.PathLike, types: Mapping[int, int] | None) -> None:
    """Refuse, before any frame is read, a dump whose elements cannot be known: no
    ``element`` or ``mass`` column and no ``types``.

    Raises:
        ValueError: naming the file and what to give.
    """
    if types is not None:
        return
    names = dump_columns(path)
    if "element" not in names and "mass" not in names:
        raise ValueError(
            f"{path}: a LAMMPS dump without an `element` column needs `types` (--types "
            f"1=Cu,2=Zr, or --types Cu,Zr for types 1, 2): the map of its LAMMPS types to "
            f"elements (its columns: {' '.join(names)})"
        )
