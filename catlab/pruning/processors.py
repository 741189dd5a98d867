"""Attention processors that compute Q/K/V for the selected tokens only.

Each processor owns one layer's K/V cache, token-major: ``(rows, N + L, inner)``
with the N image tokens first and the layer's L text tokens (joint attention)
after them. At a full step it is filled from every token; at a pruned step the k
fresh image keys and values are copied into their rows with one ``index_copy_``
per tensor (contiguous rows of ``inner`` values, cheap on any device), the text
tail is overwritten, and the k queries (plus text) attend over the whole cache.
The cache *is* the attention's key/value tensor, so no per-step concatenation
of N + L keys is needed. The unselected tokens' K/V are those written the last
time each token was computed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from catlab.pruning.engine import TokenPruner


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(rows, n, inner)`` → ``(rows, n, heads, d)`` (a view)."""
    rows, n, inner = x.shape
    return x.view(rows, n, heads, inner // heads)


def _project(linear, norm, x: torch.Tensor, heads: int) -> torch.Tensor:
    """A Q/K/V projection, optionally QK-normed per head, as ``(rows, n, heads, d)``."""
    out = _split(linear(x), heads)
    return norm(out) if norm is not None else out


class _CachedAttention:
    """Shared cache handling for both processor kinds."""

    def __init__(self, pruner: "TokenPruner", layer: int, name: str):
        self.pruner = pruner
        self.layer = layer
        self.name = name
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.heads = 1

    def reset(self) -> None:
        self.keys = None
        self.values = None

    def _image(self, cache: torch.Tensor | None) -> torch.Tensor | None:
        if cache is None:
            return None
        rows, _, inner = cache.shape
        n = self.pruner.num_tokens
        return cache[:, :n].view(rows, n, self.heads, inner // self.heads).transpose(1, 2)

    @property
    def key_cache(self) -> torch.Tensor | None:
        """The image tokens' cached keys, ``(rows, heads, N, d)``."""
        return self._image(self.keys)

    @property
    def value_cache(self) -> torch.Tensor | None:
        """The image tokens' cached values, ``(rows, heads, N, d)``."""
        return self._image(self.values)

    def update_cache(self, key: torch.Tensor, value: torch.Tensor, text_key: torch.Tensor | None = None,
                     text_value: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write fresh K/V ``(rows, n, heads, d)`` (+ text); return the ``(rows, heads, N + L, d)`` attention K/V."""
        rows, n, heads, d = key.shape
        self.heads = heads
        key, value = key.reshape(rows, n, heads * d), value.reshape(rows, n, heads * d)
        if text_key is not None:
            text_key, text_value = text_key.reshape(rows, -1, heads * d), text_value.reshape(rows, -1, heads * d)
        idx = self.pruner.row_indices
        if idx is None:
            if n != self.pruner.num_tokens:
                raise RuntimeError(f"{self.name}: a full step got {n} tokens, expected {self.pruner.num_tokens}")
            if text_key is None:
                self.keys, self.values = key.contiguous(), value.contiguous()
            else:
                self.keys, self.values = torch.cat([key, text_key], 1), torch.cat([value, text_value], 1)
        else:
            self._write(key, value, idx, text_key, text_value)
        total = self.keys.shape[1]
        return (self.keys.view(rows, total, heads, d).transpose(1, 2),
                self.values.view(rows, total, heads, d).transpose(1, 2))

    def _write(self, key, value, idx, text_key, text_value) -> None:
        rows, n, inner = key.shape
        n_text = 0 if text_key is None else text_key.shape[1]
        if self.keys is None or self.keys.shape[0] != rows or self.keys.shape[1] != self.pruner.num_tokens + n_text:
            raise RuntimeError(
                f"{self.name}: a pruned step needs the K/V of a previous full step for the same batch; "
                "run at least one full step first (start_step >= 1)"
            )
        total = self.keys.shape[1]
        flat = (idx + torch.arange(rows, device=idx.device)[:, None] * total).reshape(-1)
        self.keys.view(-1, inner).index_copy_(0, flat, key.reshape(-1, inner).to(self.keys.dtype))
        self.values.view(-1, inner).index_copy_(0, flat, value.reshape(-1, inner).to(self.values.dtype))
        if text_key is not None:
            self.keys[:, total - n_text:].copy_(text_key)
            self.values[:, total - n_text:].copy_(text_value)

    def attend(self, attn, query, key, value, n_image: int, mask=None) -> torch.Tensor:
        """SDPA, plus the image→image attention probabilities when this layer is a probe."""
        if self.pruner.probe_layers and self.layer in self.pruner.probe_layers:  # no per-layer guard when compiled
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
        h = attn.heads
        query = _project(attn.to_q, attn.norm_q, hidden_states, h)
        key = _project(attn.to_k, attn.norm_k, hidden_states, h)
        value = _split(attn.to_v(hidden_states), h)
        text_key = text_value = None
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            text_query = _project(attn.add_q_proj, attn.norm_added_q, e, h)
            text_key = _project(attn.add_k_proj, attn.norm_added_k, e, h)
            text_value = _split(attn.add_v_proj(e), h)
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


class PrunedSelfAttnProcessor(_CachedAttention):
    """Plain self-attention over image tokens (PixArt's ``attn1``), pruned."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError(f"{self.name}: pruned self-attention takes no encoder states or mask")
        rows, n_image, _ = hidden_states.shape
        h = attn.heads
        query = _project(attn.to_q, attn.norm_q, hidden_states, h)
        key = _project(attn.to_k, attn.norm_k, hidden_states, h)
        key, value = self.update_cache(key, _split(attn.to_v(hidden_states), h))
        out = self.attend(attn, query.transpose(1, 2), key, value, n_image)
        out = out.transpose(1, 2).reshape(rows, n_image, -1).to(hidden_states.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor
