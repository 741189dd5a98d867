"""The private diffusers names catlab's step caches rely on, in one place.

diffusers does not promise these names (hook identifiers, the cache-context
setter) across releases. Importing them here, once, turns a rename upstream
into one clear error instead of a traceback from deep inside a wrapper.
"""

from __future__ import annotations

import diffusers

#: the diffusers release these names were last checked against
CHECKED_WITH = "0.42.1"

try:
    from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
    from diffusers.hooks.hooks import CacheContext, _set_cache_context
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK
    from diffusers.hooks.sea_cache import (
        _SEA_CACHE_BLOCK_HOOK,
        _SEA_CACHE_LEADER_BLOCK_HOOK,
        _SEA_CACHE_POST_NORM_HOOK,
        _SEA_CACHE_ROOT_HOOK,
    )
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK
except ImportError as err:  # pragma: no cover - depends on the installed diffusers
    raise ImportError(
        f"catlab's step caches use diffusers internals that diffusers {diffusers.__version__} does not have "
        f"({err}); they were checked with diffusers {CHECKED_WITH}. Install that version, or run without "
        "catlab.stepcache."
    ) from err

__all__ = [
    "CacheContext",
    "_set_cache_context",
    "_FBC_BLOCK_HOOK",
    "_FBC_LEADER_BLOCK_HOOK",
    "_MAG_CACHE_BLOCK_HOOK",
    "_MAG_CACHE_LEADER_BLOCK_HOOK",
    "_TAYLORSEER_CACHE_HOOK",
    "_FASTER_CACHE_BLOCK_HOOK",
    "_FASTER_CACHE_DENOISER_HOOK",
    "_PYRAMID_ATTENTION_BROADCAST_HOOK",
    "_SEA_CACHE_ROOT_HOOK",
    "_SEA_CACHE_LEADER_BLOCK_HOOK",
    "_SEA_CACHE_BLOCK_HOOK",
    "_SEA_CACHE_POST_NORM_HOOK",
    "CHECKED_WITH",
]
