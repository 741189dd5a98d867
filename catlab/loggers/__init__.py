"""Where a run reports: a plain local sink, or Weights & Biases (offline by default)."""
from catlab.loggers.base import Logger, image_grid
from catlab.loggers import local, wandb_logger  # noqa: F401  (register)

__all__ = ["Logger", "image_grid"]
