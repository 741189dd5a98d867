"""The model adapter interface, the embedded default model's adapter, and what the families' adapters share
(``tiny.py``, ``packed.py``); each family's own adapters live in its module of :mod:`catlab.families`. Every module
here is imported."""

from catlab.models.base import Conditioning, ModelAdapter
from catlab.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["Conditioning", "ModelAdapter"]
