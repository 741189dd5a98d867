"""Generalized Weighted PageRank (G-WPR): token importance from an attention map.

AT-EDM's ranking, shared by both AT-EDM variants: ``atedm_reuse`` ranks tokens
between steps from probe layers' maps, and the in-step engine of ``atedm``
(:mod:`catlab.pruning.instep`) ranks them inside a forward. Neither imports the other.
"""

from __future__ import annotations

import torch


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
