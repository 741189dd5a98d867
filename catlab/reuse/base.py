"""What an unselected token's output becomes at a pruned step: the reuse rule.

The pruning engine returns the model output in token space with fresh values at
the selected tokens and, elsewhere, the value each token had the last time it was
computed (a stale copy). A :class:`Reuse` rule turns that into the output the
sampler uses: :class:`~catlab.reuse.rules.Copy` keeps the stale copies (the paper's
rule), :class:`~catlab.reuse.rules.Taylor` forecasts every token from its own
history of computations.

The sampler calls, once per generation and once per step::

    reuse.reset(batch, num_tokens, channels, device)
    output = reuse.compose(step, output, indices, time=None)   # (B, N, C) -> (B, N, C)

``indices`` are the ``(B, k)`` tokens computed at this step (``None``: every token,
an empty ``(B, 0)`` tensor: none, the step was skipped). ``time`` is the variable
the forecast runs in (default: the step index; the scheduler's sigma also works).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from catlab.capabilities import Capability
from catlab.registry import Named, reuses  # noqa: F401  (reuses re-exported: catlab.reuse.reuses)


@dataclass
class Reuse(Named):
    """Base of every reuse rule: holds nothing, returns the engine's output unchanged.

    ``capabilities``: ``ROW_WISE`` when each batch row is composed alone (linear in the
    output), so the rule may act on the stacked guidance rows (inside the transformer, or
    on a stock pipeline) as well as on their combination. A rule without it runs only
    after guidance, in catlab's sampler.
    """

    capabilities: ClassVar[Capability] = Capability.ROW_WISE

    def reset(
        self,
        batch: int,
        num_tokens: int,
        channels: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Forget every token's history: a new generation starts."""

    def compose(
        self, step: int, output: torch.Tensor, indices: torch.Tensor | None, time: float | None = None
    ) -> torch.Tensor:
        """The output to use at ``step``: fresh at ``indices``, reused (by this rule) elsewhere."""
        return output


def unpatchify(tokens: torch.Tensor, patch: int | tuple[int, ...], *size: int) -> torch.Tensor:
    """``(B, N, p·p·C)`` → ``(B, C, H, W)`` for ``size = (H, W)``, or ``(B, C, F, H, W)`` for
    ``size = (F, H, W)``; the inverse of :func:`catlab.pruning.families.patchify`."""
    if len(size) == 3:
        pt, ph, pw = (1, patch, patch) if isinstance(patch, int) else tuple(patch)
        (f, h, w), b = size, tokens.shape[0]
        x = tokens.reshape(b, f // pt, h // ph, w // pw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, -1, f, h, w)
    height, width = size
    b, n, pc = tokens.shape
    c = pc // (patch * patch)
    h, w = height // patch, width // patch
    x = tokens.reshape(b, h, w, patch, patch, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)
