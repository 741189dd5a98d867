"""Selection strategies: which tokens to recompute at each pruned step."""
from catlab.selection.base import Policy, StepState, kept_tokens
from catlab.selection import simple  # noqa: F401  (registers full, random)
from catlab.selection import scorers, staleness, clustering, pooling  # noqa: F401  (register the parts)
from catlab.selection import cat, cat_reference, baselines, atedm  # noqa: F401  (register the selectors)

__all__ = ["Policy", "StepState", "kept_tokens"]
