"""``cat_rankmix``: catlab's first reading of CAT Pruning, kept as a variant of ``cat``.

It follows the paper's text (Algorithm 2, Sec. 2.2–2.4) where ``cat`` follows the
authors' code: clusters on RMS-normalised relative noise, a mean-of-neighbours
cluster pooling, per-cluster quotas of a share of each cluster, and a rank mix of
noise and staleness inside a cluster. At each pruned step:

1. score every token by its relative noise (``scorer``);
2. at the first pruned step only, cluster the tokens on relative noise plus a
   positional encoding (``clusterer``) and build the cluster graph (``pooling``);
3. rank the clusters by their pooled score; walk them best first, taking from
   each at most ``cluster_fraction`` of its tokens, ordered by relative noise
   balanced with staleness, until ``cluster_share`` of the budget is used;
4. fill the rest of the budget with the stalest tokens not yet chosen
   (``staleness``), so every token is recomputed within a bounded number of steps.

At the first pruned step every token was just computed, so staleness carries no
information: the whole budget goes through the clusters, by relative noise alone,
as in Algorithm 2. Everything is batched tensor work without host
synchronisation, except one read of the cluster count when the clusters are made.
On a video grid the clusters are made in space and time, as ``cat``'s are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from catlab.capabilities import Capability
from catlab.grid import Grid
from catlab.registry import selectors
from catlab.selection.base import StepState
from catlab.selection.cat_parts import CatParts
from catlab.selection.clustering import cluster_features
from catlab.selection.ranking import first_k_unchosen, order_by, random_keys, ranks_from_order


@selectors.register("cat_rankmix")
@dataclass
class CatRankMix(CatParts):
    """See the module docstring and ``docs/selection.md``.

    Its parts are its own: the top-level part groups (which hold ``cat``'s defaults) do
    not reach it; set them in its spec (``selector.clusterer.iters=10``, or
    ``{name: cat_rankmix, pooling: mean}`` in an experiment).

    ``scorer``, ``staleness``, ``clusterer`` and ``pooling`` are component configs
    (``{"name": ...}``) or built components. ``noise_weight`` weighs the relative
    noise against the positional encoding in the clustering features.
    """

    #: top-level part groups this selector takes (none: see the class docstring)
    group_parts: ClassVar[tuple[str, ...]] = ()
    #: one read of the cluster count when the clusters are made, at the first pruned step
    capabilities: ClassVar[Capability] = Capability.HOST_SETUP

    scorer: Any = field(default_factory=lambda: {"name": "relative_noise"})
    staleness: Any = field(default_factory=lambda: {"name": "ewma", "ties": "random"})
    clusterer: Any = field(default_factory=lambda: {"name": "kmeans", "per_tokens": 4096})
    pooling: Any = field(default_factory=lambda: {"name": "graph"})
    cluster_share: float = 0.25
    cluster_fraction: float = 0.5
    staleness_weight: float = 0.5
    noise_weight: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("cluster_share", "cluster_fraction", "staleness_weight"):
            if not 0.0 <= float(getattr(self, key)) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1]; got {getattr(self, key)}")

    def observe(self, step: int, output: torch.Tensor, indices: torch.Tensor | None) -> None:
        self.scorer.observe(step, output)
        self.staleness.update(indices)

    def select(self, state: StepState) -> torch.Tensor:
        shape = (state.batch_size, state.num_tokens)
        noise = self.scorer.features(state.output, shape, state.device)
        score = noise.norm(dim=-1)
        self._macs = score.numel() * noise.shape[-1]
        first = self.labels is None
        if first:
            self._make_clusters(noise, state.grid)
        share, weight = (1.0, 0.0) if first else (self.cluster_share, self.staleness_weight)
        stale = self.staleness.order()
        chosen = self._cluster_part(score, stale, round(share * state.k), weight)
        return first_k_unchosen(stale, chosen, state.k)

    def selection_macs(self, state: StepState) -> int:
        return self._macs

    def _make_clusters(self, noise: torch.Tensor, grid: Grid) -> None:
        features = cluster_features(noise, grid, self.noise_weight)
        labels = self.clusterer(features, grid, self.generator)
        self.num_clusters = int(labels.max()) + 1
        self.pooling.setup(labels, grid, self.num_clusters)
        self.sizes = torch.zeros(labels.shape[0], self.num_clusters, dtype=torch.long, device=labels.device)
        self.sizes.scatter_add_(1, labels, torch.ones_like(labels))
        self.labels = labels
        self._macs += self.clusterer.macs(*features.shape)

    def _cluster_part(self, score: torch.Tensor, stale: torch.Tensor, budget: int, weight: float) -> torch.Tensor:
        """``(B, N)`` bool: up to ``budget`` tokens from the best clusters, by noise and staleness."""
        b, n = score.shape
        c = self.num_clusters
        cluster_score = self.pooling(score)
        ties = random_keys((b, c), self.generator, score.device)
        cluster_order = order_by(cluster_score, ties, descending=(True, False))
        position = torch.arange(c, device=score.device).expand(b, -1)
        cluster_rank = torch.empty_like(cluster_order).scatter_(1, cluster_order, position)
        token_rank = cluster_rank.gather(1, self.labels)

        noise_order = order_by(score, random_keys((b, n), self.generator, score.device), descending=(True, False))
        priority = (1 - weight) * ranks_from_order(noise_order) + weight * ranks_from_order(stale)
        order = order_by(token_rank, priority)  # best cluster first, best token first inside it

        sizes = self.sizes.gather(1, cluster_order)
        starts = sizes.cumsum(1) - sizes
        quota = torch.ceil(self.cluster_fraction * sizes.float()).long()
        rank_in_order = token_rank.gather(1, order)
        within = torch.arange(n, device=score.device) - starts.gather(1, rank_in_order)
        eligible = within < quota.gather(1, rank_in_order)
        take = eligible & (eligible.cumsum(1) <= budget)
        return torch.zeros(b, n, dtype=torch.bool, device=score.device).scatter_(1, order, take)
