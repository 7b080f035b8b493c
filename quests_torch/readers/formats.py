"""Which reader reads a trajectory: one native reader per format, ASE for the rest.

=================  ==================================================  =====================
format             files                                               native reader
=================  ==================================================  =====================
``xyz``            ``.xyz``, ``.extxyz``                               with ``readers`` set
``lammps-dump``    ``.lammpstrj``, ``.dump``, ``dump*`` (``ITEM:``)    always (``types``)
``torch-sim``      ``.h5``, ``.hdf5`` (``TorchSimTrajectory``)         always
``ase-traj``       ``.traj``                                           with ``readers`` set
=================  ==================================================  =====================

A LAMMPS dump is always read natively: ASE's generic reading takes a LAMMPS type ``t`` for
the element of atomic number ``t``. ASE has no reader of torch-sim files. The (ext)xyz and
``.traj`` readers replace ASE where the caller asks for reader processes (``readers`` not
``None``, :func:`quests_torch.io.iter_structures`): ASE's frames carry ``info``, calculators
and per-atom arrays, the native ones numbers, positions, cell and pbc only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from . import asetraj, torchsim
from .extxyz import FrameRecord
from .index import frame_index
from .lammps import check_dump_types, is_dump, parse_types, read_dump_frames, scan_dump
from .pool import iter_records as _pool_records

__all__ = ["count_frames", "detect_format", "iter_records", "native_format"]

#: the formats read natively whatever ``readers`` says (ASE cannot read them right)
ALWAYS_NATIVE = ("lammps-dump", "torch-sim")


def detect_format(path: str | os.PathLike) -> str | None:
    """``"xyz"``, ``"lammps-dump"``, ``"torch-sim"``, ``"ase-traj"`` or ``None`` (ASE's),
    by the file's name (and the first line of a ``dump*`` name)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".xyz", ".extxyz"):
        return "xyz"
    if is_dump(path):
        return "lammps-dump"
    if torchsim.is_hdf5(path):
        return "torch-sim"
    if suffix == ".traj":
        return "ase-traj"
    return None


def native_format(path: str | os.PathLike, readers: int | None) -> str | None:
    """The format whose native reader reads ``path`` (:func:`detect_format`), or ``None``
    for ASE: dumps and torch-sim files always, (ext)xyz and ``.traj`` when ``readers`` is an
    integer."""
    fmt = detect_format(path)
    if fmt in ALWAYS_NATIVE or (readers is not None and fmt is not None):
        return fmt
    return None


def iter_records(
    path: str | os.PathLike,
    index: str = ":",
    *,
    fmt: str | None = None,
    readers: int = 0,
    types=None,
    cache: bool = True,
) -> Iterator[FrameRecord]:
    """The selected frames of a trajectory by its native reader, in order.

    Args:
        path: the trajectory.
        index: ASE selection (``":"``, ``"0:100:2"``, ``"-1"``).
        fmt: its format (default :func:`detect_format`).
        readers: reader processes for (ext)xyz and LAMMPS dumps (0 or 1: in process);
            torch-sim and ``.traj`` files are read in process.
        types: LAMMPS types to elements (:func:`~quests_torch.readers.lammps.parse_types`);
            needed by a dump without an ``element`` or ``mass`` column, ignored otherwise.
        cache: keep the frame index of (ext)xyz and dump files in the cache.

    Raises:
        ValueError: an unreadable file or frame, a dump without ``types`` (named), or a
            format without a native reader.
    """
    fmt = detect_format(path) if fmt is None else fmt
    types = parse_types(types)
    if fmt == "xyz":
        yield from _pool_records(path, index, readers=readers, cache=cache)
    elif fmt == "lammps-dump":
        try:
            check_dump_types(path, types)
        except ValueError as exc:
            raise ValueError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
        read = partial(read_dump_frames, types=types)
        yield from _pool_records(
            path, index, readers=readers, cache=cache, scanner=scan_dump, read=read
        )
    elif fmt == "torch-sim":
        yield from torchsim.iter_records(path, index)
    elif fmt == "ase-traj":
        yield from asetraj.iter_records(path, index)
    else:
        raise ValueError(f"{path}: no native reader for this format (read it with ASE)")


def count_frames(path: str | os.PathLike) -> int | None:
    """Frames of a trajectory in a native format, from its index or header (cheap: the frame
    index of a dump is cached), or ``None`` for other formats."""
    fmt = detect_format(path)
    if fmt == "xyz":
        return len(frame_index(path))
    if fmt == "lammps-dump":
        return len(frame_index(path, scanner=scan_dump))
    if fmt == "torch-sim":
        return torchsim.count_frames(path)
    if fmt == "ase-traj":
        return asetraj.count_frames(path)
    return None
