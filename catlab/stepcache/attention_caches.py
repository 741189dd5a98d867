"""Attention-level step caches from diffusers: ``pyramid_attention_broadcast`` and ``faster_cache``.

Both reuse an attention module's output from an earlier step instead of computing it, inside a range of
timesteps; FasterCache also skips the unconditional guidance branch at some steps and rebuilds it from the
conditional one in the frequency domain. diffusers' hooks ask the pipeline for the current timestep
(``current_timestep_callback``); catlab reads it from the transformer's own ``timestep`` argument, so the
same cache runs in catlab's loop and on a stock pipeline.

Ranges are in the scheduler's timesteps (1000 at pure noise, 0 at the end), as in diffusers; a step whose
timestep lies strictly inside a range may reuse. Work the hooks skip never runs, so the MAC counter
(:class:`~catlab.stepcache.macs.MacCounter`) counts only what was computed -- a skipped unconditional branch
halves its step's MACs.

Neither composes with token pruning: a cached attention output belongs to the tokens of the step that made it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers.hooks import (
    FasterCacheConfig,
    PyramidAttentionBroadcastConfig,
    apply_faster_cache,
    apply_pyramid_attention_broadcast,
)
from torch import nn

from catlab.pruning.families import UnsupportedModelError, family_of
from catlab.stepcache.base import StepCache, StepCacheError, stepcaches
from catlab.stepcache.diffusers_private import (
    _FASTER_CACHE_BLOCK_HOOK,
    _FASTER_CACHE_DENOISER_HOOK,
    _PYRAMID_ATTENTION_BROADCAST_HOOK,
)


def _range(value, field: str, name: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise StepCacheError(f"{name}: {field} must be [low, high] timesteps; got {value!r}") from None
    if low >= high:
        raise StepCacheError(f"{name}: {field} must have low < high; got {value!r}")
    return low, high


def _skip(value, field: str, name: str) -> int | None:
    if value is None:
        return None
    if int(value) < 1:
        raise StepCacheError(f"{name}: {field} must be null or >= 1 (compute every N-th call); got {value!r}")
    return int(value)


class _TimestepProbe:
    """Keeps the timestep of the transformer's current call, read from its ``timestep`` argument."""

    def __init__(self, transformer: nn.Module):
        self.value: float | None = None
        self.handle = transformer.register_forward_pre_hook(self._read, with_kwargs=True)

    def _read(self, module, args, kwargs) -> None:
        t = kwargs.get("timestep")
        if t is None:
            raise StepCacheError(
                f"{type(module).__name__} was called without a `timestep` keyword: the attention caches "
                "read the current timestep from it"
            )
        self.value = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)

    def __call__(self) -> float:
        if self.value is None:
            raise StepCacheError("no transformer call has been seen yet: the current timestep is unknown")
        return self.value

    def remove(self) -> None:
        self.handle.remove()


@dataclass
class _AttentionCache(StepCache):
    """Shared: the timestep probe, put on at :meth:`apply` and taken off at :meth:`remove`."""

    pruning_conflict: ClassVar[str] = (
        "reuses attention outputs between steps; with token pruning a cached output belongs to the tokens "
        "of the step that made it"
    )

    def _probe(self, transformer: nn.Module) -> _TimestepProbe:
        self._timesteps = _TimestepProbe(transformer)
        return self._timesteps

    def remove(self, transformer: nn.Module | None = None) -> None:
        probe = getattr(self, "_timesteps", None)
        if probe is not None:
            probe.remove()
            self._timesteps = None
        super().remove(transformer)


@stepcaches.register("pyramid_attention_broadcast")
@dataclass
class PyramidAttentionBroadcast(_AttentionCache):
    """diffusers' Pyramid Attention Broadcast: each attention module computes every ``spatial_skip``-th call
    inside ``timestep_range`` and returns its last output otherwise.

    ``spatial_skip`` applies to self-attention (SD3's and FLUX's joint attention included), ``cross_skip`` to
    cross-attention (PixArt's, Wan's ``attn2``), ``temporal_skip`` to temporal attention blocks where a model
    has them; null leaves that kind computed. The counter is per module and per call, so a pipeline that calls
    the transformer twice a step (skip-layer guidance) advances it twice.
    """

    spatial_skip: int | None = 2
    cross_skip: int | None = None
    temporal_skip: int | None = None
    timestep_range: tuple[float, float] = (100.0, 800.0)

    hook_names: ClassVar[tuple[str, ...]] = (_PYRAMID_ATTENTION_BROADCAST_HOOK,)

    def __post_init__(self) -> None:
        self.timestep_range = _range(self.timestep_range, "timestep_range", self.name)
        for field in ("spatial_skip", "cross_skip", "temporal_skip"):
            setattr(self, field, _skip(getattr(self, field), field, self.name))
        if self.spatial_skip is None and self.cross_skip is None and self.temporal_skip is None:
            raise StepCacheError(f"{self.name}: set at least one of spatial_skip, cross_skip, temporal_skip")

    def _apply(self, transformer: nn.Module) -> None:
        probe = self._probe(transformer)
        apply_pyramid_attention_broadcast(
            transformer,
            PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=self.spatial_skip,
                cross_attention_block_skip_range=self.cross_skip,
                temporal_attention_block_skip_range=self.temporal_skip,
                spatial_attention_timestep_skip_range=self.timestep_range,
                cross_attention_timestep_skip_range=self.timestep_range,
                temporal_attention_timestep_skip_range=self.timestep_range,
                current_timestep_callback=probe,
            ),
        )
        if not _hooked(transformer, _PYRAMID_ATTENTION_BROADCAST_HOOK):
            raise StepCacheError(
                f"{self.name}: no attention module of this {type(transformer).__name__} matched the chosen kinds "
                f"(spatial_skip={self.spatial_skip}, cross_skip={self.cross_skip}, "
                f"temporal_skip={self.temporal_skip}); e.g. it has no cross-attention"
            )


#: batch-stacked transformer inputs FasterCache halves when it skips the unconditional branch
_STACKED_INPUTS = (
    "hidden_states",
    "encoder_hidden_states",
    "timestep",
    "attention_mask",
    "encoder_attention_mask",
    "pooled_projections",  # SD3
)


@stepcaches.register("faster_cache")
@dataclass
class FasterCache(_AttentionCache):
    """diffusers' FasterCache: attention outputs extrapolated from the last two computed ones, and the
    unconditional guidance branch skipped and rebuilt from the conditional one.

    * Attention: inside ``attention_timestep_range``, each self-attention module computes every
      ``attention_skip``-th call; between, its output is ``o_t + (o_t - o_{t-2}) * attention_weight``.
    * Guidance: inside ``uncond_timestep_range``, the transformer runs the conditional rows only except every
      ``uncond_skip``-th step; the unconditional output is the conditional one plus the last measured
      difference, split into low and high frequencies (2D FFT per frame) and scaled by ``alpha_low`` /
      ``alpha_high`` inside their update ranges. Such a step costs half the MACs, and the counter sees it.

    Needs classifier-free guidance (stacked ``[unconditional; conditional]`` rows); a guidance-distilled model
    (FLUX.1-dev) gets the attention part only.
    """

    attention_skip: int = 2
    attention_timestep_range: tuple[float, float] = (-1.0, 681.0)
    attention_weight: float = 0.5
    uncond_skip: int = 5
    uncond_timestep_range: tuple[float, float] = (-1.0, 641.0)
    alpha_low: float = 1.1
    alpha_high: float = 1.1
    low_update_range: tuple[float, float] = (99.0, 901.0)
    high_update_range: tuple[float, float] = (-1.0, 301.0)

    hook_names: ClassVar[tuple[str, ...]] = (_FASTER_CACHE_DENOISER_HOOK, _FASTER_CACHE_BLOCK_HOOK)

    def __post_init__(self) -> None:
        for field in ("attention_timestep_range", "uncond_timestep_range", "low_update_range", "high_update_range"):
            setattr(self, field, _range(getattr(self, field), field, self.name))
        for field in ("attention_skip", "uncond_skip"):
            if _skip(getattr(self, field), field, self.name) is None:
                raise StepCacheError(f"{self.name}: {field} must be >= 1; got null")
            setattr(self, field, int(getattr(self, field)))

    def _apply(self, transformer: nn.Module) -> None:
        distilled = _one_branch_per_call(transformer)
        probe = self._probe(transformer)
        weight = float(self.attention_weight)
        with _quiet("diffusers.hooks.faster_cache"):  # its "experimental feature" warning at every apply
            apply_faster_cache(
                transformer,
                FasterCacheConfig(
                    spatial_attention_block_skip_range=self.attention_skip,
                    spatial_attention_timestep_skip_range=self.attention_timestep_range,
                    low_frequency_weight_update_timestep_range=self.low_update_range,
                    high_frequency_weight_update_timestep_range=self.high_update_range,
                    alpha_low_frequency=float(self.alpha_low),
                    alpha_high_frequency=float(self.alpha_high),
                    unconditional_batch_skip_range=self.uncond_skip,
                    unconditional_batch_timestep_skip_range=self.uncond_timestep_range,
                    attention_weight_callback=lambda _module: weight,
                    tensor_format=_tensor_format(transformer),
                    is_guidance_distilled=distilled,  # no stacked branches: the attention part only
                    current_timestep_callback=probe,
                    _unconditional_conditional_input_kwargs_identifiers=list(_STACKED_INPUTS),
                ),
            )

    def begin(self, groups: int) -> None:
        super().begin(groups)
        if groups != 2 and not _one_branch_per_call(self._transformer):
            raise StepCacheError(
                f"{self.name} rebuilds the unconditional guidance branch, but this generation has "
                f"{'no guidance rows' if groups == 1 else f'{groups} row groups'}: run it with "
                "classifier-free guidance (guidance scale > 1), or choose another step cache"
            )


def _one_branch_per_call(transformer: nn.Module) -> bool:
    """Whether each call runs one guidance branch (FLUX.1-dev's distilled guidance, Qwen-Image's true CFG);
    refuses a model whose stacked branches come out as packed tokens (no image to split into frequencies)."""
    try:
        spec = family_of(transformer)
    except UnsupportedModelError:
        return bool(getattr(transformer.config, "guidance_embeds", False))
    if spec.packed and not spec.guidance_distilled:
        raise StepCacheError(
            f"faster_cache splits the output image into frequencies; {spec.title or spec.name} returns packed "
            "tokens (B, N, C)"
        )
    return spec.guidance_distilled


def _tensor_format(transformer: nn.Module) -> str:
    """How the transformer's output is laid out, for FasterCache's per-frame FFT."""
    patch = getattr(transformer.config, "patch_size", None)
    if isinstance(patch, (list, tuple)) and len(patch) == 3:  # a video transformer's (t, h, w) patch
        return "BCFHW"
    return "BCHW"


@contextlib.contextmanager
def _quiet(logger: str):
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _hooked(transformer: nn.Module, hook: str) -> bool:
    return any(
        getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook(hook) is not None
        for m in transformer.modules()
    )
