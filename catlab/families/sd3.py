"""Stable Diffusion 3 / 3.5, one module: its pruning spec, its pruned joint attention, its MACs, its adapters.

SD3's transformer (``SD3Transformer2DModel``) runs ``JointTransformerBlock``\\ s (MMDiT):
image and text tokens have their own projections and attend jointly, text keys and
values appended to the image's; SD3.5 adds an image-only second attention (``attn2``)
to some blocks and per-head QK norms. Positions are added to the tokens (no rotary
table), so the selected tokens carry their own. Pruned, a block computes the k
selected image tokens and every text token, writes their K/V into the layer's cache
(the text after the image) and attends over it whole.

The embedded model (``catlab/embedded/``) is an SD3-architecture transformer: it is
pruned through this spec too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import nn

from catlab.models.base import Conditioning, ModelAdapter, PipelineAdapter
from catlab.models.tiny import TinyAdapter
from catlab.pruning.families import FamilySpec, conv_macs, linear_macs
from catlab.pruning.processors import CachedAttention, project_heads, split_heads
from catlab.registry import families, models


class PrunedJointAttnProcessor(CachedAttention):
    """SD3's joint text+image attention (and SD3.5's image-only ``attn2``), pruned."""

    @classmethod
    def holds_text(cls, attn) -> bool:
        return getattr(attn, "add_k_proj", None) is not None  # SD3.5's ``attn2`` has no text projections

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        rows, n_image, _ = hidden_states.shape
        h = attn.heads
        query = project_heads(attn.to_q, attn.norm_q, hidden_states, h)
        key = project_heads(attn.to_k, attn.norm_k, hidden_states, h)
        value = split_heads(attn.to_v(hidden_states), h)
        text_key = text_value = None
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            text_query = project_heads(attn.add_q_proj, attn.norm_added_q, e, h)
            text_key = project_heads(attn.add_k_proj, attn.norm_added_k, e, h)
            text_value = split_heads(attn.add_v_proj(e), h)
            query = torch.cat([query, text_query], dim=1)
        key, value = self.update_cache(key, value, text_key, text_value)

        out = self.attend(attn, query.transpose(1, 2), key, value, n_image)
        out = out.transpose(1, 2).reshape(rows, -1, h * out.shape[-1]).to(hidden_states.dtype)
        image_out = attn.to_out[1](attn.to_out[0](out[:, :n_image]))
        if encoder_hidden_states is None:
            return image_out
        context_out = out[:, n_image:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        return image_out, context_out


def sd3_macs(t: nn.Module, rows: int, n: int, n_total: int, n_text: int) -> int:
    """One SD3 forward with ``n`` of ``n_total`` image tokens recomputed and ``n_text`` text tokens."""
    per_row = conv_macs(t, n_total) + linear_macs(t.time_text_embed) + n_text * linear_macs(t.context_embedder)
    for blk in t.transformer_blocks:
        a = blk.attn
        inner = a.to_q.out_features
        per_row += linear_macs(blk.norm1.linear) + linear_macs(blk.norm1_context.linear)
        per_row += n * (linear_macs(a.to_q) + linear_macs(a.to_k) + linear_macs(a.to_v) + linear_macs(a.to_out[0]))
        per_row += n_text * (linear_macs(a.add_q_proj) + linear_macs(a.add_k_proj) + linear_macs(a.add_v_proj))
        per_row += 2 * (n + n_text) * (n_total + n_text) * inner
        if not blk.context_pre_only:
            per_row += n_text * (linear_macs(a.to_add_out) + linear_macs(blk.ff_context))
        if blk.attn2 is not None:
            a2 = blk.attn2
            per_row += n * (
                linear_macs(a2.to_q) + linear_macs(a2.to_k) + linear_macs(a2.to_v) + linear_macs(a2.to_out[0])
            )
            per_row += 2 * n * n_total * a2.to_q.out_features
        per_row += n * linear_macs(blk.ff)
    per_row += linear_macs(t.norm_out.linear) + n * linear_macs(t.proj_out)
    return rows * per_row


SD3 = families.register("sd3")(
    FamilySpec(
        name="sd3",
        title="SD3",
        transformer_type="SD3Transformer2DModel",
        block_type="JointTransformerBlock",
        attentions=(("attn", PrunedJointAttnProcessor), ("attn2", PrunedJointAttnProcessor)),
        macs=sd3_macs,
        text_embed="context_embedder",
        block_residuals=("block_controlnet_hidden_states",),  # a ControlNet's, added after each joint block
        cache_dit_pattern="Pattern_1",  # blocks take (hidden, text, ...) and return (text, hidden)
        in_step=True,
    )
)


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
class StableDiffusion3(PipelineAdapter):
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
