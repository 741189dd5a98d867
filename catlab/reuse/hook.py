"""The reuse rule as a diffusers hook on the output projection, for use inside a transformer.

The sampler can apply a :class:`~catlab.reuse.base.Reuse` after guidance (token
space, one row per sample). Composed with a step-level cache that forecasts the
transformer's output (TaylorSeer on ``proj_out``), the rule must act *inside* the
transformer instead, so the cache records fresh-plus-forecast outputs rather than
stale copies. Hook order on the output projection, innermost first::

    TokenPruner scatter  →  ReuseHook  →  step cache (e.g. TaylorSeer)

i.e. attach the pruner, then this hook, then apply the step cache. On a step the
cache forecasts, neither inner hook runs and the rule's histories are untouched.
Rows are the stacked guidance branches; the rule is linear in the output, so
composing per row and then combining the branches equals composing after.
"""
from __future__ import annotations

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
        if self._shape != tuple(output.shape):
            self.reuse.reset(output.shape[0], output.shape[1], output.shape[2], output.device, output.dtype)
            self._shape = tuple(output.shape)
        return self.reuse.compose(self.step, output, self.pruner.row_indices, self.time)

    def attach(self) -> "ReuseHook":
        if not self.pruner.attached:
            raise RuntimeError("attach the TokenPruner before the reuse hook (the hook must wrap its scatter)")
        proj = getattr(self.pruner.transformer, self.pruner.spec.output_proj)
        HookRegistry.check_if_exists_or_initialize(proj).register_hook(self, REUSE_HOOK)
        return self

    def detach(self) -> None:
        proj = getattr(self.pruner.transformer, self.pruner.spec.output_proj)
        HookRegistry.check_if_exists_or_initialize(proj).remove_hook(REUSE_HOOK, recurse=False)
        self.pruner = self.reuse = None  # the hook and diffusers' reference to it form a cycle: hold nothing
