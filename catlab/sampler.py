"""The generic denoising loop: policy → pruned forward → guidance → scheduler.

It knows no model family and no strategy: the adapter hides the first, the
policy the second, and the :class:`~catlab.pruning.engine.TokenPruner` turns
indices into pruned execution.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from catlab.models.base import ModelAdapter
from catlab.pruning.engine import TokenPruner
from catlab.pruning.families import patchify
from catlab.reuse.base import unpatchify
from catlab.pruning.sync_check import no_host_sync
from catlab.selection.base import Policy, StepState


@dataclass
class SamplerConfig:
    """How to denoise. ``guidance_scale <= 1`` disables classifier-free guidance."""

    num_steps: int = 28
    guidance_scale: float = 4.0
    progress: bool = True
    #: check every index tensor (shape, range, uniqueness); costs a host sync per step
    check_indices: bool = False
    #: synchronise the device around each step so per-step times are exact (off: no host sync)
    sync_timing: bool = False
    #: fail on any host synchronisation in a pruned step (selection, pruned forward, guidance,
    #: scheduler step); see :func:`catlab.pruning.sync_check.no_host_sync`. Slow: for tests.
    check_sync: bool = False

    def __post_init__(self) -> None:
        if int(self.num_steps) < 1:
            raise ValueError(f"sampler.num_steps must be >= 1; got {self.num_steps}")


@dataclass
class StepRecord:
    step: int
    kept: int
    macs: int
    selection_macs: int
    seconds: float
    #: time in the policy: select() and observe()
    selection_seconds: float


@dataclass
class Trace:
    """What happened at each step: indices, MACs, times. Feeds metrics and plots."""

    num_tokens: int
    grid: tuple[int, int]
    batch_size: int
    full_step_macs: int = 0
    steps: list[StepRecord] = field(default_factory=list)
    indices: list[torch.Tensor | None] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def macs(self) -> int:
        return sum(s.macs + s.selection_macs for s in self.steps)

    @property
    def full_macs(self) -> int:
        return self.full_step_macs * len(self.steps)

    @property
    def selection_seconds(self) -> float:
        return sum(s.selection_seconds for s in self.steps)


@dataclass
class SampleResult:
    images: torch.Tensor
    latents: torch.Tensor
    trace: Trace


def _check(idx: torch.Tensor, batch: int, k: int, n: int, name: str) -> None:
    if idx.shape != (batch, k) or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"selector '{name}' returned {tuple(idx.shape)} {idx.dtype}; expected ({batch}, {k}) integer indices")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(f"selector '{name}' returned indices outside [0, {n})")
    if (idx.sort(dim=1).values.diff(dim=1) == 0).any():
        raise ValueError(f"selector '{name}' returned repeated indices")


def _guard(cfg: SamplerConfig, k: int | None, what: str):
    """The host-sync guard for a pruned step when ``cfg.check_sync`` asks for it."""
    return no_host_sync(what) if cfg.check_sync and k is not None else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def sample(adapter: ModelAdapter, policy: Policy, prompts: list[str], seeds: list[int],
           config: SamplerConfig | None = None, reuse=None) -> SampleResult:
    """Generate one image per (prompt, seed) with ``policy`` choosing the recomputed tokens.

    ``reuse`` (a :mod:`catlab.reuse` rule) decides what the unselected tokens'
    outputs become at a pruned step; ``None`` (or ``copy``) keeps their last
    computed values, as the paper does. The policy always observes the output as
    computed, before any forecast.
    """
    cfg = config or SamplerConfig()
    policy.check(cfg.num_steps)
    device = adapter.torch_device
    guidance = cfg.guidance_scale > 1.0
    batch = len(prompts)

    pruner = TokenPruner(adapter.transformer).attach()
    pruner.probe_layers = set(getattr(policy, "attention_layers", ()))
    try:
        scheduler = adapter.make_scheduler()
        scheduler.set_timesteps(cfg.num_steps, device=device)
        cond = adapter.encode(prompts, guidance)
        latents = adapter.initial_latents(seeds)
        grid = adapter.grid
        n = grid[0] * grid[1]
        rows = batch * cond.groups
        policy.reset(batch, grid, cfg.num_steps, device)
        if reuse is not None:  # what the unselected tokens' outputs become (default: stale copies)
            reuse.reset(batch, n, adapter.patch_size ** 2 * adapter.latent_channels, device, adapter.torch_dtype)
        trace = Trace(num_tokens=n, grid=grid, batch_size=batch,
                      full_step_macs=pruner.macs(rows, cond.num_text_tokens, num_tokens=n))
        output = None
        start = time.perf_counter()
        for i, t in enumerate(tqdm(scheduler.timesteps, disable=not cfg.progress, desc=policy.name, leave=False)):
            step = i + 1
            if cfg.sync_timing:
                _sync(device)
            t0 = time.perf_counter()
            k = policy.num_kept(step, n)
            idx, sel_macs = None, 0
            if k is not None:
                state = StepState(step=step, num_steps=cfg.num_steps, grid=grid, batch_size=batch, k=k,
                                  output=output, attention=_sample_attention(pruner, batch), device=device)
                with _guard(cfg, k, f"the selection of step {step} ({policy.name})"):
                    idx = policy.select(state)
                    sel_macs = policy.selection_macs(state) + pruner.probe_macs(rows, cond.num_text_tokens, k)
                if cfg.check_indices:
                    _check(idx, batch, k, n, policy.name)
            if cfg.sync_timing:
                _sync(device)
            t1 = time.perf_counter()
            with _guard(cfg, k, f"the pruned step {step}"):
                pruner.set_indices(idx, rows)
                pred = adapter.predict(torch.cat([latents] * cond.groups), t, cond)
                if guidance:
                    uncond, text = pred.chunk(2)
                    pred = uncond + cfg.guidance_scale * (text - uncond)
                output = patchify(pred, adapter.patch_size)
                t_obs = time.perf_counter()
                policy.observe(step, output, idx)  # a policy's bookkeeping counts as selection time
                observe_seconds = time.perf_counter() - t_obs
                if reuse is not None:
                    composed = reuse.compose(step, output, idx)
                    if idx is not None:
                        pred = unpatchify(composed, adapter.patch_size, pred.shape[-2], pred.shape[-1])
                latents = scheduler.step(pred, t, latents, return_dict=False)[0]
            if cfg.sync_timing:
                _sync(device)
            t2 = time.perf_counter()
            kept = n if k is None else k
            trace.steps.append(StepRecord(step, kept, pruner.macs(rows, cond.num_text_tokens, num_tokens=n, kept=kept),
                                          sel_macs, t2 - t0, (t1 - t0) + observe_seconds))
            trace.indices.append(None if idx is None else idx.detach())  # stays on the device until the end
        _sync(device)
        trace.seconds = time.perf_counter() - start
        trace.indices = [None if idx is None else idx.cpu() for idx in trace.indices]
        images = adapter.decode(latents)
    finally:
        pruner.detach()
    return SampleResult(images=images, latents=latents, trace=trace)


def _sample_attention(pruner: TokenPruner, batch: int) -> dict[int, torch.Tensor] | None:
    """Probe maps per sample: the conditional rows (the last ``batch`` rows)."""
    if not pruner.probe_layers or not pruner.attention:
        return None
    return {layer: probs[-batch:] for layer, probs in pruner.attention.items()}
