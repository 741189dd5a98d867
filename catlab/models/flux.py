"""FLUX.1-family adapters: the real FLUX.1 pipeline and a tiny random-weight one.

FLUX's transformer takes *packed* latents (``catlab.models.packed``): each 2×2 patch of
the latent image is one token of ``4·C`` channels, with its position in ``img_ids``
(rotary, not added). The adapters pack the sampler's ``(B, C, H, W)`` latents around
the transformer call (``patch_size = 2``).

FLUX.1-dev is guidance-distilled: the guidance scale is an input of the model and a
step runs one branch (no unconditional rows); ``sampler.guidance_scale`` is that input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel

from catlab.models.base import Conditioning
from catlab.models.packed import PackedLatents, PackedPipelineAdapter, TinyPackedAdapter, image_ids, pack, unpack
from catlab.registry import models


class _FluxPredict(PackedLatents):
    """The transformer call shared by the FLUX adapters: pack, ids, guidance input, unpack."""

    def embed_guidance(self, cond: Conditioning, scale: float) -> Conditioning:
        if self.transformer.config.guidance_embeds:
            rows = cond.kwargs["encoder_hidden_states"].shape[0]
            cond.kwargs["guidance"] = torch.full((rows,), float(scale), device=self.torch_device, dtype=torch.float32)
        return cond

    def predict(self, latents, timestep, cond):
        h, w = latents.shape[-2:]
        t = (timestep.expand(latents.shape[0]) / 1000).to(latents.dtype)  # the transformer scales it back
        ids = image_ids(h, w, latents.device)
        out = self.transformer(hidden_states=pack(latents), timestep=t, img_ids=ids, return_dict=False, **cond.kwargs)[
            0
        ]
        return unpack(out, h, w)


@models.register("tiny_flux")
@dataclass
class TinyFlux(_FluxPredict, TinyPackedAdapter):
    """A FLUX.1-dev-architecture transformer (dual- then single-stream blocks, rotary positions, guidance
    input) from a config with seeded random weights, in pixel space. Cost and plumbing, not quality."""

    guidance_distilled = True
    num_layers: int = 2
    num_single_layers: int = 4
    pooled_dim: int = 32
    guidance_embeds: bool = True

    def build(self):
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=3 * 4,
            num_layers=self.num_layers,
            num_single_layers=self.num_single_layers,
            attention_head_dim=self.head_dim,
            num_attention_heads=self.num_heads,
            joint_attention_dim=self.text_dim,
            pooled_projection_dim=self.pooled_dim,
            guidance_embeds=self.guidance_embeds,
            axes_dims_rope=tuple(self.axes_dims_rope),
        )

    def encode(self, prompts: list[str], guidance: bool) -> Conditioning:
        return super().encode(prompts, False)  # one branch: no unconditional rows

    def conditioning(self, embeds, pooled):
        return dict(
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=self.torch_device),
        )


@models.register("flux")
@dataclass
class Flux(_FluxPredict, PackedPipelineAdapter):
    """A FLUX.1 checkpoint (``FluxPipeline``: CLIP and T5 encoders, a 16-channel VAE). FLUX.1-dev takes
    ``sampler.guidance_scale`` (3.5 is its usual value) as an input; FLUX.1-schnell has none and runs 4 steps."""

    guidance_distilled = True
    pipeline_class = "FluxPipeline"
    path: str = "black-forest-labs/FLUX.1-dev"
    dtype: str = "bfloat16"
    max_sequence_length: int = 512

    def encode(self, prompts: list[str], guidance: bool) -> Conditioning:
        embeds, pooled, text_ids = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.torch_device, max_sequence_length=self.max_sequence_length
        )
        kw = dict(encoder_hidden_states=embeds, pooled_projections=pooled, txt_ids=text_ids)
        return Conditioning(kw, 1, embeds.shape[1])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return ((images.float().cpu() + 1) / 2).clamp(0, 1)
