"""The three wrappers: ``taylorseer``, ``first_block_cache``, ``mag_cache``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    TaylorSeerCacheConfig,
    apply_first_block_cache,
    apply_mag_cache,
    apply_taylorseer_cache,
)
from torch import nn

from catlab.capabilities import Capability
from catlab.pruning.families import UnsupportedModelError, family_of
from catlab.stepcache.base import StepCache, StepCacheError, stepcaches
from catlab.stepcache.diffusers_private import (
    _FBC_BLOCK_HOOK,
    _FBC_LEADER_BLOCK_HOOK,
    _MAG_CACHE_BLOCK_HOOK,
    _MAG_CACHE_LEADER_BLOCK_HOOK,
    _TAYLORSEER_CACHE_HOOK,
)


def _block_name(transformer: nn.Module) -> str:
    """The attribute holding the transformer's main block list: its family's (Wan: ``blocks``), else
    ``transformer_blocks``."""
    try:
        return family_of(transformer).blocks
    except UnsupportedModelError:
        return "transformer_blocks"


def _blocks(transformer: nn.Module) -> nn.ModuleList:
    name = _block_name(transformer)
    blocks = getattr(transformer, name, None)
    if not isinstance(blocks, nn.ModuleList):
        raise StepCacheError(
            f"a {type(transformer).__name__} has no `{name}` list; "
            "catlab's step caches support the transformers of catlab's families"
        )
    return blocks


def _pre_only(block: nn.Module) -> bool:
    """SD3's last block drops the text stream: it returns ``(None, hidden_states)``."""
    return bool(getattr(block, "context_pre_only", False))


@stepcaches.register("taylorseer")
@dataclass
class TaylorSeer(StepCache):
    """diffusers' TaylorSeer: steps ``1..start_step`` in full, then a full step every ``cache_interval``, Taylor
    forecasts between.

    ``start_step`` is 1-based like a selector's t0 (diffusers' 0-based
    ``disable_cache_before_step`` has the same value; that name is still accepted,
    with a deprecation warning).

    ``mode="output"`` forecasts the output projection and skips the blocks (diffusers'
    lite layout): a forecast step costs almost nothing. diffusers' lite patterns
    would also skip SD3's last block, whose ``None`` text output TaylorSeer cannot
    record; catlab skips that block's attention and MLP instead (its modulation
    linear still runs, and is counted). ``mode="attention"`` is diffusers' default
    (forecast each attention output; norms and MLPs run).
    """

    cache_interval: int = 3
    start_step: int = 8
    max_order: int = 1
    mode: str = "output"
    factors_dtype: str = "float32"
    #: deprecated: diffusers' name of ``start_step``
    disable_cache_before_step: int | None = None

    hook_names: ClassVar[tuple[str, ...]] = (_TAYLORSEER_CACHE_HOOK,)
    capabilities: ClassVar[Capability] = Capability.COMPOSES_WITH_PRUNING

    def __post_init__(self) -> None:
        if self.disable_cache_before_step is not None:
            warnings.warn(
                "taylorseer: disable_cache_before_step is deprecated; use start_step (steps 1..start_step "
                "run in full, the same number)",
                DeprecationWarning,
                stacklevel=3,
            )
            self.start_step, self.disable_cache_before_step = int(self.disable_cache_before_step), None

    def config(self, transformer: nn.Module) -> TaylorSeerCacheConfig:
        # diffusers computes the steps whose 0-based index is below disable_cache_before_step: 1..start_step
        common = dict(
            cache_interval=self.cache_interval,
            disable_cache_before_step=self.start_step,
            max_order=self.max_order,
            taylor_factors_dtype=getattr(torch, self.factors_dtype),
        )
        if self.mode == "attention":
            return TaylorSeerCacheConfig(**common)
        if self.mode != "output":
            raise StepCacheError(f"taylorseer: mode must be 'output' or 'attention'; got {self.mode!r}")
        blocks, name = _blocks(transformer), _block_name(transformer)
        skip = []
        for i, block in enumerate(blocks):
            if _pre_only(block):
                parts = [a for a in ("attn", "attn2", "ff") if getattr(block, a, None) is not None]
                skip.append(rf"{name}\.{i}\.({'|'.join(parts)})")
            else:
                skip.append(rf"{name}\.{i}")
        singles = getattr(transformer, "single_transformer_blocks", None) or ()  # FLUX: every block list is skipped
        skip += [rf"single_transformer_blocks\.{i}" for i in range(len(singles))]
        return TaylorSeerCacheConfig(**common, cache_identifiers=["proj_out"], skip_predict_identifiers=skip)

    def _apply(self, transformer):
        apply_taylorseer_cache(transformer, self.config(transformer))

    def computes(self, step: int) -> bool:
        """diffusers' schedule: steps ``1..start_step``, then every ``cache_interval``-th."""
        index, before = step - 1, self.start_step
        return index < before or (index - before - 1) % self.cache_interval == 0


class _BlockView(nn.Module):
    """Shows diffusers' cache appliers a subset of a transformer's blocks (the same block objects)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(blocks)


@stepcaches.register("first_block_cache")
@dataclass
class FirstBlockCache(StepCache):
    """diffusers' FirstBlockCache: when the first block's residual changed by less than ``threshold``, skip the rest.

    diffusers makes the last block the cache's tail and reads its text output; SD3's
    last block returns none (a ``TypeError`` in diffusers 0.42). catlab hands the
    cache every block but a context-pre-only last one, which then always runs.
    """

    threshold: float = 0.05

    hook_names: ClassVar[tuple[str, ...]] = (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK)

    def _apply(self, transformer):
        blocks = list(_blocks(transformer))
        if blocks and _pre_only(blocks[-1]):
            blocks = blocks[:-1]
        if len(blocks) < 2:
            raise StepCacheError(
                f"first_block_cache needs at least 2 cacheable blocks (a head and a tail); "
                f"this {type(transformer).__name__} has {len(blocks)}"
            )
        apply_first_block_cache(_BlockView(blocks), FirstBlockCacheConfig(threshold=self.threshold))


@stepcaches.register("mag_cache")
@dataclass
class MagCache(StepCache):
    """diffusers' MagCache: skip every block while the accumulated residual-magnitude error stays below ``threshold``.

    The magnitude ratios are model dependent: :meth:`calibrate` runs one full
    generation with diffusers' calibration mode and keeps them (``mag_ratios``
    may also be given). ``num_steps`` null takes the run's (set when the cache is built
    for a run); a number must equal it.
    """

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    num_steps: int | None = None
    mag_ratios: list[float] | None = field(default=None)

    hook_names: ClassVar[tuple[str, ...]] = (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK)
    capabilities: ClassVar[Capability] = Capability.NEEDS_CALIBRATION

    @property
    def calibrated(self) -> bool:
        return self.mag_ratios is not None

    def _apply(self, transformer):
        if self.num_steps is None:
            raise StepCacheError(
                "mag_cache needs num_steps: build it for a run (catlab.builders.build_step_cache) or give num_steps"
            )
        if self.mag_ratios is None:
            raise StepCacheError(
                "mag_cache needs magnitude ratios: call calibrate(generate) first, or give mag_ratios (one per step)"
            )
        _blocks(transformer)
        apply_mag_cache(
            transformer,
            MagCacheConfig(
                threshold=self.threshold,
                max_skip_steps=self.max_skip_steps,
                retention_ratio=self.retention_ratio,
                num_inference_steps=self.num_steps,
                mag_ratios=list(self.mag_ratios),
            ),
        )

    def calibrate(self, transformer: nn.Module, generate) -> list[float]:
        """Measure the ratios on one full-model generation with diffusers' calibration mode; return them.

        ``generate()`` must run one generation of ``num_steps`` steps on ``transformer``
        with this cache in place (e.g. ``generate(adapter, full, ..., step_cache=cache)``).
        The calibration config claims one step more than the run has, so diffusers does
        not clear the ratios at the last step; catlab reads them off the tail hook.
        The cache is left removed.
        """
        self.remove(transformer)
        self._transformer = transformer
        apply_mag_cache(transformer, MagCacheConfig(calibrate=True, num_inference_steps=self.num_steps + 1))
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
        try:
            generate()
            hooks = [
                m._diffusers_hook.get_hook(_MAG_CACHE_BLOCK_HOOK)
                for m in transformer.modules()
                if hasattr(m, "_diffusers_hook")
            ]
            tail = next(h for h in hooks if h is not None and h.is_tail)
            states = list(tail.state_manager._state_cache.values())
            ratios = list(states[0].calibration_ratios) if states else []
        finally:
            self.remove(transformer)
        if len(ratios) != self.num_steps:
            raise StepCacheError(
                f"mag_cache calibration saw {len(ratios)} steps; expected {self.num_steps} "
                "(generate() must run num_steps steps with this cache)"
            )
        self.mag_ratios = ratios
        return ratios
