"""Fixed synthetic model outputs for the golden tests of ``cat_reference``.

One generation of ``num_steps`` steps per ``(seed, grid)``: the output of step t is
a smooth random field that drifts mostly inside a few Gaussian blobs, with the
drift shrinking over the steps (the outputs converge, as a sampler's do).
Two rows per sample, stacked as classifier-free guidance stacks them,
unconditional first: ``(2, N, C)`` for one prompt.

Every value is exactly representable in float16, so code that keeps an output in
half precision (as the authors' compiled path keeps its reference) sees the same
numbers as code that keeps float32. Only seeded CPU ``torch`` draws and
deterministic operations are used, so the outputs are the same on every machine.

    from tests.golden.cat_inputs import make_outputs
    outs = make_outputs(seed=0, grid=(64, 64))        # (num_steps, 2, N, C)
    outs[t - 1]                                       # the output of step t (1-based)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_STEPS = 28
CHANNELS = 64
NUM_BLOBS = 5


def _smooth(gen: torch.Generator, channels: int, grid: tuple[int, int], coarse: int = 4) -> torch.Tensor:
    """A smooth random field ``(N, C)``: Gaussian noise on a coarse grid, bilinearly upsampled."""
    h, w = grid
    ch, cw = max(2, h // coarse), max(2, w // coarse)
    low = torch.randn(1, channels, ch, cw, generator=gen)
    field = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=True)[0]
    return field.permute(1, 2, 0).reshape(h * w, channels)


def _blobs(gen: torch.Generator, grid: tuple[int, int]) -> torch.Tensor:
    """Weight ``(N, 1)`` in (0, 1]: a faint floor plus ``NUM_BLOBS`` Gaussian blobs of random place and width."""
    h, w = grid
    i = torch.arange(h, dtype=torch.float32).repeat_interleave(w) / h
    j = torch.arange(w, dtype=torch.float32).repeat(h) / w
    centre = torch.rand(NUM_BLOBS, 2, generator=gen)
    width = 0.05 + 0.1 * torch.rand(NUM_BLOBS, generator=gen)
    d2 = (i[None] - centre[:, :1]) ** 2 + (j[None] - centre[:, 1:]) ** 2
    mask = torch.exp(-d2 / (2 * width[:, None] ** 2)).sum(0).clamp(max=1.0)
    return (0.05 + 0.95 * mask)[:, None]


def make_outputs(seed: int, grid: tuple[int, int], num_steps: int = NUM_STEPS, channels: int = CHANNELS
                 ) -> torch.Tensor:
    """The outputs of every step, ``(num_steps, 2, N, C)`` float32 (rows: unconditional, conditional)."""
    gen = torch.Generator().manual_seed(1000 + int(seed))
    mask = _blobs(gen, grid)
    rows = []
    for _ in range(2):  # unconditional, then conditional: each its own field and drift
        field = _smooth(gen, channels, grid)
        steps = []
        for t in range(1, num_steps + 1):
            drift = _smooth(gen, channels, grid, coarse=2) * mask * (1.5 / t ** 0.5)
            detail = 0.02 * torch.randn(grid[0] * grid[1], channels, generator=gen) * mask
            field = field + drift + detail
            steps.append(field)
        rows.append(torch.stack(steps))
    out = torch.stack(rows, dim=1)  # (steps, 2, N, C)
    return out.half().float()
