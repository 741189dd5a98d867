"""Packed latents: what the adapters of a transformer that takes 2×2 latent patches as tokens share.

FLUX.1 and Qwen-Image take *packed* latents: each 2×2 patch of the latent image is one
token of ``4·C`` channels. Their adapters keep the sampler's latents as ``(B, C, H, W)``
and pack them around the transformer call, so the generic loop, its selectors and reuse
rules see the same token grid as for SD3 (``patch_size = 2``). This module holds the
packing, the positions of the packed tokens, the step spacing of their pipelines
(:func:`pipeline_timesteps`), the size checks, :class:`PackedPipelineAdapter`, the
base of their checkpoint adapters, and :class:`TinyPackedAdapter`, the base of their
tiny adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from catlab.grid import grid_tokens
from catlab.models.base import PipelineAdapter
from catlab.models.tiny import TinyAdapter


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, H/2 · W/2, 4C)``: one token per 2×2 patch, row-major, channels outermost."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack` for a latent image of ``height × width``."""
    b, _, channels = tokens.shape
    c = channels // 4
    x = tokens.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device=None) -> torch.Tensor:
    """``(H/2 · W/2, 3)`` position ids of the packed tokens: ``(0, row, column)``."""
    rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2)
    cols = torch.arange(width // 2, device=device).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()


def pipeline_timesteps(scheduler, num_steps: int, tokens: int, device=None) -> None:
    """Set ``scheduler``'s steps as FLUX.1's and Qwen-Image's pipelines do for ``tokens`` image tokens: the
    unshifted sigmas ``1, …, 1/num_steps`` evenly spaced, shifted by the scheduler, with the resolution-dependent
    ``mu`` where its config shifts dynamically (the pipelines' ``calculate_shift``). The scheduler's own
    ``set_timesteps(num_steps)`` would space them from its training range instead and end elsewhere."""
    config = scheduler.config
    extra = {}
    if config.get("use_dynamic_shifting"):
        (n0, n1), (s0, s1) = (
            (config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)),
            (config.get("base_shift", 0.5), config.get("max_shift", 1.15)),
        )
        slope = (s1 - s0) / (n1 - n0)
        extra["mu"] = tokens * slope + (s0 - slope * n0)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    scheduler.set_timesteps(sigmas=sigmas, device=device, **extra)


def check_packable(name: str, height: int, width: int, multiple: int = 16) -> None:
    """A pipeline whose VAE downsamples by 8 and packs 2x2 latent patches needs sizes in multiples of 16."""
    if height % multiple or width % multiple:
        raise ValueError(
            f"{name}: model.height and model.width must be multiples of {multiple} (a 2x2 patch of "
            f"the latent per token); got {height}x{width}"
        )


class PackedLatents:
    """The shapes of an adapter whose transformer takes packed tokens: the sampler's grid is of 2×2 patches."""

    transformer: torch.nn.Module

    @property
    def model_name(self) -> str:
        """The registered name, for messages."""
        return getattr(self, "registered_name", type(self).__name__)

    @property
    def patch_size(self) -> int:
        return 2  # the 2x2 packing around the call, whatever the transformer's own patch_size (FLUX's is 1)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4


@dataclass
class PackedPipelineAdapter(PackedLatents, PipelineAdapter):
    """A checkpoint of a packed family: sizes in multiples of 16 (checked before anything loads), and the
    pipeline's scheduler stepped as the pipeline steps it (:func:`pipeline_timesteps`)."""

    timesteps = "pipeline_sigmas"

    def __post_init__(self) -> None:
        check_packable(self.model_name, self.height, self.width)
        super().__post_init__()

    def set_timesteps(self, scheduler, num_steps: int) -> None:
        pipeline_timesteps(scheduler, num_steps, grid_tokens(self.grid), self.torch_device)


@dataclass
class TinyPackedAdapter(PackedLatents, TinyAdapter):
    """A tiny adapter of a packed family: 3-channel pixel-space latents packed 2×2 around the call, rotary
    positions per axis, a flow-matching scheduler with a fixed shift. Its :meth:`build` takes ``in_channels=3 * 4``."""

    #: rotary channels per position axis (time or frame, row, column); they sum to ``head_dim``
    axes_dims_rope: tuple[int, ...] = (8, 12, 12)
    shift: float = 1.0
    #: the packing's 2×2 patch: fixed, not a config key
    patch: int = field(default=2, init=False, repr=False)

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(
                f"model.axes_dims_rope={list(self.axes_dims_rope)} must sum to model.head_dim={self.head_dim}"
            )
        if self.height % 2 or self.width % 2:
            raise ValueError(
                f"{self.model_name} packs 2x2 patches: height and width must be even; got {self.height}x{self.width}"
            )
        super().__post_init__()

    def make_scheduler(self):
        return FlowMatchEulerDiscreteScheduler(shift=self.shift)
