"""DuCa (dual feature caching, Zou et al., 2024): aggressive and conservative cached steps, alternating.

Read from the authors' DiT implementation (``Shenyi-Z/DuCa``, ``DuCa-DiT/cache_functions``) and
written fresh on :class:`~catlab.selection.toca.ToCa`'s rules and catlab's layer engine:

* the authors' step index counts *down* (``i = n − step``, DiT's sampler): a step is **full** when it
  is the first or ``i`` is a multiple of the force interval; otherwise it is **conservative**
  (ToCa's partial step: attention reused, the MLP's fresh tokens recomputed) when ``i mod interval``
  is odd and **aggressive** when it is even: no block runs, the last block's output of the previous
  computed step stands in and only the final norm and projection run with this step's timestep.
* the force interval, set at each full step: ``round(fresh_threshold / (1 + w − 2w·i/n))`` with
  ``w = 0.4`` (``force_weight: -0.4`` in ToCa's form), and 2 for the steps with ``i`` in
  ``[⌊0.2n⌋, ⌊0.4n⌋)``;
* fresh tokens are picked at **random** (so no attention map is needed and fused attention works)
  plus ToCa's cache-frequency (s3) and spatial (s4: 2×2 patches, bonus 0.8) terms; the fresh ratio is
  ``alpha × (1 + a − 2a·i/n) × (1 + b − 2b·l/(L−1)) × 2.5`` for the MLP (``a = 2``, ``b = −0.2``),
  so the earliest cached steps recompute no token and the last ones the most.
"""

from __future__ import annotations

from dataclasses import dataclass

from catlab.registry import selectors
from catlab.selection.toca import ToCa, force_threshold


@selectors.register("duca")
@dataclass
class DuCa(ToCa):
    """DuCa: full, conservative (ToCa) and aggressive (whole-network reuse) steps; random fresh tokens."""

    alpha: float = 0.05
    start_step: int = 1
    fresh_threshold: int = 3
    force_weight: float = -0.4
    step_weight: float = 2.0
    layer_weight: float = -0.2
    cross_weight: float = 0.0
    mlp_weight: float = 2.5
    score: str = "random"
    soft_fresh_weight: float = 0.25
    bonus_ratio: float = 0.8
    bonus_grid: int = 2
    #: the share of the steps, from its start, where the force interval is 2 (the authors' [0.2n, 0.4n))
    window: tuple = (0.2, 0.4)

    def __post_init__(self) -> None:
        super().__post_init__()
        window = tuple(float(w) for w in self.window)
        if len(window) != 2 or not 0 <= window[0] <= window[1] <= 1:
            raise ValueError(
                f"duca: window must be [start, end] shares of the steps, 0 <= start <= end <= 1; got {self.window}"
            )
        self.window = window

    def step_index(self, step: int, num_steps: int) -> int:
        return num_steps - step  # DiT's sampler counts its step index down to 0

    def interval(self, index: int, num_steps: int) -> float:
        """The force interval a full step of index ``index`` sets."""
        lo, hi = (int(num_steps * float(w)) for w in self.window)
        if lo <= index < hi and float(self.alpha) != 0:
            return 2.0
        return force_threshold(int(self.fresh_threshold), index, num_steps, float(self.force_weight))

    def step_kind(self, step: int, num_steps: int) -> str:
        i = self.step_index(step, num_steps)
        if step <= self.start_step or i % self.threshold == 0:
            self.threshold = self.interval(i, num_steps)
            self.counters = {}
            return "full"
        return "partial" if (i % self.threshold) % 2 == 1 else "reuse"


__all__ = ["DuCa"]
