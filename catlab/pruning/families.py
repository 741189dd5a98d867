"""The transformer families catlab can prune, described as data, and their MAC counts.

A :class:`FamilySpec` says where a family keeps its patch embedding, its output
projection, its blocks (one or more lists of them: FLUX runs dual-stream blocks,
then single-stream ones) and which attention modules inside a block carry the
image tokens' K/V. Supporting a new family means writing one more spec (and its
MAC formula); the pruning engine itself is family-agnostic.

A family outside this file is one module of :mod:`catlab.families` (its spec, its
attention processor, its MAC formula and its model adapters) that calls
:func:`register_family`, plus its YAML in ``conf/model/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from catlab.pruning.flux import flux_grid, select_text_image_rows


class UnsupportedModelError(TypeError):
    """The transformer (or one of its blocks) is not of a family catlab knows how to prune."""


def linear_macs(module: nn.Module | None) -> int:
    """Multiply-accumulates of one token through every ``nn.Linear`` in ``module``."""
    if module is None:
        return 0
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _conv_macs(t: nn.Module, n_total: int) -> int:
    proj = t.pos_embed.proj
    return n_total * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * proj.out_channels // proj.groups


def sd3_macs(t: nn.Module, rows: int, n: int, n_total: int, n_text: int) -> int:
    """One SD3 forward with ``n`` of ``n_total`` image tokens recomputed and ``n_text`` text tokens."""
    per_row = _conv_macs(t, n_total) + linear_macs(t.time_text_embed) + n_text * linear_macs(t.context_embedder)
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


def pixart_macs(t: nn.Module, rows: int, n: int, n_total: int, n_text: int) -> int:
    """One PixArt forward with ``n`` of ``n_total`` image tokens recomputed and ``n_text`` text tokens."""
    per_row = _conv_macs(t, n_total) + linear_macs(t.adaln_single) + n_text * linear_macs(t.caption_projection)
    for blk in t.transformer_blocks:
        a1, a2 = blk.attn1, blk.attn2
        per_row += n * (linear_macs(a1.to_q) + linear_macs(a1.to_k) + linear_macs(a1.to_v) + linear_macs(a1.to_out[0]))
        per_row += 2 * n * n_total * a1.to_q.out_features
        per_row += n * (linear_macs(a2.to_q) + linear_macs(a2.to_out[0]))
        per_row += n_text * (linear_macs(a2.to_k) + linear_macs(a2.to_v))
        per_row += 2 * n * n_text * a2.to_q.out_features
        per_row += n * linear_macs(blk.ff)
    per_row += n * linear_macs(t.proj_out)
    return rows * per_row


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


@dataclass(frozen=True)
class BlockList:
    """A list of blocks of a family: ``transformer_blocks``, and any run after it (FLUX's single-stream blocks)."""

    attr: str
    block_type: str
    attentions: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class FamilySpec:
    """Where one transformer family keeps the parts the pruning engine touches."""

    name: str
    transformer_type: str
    block_type: str
    #: attribute names of the attention modules (in a block) that attend over image tokens,
    #: with the processor: a built-in kind ("joint": SD3 style, text concatenated; "self"; FLUX's
    #: rotary "flux_joint" and "flux_single") or a processor class of a family module
    attentions: tuple[tuple[str, Any], ...]
    macs: Callable[[nn.Module, int, int, int, int], int]
    patch_embed: str = "pos_embed"
    output_proj: str = "proj_out"
    #: the module that embeds the text tokens the "joint" attentions append to their K/V (``None``: none do)
    text_embed: str | None = None
    #: block lists after ``transformer_blocks``, run in this order
    extra_blocks: tuple[BlockList, ...] = ()
    #: the module whose output holds the rotary tables (``None``: positions are added to the tokens,
    #: not rotated into Q/K), and how a pruned step keeps the rows of the selected tokens:
    #: ``select_rotary(output, indices (rows, k), N)`` → what the blocks receive instead
    rotary: str | None = None
    select_rotary: Callable[[Any, torch.Tensor, int], Any] | None = None
    #: the transformer takes and returns tokens ``(B, N, C)`` (FLUX's packed latents), not ``(B, C, H, W)``;
    #: ``token_grid(call kwargs)`` reads their grid (rows, columns) from the call
    packed: bool = False
    token_grid: Callable[[dict], tuple[int, int]] | None = None
    #: each call runs one guidance branch (FLUX.1-dev's distilled guidance, a model input; Qwen-Image's
    #: true CFG, one call per branch) rather than stacked CFG halves
    guidance_distilled: bool = False
    #: cache-dit's ``ForwardPattern`` name for these blocks (``None``: catlab's own table of the built-ins)
    cache_dit_pattern: str | None = None
    #: refuses, with an :class:`UnsupportedModelError`, a variant of the transformer the spec cannot prune
    check: Callable[[nn.Module], None] | None = None

    def block_lists(self) -> tuple[BlockList, ...]:
        """Every list of blocks, in the order the forward runs them."""
        return (BlockList("transformer_blocks", self.block_type, self.attentions), *self.extra_blocks)

    def check_block(self, index: int, block: nn.Module, kind: BlockList | None = None) -> None:
        kind = kind or self.block_lists()[0]
        where = f"block {index}" if kind.attr == "transformer_blocks" else f"{kind.attr}[{index}]"
        if type(block).__name__ != kind.block_type:
            raise UnsupportedModelError(
                f"{where} is a {type(block).__name__}; a {self.transformer_type} can be pruned "
                f"only when its {kind.attr} are {kind.block_type}"
            )
        for attr, _ in kind.attentions:
            attn = getattr(block, attr, None)
            if attn is None:
                continue
            if (
                getattr(attn, "group_norm", None) is not None
                or getattr(attn, "spatial_norm", None) is not None
                or getattr(attn, "residual_connection", False)
            ):
                raise UnsupportedModelError(
                    f"{where}.{attr}: group/spatial norm or residual attention is not supported"
                )


SD3 = FamilySpec(
    name="sd3",
    transformer_type="SD3Transformer2DModel",
    block_type="JointTransformerBlock",
    attentions=(("attn", "joint"), ("attn2", "joint")),
    macs=sd3_macs,
    text_embed="context_embedder",
)


def check_pixart(t: nn.Module) -> None:
    """PixArt's own block layout: ``ada_norm_single`` with self-attention and cross-attention."""
    for index, block in enumerate(t.transformer_blocks):
        if getattr(block, "norm_type", None) != "ada_norm_single" or block.attn2 is None or block.only_cross_attention:
            raise UnsupportedModelError(
                f"block {index}: PixArt pruning needs BasicTransformerBlock(norm_type='ada_norm_single') "
                "with self-attention (attn1) and cross-attention (attn2)"
            )


PIXART = FamilySpec(
    name="pixart",
    transformer_type="PixArtTransformer2DModel",
    block_type="BasicTransformerBlock",
    attentions=(("attn1", "self"),),
    macs=pixart_macs,
    check=check_pixart,
)
FLUX = FamilySpec(
    name="flux",
    transformer_type="FluxTransformer2DModel",
    block_type="FluxTransformerBlock",
    attentions=(("attn", "flux_joint"),),
    macs=flux_macs,
    patch_embed="x_embedder",
    text_embed="context_embedder",
    extra_blocks=(BlockList("single_transformer_blocks", "FluxSingleTransformerBlock", (("attn", "flux_single"),)),),
    rotary="pos_embed",
    select_rotary=select_text_image_rows,
    packed=True,
    token_grid=flux_grid,
    guidance_distilled=True,
)
#: every family catlab can prune; a family module adds its own with :func:`register_family`
FAMILIES: list[FamilySpec] = [SD3, PIXART, FLUX]


def register_family(spec: FamilySpec) -> FamilySpec:
    """Make ``spec`` a family :func:`family_of` knows (its ``transformer_type`` replaces an earlier one's)."""
    FAMILIES[:] = [s for s in FAMILIES if s.transformer_type != spec.transformer_type] + [spec]
    return spec


def family_of(transformer: nn.Module) -> FamilySpec:
    """The spec for ``transformer``, or a clear error naming what is supported."""
    name = type(transformer).__name__
    for spec in FAMILIES:
        if name == spec.transformer_type:
            for kind in spec.block_lists():
                for i, block in enumerate(getattr(transformer, kind.attr)):
                    spec.check_block(i, block, kind)
            if spec.check is not None:
                spec.check(transformer)
            return spec
    supported = "; ".join(f"{s.transformer_type} with {s.block_type} blocks" for s in FAMILIES)
    raise UnsupportedModelError(f"cannot prune a {name}: supported transformers are {supported}")


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, N, p·p·C)`` in the token order and channel layout of the output projection."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)
