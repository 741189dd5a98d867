"""The generic denoising loop: step plan → selection → pruned forward → guidance → scheduler.

It knows no model family and no strategy: the adapter hides the first, and the
run's assembly (:class:`~catlab.assembly.PruningSession`, the same one the
stock-pipeline hook drives) the second: it checks the composition, wires the
pruner, graphs, reuse rule, step cache and MAC counter, and offers the per-step
entry points this loop calls (plan → select → forward → observe → compose).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from catlab.assembly import PruningSession, StepReuse
from catlab.grid import Grid, grid_tokens
from catlab.models.base import ModelAdapter
from catlab.planner import StepKind, StepPlan
from catlab.pruning.families import patchify
from catlab.pruning.graphs import generation_counts
from catlab.pruning.sync_check import no_host_sync
from catlab.registry import selectors
from catlab.reuse.base import Reuse, unpatchify
from catlab.selection.base import Policy
from catlab.stepcache.base import StepCache


@dataclass
class SamplerConfig:
    """How to denoise: the settings of :func:`sample` (and of ``sampler.*`` on the command line).

    Args:
        num_steps: denoising steps (the paper's N = 28).
        guidance_scale: classifier-free guidance scale; ``<= 1`` disables guidance.
        progress: a progress bar per generation, when stderr is a terminal.
        check_indices: check every index tensor (shape, range, uniqueness); a host sync per step.
        sync_timing: synchronise the device around each step so per-step times are exact.
        check_sync: fail on any host synchronisation in a pruned step (slow: for tests).
        count_macs: count the MACs that really ran instead of the analytic formula.
        cuda_graphs: replay the transformer's forwards from captured CUDA graphs where it can.
    """

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
    grid: Grid
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
def sample(
    adapter: ModelAdapter,
    policy: Policy,
    prompts: list[str],
    seeds: list[int],
    config: SamplerConfig | None = None,
    reuse: StepReuse | Reuse | None = None,
) -> SampleResult:
    """Generate one image per (prompt, seed) with ``policy`` choosing the recomputed tokens.

    The selector always observes the output as computed. A step
    whose budget is 0 tokens (a ``budget_schedule`` pattern) calls no transformer:
    every token's output is the reuse rule's forecast, or the previous step's.
    With a step cache, the MACs that really ran are counted, the steps it forecasts
    ask the policy nothing, and the reuse rule acts inside the transformer (so the
    cache records forecasts, not stale copies). A cache that needs calibration
    (``mag_cache``) must have it first: :func:`calibrate`.

    Args:
        adapter: the model adapter (``catlab.models.build({"name": "sd3", ...})``).
        policy: a built selector (``catlab.selectors.build(...)``).
        prompts: one prompt per image.
        seeds: one seed per image (the initial noise).
        config: the sampler settings; :class:`SamplerConfig`'s defaults when ``None``.
        reuse: a reuse rule for the unselected tokens, or a :class:`StepReuse` (rule, K/V
            rule, step cache); ``None``: their last computed values.

    Returns:
        A :class:`SampleResult`: the images ``(B, 3, H, W)`` in ``[0, 1]``, the final latents and the
        :class:`Trace` (indices, MACs and times per step).

    Raises:
        CompositionError: the parts cannot run together (checked before any compute).
    """
    cfg = config or SamplerConfig()
    parts = reuse if isinstance(reuse, StepReuse) else StepReuse(rule=reuse)
    policy.check(cfg.num_steps)
    session = PruningSession(
        adapter.transformer,
        policy,
        parts,
        cuda_graphs=cfg.cuda_graphs,
        count_macs=cfg.count_macs,
        check_indices=cfg.check_indices,
    )
    return generate(adapter, session, prompts, seeds, cfg)


@torch.inference_mode()
def generate(
    adapter: ModelAdapter,
    session: PruningSession,
    prompts: list[str],
    seeds: list[int],
    config: SamplerConfig | None = None,
) -> SampleResult:
    """:func:`sample` with a session already assembled (and so checked) on ``adapter.transformer``.

    A run of many batches assembles its session once and generates each batch here; the
    session is attached for the generation and detached after it.

    Args:
        adapter: the model adapter whose transformer ``session`` was built on.
        session: the run's :class:`~catlab.assembly.PruningSession`.
        prompts: one prompt per image.
        seeds: one seed per image.
        config: the sampler settings (default :class:`SamplerConfig`); those the session
            was built with (CUDA graphs, MAC counting, index checks) are the session's.
    """
    with session:
        return _loop(_Generation(adapter, config or SamplerConfig(), session), prompts, seeds)


def _loop(run: _Generation, prompts: list[str], seeds: list[int]) -> SampleResult:
    adapter, cfg, session = run.adapter, run.cfg, run.session
    scheduler = adapter.make_scheduler()
    adapter.set_timesteps(scheduler, cfg.num_steps)
    cond = adapter.embed_guidance(adapter.encode(prompts, run.guided), cfg.guidance_scale)
    latents = adapter.initial_latents(seeds)
    trace = run.begin(len(prompts), cond)
    pred = None
    bar = tqdm(
        scheduler.timesteps, disable=not (cfg.progress and sys.stderr.isatty()), desc=run.policy.name, leave=False
    )
    for i, t in enumerate(bar):
        plan, sigma = session.plan(i + 1), run.time(scheduler, i)
        step_sigma = session.step_sigma(scheduler, i)  # for a step cache's context (SeaCache gates on it)
        t0 = run.clock()
        with run.guard(plan, "the selection"):
            idx = session.select(plan)
            selection_macs = session.selection_macs(plan)
        t1, mark = run.clock(), session.mark()
        with run.guard(plan, "the pruned step"):
            if plan.kind is StepKind.SKIP:
                stacked, pred = None, run.forecast(plan.step, pred, sigma)
            else:
                stacked = run.forward(plan, idx, torch.cat([latents] * cond.groups), t, cond, sigma, step_sigma)
                pred = run.guide(stacked)
            output = patchify(pred, adapter.patch_size)
            observe_seconds = session.observe(plan, run.shown(plan, output, stacked), idx)
            pred = run.compose(plan, output, idx, pred, sigma)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        t2 = run.clock()
        trace.steps.append(
            StepRecord(
                plan.step,
                plan.kept,
                session.step_macs(plan, mark),
                selection_macs,
                t2 - t0,
                (t1 - t0) + observe_seconds,
            )
        )
        trace.indices.append(None if idx is None else idx.detach())  # stays on the device until the end
    return run.finish(trace, latents)


class _Generation:
    """One generation of :func:`sample`: the loop's side of the assembly (guidance, timing, images)."""

    def __init__(self, adapter: ModelAdapter, cfg: SamplerConfig, session: PruningSession):
        self.adapter, self.cfg, self.session, self.policy = adapter, cfg, session, session.policy
        self.guided = cfg.guidance_scale > 1.0 and not adapter.guidance_distilled  # stacked CFG branches

    def begin(self, batch: int, cond) -> Trace:
        adapter, grid = self.adapter, self.adapter.grid
        self.batch = batch
        self.session.begin(
            batch,
            cond.groups,
            grid,
            self.cfg.num_steps,
            cond.num_text_tokens,
            adapter.patch_size**2 * adapter.latent_channels,
            adapter.torch_device,
        )
        self.start = time.perf_counter()
        return Trace(
            num_tokens=grid_tokens(grid),
            grid=grid,
            batch_size=batch,
            full_step_macs=self.session.full_macs(),
            graphed=self.session.graphs is not None,
        )

    def finish(self, trace: Trace, latents: torch.Tensor) -> SampleResult:
        _sync(self.adapter.torch_device)
        trace.seconds = time.perf_counter() - self.start
        trace.indices = [None if idx is None else idx.cpu() for idx in trace.indices]
        if self.cfg.cuda_graphs:
            session = self.session
            counts = generation_counts(session.graphs, session.planner.selection_graphs, session.refusal)
            trace.graph_counts, trace.graphed = counts.as_dict(), counts.replayed()
        return SampleResult(images=self.adapter.decode(latents), latents=latents, trace=trace)

    def forward(self, plan: StepPlan, idx, latents: torch.Tensor, t, cond, sigma, step_sigma=None) -> torch.Tensor:
        """The transformer on the stacked guidance rows (pruned to ``idx``); the rows as it returns them.
        ``sigma`` is the reuse rules' time variable, ``step_sigma`` the scheduler's sigma for a step cache."""
        self.session.prepare(plan, idx, sigma, step_sigma)
        if self.session.graphs is not None:  # the same forward, replayed from the graph of its shape
            predict = lambda lat, tt, kwargs: self.adapter.predict(lat, tt, replace(cond, kwargs=kwargs))  # noqa: E731
            return self.session.forward(plan, predict, (latents, t, cond.kwargs), tag=type(self.adapter).__qualname__)
        return self.session.forward(plan, self.adapter.predict, (latents, t, cond))

    def shown(self, plan: StepPlan, output: torch.Tensor, stacked: torch.Tensor | None) -> torch.Tensor:
        """What the policy sees of a step: the guided output, or for a policy that asks for them
        (``Policy.observes = "branches"``) the stacked guidance branches, unconditional rows first."""
        if self.policy.observes != "branches" or not self.guided:
            return output
        if stacked is None:  # a step that computed nothing: the branches last computed stand
            return self.session.planner.output
        return patchify(stacked, self.adapter.patch_size)

    def guide(self, pred: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance over the stacked (unconditional, conditional) rows."""
        return guide(pred, self.cfg.guidance_scale) if self.guided else pred

    def compose(self, plan: StepPlan, output: torch.Tensor, idx, pred: torch.Tensor, sigma) -> torch.Tensor:
        """After a computed step: the reuse rule, where it acts outside the transformer, on the guided output."""
        composed = self.session.compose(plan, output, idx, sigma)
        if composed is output or idx is None:
            return pred
        return unpatchify(composed, self.adapter.patch_size, *pred.shape[2:])

    def forecast(self, step: int, pred, sigma) -> torch.Tensor:
        """A step that computes no token: the rule's forecast of every token, or the last prediction."""
        if self.session.planner.output is None:
            raise ValueError(f"step {step} computes no token but no step has been computed yet")
        tokens = self.session.forecast(step, self.session.planner.output, sigma)
        if tokens is None:
            return pred
        pred = unpatchify(tokens, self.adapter.patch_size, *pred.shape[2:])  # (H, W), or (F, H, W) for a video
        return self.guide(pred) if self.session.rule_inside else pred  # inside: the stacked rows, as returned

    def time(self, scheduler, i: int) -> float | None:
        return float(scheduler.sigmas[i]) if self.session.parts.time == "sigma" else None

    def clock(self) -> float:
        if self.cfg.sync_timing:
            _sync(self.adapter.torch_device)
        return time.perf_counter()

    def guard(self, plan: StepPlan, what: str):
        """The host-sync guard around a pruned step when ``check_sync`` asks for it."""
        if self.cfg.check_sync and plan.kind in (StepKind.PRUNED, StepKind.SKIP):
            return no_host_sync(f"{what} of step {plan.step} ({self.policy.name})")
        return contextlib.nullcontext()


def guide(stacked: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance over stacked (unconditional, conditional) rows."""
    uncond, text = stacked.chunk(2)
    return uncond + scale * (text - uncond)


def calibrate(
    step_cache: StepCache,
    adapter: ModelAdapter,
    prompts: list[str],
    seeds: list[int],
    config: SamplerConfig | None = None,
) -> None:
    """Give a cache that needs it (``mag_cache``) its calibration: one full generation of this batch."""
    if not step_cache.needs_calibration or step_cache.calibrated:
        return
    full = replace(config or SamplerConfig(), progress=False, check_sync=False)
    if getattr(step_cache, "num_steps", 0) is None:
        step_cache.num_steps = full.num_steps  # a cache built outside a run takes this one's
    step_cache.calibrate(
        adapter.transformer,
        lambda: sample(adapter, selectors.build("full"), prompts, seeds, full, StepReuse(step_cache=step_cache)),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
