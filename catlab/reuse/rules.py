"""The reuse rules: ``copy`` (the last computed value) and ``taylor`` (a per-token forecast).

``taylor`` keeps, per token, its last ``order + 1`` computed outputs and the times
they were computed at, and extrapolates with Newton's divided differences, so the
irregular gaps between a token's refreshes are taken into account::

    f(t) ≈ y0 + [y0, y1]·(t − t0) + [y0, y1, y2]·(t − t0)(t − t1)

(y0 the newest value, at t0). Tokens with a shorter history use the orders they
have. Everything is batched over tokens: one gather/scatter per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catlab.reuse.base import Reuse, reuses


def _as_indices(indices: torch.Tensor | None, batch: int, n: int, device) -> torch.Tensor:
    if indices is None:
        return torch.arange(n, device=device).expand(batch, n)
    return indices.to(device).long()


@reuses.register("copy")
@dataclass
class Copy(Reuse):
    """An unselected token keeps the output it had the last time it was computed (CAT Pruning's rule)."""

    def reset(self, batch, num_tokens, channels, device="cpu", dtype=torch.float32):
        self.last: torch.Tensor | None = None

    def compose(self, step, output, indices, time=None):
        if indices is None or getattr(self, "last", None) is None:
            if indices is not None and indices.shape[1] < output.shape[1]:
                raise RuntimeError("copy reuse: a pruned step needs a full step before it")
            self.last = output.clone()
            return self.last
        index = indices.long()[..., None].expand(-1, -1, output.shape[-1])
        self.last = self.last.scatter(1, index, output.gather(1, index).to(self.last.dtype))
        return self.last


@reuses.register("taylor")
@dataclass
class Taylor(Reuse):
    """Forecast each unselected token with a Newton polynomial through its last ``order + 1`` computations.

    ``max_horizon`` caps how far past a token's last computation the polynomial is
    followed (in time units); beyond it the forecast is held, so a token that is
    rarely refreshed does not run away. ``None``: no cap.

    ``partial`` says what a partly computed step's fresh tokens do: ``"push"`` (default)
    makes them the newest node of their histories; ``"output"`` uses them in this
    step's output only, and the histories keep the nodes of full steps. A token
    computed at a pruned step reads the others' stale keys and values, so its value is
    close but not exact; pushed one step from a full one, that error enters the
    divided difference divided by a one-step gap.
    """

    order: int = 1
    max_horizon: float | None = None
    partial: str = "push"

    def __post_init__(self) -> None:
        if self.order not in (0, 1, 2):
            raise ValueError(f"taylor reuse: order must be 0, 1 or 2; got {self.order}")
        if self.partial not in ("push", "output"):
            raise ValueError(f"taylor reuse: partial must be 'push' or 'output'; got {self.partial!r}")

    def reset(self, batch, num_tokens, channels, device="cpu", dtype=torch.float32):
        m = self.order + 1
        #: per token, newest first: values (B, N, m, C), times (B, N, m), how many are valid (B, N)
        self.values = torch.zeros(batch, num_tokens, m, channels, device=device, dtype=dtype)
        self.times = torch.zeros(batch, num_tokens, m, device=device, dtype=torch.float64)
        self.count = torch.zeros(batch, num_tokens, device=device, dtype=torch.long)

    def _push(self, output: torch.Tensor, idx: torch.Tensor, t: float) -> None:
        """Make the fresh outputs at ``idx`` the newest history entry of their tokens."""
        b, k = idx.shape
        m, c = self.values.shape[2], self.values.shape[3]
        vi = idx[:, :, None, None].expand(b, k, m, c)
        old = self.values.gather(1, vi)
        fresh = output.gather(1, idx[..., None].expand(b, k, c)).to(self.values.dtype)
        self.values.scatter_(1, vi, torch.cat([fresh[:, :, None], old[:, :, :-1]], dim=2))
        ti = idx[..., None].expand(b, k, m)
        old_t = self.times.gather(1, ti)
        new_t = torch.cat([torch.full_like(old_t[..., :1], t), old_t[..., :-1]], dim=2)
        self.times.scatter_(1, ti, new_t)
        self.count.scatter_(1, idx, (self.count.gather(1, idx) + 1).clamp(max=m))

    def forecast(self, t: float) -> torch.Tensor:
        """Every token's Newton polynomial evaluated at ``t``, ``(B, N, C)``."""
        y, ts, n = self.values, self.times, self.count
        dtype = y.dtype
        dt = t - ts[..., 0]
        if self.max_horizon is not None:
            dt = dt.clamp(max=float(self.max_horizon))
        out = y[:, :, 0].clone()
        if self.order >= 1:
            h01 = (ts[..., 0] - ts[..., 1]).where(n >= 2, torch.ones_like(dt))
            d1 = (y[:, :, 0] - y[:, :, 1]) / h01[..., None].to(dtype)
            out += (dt * (n >= 2))[..., None].to(dtype) * d1
            if self.order >= 2:
                h12 = (ts[..., 1] - ts[..., 2]).where(n >= 3, torch.ones_like(dt))
                h02 = (ts[..., 0] - ts[..., 2]).where(n >= 3, torch.ones_like(dt))
                d1b = (y[:, :, 1] - y[:, :, 2]) / h12[..., None].to(dtype)
                d2 = (d1 - d1b) / h02[..., None].to(dtype)
                w = dt * (dt + ts[..., 0] - ts[..., 1]) * (n >= 3)  # (t − t0)(t − t1)
                out += w[..., None].to(dtype) * d2
        return out

    def compose(self, step, output, indices, time=None):
        """Push the fresh tokens into their histories, forecast the rest (no host sync).

        A token never computed yet forecasts to zero: run a full step first.
        """
        t = float(step if time is None else time)
        b, n, _ = output.shape
        idx = _as_indices(indices, b, n, output.device)
        if idx.shape[1] and (self.partial == "push" or idx.shape[1] == n):
            self._push(output, idx, t)
        composed = self.forecast(t).to(output.dtype)
        if idx.shape[1]:  # the fresh tokens: exactly what was computed
            index = idx[..., None].expand(-1, -1, output.shape[-1])
            composed = composed.scatter(1, index, output.gather(1, index))
        return composed
