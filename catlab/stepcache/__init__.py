"""diffusers' step-level caches (TaylorSeer, FirstBlockCache, MagCache) as catlab components, and a MAC counter."""
from catlab.stepcache.base import StepCache, StepCacheError, stepcaches
from catlab.stepcache.caches import FirstBlockCache, MagCache, TaylorSeer
from catlab.stepcache.macs import MacCounter
from catlab.stepcache.schedule import BudgetSchedule

__all__ = ["StepCache", "StepCacheError", "stepcaches", "TaylorSeer", "FirstBlockCache", "MagCache", "MacCounter", "BudgetSchedule"]
