"""The ``example_center`` selector: recompute the k tokens nearest the image centre."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catlab.registry import selectors
from catlab.selection import Policy, StepState


@selectors.register("example_center")
@dataclass
class ExampleCenter(Policy):
    """The same k tokens at every pruned step: those closest to the centre of the grid."""

    def select(self, state: StepState) -> torch.Tensor:
        h, w = state.grid
        i = torch.arange(h, device=state.device).repeat_interleave(w).float()
        j = torch.arange(w, device=state.device).repeat(h).float()
        dist = (i - (h - 1) / 2) ** 2 + (j - (w - 1) / 2) ** 2
        return dist.topk(state.k, largest=False).indices.expand(state.batch_size, -1)
