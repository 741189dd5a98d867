"""Model adapters, one per transformer family (and the embedded default model)."""
from catlab.models.base import Conditioning, ModelAdapter
from catlab.models import embedded, pixart, sd3  # noqa: F401  (register the adapters)

__all__ = ["Conditioning", "ModelAdapter"]
