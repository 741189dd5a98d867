"""The reuse rule applied to the per-layer K/V caches of the pruned attention.

At a pruned step the k fresh queries attend over every token's keys and values;
the unselected tokens' K/V are, in the engine, those of their last computation.
:class:`KVReuse` forecasts them with a reuse rule (one instance per attention
layer; keys and values stacked along the channels), so the fresh tokens attend
over forecast rather than stale K/V.

It wraps each pruned processor's ``update_cache`` (its return value only: the
``(rows, heads, N + L, d)`` K/V, image tokens first), and leaves the stored cache
as it is. The clean home for this is a transform the engine calls inside
``update_cache``; until then attach after :meth:`TokenPruner.attach` and set
:attr:`step` (and :attr:`time`) before each forward.
"""
from __future__ import annotations

import copy

import torch

from catlab.pruning.engine import TokenPruner
from catlab.reuse.base import Reuse


class KVReuse:
    """Per-layer reuse of the image K/V; ``rule`` is copied once per attention layer."""

    def __init__(self, pruner: TokenPruner, rule: Reuse):
        self.pruner, self.rule = pruner, rule
        self.step: int = 0
        self.time: float | None = None
        self._wrapped: list = []
        self._shapes: dict[int, torch.Size] = {}  # per wrapped layer: the shape its rule was reset for

    def attach(self) -> "KVReuse":
        if not self.pruner.attached:
            raise RuntimeError("attach the TokenPruner before the K/V reuse")
        for proc in self.pruner.processors:
            self._wrap(proc, copy.deepcopy(self.rule))
        return self

    def _wrap(self, proc, rule: Reuse) -> None:
        original = proc.update_cache
        slot = len(self._wrapped)

        def update_cache(*args, **kwargs):
            key, value = original(*args, **kwargs)
            rows, heads, total, d = key.shape
            n = self.pruner.num_tokens
            kv = torch.cat([key[:, :, :n], value[:, :, :n]], dim=-1).transpose(1, 2).reshape(rows, n, heads * 2 * d)
            if self._shapes.get(slot) != kv.shape:
                rule.reset(rows, n, kv.shape[-1], kv.device, kv.dtype)
                self._shapes[slot] = kv.shape
            kv = rule.compose(self.step, kv, self.pruner.row_indices, self.time)
            kv = kv.view(rows, n, heads, 2 * d).transpose(1, 2)
            key = torch.cat([kv[..., :d], key[:, :, n:]], dim=2)
            value = torch.cat([kv[..., d:], value[:, :, n:]], dim=2)
            return key, value

        proc.update_cache = update_cache
        self._wrapped.append(proc)

    def reset(self) -> None:
        """A new generation: every layer's rule forgets its history at its next call."""
        self._shapes.clear()

    def detach(self) -> None:
        for proc in self._wrapped:
            proc.__dict__.pop("update_cache", None)
        self._wrapped.clear()
        self._shapes.clear()
