"""Reading trajectory frames fast: a byte-offset index of (ext)xyz files
(:mod:`~quests_torch.readers.index`), a vectorised extxyz parser that falls back to ASE
(:mod:`~quests_torch.readers.extxyz`) and a pool of reader processes handing frames back in
order (:mod:`~quests_torch.readers.pool`). ASE stays the reader of every other format and the
reference of the tests.
"""

from .extxyz import FrameRecord, parse_frame, read_frames
from .index import FrameIndex, file_identity, frame_index, scan_xyz, select_frames

__all__ = [
    "FrameIndex",
    "FrameRecord",
    "file_identity",
    "frame_index",
    "parse_frame",
    "read_frames",
    "scan_xyz",
    "select_frames",
]
