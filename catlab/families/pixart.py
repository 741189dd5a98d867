"""PixArt-Σ, one module: its pruning spec, its MACs and its adapters.

PixArt's transformer (``PixArtTransformer2DModel``) runs ``BasicTransformerBlock``\\ s
with ``ada_norm_single`` (one timestep modulation shared by the blocks): image
self-attention (``attn1``), then cross-attention to the T5 text (``attn2``), then the
MLP. Pruned, the self-attention takes catlab's generic processor (the k selected
queries over the layer's cache of every image token's K/V); the cross-attention runs
stock on the k queries. The output is ``2·C`` channels (learned sigma).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel
from torch import nn

from catlab.models.base import Conditioning, ModelAdapter, PipelineAdapter
from catlab.models.tiny import TinyAdapter
from catlab.pruning.families import FamilySpec, UnsupportedModelError, conv_macs, linear_macs, self_cross_block_macs
from catlab.pruning.processors import PrunedSelfAttnProcessor
from catlab.registry import families, models


def pixart_macs(t: nn.Module, rows: int, n: int, n_total: int, n_text: int) -> int:
    """One PixArt forward with ``n`` of ``n_total`` image tokens recomputed and ``n_text`` text tokens."""
    per_row = conv_macs(t, n_total) + linear_macs(t.adaln_single) + n_text * linear_macs(t.caption_projection)
    for blk in t.transformer_blocks:
        per_row += self_cross_block_macs(blk, blk.ff, n, n_total, n_text)
    per_row += n * linear_macs(t.proj_out)
    return rows * per_row


def check_pixart(t: nn.Module) -> None:
    """PixArt's own block layout: ``ada_norm_single`` with self-attention and cross-attention."""
    for index, block in enumerate(t.transformer_blocks):
        if getattr(block, "norm_type", None) != "ada_norm_single" or block.attn2 is None or block.only_cross_attention:
            raise UnsupportedModelError(
                f"block {index}: PixArt pruning needs BasicTransformerBlock(norm_type='ada_norm_single') "
                "with self-attention (attn1) and cross-attention (attn2)"
            )


PIXART = families.register("pixart")(
    FamilySpec(
        name="pixart",
        title="PixArt-Σ",
        transformer_type="PixArtTransformer2DModel",
        block_type="BasicTransformerBlock",
        attentions=(("attn1", PrunedSelfAttnProcessor),),
        macs=pixart_macs,
        cache_dit_pattern="Pattern_3",  # blocks take the hidden states and return them
        check=check_pixart,
        layer_modules=(("attn1", "attn"), ("attn2", "cross"), ("ff", "mlp")),
    )
)


def _pixart_predict(adapter: ModelAdapter, latents, timestep, cond: Conditioning) -> torch.Tensor:
    t = timestep.expand(latents.shape[0])
    out = adapter.transformer(
        latents,
        timestep=t,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
        **cond.kwargs,
    )[0]
    channels = latents.shape[1]
    return out[:, :channels] if out.shape[1] == 2 * channels else out  # drop the learned variance


@models.register("tiny_pixart")
@dataclass
class TinyPixArt(TinyAdapter):
    """A PixArt-architecture transformer (learned sigma, cross-attention) with seeded random weights, pixel space."""

    def build(self):
        return PixArtTransformer2DModel(
            sample_size=max(self.height, self.width),
            patch_size=self.patch,
            in_channels=3,
            out_channels=6,
            num_layers=self.num_layers,
            attention_head_dim=self.head_dim,
            num_attention_heads=self.num_heads,
            cross_attention_dim=self.num_heads * self.head_dim,
            caption_channels=self.text_dim,
            norm_type="ada_norm_single",
            num_embeds_ada_norm=1000,
            use_additional_conditions=False,
        )

    def make_scheduler(self):
        return DPMSolverMultistepScheduler()

    def conditioning(self, embeds, pooled):
        mask = torch.ones(embeds.shape[:2], device=self.torch_device)
        return dict(encoder_hidden_states=embeds, encoder_attention_mask=mask)

    def predict(self, latents, timestep, cond):
        return _pixart_predict(self, latents, timestep, cond)


@models.register("pixart_sigma")
@dataclass
class PixArtSigma(PipelineAdapter):
    """A PixArt-Σ checkpoint (``PixArtSigmaPipeline``): a T5 text encoder, a VAE, learned sigma."""

    pipeline_class = "PixArtSigmaPipeline"
    path: str = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
    max_sequence_length: int = 300

    def encode(self, prompts: list[str], guidance: bool) -> Conditioning:
        pe, pm, ne, nm = self.pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance=guidance,
            device=self.torch_device,
            max_sequence_length=self.max_sequence_length,
        )
        if guidance:
            pe, pm = torch.cat([ne, pe]), torch.cat([nm, pm])
        return Conditioning(
            dict(encoder_hidden_states=pe, encoder_attention_mask=pm), 2 if guidance else 1, pe.shape[1]
        )

    def predict(self, latents, timestep, cond):
        return _pixart_predict(self, latents, timestep, cond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
        return ((images.float().cpu() + 1) / 2).clamp(0, 1)
