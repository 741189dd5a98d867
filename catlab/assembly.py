"""One run put together: :class:`PruningSession`, the assembly both loops drive.

catlab's sampler (:func:`catlab.sample`) and the hook on a stock diffusers pipeline
(:func:`catlab.enable_pruning`) run the same parts: a policy's step plan, the token
pruner with its buffer pool, captured graphs, a reuse rule (after the transformer or
inside it), K/V reuse, a step cache, the in-step engine of a selector that has one,
and a MAC counter. What a run needs is read once from the *capabilities* its parts
declare (:class:`~catlab.capabilities.Capability`), checked in one place
(:func:`check_composition`) and wired here; the two loops only drive it::

    session = PruningSession(transformer, policy, StepReuse(rule, kv, step_cache), cuda_graphs=...)
    with session:                                    # attach ... detach
        session.begin(batch, groups, grid, num_steps, num_text, channels, device)
        for step in range(1, num_steps + 1):
            plan = session.plan(step)                # FULL | PRUNED(k) | SKIP | CACHED
            idx = session.select(plan)               # probes sliced to the conditional rows
            session.prepare(plan, idx, time)         # indices, hooks told the step and time
            out = session.forward(plan, fn, args, kwargs, tag)   # graphs / step cache / engine
            session.observe(plan, tokens, idx)       # the policy sees the step
            composed = session.compose(plan, tokens, idx, time)  # the reuse rule, when it acts outside

A SKIP step calls no transformer: :meth:`forecast` gives every token's forecast.

A sequence may carry tokens after the grid's (FLUX.1 Kontext's reference image): ``begin(..., tail=M)``. The
policy never sees or selects them; ``tail_computed`` says whether a pruned step computes them all (their
indices appended to every row's k) or reuses their K/V from the last full step like an unselected token's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from catlab.capabilities import Capability
from catlab.grid import Grid, grid_tokens
from catlab.planner import StepKind, StepPlan, StepPlanner
from catlab.pruning.engine import TokenPruner
from catlab.pruning.graphs import graph_refusal, graphs_of, log_refusal
from catlab.pruning.instep import InStepPruning
from catlab.pruning.layerwise import LayerCaching
from catlab.pruning.reuse_hooks import KVReuse, ReuseHook
from catlab.pruning.selection_graphs import SelectionGraphs
from catlab.reuse.base import Reuse
from catlab.selection.base import Policy
from catlab.stepcache.base import StepCache, StepCacheError
from catlab.stepcache.macs import MacCounter


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


class CompositionError(StepCacheError, ValueError):
    """Parts that cannot run together; the message names them and what works instead."""


def check_composition(policy: Policy, parts: StepReuse, rows_stacked: bool = False) -> None:
    """The one check of a run's composition, from the capabilities its parts declare.

    ``rows_stacked``: the reuse rule would act on the stacked guidance rows (a stock
    pipeline combines the branches itself), which needs a row-wise rule.
    """
    caps = policy.capabilities
    if Capability.COMPARISON_ONLY in caps:
        raise CompositionError(
            f"selector '{policy.name}' as configured repeats tokens or keeps fewer than k (e.g. "
            "selector.pad=authors|none): it is for comparisons through catlab.testing.simulate; "
            "runs need k unique tokens per sample (selector.pad=stalest)"
        )
    if Capability.LAYER_SELECTION in caps:
        if parts.step_cache is not None or parts.rule is not None or parts.kv is not None:
            raise CompositionError(
                f"selector '{policy.name}' caches each layer's module outputs itself: run it without a step "
                "cache or a reuse rule (reuse=, kv=, stepcache=)"
            )
        return
    if Capability.IN_STEP_ENGINE in caps:
        if parts.step_cache is not None or parts.rule is not None or parts.kv is not None:
            raise CompositionError(
                f"selector '{policy.name}' prunes inside each step and reuses nothing between "
                "steps: run it without a step cache or a reuse rule (reuse=, kv=, stepcache=)"
            )
        return
    if parts.kv is not None and not policy.prunes:
        raise CompositionError(
            f"a K/V rule (kv=) forecasts the keys and values of tokens a step does not compute; "
            f"selector '{policy.name}' computes every token: drop kv= or choose a pruning selector"
        )
    if Capability.ATTENTION_PROBES in caps and not policy.attention_layers:
        raise CompositionError(f"selector '{policy.name}' needs attention probes but names no attention_layers")
    cache = parts.step_cache
    if cache is not None and policy.prunes and Capability.COMPOSES_WITH_PRUNING not in cache.capabilities:
        raise CompositionError(
            f"step cache '{cache.name}' {cache.pruning_conflict} (selector '{policy.name}' prunes). "
            f"Compose pruning with 'taylorseer', or run '{cache.name}' with selector=full."
        )
    inside = parts.rule is not None and (cache is not None or parts.kv is not None)
    for role, rule in (("reuse", parts.rule if inside or rows_stacked else None), ("K/V reuse", parts.kv)):
        if rule is not None and Capability.ROW_WISE not in rule.capabilities:
            raise CompositionError(
                f"{role} rule '{rule.name}' does not act row by row; here it would run on the "
                "stacked guidance rows (inside the transformer or on a stock pipeline)"
            )


class PruningSession:
    """The assembly of one run on one transformer; see the module docstring.

    ``rows_stacked``: the loop shows :meth:`compose` the stacked guidance rows rather than
    their combination (a stock pipeline). ``side_models``: models the pipeline runs beside the
    transformer at each step (a ControlNet), unpruned; :meth:`side_macs` counts what they ran.
    Nothing is installed until :meth:`attach` (or ``with session:``); :meth:`detach` removes
    everything and leaves no reference cycle.
    """

    def __init__(
        self,
        transformer: nn.Module,
        policy: Policy,
        parts: StepReuse | None = None,
        *,
        cuda_graphs: bool = False,
        count_macs: bool = False,
        check_indices: bool = False,
        rows_stacked: bool = False,
        side_models: tuple[nn.Module, ...] = (),
    ):
        parts = parts or StepReuse()
        check_composition(policy, parts, rows_stacked)
        self.transformer, self.policy, self.parts, self.stacked_rows = transformer, policy, parts, rows_stacked
        caps = policy.capabilities
        #: the in-step engine's own slot (a selector that prunes inside each forward)
        self.engine = InStepPruning(policy) if Capability.IN_STEP_ENGINE in caps else None
        if Capability.LAYER_SELECTION in caps:  # per-layer, per-module selection: the layer engine's slot
            self.engine = LayerCaching(policy)
        #: where the reuse rule acts: inside the transformer (needed with a step cache or K/V rule) or after it
        self.rule_inside = parts.rule is not None and (parts.step_cache is not None or parts.kv is not None)
        #: why a run that asked for CUDA graphs runs eagerly (``None``: it did not ask, or it is graphed)
        self.refusal: str | None = None
        self.graphs = self._graphs(cuda_graphs, count_macs)
        selection = SelectionGraphs(self.graphs.device) if self.graphs is not None else None
        self.planner = StepPlanner(policy, parts.step_cache, check_indices=check_indices, selection_graphs=selection)
        self.pruner = TokenPruner(transformer, pool=self.graphs.pool if self.graphs is not None else None)
        self.pruner.probe_layers = set(policy.attention_layers) if Capability.ATTENTION_PROBES in caps else set()
        self.counting = count_macs or parts.step_cache is not None or self.engine is not None
        self.counter: MacCounter | None = None
        #: models a pipeline runs beside the transformer (a ControlNet): unpruned, their MACs counted as they run
        self.side = [MacCounter(model) for model in side_models]
        self._side_seen = 0
        self.hooks: list = []  # told the step and time before each forward
        self._undo: list = []  # what detach() runs, last installed first
        self.attached = False
        self.batch = self.rows = self.num_text = self.num_tokens = self.num_steps = 0
        #: tokens after the grid's in the sequence (a reference image's), and whether pruned steps compute them
        self.tail, self.tail_computed, self._tail_index = 0, True, None
        #: the scheduler's sigma of the step being computed, for the step cache's context (SeaCache gates on it)
        self.sigma: float | None = None

    def _graphs(self, cuda_graphs: bool, count_macs: bool):
        if not cuda_graphs:
            return None
        reason = graph_refusal(
            self.transformer,
            self.policy,
            inside_hooks=self.rule_inside or self.parts.kv is not None,
            step_cache=self.parts.step_cache,
            count_macs=count_macs,
        )
        if reason is not None:
            self.refusal = reason
            log_refusal(reason, self.transformer)
            return None
        return graphs_of(self.transformer)

    # -- lifecycle ---------------------------------------------------------------------------------
    def attach(self) -> PruningSession:
        """Install the parts on the transformer, innermost first: pruner, reuse hook, K/V reuse, step cache
        or in-step engine, MAC counter."""
        if self.attached:
            return self
        self.attached = True
        try:
            self._attach()
        except BaseException:
            self.detach()
            raise
        return self

    def _attach(self) -> None:
        t, parts = self.transformer, self.parts
        if self.engine is None:
            self._undo.append(self.pruner.attach().detach)
        if self.rule_inside:
            self.hooks.append(ReuseHook(self.pruner, parts.rule))
        if parts.kv is not None:
            self.hooks.append(KVReuse(self.pruner, parts.kv))
        for hook in self.hooks:
            self._undo.append(hook.attach().detach)
        cache = parts.step_cache
        if cache is not None and not cache.is_applied:  # applied already while it calibrates
            cache.apply(t)
            self._undo.append(lambda: cache.remove(t))
        if self.engine is not None:
            self.engine.apply(t)
            self._undo.append(self.engine.remove)
        if self.counting:
            self.counter = MacCounter(t).attach()
            self._undo.append(self.counter.detach)
        for side in self.side:
            self._undo.append(side.attach().detach)

    def detach(self) -> None:
        """Remove every part; the transformer is the stock model again."""
        while self._undo:
            self._undo.pop()()
        self.hooks, self.attached = [], False

    def __enter__(self) -> PruningSession:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- per generation ----------------------------------------------------------------------------
    def begin(
        self,
        batch: int,
        groups: int,
        grid: Grid,
        num_steps: int,
        num_text: int,
        channels: int,
        device: torch.device | str,
        tail: int = 0,
        tail_computed: bool = True,
    ) -> None:
        """A generation starts: ``batch`` samples in ``groups`` stacked guidance branches, a ``grid`` of
        tokens, ``channels`` per token in what :meth:`compose` is shown. Every part forgets its state.

        ``tail`` tokens follow the grid's in the transformer's sequence (a reference image's): never selected,
        computed at every step with ``tail_computed``, else at full steps only (their K/V reused in between)."""
        self.batch, self.rows, self.num_text, self.num_steps = batch, batch * groups, num_text, num_steps
        self.num_tokens = grid_tokens(grid)
        self.tail, self.tail_computed = tail, tail_computed
        self._tail_index = torch.arange(self.num_tokens, self.num_tokens + tail, device=device) if tail else None
        self.pruner.set_bypass(False)
        self.pruner.reset()
        self.planner.reset(batch, grid, num_steps, device)
        rule = self.parts.rule
        if rule is not None and not self.rule_inside:
            shown = self.rows if self.stacked_rows else batch
            rule.reset(shown, self.num_tokens, channels, device, next(self.transformer.parameters()).dtype)
        for hook in self.hooks:
            hook.reset()
        if self.parts.step_cache is not None:
            self.parts.step_cache.begin(groups)
        if isinstance(self.engine, LayerCaching):
            self.engine.begin(batch, grid, num_steps, device)
        elif self.engine is not None:
            self.engine.reset()
        if self.graphs is not None:
            self._renew_graphs()

    def _renew_graphs(self) -> None:
        """Still capturable (hooks added since?): replay on; else eager from now on, said once."""
        reason = graph_refusal(
            self.transformer,
            self.policy,
            inside_hooks=self.rule_inside or self.parts.kv is not None,
            step_cache=self.parts.step_cache,
            count_macs=self.counter is not None,
        )
        if reason is not None:
            self.refusal = reason
            log_refusal(reason, self.transformer)
            self.graphs = self.planner.selection_graphs = None
            return
        self.graphs.new_generation(self.transformer)

    # -- per step ----------------------------------------------------------------------------------
    def plan(self, step: int) -> StepPlan:
        return self.planner.plan(step)

    def select(self, plan: StepPlan) -> torch.Tensor | None:
        """The policy's ``(B, k)`` tokens at a PRUNED step, with the probe maps it asked for."""
        return self.planner.select(plan, self.attention())

    def attention(self) -> dict[int, torch.Tensor] | None:
        """Probe maps per sample: the conditional rows (the last ``batch`` rows)."""
        if not self.pruner.probe_layers or not self.pruner.attention:
            return None
        n = self.num_tokens  # the grid's tokens only (a tail's rows and columns left out)
        return {layer: probs[-self.batch :, :n, :n] for layer, probs in self.pruner.attention.items()}

    def prepare(
        self, plan: StepPlan, indices: torch.Tensor | None, time: float | None, sigma: float | None = None
    ) -> None:
        """Before a forward of ``plan``: the rows' indices (plus a computed tail's), and the step and time for
        the hooks inside; ``sigma`` (the scheduler's, :meth:`step_sigma`) goes into the step cache's context."""
        self.sigma = sigma
        if indices is not None and self._tail_index is not None and self.tail_computed:
            indices = torch.cat([indices, self._tail_index.expand(indices.shape[0], -1)], dim=1)
        self.pruner.set_indices(indices, self.rows)
        # a step TaylorSeer forecasts from its output projection ("output" mode) runs no block: what the skipped
        # blocks return is a placeholder, and per-block residuals (a ControlNet's) are not added to it
        cache = self.parts.step_cache
        self.pruner.blocks_skipped = plan.kind is StepKind.CACHED and getattr(cache, "mode", None) == "output"
        for hook in self.hooks:
            hook.step, hook.time = plan.step, time

    def forward(self, plan: StepPlan, fn, args: tuple = (), kwargs: dict | None = None, tag=None):
        """``fn(*args, **kwargs)``, the transformer's forward: replayed from its graph, or eagerly inside the
        step cache's or in-step engine's context of this step."""
        kwargs = self.pruner.call_kwargs(kwargs or {})  # a ControlNet's residuals: for the computed tokens
        if self.graphs is not None:
            return self.graphs.call(self.pruner, fn, args, kwargs, tag=tag)
        slot = self.parts.step_cache or self.engine
        if slot is None:
            return fn(*args, **kwargs)
        with slot.context(plan.step, self.num_steps, **self.step_info()):
            return fn(*args, **kwargs)

    def step_info(self) -> dict:
        """What a step cache's context is told beyond the step: the scheduler's ``sigma`` where known."""
        return {} if self.sigma is None else {"sigma": self.sigma}

    def step_sigma(self, scheduler, index: int) -> float | None:
        """The scheduler's sigma at position ``index`` of its schedule, read only for a step cache (one host
        read per step); ``None`` without a cache or for a scheduler without sigmas."""
        sigmas = getattr(scheduler, "sigmas", None)
        if self.parts.step_cache is None or sigmas is None or index >= len(sigmas):
            return None
        return float(sigmas[index])

    def extra_call(self, on: bool) -> None:
        """Around a second transformer call within a step (skip-layer guidance): the stock forward,
        every cache untouched."""
        self.pruner.set_bypass(on)
        if isinstance(self.engine, LayerCaching):
            self.engine.set_bypass(on)

    def observe(self, plan: StepPlan, output: torch.Tensor, indices: torch.Tensor | None) -> float:
        """Show the policy the step's output ``(B, N, C)`` (or the branches it asks for); its seconds."""
        return self.planner.observe(plan, output, indices)

    def compose(
        self, plan: StepPlan, tokens: torch.Tensor, indices: torch.Tensor | None, time: float | None
    ) -> torch.Tensor:
        """After a computed step: the reuse rule acting outside the transformer, on ``tokens`` (the guided
        output, or the stacked rows with ``stacked_rows``); unchanged where it acts inside or there is none."""
        rule = self.parts.rule
        if rule is None or self.rule_inside or plan.kind is StepKind.SKIP:
            return tokens
        if indices is not None and tokens.shape[0] != indices.shape[0]:
            indices = indices.repeat(tokens.shape[0] // indices.shape[0], 1)  # the stacked rows share indices
        return rule.compose(plan.step, tokens, indices, time)

    def forecast(self, step: int, tokens: torch.Tensor | None, time: float | None) -> torch.Tensor | None:
        """A step that computes no token: the rule's forecast of every token, ``None`` without a rule.

        ``tokens`` are the last composed output (rule outside); a rule inside forecasts the transformer's
        stacked output rows from the pruner's output cache instead."""
        rule = self.parts.rule
        if rule is None:
            return None
        source = self.pruner.output_cache if self.rule_inside else tokens
        if source is None:
            raise ValueError(f"step {step} computes no token but no step has been computed yet")
        none = torch.zeros(source.shape[0], 0, dtype=torch.long, device=source.device)
        return rule.compose(step, source, none, time)

    # -- cost --------------------------------------------------------------------------------------
    def full_macs(self) -> int:
        """MACs of one full forward of this generation's rows."""
        return self.pruner.macs(self.rows, self.num_text, num_tokens=self.num_tokens + self.tail)

    def _kept(self, plan: StepPlan) -> int:
        """Tokens the plan's forward computes, a tail's included (all of them at a full step)."""
        if plan.kind is StepKind.FULL or self.tail_computed:
            return plan.kept + self.tail
        return plan.kept

    def mark(self) -> int:
        """Where the MAC counter stands, before a step's forwards (see :meth:`step_macs`)."""
        return len(self.counter.calls) if self.counter is not None else 0

    def step_macs(self, plan: StepPlan, mark: int) -> int:
        """MACs the step's forwards ran since ``mark``: counted where a counter runs, else the family's formula."""
        if plan.kind is StepKind.SKIP:
            return 0
        if self.counter is not None:
            return sum(self.counter.calls[mark:])
        total = self.num_tokens + self.tail
        return self.pruner.macs(self.rows, self.num_text, num_tokens=total, kept=self._kept(plan))

    def call_macs(self, plan: StepPlan | None, rows: int = 0, num_text: int = 0) -> int:
        """MACs of the transformer call now ending, asked from inside it (a hook's ``post_forward``): counted
        where a counter runs, else the formula. ``plan=None``: an extra call within a step (skip-layer
        guidance) of ``rows`` rows over every token."""
        if plan is not None and plan.kind is StepKind.SKIP:
            return 0
        if self.counter is not None:
            return self.counter.calls[-1] if self.counter.calls else 0
        total = self.num_tokens + self.tail
        if plan is None:
            return self.pruner.macs(rows, num_text, num_tokens=total)
        return self.pruner.macs(self.rows, self.num_text, num_tokens=total, kept=self._kept(plan))

    def side_macs(self) -> int:
        """MACs the side models (a ControlNet) ran since last asked."""
        total = sum(side.total for side in self.side)
        new, self._side_seen = total - self._side_seen, total
        return new

    def selection_macs(self, plan: StepPlan) -> int:
        """MACs of the step's selection, probes included (a counter already counts the probes' maps)."""
        if plan.kind is not StepKind.PRUNED:
            return 0
        probes = 0 if self.counter is not None else self.pruner.probe_macs(self.rows, self.num_text, plan.kept)
        return self.planner.selection_macs() + probes


__all__ = ["PruningSession", "StepReuse", "CompositionError", "check_composition"]
