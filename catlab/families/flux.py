"""FLUX.1, one module: its pruning spec, its pruned attentions (rotary positions), its MACs, its adapters.

FLUX's transformer (``FluxTransformer2DModel``) runs dual-stream blocks, then
single-stream ones, and rotates queries and keys by each token's position (a rotary
table built from ``txt_ids`` and ``img_ids``, text rows first). At a pruned step the
engine's hook on the rotary embedding hands every block a per-row table of the text
rows and the selected image tokens' rows, ``(rows, L + k, head_dim)``
(:func:`select_text_image_rows`); the processors here rotate the fresh queries and
keys with it, so a cached key is always the rotated key of its own position, as the
stock forward computed it when that token was last recomputed.

* dual-stream blocks (:class:`PrunedFluxJointProcessor`): image and text streams
  have their own projections; text tokens are always computed;
* single-stream blocks (:class:`PrunedFluxSingleProcessor`): text and selected image
  tokens are one ``(rows, L + k, D)`` sequence; their K/V split into the layer cache.

Both keep the layer's cache as the other families do (image tokens first, the text
tail after them) and attend over it whole.

The transformer takes *packed* latents (``catlab.models.packed``): each 2×2 patch of
the latent image is one token of ``4·C`` channels, with its position in ``img_ids``.
The adapters pack the sampler's ``(B, C, H, W)`` latents around the transformer call.
FLUX.1-dev is guidance-distilled: the guidance scale is an input of the model and a
step runs one branch (no unconditional rows); ``sampler.guidance_scale`` is that input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from catlab.models.base import Conditioning
from catlab.models.packed import PackedLatents, PackedPipelineAdapter, TinyPackedAdapter, image_ids, pack, unpack
from catlab.pruning.families import BlockList, FamilySpec, linear_macs
from catlab.pruning.processors import CachedAttention
from catlab.registry import families, models


def select_text_image_rows(tables: tuple[torch.Tensor, ...], idx: torch.Tensor, num_tokens: int) -> tuple:
    """FLUX's rotary tables ``(cos, sin)``, each ``(L + N, d)`` (text rows, then the ``N`` image tokens'),
    at a pruned step: ``(rows, L + k, d)`` each, the text rows then those of each row's selected tokens."""
    return tuple(_select_rows(table, idx, num_tokens) for table in tables)


def _select_rows(table: torch.Tensor, idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    n_text = table.shape[0] - num_tokens
    rows, k = idx.shape
    text = table[:n_text].expand(rows, -1, -1)
    image = table[n_text:].index_select(0, idx.reshape(-1)).view(rows, k, table.shape[-1])
    return torch.cat([text, image], dim=1)


def flux_grid(kwargs: dict) -> tuple[int, int]:
    """The token grid of the generated image in a FLUX call, from its ``img_ids`` ``(S, 3)`` = (0, row, column);
    read on the host. FLUX.1 Kontext appends a reference image's tokens to the sequence, their ids (1, row,
    column): they are not the grid's (they follow its ``N`` tokens, which must come first)."""
    ids = kwargs["img_ids"]
    ids = ids[0] if ids.ndim == 3 else ids  # a deprecated batched (B, S, 3) table
    generated = ids[..., 0] == 0
    n = int(generated.sum())
    if n == 0 or not bool(generated[:n].all()):
        raise ValueError(
            "FLUX img_ids: the generated image's tokens (first id 0) must lead the sequence; "
            f"got {n} of {ids.shape[0]} tokens with first id 0, not all leading"
        )
    ids = ids[:n]
    return int(ids[..., 1].max()) + 1, int(ids[..., 2].max()) + 1


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` ``(rows, S, heads, d)`` by tables ``(S, d)`` (shared) or ``(rows, S, d)`` (per row).

    Consecutive channel pairs ``(a, b)`` turn into ``(a·cos − b·sin, b·cos + a·sin)``, in fp32 as the stock
    model does, so a full step rotates exactly as it does.
    """
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x.float() * cos + turned.float() * sin).to(x.dtype)


def _heads(linear, norm, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    out = linear(x).unflatten(-1, (-1, head_dim))
    return norm(out) if norm is not None else out


def _no_mask(name: str, attention_mask) -> None:
    if attention_mask is not None:
        raise RuntimeError(f"{name}: pruned FLUX attention takes no attention mask")


class PrunedFluxJointProcessor(CachedAttention):
    """A dual-stream FLUX block's attention: k image queries and the text's attend over the layer's cache."""

    carries_text = True

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kwargs
    ):
        _no_mask(self.name, attention_mask)
        d, n_image = attn.head_dim, hidden_states.shape[1]
        query = _heads(attn.to_q, attn.norm_q, hidden_states, d)
        key = _heads(attn.to_k, attn.norm_k, hidden_states, d)
        value = attn.to_v(hidden_states).unflatten(-1, (-1, d))
        e = encoder_hidden_states
        n_text = e.shape[1]
        text_query = _heads(attn.add_q_proj, attn.norm_added_q, e, d)
        text_key = _heads(attn.add_k_proj, attn.norm_added_k, e, d)
        text_value = attn.add_v_proj(e).unflatten(-1, (-1, d))
        query = torch.cat([text_query, query], dim=1)  # the stock order: text, then image
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            query = rotate(query, cos, sin)
            text_key = rotate(text_key, cos[..., :n_text, :], sin[..., :n_text, :])
            key = rotate(key, cos[..., n_text:, :], sin[..., n_text:, :])
        key, value = self.update_cache(key, value, text_key, text_value)
        out = self.attend(attn, query.transpose(1, 2), key, value, n_image, first=n_text)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        image_out = attn.to_out[1](attn.to_out[0](out[:, n_text:].contiguous()))
        return image_out, attn.to_add_out(out[:, :n_text].contiguous())


class PrunedFluxSingleProcessor(CachedAttention):
    """A single-stream FLUX block's attention over ``[text; k image tokens]``; returns the same sequence."""

    carries_text = True

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kwargs
    ):
        _no_mask(self.name, attention_mask)
        if encoder_hidden_states is not None:
            raise RuntimeError(f"{self.name}: a single-stream block carries the text in its one sequence")
        d = attn.head_dim
        n_image = self.pruner.kept
        n_text = hidden_states.shape[1] - n_image
        query = _heads(attn.to_q, attn.norm_q, hidden_states, d)
        key = _heads(attn.to_k, attn.norm_k, hidden_states, d)
        value = attn.to_v(hidden_states).unflatten(-1, (-1, d))
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        key, value = self.update_cache(key[:, n_text:], value[:, n_text:], key[:, :n_text], value[:, :n_text])
        out = self.attend(attn, query.transpose(1, 2), key, value, n_image, first=n_text)
        return out.transpose(1, 2).flatten(2).to(query.dtype)


def flux_macs_by_kind(t: nn.Module, rows: int, n: int, n_total: int, n_text: int) -> dict[str, int]:
    """One FLUX forward, per part: ``embed`` (patch, time/guidance/pooled, text embeddings), ``dual``
    (the dual-stream blocks), ``single`` (the single-stream blocks), ``out`` (final norm and projection).

    ``n`` of ``n_total`` image tokens are recomputed; the ``n_text`` text tokens always are, and every
    query attends over all ``n_total + n_text`` keys (the unselected tokens' from the layer's cache).
    """
    keys = n_total + n_text
    embed = (
        n_total * linear_macs(t.x_embedder) + linear_macs(t.time_text_embed) + n_text * linear_macs(t.context_embedder)
    )
    dual = 0
    for blk in t.transformer_blocks:
        a = blk.attn
        dual += linear_macs(blk.norm1.linear) + linear_macs(blk.norm1_context.linear)
        dual += n * (
            linear_macs(a.to_q)
            + linear_macs(a.to_k)
            + linear_macs(a.to_v)
            + linear_macs(a.to_out[0])
            + linear_macs(blk.ff)
        )
        dual += n_text * (
            linear_macs(a.add_q_proj)
            + linear_macs(a.add_k_proj)
            + linear_macs(a.add_v_proj)
            + linear_macs(a.to_add_out)
            + linear_macs(blk.ff_context)
        )
        dual += 2 * (n + n_text) * keys * a.to_q.out_features
    single = 0
    for blk in t.single_transformer_blocks:
        a = blk.attn
        single += linear_macs(blk.norm.linear)
        single += (n + n_text) * (
            linear_macs(a.to_q)
            + linear_macs(a.to_k)
            + linear_macs(a.to_v)
            + linear_macs(blk.proj_mlp)
            + linear_macs(blk.proj_out)
        )
        single += 2 * (n + n_text) * keys * a.to_q.out_features
    out = linear_macs(t.norm_out.linear) + n * linear_macs(t.proj_out)
    return {"embed": rows * embed, "dual": rows * dual, "single": rows * single, "out": rows * out}


def flux_macs(t: nn.Module, rows: int, n: int, n_total: int, n_text: int) -> int:
    """One FLUX forward with ``n`` of ``n_total`` image tokens recomputed and ``n_text`` text tokens."""
    return sum(flux_macs_by_kind(t, rows, n, n_total, n_text).values())


FLUX = families.register("flux")(
    FamilySpec(
        name="flux",
        title="FLUX.1",
        transformer_type="FluxTransformer2DModel",
        block_type="FluxTransformerBlock",
        attentions=(("attn", PrunedFluxJointProcessor),),
        macs=flux_macs,
        patch_embed="x_embedder",
        text_embed="context_embedder",
        extra_blocks=(
            BlockList(
                "single_transformer_blocks", "FluxSingleTransformerBlock", (("attn", PrunedFluxSingleProcessor),)
            ),
        ),
        rotary="pos_embed",
        select_rotary=select_text_image_rows,
        packed=True,
        token_grid=flux_grid,
        block_residuals=("controlnet_block_samples", "controlnet_single_block_samples"),
        guidance_distilled=True,
        text_first=True,
        # dual-stream blocks: attention reused, image MLP fresh; single-stream: attention reused, the MLP's input
        # projection fresh and the output projection on the same positions (the text tokens always computed)
        layer_modules=(("attn", "attn"), ("ff", "mlp"), ("proj_mlp", "mlp"), ("proj_out", "follow")),
        cache_dit_pattern="Pattern_1",
    )
)


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
