"""Reuse rules for the tokens a pruned step does not compute: ``copy``, ``taylor`` and ``best_order``.

Every module here is imported when the package is, so a new file that registers a rule
(``@reuses.register("name")``) needs no import line anywhere; its YAML goes in ``conf/reuse/``.
"""

from catlab.registry import import_submodules
from catlab.reuse.base import Reuse, reuses, unpatchify

import_submodules(__name__, __path__)

from catlab.reuse.best_order import BestOrder  # noqa: E402
from catlab.reuse.rules import Copy, Taylor  # noqa: E402

__all__ = ["Reuse", "reuses", "unpatchify", "Copy", "Taylor", "BestOrder"]
