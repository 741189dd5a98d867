"""Reuse rules for the tokens a pruned step does not compute: ``copy`` and ``taylor``."""
from catlab.reuse.base import Reuse, reuses, unpatchify
from catlab.reuse.hook import ReuseHook
from catlab.reuse.rules import Copy, Taylor
from catlab.reuse.best_order import BestOrder  # noqa: E402  (after rules: it extends Taylor)
from catlab.reuse.selector import ForecastError

__all__ = ["Reuse", "reuses", "unpatchify", "Copy", "Taylor", "BestOrder", "ReuseHook", "ForecastError"]
