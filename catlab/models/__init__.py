"""Model adapters, one per transformer family (and the embedded default model); every module is imported."""

from catlab.models.base import Conditioning, ModelAdapter
from catlab.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["Conditioning", "ModelAdapter"]
