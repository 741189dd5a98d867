"""``sea_cache``: diffusers' SeaCache (Spectral-Evolution-Aware cache) as a catlab step cache.

SeaCache filters each step's noisy input latent with a spectral gain set by the step's
sigma (a Wiener-like filter under a power-law prior on the clean signal), and compares
that filtered "indicator" with the previous step's. While the accumulated relative L1
change stays below ``threshold``, the whole block stack is skipped: its residual is
reused (``residual_order=0``) or linearly extrapolated from the last two computed
steps (``residual_order=1``). The first ``retention_steps`` and last ``cache_end_steps``
steps always compute, and at most ``max_consecutive_cached`` steps in a row are skipped.

diffusers runs the full model, silently ("fail open"), whenever a call lacks the
scheduler's step, sigma or step count, or when its gate cannot decide. catlab never
lets that pass: :meth:`SeaCache.context` refuses a call without a sigma in [0, 1], and
any fail-open diffusers would take is raised as a :class:`StepCacheError` naming it.
Every step SeaCache reports as cached really ran no block (catlab's MAC counter sees it).

diffusers 0.42 gives SeaCache an input adapter for two transformers only: Wan
text to video (``WanTransformer3DModel`` with ``in_channels == out_channels``) and
Cosmos 3. On any other model it would fail open at every call; catlab refuses it at
:meth:`~catlab.stepcache.base.StepCache.apply` in one line.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import ClassVar

from diffusers.hooks import HookRegistry, SeaCacheConfig, apply_sea_cache
from torch import nn

from catlab.stepcache.base import StepCache, StepCacheError, stepcaches
from catlab.stepcache.diffusers_private import (
    _SEA_CACHE_BLOCK_HOOK,
    _SEA_CACHE_LEADER_BLOCK_HOOK,
    _SEA_CACHE_POST_NORM_HOOK,
    _SEA_CACHE_ROOT_HOOK,
)

#: what diffusers' SeaCache has an input adapter for (named in the refusal)
SUPPORTED = "Wan text to video (WanTransformer3DModel with in_channels == out_channels) and Cosmos3OmniTransformer"


def _supported(transformer: nn.Module) -> bool:
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

    if isinstance(transformer, WanTransformer3DModel):
        return transformer.config.in_channels == transformer.config.out_channels
    try:
        from diffusers.models.transformers.transformer_cosmos3 import Cosmos3OmniTransformer
    except ImportError:  # pragma: no cover - depends on the installed diffusers
        return False
    return isinstance(transformer, Cosmos3OmniTransformer)


@stepcaches.register("sea_cache")
@dataclass
class SeaCache(StepCache):
    """diffusers' SeaCache: skip the block stack while the sigma-filtered input changes little (see the module).

    The fields are diffusers' ``SeaCacheConfig``'s (its ``raw_vision_callback`` is
    not exposed: catlab runs SeaCache only where diffusers has its own adapter).
    Steps are the run's: ``retention_steps`` / ``cache_end_steps`` count from the
    first / last step catlab runs. With classifier-free guidance stacked in one call
    (catlab's loop) both branches share one decision (the indicator's distance is
    the mean over the rows); a pipeline's separate negative-prompt call has its own.
    """

    threshold: float = 0.25
    residual_order: int = 1
    retention_steps: int = 1
    cache_end_steps: int = 1
    max_consecutive_cached: int = 2
    power_exp: float = 3.0

    hook_names: ClassVar[tuple[str, ...]] = (
        _SEA_CACHE_ROOT_HOOK,
        _SEA_CACHE_LEADER_BLOCK_HOOK,
        _SEA_CACHE_BLOCK_HOOK,
        _SEA_CACHE_POST_NORM_HOOK,
    )

    def __post_init__(self) -> None:
        self.config()  # a bad value fails when the cache is built, not at the first step

    def config(self) -> SeaCacheConfig:
        try:
            return SeaCacheConfig(
                threshold=float(self.threshold),
                residual_order=self.residual_order,
                retention_steps=self.retention_steps,
                cache_end_steps=self.cache_end_steps,
                max_consecutive_cached=self.max_consecutive_cached,
                power_exp=float(self.power_exp),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"sea_cache: {str(err).replace('`', '')}") from None

    def _apply(self, transformer: nn.Module) -> None:
        if not _supported(transformer):
            raise StepCacheError(
                f"sea_cache cannot run on a {type(transformer).__name__}: diffusers' SeaCache supports {SUPPORTED} "
                "(other models need an input adapter diffusers does not have)"
            )
        apply_sea_cache(transformer, self.config())
        root = HookRegistry.check_if_exists_or_initialize(transformer).get_hook(_SEA_CACHE_ROOT_HOOK)
        root.shared_state.mark_fail_open = self._refuse_fail_open

    def _refuse_fail_open(self, message: str) -> None:
        """diffusers would run this call in full and say so once in its log: catlab stops instead."""
        raise StepCacheError(f"sea_cache cannot gate this call, diffusers would run it in full: {message}")

    @contextlib.contextmanager
    def context(self, step: int, num_steps: int, name: str = "catlab", **info):
        """The cache context of one call; SeaCache needs the scheduler's ``sigma`` of the step, in [0, 1]."""
        sigma = info.get("sigma")
        if sigma is None:
            raise StepCacheError(
                f"sea_cache needs the scheduler's sigma of step {step}: catlab's loop and enable_pruning on a "
                "pipeline pass it (a bare transformer has no scheduler); by hand, context(step, num_steps, sigma=...)"
            )
        sigma = float(sigma)
        if not (math.isfinite(sigma) and 0.0 <= sigma <= 1.0):
            raise StepCacheError(
                f"sea_cache needs a sigma in [0, 1] (a flow-matching scheduler's); step {step} has sigma={sigma}"
            )
        with super().context(step, num_steps, name, **{**info, "sigma": sigma}):
            yield
