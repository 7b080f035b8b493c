"""quests-torch: QUESTS information entropy and model-free uncertainty as PyTorch tensor ops.

Data flows structures -> neighbours -> descriptors -> kernel sums -> metrics -> applications:
``AtomsBatch`` / ``get_descriptors`` (descriptors), ``quests_torch.kde`` (tiled log kernel
sums), ``quests_torch.metrics`` (entropy, diversity, dH, overlap, learning curves) and
``quests_torch.screening`` (trajectory screening, solid-like clusters) and
``quests_torch.compression`` (dataset compression, active-learning generations),
``quests_torch.uncertainty`` / ``quests_torch.calculators`` (on-the-fly dH next to MLIP
inference, ASE wrappers, entropy-biased sampling), ``quests_torch.sampling`` (structure
generation to a target dH) and ``quests_torch.distributed`` (torchrun).
"""

from . import compression, distributed, estimates, kde, metrics, store
from ._precision import float64_is_fast
from ._version import __version__
from .calculators import EntropyBiasCalculator, ExtrapolationError, QuestsUncertaintyCalculator
from .clusters import largest_cluster
from .compression import compress, compress_structures, generation_report, selection_summary
from .descriptors import (
    DEFAULT_CUTOFF,
    DEFAULT_K,
    descriptor_width,
    descriptors_from_tensors,
    get_descriptors,
)
from .estimates import Estimate
from .kde import DEFAULT_BANDWIDTH, log_kernel_sum
from .metrics import (
    dataset_summary,
    delta_entropy,
    diversity,
    entropy,
    entropy_learning_curve,
    estimate_diversity,
    estimate_entropy,
    estimate_overlap,
    novelty,
    overlap,
)
from .neighbors import NeighborCache
from .sampling import GenerationResult, generate_to_target, random_walk_to_target
from .screening import screen_frames, screen_trajectory
from .store import DescriptorStore, open_store
from .store_writer import StoreWriter, write_descriptor_store
from .structures import AtomsBatch
from .uncertainty import StructureUncertainty, UncertaintyBank, per_structure_summary

__all__ = [
    "DEFAULT_BANDWIDTH",
    "DEFAULT_CUTOFF",
    "DEFAULT_K",
    "AtomsBatch",
    "DescriptorStore",
    "EntropyBiasCalculator",
    "Estimate",
    "ExtrapolationError",
    "GenerationResult",
    "NeighborCache",
    "QuestsUncertaintyCalculator",
    "StoreWriter",
    "StructureUncertainty",
    "UncertaintyBank",
    "__version__",
    "compress",
    "compress_structures",
    "compression",
    "dataset_summary",
    "delta_entropy",
    "descriptor_width",
    "descriptors_from_tensors",
    "distributed",
    "diversity",
    "entropy",
    "entropy_learning_curve",
    "estimate_diversity",
    "estimate_entropy",
    "estimate_overlap",
    "estimates",
    "float64_is_fast",
    "generate_to_target",
    "generation_report",
    "get_descriptors",
    "kde",
    "largest_cluster",
    "log_kernel_sum",
    "metrics",
    "novelty",
    "open_store",
    "overlap",
    "per_structure_summary",
    "random_walk_to_target",
    "screen_frames",
    "screen_trajectory",
    "selection_summary",
    "store",
    "write_descriptor_store",
]
