"""torch-sim HDF5 trajectories (``TorchSimTrajectory`` files, as ``TrajectoryReporter``
writes them) read with h5py straight into arrays.

The layout, the same from torch-sim 0.3 to 0.6: a ``/header`` group (attribute ``program =
"TorchSim"``), the arrays under ``/data/`` with frames first and their step numbers under
``/steps/``:

- ``positions`` ``[F, n, 3]`` (Å; float32 unless the trajectory was opened with
  ``coerce_to_float32=False``): one frame per row, the frames of the file;
- ``cell`` ``[F, 3, 3]``, or ``[1, 3, 3]`` when static: torch-sim's column-vector
  convention (``cell[:, i]`` is lattice vector ``i``), so the rows of the ASE cell are its
  transpose, as ``torch_sim.io.state_to_atoms`` gives them;
- ``atomic_numbers`` ``[F, n]``, or ``[1, n]`` when static;
- ``pbc``: ``[1]`` (one flag for the three directions, torch-sim 0.3) or ``[3]`` (torch-sim
  0.6, written with ``write_global_array``).

Other arrays (``masses``, ``velocities``, ``forces``, properties) are not read. Values are
converted to float64 (exactly, from float32), so the frames are those
``torch_sim.io.state_to_atoms(TorchSimTrajectory(path).get_state(i))`` gives, bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .extxyz import FrameRecord
from .index import select_frames

__all__ = ["HDF5_SUFFIXES", "count_frames", "is_hdf5", "iter_records"]

#: file suffixes read as torch-sim HDF5 trajectories
HDF5_SUFFIXES = (".h5", ".hdf5")
#: atoms read from the file at once (frames of a chunk come in one HDF5 read per array)
CHUNK_ATOMS = 1 << 16


def is_hdf5(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an HDF5 file by its suffix (``.h5``, ``.hdf5``)."""
    return Path(path).suffix.lower() in HDF5_SUFFIXES


def _open(path: str | os.PathLike):
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py comes with torch-sim
        raise ImportError(
            f"{path}: reading a torch-sim HDF5 trajectory needs h5py (pip install h5py)"
        ) from None
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read structures (not an HDF5 file: {exc})") from None
    data = f.get("data")
    missing = [k for k in ("positions", "atomic_numbers") if data is None or k not in data]
    if missing:
        names = sorted(data) if data is not None else sorted(f)
        f.close()
        raise ValueError(
            f"{path}: not a torch-sim trajectory (no /data/{missing[0]}; it holds "
            f"{', '.join(names) or 'nothing'})"
        )
    return f


def _layout(path, data) -> tuple[int, int]:
    """``(frames, atoms)`` of a trajectory's ``/data`` group, its arrays checked."""
    pos = data["positions"]
    if pos.ndim != 3 or pos.shape[2] != 3:
        raise ValueError(f"{path}: /data/positions has shape {pos.shape}, expected [F, n, 3]")
    frames, atoms = pos.shape[:2]
    z = data["atomic_numbers"]
    if z.ndim != 2 or z.shape[1] != atoms or z.shape[0] not in (1, frames):
        raise ValueError(
            f"{path}: /data/atomic_numbers has shape {z.shape}, expected [1 or {frames}, {atoms}]"
        )
    if "cell" in data:
        cell = data["cell"]
        if cell.shape[1:] != (3, 3) or cell.shape[0] not in (1, frames):
            raise ValueError(
                f"{path}: /data/cell has shape {cell.shape}, expected [1 or {frames}, 3, 3] "
                "(a trajectory cut short while written?)"
            )
    return frames, atoms


def _pbc(data) -> np.ndarray:
    if "pbc" not in data:
        return np.ones(3, dtype=bool)  # torch-sim's default when absent
    return np.broadcast_to(np.asarray(data["pbc"][()], dtype=bool).reshape(-1)[:3], 3).copy()


def count_frames(path: str | os.PathLike) -> int:
    """Frames of a torch-sim trajectory (the rows of ``/data/positions``).

    Raises:
        ValueError: not a torch-sim trajectory.
    """
    with _open(path) as f:
        return _layout(path, f["data"])[0]


def _rows(ds, frames: np.ndarray) -> np.ndarray:
    """``ds[frames]`` for a chunk of frame numbers: one read of the range they span when it
    is dense, else one read per frame; a static array (one row) gives that row for each."""
    if ds.shape[0] == 1:
        return np.repeat(ds[0:1], len(frames), axis=0)
    lo, hi = int(frames.min()), int(frames.max()) + 1
    if hi - lo <= 4 * len(frames):
        return ds[lo:hi][frames - lo]
    return np.stack([ds[int(i)] for i in frames])


def iter_records(path: str | os.PathLike, index: str = ":") -> Iterator[FrameRecord]:
    """The selected frames of a torch-sim HDF5 trajectory as
    :class:`~quests_torch.readers.extxyz.FrameRecord` (float64 positions and cell rows).

    Args:
        path: the ``.h5``/``.hdf5`` file.
        index: ASE selection (``":"``, ``"0:100:2"``, ``"-1"``).

    Raises:
        ValueError: not a torch-sim trajectory, or arrays of inconsistent shapes (named).
    """
    with _open(path) as f:
        data = f["data"]
        n_frames, n_atoms = _layout(path, data)
        frames = select_frames(n_frames, index)
        pbc = _pbc(data)
        step = max(1, CHUNK_ATOMS // max(1, n_atoms))
        for a in range(0, len(frames), step):
            chunk = frames[a : a + step]
            positions = _rows(data["positions"], chunk).astype(np.float64)
            numbers = _rows(data["atomic_numbers"], chunk).astype(np.int64)
            if "cell" in data:
                cells = _rows(data["cell"], chunk).astype(np.float64).transpose(0, 2, 1)
            else:
                cells = np.zeros((len(chunk), 3, 3))
            for i in range(len(chunk)):
                yield FrameRecord(numbers[i], positions[i], np.ascontiguousarray(cells[i]), pbc)
