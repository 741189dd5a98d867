"""The head-to-head's entry point: :func:`catlab.sampler.sample` with every MAC counted as it runs.

:func:`generate` runs the sampler (same scheduler, seeds, conditioning, guidance,
reuse rules and step caches as ``python -m catlab.run``) with
:class:`~catlab.stepcache.macs.MacCounter` on, and returns the images with the
executed MACs per step, the form ``experiments/head_to_head.py`` tabulates.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from catlab.models.base import ModelAdapter
from catlab.reuse.base import Reuse
from catlab.sampler import SamplerConfig, sample
from catlab.selection.base import Policy
from catlab.stepcache.base import StepCache


@dataclass
class Generation:
    """Images plus the cost: executed MACs per step (transformer + selection) and a full step's MACs."""

    images: torch.Tensor
    latents: torch.Tensor
    step_macs: list[int] = field(default_factory=list)
    full_step_macs: int = 0
    computed_tokens: list[int] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return sum(self.step_macs)

    @property
    def macs_ratio(self) -> float:
        """Full model's MACs / this generation's MACs (> 1: cheaper)."""
        return self.full_step_macs * len(self.step_macs) / max(self.macs, 1)


def generate(adapter: ModelAdapter, policy: Policy, prompts: list[str], seeds: list[int], *, num_steps: int = 28,
             guidance_scale: float = 4.0, reuse: Reuse | None = None, step_cache: StepCache | None = None,
             reuse_time: str = "step", kv_reuse: Reuse | None = None) -> Generation:
    """One image per (prompt, seed), with executed MACs; the arguments are :func:`~catlab.sampler.sample`'s."""
    cfg = SamplerConfig(num_steps=num_steps, guidance_scale=guidance_scale, progress=False, count_macs=True)
    result = sample(adapter, policy, prompts, seeds, cfg, reuse, step_cache, kv_reuse=kv_reuse,
                    reuse_time=reuse_time)
    trace = result.trace
    return Generation(images=result.images, latents=result.latents,
                      step_macs=[s.macs + s.selection_macs for s in trace.steps],
                      full_step_macs=trace.full_step_macs, computed_tokens=[s.kept for s in trace.steps])
