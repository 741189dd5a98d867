"""``clusca``: cluster-wise caching (ClusCa, Zheng et al., 2025) as a catlab selector.

ClusCa runs TaylorSeer's schedule (``start_step`` full steps, then one full step every
``interval`` steps) and at each cached step computes one token per cluster of the
last full step's tokens, chosen at random inside its cluster; the reuse rule
``cluster_propagate`` forecasts the others and propagates each computed token's
value to its cluster. The number of clusters is the step's budget,
``k = ⌊α·N⌋`` (the authors' 16 clusters of FLUX's 4096 tokens at 1024² are
``alpha = 1/256``). Clusters: k-means with the L1 distance on the full step's output,
warm-started from the previous clustering (:class:`~catlab.reuse.cluster_propagate.TokenClusters`,
the same seed as the rule's, so both hold the same clusters). A cluster left empty by
k-means gives its pick to a random token of another cluster, so every step computes
exactly ``k`` distinct tokens. See docs/selection.md (ClusCa)::

    python -m catlab.run selector=clusca reuse=cluster_propagate
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catlab.registry import selectors
from catlab.reuse.cluster_propagate import TokenClusters
from catlab.selection.base import Policy, StepState, kept_tokens


def one_per_cluster(labels: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, k)`` distinct tokens: a uniformly random member of each non-empty cluster, then random others."""
    b, n = labels.shape
    key = torch.rand(b, n, generator=generator).to(labels.device)
    best = torch.full((b, k), -1.0, device=labels.device).scatter_reduce(1, labels, key, "amax")
    chosen = key == best.gather(1, labels)
    return (chosen.float() * 2.0 + key).topk(k, dim=1).indices


@selectors.register("clusca")
@dataclass
class ClusCa(Policy):
    """One token per cluster at the cached steps; full steps on TaylorSeer's fixed interval."""

    alpha: float = 0.00390625
    start_step: int = 3
    interval: int = 5
    max_iters: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.interval) < 1:
            raise ValueError(f"clusca: interval must be >= 1 (1: every step full); got {self.interval}")

    @property
    def prunes(self) -> bool:
        return int(self.interval) > 1

    def reset(self, batch_size, grid, num_steps, device) -> None:
        super().reset(batch_size, grid, num_steps, device)
        self.clusters = TokenClusters(self.seed, self.max_iters)
        self.full_output: torch.Tensor | None = None
        self.clustered = False

    def num_kept(self, step: int, num_tokens: int) -> int | None:
        if not self.prunes or step <= self.start_step or (step - self.start_step) % int(self.interval) == 0:
            return None
        return kept_tokens(self.alpha, num_tokens)

    def select(self, state: StepState) -> torch.Tensor:
        if self.full_output is None:
            raise RuntimeError("clusca needs a full step before it selects")
        if not self.clustered:
            self.clusters.fit(self.full_output, state.k)
            self.clustered = True
        return one_per_cluster(self.clusters.labels, state.k, self.generator).to(state.device)

    def observe(self, step, output, indices) -> None:
        if indices is None:
            self.full_output, self.clustered = output, False
