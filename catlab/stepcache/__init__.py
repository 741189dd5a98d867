"""Step-level caches as catlab components: diffusers' (TaylorSeer, FirstBlockCache, MagCache,
PyramidAttentionBroadcast, FasterCache,
SeaCache), cache-dit's
(DBCache, DBPrune; optional, ``pip install "catlab[peers]"``), and a MAC counter.

Every module here is imported when the package is, so a new file that registers a step cache
(``@stepcaches.register("name")``) needs no import line anywhere; its YAML goes in ``conf/stepcache/``.
"""

from catlab.registry import import_submodules
from catlab.stepcache.base import StepCache, StepCacheError, stepcaches

import_submodules(__name__, __path__)

from catlab.stepcache.attention_caches import FasterCache, PyramidAttentionBroadcast  # noqa: E402
from catlab.stepcache.cachedit import CacheDitDBCache, CacheDitDBPrune  # noqa: E402  (imports cache-dit only when built)
from catlab.stepcache.caches import FirstBlockCache, MagCache, TaylorSeer  # noqa: E402
from catlab.stepcache.macs import MacCounter  # noqa: E402
from catlab.stepcache.sea_cache import SeaCache  # noqa: E402

__all__ = [
    "StepCache",
    "StepCacheError",
    "stepcaches",
    "TaylorSeer",
    "FirstBlockCache",
    "MagCache",
    "PyramidAttentionBroadcast",
    "FasterCache",
    "SeaCache",
    "MacCounter",
    "CacheDitDBCache",
    "CacheDitDBPrune",
]
