"""Clusterers: token → cluster id, run once when the first pruned selection is made.

Every clusterer takes per-token features ``(B, N, D)`` (relative noise plus a
positional encoding, see :func:`cluster_features`) and the token grid, ``(h, w)``
or ``(frames, h, w)`` (:mod:`catlab.grid`), and returns labels ``(B, N)`` in
``[0, num_clusters(N))``. By default there are ``num_clusters`` (20) clusters on every
grid, each about 5 % of the image (or video), as the authors' 20 of 4096 tokens are;
``per_tokens > 0`` scales the count with the grid.

On a video grid the clusters are made in space and time: the positional encoding
carries the frame index as a third coordinate, and the grid graph (:func:`grid_edges`)
joins each token to its neighbours in the previous and next frame too, so a cluster
spans frames wherever the content stays the same.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from catlab.grid import Grid as TokenGrid
from catlab.grid import as_video, num_frames
from catlab.registry import clusterers
from catlab.selection.ranking import random_keys

Generator = torch.Generator | None
log = logging.getLogger("catlab")


def positional_encoding(
    grid: TokenGrid, dim: int, device: torch.device | None = None, frame_step: float = 1.0
) -> torch.Tensor:
    """Paper Eq. 3, ``(N, dim)``: token (i, j) of an h×w grid gets i/h in the first ⌊d/2⌋ channels, j/w in the rest.

    A video grid ``(frames, h, w)`` adds its frame index f as a third coordinate, on top of the same
    channels with alternating signs inside each half (+, −, +, − ...), so the coordinates stay separate:
    the squared distance between two tokens is ⌊d/2⌋·Δi² + ⌈d/2⌉·Δj² + m·(s·Δf)², m the channels with a
    sign (an odd half leaves its last channel out). The scale s puts two tokens ``frame_step`` frames apart
    as far apart as the mean of one row step and one column step (``frame_step=1``, the default): a frame
    is one more spatial step, so on static content a cluster is a blob in space and time and spans
    frames, while on moving content the noise part of the features splits it. Images keep their
    encoding, and so does a one-frame video (exactly the 2D one). A video needs ``dim >= 3``.
    """
    frames, h, w = as_video(grid)
    i = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w) / h
    j = torch.arange(w, device=device, dtype=torch.float32).repeat(h) / w
    half = dim // 2
    pe = torch.cat([i[:, None].expand(-1, half), j[:, None].expand(-1, dim - half)], dim=1)
    if frames == 1:
        return pe
    sign = torch.tensor([_sign(c, half) if c < half else _sign(c - half, dim - half) for c in range(dim)])
    signed = int(sign.abs().sum())
    if signed == 0:
        raise ValueError(f"a video grid's positional encoding needs dim >= 3 channels; got dim={dim} for {grid}")
    spatial = (half / h**2 + (dim - half) / w**2) / 2  # squared distance of one row step and one column step, mean
    scale = float(frame_step) * math.sqrt(spatial / signed)
    f = torch.arange(frames, device=device, dtype=torch.float32).repeat_interleave(h * w)
    return pe.repeat(frames, 1) + (scale * f)[:, None] * sign.to(device=device, dtype=torch.float32)


def _sign(c: int, size: int) -> float:
    """Channel c's sign for the frame coordinate in a half of ``size`` channels: +1, −1, ...; 0 for an odd
    half's last channel, so that the half's signs sum to zero."""
    if size % 2 and c == size - 1:
        return 0.0
    return 1.0 if c % 2 == 0 else -1.0


def video_channels(x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """``x`` ``(B, N, C)`` with zero channels added up to four on a video grid, so that its positional encoding
    (which needs three) has both halves signed; unchanged on an image (and on a one-frame video)."""
    if num_frames(grid) == 1 or x.shape[-1] >= 4:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:-1], 4 - x.shape[-1])], dim=-1)


def cluster_features(noise: torch.Tensor, grid: TokenGrid, noise_weight: float) -> torch.Tensor:
    """``noise_weight`` · (relative noise / its RMS) + positional encoding, ``(B, N, D)``.

    Dividing by the per-sample RMS makes ``noise_weight`` mean the same on every
    model and step: it is the balance between "similar change" and "nearby".
    """
    if noise.shape[-1] < 2:
        noise = noise.expand(*noise.shape[:-1], 2)
    noise = video_channels(noise, grid)
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
            raise ValueError(
                f"{name}: per_tokens must be >= 0 (0: num_clusters is the exact count); got {self.per_tokens}"
            )
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
            log.info(
                "%s%s: %d clusters for %d tokens (num_clusters=%d per %d tokens, at least min_clusters=%d); "
                "set per_tokens=0 for exactly num_clusters",
                f"{owner}'s clusterer " if owner else "",
                getattr(type(self), "registered_name", "clusterer"),
                count,
                num_tokens,
                self.num_clusters,
                self.per_tokens,
                self.min_clusters,
            )
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
    for _ in range(iters):
        centers = cluster_means(x, nearest(x, centers), centers)
    return nearest(x, centers)


def cluster_means(x: torch.Tensor, labels: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Mean of each cluster's points ``(B, C, D)``; an empty cluster keeps its ``previous`` centre.

    A one-hot matrix product, not a float ``scatter_add_``: the same sums in the same order on every
    run (CUDA's atomic adds are not), so eager and graphed runs of a selector agree bit for bit."""
    onehot = torch.nn.functional.one_hot(labels, previous.shape[1]).to(x.dtype)  # (B, N, C)
    sums = torch.bmm(onehot.transpose(1, 2), x)
    counts = onehot.sum(1)
    return torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], previous)


def sklearn_draws(n: int, c: int, seed: int) -> tuple[int, np.ndarray]:
    """The random numbers scikit-learn's k-means++ seeding draws for ``n`` points and ``c`` clusters with
    ``random_state=seed``: the first centre's index and ``(c - 1, trials)`` uniforms. They do not depend on
    the data, so they are drawn on the host once and the seeding itself runs on the device."""
    rs = np.random.RandomState(seed)
    weights = np.ones(n, dtype=np.float32)
    first = int(rs.choice(n, p=weights / weights.sum()))
    trials = 2 + int(np.log(c))
    return first, np.stack([rs.uniform(size=trials) for _ in range(c - 1)]) if c > 1 else np.zeros((0, trials))


def kmeans_like_sklearn(
    x: torch.Tensor,
    c: int,
    seed: int = 0,
    max_iter: int = 300,
    tol: float = 1e-4,
    draws: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """scikit-learn's ``KMeans(c, n_init=1, random_state=seed)`` (Lloyd) in batched torch; labels ``(B, N)``.

    The same algorithm with the same random numbers: data centred; greedy k-means++ seeding
    (``2 + ⌊ln c⌋`` candidates per centre, the one that lowers the potential most, in float64);
    Lloyd iterations that stop, per sample, when the labels no longer change or the centres' total
    squared shift falls to ``tol`` × the mean feature variance, then one last assignment. The stop
    is a per-sample flag on the device (the loop runs ``max_iter`` times without reading it on the
    host; a stopped sample's centres stay put). What differs: float rounding (another summation
    order), and an empty cluster keeps its centre where scikit-learn moves it to a far point.
    """
    b, n, d = x.shape
    x = x.float() - x.float().mean(1, keepdim=True)
    if draws is None:
        first, uniforms = sklearn_draws(n, c, seed)
        draws = (torch.tensor(first, device=x.device), torch.as_tensor(uniforms, device=x.device))
    first, uniforms = draws
    x64 = x.double()
    norms = x64.pow(2).sum(-1)  # (B, N)
    centers = x64[:, first][:, None]  # (B, 1, D)
    closest = (norms - 2 * (x64 @ centers[:, 0, :, None])[..., 0] + centers.pow(2).sum(-1)).clamp_min(0)
    for j in range(c - 1):
        pot = closest.sum(-1, keepdim=True)
        picks = torch.searchsorted(closest.cumsum(-1), uniforms[j].expand(b, -1) * pot).clamp(max=n - 1)  # (B, T)
        cand = x64.gather(1, picks[..., None].expand(-1, -1, d))  # (B, T, D)
        dist = (norms[:, None] - 2 * torch.bmm(cand, x64.transpose(1, 2)) + cand.pow(2).sum(-1)[..., None]).clamp_min(
            0
        )
        dist = torch.minimum(closest[:, None], dist)  # (B, T, N)
        best = dist.sum(-1).argmin(-1)  # (B,)
        closest = dist[torch.arange(b, device=x.device), best]
        centers = torch.cat([centers, cand[torch.arange(b, device=x.device), best][:, None]], dim=1)
    centers = centers.float()
    threshold = x.var(1, unbiased=False).mean(-1) * tol  # (B,)
    labels_old = torch.full((b, n), -1, dtype=torch.long, device=x.device)
    done = torch.zeros(b, dtype=torch.bool, device=x.device)
    for _ in range(max_iter):
        labels = nearest(x, centers)
        new = cluster_means(x, labels, centers)
        stop = (labels == labels_old).all(-1) | ((new - centers).pow(2).sum((1, 2)) <= threshold)
        centers = torch.where(done[:, None, None], centers, new)
        labels_old = torch.where(done[:, None], labels_old, labels)
        done = done | stop
    return nearest(x, centers)


@clusterers.register("kmeans")
@dataclass
class KMeans(_Clusterer):
    """k-means in torch on the model's device (the paper's clusterer)."""

    iters: int = 20

    def __call__(self, features: torch.Tensor, grid: TokenGrid, generator: Generator = None) -> torch.Tensor:
        return kmeans(features.float(), self.count(features.shape[1]), self.iters, generator)

    def macs(self, batch: int, num_tokens: int, dim: int) -> int:
        return (self.iters + 2) * batch * num_tokens * self.count(num_tokens) * dim


@clusterers.register("kmeans_matched")
@dataclass
class KMeansMatched(_Clusterer):
    """scikit-learn's KMeans re-done in torch on the model's device: the same seeding draws, the same stop.

    ``kmeans_sklearn``'s result without the trip to the host (see :func:`kmeans_like_sklearn` for what
    still differs); ``max_iter`` bounds the Lloyd loop, which a sample leaves once it has converged."""

    seed: int = 0
    max_iter: int = 100
    tol: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        self._draws: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, features: torch.Tensor, grid: TokenGrid, generator: Generator = None) -> torch.Tensor:
        n, c = features.shape[1], self.count(features.shape[1])
        key = (n, c, self.seed, features.device)
        if key not in self._draws:  # once per grid and device: later generations upload nothing
            first, uniforms = sklearn_draws(n, c, self.seed)
            self._draws[key] = (
                torch.tensor(first, device=features.device),
                torch.as_tensor(uniforms).to(features.device, non_blocking=True),
            )
        return kmeans_like_sklearn(features, c, self.seed, self.max_iter, self.tol, self._draws[key])

    def macs(self, batch: int, num_tokens: int, dim: int) -> int:
        c = self.count(num_tokens)
        return (self.max_iter + 2 + c * (2 + int(math.log(c)))) * batch * num_tokens * c * dim


@clusterers.register("auto")
@dataclass
class KMeansAuto(_Clusterer):
    """`cat`'s default: scikit-learn's KMeans where the features are on the CPU (the authors' exact path),
    ``kmeans_matched`` (the same algorithm in torch) where they are on an accelerator, so the first pruned
    step does not wait for a copy to the host and a clustering there."""

    seed: int = 0
    n_init: int = 1
    max_iter: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        common = dict(
            num_clusters=self.num_clusters, per_tokens=self.per_tokens, min_clusters=self.min_clusters, seed=self.seed
        )
        self.host = KMeansSklearn(n_init=self.n_init, **common)
        self.device = KMeansMatched(max_iter=self.max_iter, **common)

    def __call__(self, features: torch.Tensor, grid: TokenGrid, generator: Generator = None) -> torch.Tensor:
        return (self.host if features.device.type == "cpu" else self.device)(features, grid, generator)


@clusterers.register("kmeans_sklearn")
@dataclass
class KMeansSklearn(_Clusterer):
    """scikit-learn's KMeans on the CPU (the authors' choice; a reference for ``kmeans``)."""

    n_init: int = 1
    seed: int = 0

    def __call__(self, features: torch.Tensor, grid: TokenGrid, generator: Generator = None) -> torch.Tensor:
        from sklearn.cluster import KMeans as SkKMeans

        c = self.count(features.shape[1])
        labels = [
            SkKMeans(n_clusters=c, n_init=self.n_init, random_state=self.seed).fit(x).labels_
            for x in features.detach().float().cpu().numpy()
        ]
        return torch.as_tensor(np.stack(labels), dtype=torch.long, device=features.device)


def grid_edges(grid: TokenGrid, device: torch.device | None = None) -> torch.Tensor:
    """``(2, E)`` token pairs that touch on the grid, each pair once: right and down neighbours in every frame,
    then each token and the same position in the next frame (a video's 6-neighbourhood, undirected).

    A ``(frames, h, w)`` grid has frames·h·(w−1) + frames·(h−1)·w + (frames−1)·h·w edges; an image (one
    frame) the first two terms, in the same order as before videos existed."""
    frames, h, w = as_video(grid)
    idx = torch.arange(frames * h * w, device=device).view(frames, h, w)
    right = torch.stack([idx[..., :-1].reshape(-1), idx[..., 1:].reshape(-1)])
    down = torch.stack([idx[:, :-1, :].reshape(-1), idx[:, 1:, :].reshape(-1)])
    if frames == 1:
        return torch.cat([right, down], dim=1)
    later = torch.stack([idx[:-1].reshape(-1), idx[1:].reshape(-1)])
    return torch.cat([right, down, later], dim=1)


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

    def __call__(self, features: torch.Tensor, grid: TokenGrid, generator: Generator = None) -> torch.Tensor:
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
            emb = spectral_embedding(
                adj, n_components=c, eigen_solver=solver, random_state=self.seed, drop_first=False
            )
            embeddings.append(torch.as_tensor(emb, dtype=torch.float32))
        emb = torch.stack(embeddings).to(features.device)
        emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        gen = generator if generator is not None else torch.Generator().manual_seed(self.seed)
        return kmeans(emb, c, self.iters, gen)


@clusterers.register("grid")
@dataclass
class Grid(_Clusterer):
    """Fixed patches of about N / num_clusters tokens; ignores the features.

    Squares on an image; on a video, boxes of ``depth`` frames by a square, the depth about the cube root
    of the patch size (at most the frame count), so a patch spans frames as a space-time cluster does."""

    def __call__(self, features: torch.Tensor, grid: TokenGrid, generator: Generator = None) -> torch.Tensor:
        frames, h, w = as_video(grid)
        size = frames * h * w / self.count(frames * h * w)
        depth = min(frames, max(1, round(size ** (1 / 3)))) if frames > 1 else 1
        side = max(1, round(math.sqrt(size / depth)))
        i = torch.arange(h, device=features.device).repeat_interleave(w) // side
        j = torch.arange(w, device=features.device).repeat(h) // side
        labels = i * math.ceil(w / side) + j
        if frames > 1:
            f = torch.arange(frames, device=features.device).repeat_interleave(h * w) // depth
            labels = f * (math.ceil(h / side) * math.ceil(w / side)) + labels.repeat(frames)
        return labels.expand(features.shape[0], -1)


@clusterers.register("none")
@dataclass
class NoClusters:
    """One cluster holding every token: selection without spatial grouping."""

    def count(self, num_tokens: int) -> int:
        return 1

    def macs(self, batch: int, num_tokens: int, dim: int) -> int:
        return 0

    def __call__(self, features: torch.Tensor, grid: TokenGrid, generator: Generator = None) -> torch.Tensor:
        return torch.zeros(features.shape[:2], dtype=torch.long, device=features.device)
