"""A per-step token budget: full steps, forecast-only steps and pruned steps in one repeating pattern.

Step-level caching and token pruning are two ends of one knob: how many tokens a
step computes. :class:`BudgetSchedule` wraps any selector and, after the warm-up,
cycles through ``pattern``: ``1`` = a full step, ``0`` = no token computed (the
reuse rule forecasts every token and the transformer is not called), any other
fraction = a pruned step where the wrapped selector picks that share of tokens.
With ``taylor`` reuse, ``pattern=(1, 0, 0)`` is TaylorSeer's schedule at token
granularity; ``(1, 0.2, 0)`` spends a small budget on the tokens the selector
thinks the forecast gets most wrong.

At a ``0`` budget :func:`catlab.sampler.sample` does not call the transformer:
the reuse rule forecasts every token (``reuse=taylor``), or without a rule the
previous step's prediction is used again. Registered as the selector
``budget_schedule``::

    python -m catlab.run selector=budget_schedule reuse=taylor \
        selector.inner=forecast_error 'selector.pattern=[1,0.3,0,0]'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from catlab.registry import selectors
from catlab.selection.base import Policy, StepState, build_part, kept_tokens, select_indices


@selectors.register("budget_schedule")
@dataclass
class BudgetSchedule(Policy):
    """``inner`` (a selector spec) picks the tokens of the pruned steps; ``pattern`` repeats after ``start_step``.

    ``alpha`` is not a setting here: it is set to the pattern's mean budget (what logs
    and tables show as the kept share).
    """

    inner: Mapping[str, Any] | str | Policy = "forecast_error"
    pattern: tuple[float, ...] = (1.0, 0.3, 0.0, 0.0)
    #: where the repeating pattern is anchored: ``"start"`` (its first entry at step start_step + 1) or ``"end"``
    #: (its first entry at the next-to-last step, so that a pattern ``[1, 0, ...]`` ends on a full step followed
    #: by a one-step forecast, whatever the step count; see docs/beyond_copy.md, "Where the pattern ends")
    align: str = "start"
    policy: Policy = field(default=None, init=False, repr=False)
    _num_steps: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pattern = tuple(float(p) for p in self.pattern)
        if not self.pattern or any(not 0.0 <= p <= 1.0 for p in self.pattern):
            raise ValueError(f"budget_schedule: pattern must be fractions in [0, 1]; got {self.pattern}")
        self.alpha = max(sum(self.pattern) / len(self.pattern), 1e-6)
        if self.align not in ("start", "end"):
            raise ValueError(f"budget_schedule: align must be 'start' or 'end'; got {self.align!r}")
        spec = self.inner
        if isinstance(spec, (str, Mapping)):
            spec = {"name": spec} if isinstance(spec, str) else dict(spec)
            spec.setdefault("start_step", self.start_step)
        self.policy = build_part(selectors, spec)
        self.attention_layers = tuple(self.policy.attention_layers)

    def phase(self, step: int) -> float | None:
        """The budget of ``step``: ``None`` during the warm-up, else the pattern's fraction."""
        if step <= self.start_step:
            return None
        anchor = self.start_step + 1
        if self.align == "end":
            if self._num_steps is None:
                raise RuntimeError("budget_schedule: align='end' needs the step count: reset() first")
            anchor = self._num_steps - 1
        return self.pattern[(step - anchor) % len(self.pattern)]

    def num_kept(self, step: int, num_tokens: int) -> int | None:
        frac = self.phase(step)
        if frac is None or frac >= 1.0:
            return None
        return 0 if frac == 0.0 else kept_tokens(frac, num_tokens)

    def reset(self, batch_size, grid, num_steps, device) -> None:
        super().reset(batch_size, grid, num_steps, device)
        self._num_steps = int(num_steps)
        self.policy.reset(batch_size, grid, num_steps, device)

    def select(self, state: StepState) -> torch.Tensor:
        return select_indices(self.policy, state)

    def observe(self, step, output, indices) -> None:
        self.policy.observe(step, output, indices)

    def selection_macs(self, state: StepState) -> int:
        return self.policy.selection_macs(state)
