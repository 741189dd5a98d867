"""Fixed synthetic model outputs for the golden tests of ``ras``.

One generation of ``NUM_STEPS`` steps per seed: the output of step t (1-based) is
``fresh[t - 1]``, a token-space tensor ``(1, N, p·p·C)`` with channels ordered
``(p, q, c)`` as SD3's unpatchify reads them: a persistent random field plus
per-step noise whose size grows over the steps. Only seeded CPU ``torch`` draws.

    from tests.golden.ras_inputs import make_fresh, to_latent
    fresh = make_fresh(seed=0, grid=8)        # (NUM_STEPS, 1, 64, 64)
    to_latent(fresh[0], grid=8)                # (1, C, 2·grid, 2·grid), the latent image
"""

from __future__ import annotations

import torch

NUM_STEPS = 28
CHANNELS = 16
PATCH = 2


def make_fresh(seed: int, grid: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n, c = grid * grid, PATCH * PATCH * CHANNELS
    scale = torch.linspace(0.5, 1.5, NUM_STEPS)[:, None, None, None]
    return torch.randn(NUM_STEPS, 1, n, c, generator=g) * scale + torch.randn(1, 1, n, c, generator=g)


def to_latent(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """``(B, N, p·p·C)`` tokens to the ``(B, C, p·grid, p·grid)`` latent they unpatchify to."""
    b = tokens.shape[0]
    x = tokens.reshape(b, grid, grid, PATCH, PATCH, CHANNELS).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, CHANNELS, grid * PATCH, grid * PATCH)
