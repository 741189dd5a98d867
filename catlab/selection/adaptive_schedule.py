"""Full steps where the forecast is expected to fail, forecast-only steps elsewhere.

A fixed schedule (TaylorSeer's interval, a ``budget_schedule`` pattern) spends its
full steps evenly, although the denoising trajectory bends more at some steps
than at others. :class:`AdaptiveSchedule` measures the bend on the outputs it has
computed and places the next full step where the order-1 forecast (``reuse=taylor``)
would drift too far.

From the last three computed outputs ``y0, y1, y2`` (at steps ``s0 > s1 > s2``) it
takes the second divided difference ``d2``; the order-1 Newton forecast through
``y0, y1`` then misses step ``s`` by about the next term, ``d2·(s − s0)(s − s1)``
(with ``order=0``, copy reuse, by ``d1·(s − s0)``). Its estimated relative error
is that term's mean norm over the tokens, divided by the mean norm of ``y0``.
Forecast steps follow one another while their estimated errors, summed since the
last full step (the drift accumulates in the latents), stay within
``threshold`` and there are at most ``max_skip`` of them; then a full step comes.
The threshold is the knob: larger, fewer full steps, more MACs saved.
``force_full`` names steps that run in full whatever the estimate (negative:
counted from the end): ``[-2]`` ends the schedule on a full step before the last,
so that the last step is forecast from one step away (docs/beyond_copy.md, "Where
the pattern ends", measures what that phase is worth on fixed patterns).

The decision is one per batch (the batch's mean error), as for diffusers' MagCache,
and like it reads one number on the host per step after the warm-up (the estimate,
a few reductions over the last outputs); the steps themselves select nothing.
Registered as the selector ``adaptive_schedule``::

    python -m catlab.run selector=adaptive_schedule reuse=taylor selector.threshold=0.1
"""

from __future__ import annotations

from dataclasses import dataclass, field

from catlab.registry import selectors
from catlab.selection.base import Policy


@selectors.register("adaptive_schedule")
@dataclass
class AdaptiveSchedule(Policy):
    """After ``start_step`` full steps: forecast-only steps while the estimated forecast error allows.

    ``threshold``: the summed relative error allowed between two full steps (0: every
    step full, the full model). ``max_skip``: at most this many forecast steps in a
    row. ``order``: the forecast the reuse rule makes (1: ``taylor``, 0: ``copy``).
    ``alpha`` is not a setting: it is set to ``1 / (1 + max_skip)``, the fewest full
    steps the schedule may take (the kept share tables show).
    """

    threshold: float = 0.1
    max_skip: int = 4
    order: int = 1
    #: steps that run in full whatever the estimate, 1-based; negative ones count from the end (-1: the last)
    force_full: tuple[int, ...] = ()
    _history: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not float(self.threshold) >= 0.0:
            raise ValueError(f"adaptive_schedule: threshold must be >= 0; got {self.threshold}")
        if int(self.max_skip) < 0:
            raise ValueError(f"adaptive_schedule: max_skip must be >= 0; got {self.max_skip}")
        if self.order not in (0, 1):
            raise ValueError(f"adaptive_schedule: order must be 0 (copy reuse) or 1 (taylor); got {self.order}")
        forced = list(self.force_full or ())
        if not all(isinstance(s, int) and not isinstance(s, bool) and s != 0 for s in forced):
            raise ValueError(
                f"adaptive_schedule: force_full must list non-zero step numbers (1-based; negative from the end); "
                f"got {self.force_full!r}"
            )
        self.force_full = tuple(forced)
        self.alpha = 1.0 / (1 + int(self.max_skip))
        self.num_steps: int | None = None
        self._forget()

    def reset(self, batch_size, grid, num_steps, device) -> None:
        super().reset(batch_size, grid, num_steps, device)
        self.num_steps = int(num_steps)
        self._forget()

    def check(self, num_steps: int) -> None:
        super().check(num_steps)
        outside = [s for s in self.force_full if not 1 <= (s if s > 0 else num_steps + 1 + s) <= num_steps]
        if outside:
            raise ValueError(
                f"adaptive_schedule: force_full names step {outside[0]}, outside the run's {num_steps} steps "
                f"(1..{num_steps}, or -1..-{num_steps} from the end)"
            )

    def forced(self) -> set[int]:
        """The steps ``force_full`` names, as 1-based steps of this generation."""
        if not self.force_full:
            return set()
        if self.num_steps is None:
            raise RuntimeError("adaptive_schedule: force_full needs the step count: reset() first")
        return {s if s > 0 else self.num_steps + 1 + s for s in self.force_full}

    def _forget(self) -> None:
        self._history = []  # (step, output) of the last order + 2 computed steps, newest first
        self.accumulated, self.skipped = 0.0, 0
        self.decisions: dict[int, int | None] = {}
        #: the estimated error of every forecast step taken, by step (for inspection and tests)
        self.estimates: dict[int, float] = {}

    def estimate(self, step: int) -> float | None:
        """The estimated relative error of forecasting ``step`` from the outputs seen (``None``: too few yet)."""
        if len(self._history) < self.order + 2:
            return None
        (s0, y0), (s1, y1) = self._history[0], self._history[1]
        d1 = (y0 - y1) / (s0 - s1)
        if self.order == 0:
            term = d1 * (step - s0)
        else:
            s2, y2 = self._history[2]
            d2 = (d1 - (y1 - y2) / (s1 - s2)) / (s0 - s2)
            term = d2 * ((step - s0) * (step - s1))
        scale = y0.norm(dim=-1).mean().clamp_min(1e-12)
        return float(term.norm(dim=-1).mean() / scale)

    def num_kept(self, step: int, num_tokens: int) -> int | None:
        if step in self.decisions:
            return self.decisions[step]
        kept = None
        if (
            step > self.start_step
            and self.skipped < self.max_skip
            and self.threshold > 0
            and step not in self.forced()
        ):
            err = self.estimate(step)
            if err is not None and self.accumulated + err <= self.threshold:
                kept = 0
                self.accumulated += err
                self.skipped += 1
                self.estimates[step] = err
        if kept is None:
            self.accumulated, self.skipped = 0.0, 0
        self.decisions[step] = kept
        return kept

    def select(self, state):
        raise RuntimeError("adaptive_schedule takes full or forecast-only steps: it never selects tokens")

    def observe(self, step, output, indices) -> None:
        if indices is None:  # a full step's output (B, N, C)
            self._history = [(step, output.detach().clone()), *self._history][: self.order + 2]
