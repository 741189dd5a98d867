"""A reuse rule wired into the pruned transformer: on its output projection, and on its K/V caches.

:class:`ReuseHook` — the rule as a diffusers hook on the output projection.
The sampler can apply a :class:`~catlab.reuse.base.Reuse` after guidance (token
space, one row per sample). Composed with a step-level cache that forecasts the
transformer's output (TaylorSeer on ``proj_out``), the rule must act *inside* the
transformer instead, so the cache records fresh-plus-forecast outputs rather than
stale copies. Hook order on the output projection, innermost first::

    TokenPruner scatter  →  ReuseHook  →  step cache (e.g. TaylorSeer)

i.e. attach the pruner, then this hook, then apply the step cache. On a step the
cache forecasts, neither inner hook runs and the rule's histories are untouched.
Rows are the stacked guidance branches; the rule acts row by row
(``Capability.ROW_WISE``), so composing per row and then combining the branches
equals composing after.

:class:`KVReuse` — the rule applied to the per-layer K/V caches of the pruned
attention. At a pruned step the k fresh queries attend over every token's keys and
values; the unselected tokens' K/V are, in the engine, those of their last
computation. :class:`KVReuse` forecasts them with a reuse rule (one instance per
attention layer; keys and values stacked along the channels), so the fresh tokens
attend over forecast rather than stale K/V. It wraps each pruned processor's
``update_cache`` (its return value only: the ``(rows, heads, N + L, d)`` K/V, image
tokens first), and leaves the stored cache as it is.

Both are installed by the run's assembly (:class:`catlab.assembly.PruningSession`),
after :meth:`TokenPruner.attach`; it sets :attr:`step` (and :attr:`time`) before
each forward.
"""

from __future__ import annotations

import copy

import torch
from diffusers.hooks import HookRegistry, ModelHook

from catlab.pruning.engine import TokenPruner
from catlab.reuse.base import Reuse

REUSE_HOOK = "catlab_token_reuse"


class ReuseHook(ModelHook):
    """Applies ``reuse.compose`` to the output projection's (rows, N, C) output; set :attr:`step` before each call."""

    def __init__(self, pruner: TokenPruner, reuse: Reuse):
        super().__init__()
        self.pruner, self.reuse = pruner, reuse
        self.step: int = 0
        self.time: float | None = None
        self._shape: tuple | None = None

    def reset(self) -> None:
        self._shape = None

    def post_forward(self, module, output: torch.Tensor) -> torch.Tensor:
        if self.pruner.bypass:  # an extra call within the step (true CFG, skip-layer guidance): rule untouched
            return output
        if self._shape != tuple(output.shape):
            self.reuse.reset(output.shape[0], output.shape[1], output.shape[2], output.device, output.dtype)
            self._shape = tuple(output.shape)
        return self.reuse.compose(self.step, output, self.pruner.row_indices, self.time)

    def attach(self) -> ReuseHook:
        if not self.pruner.attached:
            raise RuntimeError("attach the TokenPruner before the reuse hook (the hook must wrap its scatter)")
        proj = getattr(self.pruner.transformer, self.pruner.spec.output_proj)
        HookRegistry.check_if_exists_or_initialize(proj).register_hook(self, REUSE_HOOK)
        return self

    def detach(self) -> None:
        proj = getattr(self.pruner.transformer, self.pruner.spec.output_proj)
        HookRegistry.check_if_exists_or_initialize(proj).remove_hook(REUSE_HOOK, recurse=False)
        self.pruner = self.reuse = None  # the hook and diffusers' reference to it form a cycle: hold nothing


class KVReuse:
    """Per-layer reuse of the image K/V; ``rule`` is copied once per attention layer."""

    def __init__(self, pruner: TokenPruner, rule: Reuse):
        self.pruner, self.rule = pruner, rule
        self.step: int = 0
        self.time: float | None = None
        self._wrapped: list = []
        self._shapes: dict[int, torch.Size] = {}  # per wrapped layer: the shape its rule was reset for

    def attach(self) -> KVReuse:
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
