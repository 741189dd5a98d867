"""Scorers: per-token importance from the model outputs (the exploitation part).

A scorer sees every step's output through :meth:`observe` and turns the latest
output into a ``(B, N)`` score (and signed ``(B, N, C)`` features for clustering).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catlab.registry import scorers


@scorers.register("relative_noise")
@dataclass
class RelativeNoise:
    """‖n_t − n_ref‖₂ over channels per token (paper Sec. 2.1–2.2).

    ``reference_step`` is the step whose output is n_ref; ``None`` means the step
    before the last unpruned one (t0 − 1), as the authors' code does: the first
    selection, made from the output of step t0, then already sees how each token
    moved in one step. Before any reference exists the reference is zero, so the
    score is the plain output magnitude.
    """

    reference_step: int | None = None

    def reset(self, start_step: int) -> None:
        self._ref_step = self.reference_step if self.reference_step is not None else max(start_step - 1, 1)
        self.reference: torch.Tensor | None = None

    def observe(self, step: int, output: torch.Tensor) -> None:
        if step == self._ref_step:
            self.reference = output.detach().clone()

    def features(self, output: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        """Signed relative noise ``(B, N, C)`` (zeros when nothing has been computed yet)."""
        if output is None:
            return torch.zeros(*shape, 1, device=device)
        output = output.float()
        return output if self.reference is None else output - self.reference.float()

    def score(self, output: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        """Relative noise magnitude per token, ``(B, N)``."""
        return self.features(output, shape, device).norm(dim=-1)
