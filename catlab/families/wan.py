"""Wan2.1 (text to video), one module: its pruning spec, its pruned self-attention, its MACs and its adapters.

Wan's transformer (``WanTransformer3DModel``) embeds a latent video ``(B, C, F, H, W)`` with a ``Conv3d`` patch
embedding (patch ``(1, 2, 2)``) and flattens it: tokens are numbered **frames-major, then row-major**
(``t·h·w + r·w + c``), the order of :mod:`catlab.grid`'s ``(frames, height, width)`` grid. Each
``WanTransformerBlock`` runs self-attention over every video token with 3D rotary positions (``attn1``),
cross-attention to the UMT5 text (``attn2``), a feed-forward, all modulated by the timestep
(one ``(B, 6, D)`` modulation shared by every token).

The rules of the family, pruned:

* the k selected tokens are gathered right after the patch embedding (the engine's hook picks them from the
  ``(B, D, F, H, W)`` output, so the forward's ``flatten(2)`` sees k tokens);
* the rotary tables, computed for all N tokens, are cut to the selected tokens' rows ``(rows, k, 1, d)``
  (:func:`select_token_rows`), so a cached key is always the rotated key of its own position;
* self-attention (:class:`PrunedWanSelfAttnProcessor`): the k queries attend over the layer's ``(rows, N, D)``
  K/V cache, written in place at the k positions (the rest as last computed);
* cross-attention runs stock: k queries, the text's K/V in full; feed-forward, norms, gates and the timestep
  modulation touch the k tokens only; the final norm and projection run on k tokens, and the engine scatters
  them into the previous step's output before the stock unpatchify.

Refused: the image-to-video variants (``added_kv_proj_dim`` / ``image_dim``: an image branch in the
cross-attention and extra input channels). Wan2.2's per-token timesteps (``expand_timesteps``) are not pruned.

A stock ``WanPipeline`` guides by two transformer calls per step (the prompt's, then the negative prompt's):
each call is one branch (``guidance_distilled`` in the spec); pruned through ``catlab.enable_pruning``, the
first call of a step is pruned and the negative prompt's runs stock. catlab's own loop stacks both branches in
one call and prunes both with the sample's indices.

Adapters: ``tiny_wan`` (seeded random weights, pixel space, no VAE: ``model.frames`` frames are the token
grid's frames) and ``wan2_1_t2v`` (a ``WanPipeline`` checkpoint: ``model=wan2_1_t2v_1_3b`` and
``model=wan2_1_t2v_14b``). Both decode to a video ``(B, F, C, H, W)`` in ``[0, 1]``
(float32, CPU), as image adapters decode to ``[0, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
from torch import nn

from catlab.grid import Grid
from catlab.models.base import Conditioning, PipelineAdapter
from catlab.models.tiny import TinyAdapter
from catlab.pruning.families import FamilySpec, UnsupportedModelError, linear_macs, self_cross_block_macs
from catlab.pruning.processors import CachedAttention
from catlab.registry import families, models


def select_token_rows(tables: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor, num_tokens: int) -> tuple:
    """Wan's rotary tables ``(cos, sin)``, each ``(1, N, 1, d)``, at a pruned step: the rows of each batch row's
    selected tokens, ``(rows, k, 1, d)`` each."""
    rows, k = idx.shape
    flat = idx.reshape(-1)
    return tuple(table[0].index_select(0, flat).view(rows, k, *table.shape[2:]) for table in tables)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding of ``x`` ``(rows, S, heads, d)``: each channel pair ``(a, b)`` turns into
    ``(a·cos − b·sin, a·sin + b·cos)`` with the pair's angle (the tables repeat each angle twice), computed
    in the tables' precision and stored in ``x``'s dtype, as the stock processor does."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def _projections(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if getattr(attn, "fused_projections", False):
        return attn.to_qkv(x).chunk(3, dim=-1)
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


class PrunedWanSelfAttnProcessor(CachedAttention):
    """A Wan block's self-attention (``attn1``): k queries, QK-normed across heads and rotated by their own
    positions, over the layer's K/V cache of every video token."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError(f"{self.name}: pruned Wan self-attention takes no encoder states or mask")
        n_image = hidden_states.shape[1]
        query, key, value = _projections(attn, hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)  # RMS norm across heads, before the split
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = rotate(query, *rotary_emb), rotate(key, *rotary_emb)
        key, value = self.update_cache(key, value)
        out = self.attend(attn, query.transpose(1, 2), key, value, n_image)
        out = out.transpose(1, 2).flatten(2).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def wan_macs(t: nn.Module, rows: int, n: int, n_total: int, n_text: int) -> int:
    """One Wan forward with ``n`` of ``n_total`` video tokens recomputed and ``n_text`` text tokens.

    The patch embedding and the rotary tables cover every token; the text embedding every text token;
    self-attention's k queries attend over ``n_total`` keys, cross-attention's over ``n_text``."""
    proj = t.patch_embedding
    per_row = n_total * proj.in_channels * proj.out_channels * int(torch.tensor(proj.kernel_size).prod())
    embedder = t.condition_embedder
    per_row += linear_macs(embedder.time_embedder) + linear_macs(embedder.time_proj)
    per_row += n_text * linear_macs(embedder.text_embedder)
    for blk in t.blocks:
        per_row += self_cross_block_macs(blk, blk.ffn, n, n_total, n_text)
    per_row += n * linear_macs(t.proj_out)
    return rows * per_row


def check_wan(t: nn.Module) -> None:
    """Wan2.1 text-to-video only: the image-to-video variants add an image branch to the cross-attention."""
    if t.config.added_kv_proj_dim is not None or t.config.image_dim is not None:
        raise UnsupportedModelError(
            f"a WanTransformer3DModel with added_kv_proj_dim={t.config.added_kv_proj_dim} / "
            f"image_dim={t.config.image_dim} (image-to-video) is not pruned: only text-to-video (both None) is"
        )


def wan_grid(kwargs: dict) -> tuple[int, int, int]:
    """The token grid ``(frames, height, width)`` of a call, from its latents ``hidden_states`` ``(B, C, F, H, W)``
    (patch ``(1, 2, 2)``)."""
    frames, height, width = kwargs["hidden_states"].shape[2:]
    return int(frames), int(height) // 2, int(width) // 2


WAN = families.register("wan")(
    FamilySpec(
        name="wan",
        title="Wan2.1",
        transformer_type="WanTransformer3DModel",
        block_type="WanTransformerBlock",
        attentions=(("attn1", PrunedWanSelfAttnProcessor),),
        macs=wan_macs,
        blocks="blocks",
        patch_embed="patch_embedding",
        output_proj="proj_out",
        rotary="rope",
        select_rotary=select_token_rows,
        guidance_distilled=True,  # a WanPipeline runs one guidance branch per transformer call
        check=check_wan,
        cache_dit_pattern="Pattern_2",  # blocks take (hidden, text, temb, rotary) and return the hidden states
    )
)


class _WanVideo:
    """The shapes and the transformer call shared by the Wan adapters: 5D latents ``(B, C, F, H, W)``."""

    transformer: nn.Module

    @property
    def latent_frames(self) -> int:
        raise NotImplementedError

    @property
    def patch_size(self) -> int:
        """The spatial patch (Wan2.1: ``(1, 2, 2)``, one latent frame per token)."""
        pt, ph, pw = self.transformer.config.patch_size
        if pt != 1 or ph != pw:
            raise ValueError(f"the Wan adapters take patches (1, p, p); got {(pt, ph, pw)}")
        return int(ph)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def grid(self) -> Grid:
        """``(frames, height, width)`` in tokens."""
        h, w = self.latent_size
        return self.latent_frames, h // self.patch_size, w // self.patch_size

    def initial_latents(self, seeds: list[int]) -> torch.Tensor:
        """One seeded CPU noise draw ``(1, C, F, H, W)`` per video."""
        h, w = self.latent_size
        shape = (1, self.latent_channels, self.latent_frames, h, w)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.cat(noise).to(self.torch_device, self.torch_dtype)

    def predict(self, latents, timestep, cond: Conditioning) -> torch.Tensor:
        t = timestep.expand(latents.shape[0])  # as WanPipeline passes it
        return self.transformer(hidden_states=latents, timestep=t, return_dict=False, **cond.kwargs)[0]


def flow_scheduler(flow_shift: float, config: dict | None = None) -> UniPCMultistepScheduler:
    """Wan's sampler: UniPC on flow-matching sigmas shifted by ``flow_shift`` (3.0 at 480p, 5.0 at 720p)."""
    if config is not None:
        return UniPCMultistepScheduler.from_config(config, flow_shift=flow_shift)
    return UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift
    )


@models.register("tiny_wan")
@dataclass
class TinyWan(_WanVideo, TinyAdapter):
    """A Wan2.1-architecture transformer (3D rotary self-attention, text cross-attention) with seeded random
    weights, in pixel space (no VAE): ``frames`` frames of ``height x width``, 3 channels, 2x2 patches.

    Decode contract: ``decode(latents)`` returns the video ``(B, F, C, H, W)``, float32 on the CPU, in
    ``[0, 1]`` (the model's [-1, 1] pixels mapped, clamped); frame ``f`` is latent frame ``f``. Cost and
    plumbing, not quality."""

    frames: int = 5
    height: int = 16
    width: int = 16
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 16
    text_dim: int = 32
    text_tokens: int = 8
    freq_dim: int = 32
    flow_shift: float = 3.0

    def __post_init__(self) -> None:
        if int(self.frames) < 1:
            raise ValueError(f"model.frames must be >= 1; got {self.frames}")
        if self.height % self.patch or self.width % self.patch:
            raise ValueError(
                f"tiny_wan: model.height and model.width must be multiples of {self.patch}; got "
                f"{self.height}x{self.width}"
            )
        super().__post_init__()

    @property
    def latent_frames(self) -> int:
        return int(self.frames)

    def build(self):
        inner = self.num_heads * self.head_dim
        return WanTransformer3DModel(
            patch_size=(1, self.patch, self.patch),
            num_attention_heads=self.num_heads,
            attention_head_dim=self.head_dim,
            in_channels=3,
            out_channels=3,
            text_dim=self.text_dim,
            freq_dim=self.freq_dim,
            ffn_dim=2 * inner,
            num_layers=self.num_layers,
            rope_max_seq_len=max(64, self.frames, self.height, self.width),
        )

    def make_scheduler(self):
        return flow_scheduler(self.flow_shift)

    def conditioning(self, embeds, pooled):
        return dict(encoder_hidden_states=embeds)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)


@models.register("wan2_1_t2v")
@dataclass
class Wan21T2V(_WanVideo, PipelineAdapter):
    """A Wan2.1 text-to-video checkpoint (``WanPipeline``: a UMT5 text encoder, the 3D causal Wan VAE with a
    temporal factor 4 and a spatial factor 8), set up as Wan's own scripts run it: UniPC with ``flow_shift``
    (3.0 at 480p, 5.0 at 720p), classifier-free guidance 5.0 (``sampler.guidance_scale``; catlab stacks the
    negative prompt's rows with the prompt's), 50 steps (``sampler.num_steps``); the VAE runs in float32.

    Decode contract: ``decode(latents)`` returns the video ``(B, F, C, H, W)``, float32 on the CPU, in
    ``[0, 1]`` (the VAE's [-1, 1] mapped, clamped), ``F = num_frames`` (``(num_frames - 1) / 4 + 1`` latent frames)."""

    pipeline_class = "WanPipeline"
    path: str = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    dtype: str = "bfloat16"
    height: int = 480
    width: int = 832
    num_frames: int = 81
    flow_shift: float = 3.0
    negative_prompt: str = ""
    max_sequence_length: int = 512

    def __post_init__(self) -> None:
        if self.height % 16 or self.width % 16:
            raise ValueError(
                f"wan2_1_t2v: model.height and model.width must be multiples of 16; got {self.height}x{self.width}"
            )
        if int(self.num_frames) < 1 or (int(self.num_frames) - 1) % 4:
            raise ValueError(f"wan2_1_t2v: model.num_frames must be 4·n + 1 (81, 33, 5, ...); got {self.num_frames}")
        self.load()

    def load(self) -> None:
        """``WanPipeline.from_pretrained(path)`` (its transformer keeps fp32 modules: loading needs the
        ``accelerate`` package), the VAE in float32 as Wan's examples run it."""
        super().__post_init__()
        self.pipeline.vae.to(torch.float32)

    @property
    def vae_scale(self) -> int:
        return int(self.pipeline.vae_scale_factor_spatial)

    @property
    def latent_frames(self) -> int:
        return (int(self.num_frames) - 1) // int(self.pipeline.vae_scale_factor_temporal) + 1

    def make_scheduler(self):
        return flow_scheduler(self.flow_shift, self.pipeline.scheduler.config)

    def encode(self, prompts: list[str], guidance: bool) -> Conditioning:
        embeds, negative = self.pipeline.encode_prompt(
            prompt=list(prompts),
            negative_prompt=[self.negative_prompt] * len(prompts),
            do_classifier_free_guidance=guidance,
            max_sequence_length=self.max_sequence_length,
            device=self.torch_device,
        )
        if guidance:
            embeds = torch.cat([negative, embeds])
        embeds = embeds.to(self.transformer.dtype)
        return Conditioning(dict(encoder_hidden_states=embeds), 2 if guidance else 1, embeds.shape[1])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, vae.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, vae.dtype)
        video = vae.decode(latents.to(vae.dtype) * std + mean, return_dict=False)[0]
        return ((video.float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)
