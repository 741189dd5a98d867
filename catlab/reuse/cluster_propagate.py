"""``cluster_propagate``: ClusCa's reuse rule (Zheng et al., 2025): a Taylor forecast whose base value each
computed token moves for its whole cluster.

At a full step the rule stores TaylorSeer's factors of every token's output: the
value ``f0`` and finite differences ``f1, f2, ...`` (``f_{i+1} = (f_i(new) − f_i(old)) /
gap``, with ``gap`` the distance between the last two full steps). At the first
cached step after a full step it clusters the tokens by that step's output
(:class:`TokenClusters`: k-means with the L1 distance, warm-started from the previous
centroids, one cluster per token the step computes). At a cached step, each computed
token replaces its own ``f0`` and pulls the ``f0`` of every token of its cluster
towards it, ``f0 ← ratio · computed + (1 − ratio) · f0`` (the change persists, as in the
authors' cache); every other token is then forecast as
``Σ f_i · d^i / i!`` with ``d`` the distance to the last full step. ``ratio = 0`` is
plain TaylorSeer with the computed tokens written into the cache.

The selector ``clusca`` (``catlab/selection/clusca.py``) clusters the same output the
same way, so both see the same clusters; the rule runs after guidance in catlab's
sampler (k-means is not linear in the rows), or on a guidance-distilled model's rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from catlab.capabilities import Capability
from catlab.reuse.base import Reuse, reuses


def kmeans_l1(x: torch.Tensor, centroids: torch.Tensor, max_iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's iterations with the L1 distance: ``x (B, N, D)``, ``centroids (B, K, D)`` → labels, centroids.

    A cluster without tokens gets a zero centroid. Stops when the new centroids are within
    ``rtol=1e-4`` of the old ones (returning the old ones, which the labels were assigned
    with) or after ``max_iters`` (returning the last update).
    """
    b, _, d = x.shape
    k = centroids.shape[1]
    labels = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
    for _ in range(int(max_iters)):
        labels = torch.cdist(x, centroids, p=1).argmin(dim=-1)
        members = labels[..., None].expand(-1, -1, d)
        sums = torch.zeros(b, k, d, dtype=x.dtype, device=x.device).scatter_add(1, members, x)
        counts = torch.zeros(b, k, dtype=x.dtype, device=x.device).scatter_add(1, labels, torch.ones_like(x[..., 0]))
        updated = sums / (counts + 1e-8)[..., None]
        if torch.allclose(centroids, updated, rtol=1e-4):
            break
        centroids = updated
    return labels, centroids


class TokenClusters:
    """Token → cluster of a full step's output, k-means (L1) warm-started from the previous clustering.

    The first clustering of a generation starts from ``num_clusters`` token rows drawn with
    replacement from a generator seeded with ``seed``, so two holders with the same seed
    that cluster the same outputs agree.
    """

    def __init__(self, seed: int = 0, max_iters: int = 100):
        self.seed, self.max_iters = int(seed), int(max_iters)
        self.reset()

    def reset(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        self.centroids: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    def fit(self, x: torch.Tensor, num_clusters: int) -> torch.Tensor:
        """Cluster ``x (B, N, D)`` into ``num_clusters``; returns labels ``(B, N)``."""
        b, n, _ = x.shape
        x = x.float()
        if self.centroids is None or self.centroids.shape[:2] != (b, num_clusters):
            rows = torch.randint(0, n, (b, num_clusters), generator=self.generator).to(x.device)
            self.centroids = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
        self.labels, self.centroids = kmeans_l1(x, self.centroids, self.max_iters)
        return self.labels


def propagate(
    base: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, computed: torch.Tensor, ratio: float
) -> torch.Tensor:
    """``base (B, N, C)`` with the ``computed (B, k, C)`` values written at ``indices`` and mixed into their clusters.

    Every token moves to ``ratio · m + (1 − ratio) · base`` where ``m`` is the mean of its cluster's
    computed values (one computed token per cluster: that token's value); a cluster without a
    computed token keeps its values.
    """
    c = base.shape[-1]
    num_clusters = int(labels.max()) + 1 if labels.numel() else 0
    num_clusters = max(num_clusters, int(indices.shape[1]))
    base = base.scatter(1, indices[..., None].expand(-1, -1, c), computed.to(base.dtype))
    owner = labels.gather(1, indices)
    sums = torch.zeros(base.shape[0], num_clusters, c, dtype=torch.float32, device=base.device)
    sums = sums.scatter_add(1, owner[..., None].expand(-1, -1, c), computed.float())
    counts = torch.zeros(base.shape[0], num_clusters, device=base.device).scatter_add(
        1, owner, torch.ones_like(owner, dtype=torch.float32)
    )
    means = sums / counts.clamp(min=1.0)[..., None]
    spread = means.gather(1, labels[..., None].expand(-1, -1, c)).to(base.dtype)
    picked = counts.gather(1, labels)[..., None] > 0  # a cluster no computed token fell into keeps its values
    return torch.where(picked, spread * ratio + base * (1 - ratio), base)


@reuses.register("cluster_propagate")
@dataclass
class ClusterPropagate(Reuse):
    """TaylorSeer factors per token; computed tokens move their cluster's base value by ``propagation_ratio``.

    ``order``: the highest finite difference kept (the authors' ``max_order``; FLUX 1, DiT 4).
    ``seed`` and ``max_iters`` must match the selector's (``clusca``) so both cluster alike.
    """

    capabilities = Capability.NONE  # k-means is not row-wise: after guidance only
    propagation_ratio: float = 0.005
    order: int = 1
    seed: int = 0
    max_iters: int = 100

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.propagation_ratio) <= 1.0:
            raise ValueError(f"cluster_propagate: propagation_ratio must be in [0, 1]; got {self.propagation_ratio}")
        if int(self.order) < 0:
            raise ValueError(f"cluster_propagate: order must be >= 0; got {self.order}")

    def reset(self, batch, num_tokens, channels, device="cpu", dtype=torch.float32):
        self.factors: list[torch.Tensor] = []
        self.full_time: float | None = None
        self.full_output: torch.Tensor | None = None
        self.clusters = TokenClusters(self.seed, self.max_iters)
        self.clustered = False

    def forecast(self, t: float) -> torch.Tensor:
        d = t - self.full_time
        out = self.factors[0].clone()
        for i, f in enumerate(self.factors[1:], start=1):
            out = out + f * (d**i / math.factorial(i))
        return out

    def compose(self, step, output, indices, time=None):
        t = float(step if time is None else time)
        n = output.shape[1]
        if indices is None or indices.shape[1] == n:
            new = [output.clone()]
            if self.factors and self.full_time is not None and t != self.full_time:
                gap = t - self.full_time
                for i in range(min(int(self.order), len(self.factors))):
                    new.append((new[i] - self.factors[i]) / gap)
            self.factors, self.full_time, self.full_output, self.clustered = new, t, output, False
            return output
        if not self.factors:
            raise RuntimeError("cluster_propagate: a cached step needs a full step before it")
        if indices.shape[1]:
            if not self.clustered:  # one cluster per token a cached step computes
                self.clusters.fit(self.full_output, int(indices.shape[1]))
                self.clustered = True
            idx = indices.to(output.device).long()
            computed = output.gather(1, idx[..., None].expand(-1, -1, output.shape[-1]))
            self.factors[0] = propagate(
                self.factors[0], self.clusters.labels, idx, computed, float(self.propagation_ratio)
            )
        composed = self.forecast(t).to(output.dtype)
        if indices.shape[1]:
            index = indices.long()[..., None].expand(-1, -1, output.shape[-1])
            composed = composed.scatter(1, index, output.gather(1, index))
        return composed
