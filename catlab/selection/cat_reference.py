"""The selection rules of the authors' CAT Pruning code, on catlab's interfaces.

A reference to compare the default ``cat`` against. With its defaults it picks,
on the 64×64 grid, exactly the token sets of the authors' compiled path
(``qcache_compile``) under the tie rule below; ``pad="none", cluster_stale_from=2,
best_cluster_stale=False`` gives exactly their eager path (``qcache``). ``tests/test_cat_reference_golden.py``
checks both against index sets recorded from the authors' code, and
``docs/cat_reference.md`` lists every rule and every remaining difference. It loops
over samples and clusters in Python, which is fine for a reference and is why
``cat`` exists.

Rules (steps count from 1; ``start_step`` is t0; pruning starts at t0 + 1):

* **k** = ⌊α·N⌋, the authors' ``int(select_factor * N)`` (1228 of 4096 at α = 0.3),
  catlab's one rule for every selector (:func:`catlab.selection.base.kept_tokens`).
* **Ties** fall to the lowest token index (and the lowest cluster id) everywhere: every
  "top q" is a stable sort, never ``topk``.
* **Scored row**: the authors score ``hidden_states[1]``. The pipelines stack the
  guidance branches unconditional-first, ``[u_0 … u_{B−1}, c_0 … c_{B−1}]``, so that
  row is the conditional branch only for one prompt (for B ≥ 2 it is prompt 1's
  unconditional branch). Here sample s is scored on its own conditional row
  ``B + s``: the selector asks to be shown the stacked branches
  (``observes = "branches"``), which the sampler and ``enable_pruning`` pass; without
  guidance (B rows) sample s is scored on row s.
* **Clusters**: ``num_clusters`` (20) clusters on every grid, so each holds about 5 %
  of the image at any size, as the authors' 20 of 4096 do; ``per_tokens > 0`` scales
  the count with the grid instead. Quotas are fractions of k, so they keep their
  share of a cluster on any grid; each quota is at least one token (which differs
  from the authors' only where k < 20).

First pruned step (t0 + 1), from the output n_t0 and the reference n_{t0−1}:
cluster ``feature_weight·n_t0 + pos_enc`` with scikit-learn's ``KMeans(random_state=0)``;
max-pool the signed relative noise per channel over each cluster; one graph
convolution over each cluster and its grid neighbours (sum of mean, mean and max,
self loops); score = L2 norm. Walk clusters best first taking the top ⌊k/10⌋
tokens by ‖RN‖ of each, until more than k are taken; cut to k.

Later steps: staleness counts f are reset to the indicator of the previous pruned
step's counted set at the second pruned step, then f ← decay·f + I. Clusters are
scored by the norm of the max-pooled signed relative noise (no graph step) and
walked best first with quota q = ⌊⌊k/5⌋·cluster_share⌋, ×3 for the best cluster and
×2 for the second; each gives its top-q tokens by ‖RN‖ and, from the
``cluster_stale_from``-th pruned step on, its ⌊q/2⌋ stalest (unioned, in index
order; the best cluster too only if ``best_cluster_stale``; the compiled path:
from the 3rd pruned step, best cluster included; the eager path: from the 2nd,
best cluster excluded); stop once more than cluster_share·k are gathered and
cut to ⌊cluster_share·k⌋. The counted set is that cluster part united with the
⌊(1 − cluster_share)·k⌋ stalest tokens overall; it has k tokens or fewer (the two
parts may overlap), and only it enters f.

Padding (``pad``): ``"stalest"`` (the default) completes each row to exactly k with the
stalest tokens not yet in it; the padding is computed but, as in the authors' code,
left out of f. ``"authors"`` is the compiled path's padding exactly: the counted set,
then the stale order's entries ⌊(1 − share)·k⌋ … ⌊(1 − share)·k⌋ + k − |counted|, which
may repeat counted tokens, so a row then computes fewer than k distinct tokens, as
theirs does. The padding never enters f on either rule, but which tokens are computed
decides what the model outputs next, so in a closed loop the two rules' later sets
part (``tests/test_cat_reference_golden.py`` follows such a run). ``"none"`` (the eager path's) returns the counted set
alone: a ``(B, m)`` tensor, m the largest counted set of the batch (other rows
completed as with ``"stalest"``), which can be fewer than the k the planner asked
for: for comparisons with the authors' eager path, not for runs whose MACs count.

``"authors"`` and ``"none"`` break the index contract (k unique tokens per sample), so
the selector then declares :attr:`~catlab.capabilities.Capability.COMPARISON_ONLY`: a run
(``catlab.run``, ``enable_pruning``) refuses it with one line naming ``pad``, and the way
to drive it is :func:`catlab.testing.simulate`, as the golden tests do.

Video grids: the authors' code knows only images. On a ``(frames, h, w)`` grid this
reference runs the same rules over all the clip's tokens with catlab's space-time clusters
(the frame index as a third coordinate of the positional encoding, clusters that touch
across consecutive frames in the graph convolution), as ``cat`` does; that extension is
catlab's, not the authors'. A one-frame grid is an image and gives exactly the image's sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from catlab.capabilities import Capability
from catlab.grid import Grid
from catlab.registry import clusterers, scorers, selectors
from catlab.selection.base import Policy, StepState
from catlab.selection.clustering import positional_encoding, video_channels
from catlab.selection.pooling import cluster_graph

PADS = ("stalest", "authors", "none")


def stable_top(values: torch.Tensor, q: int, largest: bool = True) -> torch.Tensor:
    """Positions of the ``q`` largest (smallest) ``values``, best first, ties to the lowest position."""
    return values.sort(descending=largest, stable=True).indices[: max(int(q), 0)]


@selectors.register("cat_reference")
@dataclass
class CatReference(Policy):
    """The authors' selection rules (see the module docstring)."""

    #: the authors score the conditional branch, not the guided output
    observes: ClassVar[str] = "branches"

    num_clusters: int = 20
    per_tokens: int = 0
    feature_weight: float = 0.05
    decay: float = 0.5
    cluster_share: float = 0.25
    pad: str = "stalest"
    cluster_stale_from: int = 3
    best_cluster_stale: bool = True
    n_init: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pad not in PADS:
            raise ValueError(f"cat_reference: pad must be one of {PADS}; got {self.pad!r}")
        if int(self.cluster_stale_from) < 2:
            raise ValueError(
                f"cat_reference: cluster_stale_from counts pruned steps from 2; got {self.cluster_stale_from}"
            )
        import torch_geometric.nn  # noqa: F401  (slow first import: pay it when built, not while sampling)

        self._scorer = scorers.build("relative_noise")
        self._kmeans = clusterers.build(
            {
                "name": "kmeans_sklearn",
                "num_clusters": self.num_clusters,
                "per_tokens": self.per_tokens,
                "n_init": self.n_init,
                "seed": 0,
            }
        )

    @property
    def capabilities(self) -> Capability:
        """Per-sample, per-cluster Python loops over host values at every step, by design (readable, not timed);
        ``pad: authors`` and ``pad: none`` break the index contract: for comparisons, not for runs."""
        caps = super().capabilities | Capability.HOST_LOOPS
        return caps if self.pad == "stalest" else caps | Capability.COMPARISON_ONLY

    def reset(self, batch_size: int, grid: Grid, num_steps: int, device: torch.device) -> None:
        super().reset(batch_size, grid, num_steps, device)
        self._scorer.reset(self.start_step)
        self.labels: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None  # (B, N) staleness counts f; low = stale
        self.counted: torch.Tensor | None = None  # (B, N) bool: the last selection's counted sets
        self.pruned_steps = 0

    def observe(self, step: int, output: torch.Tensor, indices: torch.Tensor | None) -> None:
        self._scorer.observe(step, output)

    # -- selection -------------------------------------------------------------------------------
    def _rows(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """Each sample's scored row: the conditional branch ``B + s`` of stacked branches, else row ``s``."""
        if x.shape[0] == 2 * b and b > 0:
            return x[b:]
        if x.shape[0] == b:
            return x
        raise ValueError(f"cat_reference: output has {x.shape[0]} rows for {b} samples (expected {b} or {2 * b})")

    def select(self, state: StepState) -> torch.Tensor:
        b, n, k = state.batch_size, state.num_tokens, state.k
        noise = self._rows(self._scorer.features(state.output, (b, n), state.device), b)
        self.pruned_steps += 1
        if self.labels is None:
            self._make_clusters(state)
        elif self.pruned_steps == 2:  # the authors' first later step: f = I(first selection)
            self.counts = self.counted.float()
        else:
            self.counts = self.decay * self.counts + self.counted.float()
        counts = self.counts if self.counts is not None else torch.zeros(b, n, device=state.device)
        stale_order = counts.sort(dim=1, stable=True).indices  # stalest first, ties to the lowest index
        counted = torch.zeros(b, n, dtype=torch.bool, device=state.device)
        for s in range(b):
            if self.pruned_steps == 1:
                rows = self._first(noise[s], s, k)
            else:
                rows = self._later(noise[s], s, k, stale_order[s])
            counted[s, rows] = True
        self.counted = counted
        if self.pad == "authors":
            return _authors_padding(stale_order, counted, k, int(k * (1 - self.cluster_share)))
        width = k if self.pad == "stalest" else int(counted.sum(1).max())
        return _complete(stale_order, counted, width)

    def _make_clusters(self, state: StepState) -> None:
        b = state.batch_size
        out = state.output
        out = (
            self._rows(out.float(), b) if out is not None else torch.zeros(b, state.num_tokens, 2, device=state.device)
        )
        out = video_channels(out, state.grid)
        features = self.feature_weight * out + positional_encoding(state.grid, out.shape[-1], out.device)
        self.labels = self._kmeans(features, state.grid)
        self.count = int(self.labels.max()) + 1
        edges = cluster_graph(self.labels, state.grid, self.count)
        self.members = [[(row == c).nonzero().squeeze(1) for c in range(self.count)] for row in self.labels]
        self.edges = [edges[:, edges[0] // self.count == s] % self.count for s in range(b)]
        self.empty = [torch.tensor([len(m) == 0 for m in row], device=state.device) for row in self.members]

    def _max_pool(self, noise: torch.Tensor, s: int) -> torch.Tensor:
        from torch_geometric.utils import scatter

        return scatter(noise, self.labels[s], dim=0, dim_size=self.count, reduce="max")

    def _cluster_order(self, scores: torch.Tensor, s: int) -> list[int]:
        """Clusters best first (ties to the lowest id); empty clusters last."""
        scores = scores.masked_fill(self.empty[s], float("-inf"))
        return scores.sort(descending=True, stable=True).indices.tolist()

    def _first(self, noise: torch.Tensor, s: int, k: int) -> torch.Tensor:
        """The first pruned step's cluster picks: ⌊k/10⌋ (at least 1) per cluster, best clusters first, cut to k."""
        from torch_geometric.nn import MultiAggregation, SimpleConv

        conv = SimpleConv(aggr=MultiAggregation(["mean", "mean", "max"], mode="sum"), combine_root="self_loop")
        scores = conv(self._max_pool(noise, s), self.edges[s].to(noise.device)).norm(dim=-1)
        norms = noise.norm(dim=-1)
        quota = max(1, k // 10)
        picked, total = [], 0
        for c in self._cluster_order(scores, s):
            idx = self.members[s][c]
            q = min(quota, len(idx))
            picked.append(idx[stable_top(norms[idx], q)])
            total += q
            if total > k:
                break
        return torch.cat(picked)[:k]

    def _later(self, noise: torch.Tensor, s: int, k: int, stale_order: torch.Tensor) -> torch.Tensor:
        """A later step's counted set: the cluster part united with the stalest ⌊(1 − share)·k⌋ tokens."""
        scores = self._max_pool(noise, s).norm(dim=-1)
        norms, counts = noise.norm(dim=-1), self.counts[s]
        unit = max(1, int((k // 5) * self.cluster_share))
        budget = k * self.cluster_share
        with_stale = self.pruned_steps >= int(self.cluster_stale_from)
        picked, total = [], 0
        for i, c in enumerate(self._cluster_order(scores, s)):
            idx = self.members[s][c]
            q = min(unit, len(idx))
            q = min(q * (3 - i), len(idx)) if i < 3 else q
            local = stable_top(norms[idx], q)
            if with_stale and (i != 0 or self.best_cluster_stale):
                local = torch.unique(torch.cat([local, stable_top(counts[idx], int(q * 0.5), largest=False)]))
            picked.append(idx[local])
            total += len(local)
            if total > budget:
                break
        part = torch.cat(picked)[: int(budget)]
        return torch.unique(torch.cat([part, stale_order[: int(k * (1 - self.cluster_share))]]))


def _authors_padding(order: torch.Tensor, chosen: torch.Tensor, k: int, start: int) -> torch.Tensor:
    """``(B, k)``: each row's chosen tokens (index order), then ``order[start : start + k − |chosen|]``.

    The authors' padding: the slice after the ⌊(1 − share)·k⌋ stalest, which may repeat
    chosen tokens (a row then holds fewer than k distinct tokens). The slice wraps around
    where it would run past N, so every row has k entries on any grid.
    """
    rows = []
    for s in range(chosen.shape[0]):
        own = chosen[s].nonzero().squeeze(1)
        rows.append(torch.cat([own, order[s].roll(-start)[: k - len(own)]]))
    return torch.stack(rows)


def _complete(order: torch.Tensor, chosen: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, width)``: each row's chosen tokens (index order), then its first unchosen tokens in ``order``.

    Every row must hold at most ``width`` chosen tokens.
    """
    taken = chosen.gather(-1, order)
    need = width - chosen.sum(-1, keepdim=True)
    fill = torch.zeros_like(chosen).scatter(-1, order, (~taken) & ((~taken).cumsum(-1) <= need))
    # chosen tokens first (by index), then the fill in `order`
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    key = torch.where(
        chosen,
        torch.arange(order.shape[-1], device=order.device) - order.shape[-1],
        torch.where(fill, rank, torch.full_like(rank, order.shape[-1])),
    )
    return key.sort(dim=-1, stable=True).indices[..., :width]
