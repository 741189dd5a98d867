"""AT-EDM's token selection (Wang et al., CVPR 2024) on catlab's cache-and-reuse.

AT-EDM ranks tokens by Generalized Weighted PageRank over an attention map: a
token is important when important tokens attend to it. It prunes the least
important tokens; catlab recomputes the most important ``k`` and reuses the
cached values of the rest (the paper's AT-EDM baseline: pruning from step 9,
30% kept). Its denoising-steps-aware schedule, which prunes less in early steps,
is available as ``schedule: step_aware``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from catlab.registry import selectors
from catlab.selection.base import Policy, StepState, kept_tokens
from catlab.selection.ranking import device_generator, top_k


def gwpr(attention: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Generalized Weighted PageRank importance, ``(B, N, N)`` → ``(B, N)`` summing to 1.

    ``attention[b, i, j]`` is how much query token i attends to key token j (rows
    renormalised to sum to 1). Power iteration from the uniform vector:
    ``s_j ← Σ_i attention[i, j] · s_i``, renormalised each step.
    """
    a = attention.float()
    row_sums = a.sum(-1).clamp_min(1e-12)  # renormalise rows through s, without copying the N×N map
    s = torch.full(a.shape[:2], 1.0 / a.shape[1], device=a.device)
    for _ in range(iterations):
        s = torch.bmm((s / row_sums)[:, None, :], a)[:, 0]
        s = s / s.sum(-1, keepdim=True).clamp_min(1e-12)
    return s


@selectors.register("atedm")
@dataclass
class ATEDM(Policy):
    """Keep the k tokens of highest G-WPR importance, from the probe layers' attention maps.

    ``attention_layers`` are transformer block indices whose image→image attention
    the sampler records (their maps are averaged); the default 3 is the middle of
    the embedded 6-block model (use 12 for SD3-medium's 24 blocks). With
    ``schedule: step_aware`` the kept fraction falls linearly over the pruned steps
    from ``alpha·(1 + spread)`` to ``alpha·(1 − spread)``, the same budget on average.
    """

    attention_layers: tuple[int, ...] = (3,)
    iterations: int = 20
    schedule: str = "constant"
    spread: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.attention_layers = tuple(int(i) for i in self.attention_layers)
        if not self.attention_layers:
            raise ValueError("atedm needs at least one attention layer to probe")
        if self.schedule not in ("constant", "step_aware"):
            raise ValueError(f"schedule must be 'constant' or 'step_aware'; got {self.schedule!r}")

    def check(self, num_steps: int) -> None:
        super().check(num_steps)
        if self.start_step < 1:
            raise ValueError("atedm needs start_step >= 1: its first selection reads the attention of a full step")

    def reset(self, batch_size: int, grid: tuple[int, int], num_steps: int, device: torch.device) -> None:
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
                f"atedm needs the attention probabilities of layers {self.attention_layers}; "
                "the sampler did not provide them"
            )
        importance = gwpr(maps[0] if len(maps) == 1 else torch.stack(maps).mean(0), self.iterations)
        return top_k(importance, state.k, self.generator)

    def selection_macs(self, state: StepState) -> int:
        return self.iterations * state.batch_size * state.num_tokens**2
