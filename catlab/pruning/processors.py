"""Attention processors that compute Q/K/V for the selected tokens only.

Each processor owns one layer's K/V cache of shape ``(rows, heads, N, head_dim)``:
at a full step it is filled from every token, at a pruned step the k fresh keys
and values are scattered into it at the selected positions, and the k queries
attend over the whole cache (plus the text tokens). The unselected tokens' K/V
are therefore those written the last time each token was computed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from catlab.pruning.engine import TokenPruner


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    rows, n, inner = x.shape
    return x.view(rows, n, heads, inner // heads).transpose(1, 2)


class _CachedAttention:
    """Shared cache handling for both processor kinds."""

    def __init__(self, pruner: "TokenPruner", layer: int, name: str):
        self.pruner = pruner
        self.layer = layer
        self.name = name
        self.key_cache: torch.Tensor | None = None
        self.value_cache: torch.Tensor | None = None

    def reset(self) -> None:
        self.key_cache = None
        self.value_cache = None

    def update_cache(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write fresh image K/V ``(rows, heads, n, d)``; return the full ``(rows, heads, N, d)`` cache."""
        idx = self.pruner.row_indices
        if idx is None:
            if key.shape[2] != self.pruner.num_tokens:
                raise RuntimeError(f"{self.name}: a full step got {key.shape[2]} tokens, expected {self.pruner.num_tokens}")
            self.key_cache, self.value_cache = key.contiguous(), value.contiguous()
            return self.key_cache, self.value_cache
        if self.key_cache is None or self.key_cache.shape[0] != key.shape[0]:
            raise RuntimeError(
                f"{self.name}: a pruned step needs the K/V of a previous full step for the same batch; "
                "run at least one full step first (start_step >= 1)"
            )
        index = idx[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])
        self.key_cache.scatter_(2, index, key.to(self.key_cache.dtype))
        self.value_cache.scatter_(2, index, value.to(self.value_cache.dtype))
        return self.key_cache, self.value_cache

    def attend(self, attn, query, key, value, n_image: int, mask=None) -> torch.Tensor:
        """SDPA, plus the image→image attention probabilities when this layer is a probe."""
        if self.layer in self.pruner.probe_layers:
            scale = attn.scale if hasattr(attn, "scale") else query.shape[-1] ** -0.5
            logits = (query[:, :, :n_image] @ key.transpose(-1, -2)) * scale
            if mask is not None:
                logits = logits + mask
            probs = logits.softmax(-1)[..., : self.pruner.num_tokens].mean(1)
            self.pruner.record_attention(self.layer, probs)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)


class PrunedJointAttnProcessor(_CachedAttention):
    """SD3's joint text+image attention (and SD3.5's image-only ``attn2``), pruned."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        rows, n_image, _ = hidden_states.shape
        query = _heads(attn.to_q(hidden_states), attn.heads)
        key = _heads(attn.to_k(hidden_states), attn.heads)
        value = _heads(attn.to_v(hidden_states), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        key, value = self.update_cache(key, value)

        if encoder_hidden_states is not None:
            c_query = _heads(attn.add_q_proj(encoder_hidden_states), attn.heads)
            c_key = _heads(attn.add_k_proj(encoder_hidden_states), attn.heads)
            c_value = _heads(attn.add_v_proj(encoder_hidden_states), attn.heads)
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query = torch.cat([query, c_query], dim=2)
            key = torch.cat([key, c_key], dim=2)
            value = torch.cat([value, c_value], dim=2)

        out = self.attend(attn, query, key, value, n_image)
        out = out.transpose(1, 2).reshape(rows, -1, attn.heads * out.shape[-1]).to(query.dtype)
        image_out = attn.to_out[1](attn.to_out[0](out[:, :n_image]))
        if encoder_hidden_states is None:
            return image_out
        context_out = out[:, n_image:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        return image_out, context_out


class PrunedSelfAttnProcessor(_CachedAttention):
    """Plain self-attention over image tokens (PixArt's ``attn1``), pruned."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError(f"{self.name}: pruned self-attention takes no encoder states or mask")
        rows, n_image, _ = hidden_states.shape
        query = _heads(attn.to_q(hidden_states), attn.heads)
        key = _heads(attn.to_k(hidden_states), attn.heads)
        value = _heads(attn.to_v(hidden_states), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        key, value = self.update_cache(key, value)
        out = self.attend(attn, query, key, value, n_image)
        out = out.transpose(1, 2).reshape(rows, n_image, -1).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor
