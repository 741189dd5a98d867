"""DuCa (dual feature caching, Zou et al., 2024): aggressive and conservative cached steps, alternating.

Read from the authors' PixArt-α and DiT implementations (``Shenyi-Z/DuCa``, ``DuCa-PixArt-alpha`` and
``DuCa-DiT``, ``cache_functions``) and written fresh on :class:`~catlab.selection.toca.ToCa`'s rules
and catlab's layer engine:

* with ``i`` the authors' step index (PixArt's sampler counts up from 0; DiT's, ``count_down``,
  down to 0), a step is **full** when it is the first or ``i`` is a multiple of the force interval;
  otherwise it is **conservative** (ToCa's partial step: attention reused, the cross-attention's
  and MLP's fresh tokens recomputed) when ``i mod interval`` is odd and **aggressive** when it is
  even: no block runs, the last block's output of the previous computed step stands in and only
  the final norm and projection run with this step's timestep;
* the force interval, set at each full step, is ToCa's ``round(fresh_threshold / (1 − w + 2w·i/n))``
  (PixArt: ``w = 0``; DiT: ``w = −0.4`` and 2 for the steps with ``i`` in ``[⌊0.2n⌋, ⌊0.4n⌋)``, the
  ``window``);
* fresh tokens are picked at **random** (so no attention map is needed and fused attention works)
  plus ToCa's cache-frequency (s3) and spatial (s4) terms; the fresh ratio follows ToCa's schedule
  (the DiT script: ``a = 2``, ``b = −0.2``, MLP factor 2.5, attention 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from catlab.registry import selectors
from catlab.selection.toca import ToCa, force_threshold


@selectors.register("duca")
@dataclass
class DuCa(ToCa):
    """DuCa: full, conservative (ToCa) and aggressive (whole-network reuse) steps; random fresh tokens."""

    alpha: float = 0.75
    start_step: int = 1
    fresh_threshold: int = 3
    force_weight: float = 0.0
    score: str = "random"
    #: the step index counts down to 0 (the authors' DiT sampler) rather than up from 0 (their PixArt one)
    count_down: bool = False
    #: shares of the step indices, ``[start, end)``, where a full step sets the force interval to 2 (the
    #: authors' DiT: ``[0.2, 0.4)``; ``[0, 0]``: none)
    window: tuple = (0.0, 0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        window = tuple(float(w) for w in self.window)
        if len(window) != 2 or not 0 <= window[0] <= window[1] <= 1:
            raise ValueError(
                f"duca: window must be [start, end] shares of the steps, 0 <= start <= end <= 1; got {self.window}"
            )
        self.window = window

    def step_index(self, step: int, num_steps: int) -> int:
        return num_steps - step if self.count_down else step - 1

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
