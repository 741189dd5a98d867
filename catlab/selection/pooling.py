"""Cluster poolings: one score per cluster from per-token scores.

:meth:`setup` is called once, when the clusters are made; it records which
cluster each token belongs to and, for ``graph``, which clusters touch on the
token grid. Each call then maps token scores ``(B, N)`` to cluster scores
``(B, C)`` (``-inf`` for an empty cluster). The batch is one graph of ``B·C``
nodes, sample ``b``'s cluster ``c`` being node ``b·C + c``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from catlab.registry import poolings
from catlab.selection.clustering import grid_edges


def cluster_graph(labels: torch.Tensor, grid: tuple[int, int], num_clusters: int) -> torch.Tensor:
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
    def setup(self, labels: torch.Tensor, grid: tuple[int, int], num_clusters: int) -> None:
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


@poolings.register("mean")
@dataclass
class MeanPooling(_Pooling):
    """A cluster's score is the mean score of its tokens; neighbours play no part."""

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return self._shape(self.mean(scores))


@poolings.register("graph")
@dataclass
class GraphPooling(_Pooling):
    """Mean token score per cluster, then ``hops`` fixed message-passing steps on the cluster graph.

    Each step sets a cluster's score to ``(1 − neighbor_weight)·own +
    neighbor_weight·mean(neighbours)`` (paper Sec. 2.4: a light, non-trainable graph
    pooling layer so a cluster's value reflects its surroundings). A cluster with no
    neighbours keeps its own score. Token norms are pooled, not signed channels,
    so opposite changes inside one cluster do not cancel or inflate each other.
    """

    neighbor_weight: float = 0.5
    hops: int = 1

    def __post_init__(self) -> None:
        import torch_geometric.utils  # noqa: F401  (slow first import: pay it when built, not while sampling)

    def setup(self, labels: torch.Tensor, grid: tuple[int, int], num_clusters: int) -> None:
        super().setup(labels, grid, num_clusters)
        self.edges = cluster_graph(labels, grid, num_clusters)
        self.has_neighbors = torch.zeros_like(self.sizes, dtype=torch.bool)
        self.has_neighbors[self.edges[1]] = True

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        from torch_geometric.utils import scatter

        x = self.mean(scores)
        for _ in range(self.hops):
            src, dst = self.edges
            neighbors = scatter(x[src], dst, dim=0, dim_size=x.shape[0], reduce="mean")
            mixed = (1 - self.neighbor_weight) * x + self.neighbor_weight * neighbors
            x = torch.where(self.has_neighbors, mixed, x)
        return self._shape(x)
