"""ToCa (token-wise feature caching, Zou et al., ICLR 2025), at layer granularity.

Read from the authors' PixArt-α implementation (``Shenyi-Z/ToCa``, ``cache_functions``) and
written fresh for catlab's layer engine (``catlab/pruning/layerwise.py``):

* **forced full steps.** Step 1 (``start_step`` steps) runs every token of every module; after
  that a step is full when its index is a multiple of the *force threshold* set at the last full
  step, ``round(fresh_threshold / (1 − w + 2w·i/n))`` (``w = force_weight``; the index ``i`` counts
  steps from 0). A full step resets every cache and counter.
* **partial steps.** Each block's self-attention output is reused whole from the last full step;
  its cross-attention and MLP recompute only their *fresh* tokens, chosen per layer and per
  module, and reuse their cached outputs for the rest.
* **fresh-ratio schedule** (``ratio_schedule: toca``): ``alpha`` (the authors' ``fresh_ratio``)
  × ``(1 + a − 2a·i/n)`` over steps × ``(1 + b − 2b·l/(L−1))`` over layers × a factor per module
  (``cross_weight``, ``mlp_weight``), clamped to [0, 1]; ``k = int(ratio·N)``.
* **scores** of a module's tokens, highest fresh: a base score (``score``), plus the cache
  frequency ``soft_fresh_weight × (partial steps since the token was last fresh in this
  module) / fresh_threshold`` (s3), then the spatial-uniformity bonus (s4): in every
  ``bonus_grid × bonus_grid`` patch of the token grid the best token's score grows by
  ``bonus_ratio`` times itself.

Base scores: ``cross_entropy`` (s2, ToCa's PixArt score: the entropy of each token's cross-attention
over the text, its two guidance branches' maps mixed; the layer engine writes the cross-attention
out to keep its N×L map, rows refreshed with the fresh tokens), ``frequency`` (none: s3 and s4
alone), ``random`` (uniform, one draw per sample shared by its guidance branches) and ``attention``
(s1, ToCa's FLUX and DiT score: the attention each token received in the block's self-attention at the
last full step, averaged over heads and queries, its guidance branches' mixed; the layer engine computes
it beside the SDPA call, a chunk of queries at a time). ``docs/selection.md`` lists every difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from catlab.capabilities import Capability
from catlab.grid import Grid
from catlab.registry import selectors
from catlab.selection.base import Policy, StepState

SCORES = ("frequency", "random", "cross_entropy", "attention")
SCHEDULES = ("toca", "constant")


# -- the rules, as small pure functions -----------------------------------------------------------
def schedule_factor(weight: float, position: float, span: float) -> float:
    """``1 + w − 2w·position/span``: 1 + w at the start, 1 − w at the end (ToCa's linear ramps)."""
    return 1 + weight - 2 * weight * position / span


def force_threshold(fresh_threshold: int, index: int, num_steps: int, weight: float) -> float:
    """Steps between forced full steps, set at a full step of index ``index`` (0-based): the threshold
    divided by ``1 − w + 2w·index/num_steps``, rounded half to even in single precision as the authors'."""
    factor = torch.tensor(1 - weight + 2 * weight * index / num_steps)
    return max(1.0, float(torch.round(fresh_threshold / factor)))  # at least 1: a step index is taken modulo it


def fresh_count(ratio: float, num_tokens: int) -> int:
    """``int(clamp(ratio, 0, 1)·N)`` in single precision (the authors' arithmetic)."""
    return int(torch.tensor(ratio).clamp(0, 1) * num_tokens)


def spatial_bonus(score: torch.Tensor, hw: tuple[int, int], bonus_ratio: float, grid: int) -> torch.Tensor:
    """ToCa's uniform spatial distribution (s4): in each ``grid × grid`` patch of an ``(h, w)`` token grid,
    the best token's score is multiplied by ``1 + bonus_ratio`` (the first best on ties). A grid that does not
    split into whole patches has smaller patches at its bottom and right edges."""
    rows, n = score.shape
    h, w = hw
    ph, pw = -(-h // grid), -(-w // grid)  # patches per column and row, edge patches partial
    padded = score.new_full((rows, ph * grid, pw * grid), float("-inf"))
    padded[:, :h, :w] = score.reshape(rows, h, w)
    patches = padded.reshape(rows, ph, grid, pw, grid).permute(0, 1, 3, 2, 4).reshape(rows, -1, grid * grid)
    best, where = patches.max(dim=-1, keepdim=True)
    patches = patches + torch.zeros_like(patches).scatter(-1, where, 1.0) * best * bonus_ratio
    out = patches.reshape(rows, ph, pw, grid, grid).permute(0, 1, 3, 2, 4).reshape(rows, ph * grid, pw * grid)
    return out[:, :h, :w].reshape(rows, n)


def cache_frequency(counter: torch.Tensor, fresh_threshold: int, weight: float) -> torch.Tensor:
    """s3: ``weight × counter / fresh_threshold``, ``counter`` the partial steps since each token was last fresh."""
    return weight * counter.float() / fresh_threshold


def attention_received(cond: torch.Tensor, uncond: torch.Tensor, cond_weight: float = 0.5) -> torch.Tensor:
    """s1: the attention each image token received ``(B, N)`` (mean over heads and queries), the two guidance
    branches' mixed by ``cond_weight``, L2-normalised over the tokens."""
    return F.normalize(cond_weight * cond + (1 - cond_weight) * uncond, dim=1, p=2)


def cross_attention_entropy(cond: torch.Tensor, uncond: torch.Tensor, cond_weight: float = 0.5) -> torch.Tensor:
    """s2: each image token's entropy over the text of its cross-attention map ``(B, N, L)``, the two guidance
    branches' maps mixed by ``cond_weight``, as ``normalize(1 + entropy)`` over the tokens."""
    cmap = cond_weight * cond + (1 - cond_weight) * uncond
    entropy = -(cmap * torch.log(cmap + 1e-7)).sum(-1)
    return F.normalize(1 + entropy, dim=1, p=2)


def top_fresh(score: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scored tokens per row, best first (ties: the lower position)."""
    return score.sort(dim=-1, descending=True, stable=True).indices[:, :k]


def mark_fresh(counter: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """The cache-frequency counter after a partial step: +1 for every token, 0 for the fresh ones."""
    return (counter + 1).scatter(1, fresh, 0)


@selectors.register("toca")
@dataclass
class ToCa(Policy):
    """ToCa: per layer and module, recompute the best-scored fresh tokens; forced full steps (module docstring).

    ``alpha`` is ToCa's ``fresh_ratio`` (before the schedule's factors); ``start_step`` steps run full
    first (ToCa's first step). ``fresh_threshold: 1`` makes every step full: the stock model.
    """

    capabilities: ClassVar[Capability] = Capability.LAYER_SELECTION

    alpha: float = 0.3
    start_step: int = 1
    fresh_threshold: int = 3
    force_weight: float = 0.2
    ratio_schedule: str = "toca"
    step_weight: float = 0.9
    layer_weight: float = 0.6
    cross_weight: float = 0.6
    mlp_weight: float = 1.6
    score: str = "frequency"
    soft_fresh_weight: float = 0.25
    bonus_ratio: float = 0.4
    bonus_grid: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.fresh_threshold) < 1:
            raise ValueError(
                f"{self.name}: fresh_threshold must be >= 1 (1: every step full); got {self.fresh_threshold}"
            )
        if self.score not in SCORES:
            raise ValueError(f"{self.name}: score must be one of {SCORES}; got {self.score!r}")
        if self.ratio_schedule not in SCHEDULES:
            raise ValueError(f"{self.name}: ratio_schedule must be one of {SCHEDULES}; got {self.ratio_schedule!r}")
        if int(self.bonus_grid) < 1:
            raise ValueError(f"{self.name}: bonus_grid must be >= 1; got {self.bonus_grid}")

    # -- the step's plan ---------------------------------------------------------------------------
    def num_kept(self, step: int, num_tokens: int) -> int | None:
        return None  # no token set between steps: the layer engine selects inside each forward

    def select(self, state: StepState) -> torch.Tensor:
        raise RuntimeError(f"{self.name} selects per layer and module inside each forward, not between steps")

    def reset(self, batch_size: int, grid: Grid, num_steps: int, device: torch.device) -> None:
        super().reset(batch_size, grid, num_steps, device)
        self.begin_layers(batch_size, grid, num_steps, getattr(self, "num_layers", 1), device)

    def begin_layers(self, batch: int, grid: Grid, num_steps: int, num_layers: int, device) -> None:
        """A generation starts (the layer engine calls it): its grid, layer count and empty counters."""
        self.generator = torch.Generator(device="cpu").manual_seed(int(self.seed))
        grid = tuple(int(g) for g in grid)
        self.hw = (grid[-2] * (grid[0] if len(grid) == 3 else 1), grid[-1])
        self.batch, self.num_layers, self.device = batch, max(1, int(num_layers)), device
        self.threshold = float(self.fresh_threshold)
        self.counters: dict[tuple[int, str], torch.Tensor] = {}

    def step_index(self, step: int, num_steps: int) -> int:
        """The authors' step index of catlab's 1-based ``step`` (ToCa's PixArt sampler counts up from 0)."""
        return step - 1

    def step_kind(self, step: int, num_steps: int) -> str:
        """``"full"`` or ``"partial"`` (the layer engine asks once per forward); a full step resets the counters."""
        i = self.step_index(step, num_steps)
        if step <= self.start_step or i % self.threshold == 0:
            self.threshold = force_threshold(int(self.fresh_threshold), i, num_steps, float(self.force_weight))
            self.counters = {}
            return "full"
        return "partial"

    # -- one module's fresh tokens -----------------------------------------------------------------
    def module_weight(self, role: str) -> float:
        return float(self.cross_weight) if role == "cross" else float(self.mlp_weight)

    def fresh_ratio(self, step: int, num_steps: int, layer: int, role: str) -> float:
        """The scheduled fresh ratio of ``layer``'s ``role`` module at ``step`` (before clamping)."""
        if self.ratio_schedule == "constant":
            return float(self.alpha)
        i = self.step_index(step, num_steps)
        return (
            float(self.alpha)
            * schedule_factor(float(self.layer_weight), layer, max(1, self.num_layers - 1))
            * schedule_factor(float(self.step_weight), i, num_steps)
            * self.module_weight(role)
        )

    @property
    def needs_cross_maps(self) -> bool:
        """Whether the layer engine must keep each layer's cross-attention map (``score: cross_entropy``)."""
        return self.score == "cross_entropy"

    @property
    def needs_attention_maps(self) -> bool:
        """Whether the layer engine must keep the attention each token received (``score: attention``)."""
        return self.score == "attention"

    def base_score(self, rows: int, num_tokens: int, layer: int = 0) -> torch.Tensor:
        if self.score == "attention":
            received = getattr(self, "attention_maps", {}).get(layer)
            if received is None:
                raise RuntimeError(f"{self.name}: no attention map of layer {layer} yet (a full step first)")
            b = self.batch
            cond, uncond = (received[-b:], received[:b]) if received.shape[0] >= 2 * b else (received[-b:],) * 2
            return attention_received(cond.float(), uncond.float())
        if self.score == "cross_entropy":
            cmap = getattr(self, "cross_maps", {}).get(layer)
            if cmap is None:
                raise RuntimeError(f"{self.name}: no cross-attention map of layer {layer} yet (a full step first)")
            b = self.batch
            cond, uncond = (cmap[-b:], cmap[:b]) if cmap.shape[0] >= 2 * b else (cmap[-b:], cmap[-b:])
            return cross_attention_entropy(cond.float(), uncond.float())
        if self.score == "random":
            return torch.rand(self.batch, num_tokens, generator=self.generator).to(self.device)
        return torch.zeros(self.batch, num_tokens, device=self.device)

    def fresh_tokens(self, step: int, num_steps: int, layer: int, role: str, rows: int, num_tokens: int):
        """``(rows, k)`` fresh tokens of one module at a partial step; the sample's guidance branches share them."""
        k = fresh_count(self.fresh_ratio(step, num_steps, layer, role), num_tokens)
        key = (layer, role)
        counter = self.counters.get(key)
        if counter is None:
            counter = torch.zeros(self.batch, num_tokens, dtype=torch.int32, device=self.device)
        score = self.base_score(rows, num_tokens, layer)
        score = score + cache_frequency(counter, int(self.fresh_threshold), float(self.soft_fresh_weight))
        if self.bonus_ratio:
            score = spatial_bonus(score, self.hw, float(self.bonus_ratio), int(self.bonus_grid))
        fresh = top_fresh(score, k)
        self.counters[key] = mark_fresh(counter, fresh)
        if rows % self.batch:
            raise RuntimeError(f"{self.name}: {rows} rows are not a multiple of {self.batch} samples")
        return fresh.repeat(rows // self.batch, 1)


__all__ = [
    "ToCa",
    "schedule_factor",
    "force_threshold",
    "fresh_count",
    "spatial_bonus",
    "cache_frequency",
    "cross_attention_entropy",
    "attention_received",
    "top_fresh",
    "mark_fresh",
]
