"""Ablation baselines of CAT Pruning (paper Sec. 2.3–2.4, Figures 3–5).

``sequential`` walks the grid in consecutive rows; ``noise`` keeps only the
exploitation part (top relative noise); ``noise_staleness`` adds the exploration
part but no clustering. Only ``sequential`` knows the grid's shape; the others rank
tokens, so they serve a video grid (every token of the clip) as they serve an image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from catlab.grid import Grid, as_video, grid_tokens
from catlab.registry import scorers, selectors, stalenesses
from catlab.selection.base import Policy, StepState, build_part
from catlab.selection.ranking import device_generator, first_k_unchosen, top_k


@selectors.register("sequential")
@dataclass
class Sequential(Policy):
    """Consecutive tokens in raster order (whole rows when k is a multiple of the width).

    Step t0+1 takes tokens 0..k−1, the next step the k after them, wrapping around
    the grid; every sample gets the same tokens. On a video grid the next rows are the
    next rows of every frame: the walk visits each position of a frame in raster order
    and, at each position, every frame (frame-interleaved), so a step takes the same band
    of rows in each frame (⌊k/frames⌋ or ⌈k/frames⌉ tokens per frame) and the band moves
    down the frames together. On an image (one frame) this is the raster walk.
    """

    def reset(self, batch_size: int, grid: Grid, num_steps: int, device: torch.device) -> None:
        super().reset(batch_size, grid, num_steps, device)
        self.offset = 0

    def select(self, state: StepState) -> torch.Tensor:
        frames, h, w = as_video(state.grid)
        walk = (self.offset + torch.arange(state.k, device=state.device)) % state.num_tokens
        self.offset = (self.offset + state.k) % state.num_tokens
        if frames > 1:  # walk position m: frame m % frames, position m // frames inside it
            walk = (walk % frames) * (h * w) + walk // frames
        return walk.expand(state.batch_size, -1)


@dataclass
class _Scored(Policy):
    """A policy with a relative-noise scorer fed by :meth:`observe`."""

    scorer: Any = field(default_factory=lambda: {"name": "relative_noise"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scorer = build_part(scorers, self.scorer)

    def reset(self, batch_size: int, grid: Grid, num_steps: int, device: torch.device) -> None:
        super().reset(batch_size, grid, num_steps, device)
        self.generator = device_generator(self.seed, device)
        self.scorer.reset(self.start_step)

    def observe(self, step: int, output: torch.Tensor, indices: torch.Tensor | None) -> None:
        self.scorer.observe(step, output)

    def score(self, state: StepState) -> torch.Tensor:
        return self.scorer.score(state.output, (state.batch_size, state.num_tokens), state.device)


@selectors.register("noise")
@dataclass
class Noise(_Scored):
    """The k tokens of largest relative noise (exploitation only; paper Fig. 3)."""

    def select(self, state: StepState) -> torch.Tensor:
        return top_k(self.score(state), state.k, self.generator)


@selectors.register("noise_staleness")
@dataclass
class NoiseStaleness(_Scored):
    """Top relative noise for ``1 − staleness_share`` of the budget, the stalest tokens for the rest (Fig. 4)."""

    staleness: Any = field(default_factory=lambda: {"name": "ewma"})
    staleness_share: float = 0.75

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.staleness_share) <= 1.0:
            raise ValueError(f"staleness_share must be in [0, 1]; got {self.staleness_share}")
        self.staleness = build_part(stalenesses, self.staleness)

    def reset(self, batch_size: int, grid: Grid, num_steps: int, device: torch.device) -> None:
        super().reset(batch_size, grid, num_steps, device)
        self.staleness.reset(batch_size, grid_tokens(grid), device, self.generator)

    def observe(self, step: int, output: torch.Tensor, indices: torch.Tensor | None) -> None:
        super().observe(step, output, indices)
        self.staleness.update(indices)

    def select(self, state: StepState) -> torch.Tensor:
        by_noise = top_k(self.score(state), state.k - round(self.staleness_share * state.k), self.generator)
        chosen = torch.zeros(state.batch_size, state.num_tokens, dtype=torch.bool, device=state.device)
        chosen.scatter_(1, by_noise, True)
        return first_k_unchosen(self.staleness.order(), chosen, state.k)
