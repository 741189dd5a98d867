"""``forecast_error``: recompute the tokens whose Taylor forecast is least trustworthy.

With ``taylor`` reuse, an unselected token's error at time t is about the first
Taylor term left out: ``|[y0, y1, y2]| · |(t − t0)(t − t1)|`` for an order-1 forecast
(the second divided difference times the node polynomial). The policy keeps its
own order-2 history of the guided output (from :meth:`observe`, computed steps
only) and picks the k tokens with the largest such estimate; tokens with too short
a history come first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catlab.registry import selectors
from catlab.reuse.rules import Taylor
from catlab.selection.base import Policy, StepState
from catlab.selection.ranking import top_k


@selectors.register("forecast_error")
@dataclass
class ForecastError(Policy):
    """Top-k tokens by the estimated error of their order-1 forecast at this step."""

    def check(self, num_steps: int) -> None:
        super().check(num_steps)
        if self.start_step < 1:
            raise ValueError(
                "forecast_error needs start_step >= 1: it ranks tokens by their history of computed steps"
            )

    def reset(self, batch_size, grid, num_steps, device) -> None:
        super().reset(batch_size, grid, num_steps, device)
        self.history: Taylor | None = None

    def observe(self, step, output, indices) -> None:
        if self.history is None:
            self.history = Taylor(order=2)
            self.history.reset(output.shape[0], output.shape[1], output.shape[2], output.device, output.dtype)
        self.history.compose(step, output, indices)

    def score(self, step: int) -> torch.Tensor:
        h = self.history
        y, ts, n = h.values, h.times, h.count
        one = torch.ones_like(ts[..., 0])
        h01 = (ts[..., 0] - ts[..., 1]).where(n >= 2, one)
        h12 = (ts[..., 1] - ts[..., 2]).where(n >= 3, one)
        h02 = (ts[..., 0] - ts[..., 2]).where(n >= 3, one)
        d2 = ((y[:, :, 0] - y[:, :, 1]) / h01[..., None] - (y[:, :, 1] - y[:, :, 2]) / h12[..., None]) / h02[..., None]
        node = ((step - ts[..., 0]) * (step - ts[..., 1])).abs()
        est = d2.norm(dim=-1).double() * node
        return est.where(n >= 3, torch.full_like(est, float("inf"))).float()

    def select(self, state: StepState) -> torch.Tensor:
        if self.history is None:
            raise RuntimeError("forecast_error needs at least one full step before it selects")
        return top_k(self.score(state.step), state.k, self.generator).to(state.device)
