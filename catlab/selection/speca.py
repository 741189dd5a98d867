"""``speca``: speculative caching (SpeCa, Liu et al., 2025) as a catlab step schedule.

SpeCa forecasts whole steps with TaylorSeer and verifies the forecast: after
``min_taylor_steps`` forecast steps in a row, each further forecast step also
computes a little of the real model and measures the forecast's relative L1 error
against it; if that error exceeds a threshold that decays over the run,
``base_threshold · decay_rate ** progress`` (at least ``min_threshold``), the next
step is a full one. At most ``max_taylor_steps`` forecast steps follow one another,
and steps ``1..start_step`` (the authors' ``first_enhance``) alternate full and
forecast steps as their code does (a full step is always followed by a forecast).

In catlab's planner a forecast step is a SKIP (no transformer call; the reuse rule,
``reuse=taylor``, forecasts every token) and a verifying step is a PRUNED step that
computes ``⌊α·N⌋`` random tokens (``alpha`` is the verification share; the rest are
forecast by the reuse rule). The policy keeps its own Newton history of the computed
outputs (order ``order``, step time) and compares its forecast of the verified tokens
with what the model computed. A batch is one decision: with ``reduce="any"`` a full
step follows if any sample's error exceeds the threshold, with ``"mean"`` if the
batch's mean error does (what the authors' code computes). ``max_taylor_steps=0``
forecasts no step: the full model. See docs/selection.md (SpeCa) for every difference
from the authors' code::

    python -m catlab.run selector=speca reuse=taylor reuse.order=2
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catlab.registry import selectors
from catlab.reuse.rules import Taylor
from catlab.selection.base import Policy, StepState, kept_tokens

REDUCE = ("any", "mean")


def relative_l1(forecast: torch.Tensor, computed: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Per-sample mean of ``|forecast − computed| / (|computed| + eps)`` over tokens and channels, ``(B,)``."""
    err = (forecast.float() - computed.float()).abs() / (computed.float().abs() + eps)
    return err.flatten(1).mean(dim=1)


@selectors.register("speca")
@dataclass
class SpeCa(Policy):
    """Forecast steps, verified once ``min_taylor_steps`` have passed; a full step where verification fails.

    Defaults are the authors' DiT script (``dit/speca-dit/sample.py``); their FLUX
    defaults are ``base_threshold=7.0 decay_rate=0.3 min_threshold=0.1 max_taylor_steps=8``.
    """

    alpha: float = 0.04
    start_step: int = 3
    base_threshold: float = 0.1
    decay_rate: float = 0.01
    min_threshold: float = 0.01
    min_taylor_steps: int = 2
    max_taylor_steps: int = 5
    reduce: str = "any"
    order: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reduce not in REDUCE:
            raise ValueError(f"speca: reduce must be one of {REDUCE}; got {self.reduce!r}")
        if int(self.min_taylor_steps) < 0 or int(self.max_taylor_steps) < 0:
            raise ValueError(
                f"speca: min_taylor_steps and max_taylor_steps must be >= 0; got {self.min_taylor_steps}, "
                f"{self.max_taylor_steps}"
            )
        if not float(self.base_threshold) >= 0.0 or not float(self.decay_rate) > 0.0:
            raise ValueError(
                f"speca: base_threshold must be >= 0 and decay_rate > 0; got {self.base_threshold}, {self.decay_rate}"
            )
        if self.order not in (0, 1, 2):
            raise ValueError(f"speca: order must be 0, 1 or 2 (the forecast it verifies); got {self.order}")
        self._forget(0)

    @property
    def prunes(self) -> bool:
        return int(self.max_taylor_steps) > 0

    def reset(self, batch_size, grid, num_steps, device) -> None:
        super().reset(batch_size, grid, num_steps, device)
        self._forget(num_steps)

    def _forget(self, num_steps: int) -> None:
        self.num_steps = max(int(num_steps), 1)
        self.last: str | None = None
        self.counter, self.checking = 0, False
        self.error: float | None = None
        self.pending: tuple[int, torch.Tensor] | None = None  # the latest verification (step, error)
        self.history: Taylor | None = None
        #: the kind of every step decided ("full", "forecast", "verify") and every error measured, by step
        self.kinds: dict[int, str] = {}
        self.errors: dict[int, float] = {}

    def threshold(self, step: int) -> float:
        """The error a verified forecast may reach at ``step`` (1-based)."""
        progress = (step - 1) / self.num_steps
        return max(float(self.base_threshold) * float(self.decay_rate) ** progress, float(self.min_threshold))

    def record_error(self, step: int, error: float | torch.Tensor) -> None:
        """The verification error measured at ``step``; it decides the next step."""
        self.pending = (step, torch.as_tensor(error))  # read on the host at the next decision, not here

    def decide(self, step: int) -> str:
        """``"full"``, ``"forecast"`` or ``"verify"`` for ``step``; called once per step, in order."""
        if step in self.kinds:
            return self.kinds[step]
        if self.pending is not None:
            measured, self.pending = self.pending, None
            self.error = self.errors[measured[0]] = float(measured[1])
        if not self.prunes:
            kind = "full"
        elif self.last == "full":
            kind, self.counter, self.checking, self.error = "forecast", 1, False, None
        else:
            self.checking = self.counter >= int(self.min_taylor_steps)
            rejected = self.error is not None and self.error > self.threshold(step) and self.checking
            if step <= self.start_step or self.counter >= int(self.max_taylor_steps) or rejected:
                kind, self.counter = "full", 0
            else:
                kind, self.counter = "forecast", self.counter + 1
        if kind == "forecast" and self.checking:
            kind = "verify"
        self.last = "full" if kind == "full" else "forecast"
        self.kinds[step] = kind
        return kind

    def num_kept(self, step: int, num_tokens: int) -> int | None:
        kind = self.decide(step)
        if kind == "full":
            return None
        return 0 if kind == "forecast" else kept_tokens(self.alpha, num_tokens)

    def select(self, state: StepState) -> torch.Tensor:
        scores = torch.rand(state.batch_size, state.num_tokens, generator=self.generator)
        return scores.topk(state.k, dim=1).indices.to(state.device)

    def observe(self, step, output, indices) -> None:
        if self.history is None:
            self.history = Taylor(order=self.order)
            self.history.reset(output.shape[0], output.shape[1], output.shape[2], output.device, output.dtype)
        if indices is not None:  # a verifying step: the forecast of the computed tokens against the model
            index = indices.long()[..., None].expand(-1, -1, output.shape[-1])
            forecast = self.history.forecast(float(step)).gather(1, index)
            err = relative_l1(forecast, output.gather(1, index))
            self.record_error(step, err.max() if self.reduce == "any" else err.mean())
        self.history.compose(step, output, indices)
