"""What a transformer family is to the pruning engine, as data: :class:`FamilySpec`, and how one is found.

A :class:`FamilySpec` says where a family keeps its patch embedding, its output
projection, its blocks (one or more lists of them: a model may run dual-stream
blocks, then single-stream ones) and which attention modules inside a block carry
the image tokens' K/V, with the processor that prunes each. The pruning engine
reads only the spec, so it names no family.

Each family is one module of :mod:`catlab.families` (its spec, its processors, its
MAC formula, its model adapters) that registers its spec in
:data:`catlab.registry.families`, plus its YAML in ``conf/model/``;
:func:`family_of` finds a transformer's spec by its class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from catlab.registry import families


class UnsupportedModelError(TypeError):
    """The transformer (or one of its blocks) is not of a family catlab knows how to prune."""


def self_cross_block_macs(blk: nn.Module, ff: nn.Module, n: int, n_total: int, n_text: int) -> int:
    """One row of a block with self-attention ``attn1`` (``n`` queries over ``n_total`` keys; K/V of the ``n``
    recomputed tokens), cross-attention ``attn2`` to ``n_text`` text tokens, and feed-forward ``ff`` on ``n``
    tokens: a cross-attention family's block."""
    a1, a2 = blk.attn1, blk.attn2
    macs = n * (linear_macs(a1.to_q) + linear_macs(a1.to_k) + linear_macs(a1.to_v) + linear_macs(a1.to_out[0]))
    macs += 2 * n * n_total * a1.to_q.out_features
    macs += n * (linear_macs(a2.to_q) + linear_macs(a2.to_out[0]))
    macs += n_text * (linear_macs(a2.to_k) + linear_macs(a2.to_v))
    macs += 2 * n * n_text * a2.to_q.out_features
    return macs + n * linear_macs(ff)


def linear_macs(module: nn.Module | None) -> int:
    """Multiply-accumulates of one token through every ``nn.Linear`` in ``module`` that runs.

    A LoRA layer (peft's, as ``pipe.load_lora_weights`` installs it) keeps its adapters'
    ``lora_A`` / ``lora_B`` linears as modules: they run (and count) while the adapter is
    active and unmerged; once merged into the base weight (``fuse_lora``), disabled or
    inactive they do not run, and are not counted.
    """
    if module is None:
        return 0
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    idle = _idle_adapter_linears(module)
    return sum(
        m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear) and id(m) not in idle
    )


def _idle_adapter_linears(module: nn.Module) -> set[int]:
    """ids of the adapter linears in ``module`` that do not run (see :func:`linear_macs`); read by duck typing,
    so catlab needs no adapter library."""
    idle: set[int] = set()
    for layer in module.modules():
        lora_a = getattr(layer, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict):
            continue
        active = set(getattr(layer, "active_adapters", ()))
        off = bool(getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False))
        for name in lora_a:
            if off or name not in active:
                for part in (lora_a, getattr(layer, "lora_B", {})):
                    if name in part:
                        idle.update(id(m) for m in part[name].modules())
    return idle


def conv_macs(t: nn.Module, n_total: int) -> int:
    """Multiply-accumulates of a convolutional patch embedding (``t.pos_embed.proj``) over ``n_total`` tokens."""
    proj = t.pos_embed.proj
    return n_total * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * proj.out_channels // proj.groups


@dataclass(frozen=True)
class BlockList:
    """A list of blocks of a family: ``transformer_blocks``, and any run after it (single-stream blocks)."""

    attr: str
    block_type: str
    attentions: tuple[tuple[str, type], ...]


@dataclass(frozen=True)
class FamilySpec:
    """Where one transformer family keeps the parts the pruning engine touches."""

    name: str
    transformer_type: str
    block_type: str
    #: attribute names of the attention modules (in a block) that attend over image tokens, each with the
    #: processor class that prunes it (a :class:`~catlab.pruning.processors.CachedAttention`: the generic
    #: ``PrunedSelfAttnProcessor`` or one of the family module's own)
    attentions: tuple[tuple[str, type], ...]
    macs: Callable[[nn.Module, int, int, int, int], int]
    patch_embed: str = "pos_embed"
    output_proj: str = "proj_out"
    #: the module that embeds the text tokens the "joint" attentions append to their K/V (``None``: none do)
    text_embed: str | None = None
    #: block lists after ``transformer_blocks``, run in this order
    extra_blocks: tuple[BlockList, ...] = ()
    #: the attribute that holds the first (or only) list of blocks
    blocks: str = "transformer_blocks"
    #: the module whose output holds the rotary tables (``None``: positions are added to the tokens,
    #: not rotated into Q/K), and how a pruned step keeps the rows of the selected tokens:
    #: ``select_rotary(output, indices (rows, k), N)`` → what the blocks receive instead
    rotary: str | None = None
    select_rotary: Callable[[Any, torch.Tensor, int], Any] | None = None
    #: the transformer takes and returns tokens ``(B, N, C)`` (packed latents), not ``(B, C, H, W)``;
    #: ``token_grid(call kwargs)`` reads their grid (rows, columns) from the call
    packed: bool = False
    token_grid: Callable[[dict], tuple[int, ...]] | None = None
    #: each call runs one guidance branch (distilled guidance, a model input; or true CFG, one call per
    #: branch) rather than stacked CFG halves
    guidance_distilled: bool = False
    #: a joint attention's sequence holds the text tokens before the image tokens; else the image tokens lead
    #: or stand alone
    text_first: bool = False
    #: cache-dit's ``ForwardPattern`` name for these blocks (``None``: cache-dit's step caches refuse the family)
    cache_dit_pattern: str | None = None
    #: the blocks are joint text+image attention blocks without rotary positions, so a selector that prunes
    #: inside one forward (``atedm``) may record and drop tokens in them
    in_step: bool = False
    #: the modules of a ``transformer_blocks`` block that selection at layer granularity
    #: (:mod:`catlab.pruning.layerwise`) caches, each with its role: ``"attn"`` (an attention over
    #: image tokens: its whole output is reused at a cached step), ``"cross"`` (a cross-attention to
    #: the text: computed for the fresh tokens only), ``"mlp"`` (a token-wise feed-forward: likewise) or
    #: ``"follow"`` (a projection of the previous module's output: the positions that module took), in any
    #: of the block lists (a list's blocks without the attribute skip it); empty: the family does not offer it
    layer_modules: tuple[tuple[str, str], ...] = ()
    #: how messages name the family (its usual written name; empty: ``name``)
    title: str = ""
    #: keyword arguments of the transformer's forward that hold per-block residuals of the image tokens, each a
    #: list of ``(rows, N, D)`` tensors added to the blocks' image tokens (a ControlNet's): gathered to the k
    #: selected tokens at a pruned step
    block_residuals: tuple[str, ...] = ()
    #: refuses, with an :class:`UnsupportedModelError`, a variant of the transformer the spec cannot prune
    check: Callable[[nn.Module], None] | None = None

    def block_lists(self) -> tuple[BlockList, ...]:
        """Every list of blocks, in the order the forward runs them."""
        return (BlockList(self.blocks, self.block_type, self.attentions), *self.extra_blocks)

    def check_block(self, index: int, block: nn.Module, kind: BlockList | None = None) -> None:
        kind = kind or self.block_lists()[0]
        where = f"block {index}" if kind.attr == self.blocks else f"{kind.attr}[{index}]"
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


def family_specs() -> list[FamilySpec]:
    """Every registered family, by name."""
    return [families.get(name) for name in families.names()]


def family_of(transformer: nn.Module) -> FamilySpec:
    """The spec registered for ``transformer``'s class, its blocks checked; else an error naming what is supported."""
    name = type(transformer).__name__
    specs = family_specs()
    found = [spec for spec in specs if spec.transformer_type == name]
    if len(found) > 1:
        raise UnsupportedModelError(f"{name} is claimed by more than one family: {', '.join(s.name for s in found)}")
    if not found:
        supported = "; ".join(f"{s.transformer_type} with {s.block_type} blocks" for s in specs)
        raise UnsupportedModelError(f"cannot prune a {name}: supported transformers are {supported}")
    spec = found[0]
    for kind in spec.block_lists():
        for i, block in enumerate(getattr(transformer, kind.attr)):
            spec.check_block(i, block, kind)
    if spec.check is not None:
        spec.check(transformer)
    return spec


def patchify(x: torch.Tensor, patch: int | tuple[int, ...]) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, N, p·p·C)`` in the token order and channel layout of the output projection.

    A video ``(B, C, F, H, W)`` with a patch ``(pt, ph, pw)`` (an int ``p``: ``(1, p, p)``) → ``(B, N, pt·ph·pw·C)``,
    tokens frames-major then row-major, each token's channels ``(pt, ph, pw, C)``."""
    if x.ndim == 5:
        pt, ph, pw = (1, patch, patch) if isinstance(patch, int) else tuple(patch)
        b, c, f, h, w = x.shape
        x = x.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(b, (f // pt) * (h // ph) * (w // pw), pt * ph * pw * c)
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)
