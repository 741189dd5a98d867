"""CAT Pruning (cluster-aware token pruning) as its authors run it, from pluggable parts.

Paper Algorithm 2 and Sections 2.2–2.4; where the paper is silent or differs from
the authors' code, the code's choice (``docs/selection.md`` lists each one). Steps
count from 1, ``start_step`` is t0, k = ⌊α·N⌋. Each sample is scored on its
conditional branch (``observes = "branches"``), as the authors score it.

First pruned step (t0 + 1):

1. cluster ``feature_weight``·(output of step t0) + positional encoding (``clusterer``);
2. score each cluster (``pooling``; by default the signed per-channel maximum of the
   relative noise, one graph convolution over touching clusters, L2 norm);
3. walk the clusters best first, taking from each its ``first_quota``·k tokens of
   largest relative noise (``scorer``), until more than k are taken; cut to k.

Later steps, with q = ⌊⌊``cluster_quota``·k⌋·``cluster_share``⌋:

1. score the clusters (by default without the graph step);
2. walk them best first; the cluster of rank r gives its top q·``boost[r]`` tokens
   by relative noise (q for ranks past ``boost``) and, from the ``stale_from``-th
   pruned step on, also its ⌊``stale_quota``·that⌋ stalest tokens; stop once more than
   ``cluster_share``·k are gathered and cut to ⌊``cluster_share``·k⌋;
3. add the ⌊(1 − ``cluster_share``)·k⌋ stalest tokens overall (``staleness``).

The union (at most k tokens) is what counts as computed in the staleness state;
each row is then padded to exactly k with the next stalest tokens, which are
computed but not counted (the authors' compiled path). Ties fall to the lowest
token index and the lowest cluster id (stable sorts). Everything per step is
batched tensor work (sorts, gathers, cumulative sums) with no host sync; the
clusters are made once, with one read of their count.

On a video grid ``(frames, h, w)`` the same rules run over every token of the clip: the
clusters are made in space and time (the frame index is a third coordinate of the
positional encoding, and clusters touch across consecutive frames for the graph step;
:mod:`catlab.selection.clustering`), so one cluster may hold a static region of several
frames, and its quota is spent where the noise is largest in any of them.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from catlab.capabilities import Capability
from catlab.grid import Grid
from catlab.registry import selectors
from catlab.selection.base import StepState
from catlab.selection.cat_parts import CatParts
from catlab.selection.clustering import positional_encoding, video_channels
from catlab.selection.ranking import first_k_unchosen, order_by


def conditional_rows(x: torch.Tensor, batch: int, who: str = "selector") -> torch.Tensor:
    """Each sample's scored rows: the conditional branches ``B..2B`` of stacked ``[uncond, cond]``, else ``x``."""
    if x.shape[0] == 2 * batch and batch > 0:
        return x[batch:]
    if x.shape[0] == batch:
        return x
    raise ValueError(f"{who}: output has {x.shape[0]} rows for {batch} samples (expected {batch} or {2 * batch})")


@selectors.register("cat")
@dataclass
class Cat(CatParts):
    """CAT Pruning; see the module docstring and ``docs/selection.md``.

    ``scorer``, ``staleness``, ``clusterer`` and ``pooling`` are component configs
    (``{"name": ...}``) or built components.
    """

    #: the authors score the conditional branch, not the guided output
    observes: ClassVar[str] = "branches"
    #: its selection splits into prepare_step + select_tensors (replayable from captured graphs)
    #: replayable steps; the clusters are made once, on the host, at the first pruned step
    capabilities: ClassVar[Capability] = Capability.REPLAYS_SELECTION | Capability.HOST_SETUP

    scorer: Any = field(default_factory=lambda: {"name": "relative_noise"})
    staleness: Any = field(default_factory=lambda: {"name": "ewma"})
    clusterer: Any = field(default_factory=lambda: {"name": "auto"})  # scikit-learn on a CPU, its twin on a GPU
    pooling: Any = field(default_factory=lambda: {"name": "channel_max"})
    feature_weight: float = 0.05
    cluster_share: float = 0.25
    first_quota: float = 0.1
    cluster_quota: float = 0.2
    boost: list = field(default_factory=lambda: [3, 2])
    stale_quota: float = 0.5
    stale_from: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("cluster_share", "first_quota", "cluster_quota", "stale_quota"):
            if not 0.0 <= float(getattr(self, key)) <= 1.0:
                raise ValueError(f"cat: {key} must be in [0, 1]; got {getattr(self, key)}")
        if int(self.stale_from) < 2:
            raise ValueError(f"cat: stale_from counts pruned steps from 2; got {self.stale_from}")
        if any(int(b) < 1 for b in self.boost):
            raise ValueError(f"cat: boost holds quota multipliers >= 1; got {list(self.boost)}")

    def reset(self, batch_size: int, grid: Grid, num_steps: int, device: torch.device) -> None:
        super().reset(batch_size, grid, num_steps, device)
        self.counted: torch.Tensor | None = None  # (B, N) bool: the last selection without its padding
        self.pruned_steps = 0
        self._selected_step = None

    def observe(self, step: int, output: torch.Tensor, indices: torch.Tensor | None) -> None:
        self.scorer.observe(step, output)
        counted = self.counted if indices is not None and step == self._selected_step else indices
        self.staleness.update(counted)

    def selection_macs(self, state: StepState) -> int:
        return self._macs

    def select(self, state: StepState) -> torch.Tensor:
        self.prepare_step(state)
        return self.select_tensors(state)

    def prepare_step(self, state: StepState) -> Hashable | None:
        """The step's host-side part: counters, the clusters at the first pruned step (on the host, once),
        the output buffer. Returns which code path :meth:`select_tensors` takes, for a captured graph of it;
        ``None`` at the first pruned step and with random ties (a seeded draw per step cannot be replayed)."""
        b, n = state.batch_size, state.num_tokens
        channels = state.output.shape[-1] if state.output is not None else 1
        self._macs = 2 * b * n * channels  # norms and the pooling
        self.pruned_steps += 1
        self._selected_step = state.step
        self._first = self.labels is None
        if self._first:
            self._make_clusters(state)
        self._unioned = not self._first and self.pruned_steps >= int(self.stale_from)
        if self.counted is None or tuple(self.counted.shape) != (b, n) or self.counted.device != state.device:
            self.counted = torch.zeros(b, n, dtype=torch.bool, device=state.device)
        if self._first or self.staleness.ties != "index":
            return None
        return ("cat", self._unioned)

    def select_tensors(self, state: StepState) -> torch.Tensor:
        """The step's device part: tensor operations only, state read but not rebound (:attr:`counted` is
        written in place), so a CUDA graph of it replays correctly."""
        b, n, k = state.batch_size, state.num_tokens, state.k
        noise = conditional_rows(self.scorer.features(state.output, (b, n), state.device), b, "cat")
        norms = noise.norm(dim=-1)
        stale = self.staleness.order()
        if self._first:
            counted = self._cluster_part(noise, norms, stale, k, first=True)
        else:
            part = self._cluster_part(noise, norms, stale, k, first=False)
            stalest = torch.zeros_like(part).scatter_(1, stale[:, : int(k * (1 - self.cluster_share))], True)
            counted = part | stalest
        self.counted.copy_(counted)
        return first_k_unchosen(stale, counted, k)

    def _make_clusters(self, state: StepState) -> None:
        b = state.batch_size
        if state.output is None:
            out = torch.zeros(b, state.num_tokens, 2, device=state.device)
        else:
            out = conditional_rows(state.output.float(), b, "cat")
        out = video_channels(out, state.grid)
        features = self.feature_weight * out + positional_encoding(state.grid, out.shape[-1], out.device)
        labels = self.clusterer(features, state.grid, self.generator)
        self.num_clusters = int(labels.max()) + 1
        self.pooling.setup(labels, state.grid, self.num_clusters)
        self.sizes = torch.zeros(b, self.num_clusters, dtype=torch.long, device=labels.device)
        self.sizes.scatter_add_(1, labels, torch.ones_like(labels))
        self.labels = labels
        boost = [int(x) for x in self.boost][: self.num_clusters]
        boost += [1] * (self.num_clusters - len(boost))
        self._boost = torch.tensor(boost, device=labels.device)  # by cluster rank; made once, no copy per step
        self._macs += self.clusterer.macs(*features.shape)

    def _quotas(self, sizes: torch.Tensor, k: int, first: bool) -> torch.Tensor:
        """Noise quota of the cluster at each rank, ``(B, C)``: capped by its size, boosted for the best."""
        if first:
            return sizes.clamp(max=max(1, int(k * self.first_quota)))
        q = sizes.clamp(max=max(1, int(int(k * self.cluster_quota) * self.cluster_share)))
        return torch.minimum(q * self._boost, sizes)

    def _cluster_part(
        self, noise: torch.Tensor, norms: torch.Tensor, stale: torch.Tensor, k: int, first: bool
    ) -> torch.Tensor:
        """``(B, N)`` bool: the tokens the clusters give, walked best first and cut to the budget."""
        b, n = norms.shape
        c = self.num_clusters
        arange = torch.arange(n, device=norms.device).expand(b, -1)
        cluster_order = order_by(self.pooling(noise, first), descending=(True,))  # ties: lowest cluster id
        cluster_rank = torch.empty_like(cluster_order).scatter_(
            1, cluster_order, torch.arange(c, device=norms.device).expand(b, -1)
        )
        rank = cluster_rank.gather(1, self.labels)  # (B, N): the rank of each token's cluster
        sizes = self.sizes.gather(1, cluster_order)  # by rank
        starts = sizes.cumsum(1) - sizes

        def position_in_cluster(key: torch.Tensor, descending: bool) -> torch.Tensor:
            order = order_by(rank, key, descending=(False, descending))  # ties: lowest index
            pos = arange - starts.gather(1, rank.gather(1, order))
            return torch.empty_like(pos).scatter_(1, order, pos)

        by_noise = position_in_cluster(norms, descending=True)
        quota = self._quotas(sizes, k, first)
        picked = by_noise < quota.gather(1, rank)
        unioned = not first and self._unioned
        if unioned:
            stale_rank = torch.empty_like(stale).scatter_(1, stale, arange)
            by_stale = position_in_cluster(stale_rank, descending=False)
            stale_quota = (quota.float() * self.stale_quota).long()
            picked |= by_stale < stale_quota.gather(1, rank)

        budget = float(k) if first else k * self.cluster_share
        given = torch.zeros(b, c, dtype=torch.long, device=norms.device).scatter_add_(1, rank, picked.long())
        walked = (given.cumsum(1) - given) <= budget  # a cluster is taken while the total has not passed the budget
        candidates = picked & walked.gather(1, rank)
        # the walk's order: best cluster first; inside one, unioned picks by index, noise picks by noise
        within = arange if unioned else by_noise
        order = order_by(rank, within)
        taken = candidates.gather(1, order)
        keep = taken & (taken.cumsum(1) <= int(budget))
        return torch.zeros_like(candidates).scatter_(1, order, keep)
