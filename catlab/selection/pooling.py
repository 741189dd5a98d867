"""Cluster poolings: one score per cluster from the tokens' signed relative noise.

:meth:`setup` is called once, when the clusters are made; it records which
cluster each token belongs to and which clusters touch on the token grid. Each
call then maps per-token features ``(B, N, D)`` (signed relative noise) to
cluster scores ``(B, C)`` (``-inf`` for an empty cluster); ``first`` is true at
the first pruned step, where the authors' code adds a graph step. The batch is
one graph of ``B·C`` nodes, sample ``b``'s cluster ``c`` being node ``b·C + c``.

Clusters touch where two of their tokens are grid neighbours (:func:`grid_edges`): on an image
up, down, left and right; on a video also the same position in the previous and next frame,
so a score flows between clusters over space and time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catlab.grid import Grid
from catlab.registry import poolings
from catlab.selection.clustering import grid_edges


def cluster_graph(labels: torch.Tensor, grid: Grid, num_clusters: int) -> torch.Tensor:
    """``(2, E)`` directed edges between distinct clusters that share a grid border, over ``B·C`` nodes."""
    from torch_geometric.utils import coalesce, to_undirected

    b = labels.shape[0]
    u, v = grid_edges(grid, labels.device)
    node = labels + num_clusters * torch.arange(b, device=labels.device)[:, None]
    src, dst = node[:, u].reshape(-1), node[:, v].reshape(-1)
    cross = src != dst
    edges = torch.stack([src[cross], dst[cross]])
    return coalesce(to_undirected(edges, num_nodes=b * num_clusters), num_nodes=b * num_clusters)


@dataclass
class _Pooling:
    def setup(self, labels: torch.Tensor, grid: Grid, num_clusters: int) -> None:
        b = labels.shape[0]
        self.num_clusters = num_clusters
        self.node = (labels + num_clusters * torch.arange(b, device=labels.device)[:, None]).reshape(-1)
        self.sizes = torch.zeros(b * num_clusters, device=labels.device).index_add_(
            0, self.node, torch.ones_like(self.node, dtype=torch.float32)
        )

    def mean(self, scores: torch.Tensor) -> torch.Tensor:
        """Mean token score per cluster node, ``(B·C,)``; 0 for an empty cluster."""
        sums = torch.zeros_like(self.sizes).index_add_(0, self.node, scores.reshape(-1).float())
        return sums / self.sizes.clamp_min(1)

    def _shape(self, pooled: torch.Tensor) -> torch.Tensor:
        pooled = pooled.masked_fill(self.sizes == 0, float("-inf"))
        return pooled.view(-1, self.num_clusters)


def _norms(features: torch.Tensor) -> torch.Tensor:
    """Token scores ``(B, N)``: the L2 norm of ``(B, N, D)`` features (scores pass through)."""
    return features.float().norm(dim=-1) if features.dim() == 3 else features.float()


@poolings.register("mean")
@dataclass
class MeanPooling(_Pooling):
    """A cluster's score is the mean relative-noise norm of its tokens; neighbours play no part."""

    def __call__(self, features: torch.Tensor, first: bool = False) -> torch.Tensor:
        return self._shape(self.mean(_norms(features)))


@poolings.register("graph")
@dataclass
class GraphPooling(_Pooling):
    """Mean token norm per cluster, then ``hops`` fixed message-passing steps on the cluster graph.

    Each step sets a cluster's score to ``(1 − neighbor_weight)·own +
    neighbor_weight·mean(neighbours)``, at every pruned step. A cluster with no
    neighbours keeps its own score. Token norms are pooled, not signed channels,
    so opposite changes inside one cluster do not cancel or inflate each other.
    """

    neighbor_weight: float = 0.5
    hops: int = 1

    def __post_init__(self) -> None:
        import torch_geometric.utils  # noqa: F401  (slow first import: pay it when built, not while sampling)

    def setup(self, labels: torch.Tensor, grid: Grid, num_clusters: int) -> None:
        super().setup(labels, grid, num_clusters)
        self.edges = cluster_graph(labels, grid, num_clusters)
        self.has_neighbors = torch.zeros_like(self.sizes, dtype=torch.bool)
        self.has_neighbors[self.edges[1]] = True

    def __call__(self, features: torch.Tensor, first: bool = False) -> torch.Tensor:
        from torch_geometric.utils import scatter

        x = self.mean(_norms(features))
        for _ in range(self.hops):
            src, dst = self.edges
            neighbors = scatter(x[src], dst, dim=0, dim_size=x.shape[0], reduce="mean")
            mixed = (1 - self.neighbor_weight) * x + self.neighbor_weight * neighbors
            x = torch.where(self.has_neighbors, mixed, x)
        return self._shape(x)


@poolings.register("channel_max")
@dataclass
class ChannelMaxPooling(_Pooling):
    """The authors' pooling: the signed maximum of each channel over a cluster's tokens, then the L2 norm.

    At the first pruned step (``graph_at_first``) one fixed graph convolution runs
    on the pooled channels before the norm: each cluster takes mean + sum + max over
    itself and the clusters touching it on the token grid — the paper's
    "non-trainable graph pooling layer", as the authors' parameter-free ``SimpleConv``
    computes it (it names the aggregations mean, mean and max, summed, with self
    loops; torch_geometric's fused aggregation returns the sum for the repeated
    mean). Later steps pool without it. An empty cluster pools to 0. Dense
    ``(B, C, C)`` adjacency: no host sync per step.
    """

    graph_at_first: bool = True

    def setup(self, labels: torch.Tensor, grid: Grid, num_clusters: int) -> None:
        super().setup(labels, grid, num_clusters)
        b, c = labels.shape[0], num_clusters
        self.labels = labels
        if self.graph_at_first:
            src, dst = cluster_graph(labels, grid, c)
            adjacency = torch.zeros(b * c, c, dtype=torch.bool, device=labels.device)
            adjacency[dst, src % c] = True  # node dst receives from src (the same sample: edges never cross)
            self.adjacency = adjacency.view(b, c, c) | torch.eye(c, dtype=torch.bool, device=labels.device)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, C, D)``: each channel's signed maximum over the cluster's tokens (0 for an empty cluster).

        ``(B, N)`` scores pool as one channel."""
        if features.dim() == 2:
            features = features[..., None]
        b, n, d = features.shape
        out = torch.zeros(b, self.num_clusters, d, device=features.device, dtype=torch.float32)
        index = self.labels[..., None].expand(-1, -1, d)
        return out.scatter_reduce_(1, index, features.float(), reduce="amax", include_self=False)

    def __call__(self, features: torch.Tensor, first: bool = False) -> torch.Tensor:
        x = self.pooled(features)
        if first and self.graph_at_first:
            a = self.adjacency.to(x.dtype)  # (B, C, C), self loops included
            total = a @ x
            peak = x[:, None, :, :].masked_fill(~self.adjacency[..., None], float("-inf")).amax(2)
            x = total / a.sum(-1, keepdim=True) + total + peak
        return self._shape(x.norm(dim=-1).reshape(-1))
