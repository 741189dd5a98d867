"""Selection strategies: which tokens to recompute at each pruned step.

Every module here is imported when the package is, so a new file that registers a
selector (``@selectors.register("name")``) needs no import line anywhere.
"""

from catlab.registry import import_submodules
from catlab.selection.base import Policy, StepState, kept_tokens

import_submodules(__name__, __path__)

__all__ = ["Policy", "StepState", "kept_tokens"]
