"""quests-torch: QUESTS information entropy and model-free uncertainty as PyTorch tensor ops."""

from ._version import __version__

__all__ = ["__version__"]
