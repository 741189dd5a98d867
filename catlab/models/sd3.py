"""SD3-family adapters: the real Stable Diffusion 3 pipeline and a tiny random-weight one."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from catlab.models.base import Conditioning, ModelAdapter, PipelineAdapter
from catlab.models.tiny import HashedPromptEncoder, TinyAdapter  # noqa: F401  (HashedPromptEncoder: its old home)
from catlab.registry import models


def _sd3_predict(adapter: ModelAdapter, latents, timestep, cond: Conditioning) -> torch.Tensor:
    t = timestep.expand(latents.shape[0]).to(latents.dtype)
    return adapter.transformer(hidden_states=latents, timestep=t, return_dict=False, **cond.kwargs)[0]


@models.register("tiny_sd3")
@dataclass
class TinySD3(TinyAdapter):
    """An SD3-architecture transformer from a config with seeded random weights, in pixel space.

    It shows cost, not quality: use it for plumbing, tests and MAC/timing studies.
    ``dual_attention_layers`` and ``qk_norm`` select SD3.5's variants.
    """

    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    shift: float = 1.0

    @property
    def pooled_dim(self) -> int:
        return self.text_dim

    def build(self):
        size = max(self.height, self.width)
        return SD3Transformer2DModel(
            sample_size=size,
            patch_size=self.patch,
            in_channels=3,
            out_channels=3,
            num_layers=self.num_layers,
            attention_head_dim=self.head_dim,
            num_attention_heads=self.num_heads,
            joint_attention_dim=self.text_dim,
            caption_projection_dim=self.num_heads * self.head_dim,
            pooled_projection_dim=self.text_dim,
            pos_embed_max_size=size // self.patch,
            dual_attention_layers=tuple(self.dual_attention_layers),
            qk_norm=self.qk_norm,
        )

    def make_scheduler(self):
        return FlowMatchEulerDiscreteScheduler(shift=self.shift)

    def conditioning(self, embeds, pooled):
        return dict(encoder_hidden_states=embeds, pooled_projections=pooled)

    def predict(self, latents, timestep, cond):
        return _sd3_predict(self, latents, timestep, cond)


@models.register("sd3")
@dataclass
class SD3(PipelineAdapter):
    """A Stable Diffusion 3 / 3.5 checkpoint (``StableDiffusion3Pipeline``): three text encoders, a VAE."""

    pipeline_class = "StableDiffusion3Pipeline"
    path: str = "stabilityai/stable-diffusion-3-medium-diffusers"

    def encode(self, prompts: list[str], guidance: bool) -> Conditioning:
        pe, ne, pp, npool = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=guidance,
            device=self.torch_device,
            max_sequence_length=self.max_sequence_length,
        )
        if guidance:
            pe, pp = torch.cat([ne, pe]), torch.cat([npool, pp])
        return Conditioning(dict(encoder_hidden_states=pe, pooled_projections=pp), 2 if guidance else 1, pe.shape[1])

    def predict(self, latents, timestep, cond):
        return _sd3_predict(self, latents, timestep, cond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return ((images.float().cpu() + 1) / 2).clamp(0, 1)
