"""Forecast every token, recompute the few the forecast gets most wrong, full steps only when the rest drift.

``adaptive_schedule`` chooses between two kinds of step, full or forecast-only, from one
number per step: the mean estimated error of forecasting *every* token. That error is
not spread evenly over the image: a few tokens (edges, the parts still being formed)
carry most of it. :class:`AdaptiveRefresh` forecasts every token with ``reuse=taylor``
but at each step after the warm-up also recomputes the ``k = ⌊α·N⌋`` tokens whose
estimated forecast error is largest (gathered, computed, scattered back by the engine),
so that only the remaining tokens' errors count towards the next full step.

Per token ``i`` the estimate is ``forecast_error``'s: the second divided difference of
its own history of computed outputs (full steps and its refreshes) times the node
polynomial, ``e_i = |[y0, y1, y2]_i| · |(s − t0_i)(s − t1_i)|`` — what the order-1
forecast leaves out at step ``s``. A refresh step's error is the mean of ``e_i`` over
the tokens *not* refreshed (the refreshed ones are exact), divided by the mean norm of
the tokens' newest outputs. These errors are summed since the last full step (the
drift accumulates in the latents, as in ``adaptive_schedule``); a step whose sum would
pass ``threshold``, or the step after ``max_skip`` refresh steps in a row, is full.
Tokens whose history is too short to estimate (fewer than three computations) make
the step full. ``threshold = 0`` runs every step full (the full model); ``alpha = 1``
refreshes every token (the full model's outputs).

One host read per step after the warm-up (the decision, in :meth:`num_kept`), as
``adaptive_schedule``; :meth:`select` only returns the tokens ranked there. Registered
as the selector ``adaptive_refresh``::

    python -m catlab.run selector=adaptive_refresh reuse=taylor selector.alpha=0.1 selector.threshold=0.3
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catlab.registry import selectors
from catlab.selection.base import StepState, kept_tokens
from catlab.selection.forecast_error import ForecastError
from catlab.selection.ranking import top_k


@selectors.register("adaptive_refresh")
@dataclass
class AdaptiveRefresh(ForecastError):
    """After ``start_step`` full steps: refresh steps (⌊α·N⌋ least trustworthy tokens) while the rest's error allows.

    ``alpha``: the share of tokens recomputed at a refresh step. ``threshold``: the summed
    relative error of the unrefreshed tokens allowed between two full steps (0: every
    step full). ``max_skip``: at most this many refresh steps in a row.
    """

    alpha: float = 0.1
    start_step: int = 3
    threshold: float = 0.3
    max_skip: int = 8
    forecast_steps: bool = True
    partial: str = "push"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not float(self.threshold) >= 0.0:
            raise ValueError(f"adaptive_refresh: threshold must be >= 0; got {self.threshold}")
        if int(self.max_skip) < 0:
            raise ValueError(f"adaptive_refresh: max_skip must be >= 0; got {self.max_skip}")
        if self.partial not in ("push", "output"):
            raise ValueError(f"adaptive_refresh: partial must be 'push' or 'output'; got {self.partial!r}")

    def reset(self, batch_size, grid, num_steps, device) -> None:
        super().reset(batch_size, grid, num_steps, device)
        self.accumulated, self.skipped = 0.0, 0
        self.chosen: torch.Tensor | None = None
        #: per step, the refreshed-token count (``None``: a full step), for inspection and tests
        self.decisions: dict[int, int | None] = {}
        #: the estimated error of the unrefreshed tokens at every refresh step taken, by step
        self.estimates: dict[int, float] = {}

    def refresh_plan(self, step: int, k: int) -> tuple[torch.Tensor, float, float]:
        """The ``(B, k)`` tokens with the largest estimated error at ``step``, and the relative errors of
        forecasting every token and of forecasting all but those (one host read for both)."""
        score = self.score(step)  # (B, N), inf where a token's history is too short
        chosen = top_k(score, k, self.generator)
        rest = score.scatter(1, chosen, torch.zeros_like(chosen, dtype=score.dtype))
        scale = self.history.values[:, :, 0].norm(dim=-1).mean().clamp_min(1e-12)
        every, others = (torch.stack([score.mean(), rest.mean()]) / scale).tolist()
        return chosen, every, others

    def num_kept(self, step: int, num_tokens: int) -> int | None:
        if step in self.decisions:
            return self.decisions[step]
        kept = None
        if step > self.start_step and self.skipped < self.max_skip and self.threshold > 0 and self.history is not None:
            k = kept_tokens(self.alpha, num_tokens)
            chosen, every, others = self.refresh_plan(step, k)  # inf with too short a history
            if self.forecast_steps and self.accumulated + every <= self.threshold:
                kept, err, self.chosen = 0, every, None
            elif self.accumulated + others <= self.threshold:
                kept, err, self.chosen = k, others, chosen
            if kept is not None:
                self.accumulated += err
                self.skipped += 1
                self.estimates[step] = err
        if kept is None:
            self.accumulated, self.skipped, self.chosen = 0.0, 0, None
        self.decisions[step] = kept
        return kept

    def observe(self, step, output, indices) -> None:
        if indices is None or self.partial == "push":  # as the taylor rule's histories do
            super().observe(step, output, indices)

    def select(self, state: StepState) -> torch.Tensor:
        if self.chosen is None or self.chosen.shape[1] != state.k:
            raise RuntimeError(f"adaptive_refresh: step {state.step} was not planned as a refresh step")
        return self.chosen.to(state.device)
