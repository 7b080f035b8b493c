"""quests-torch: QUESTS information entropy and model-free uncertainty as PyTorch tensor ops.

Structures -> neighbours -> descriptors -> kernel sums -> metrics. The public API:
"""

from ._version import __version__
from .descriptors import (
    DEFAULT_CUTOFF,
    DEFAULT_K,
    descriptor_width,
    descriptors_from_tensors,
    get_descriptors,
)
from .structures import AtomsBatch

__all__ = [
    "DEFAULT_CUTOFF",
    "DEFAULT_K",
    "AtomsBatch",
    "__version__",
    "descriptor_width",
    "descriptors_from_tensors",
    "get_descriptors",
]
