"""Building components from composed configs, shared by ``catlab.run`` and ``catlab.evaluate``."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from catlab.assembly import CompositionError, PruningSession, StepReuse
from catlab.pruning.families import UnsupportedModelError
from catlab.registry import ComponentError, models, stepcaches
from catlab.sampler import SamplerConfig
from catlab.selection.base import Policy


class ConfigError(ValueError):
    """A config that cannot work; raised before any compute, naming the bad key or value."""


def plain(node: Any) -> Any:
    """A DictConfig/ListConfig as plain Python containers (resolved); anything else unchanged."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def build_step_cache(spec: Any, sampler_cfg: SamplerConfig):
    """A :mod:`catlab.stepcache` wrapper from a name or mapping (``None``: no cache), for the run's sampler.

    Fails at once on an unknown cache or key, or a ``num_steps`` that is not the
    sampler's. Whether it composes with the selector is the assembly's check
    (:func:`assemble`).
    """
    spec = plain(spec)
    if spec is None:
        return None
    cache = stepcaches.build(spec)
    steps = getattr(cache, "num_steps", None)
    if hasattr(cache, "num_steps") and steps is None:
        cache.num_steps = int(sampler_cfg.num_steps)  # null: the run's
    elif steps is not None and int(steps) != int(sampler_cfg.num_steps):
        raise ConfigError(f"stepcache.num_steps={steps} must equal sampler.num_steps={sampler_cfg.num_steps}")
    return cache


def set_threads(threads: int | None) -> None:
    """Pin torch's CPU thread count when asked (``threads: null`` leaves torch's default)."""
    if threads is not None:
        cpus = os.cpu_count() or 1
        if not 1 <= int(threads) <= cpus:
            raise ConfigError(f"threads must be >= 1 and at most this machine's {cpus} CPUs, or null; got {threads}")
        torch.set_num_threads(int(threads))


def build_model(model_cfg: dict):
    """The model adapter; a checkpoint that cannot load is a config error naming the model."""
    try:
        adapter = models.build(model_cfg)
    except (
        ComponentError,
        TypeError,
        ValueError,
        OSError,
        ArithmeticError,
        RuntimeError,
        AssertionError,
        AttributeError,
    ) as err:  # a size, a device or a dtype the model cannot take, or missing weights
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ""
        if isinstance(err, OSError) and "path" in model_cfg:
            reason = reason.split(" (")[0]  # diffusers' long explanation points at a stack trace we do not print
            hint = (
                f". Set model.path= to a local folder with the diffusers weights (now {model_cfg['path']!r}; a hub "
                "id works when it is in the Hugging Face cache or can be downloaded); full-size models also want "
                "a GPU (model.device=cuda)"
            )
        raise ConfigError(f"model {model_cfg.get('name')!r} could not be built: {reason}{hint}") from err
    check_size(adapter, model_cfg.get("name"))
    return adapter


def check_size(adapter, name) -> None:
    """Refuse a height or width the model cannot take: both must be positive multiples of the VAE's
    downscaling times the transformer's patch size (else the latent grid does not tile into patches)."""
    multiple = int(adapter.vae_scale) * int(adapter.patch_size)
    h, w = int(adapter.height), int(adapter.width)
    if h < multiple or w < multiple or h % multiple or w % multiple:
        raise ConfigError(
            f"model {name!r} takes sizes that are multiples of {multiple} (VAE scale "
            f"{adapter.vae_scale} x patch {adapter.patch_size}); got model.height={h}, model.width={w}"
        )


#: seeds a torch generator takes: non-negative 63-bit integers (-1 and 2**64 - 1 would give the same noise)
SEED_LIMIT = 2**63


def check_seeds(seeds, key: str) -> None:
    """Refuse a seed outside ``[0, 2^63)``, naming the key."""
    for s in seeds:
        if not 0 <= int(s) < SEED_LIMIT:
            raise ConfigError(f"{key}: seed {s} is outside [0, 2^63) (seeds are non-negative 63-bit integers)")


def sampler_config(node):
    """The :class:`~catlab.sampler.SamplerConfig` of a run, saying once when guidance is off."""
    sampler_cfg = SamplerConfig(**plain(node))
    if not math.isfinite(float(sampler_cfg.guidance_scale)):
        raise ConfigError(
            f"sampler.guidance_scale must be a finite number (<= 1: unguided); got {sampler_cfg.guidance_scale}"
        )
    if float(sampler_cfg.guidance_scale) <= 1.0:
        logging.getLogger("catlab").info(
            "sampler.guidance_scale=%g <= 1: unguided (no classifier-free guidance)", sampler_cfg.guidance_scale
        )
    return sampler_cfg


def check_clusters(policy, num_tokens: int) -> None:
    """Refuse an exact cluster count (``per_tokens=0``) above the image tokens, instead of a quiet clamp."""
    for part in (policy, getattr(policy, "inner", None), getattr(policy, "policy", None)):
        clusterer = getattr(part, "clusterer", None)
        count = getattr(clusterer, "num_clusters", None)
        if count is not None and not getattr(clusterer, "per_tokens", 0) and int(count) > num_tokens:
            raise ConfigError(
                f"clusterer.num_clusters={count} is more than the {num_tokens} image tokens of this "
                f"model and size; at most {num_tokens} (or per_tokens > 0 to scale with the grid)"
            )


def assemble(transformer: nn.Module, policy: Policy, parts: StepReuse, sampler_cfg: SamplerConfig) -> PruningSession:
    """The run's one :class:`~catlab.assembly.PruningSession`, checked before any compute.

    Building it is the one check of the composition (a step cache or reuse rule the
    selector cannot take); putting it on ``transformer`` and taking it off again is the
    check of the model: a model the selector cannot prune (in-step AT-EDM on PixArt, a
    transformer of no known family) or a setting the model cannot take (pruning layers
    beyond its depth). Either ends here as a config error.

    Args:
        transformer: the model adapter's transformer.
        policy: the built selector.
        parts: the reuse rule, K/V rule and step cache of the strategy.
        sampler_cfg: the sampler settings (CUDA graphs, MAC counting, index checks).
    """
    options = dict(
        cuda_graphs=sampler_cfg.cuda_graphs, count_macs=sampler_cfg.count_macs, check_indices=sampler_cfg.check_indices
    )
    try:
        session = PruningSession(transformer, policy, parts, **options)
        trial = session
        if parts.step_cache is not None and not parts.step_cache.calibrated:
            # a cache calibrated on the run's first batch (mag_cache) goes on the model only then: the model is
            # tried with the rest of the strategy now, the cache when it is calibrated
            trial = PruningSession(transformer, policy, replace(parts, step_cache=None), **options)
        with trial:
            pass
    except (CompositionError, UnsupportedModelError, ValueError) as err:  # a step cache's own failure stays one
        raise ConfigError(str(err)) from None
    return session


def check_model_fits(transformer: nn.Module, policy: Policy, parts: StepReuse | None = None) -> None:
    """:func:`assemble` for a loop that builds its own sessions (an evaluation): the same checks, no session kept."""
    assemble(transformer, policy, parts or StepReuse(), SamplerConfig(num_steps=1))
