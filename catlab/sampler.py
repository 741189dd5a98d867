"""The generic denoising loop: policy → pruned forward → guidance → scheduler.

It knows no model family and no strategy: the adapter hides the first, the
policy the second, and the :class:`~catlab.pruning.engine.TokenPruner` turns
indices into pruned execution.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from catlab.models.base import ModelAdapter
from catlab.pruning.engine import TokenPruner
from catlab.pruning.families import patchify
from catlab.pruning.sync_check import no_host_sync
from catlab.registry import selectors
from catlab.reuse.base import Reuse, unpatchify
from catlab.reuse.hook import ReuseHook
from catlab.reuse.kv import KVReuse
from catlab.selection.base import Policy, StepState
from catlab.stepcache.base import StepCache, StepCacheError
from catlab.stepcache.macs import MacCounter


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
    #: count the MACs that really ran (:class:`~catlab.stepcache.macs.MacCounter`) instead of the
    #: analytic formula; always on with a step cache. Equal on full and pruned steps; slower.
    count_macs: bool = False

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
           config: SamplerConfig | None = None, reuse: Reuse | None = None, step_cache: StepCache | None = None,
           *, kv_reuse: Reuse | None = None, reuse_time: str = "step") -> SampleResult:
    """Generate one image per (prompt, seed) with ``policy`` choosing the recomputed tokens.

    ``reuse`` (a :mod:`catlab.reuse` rule) decides what the unselected tokens'
    outputs become at a pruned step; ``None`` keeps their last computed values, as
    the paper does. The policy always observes the output as computed.

    A step whose budget is 0 tokens (``policy.num_kept(...) == 0``, e.g. a
    ``budget_schedule`` pattern) does not call the transformer: every token's
    output comes from the reuse rule (a forecast), or without one is the previous
    step's output.

    ``step_cache`` (a :mod:`catlab.stepcache` wrapper of diffusers' TaylorSeer,
    FirstBlockCache or MagCache) skips work inside the steps. With one, executed
    MACs are counted by :class:`~catlab.stepcache.macs.MacCounter` (what really ran),
    steps the cache forecasts ask the policy nothing, a reuse rule acts inside the
    transformer (so the cache records forecasts, not stale copies), and a cache that
    needs calibration is calibrated first on one full generation of this batch.
    ``kv_reuse`` also applies a rule to the stale K/V; ``reuse_time`` is the
    forecast's variable: ``"step"`` (1-based index) or ``"sigma"`` (the scheduler's).
    """
    cfg = config or SamplerConfig()
    policy.check(cfg.num_steps)
    check_composition(policy, step_cache)
    if reuse_time not in ("step", "sigma"):
        raise ValueError(f"reuse_time must be 'step' or 'sigma'; got {reuse_time!r}")
    if step_cache is not None and step_cache.needs_calibration and not step_cache.calibrated \
            and getattr(step_cache, "_transformer", None) is None:
        full = replace(cfg, progress=False, check_sync=False)
        step_cache.calibrate(adapter.transformer,
                             lambda: sample(adapter, selectors.build("full"), prompts, seeds, full, step_cache=step_cache))
    with contextlib.ExitStack() as stack:
        pruner, hooks, counter = _attach(stack, adapter.transformer, policy, cfg, reuse, step_cache, kv_reuse)
        return _loop(adapter, policy, prompts, seeds, cfg, reuse, step_cache, pruner, hooks, counter, reuse_time)


def check_composition(policy: Policy, step_cache: StepCache | None) -> None:
    """Token pruning inside a step cache's computed steps only where the cache allows it."""
    if step_cache is not None and policy.prunes and not step_cache.composes_with_pruning:
        raise StepCacheError(
            f"step cache '{step_cache.name}' compares block residuals between steps; with token pruning "
            f"(selector '{policy.name}') those residuals belong to different tokens. Compose pruning with "
            f"'taylorseer', or run '{step_cache.name}' with selector=full.")


def _attach(stack, transformer, policy, cfg, reuse, step_cache, kv_reuse):
    """Hooks, innermost first: pruner gather/scatter, reuse rule, K/V rule, step cache; plus the MAC counter."""
    pruner = TokenPruner(transformer).attach()
    stack.callback(pruner.detach)
    pruner.probe_layers = set(getattr(policy, "attention_layers", ()))
    hook = kv = None
    if reuse is not None and (step_cache is not None or kv_reuse is not None):
        hook = ReuseHook(pruner, reuse).attach()
        stack.callback(hook.detach)
    if kv_reuse is not None:
        kv = KVReuse(pruner, kv_reuse).attach()
        stack.callback(kv.detach)
    if step_cache is not None:
        if getattr(step_cache, "_transformer", None) is None:  # else: applied by the caller (calibration)
            step_cache.apply(transformer)
            stack.callback(step_cache.remove, transformer)
        step_cache.reset()
    counter = None
    if cfg.count_macs or step_cache is not None:
        counter = MacCounter(transformer).attach()
        stack.callback(counter.detach)
    return pruner, (hook, kv), counter


def _loop(adapter, policy, prompts, seeds, cfg, reuse, step_cache, pruner, hooks, counter, reuse_time):
    hook, kv = hooks
    device = adapter.torch_device
    guidance = cfg.guidance_scale > 1.0
    batch = len(prompts)
    scheduler = adapter.make_scheduler()
    scheduler.set_timesteps(cfg.num_steps, device=device)
    cond = adapter.encode(prompts, guidance)
    latents = adapter.initial_latents(seeds)
    grid = adapter.grid
    n = grid[0] * grid[1]
    rows = batch * cond.groups
    policy.reset(batch, grid, cfg.num_steps, device)
    outside = reuse if hook is None else None  # the rule after guidance, in token space (one row per sample)
    if outside is not None:
        outside.reset(batch, n, adapter.patch_size ** 2 * adapter.latent_channels, device, adapter.torch_dtype)
    trace = Trace(num_tokens=n, grid=grid, batch_size=batch,
                  full_step_macs=pruner.macs(rows, cond.num_text_tokens, num_tokens=n))
    output = pred = None
    start = time.perf_counter()
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not cfg.progress, desc=policy.name, leave=False)):
        step = i + 1
        if cfg.sync_timing:
            _sync(device)
        t0 = time.perf_counter()
        # a step the cache forecasts computes no token: the policy is asked only on computed steps
        forecast = step_cache is not None and step_cache.computes(i) is False
        k = None if forecast else policy.num_kept(step, n)
        idx, sel_macs = None, 0
        if k is not None and k > 0:
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
        sigma = float(scheduler.sigmas[i]) if reuse_time == "sigma" else None
        observe_seconds, calls = 0.0, len(counter.calls) if counter is not None else 0
        with _guard(cfg, k, f"the pruned step {step}"):
            if k == 0:  # no token computed: the transformer is not called
                pred = _skipped(step, output, pred, hook, outside, pruner, rows, sigma, adapter, guidance, cfg)
            else:
                pruner.set_indices(idx, rows)
                for h in hooks:
                    if h is not None:
                        h.step, h.time = step, sigma
                ctx = step_cache.context(i, cfg.num_steps) if step_cache is not None else contextlib.nullcontext()
                with ctx:
                    pred = adapter.predict(torch.cat([latents] * cond.groups), t, cond)
                pred = _guide(pred, guidance, cfg.guidance_scale)
            output = patchify(pred, adapter.patch_size)
            if k != 0 and not forecast:
                t_obs = time.perf_counter()
                policy.observe(step, output, idx)  # a policy's bookkeeping counts as selection time
                observe_seconds = time.perf_counter() - t_obs
            if outside is not None and k != 0:
                composed = outside.compose(step, output, idx, sigma)
                if idx is not None:
                    pred = unpatchify(composed, adapter.patch_size, pred.shape[-2], pred.shape[-1])
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        if cfg.sync_timing:
            _sync(device)
        t2 = time.perf_counter()
        kept = 0 if forecast else n if k is None else k
        if k == 0:  # nothing ran
            macs = 0
        elif counter is not None:
            macs = sum(counter.calls[calls:])
        else:
            macs = pruner.macs(rows, cond.num_text_tokens, num_tokens=n, kept=kept)
        trace.steps.append(StepRecord(step, kept, macs, sel_macs, t2 - t0, (t1 - t0) + observe_seconds))
        trace.indices.append(None if idx is None else idx.detach())  # stays on the device until the end
    _sync(device)
    trace.seconds = time.perf_counter() - start
    trace.indices = [None if idx is None else idx.cpu() for idx in trace.indices]
    images = adapter.decode(latents)
    return SampleResult(images=images, latents=latents, trace=trace)


def _skipped(step, output, pred, hook, outside, pruner, rows, sigma, adapter, guidance, cfg) -> torch.Tensor:
    """The prediction of a step that computes no token: the reuse rule's forecast, or the last prediction."""
    if output is None:
        raise ValueError(f"step {step} computes no token but no step has been computed yet")
    none = torch.zeros(rows, 0, dtype=torch.long, device=output.device)
    height, width = pred.shape[-2:]  # the previous step's prediction has this step's shape
    if hook is not None:  # the rule lives inside the transformer: forecast the stacked guidance rows
        stacked = hook.reuse.compose(step, pruner.output_cache, none, sigma)
        return _guide(unpatchify(stacked, adapter.patch_size, height, width), guidance, cfg.guidance_scale)
    if outside is not None:
        return unpatchify(outside.compose(step, output, none[: output.shape[0]], sigma), adapter.patch_size, height,
                          width)
    return pred


def _guide(pred: torch.Tensor, guidance: bool, scale: float) -> torch.Tensor:
    """Classifier-free guidance over the stacked (unconditional, conditional) rows."""
    if not guidance:
        return pred
    uncond, text = pred.chunk(2)
    return uncond + scale * (text - uncond)


def _sample_attention(pruner: TokenPruner, batch: int) -> dict[int, torch.Tensor] | None:
    """Probe maps per sample: the conditional rows (the last ``batch`` rows)."""
    if not pruner.probe_layers or not pruner.attention:
        return None
    return {layer: probs[-batch:] for layer, probs in pruner.attention.items()}
