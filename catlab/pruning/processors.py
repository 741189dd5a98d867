"""Attention processors that compute Q/K/V for the selected tokens only.

Each processor owns one layer's K/V cache, token-major: ``(rows, N + L, inner)``
with the N image tokens first and the layer's L text tokens (joint attention)
after them. At a full step it is filled from every token, into buffers of the
pruner's :class:`~catlab.pruning.buffers.BufferPool` (kept across steps and
generations); at a pruned step the k fresh image keys and values are copied into
their rows with one ``index_copy_`` per tensor (contiguous rows of ``inner``
values, cheap on any device), the text tail is overwritten, and the k queries
(plus text) attend over the whole cache.
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


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(rows, n, inner)`` → ``(rows, n, heads, d)`` (a view)."""
    rows, n, inner = x.shape
    return x.view(rows, n, heads, inner // heads)


def project_heads(linear, norm, x: torch.Tensor, heads: int) -> torch.Tensor:
    """A Q/K/V projection, optionally QK-normed per head, as ``(rows, n, heads, d)``."""
    out = split_heads(linear(x), heads)
    return norm(out) if norm is not None else out


class CachedAttention:
    """One attention layer's K/V cache, and how a pruned step writes and attends over it.

    A family's processor subclasses it and writes ``__call__`` for its attention module:
    project the k selected tokens (and any text), :meth:`update_cache`, :meth:`attend`.
    The pruner binds this layer's cache buffers (:meth:`bind`) before a full step and
    its flat write positions (:attr:`flat`) before a pruned step, in eager code ahead
    of the blocks, so a compiled block never allocates or looks anything up.
    """

    def __init__(self, pruner: TokenPruner, layer: int, name: str, text: bool):
        self.pruner = pruner
        self.layer = layer
        self.name = name
        #: whether the layer's K/V carry the text tokens after the image tokens (joint attention)
        self.text = text
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        #: the selected tokens' row-major positions in ``keys`` viewed as ``(rows · total, inner)``
        self.flat: torch.Tensor | None = None
        self.heads = 1

    #: the layer's K/V hold the text tokens after the image tokens (joint attention); see :meth:`holds_text`
    carries_text = False

    @classmethod
    def holds_text(cls, attn) -> bool:
        """Whether this processor on ``attn`` keeps text K/V after the image's (a class whose modules differ,
        text or not, decides per module)."""
        return cls.carries_text

    def reset(self) -> None:
        self.keys = None
        self.values = None

    def bind(self, rows: int, num_tokens: int, num_text: int, device) -> None:
        """Take this layer's ``(rows, N + L, inner)`` K/V buffers from the pool (before a full step)."""
        total = num_tokens + (num_text if self.text else 0)
        to_k = self.attn.to_k
        shape, dtype = (rows, total, to_k.out_features), to_k.weight.dtype
        self.keys = self.pruner.pool.get(f"{self.name}.keys", shape, dtype, device)
        self.values = self.pruner.pool.get(f"{self.name}.values", shape, dtype, device)

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

    def update_cache(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        text_key: torch.Tensor | None = None,
        text_value: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write fresh K/V ``(rows, n, heads, d)`` (+ text); return the ``(rows, heads, N + L, d)`` attention K/V."""
        rows, n, heads, d = key.shape
        self.heads = heads
        key, value = key.reshape(rows, n, heads * d), value.reshape(rows, n, heads * d)
        n_text = 0
        if text_key is not None:
            text_key, text_value = text_key.reshape(rows, -1, heads * d), text_value.reshape(rows, -1, heads * d)
            n_text = text_key.shape[1]
        expected = (rows, self.pruner.num_tokens + n_text, heads * d)
        if self.keys is None or tuple(self.keys.shape) != expected:
            raise RuntimeError(
                f"{self.name}: no K/V cache of shape {expected} for this step (got "
                f"{None if self.keys is None else tuple(self.keys.shape)}); a pruned step needs a full step of the "
                "same batch before it (start_step >= 1)"
            )
        keys, values = self.keys, self.values
        if self.pruner.row_indices is None:  # a full step: every token's K/V, then the text's
            keys[:, :n].copy_(key)
            values[:, :n].copy_(value)
        else:  # k fresh rows, one index_copy_ per tensor
            inner = heads * d
            keys.view(-1, inner).index_copy_(0, self.flat, key.reshape(-1, inner).to(keys.dtype))
            values.view(-1, inner).index_copy_(0, self.flat, value.reshape(-1, inner).to(values.dtype))
        total = keys.shape[1]
        if text_key is not None:  # the text tail is recomputed at every step
            keys[:, total - n_text :].copy_(text_key)
            values[:, total - n_text :].copy_(text_value)
        keys, values = (
            keys.view(rows, total, heads, d).transpose(1, 2),
            values.view(rows, total, heads, d).transpose(1, 2),
        )
        if keys.dtype != key.dtype:  # under autocast the projections' outputs differ from the weights' dtype
            keys, values = keys.to(key.dtype), values.to(value.dtype)
        return keys, values

    def attend(self, attn, query, key, value, n_image: int, mask=None, first: int = 0) -> torch.Tensor:
        """SDPA, plus the image→image attention probabilities when this layer is a probe (the image
        queries are ``query[:, :, first:first + n_image]``)."""
        if self.pruner.probe_layers and self.layer in self.pruner.probe_layers:  # no per-layer guard when compiled
            scale = attn.scale if hasattr(attn, "scale") else query.shape[-1] ** -0.5
            logits = (query[:, :, first : first + n_image] @ key.transpose(-1, -2)) * scale
            if mask is not None:
                logits = logits + mask
            probs = logits.softmax(-1)[..., : self.pruner.num_tokens].mean(1)
            self.pruner.record_attention(self.layer, probs)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)


class PrunedSelfAttnProcessor(CachedAttention):
    """Plain self-attention over image tokens, pruned: the generic processor of a family whose image
    attention takes no text and no mask (a cross-attention to the text then runs stock on k queries)."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError(f"{self.name}: pruned self-attention takes no encoder states or mask")
        rows, n_image, _ = hidden_states.shape
        h = attn.heads
        query = project_heads(attn.to_q, attn.norm_q, hidden_states, h)
        key = project_heads(attn.to_k, attn.norm_k, hidden_states, h)
        key, value = self.update_cache(key, split_heads(attn.to_v(hidden_states), h))
        out = self.attend(attn, query.transpose(1, 2), key, value, n_image)
        out = out.transpose(1, 2).reshape(rows, n_image, -1).to(hidden_states.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor
