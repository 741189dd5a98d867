"""Reuse rules for the tokens a pruned step does not compute: ``copy``, ``taylor`` and ``best_order``."""

from catlab.reuse.base import Reuse, reuses, unpatchify
from catlab.reuse.best_order import BestOrder  # noqa: E402  (after rules: it extends Taylor)
from catlab.reuse.rules import Copy, Taylor

__all__ = ["Reuse", "reuses", "unpatchify", "Copy", "Taylor", "BestOrder"]
