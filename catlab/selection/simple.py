"""The two simplest policies: every token (``full``) and uniformly random tokens (``random``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catlab.registry import selectors
from catlab.selection.base import Policy, StepState


@selectors.register("full")
@dataclass
class Full(Policy):
    """The unpruned model: every token at every step."""

    alpha: float = 1.0
    start_step: int = 0

    @property
    def prunes(self) -> bool:
        return False

    def select(self, state: StepState) -> torch.Tensor:
        raise RuntimeError("the full policy never prunes")


@selectors.register("random")
@dataclass
class Random(Policy):
    """k tokens drawn uniformly without replacement, independently per sample and step.

    Token-caching studies found random selection hard to beat, so it is a required
    baseline. Draws come from a seeded CPU generator, so runs are reproducible on any
    device.
    """

    def select(self, state: StepState) -> torch.Tensor:
        scores = torch.rand(state.batch_size, state.num_tokens, generator=self.generator)
        indices = scores.topk(state.k, dim=1).indices
        if state.device.type == "cuda":  # pinned + non-blocking: the copy does not wait for the GPU
            return indices.pin_memory().to(state.device, non_blocking=True)
        return indices.to(state.device)
