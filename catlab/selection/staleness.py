"""Staleness trackers: per-token state updated after each step (the exploration part).

A tracker exposes :meth:`order`, a ``(B, N)`` permutation listing the stalest
token first. Ties are broken by the steps since a token was last computed, then
at random, so they never favour one region of the image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from catlab.registry import stalenesses
from catlab.selection.ranking import order_by, random_keys


@dataclass
class _Tracker:
    """Common state: the steps since each token was last computed (its age)."""

    def reset(self, batch_size: int, num_tokens: int, device: torch.device, generator: torch.Generator | None = None
              ) -> None:
        self.generator = generator
        self.age = torch.zeros(batch_size, num_tokens, device=device)

    def update(self, indices: torch.Tensor | None) -> None:
        """Record one step; ``indices`` ``(B, k)`` were computed, ``None`` means all were."""
        self.age += 1
        if indices is None:
            self.age.zero_()
        else:
            self.age.scatter_(1, indices, 0.0)

    def _tie(self) -> torch.Tensor:
        return random_keys(tuple(self.age.shape), self.generator, self.age.device)


@stalenesses.register("ewma")
@dataclass
class EwmaStaleness(_Tracker):
    """Exponentially weighted selection frequency (paper Eq. 1–2): f ← a·f + I.

    ``f`` starts at zero and counts only the steps seen through :meth:`update`, so at
    the first pruned step f₀ = I₀. A full step adds 1 to every token, which shifts all
    frequencies equally and leaves the order unchanged. Low f = stale.
    """

    decay: float = 0.5

    def reset(self, batch_size: int, num_tokens: int, device: torch.device, generator: torch.Generator | None = None
              ) -> None:
        super().reset(batch_size, num_tokens, device, generator)
        self.frequency = torch.zeros(batch_size, num_tokens, device=device)

    def update(self, indices: torch.Tensor | None) -> None:
        super().update(indices)
        self.frequency.mul_(self.decay)
        if indices is None:
            self.frequency += 1.0
        else:
            self.frequency.scatter_add_(1, indices, torch.ones_like(indices, dtype=self.frequency.dtype))

    def order(self) -> torch.Tensor:
        return order_by(self.frequency, self.age, self._tie(), descending=(False, True, False))


@stalenesses.register("age")
@dataclass
class AgeStaleness(_Tracker):
    """Steps since a token was last computed; the oldest is the stalest (round-robin-like)."""

    def order(self) -> torch.Tensor:
        return order_by(self.age, self._tie(), descending=(True, False))
