"""Reuse rules for the tokens a pruned step does not compute: ``copy`` and ``taylor``."""
from catlab.reuse.base import Reuse, reuses, unpatchify
from catlab.reuse.rules import Copy, Taylor

__all__ = ["Reuse", "reuses", "unpatchify", "Copy", "Taylor"]
