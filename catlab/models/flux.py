"""FLUX.1-family adapters: the real FLUX.1 pipeline and a tiny random-weight one.

FLUX's transformer takes *packed* latents: each 2×2 patch of the latent image is one
token of ``4·C`` channels, with its position in ``img_ids`` (rotary, not added).
The adapters keep the sampler's latents as ``(B, C, H, W)`` and pack them around the
transformer call, so the generic loop, its selectors and reuse rules see the same
token grid as for SD3 (``patch_size = 2``).

FLUX.1-dev is guidance-distilled: the guidance scale is an input of the model and a
step runs one branch (no unconditional rows); ``sampler.guidance_scale`` is that input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from catlab.models.base import Conditioning, ModelAdapter, PipelineAdapter
from catlab.models.sd3 import HashedPromptEncoder
from catlab.registry import models


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


def fixed_shift_scheduler(scheduler, tokens: int) -> FlowMatchEulerDiscreteScheduler:
    """A copy of a pipeline's flow-matching scheduler with the shift it picks for ``tokens`` image tokens fixed:
    the FLUX-style pipelines pass a resolution-dependent ``mu`` to ``set_timesteps``, the sampler passes none.
    ``exp(mu)`` as a static shift gives the same sigmas."""
    config = dict(scheduler.config)
    if config.get("use_dynamic_shifting"):
        (n0, n1), (s0, s1) = (config["base_image_seq_len"], config["max_image_seq_len"]), (config["base_shift"],
                                                                                             config["max_shift"])
        mu = s0 + (s1 - s0) * (tokens - n0) / (n1 - n0)
        config.update(use_dynamic_shifting=False, shift=math.exp(mu))
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def check_packable(name: str, height: int, width: int, multiple: int = 16) -> None:
    """A pipeline whose VAE downsamples by 8 and packs 2x2 latent patches needs sizes in multiples of 16."""
    if height % multiple or width % multiple:
        raise ValueError(f"{name}: model.height and model.width must be multiples of {multiple} (a 2x2 patch of "
                         f"the latent per token); got {height}x{width}")


def image_ids(height: int, width: int, device=None) -> torch.Tensor:
    """``(H/2 · W/2, 3)`` position ids of the packed tokens: ``(0, row, column)``."""
    rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2)
    cols = torch.arange(width // 2, device=device).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()


class _FluxPredict:
    """The transformer call shared by the FLUX adapters: pack, ids, guidance input, unpack."""

    transformer: torch.nn.Module

    @property
    def patch_size(self) -> int:
        return 2  # the 2x2 packing: the transformer's own patch_size is 1, on packed tokens

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4

    def embed_guidance(self, cond: Conditioning, scale: float) -> Conditioning:
        if self.transformer.config.guidance_embeds:
            rows = cond.kwargs["encoder_hidden_states"].shape[0]
            cond.kwargs["guidance"] = torch.full((rows,), float(scale), device=self.torch_device,
                                                 dtype=torch.float32)
        return cond

    def predict(self, latents, timestep, cond):
        h, w = latents.shape[-2:]
        t = (timestep.expand(latents.shape[0]) / 1000).to(latents.dtype)  # the transformer scales it back
        ids = image_ids(h, w, latents.device)
        out = self.transformer(hidden_states=pack(latents), timestep=t, img_ids=ids, return_dict=False,
                               **cond.kwargs)[0]
        return unpack(out, h, w)


@models.register("tiny_flux")
@dataclass
class TinyFlux(_FluxPredict, ModelAdapter):
    """A FLUX.1-dev-architecture transformer (dual- then single-stream blocks, rotary positions, guidance
    input) from a config with seeded random weights, in pixel space. Cost and plumbing, not quality."""

    guidance_distilled = True
    random_weights = True  # cost, not quality
    height: int = 32
    width: int = 32
    num_layers: int = 2
    num_single_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    #: rotary channels per position axis (time, row, column); they sum to ``head_dim``
    axes_dims_rope: tuple[int, ...] = (8, 12, 12)
    text_dim: int = 64
    pooled_dim: int = 32
    text_tokens: int = 16
    guidance_embeds: bool = True
    weights_seed: int = 0
    shift: float = 1.0
    transformer: object = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(f"model.axes_dims_rope={list(self.axes_dims_rope)} must sum to "
                             f"model.head_dim={self.head_dim}")
        if self.height % 2 or self.width % 2:
            raise ValueError(f"tiny_flux packs 2x2 patches: height and width must be even; "
                             f"got {self.height}x{self.width}")
        torch.manual_seed(self.weights_seed)
        self.transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=3 * 4, num_layers=self.num_layers, num_single_layers=self.num_single_layers,
            attention_head_dim=self.head_dim, num_attention_heads=self.num_heads, joint_attention_dim=self.text_dim,
            pooled_projection_dim=self.pooled_dim, guidance_embeds=self.guidance_embeds,
            axes_dims_rope=tuple(self.axes_dims_rope),
        ).to(self.torch_device).eval()
        if self.torch_dtype != torch.float32:
            self.transformer.to(dtype=self.torch_dtype)
        self.encoder = HashedPromptEncoder(self.text_tokens, self.text_dim, self.pooled_dim, self.weights_seed)

    def make_scheduler(self):
        return FlowMatchEulerDiscreteScheduler(shift=self.shift)

    def encode(self, prompts: list[str], guidance: bool) -> Conditioning:
        embeds, pooled = self.encoder(list(prompts))  # one branch: no unconditional rows
        kw = dict(encoder_hidden_states=embeds.to(self.torch_device, self.torch_dtype),
                  pooled_projections=pooled.to(self.torch_device, self.torch_dtype),
                  txt_ids=torch.zeros(embeds.shape[1], 3, device=self.torch_device))
        return Conditioning(kw, 1, embeds.shape[1])


@models.register("flux")
@dataclass
class Flux(_FluxPredict, PipelineAdapter):
    """A FLUX.1 checkpoint (``FluxPipeline``: CLIP and T5 encoders, a 16-channel VAE). FLUX.1-dev takes
    ``sampler.guidance_scale`` (3.5 is its usual value) as an input; FLUX.1-schnell has none and runs 4 steps."""

    guidance_distilled = True
    pipeline_class = "FluxPipeline"
    path: str = "black-forest-labs/FLUX.1-dev"
    dtype: str = "bfloat16"
    max_sequence_length: int = 512

    def __post_init__(self) -> None:
        check_packable("flux", self.height, self.width)
        super().__post_init__()

    def make_scheduler(self):
        return fixed_shift_scheduler(self.pipeline.scheduler, self.grid[0] * self.grid[1])

    def encode(self, prompts: list[str], guidance: bool) -> Conditioning:
        embeds, pooled, text_ids = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.torch_device, max_sequence_length=self.max_sequence_length)
        kw = dict(encoder_hidden_states=embeds, pooled_projections=pooled, txt_ids=text_ids)
        return Conditioning(kw, 1, embeds.shape[1])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return ((images.float().cpu() + 1) / 2).clamp(0, 1)
