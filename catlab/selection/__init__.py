"""Selection strategies: which tokens to recompute at each pruned step."""
from catlab.selection.base import Policy, StepState, kept_tokens
from catlab.selection import simple  # noqa: F401  (registers full, random)

__all__ = ["Policy", "StepState", "kept_tokens"]
