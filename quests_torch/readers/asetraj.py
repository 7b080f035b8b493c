"""ASE trajectories (``.traj``, ASE's ulm binary format) read into arrays without building
``ase.Atoms``: per frame, ``positions`` and ``cell`` from the frame's record, ``numbers`` and
``pbc`` from it when written there, else from the first frame (as
:class:`ase.io.trajectory.TrajectoryReader` does). Constraints, calculators, momenta and
``info`` are not read. The frames are those ``ase.io.read(path, ":")`` gives (numbers,
positions, cell and pbc equal bit for bit).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from .extxyz import FrameRecord
from .index import select_frames

__all__ = ["count_frames", "iter_records"]


def _open(path: str | os.PathLike):
    from ase.io import ulm

    try:
        reader = ulm.open(path, "r")
    except Exception as exc:
        raise ValueError(
            f"{path}: cannot read structures (not an ASE trajectory: {type(exc).__name__}: {exc})"
        ) from None
    if reader.get_tag() != "ASE-Trajectory":
        reader.close()
        raise ValueError(f"{path}: an ulm file tagged {reader.get_tag()!r}, not an ASE trajectory")
    return reader


def count_frames(path: str | os.PathLike) -> int:
    """Frames of an ASE ``.traj`` file (from its offset table, no frame parsed)."""
    with _open(path) as reader:
        return len(reader)


def _cell(value) -> np.ndarray:
    cell = np.array(value, dtype=np.float64)
    if cell.shape != (3, 3):  # a length or cell parameters: ASE's reading of them
        from ase.cell import Cell

        cell = Cell.new(value).array
    return cell


def iter_records(path: str | os.PathLike, index: str = ":") -> Iterator[FrameRecord]:
    """The selected frames of an ASE ``.traj`` file as
    :class:`~quests_torch.readers.extxyz.FrameRecord`.

    Raises:
        ValueError: not an ASE trajectory, or a frame that does not read (named).
    """
    with _open(path) as reader:
        frames = select_frames(len(reader), index)
        if not len(frames):
            return
        numbers0 = np.asarray(reader.numbers, dtype=np.int64)
        pbc0 = np.broadcast_to(np.asarray(reader.pbc, dtype=bool), 3).copy()
        for i, f in enumerate(frames.tolist()):
            try:
                b = reader[f]
                numbers = np.asarray(b.numbers, dtype=np.int64) if "numbers" in b else numbers0
                pbc = np.broadcast_to(np.asarray(b.pbc, bool), 3).copy() if "pbc" in b else pbc0
                record = FrameRecord(
                    numbers, np.array(b.positions, dtype=np.float64), _cell(b.cell), pbc
                )
            except Exception as exc:
                raise ValueError(
                    f"{path}: cannot read structures (structure {i} of the selection, frame "
                    f"{f} of the file: {type(exc).__name__}: {exc})"
                ) from None
            yield record
