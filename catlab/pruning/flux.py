"""FLUX's attention, pruned: rotary positions for the selected tokens, rotated keys in the cache.

FLUX rotates queries and keys by each token's position (a rotary table built from
``txt_ids`` and ``img_ids``, text rows first). At a pruned step the engine's hook on
the rotary embedding (:class:`~catlab.pruning.engine.TokenPruner`) hands every
block a per-row table of the text rows and the selected image tokens' rows,
``(rows, L + k, head_dim)``; the processors here rotate the fresh queries and keys
with it, so a cached key is always the rotated key of its own position, as the
stock forward computed it when that token was last recomputed.

* dual-stream blocks (:class:`PrunedFluxJointProcessor`): image and text streams
  have their own projections; text tokens are always computed;
* single-stream blocks (:class:`PrunedFluxSingleProcessor`): text and selected image
  tokens are one ``(rows, L + k, D)`` sequence; their K/V split into the layer cache.

Both keep the layer's cache as the other families do (image tokens first, the text
tail after them) and attend over it whole.
"""

from __future__ import annotations

import torch

from catlab.pruning.processors import _CachedAttention


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
    """The token grid of a FLUX call, from its ``img_ids`` ``(N, 3)`` = (0, row, column); read on the host."""
    ids = kwargs["img_ids"]
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


class PrunedFluxJointProcessor(_CachedAttention):
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


class PrunedFluxSingleProcessor(_CachedAttention):
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
