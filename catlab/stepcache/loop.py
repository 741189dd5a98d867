"""A denoising loop with a reuse rule and a step cache: the reference for wiring both into the sampler.

It is :func:`catlab.sampler.sample` (same scheduler, seeds, conditioning and
guidance) plus three things: a :class:`~catlab.reuse.base.Reuse` rule applied
inside the transformer through a :class:`~catlab.reuse.hook.ReuseHook`, an
optional :class:`~catlab.stepcache.base.StepCache`, and a
:class:`~catlab.stepcache.macs.MacCounter` that counts what really ran.
Hook order (innermost first): pruner gather/scatter, reuse hook, step cache.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from catlab.models.base import ModelAdapter
from catlab.pruning.engine import TokenPruner
from catlab.pruning.families import family_of, patchify
from catlab.reuse.base import Reuse, unpatchify
from catlab.reuse.hook import ReuseHook
from catlab.reuse.kv import KVReuse
from catlab.selection.base import Policy, StepState
from catlab.stepcache.base import StepCache, StepCacheError
from catlab.stepcache.macs import MacCounter


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


@torch.inference_mode()
def generate(adapter: ModelAdapter, policy: Policy, prompts: list[str], seeds: list[int], *, num_steps: int = 28,
             guidance_scale: float = 4.0, reuse: Reuse | None = None, step_cache: StepCache | None = None,
             reuse_time: str = "step", kv_reuse: Reuse | None = None) -> Generation:
    """One image per (prompt, seed). ``reuse_time``: ``"step"`` (1-based index) or ``"sigma"`` (the scheduler's).

    ``kv_reuse``: a rule for the unselected tokens' per-layer K/V too (see :mod:`catlab.reuse.kv`).
    """
    policy.check(num_steps)
    transformer = adapter.transformer
    if step_cache is not None and policy.prunes and not step_cache.composes_with_pruning:
        raise StepCacheError(f"step cache '{step_cache.name}' compares block residuals between steps; with token "
                             f"pruning those residuals belong to different tokens. Compose pruning with "
                             f"'taylorseer' (mode=output), or run '{step_cache.name}' alone.")
    if reuse_time not in ("step", "sigma"):
        raise ValueError(f"reuse_time must be 'step' or 'sigma'; got {reuse_time!r}")
    pruner = TokenPruner(transformer).attach() if policy.prunes else None
    if pruner is not None:
        pruner.probe_layers = set(getattr(policy, "attention_layers", ()))
    hook = ReuseHook(pruner, reuse).attach() if (pruner is not None and reuse is not None) else None
    kv = KVReuse(pruner, kv_reuse).attach() if (pruner is not None and kv_reuse is not None) else None
    applied = step_cache is not None and getattr(step_cache, "_transformer", None) is None
    counter = MacCounter(transformer).attach()
    try:
        if applied:
            step_cache.apply(transformer)
        if step_cache is not None:
            step_cache.reset()
        return _loop(adapter, policy, prompts, seeds, num_steps, guidance_scale, pruner, (hook, kv), step_cache,
                     counter, reuse_time)
    finally:
        counter.detach()
        if kv is not None:
            kv.detach()
        if applied:
            step_cache.remove(transformer)
        if hook is not None:
            hook.detach()
        if pruner is not None:
            pruner.detach()


def _loop(adapter, policy, prompts, seeds, num_steps, guidance_scale, pruner, hooks, step_cache, counter, reuse_time):
    hook, kv = hooks
    device = adapter.torch_device
    guidance = guidance_scale > 1.0
    batch = len(prompts)
    scheduler = adapter.make_scheduler()
    scheduler.set_timesteps(num_steps, device=device)
    cond = adapter.encode(prompts, guidance)
    latents = adapter.initial_latents(seeds)
    grid = adapter.grid
    n = grid[0] * grid[1]
    rows = batch * cond.groups
    policy.reset(batch, grid, num_steps, device)
    spec = family_of(adapter.transformer)
    result = Generation(images=None, latents=None,
                        full_step_macs=spec.macs(adapter.transformer, rows, n, n, cond.num_text_tokens))
    output = None
    for i, t in enumerate(scheduler.timesteps):
        step = i + 1
        # a step the cache forecasts computes no token: the policy is asked only on computed steps
        forecast = step_cache is not None and step_cache.computes(i) is False
        k = None if forecast else policy.num_kept(step, n)
        idx, sel_macs = None, 0
        if k == 0:  # nothing to compute: the reuse rule forecasts every token, no transformer call
            if hook is None:
                raise ValueError(f"policy '{policy.name}' computes no token at step {step}: that needs a reuse rule")
            rows_out = hook.reuse.compose(step, pruner.output_cache, torch.zeros(rows, 0, dtype=torch.long,
                                          device=device), float(scheduler.sigmas[i]) if reuse_time == "sigma" else None)
            pred = unpatchify(rows_out, adapter.patch_size, *latents.shape[-2:])
            result.step_macs.append(0)
            result.computed_tokens.append(0)
            pred = _guide(pred, guidance, guidance_scale)
            output = patchify(pred, adapter.patch_size)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
            continue
        if k is not None:
            probes = ({layer: p[-batch:] for layer, p in pruner.attention.items()}
                      if pruner is not None and pruner.probe_layers and pruner.attention else None)
            state = StepState(step=step, num_steps=num_steps, grid=grid, batch_size=batch, k=k, output=output,
                              attention=probes, device=device)
            idx = policy.select(state)
            sel_macs = policy.selection_macs(state) + (
                pruner.probe_macs(rows, cond.num_text_tokens, k) if pruner is not None else 0)
        if pruner is not None:
            pruner.set_indices(idx, rows)
        for h in (hook, kv):
            if h is not None:
                h.step, h.time = step, (float(scheduler.sigmas[i]) if reuse_time == "sigma" else None)
        ctx = step_cache.context(i, num_steps) if step_cache is not None else contextlib.nullcontext()
        calls = len(counter.calls)
        with ctx:
            pred = adapter.predict(torch.cat([latents] * cond.groups), t, cond)
        pred = _guide(pred, guidance, guidance_scale)
        output = patchify(pred, adapter.patch_size)
        if not forecast:
            policy.observe(step, output, idx)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        result.step_macs.append(sum(counter.calls[calls:]) + sel_macs)
        result.computed_tokens.append(0 if forecast else n if k is None else k)
    result.latents = latents
    result.images = adapter.decode(latents)
    return result


def _guide(pred: torch.Tensor, guidance: bool, scale: float) -> torch.Tensor:
    if not guidance:
        return pred
    uncond, text = pred.chunk(2)
    return uncond + scale * (text - uncond)
