"""The selection rules of the authors' CAT Pruning code, on catlab's interfaces.

A reference to compare the default ``cat`` against; ``docs/cat_reference.md``
lists every point where the two differ. It loops over samples and clusters in
Python, which is fine for a reference and is why ``cat`` exists.

First pruned step (t0 + 1), from the output n_t0 and the reference n_{t0−1}:
cluster ``feature_weight·n_t0 + pos_enc`` with scikit-learn's KMeans; max-pool
the signed relative noise per channel over each cluster; one graph-convolution
step over each cluster and its neighbours (sum of mean, mean and max); score =
L2 norm. Walk clusters best first taking the top-⌊k/10⌋ tokens by ‖RN‖ of each
until k are taken.

Later steps: score clusters by the norm of the max-pooled signed relative noise
(no graph step). Walk clusters best first with a quota q = ⌊⌊k/5⌋·0.25⌋, tripled
for the best cluster and doubled for the second; take each cluster's top-q tokens
by ‖RN‖, and (except for the best cluster) its ⌊q/2⌋ stalest; stop once the
cluster part exceeds 25% of k and cut it to ⌊0.25k⌋. Add the ⌊0.75k⌋ stalest
tokens overall (EWMA, a = 0.5), possibly overlapping the cluster part, then pad
with the next stalest to exactly k. Ties in staleness fall to the lowest index.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from catlab.registry import clusterers, selectors, stalenesses, scorers
from catlab.selection.base import Policy, StepState
from catlab.selection.clustering import positional_encoding
from catlab.selection.pooling import cluster_graph
from catlab.selection.ranking import first_k_unchosen


@selectors.register("cat_reference")
@dataclass
class CatReference(Policy):
    """The authors' selection rules (see the module docstring)."""

    num_clusters: int = 20
    per_tokens: int = 4096
    feature_weight: float = 0.05
    decay: float = 0.5
    cluster_share: float = 0.25
    n_init: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        import torch_geometric.nn  # noqa: F401  (slow first import: pay it when built, not while sampling)

        self._scorer = scorers.build("relative_noise")
        self._staleness = stalenesses.build({"name": "ewma", "decay": self.decay})
        self._kmeans = clusterers.build(
            {"name": "kmeans_sklearn", "num_clusters": self.num_clusters, "per_tokens": self.per_tokens,
             "n_init": self.n_init, "seed": 0}
        )

    def reset(self, batch_size: int, grid: tuple[int, int], num_steps: int, device: torch.device) -> None:
        super().reset(batch_size, grid, num_steps, device)
        self._scorer.reset(self.start_step)
        self._staleness.reset(batch_size, grid[0] * grid[1], device, self.generator)
        self.labels: torch.Tensor | None = None

    def observe(self, step: int, output: torch.Tensor, indices: torch.Tensor | None) -> None:
        self._scorer.observe(step, output)
        self._staleness.update(indices)

    def select(self, state: StepState) -> torch.Tensor:
        b, n, k = state.batch_size, state.num_tokens, state.k
        noise = self._scorer.features(state.output, (b, n), state.device)
        first = self.labels is None
        if first:
            self._make_clusters(state)
        stale_order = self._staleness.frequency.sort(dim=1, stable=True).indices
        chosen = torch.zeros(b, n, dtype=torch.bool, device=state.device)
        for s in range(b):
            rows = self._first(noise[s], s, k) if first else self._later(noise[s], s, k, stale_order[s])
            chosen[s, rows] = True
        return first_k_unchosen(stale_order, chosen, k)

    def _make_clusters(self, state: StepState) -> None:
        out = state.output
        out = out.float() if out is not None else torch.zeros(state.batch_size, state.num_tokens, 2, device=state.device)
        features = self.feature_weight * out + positional_encoding(state.grid, out.shape[-1], out.device)
        self.labels = self._kmeans(features, state.grid)
        self.count = int(self.labels.max()) + 1
        edges = cluster_graph(self.labels, state.grid, self.count)
        self.members = [[(row == c).nonzero().squeeze(1) for c in range(self.count)] for row in self.labels]
        self.edges = [edges[:, edges[0] // self.count == s] % self.count for s in range(state.batch_size)]

    def _max_pool(self, noise: torch.Tensor, s: int) -> torch.Tensor:
        from torch_geometric.utils import scatter

        return scatter(noise, self.labels[s], dim=0, dim_size=self.count, reduce="max")

    def _first(self, noise: torch.Tensor, s: int, k: int) -> torch.Tensor:
        from torch_geometric.nn import MultiAggregation, SimpleConv

        conv = SimpleConv(aggr=MultiAggregation(["mean", "mean", "max"], mode="sum"), combine_root="self_loop")
        scores = conv(self._max_pool(noise, s), self.edges[s].to(noise.device)).norm(dim=-1)
        norms = noise.norm(dim=-1)
        picked, total = [], 0
        for c in scores.argsort(descending=True, stable=True).tolist():
            idx = self.members[s][c]
            q = min(k // 10, len(idx))
            picked.append(idx[norms[idx].topk(q).indices])
            total += q
            if total > k:
                break
        return torch.cat(picked)[:k]

    def _later(self, noise: torch.Tensor, s: int, k: int, stale_order: torch.Tensor) -> torch.Tensor:
        scores = self._max_pool(noise, s).norm(dim=-1)
        norms, freq = noise.norm(dim=-1), self._staleness.frequency[s]
        unit = int((k // 5) * self.cluster_share)
        budget = k * self.cluster_share
        picked, total = [], 0
        for i, c in enumerate(scores.argsort(descending=True, stable=True).tolist()):
            idx = self.members[s][c]
            q = min(unit, len(idx))
            q = min(q * (3 - i), len(idx)) if i < 3 else q
            local = norms[idx].topk(q).indices
            if i != 0:
                stalest = freq[idx].topk(int(q * 0.5), largest=False).indices
                local = torch.unique(torch.cat([local, stalest]))
            picked.append(idx[local])
            total += len(local)
            if total > budget:
                break
        part = torch.cat(picked)[: int(budget)]
        return torch.cat([part, stale_order[: int(k * (1 - self.cluster_share))]])
