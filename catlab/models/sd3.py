"""SD3-family adapters: the real Stable Diffusion 3 pipeline and a tiny random-weight one."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from catlab.models.base import Conditioning, ModelAdapter, PipelineAdapter, with_unconditional
from catlab.registry import models


def _sd3_predict(adapter: ModelAdapter, latents, timestep, cond: Conditioning) -> torch.Tensor:
    t = timestep.expand(latents.shape[0]).to(latents.dtype)
    return adapter.transformer(hidden_states=latents, timestep=t, return_dict=False, **cond.kwargs)[0]


class HashedPromptEncoder:
    """A seeded stand-in for a text encoder: each word maps to a fixed random vector.

    Deterministic and offline, so random-weight models run anywhere. It carries no
    meaning; it only gives different prompts different conditioning.
    """

    def __init__(self, seq_len: int, dim: int, pooled_dim: int, seed: int = 0):
        self.seq_len, self.dim, self.pooled_dim, self.seed = seq_len, dim, pooled_dim, seed

    def _word(self, word: str, dim: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(word.encode()) + self.seed)
        return torch.randn(dim, generator=g)

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = torch.zeros(len(prompts), self.seq_len, self.dim)
        pooled = torch.zeros(len(prompts), self.pooled_dim)
        for i, prompt in enumerate(prompts):
            words = prompt.lower().split()[: self.seq_len]
            for j, w in enumerate(words):
                embeds[i, j] = self._word(w, self.dim)
                pooled[i] += self._word("<pooled>" + w, self.pooled_dim) / len(words)
        return embeds, pooled


@models.register("tiny_sd3")
@dataclass
class TinySD3(ModelAdapter):
    """An SD3-architecture transformer from a config with seeded random weights, in pixel space.

    It shows cost, not quality: use it for plumbing, tests and MAC/timing studies.
    ``dual_attention_layers`` and ``qk_norm`` select SD3.5's variants.
    """

    random_weights = True

    height: int = 32
    width: int = 32
    patch: int = 2
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    text_dim: int = 64
    text_tokens: int = 16
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    weights_seed: int = 0
    shift: float = 1.0
    transformer: object = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        torch.manual_seed(self.weights_seed)
        size = max(self.height, self.width)
        self.transformer = SD3Transformer2DModel(
            sample_size=size, patch_size=self.patch, in_channels=3, out_channels=3,
            num_layers=self.num_layers, attention_head_dim=self.head_dim, num_attention_heads=self.num_heads,
            joint_attention_dim=self.text_dim, caption_projection_dim=self.num_heads * self.head_dim,
            pooled_projection_dim=self.text_dim, pos_embed_max_size=size // self.patch,
            dual_attention_layers=tuple(self.dual_attention_layers), qk_norm=self.qk_norm,
        ).to(self.torch_device).eval()
        if self.torch_dtype != torch.float32:
            self.transformer.to(dtype=self.torch_dtype)
        self.encoder = HashedPromptEncoder(self.text_tokens, self.text_dim, self.text_dim, self.weights_seed)

    def make_scheduler(self):
        return FlowMatchEulerDiscreteScheduler(shift=self.shift)

    def encode(self, prompts: list[str], guidance: bool) -> Conditioning:
        texts = with_unconditional(prompts, guidance)
        embeds, pooled = self.encoder(texts)
        kw = dict(encoder_hidden_states=embeds.to(self.torch_device, self.torch_dtype),
                  pooled_projections=pooled.to(self.torch_device, self.torch_dtype))
        return Conditioning(kw, 2 if guidance else 1, embeds.shape[1])

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
            prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=guidance,
            device=self.torch_device, max_sequence_length=self.max_sequence_length,
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
