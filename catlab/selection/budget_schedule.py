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
    policy: Policy = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pattern = tuple(float(p) for p in self.pattern)
        if not self.pattern or any(not 0.0 <= p <= 1.0 for p in self.pattern):
            raise ValueError(f"budget_schedule: pattern must be fractions in [0, 1]; got {self.pattern}")
        self.alpha = max(sum(self.pattern) / len(self.pattern), 1e-6)
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
        return self.pattern[(step - self.start_step - 1) % len(self.pattern)]

    def num_kept(self, step: int, num_tokens: int) -> int | None:
        frac = self.phase(step)
        if frac is None or frac >= 1.0:
            return None
        return 0 if frac == 0.0 else kept_tokens(frac, num_tokens)

    def reset(self, batch_size, grid, num_steps, device) -> None:
        super().reset(batch_size, grid, num_steps, device)
        self.policy.reset(batch_size, grid, num_steps, device)

    def select(self, state: StepState) -> torch.Tensor:
        return select_indices(self.policy, state)

    def observe(self, step, output, indices) -> None:
        self.policy.observe(step, output, indices)

    def selection_macs(self, state: StepState) -> int:
        return self.policy.selection_macs(state)
