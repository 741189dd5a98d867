"""``atedm_reuse``: AT-EDM's ranking on CAT's cache-and-reuse, the CAT paper's AT-EDM baseline.

The CAT paper (Sec. 3.1) compares against AT-EDM (Wang et al., CVPR 2024) by
"combining the token selection algorithm in AT-EDM and the cache-and-reuse
mechanism": tokens are ranked by Generalized Weighted PageRank over probe layers'
attention maps from earlier steps, and one index set per step is recomputed by
every block, the rest reused from the cache (pruning from step 9, 30 % kept).
AT-EDM itself prunes inside each step: that is ``selector=atedm``
(``catlab/selection/atedm.py``). ``schedule: step_aware`` is a linear ramp of the
kept share over the pruned steps, a stand-in for AT-EDM's DSAP.
G-WPR reads only the attention map, not the grid's shape: on a video grid it ranks
every token of the clip at once (the attention is over space and time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from catlab.capabilities import Capability
from catlab.grid import Grid
from catlab.registry import selectors
from catlab.selection.base import Policy, StepState, kept_tokens
from catlab.selection.gwpr import gwpr
from catlab.selection.ranking import device_generator, top_k

__all__ = ["ATEDMReuse", "gwpr"]


@selectors.register("atedm_reuse")
@dataclass
class ATEDMReuse(Policy):
    """Keep the k tokens of highest G-WPR importance, from the probe layers' attention maps.

    ``attention_layers`` are transformer block indices whose image→image attention
    the sampler records (their maps are averaged); the default 3 is the middle of
    the embedded 6-block model (use 12 for SD3-medium's 24 blocks). With
    ``schedule: step_aware`` the kept fraction falls linearly over the pruned steps
    from ``alpha·(1 + spread)`` to ``alpha·(1 − spread)``, the same budget on average.
    """

    capabilities: ClassVar[Capability] = Capability.ATTENTION_PROBES

    attention_layers: tuple[int, ...] = (3,)
    iterations: int = 20
    schedule: str = "constant"
    spread: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.attention_layers = tuple(int(i) for i in self.attention_layers)
        if not self.attention_layers:
            raise ValueError("atedm_reuse needs at least one attention layer to probe")
        if self.schedule not in ("constant", "step_aware"):
            raise ValueError(f"schedule must be 'constant' or 'step_aware'; got {self.schedule!r}")

    def check(self, num_steps: int) -> None:
        super().check(num_steps)
        if self.start_step < 1:
            raise ValueError(
                "atedm_reuse needs start_step >= 1: its first selection reads the attention of a full step"
            )

    def reset(self, batch_size: int, grid: Grid, num_steps: int, device: torch.device) -> None:
        super().reset(batch_size, grid, num_steps, device)
        self.generator = device_generator(self.seed, device)
        self.num_steps = num_steps

    def num_kept(self, step: int, num_tokens: int) -> int | None:
        k = super().num_kept(step, num_tokens)
        if k is None or self.schedule == "constant":
            return k
        pruned = max(getattr(self, "num_steps", step) - self.start_step, 1)
        progress = (step - self.start_step - 1) / max(pruned - 1, 1)  # 0 at the first pruned step, 1 at the last
        alpha = self.alpha * (1 + self.spread * (1 - 2 * progress))
        return kept_tokens(min(alpha, 1.0), num_tokens)

    def select(self, state: StepState) -> torch.Tensor:
        maps = [state.attention[i] for i in self.attention_layers if state.attention and i in state.attention]
        if not maps:
            raise RuntimeError(
                f"atedm_reuse needs the attention probabilities of layers {self.attention_layers}; "
                "the sampler did not provide them"
            )
        importance = gwpr(maps[0] if len(maps) == 1 else torch.stack(maps).mean(0), self.iterations)
        return top_k(importance, state.k, self.generator)

    def selection_macs(self, state: StepState) -> int:
        return self.iterations * state.batch_size * state.num_tokens**2
