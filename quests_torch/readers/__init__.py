"""Reading trajectory frames fast, one module per format, each yielding
:class:`~quests_torch.readers.extxyz.FrameRecord` (numbers, positions, cell, pbc):

- :mod:`~quests_torch.readers.extxyz`: a vectorised extxyz/xyz parser that falls back to ASE;
- :mod:`~quests_torch.readers.lammps`: LAMMPS dump text (``types`` map, scaled/unscaled
  coordinates, triclinic boxes);
- :mod:`~quests_torch.readers.torchsim`: torch-sim HDF5 trajectories (h5py);
- :mod:`~quests_torch.readers.asetraj`: ASE ``.traj`` files from their ulm records;

with a byte-offset frame index of (ext)xyz files and dumps (:mod:`~quests_torch.readers.index`),
a pool of reader processes handing frames back in order (:mod:`~quests_torch.readers.pool`),
and the choice of reader by file (:mod:`~quests_torch.readers.formats`). ASE stays the reader
of every other format and the reference of the tests.
"""

from .extxyz import FrameRecord, parse_frame, read_frames
from .formats import detect_format, native_format
from .index import FrameIndex, file_identity, frame_index, scan_xyz, select_frames
from .lammps import parse_types, scan_dump

__all__ = [
    "FrameIndex",
    "FrameRecord",
    "detect_format",
    "file_identity",
    "frame_index",
    "native_format",
    "parse_frame",
    "parse_types",
    "read_frames",
    "scan_dump",
    "scan_xyz",
    "select_frames",
]
