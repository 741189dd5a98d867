"""Staleness trackers: per-token state updated after each step (the exploration part).

A tracker exposes :meth:`order`, a ``(B, N)`` permutation listing the stalest
token first. Equal staleness is broken by ``ties``: ``"index"`` (the lowest token
index first, the authors' CAT code) or ``"random"`` (by the steps since a token was
last computed, then a seeded draw, so no region of the image is favoured).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catlab.registry import stalenesses
from catlab.selection.ranking import order_by, random_keys

TIES = ("index", "random")


@dataclass
class _Tracker:
    """Common state: the steps since each token was last computed (its age), and the tie rule."""

    ties: str = "index"

    def __post_init__(self) -> None:
        if self.ties not in TIES:
            name = getattr(type(self), "registered_name", "staleness")
            raise ValueError(f"{name}: ties must be one of {TIES}; got {self.ties!r}")

    def reset(
        self, batch_size: int, num_tokens: int, device: torch.device, generator: torch.Generator | None = None
    ) -> None:
        self.generator = generator
        self.age = torch.zeros(batch_size, num_tokens, device=device)

    def update(self, computed: torch.Tensor | None) -> None:
        """Record one step. ``computed``: ``(B, k)`` indices, or a ``(B, N)`` bool mask of the
        tokens to count as computed; ``None`` means all were."""
        self.age += 1
        if computed is None:
            self.age.zero_()
        else:
            self.age.masked_fill_(self._mask(computed), 0.0)

    def _mask(self, computed: torch.Tensor) -> torch.Tensor:
        if computed.dtype == torch.bool:
            return computed
        return torch.zeros_like(self.age, dtype=torch.bool).scatter_(1, computed, True)

    def _order(self, *keys: torch.Tensor, descending: tuple[bool, ...]) -> torch.Tensor:
        """Stalest first by ``keys``; remaining ties by index (a stable sort) or by age, then at random."""
        if self.ties == "index":
            return order_by(*keys, descending=descending)
        tie = random_keys(tuple(self.age.shape), self.generator, self.age.device)
        return order_by(*keys, self.age, tie, descending=(*descending, True, False))


@stalenesses.register("ewma")
@dataclass
class EwmaStaleness(_Tracker):
    """Exponentially weighted selection frequency (paper Eq. 1–2): f ← a·f + I.

    ``f`` starts at zero and counts only the steps seen through :meth:`update`. A full
    step adds 1 to every token, which shifts all frequencies equally and leaves the
    order unchanged, so the order at a later step is the authors' (whose f starts at the
    second pruned step as the indicator of the first). Low f = stale.
    """

    decay: float = 0.5

    def reset(
        self, batch_size: int, num_tokens: int, device: torch.device, generator: torch.Generator | None = None
    ) -> None:
        super().reset(batch_size, num_tokens, device, generator)
        self.frequency = torch.zeros(batch_size, num_tokens, device=device)

    def update(self, computed: torch.Tensor | None) -> None:
        super().update(computed)
        self.frequency.mul_(self.decay)
        if computed is None:
            self.frequency += 1.0
        else:
            self.frequency += self._mask(computed).to(self.frequency.dtype)

    def order(self) -> torch.Tensor:
        return self._order(self.frequency, descending=(False,))


@stalenesses.register("age")
@dataclass
class AgeStaleness(_Tracker):
    """Steps since a token was last computed; the oldest is the stalest (round-robin-like)."""

    def order(self) -> torch.Tensor:
        return self._order(self.age, descending=(True,))
