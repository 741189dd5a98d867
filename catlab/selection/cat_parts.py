"""What the CAT-style selectors (``cat``, ``cat_rankmix``) share: their four parts, built and reset.

Both are made of a noise scorer, a staleness tracker, a clusterer and a cluster pooling
(component configs or built objects, fields of the subclass). This base builds them
once and starts each generation the same way: a seeded generator on the device, the
scorer told where pruning starts, the staleness counters cleared, no clusters yet.
"""

from __future__ import annotations

import torch

from catlab.grid import Grid, grid_tokens
from catlab.registry import clusterers, poolings, scorers, stalenesses
from catlab.selection.base import Policy, build_part
from catlab.selection.ranking import device_generator


class CatParts(Policy):
    """A selector with ``scorer``, ``staleness``, ``clusterer`` and ``pooling`` fields (see the module docstring)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scorer = build_part(scorers, self.scorer)
        self.staleness = build_part(stalenesses, self.staleness)
        self.clusterer = build_part(clusterers, self.clusterer)
        self.pooling = build_part(poolings, self.pooling)

    def reset(self, batch_size: int, grid: Grid, num_steps: int, device: torch.device) -> None:
        super().reset(batch_size, grid, num_steps, device)
        self.generator = device_generator(self.seed, device)
        self.scorer.reset(self.start_step)
        self.staleness.reset(batch_size, grid_tokens(grid), device, self.generator)
        self.labels: torch.Tensor | None = None  # (B, N) cluster of each token, from the first pruned step
        self._macs = 0
