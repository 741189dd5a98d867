"""Clusterers: token → cluster id, run once when the first pruned selection is made.

Every clusterer takes per-token features ``(B, N, D)`` (relative noise plus a
positional encoding, see :func:`cluster_features`) and the token grid ``(h, w)``,
and returns labels ``(B, N)`` in ``[0, num_clusters(N))``. By default there are
``num_clusters`` (20) clusters on every grid, each about 5 % of the image, as the
authors' 20 of 4096 tokens are; ``per_tokens > 0`` scales the count with the grid.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from catlab.registry import clusterers
from catlab.selection.ranking import random_keys

Generator = torch.Generator | None
log = logging.getLogger("catlab")


def positional_encoding(grid: tuple[int, int], dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Paper Eq. 3: token (i, j) of an h×w grid gets i/h in the first ⌊d/2⌋ channels, j/w in the rest."""
    h, w = grid
    i = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w) / h
    j = torch.arange(w, device=device, dtype=torch.float32).repeat(h) / w
    half = dim // 2
    return torch.cat([i[:, None].expand(-1, half), j[:, None].expand(-1, dim - half)], dim=1)


def cluster_features(noise: torch.Tensor, grid: tuple[int, int], noise_weight: float) -> torch.Tensor:
    """``noise_weight`` · (relative noise / its RMS) + positional encoding, ``(B, N, D)``.

    Dividing by the per-sample RMS makes ``noise_weight`` mean the same on every
    model and step: it is the balance between "similar change" and "nearby".
    """
    if noise.shape[-1] < 2:
        noise = noise.expand(*noise.shape[:-1], 2)
    rms = noise.float().pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-12)
    pos = positional_encoding(grid, noise.shape[-1], noise.device)
    return noise_weight * noise.float() / rms + pos


@dataclass
class _Clusterer:
    """Common config: how many clusters for how many tokens.

    ``per_tokens=0`` (default): exactly ``num_clusters`` on any grid; ``per_tokens > 0``:
    ``num_clusters`` per ``per_tokens`` tokens (e.g. 20 per 4096), at least ``min_clusters``.
    """

    num_clusters: int = 20
    per_tokens: int = 0
    min_clusters: int = 2

    def __post_init__(self) -> None:
        name = getattr(type(self), "registered_name", "clusterer")
        if int(self.num_clusters) < 1:
            raise ValueError(f"{name}: num_clusters must be >= 1; got {self.num_clusters}")
        if int(self.per_tokens) < 0:
            raise ValueError(f"{name}: per_tokens must be >= 0 (0: num_clusters is the exact count); got {self.per_tokens}")
        if int(self.min_clusters) < 1:
            raise ValueError(f"{name}: min_clusters must be >= 1; got {self.min_clusters}")
        self._told: set[int] = set()

    def count(self, num_tokens: int) -> int:
        """Clusters for ``num_tokens`` tokens: ``num_clusters`` per ``per_tokens``, at least ``min_clusters``."""
        c = round(self.num_clusters * num_tokens / self.per_tokens) if self.per_tokens else self.num_clusters
        count = max(1, min(num_tokens, max(self.min_clusters, c)))
        if self.per_tokens and count != self.num_clusters and num_tokens not in self._told:
            self._told.add(num_tokens)  # said once per grid size: the count is not the number the config names
            owner = getattr(self, "owner", None)  # the selector this clusterer serves, set by Policy.reset
            log.info("%s%s: %d clusters for %d tokens (num_clusters=%d per %d tokens, at least min_clusters=%d); "
                     "set per_tokens=0 for exactly num_clusters", f"{owner}'s clusterer " if owner else "",
                     getattr(type(self), "registered_name", "clusterer"), count, num_tokens, self.num_clusters, self.per_tokens, self.min_clusters)
        return count

    def macs(self, batch: int, num_tokens: int, dim: int) -> int:
        return 0


def nearest(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre (L2) for each point; ``(B, N, D), (B, C, D)`` → ``(B, N)``."""
    # ‖x‖² is the same for every centre, so argmin(‖c‖² − 2 x·c) = argmin ‖x − c‖²;
    # one batched matmul, where torch.cdist is slow on the CPU
    return torch.baddbmm(centers.pow(2).sum(-1)[:, None, :], x, centers.transpose(1, 2), alpha=-2).argmin(-1)


def kmeans(x: torch.Tensor, c: int, iters: int, generator: torch.Generator | None) -> torch.Tensor:
    """Batched Lloyd k-means with k-means++ seeding, L2; ``x`` ``(B, N, D)`` → labels ``(B, N)``.

    Seeds are drawn by inverse-CDF sampling from pre-drawn uniforms, and the loop
    runs a fixed number of iterations, so nothing waits on the host. An empty
    cluster keeps its previous centre.
    """
    b, n, d = x.shape
    u = random_keys((b, c), generator, x.device)
    first = (u[:, 0] * n).long().clamp(max=n - 1)
    centers = x.gather(1, first[:, None, None].expand(-1, 1, d))
    d2 = (x - centers).pow(2).sum(-1)
    for j in range(1, c):
        cdf = (d2 + 1e-12).cumsum(-1)
        pick = torch.searchsorted(cdf, u[:, j : j + 1] * cdf[:, -1:]).clamp(max=n - 1)
        new = x.gather(1, pick[..., None].expand(-1, 1, d))
        centers = torch.cat([centers, new], dim=1)
        d2 = torch.minimum(d2, (x - new).pow(2).sum(-1))
    ones = torch.ones(b, n, device=x.device, dtype=x.dtype)
    for _ in range(iters):
        labels = nearest(x, centers)
        sums = torch.zeros_like(centers).scatter_add_(1, labels[..., None].expand(-1, -1, d), x)
        counts = torch.zeros(b, c, device=x.device, dtype=x.dtype).scatter_add_(1, labels, ones)
        centers = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centers)
    return nearest(x, centers)


@clusterers.register("kmeans")
@dataclass
class KMeans(_Clusterer):
    """k-means in torch on the model's device (the paper's clusterer)."""

    iters: int = 20

    def __call__(self, features: torch.Tensor, grid: tuple[int, int], generator: Generator = None) -> torch.Tensor:
        return kmeans(features.float(), self.count(features.shape[1]), self.iters, generator)

    def macs(self, batch: int, num_tokens: int, dim: int) -> int:
        return (self.iters + 2) * batch * num_tokens * self.count(num_tokens) * dim


@clusterers.register("kmeans_sklearn")
@dataclass
class KMeansSklearn(_Clusterer):
    """scikit-learn's KMeans on the CPU (the authors' choice; a reference for ``kmeans``)."""

    n_init: int = 1
    seed: int = 0

    def __call__(self, features: torch.Tensor, grid: tuple[int, int], generator: Generator = None) -> torch.Tensor:
        from sklearn.cluster import KMeans as SkKMeans

        c = self.count(features.shape[1])
        labels = [
            SkKMeans(n_clusters=c, n_init=self.n_init, random_state=self.seed).fit(x).labels_
            for x in features.detach().float().cpu().numpy()
        ]
        return torch.as_tensor(np.stack(labels), dtype=torch.long, device=features.device)


def grid_edges(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """``(2, E)`` token pairs that touch on the grid (right and down neighbours, each pair once)."""
    h, w = grid
    idx = torch.arange(h * w, device=device).view(h, w)
    right = torch.stack([idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1)])
    down = torch.stack([idx[:-1, :].reshape(-1), idx[1:, :].reshape(-1)])
    return torch.cat([right, down], dim=1)


@clusterers.register("spectral")
@dataclass
class Spectral(_Clusterer):
    """Normalised-cut spectral clustering (Shi & Malik) on the token grid graph.

    Neighbouring tokens are joined by an edge of weight exp(−‖f_u − f_v‖² / mean‖f_u − f_v‖²),
    so cuts fall where the features change. The graph's spectral embedding is
    row-normalised and clustered with the torch k-means.
    """

    iters: int = 20
    seed: int = 0

    def __call__(self, features: torch.Tensor, grid: tuple[int, int], generator: Generator = None) -> torch.Tensor:
        from scipy.sparse import coo_matrix
        from sklearn.manifold import spectral_embedding

        b, n, _ = features.shape
        c = self.count(n)
        if c == 1 or n < 3:
            return torch.arange(n, device=features.device).expand(b, -1) % c
        u, v = grid_edges(grid).numpy()
        solver = "arpack" if n > 5 * c + 1 else "lobpcg"  # lobpcg falls back to dense eigh on tiny graphs
        embeddings = []
        for x in features.detach().float().cpu():
            dist2 = (x[u] - x[v]).pow(2).sum(-1)
            weight = torch.exp(-dist2 / dist2.mean().clamp_min(1e-12)).numpy()
            adj = coo_matrix((np.r_[weight, weight], (np.r_[u, v], np.r_[v, u])), shape=(n, n)).tocsr()
            emb = spectral_embedding(adj, n_components=c, eigen_solver=solver, random_state=self.seed, drop_first=False)
            embeddings.append(torch.as_tensor(emb, dtype=torch.float32))
        emb = torch.stack(embeddings).to(features.device)
        emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        gen = generator if generator is not None else torch.Generator().manual_seed(self.seed)
        return kmeans(emb, c, self.iters, gen)


@clusterers.register("grid")
@dataclass
class Grid(_Clusterer):
    """Fixed square patches of about N / num_clusters tokens; ignores the features."""

    def __call__(self, features: torch.Tensor, grid: tuple[int, int], generator: Generator = None) -> torch.Tensor:
        h, w = grid
        side = max(1, round(math.sqrt(h * w / self.count(h * w))))
        i = torch.arange(h, device=features.device).repeat_interleave(w) // side
        j = torch.arange(w, device=features.device).repeat(h) // side
        return (i * math.ceil(w / side) + j).expand(features.shape[0], -1)


@clusterers.register("none")
@dataclass
class NoClusters:
    """One cluster holding every token: selection without spatial grouping."""

    def count(self, num_tokens: int) -> int:
        return 1

    def macs(self, batch: int, num_tokens: int, dim: int) -> int:
        return 0

    def __call__(self, features: torch.Tensor, grid: tuple[int, int], generator: Generator = None) -> torch.Tensor:
        return torch.zeros(features.shape[:2], dtype=torch.long, device=features.device)
