"""Step-level caches as catlab components: diffusers' (TaylorSeer, FirstBlockCache, MagCache), cache-dit's
(DBCache, DBPrune; optional, ``pip install "catlab[peers]"``), and a MAC counter."""

from catlab.stepcache.base import StepCache, StepCacheError, stepcaches
from catlab.stepcache.cachedit import CacheDitDBCache, CacheDitDBPrune  # registers; imports cache-dit only when built
from catlab.stepcache.caches import FirstBlockCache, MagCache, TaylorSeer
from catlab.stepcache.macs import MacCounter

__all__ = [
    "StepCache",
    "StepCacheError",
    "stepcaches",
    "TaylorSeer",
    "FirstBlockCache",
    "MagCache",
    "MacCounter",
    "CacheDitDBCache",
    "CacheDitDBPrune",
]
