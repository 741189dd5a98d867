"""Qwen-Image, one module: its pruning spec, its pruned attention, its MACs and a tiny adapter.

Qwen-Image (``QwenImageTransformer2DModel``) is an MMDiT: 60 dual-stream blocks with
their own image and text projections, modulation from the timestep per stream, and
rotary positions that come as two complex tables, ``(image rows, text rows)``. Its
pipeline takes a text mask, and guides by *true* CFG: a negative prompt is a second
transformer call of the step, so each call is one branch.

Pruned, a block computes the k selected image tokens and every text token; the
image rows of the rotary table are gathered for the selected tokens (a per-row
``(rows, k, d/2)`` table), so the keys written into the layer's cache are the
rotated keys of their own positions, and queries attend over the whole cache with
the text mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import QwenImageTransformer2DModel

from catlab.models.base import Conditioning, ModelAdapter, with_unconditional
from catlab.models.packed import PackedPipelineAdapter, TinyPackedAdapter, pack, unpack
from catlab.pruning.families import FamilySpec, UnsupportedModelError, linear_macs
from catlab.pruning.processors import CachedAttention
from catlab.registry import families, models


def rotate_complex(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``x`` ``(rows, S, heads, d)`` turned by complex ``freqs`` ``(S, d/2)`` (shared) or ``(rows, S, d/2)``
    (per row): consecutive channel pairs as complex numbers, in fp32 as the stock model does."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs.unsqueeze(-2)).flatten(-2).type_as(x)


def select_image_rows(tables: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor, num_tokens: int) -> tuple:
    """``(image (N, d/2), text (L, d/2))`` → the image rows of each row's selected tokens ``(rows, k, d/2)``, text."""
    image, text = tables
    rows, k = idx.shape
    return image.index_select(0, idx.reshape(-1)).view(rows, k, image.shape[-1]), text


def qwen_grid(kwargs: dict) -> tuple[int, int]:
    """The token grid of a call, from its ``img_shapes``: per sample a list of ``(frames, rows, columns)``."""
    shapes = kwargs["img_shapes"][0]
    frames, height, width = shapes[0] if isinstance(shapes, list) else shapes
    return int(height), int(width)


class PrunedQwenAttnProcessor(CachedAttention):
    """A Qwen-Image block's joint attention: k image queries and the text's over the layer's cache."""

    carries_text = True

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        encoder_hidden_states_mask=None,
        attention_mask=None,
        image_rotary_emb=None,
    ):
        if attention_mask is not None:
            raise RuntimeError(f"{self.name}: pruned Qwen-Image attention takes the text mask only")
        d, n_image, e = attn.inner_dim // attn.heads, hidden_states.shape[1], encoder_hidden_states
        n_text = e.shape[1]

        def heads(linear, norm, x):
            out = linear(x).unflatten(-1, (-1, d))
            return norm(out) if norm is not None else out

        query, key = heads(attn.to_q, attn.norm_q, hidden_states), heads(attn.to_k, attn.norm_k, hidden_states)
        value = attn.to_v(hidden_states).unflatten(-1, (-1, d))
        text_query = heads(attn.add_q_proj, attn.norm_added_q, e)
        text_key = heads(attn.add_k_proj, attn.norm_added_k, e)
        text_value = attn.add_v_proj(e).unflatten(-1, (-1, d))
        if image_rotary_emb is not None:
            image_freqs, text_freqs = image_rotary_emb
            query, key = rotate_complex(query, image_freqs), rotate_complex(key, image_freqs)
            text_query, text_key = rotate_complex(text_query, text_freqs), rotate_complex(text_key, text_freqs)
        key, value = self.update_cache(key, value, text_key, text_value)  # image keys first, text tail
        mask = None
        if encoder_hidden_states_mask is not None:  # in the cache's order: every image key, then the text's
            keep = torch.cat(
                [
                    torch.ones(e.shape[0], self.pruner.num_tokens, dtype=torch.bool, device=e.device),
                    encoder_hidden_states_mask.bool(),
                ],
                dim=1,
            )
            mask = torch.zeros(keep.shape, dtype=query.dtype, device=e.device).masked_fill(~keep, float("-inf"))
            mask = mask[:, None, None, :]
        query = torch.cat([text_query, query], dim=1)  # the stock order: text, then image
        out = self.attend(attn, query.transpose(1, 2), key, value, n_image, mask=mask, first=n_text)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        image_out = attn.to_out[0](out[:, n_text:].contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        return image_out, attn.to_add_out(out[:, :n_text].contiguous())


def qwen_image_macs(t, rows: int, n: int, n_total: int, n_text: int) -> int:
    """One Qwen-Image forward with ``n`` of ``n_total`` image tokens recomputed and ``n_text`` text tokens."""
    per_row = n_total * linear_macs(t.img_in) + linear_macs(t.time_text_embed) + n_text * linear_macs(t.txt_in)
    for blk in t.transformer_blocks:
        a = blk.attn
        per_row += linear_macs(blk.img_mod) + linear_macs(blk.txt_mod)
        per_row += n * (
            linear_macs(a.to_q)
            + linear_macs(a.to_k)
            + linear_macs(a.to_v)
            + linear_macs(a.to_out[0])
            + linear_macs(blk.img_mlp)
        )
        per_row += n_text * (
            linear_macs(a.add_q_proj)
            + linear_macs(a.add_k_proj)
            + linear_macs(a.add_v_proj)
            + linear_macs(a.to_add_out)
            + linear_macs(blk.txt_mlp)
        )
        per_row += 2 * (n + n_text) * (n_total + n_text) * a.to_q.out_features
    per_row += linear_macs(t.norm_out.linear) + n * linear_macs(t.proj_out)
    return rows * per_row


def check_variant(t) -> None:
    """Qwen-Image-Edit's variants modulate each token by a per-token index and use layered 3D positions:
    not pruned (the index covers every token)."""
    if t.config.zero_cond_t or t.config.use_layer3d_rope:
        raise UnsupportedModelError(
            "a QwenImageTransformer2DModel with zero_cond_t or use_layer3d_rope "
            "(Qwen-Image-Edit variants) is not pruned: only the text-to-image layout is"
        )


QWEN_IMAGE = families.register("qwen_image")(
    FamilySpec(
        name="qwen_image",
        title="Qwen-Image",
        transformer_type="QwenImageTransformer2DModel",
        block_type="QwenImageTransformerBlock",
        attentions=(("attn", PrunedQwenAttnProcessor),),
        macs=qwen_image_macs,
        patch_embed="img_in",
        text_embed="txt_in",
        rotary="pos_embed",
        select_rotary=select_image_rows,
        packed=True,
        token_grid=qwen_grid,
        guidance_distilled=True,  # true CFG: one branch per transformer call
        cache_dit_pattern="Pattern_1",  # blocks take (hidden, text, ...) and return (text, hidden)
        check=check_variant,
    )
)


def _qwen_predict(adapter: ModelAdapter, latents, timestep, cond: Conditioning) -> torch.Tensor:
    h, w = latents.shape[-2:]
    t = (timestep.expand(latents.shape[0]) / 1000).to(latents.dtype)  # the transformer takes sigma-like time
    shapes = [[(1, h // 2, w // 2)]] * latents.shape[0]
    out = adapter.transformer(
        hidden_states=pack(latents), timestep=t, img_shapes=shapes, return_dict=False, **cond.kwargs
    )[0]
    return unpack(out, h, w)


@models.register("qwen_image")
@dataclass
class QwenImage(PackedPipelineAdapter):
    """A Qwen-Image checkpoint (``QwenImagePipeline``: a Qwen2.5-VL text encoder, a 3D-causal VAE). catlab's loop
    guides on stacked rows with the empty prompt's (the pipeline's true CFG is the same combination, as two calls)."""

    pipeline_class = "QwenImagePipeline"
    path: str = "Qwen/Qwen-Image"
    dtype: str = "bfloat16"
    max_sequence_length: int = 512

    def encode(self, prompts: list[str], guidance: bool) -> Conditioning:
        texts = with_unconditional(prompts, guidance)  # one call: one padded length, the mask marks the padding
        embeds, mask = self.pipeline.encode_prompt(
            prompt=texts, device=self.torch_device, max_sequence_length=self.max_sequence_length
        )
        kw = dict(encoder_hidden_states=embeds, encoder_hidden_states_mask=mask)
        return Conditioning(kw, 2 if guidance else 1, embeds.shape[1])

    def predict(self, latents, timestep, cond):
        return _qwen_predict(self, latents, timestep, cond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        images = vae.decode((latents[:, :, None] * std + mean).to(vae.dtype), return_dict=False)[0][:, :, 0]
        return ((images.float().cpu() + 1) / 2).clamp(0, 1)


@models.register("tiny_qwen_image")
@dataclass
class TinyQwenImage(TinyPackedAdapter):
    """A Qwen-Image-architecture transformer from a config with seeded random weights, in pixel space (2x2
    patches packed into tokens as the pipeline does); classifier-free guidance on stacked rows."""

    def build(self):
        return QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=3 * 4,
            out_channels=3,
            num_layers=self.num_layers,
            attention_head_dim=self.head_dim,
            num_attention_heads=self.num_heads,
            joint_attention_dim=self.text_dim,
            axes_dims_rope=tuple(self.axes_dims_rope),
        )

    def encode(self, prompts: list[str], guidance: bool) -> Conditioning:
        cond = super().encode(prompts, guidance)
        if guidance:  # the empty prompt's rows (first): one token, the rest padding
            cond.kwargs["encoder_hidden_states_mask"][: len(prompts), 1:] = 0
        return cond

    def conditioning(self, embeds, pooled):
        return dict(
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=self.torch_device),
        )

    def predict(self, latents, timestep, cond):
        return _qwen_predict(self, latents, timestep, cond)
