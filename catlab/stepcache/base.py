"""diffusers' step-level caches as catlab components: one small wrapper per cache.

A wrapper builds diffusers' own config and calls diffusers' own ``apply_*`` on a
transformer; catlab only chooses the layout where a family needs it (see each
wrapper) and drives the state per generation. The loop calls::

    cache.apply(transformer)                   # once; after TokenPruner.attach() when composing
    cache.begin(groups)                        # at the start of each generation (2 groups: CFG)
    with cache.context(step, num_steps):       # around each transformer call (1-based step)
        pred = adapter.predict(...)
    cache.remove(transformer)                  # the transformer is the stock model again
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from diffusers.hooks import HookRegistry
from torch import nn

from catlab.capabilities import Capability
from catlab.registry import Named, stepcaches  # noqa: F401  (stepcaches re-exported: catlab.stepcache.stepcaches)
from catlab.stepcache.diffusers_private import CacheContext, _set_cache_context


class StepCacheError(RuntimeError):
    """A step cache cannot run on this model or in this combination; the message says why and what works."""


@dataclass
class StepCache(Named):
    """Base wrapper: subclasses set :attr:`hook_names` and implement :meth:`_apply`."""

    #: names of the diffusers hooks this cache registers (removed by :meth:`remove`)
    hook_names: ClassVar[tuple[str, ...]] = ()
    #: what this cache allows or needs (:class:`~catlab.capabilities.Capability`): ``COMPOSES_WITH_PRUNING``
    #: (token pruning may run inside the steps it computes, see docs/beyond_copy.md), ``NEEDS_CALIBRATION``
    #: (:meth:`calibrate` must run before generating)
    capabilities: ClassVar[Capability] = Capability.NONE
    #: why the cache cannot run inside pruned steps (unless it declares ``COMPOSES_WITH_PRUNING``)
    pruning_conflict: ClassVar[str] = (
        "compares block residuals between steps; with token pruning those residuals belong to different tokens"
    )

    @property
    def composes_with_pruning(self) -> bool:
        return Capability.COMPOSES_WITH_PRUNING in self.capabilities

    @property
    def needs_calibration(self) -> bool:
        return Capability.NEEDS_CALIBRATION in self.capabilities

    @property
    def is_applied(self) -> bool:
        """Whether the cache's hooks are on a transformer now (by :meth:`apply` or during :meth:`calibrate`)."""
        return getattr(self, "_transformer", None) is not None

    def apply(self, transformer: nn.Module) -> StepCache:
        if self.is_applied:
            raise StepCacheError(f"step cache '{self.name}' is already applied; remove() it first")
        self._transformer = transformer
        try:
            self._apply(transformer)
        except StepCacheError:
            self.remove(transformer)
            raise
        except Exception as err:  # noqa: BLE001  (any diffusers failure becomes one clear message)
            self.remove(transformer)
            raise StepCacheError(
                f"step cache '{self.name}' cannot be applied to a {type(transformer).__name__}: "
                f"{type(err).__name__}: {err}"
            ) from err
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
        return self

    def _apply(self, transformer: nn.Module) -> None:
        raise NotImplementedError

    def remove(self, transformer: nn.Module | None = None) -> None:
        transformer = transformer if transformer is not None else getattr(self, "_transformer", None)
        if transformer is None:
            return
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        for hook in self.hook_names:
            registry.remove_hook(hook, recurse=True)
        registry.invalidate_child_registries_cache()
        self._transformer = None

    def begin(self, groups: int) -> None:
        """A generation starts with ``groups`` stacked guidance row groups per sample (2: classifier-free
        guidance, 1: none or one branch per call): forget the cached features (:meth:`reset`). A cache that
        needs a kind of batch refuses the others here, before any step."""
        self.reset()

    def reset(self) -> None:
        """Forget the cached features: a new generation starts."""
        t = getattr(self, "_transformer", None)
        if t is not None:
            HookRegistry.check_if_exists_or_initialize(t).reset_stateful_hooks(recurse=True)
            _set_cache_context(t, None)

    @contextlib.contextmanager
    def context(self, step: int, num_steps: int, name: str = "catlab", **info):
        """The diffusers cache context around one transformer call of ``step`` (1-based; CFG rows are stacked);
        ``name`` keys the cache's state (a step's second call, e.g. true CFG's negative prompt, has its own)."""
        t = self._transformer
        _set_cache_context(t, CacheContext(name, step_index=step - 1, num_inference_steps=num_steps, **info))
        try:
            yield
        finally:
            _set_cache_context(t, None)

    def calibrate(self, transformer: nn.Module, generate: Callable[[], object]) -> list[float] | None:
        """Measure what the cache needs first; ``generate()`` runs one full generation with this cache."""
        return None

    @property
    def calibrated(self) -> bool:
        """Whether :meth:`calibrate` has what it measures (always, for caches that need none)."""
        return True

    def computes(self, step: int) -> bool | None:
        """Whether ``step`` (1-based) is computed, when known ahead (a fixed schedule); ``None``: known at run time."""
        return None
