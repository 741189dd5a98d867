"""The generic denoising loop: step plan → selection → pruned forward → guidance → scheduler.

It knows no model family and no strategy: the adapter hides the first, the
:class:`~catlab.planner.StepPlanner` the second, and the
:class:`~catlab.pruning.engine.TokenPruner` turns indices into pruned execution.
Everything that depends on the run's parts (where a reuse rule applies, where
MACs come from, whether steps are timed exactly) is decided once, in
:class:`_Run`, before the loop starts.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from catlab.models.base import ModelAdapter
from catlab.planner import StepKind, StepPlan, StepPlanner
from catlab.pruning.engine import TokenPruner
from catlab.pruning.families import patchify
from catlab.pruning.graphs import generation_counts, graph_refusal, graphs_of, log_refusal
from catlab.pruning.selection_graphs import SelectionGraphs
from catlab.pruning.sync_check import no_host_sync
from catlab.reuse.base import Reuse, unpatchify
from catlab.reuse.hook import ReuseHook
from catlab.reuse.kv import KVReuse
from catlab.selection.base import Policy
from catlab.stepcache.base import StepCache, StepCacheError
from catlab.stepcache.macs import MacCounter


@dataclass
class SamplerConfig:
    """How to denoise. ``guidance_scale <= 1`` disables classifier-free guidance."""

    num_steps: int = 28
    guidance_scale: float = 7.0
    #: a progress bar per generation, when stderr is a terminal (never in a log file)
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
    #: replay the transformer's full and pruned forwards from captured CUDA graphs, one per shape,
    #: kept across generations (:mod:`catlab.pruning.graphs`); where a run cannot be captured (a CPU,
    #: a probe layer, a step cache, ...) it runs eagerly and says why in one line
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if int(self.num_steps) < 1:
            raise ValueError(f"sampler.num_steps must be >= 1; got {self.num_steps}")


@dataclass
class StepReuse:
    """What stands in for the work a step does not do, besides the selector's choice.

    ``rule`` (a :mod:`catlab.reuse` rule) decides what the unselected tokens' outputs
    become (``None``: their last computed values, as the paper does); ``kv`` applies a
    rule to their stale keys and values too; ``step_cache`` is a :mod:`catlab.stepcache`
    wrapper of a diffusers cache. ``time`` is the variable forecasts run in:
    ``"step"`` (the 1-based step) or ``"sigma"`` (the scheduler's).
    """

    rule: Reuse | None = None
    kv: Reuse | None = None
    step_cache: StepCache | None = None
    time: str = "step"

    def __post_init__(self) -> None:
        if self.time not in ("step", "sigma"):
            raise ValueError(f"StepReuse.time must be 'step' or 'sigma'; got {self.time!r}")


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
    #: whether the forwards replayed captured CUDA graphs (``sampler.cuda_graphs``, the pruned steps
    #: replayed, nothing refused: :meth:`catlab.pruning.graphs.GraphCounts.replayed`)
    graphed: bool = False
    #: with ``sampler.cuda_graphs``: captures, replays and refusals (with reasons) of this generation
    graph_counts: dict = field(default_factory=dict)

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


@torch.inference_mode()
def sample(adapter: ModelAdapter, policy: Policy, prompts: list[str], seeds: list[int],
           config: SamplerConfig | None = None, reuse: StepReuse | Reuse | None = None) -> SampleResult:
    """Generate one image per (prompt, seed) with ``policy`` choosing the recomputed tokens.

    ``reuse`` is a reuse rule for the unselected tokens or a :class:`StepReuse` (rule,
    K/V rule, step cache); the policy always observes the output as computed. A step
    whose budget is 0 tokens (a ``budget_schedule`` pattern) calls no transformer:
    every token's output is the reuse rule's forecast, or the previous step's.
    With a step cache, the MACs that really ran are counted, the steps it forecasts
    ask the policy nothing, and the reuse rule acts inside the transformer (so the
    cache records forecasts, not stale copies). A cache that needs calibration
    (``mag_cache``) must have it first: :func:`calibrate`.
    """
    cfg = config or SamplerConfig()
    parts = reuse if isinstance(reuse, StepReuse) else StepReuse(rule=reuse)
    policy.check(cfg.num_steps)
    parts = in_step_parts(policy, parts)
    check_composition(policy, parts.step_cache)
    with contextlib.ExitStack() as stack:
        return _loop(_Run(adapter, policy, cfg, parts, stack), prompts, seeds)


def _loop(run: "_Run", prompts: list[str], seeds: list[int]) -> SampleResult:
    adapter, cfg, planner = run.adapter, run.cfg, run.planner
    scheduler = adapter.make_scheduler()
    scheduler.set_timesteps(cfg.num_steps, device=adapter.torch_device)
    cond = adapter.encode(prompts, run.guided)
    latents = adapter.initial_latents(seeds)
    trace = run.begin(len(prompts), cond)
    pred = None
    bar = tqdm(scheduler.timesteps, disable=not (cfg.progress and sys.stderr.isatty()), desc=run.policy.name, leave=False)
    for i, t in enumerate(bar):
        plan, sigma = planner.plan(i + 1), run.time(scheduler, i)
        t0 = run.clock()
        with run.guard(plan, "the selection"):
            idx = planner.select(plan, run.attention())
            selection_macs = run.selection_macs(plan)
        t1, mark = run.clock(), run.cost.mark()
        with run.guard(plan, "the pruned step"):
            if plan.kind is StepKind.SKIP:
                stacked, pred = None, run.reuse.forecast(plan.step, pred, planner.output, sigma)
            else:
                stacked = run.forward(plan, idx, torch.cat([latents] * cond.groups), t, cond, sigma)
                pred = run.guide(stacked)
            output = patchify(pred, adapter.patch_size)
            observe_seconds = planner.observe(plan, run.shown(plan, output, stacked), idx)
            pred = run.reuse.compose(plan, output, idx, pred, sigma)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        t2 = run.clock()
        trace.steps.append(StepRecord(plan.step, plan.kept, run.cost.macs(plan, mark), selection_macs, t2 - t0,
                                      (t1 - t0) + observe_seconds))
        trace.indices.append(None if idx is None else idx.detach())  # stays on the device until the end
    return run.finish(trace, latents)


class _Run:
    """One generation's fixed decisions and attached hooks, made before the loop starts."""

    def __init__(self, adapter: ModelAdapter, policy: Policy, cfg: SamplerConfig, parts: StepReuse, stack):
        self.adapter, self.policy, self.cfg, self.parts = adapter, policy, cfg, parts
        self.guided = cfg.guidance_scale > 1.0
        inside = parts.rule is not None and (parts.step_cache is not None or parts.kv is not None)
        self.graphs, self.refusal = None, None
        if cfg.cuda_graphs:
            reason = graph_refusal(adapter.transformer, policy, inside_hooks=inside or parts.kv is not None,
                                   step_cache=parts.step_cache, count_macs=cfg.count_macs)
            if reason is None:
                self.graphs = graphs_of(adapter.transformer)
            else:
                self.refusal = reason
                log_refusal(reason, adapter.transformer)
        selection = SelectionGraphs(adapter.torch_device) if self.graphs is not None else None
        self.planner = StepPlanner(policy, parts.step_cache, check_indices=cfg.check_indices, selection_graphs=selection)
        # the pruner: its MAC formula always; its hooks unless pruning in-step; with graphs, their buffers
        self.pruner = TokenPruner(adapter.transformer, pool=self.graphs.pool if self.graphs is not None else None)
        if not getattr(policy, "in_step_engine", False):
            self.pruner.attach()
            stack.callback(self.pruner.detach)
        self.pruner.probe_layers = set(getattr(policy, "attention_layers", ()))
        self.hooks = []  # told the step and time before each forward
        if inside:
            self.hooks.append(ReuseHook(self.pruner, parts.rule))
        if parts.kv is not None:
            self.hooks.append(KVReuse(self.pruner, parts.kv))
        for h in self.hooks:
            h.attach()
            stack.callback(h.detach)
        self.reuse = _ReusePlacement(parts.rule, inside, self)
        cache = parts.step_cache
        if cache is not None:
            if not cache.is_applied:  # applied already while it calibrates
                cache.apply(adapter.transformer)
                stack.callback(cache.remove, adapter.transformer)
            cache.reset()
        counter = None
        if cfg.count_macs or cache is not None:
            counter = MacCounter(adapter.transformer).attach()
            stack.callback(counter.detach)
        self.cost = _Cost(self.pruner, counter)

    def begin(self, batch: int, cond) -> "Trace":
        grid, device = self.adapter.grid, self.adapter.torch_device
        self.batch, self.rows, self.cond = batch, batch * cond.groups, cond
        self.planner.reset(batch, grid, self.cfg.num_steps, device)
        self.cost.rows, self.cost.text, self.cost.n = self.rows, cond.num_text_tokens, grid[0] * grid[1]
        self.reuse.reset(batch, device)
        if self.graphs is not None:
            self.graphs.new_generation(self.adapter.transformer)
        self.start = time.perf_counter()
        return Trace(num_tokens=self.cost.n, grid=grid, batch_size=batch, full_step_macs=self.cost.full(),
                     graphed=self.graphs is not None)

    def finish(self, trace: Trace, latents: torch.Tensor) -> SampleResult:
        _sync(self.adapter.torch_device)
        trace.seconds = time.perf_counter() - self.start
        trace.indices = [None if idx is None else idx.cpu() for idx in trace.indices]
        if self.cfg.cuda_graphs:
            counts = generation_counts(self.graphs, self.planner.selection_graphs, self.refusal)
            trace.graph_counts, trace.graphed = counts.as_dict(), counts.replayed()
        return SampleResult(images=self.adapter.decode(latents), latents=latents, trace=trace)

    def forward(self, plan: StepPlan, idx, latents: torch.Tensor, t, cond, sigma) -> torch.Tensor:
        """The transformer on the stacked guidance rows (pruned to ``idx``); the rows as it returns them."""
        self.pruner.set_indices(idx, self.rows)
        for h in self.hooks:
            h.step, h.time = plan.step, sigma
        if self.graphs is not None:  # the same forward, replayed from the graph of its shape
            predict = lambda lat, tt, kwargs: self.adapter.predict(lat, tt, replace(cond, kwargs=kwargs))  # noqa: E731
            return self.graphs.call(self.pruner, predict, (latents, t, cond.kwargs), tag=type(self.adapter).__qualname__)
        cache = self.parts.step_cache
        with cache.context(plan.step, self.cfg.num_steps) if cache is not None else contextlib.nullcontext():
            return self.adapter.predict(latents, t, cond)

    def shown(self, plan: StepPlan, output: torch.Tensor, stacked: torch.Tensor | None) -> torch.Tensor:
        """What the policy sees of a step: the guided output, or for a policy that asks for them
        (``Policy.observes = "branches"``) the stacked guidance branches, unconditional rows first."""
        if self.policy.observes != "branches" or not self.guided:
            return output
        if stacked is None:  # a step that computed nothing: the branches last computed stand
            return self.planner.output
        return patchify(stacked, self.adapter.patch_size)

    def guide(self, pred: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance over the stacked (unconditional, conditional) rows."""
        if not self.guided:
            return pred
        uncond, text = pred.chunk(2)
        return uncond + self.cfg.guidance_scale * (text - uncond)

    def selection_macs(self, plan: StepPlan) -> int:
        if plan.kind is not StepKind.PRUNED:
            return 0
        probes = 0 if self.cost.counter is not None else self.pruner.probe_macs(self.rows, self.cond.num_text_tokens,
                                                                                  plan.kept)
        return self.planner.selection_macs() + probes  # a MAC counter already counts the probes' maps

    def attention(self) -> dict[int, torch.Tensor] | None:
        """Probe maps per sample: the conditional rows (the last ``batch`` rows)."""
        if not self.pruner.probe_layers or not self.pruner.attention:
            return None
        return {layer: probs[-self.batch:] for layer, probs in self.pruner.attention.items()}

    def time(self, scheduler, i: int) -> float | None:
        return float(scheduler.sigmas[i]) if self.parts.time == "sigma" else None

    def clock(self) -> float:
        if self.cfg.sync_timing:
            _sync(self.adapter.torch_device)
        return time.perf_counter()

    def guard(self, plan: StepPlan, what: str):
        """The host-sync guard around a pruned step when ``check_sync`` asks for it."""
        if self.cfg.check_sync and plan.kind in (StepKind.PRUNED, StepKind.SKIP):
            return no_host_sync(f"{what} of step {plan.step} ({self.policy.name})")
        return contextlib.nullcontext()


class _ReusePlacement:
    """Where the reuse rule acts, decided once: nowhere (stale copies), inside the transformer
    (a hook on the scattered output, needed with a step cache or K/V rule), or after guidance."""

    def __init__(self, rule: Reuse | None, inside: bool, run: _Run):
        self.rule, self.inside, self.run = rule, inside, run

    def reset(self, batch: int, device) -> None:
        if self.rule is not None and not self.inside:
            adapter = self.run.adapter
            self.rule.reset(batch, adapter.grid[0] * adapter.grid[1], adapter.patch_size ** 2 * adapter.latent_channels,
                            device, adapter.torch_dtype)

    def compose(self, plan: StepPlan, output, idx, pred: torch.Tensor, sigma) -> torch.Tensor:
        """After a computed step: the rule outside the transformer sees the guided output."""
        if self.rule is None or self.inside or plan.kind is StepKind.SKIP:
            return pred
        composed = self.rule.compose(plan.step, output, idx, sigma)
        if idx is None:
            return pred
        return unpatchify(composed, self.run.adapter.patch_size, pred.shape[-2], pred.shape[-1])

    def forecast(self, step: int, pred, output, sigma) -> torch.Tensor:
        """A step that computes no token: the rule's forecast of every token, or the last prediction."""
        if output is None:
            raise ValueError(f"step {step} computes no token but no step has been computed yet")
        patch, (height, width) = self.run.adapter.patch_size, pred.shape[-2:]
        if self.rule is None:
            return pred
        if self.inside:  # forecast the stacked guidance rows, as the transformer would have returned them
            cache = self.run.pruner.output_cache
            none = torch.zeros(cache.shape[0], 0, dtype=torch.long, device=cache.device)
            return self.run.guide(unpatchify(self.rule.compose(step, cache, none, sigma), patch, height, width))
        none = torch.zeros(output.shape[0], 0, dtype=torch.long, device=output.device)
        return unpatchify(self.rule.compose(step, output, none, sigma), patch, height, width)


class _Cost:
    """MACs of a step, from one source decided once: the counter of what ran, or the analytic formula."""

    def __init__(self, pruner: TokenPruner, counter: MacCounter | None):
        self.pruner, self.counter = pruner, counter
        self.rows = self.text = self.n = 0

    def full(self) -> int:
        return self.pruner.macs(self.rows, self.text, num_tokens=self.n)

    def mark(self) -> int:
        return len(self.counter.calls) if self.counter is not None else 0

    def macs(self, plan: StepPlan, mark: int) -> int:
        if plan.kind is StepKind.SKIP:
            return 0
        if self.counter is not None:
            return sum(self.counter.calls[mark:])
        return self.pruner.macs(self.rows, self.text, num_tokens=self.n, kept=plan.kept)


def in_step_parts(policy: Policy, parts: StepReuse) -> StepReuse:
    """For a policy that prunes inside each forward (``atedm``): its engine takes the step cache's place.

    Such a policy selects nothing between steps and reuses nothing, so it combines with
    neither a step cache nor a reuse rule."""
    if not getattr(policy, "in_step_engine", False):
        return parts
    if parts.step_cache is not None or parts.rule is not None or parts.kv is not None:
        raise StepCacheError(f"selector '{policy.name}' prunes inside each step and reuses nothing between steps: "
                             "run it without a step cache or a reuse rule")
    return replace(parts, step_cache=policy.in_step())


def check_composition(policy: Policy, step_cache: StepCache | None) -> None:
    """Token pruning inside a step cache's computed steps only where the cache allows it."""
    if getattr(policy, "in_step_engine", False):
        return  # its own engine (in_step_parts)
    if step_cache is not None and policy.prunes and not step_cache.composes_with_pruning:
        raise StepCacheError(
            f"step cache '{step_cache.name}' compares block residuals between steps; with token pruning "
            f"(selector '{policy.name}') those residuals belong to different tokens. Compose pruning with "
            f"'taylorseer', or run '{step_cache.name}' with selector=full.")


def calibrate(step_cache: StepCache, adapter: ModelAdapter, prompts: list[str], seeds: list[int],
              config: SamplerConfig | None = None) -> None:
    """Give a cache that needs it (``mag_cache``) its calibration: one full generation of this batch."""
    if not step_cache.needs_calibration or step_cache.calibrated:
        return
    from catlab.registry import selectors

    full = replace(config or SamplerConfig(), progress=False, check_sync=False)
    if getattr(step_cache, "num_steps", 0) is None:
        step_cache.num_steps = full.num_steps  # a cache built outside a run takes this one's
    step_cache.calibrate(adapter.transformer, lambda: sample(adapter, selectors.build("full"), prompts, seeds, full,
                                                             StepReuse(step_cache=step_cache)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
