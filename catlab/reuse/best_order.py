"""``best_order``: each token forecast with the order that forecast it best the last times it was computed.

``taylor`` uses one order for every token. Where a token's trajectory bends, the
order-1 line overshoots and a copy (order 0) or the order-2 parabola is closer;
where it is straight, order 1 wins. :class:`BestOrder` keeps each token's last
three computed values (as ``taylor`` with ``order=2``) and, each time the token is
computed again, scores the three forecasts it would have made for that moment
against the fresh value: ``err[o] ← decay·err[o] + (1 − decay)·‖forecast_o − fresh‖``.
An unselected token is then forecast with the order of least running error (a
token with no score yet: order 1, or the highest its history allows). The scores
are measured at the horizon the schedule actually uses (a full step every few
steps measures the forecast over that whole gap).

Each row is composed alone, but choosing by error is not linear in the output:
applied to the guidance branches separately it is not the same as applied to their
combination (catlab's sampler applies it to the combination).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from catlab.capabilities import Capability
from catlab.reuse.base import reuses
from catlab.reuse.rules import Taylor, _as_indices


@reuses.register("best_order")
@dataclass
class BestOrder(Taylor):
    """Per token, the Newton forecast of order 0, 1 or 2 whose recent errors were smallest.

    ``order`` is the highest order tried (1 or 2); ``decay`` the weight of older errors
    in each order's running error (0: the latest error alone).
    """

    #: not ROW_WISE: each guidance branch would choose its own order per token, so composing the
    #: stacked rows and then combining them is not composing the combined output; it runs on the latter
    capabilities: ClassVar[Capability] = Capability.NONE

    order: int = 2
    decay: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.order not in (1, 2):
            raise ValueError(f"best_order reuse: order must be 1 or 2 (the highest order tried); got {self.order}")
        if not 0.0 <= float(self.decay) < 1.0:
            raise ValueError(f"best_order reuse: decay must be in [0, 1); got {self.decay}")

    def reset(self, batch, num_tokens, channels, device="cpu", dtype=torch.float32):
        super().reset(batch, num_tokens, channels, device, dtype)
        #: each token's running error of each order, (B, N, order + 1); inf: not measured yet
        self.errors = torch.full((batch, num_tokens, self.order + 1), float("inf"), device=device)

    def forecasts(self, t: float) -> torch.Tensor:
        """Every token's forecasts at ``t`` of each order 0..``order``, ``(B, N, order + 1, C)``.

        An order the token's history is too short for repeats the highest it has.
        """
        y, ts, n = self.values, self.times, self.count
        dtype = y.dtype
        dt = t - ts[..., 0]
        if self.max_horizon is not None:
            dt = dt.clamp(max=float(self.max_horizon))
        outs = [y[:, :, 0]]
        h01 = (ts[..., 0] - ts[..., 1]).where(n >= 2, torch.ones_like(dt))
        d1 = (y[:, :, 0] - y[:, :, 1]) / h01[..., None].to(dtype)
        outs.append(outs[0] + (dt * (n >= 2))[..., None].to(dtype) * d1)
        if self.order >= 2:
            h12 = (ts[..., 1] - ts[..., 2]).where(n >= 3, torch.ones_like(dt))
            h02 = (ts[..., 0] - ts[..., 2]).where(n >= 3, torch.ones_like(dt))
            d2 = (d1 - (y[:, :, 1] - y[:, :, 2]) / h12[..., None].to(dtype)) / h02[..., None].to(dtype)
            w = dt * (dt + ts[..., 0] - ts[..., 1]) * (n >= 3)
            outs.append(outs[1] + w[..., None].to(dtype) * d2)
        return torch.stack(outs, dim=2)

    def choice(self) -> torch.Tensor:
        """Each token's order, ``(B, N)``: least running error; unscored: order 1 or what its history allows."""
        default = (self.count - 1).clamp(min=0, max=1)
        scored = torch.isfinite(self.errors).any(dim=-1)
        return torch.where(scored, self.errors.argmin(dim=-1), default)

    def _score(self, output: torch.Tensor, idx: torch.Tensor, t: float) -> None:
        """Before the fresh values enter the history: how far each order's forecast of them was."""
        b, k = idx.shape
        m, c = self.order + 1, output.shape[-1]
        guess = self.forecasts(t).gather(1, idx[:, :, None, None].expand(b, k, m, c))
        fresh = output.gather(1, idx[..., None].expand(b, k, c)).to(guess.dtype)
        err = (guess - fresh[:, :, None]).norm(dim=-1).float()  # (B, k, m)
        # an order the history cannot make yet is not scored (it equals a lower one)
        have = self.count.gather(1, idx)[..., None] > torch.arange(m, device=idx.device)
        have &= self.count.gather(1, idx)[..., None] >= 1
        old = self.errors.gather(1, idx[..., None].expand(b, k, m))
        new = torch.where(torch.isfinite(old), self.decay * old + (1 - self.decay) * err, err)
        self.errors.scatter_(1, idx[..., None].expand(b, k, m), torch.where(have, new, old))

    def compose(self, step, output, indices, time=None):
        t = float(step if time is None else time)
        b, n, c = output.shape
        idx = _as_indices(indices, b, n, output.device)
        if idx.shape[1]:
            self._score(output, idx, t)
            self._push(output, idx, t)
        pick = self.choice()[:, :, None, None].expand(b, n, 1, c)
        composed = self.forecasts(t).gather(2, pick)[:, :, 0].to(output.dtype)
        if idx.shape[1]:
            index = idx[..., None].expand(-1, -1, c)
            composed = composed.scatter(1, index, output.gather(1, index))
        return composed
