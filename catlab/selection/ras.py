"""``ras``: Region-Adaptive Sampling (Liu et al., 2025), as a catlab selector.

At each pruned step RAS ranks the tokens by the spread of the model's latest output
(``metric="std"``: the standard deviation over the latent channels of each latent
pixel, averaged over the token's ``patch_size × patch_size`` pixels; ``"l2norm"``:
the channel norm instead), multiplied by a starvation factor
``exp(starvation_scale · drop_count)`` where ``drop_count`` counts how often the
token was left out (it starts at ``-(num_steps + 1)``, as the authors' does). Of the
``d = N − k`` tokens left out, ``round-down(d · high_ratio)`` are those with the
*largest* scaled metric and the rest those with the *smallest*; the ``k`` in the
middle of the ranking are recomputed. Left-out tokens keep their previous output
(catlab's output cache, i.e. no reuse rule or ``reuse=copy``) and their keys and
values stay in each layer's K/V cache — both what the authors' code does.

Steps ``1..start_step`` and the ``reset_steps`` (the authors' "error reset" steps)
run every token; so do the steps after ``end_step``. The drop count per step is
``N − ⌊α·N⌋`` (catlab's one budget rule), or, with ``drop_step_length > 0``, the
authors' dynamic schedule: the drop count moves by ``drop_step`` every
``drop_step_length`` steps around its mean and is rounded down to a multiple of
``drop_multiple``.

Step numbers are catlab's (1-based): the authors' SD3 script's
``--error_reset_steps 12,20`` (0-based) are ``reset_steps=[13, 21]``. The token
output's channels are ordered ``(p, q, c)`` for SD3, PixArt and DiT
(``channel_layout="patch_major"``) and ``(c, p, q)`` for the packed FLUX and
Qwen-Image tokens (``"channel_major"``). See docs/selection.md (RAS) for every
difference from the authors' code::

    python -m catlab.run selector=ras
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catlab.registry import selectors
from catlab.selection.base import Policy, StepState, kept_tokens

METRICS = ("std", "l2norm")
LAYOUTS = ("patch_major", "channel_major")


def ras_metric(output: torch.Tensor, patch_size: int, metric: str = "std", layout: str = "patch_major"):
    """Per-token spread ``(B, N)`` of a token-space output ``(B, N, p·p·c)``.

    The spread of each latent pixel over its ``c`` channels (unbiased standard
    deviation, or the L2 norm), averaged over the token's ``p × p`` pixels.
    """
    b, n, ch = output.shape
    p = int(patch_size)
    if ch % (p * p):
        raise ValueError(f"ras: patch_size={p} does not divide the output's {ch} channels per token into p*p pixels")
    x = output.float().reshape(b, n, p, p, ch // (p * p))
    if layout == "channel_major":
        x = output.float().reshape(b, n, ch // (p * p), p, p).permute(0, 1, 3, 4, 2)
    if metric == "std":  # unbiased, as the authors'; a single channel has no spread (0, not NaN)
        per_pixel = x.std(dim=-1, correction=1 if x.shape[-1] > 1 else 0)
    else:
        per_pixel = x.norm(p=2, dim=-1)
    return per_pixel.mean(-1).mean(-1)


def dynamic_drop_counts(
    num_tokens: int, alpha: float, num_steps: int, start_step: int, step: int, length: int, multiple: int
) -> list[int]:
    """The drop count of every step (0-based list) of the authors' dynamic schedule, before warm-up and resets.

    Blocks of ``length`` steps share a count; block ``i`` drops ``mean + step·(i − c)`` tokens with
    ``c = ((num_steps + start_step) // length) // 2``, rounded down to a multiple of ``multiple``.
    """
    mean = int((1 - float(alpha)) * num_tokens)
    centre = ((num_steps + start_step) // length) // 2
    return [((mean + step * (s // length - centre)) // multiple) * multiple for s in range(num_steps)]


@selectors.register("ras")
@dataclass
class RAS(Policy):
    """Recompute the middle of the spread ranking; drop the flattest and (``high_ratio``) the spikiest tokens.

    Defaults are the authors' SD3 script (28 steps, 1024², sample ratio 0.5).
    """

    alpha: float = 0.5
    start_step: int = 4
    end_step: int | None = None
    reset_steps: tuple[int, ...] = (13, 21)
    metric: str = "std"
    starvation_scale: float = 0.1
    high_ratio: float = 0.3
    patch_size: int = 2
    channel_layout: str = "patch_major"
    drop_step: int = 0
    drop_step_length: int = 0
    drop_multiple: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.metric not in METRICS:
            raise ValueError(f"ras: metric must be one of {METRICS}; got {self.metric!r}")
        if self.channel_layout not in LAYOUTS:
            raise ValueError(f"ras: channel_layout must be one of {LAYOUTS}; got {self.channel_layout!r}")
        if not 0.0 <= float(self.high_ratio) <= 1.0:
            raise ValueError(f"ras: high_ratio must be in [0, 1]; got {self.high_ratio}")
        if int(self.patch_size) < 1:
            raise ValueError(f"ras: patch_size must be >= 1; got {self.patch_size}")
        if int(self.drop_step_length) < 0 or int(self.drop_multiple) < 1:
            raise ValueError(
                f"ras: drop_step_length must be >= 0 and drop_multiple >= 1; got {self.drop_step_length}, "
                f"{self.drop_multiple}"
            )
        self.reset_steps = tuple(int(s) for s in self.reset_steps)
        self.num_steps, self.drop_count, self._dynamic = 0, None, None

    def reset(self, batch_size, grid, num_steps, device) -> None:
        super().reset(batch_size, grid, num_steps, device)
        self.num_steps = int(num_steps)
        self.drop_count: torch.Tensor | None = None
        self._dynamic: list[int] | None = None

    def is_ras_step(self, step: int) -> bool:
        """Whether ``step`` (1-based) recomputes only part of the tokens."""
        end = self.end_step if self.end_step is not None else step
        return self.start_step < step <= end and step not in self.reset_steps

    def drop(self, step: int, num_tokens: int) -> int:
        """Tokens left out at a RAS step."""
        if int(self.drop_step_length) == 0:
            return num_tokens - kept_tokens(self.alpha, num_tokens)
        if self._dynamic is None:
            self._dynamic = dynamic_drop_counts(
                num_tokens,
                self.alpha,
                self.num_steps,
                self.start_step,
                int(self.drop_step),
                int(self.drop_step_length),
                int(self.drop_multiple),
            )
        d = self._dynamic[step - 1] if step - 1 < len(self._dynamic) else self._dynamic[-1]
        if not 0 <= d <= num_tokens:
            raise ValueError(
                f"ras: the dynamic schedule (drop_step={self.drop_step}, drop_step_length={self.drop_step_length}) "
                f"drops {d} of {num_tokens} tokens at step {step}; it must stay in [0, {num_tokens}]"
            )
        return d

    def num_kept(self, step: int, num_tokens: int) -> int | None:
        if not self.is_ras_step(step):
            return None
        return num_tokens - self.drop(step, num_tokens)

    def select(self, state: StepState) -> torch.Tensor:
        if state.output is None:
            raise RuntimeError("ras needs a full step before it selects (start_step >= 1)")
        n, k = state.num_tokens, state.k
        score = ras_metric(state.output, self.patch_size, self.metric, self.channel_layout)
        if self.drop_count is None:
            self.drop_count = torch.full_like(score, -float(self.num_steps + 1))
        score = score * torch.exp(float(self.starvation_scale) * self.drop_count)
        order = score.sort(dim=1, stable=True).indices  # ascending
        dropped = n - k
        high = int(dropped * float(self.high_ratio))
        low = dropped - high
        left_out = torch.cat([order[:, :low], order[:, n - high :]], dim=1)
        self.drop_count.scatter_add_(1, left_out, torch.ones_like(left_out, dtype=self.drop_count.dtype))
        return order[:, low : n - high].to(state.device)
