"""Where a run reports: a plain local sink, or Weights & Biases (offline by default); every module is imported."""

from catlab.loggers.base import Logger, image_grid
from catlab.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["Logger", "image_grid"]
