"""Forecast every token, recompute the few the forecast gets most wrong, full steps only when the rest drift.

``adaptive_schedule`` chooses between two kinds of step, full or forecast-only, from one
number per step: the mean estimated error of forecasting *every* token. That error is
not spread evenly over the image: a few tokens (edges, the parts still being formed)
carry much of it (``experiments/forecast_error_maps.py``). :class:`AdaptiveRefresh`
adds a third kind of step between the two: a *refresh* step, which forecasts every token
with ``reuse=taylor`` but recomputes the ``k = ⌊α·N⌋`` tokens whose estimated forecast
error is largest (gathered, computed, scattered back by the engine), so that only the
remaining tokens' errors count towards the next full step.

Per token ``i`` the estimate is ``forecast_error``'s: the second divided difference of
its own history of computed outputs times the node polynomial,
``e_i = |[y0, y1, y2]_i| · |(s − t0_i)(s − t1_i)|`` — what the order-1 forecast leaves out
at step ``s``. Relative errors divide by the mean norm of the tokens' newest outputs.
After the warm-up each step is, in this order of preference:

* forecast-only (``forecast_steps``, no token computed) if the summed error since the
  last full step plus this step's mean ``e`` over every token stays within ``threshold``;
* a refresh step if that sum plus the mean ``e`` with the ``k`` largest set to zero (the
  refreshed tokens are computed) stays within it;
* else full, as is the step after ``max_skip`` forecast or refresh steps in a row, and a
  step where tokens have too short a history to estimate (fewer than three computations).

``threshold = 0`` runs every step full (the full model); ``alpha = 1`` with
``forecast_steps=False`` refreshes every token (the full model's outputs, through the
pruned path). ``partial`` must match the ``taylor`` rule's: with ``"push"`` a refreshed
token's output becomes the newest node of its history (and of the estimate's), with
``"output"`` it serves its own step only and the histories keep full steps' nodes (a
refreshed token reads the other tokens' stale keys and values, so its value is close
but not exact, and pushed one step after a full one that error enters the divided
difference over a one-step gap).

One host read per step after the warm-up (the decision, in :meth:`num_kept`), as
``adaptive_schedule``; :meth:`select` only returns the tokens ranked there. Registered
as the selector ``adaptive_refresh``::

    python -m catlab.run selector=adaptive_refresh selector.alpha=0.1 selector.threshold=0.8 \
        selector.partial=output reuse=taylor +reuse.partial=output
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
    """After ``start_step`` full steps: forecast or refresh steps (⌊α·N⌋ least trustworthy tokens) while allowed.

    ``alpha``: the share of tokens recomputed at a refresh step. ``threshold``: the summed
    relative error of the unrefreshed tokens allowed between two full steps (0: every
    step full). ``max_skip``: at most this many forecast or refresh steps in a row.
    ``forecast_steps``: allow steps that compute no token. ``partial``: the ``taylor``
    rule's setting of the same name (``"push"`` or ``"output"``), for the estimate.
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
