"""``enable_pruning`` / ``disable_pruning``: token pruning for a stock diffusers pipeline.

::

    pipe = StableDiffusion3Pipeline.from_pretrained(...)
    catlab.enable_pruning(pipe, catlab.selectors.build("cat"))
    image = pipe("a teddy bear").images[0]      # runs pruned
    catlab.disable_pruning(pipe)                 # the stock pipeline again

A stateful hook on the transformer counts the denoising steps and follows the
same :class:`~catlab.planner.StepPlanner` as catlab's sampler: before each call
it plans the step and asks the policy for indices, after it shows the policy the
guided output. A step whose budget is 0 tokens (``budget_schedule``) calls no
transformer: the hook returns the previous call's output again (the copy rule).

Steps are the pipeline's, not its transformer calls: the step is read from the
scheduler's own counter, so a second call within a step (SD3's skip-layer
guidance, on the conditional rows with some layers skipped) is recognised as
such. Such a call runs the stock forward on all tokens, leaving the pruning
caches and the policy untouched (its rows and skipped layers do not match the
step's caches); its MACs are added to its step's, as a full forward of its rows.

A new generation is detected when the pipeline's scheduler holds a new
timestep tensor (every pipeline call runs ``scheduler.set_timesteps``), and
everything is reset then; ``reset_pruning(pipe)`` does it by hand. Neither test
reads a tensor on the host, so the hook adds no device synchronisation to a step.
Without a pipeline (a bare transformer) the hook counts a call at a higher
timestep value than the last as a new generation and one at the same value as a
second call within the step, which reads the timestep on the host once per call.
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from catlab.pruning.engine import TokenPruner
from catlab.pruning.families import patchify
from catlab.pruning.graphs import ForwardGraphs, graph_refusal, graphs_of, log_refusal, release_graphs
from catlab.pruning.selection_graphs import SelectionGraphs
from catlab.planner import StepKind, StepPlan, StepPlanner
from catlab.selection.base import Policy

POLICY_HOOK = "catlab_token_pruning"


def _transformer_of(target) -> nn.Module:
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, nn.Module):
        return transformer
    if isinstance(target, nn.Module):
        return target
    raise TypeError(f"expected a diffusers pipeline with a .transformer or a transformer module; got {type(target).__name__}")


class TokenPruningHook(ModelHook):
    """Drives a :class:`TokenPruner` from a policy inside a stock pipeline call."""

    _is_stateful = True

    def __init__(self, pruner: TokenPruner, policy: Policy, pipeline=None, guidance_scale: float | None = None,
                 graphs: ForwardGraphs | None = None):
        super().__init__()
        self.pruner, self.policy, self.pipeline, self.guidance_scale = pruner, policy, pipeline, guidance_scale
        #: where the computed calls replay from (``None``: eager)
        self.graphs = graphs
        selection = SelectionGraphs(graphs.device) if graphs is not None else None
        self.planner = StepPlanner(policy, selection_graphs=selection)
        self.step = 0
        self.plan: StepPlan | None = None
        #: the latest computed call's output, returned again at a step that computes no token
        self.last = None
        #: the scheduler's timesteps (or the last timestep value) of the current generation
        self.marker: torch.Tensor | float | None = None
        self.rows: int | None = None
        self.indices: torch.Tensor | None = None
        #: whether the current call is a second call within its step (skip-layer guidance)
        self.extra, self.fresh = False, True
        #: ``do_classifier_free_guidance`` as the pipeline's latest ``encode_prompt`` call passed it (PixArt)
        self.cfg_seen: bool | None = None
        #: analytic MACs per step (every call of the step)
        self.macs: list[int] = []
        self._warned = False

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.step, self.marker, self.rows, self.indices, self.plan, self.last = 0, None, None, None, None, None
        self.extra, self.fresh = False, True
        self.macs = []
        self.pruner.set_bypass(False)
        self.pruner.reset()
        if self.graphs is not None:
            self._check_graphs(module)
        return module

    def _check_graphs(self, module: nn.Module) -> None:
        """At each generation: still capturable (hooks added since?), else eager from now on, said once."""
        reason = graph_refusal(module, self.policy)
        if reason is not None:
            log_refusal(reason, module)
            self.graphs = self.planner.selection_graphs = None
            return
        self.graphs.new_generation(module)

    def _guidance(self) -> float | None:
        if self.guidance_scale is not None:
            return self.guidance_scale
        scale = getattr(self.pipeline, "_guidance_scale", None)
        return float(scale) if scale is not None else None

    def _generation_marker(self, timestep) -> torch.Tensor | float:
        """What tells one generation from the next: the scheduler's timestep tensor (compared by
        identity, no host read) or, for a bare transformer, the timestep value (read on the host)."""
        timesteps = getattr(getattr(self.pipeline, "scheduler", None), "timesteps", None)
        if timesteps is not None:
            return timesteps
        return float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)

    def _step_of_call(self, marker) -> int:
        """The 1-based denoising step this call belongs to.

        With a pipeline it is the scheduler's own step counter, so a second call within a
        step (skip-layer guidance) belongs to the same step; on a bare transformer a call
        at the same timestep value as the previous one does.
        """
        scheduler = getattr(self.pipeline, "scheduler", None)
        if scheduler is not None and hasattr(scheduler, "step_index"):
            return (scheduler.step_index or 0) + 1
        return self.step if marker == self.marker else self.step + 1

    def _starts_generation(self, marker, step: int) -> bool:
        if self.marker is None or torch.is_tensor(marker) != torch.is_tensor(self.marker):
            return True
        if torch.is_tensor(marker):  # every pipeline call runs set_timesteps: a new tensor
            return marker is not self.marker or step < self.step
        return marker > self.marker  # a bare transformer: the timestep went up again

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        latents = kwargs.get("hidden_states", args[0] if args else None)
        rows = latents.shape[0]
        marker = self._generation_marker(kwargs.get("timestep"))
        if self._starts_generation(marker, self._step_of_call(marker)):
            self.reset_state(module)
        step = self._step_of_call(marker)
        self.marker, self.extra = marker, step == self.step
        patch = module.config.patch_size
        grid = (latents.shape[-2] // patch, latents.shape[-1] // patch)
        text = kwargs.get("encoder_hidden_states")
        n_text = text.shape[1] if text is not None else 0
        if self.extra:  # another call within the step: the stock forward, caches untouched
            self.pruner.set_bypass(True)
            self.macs[-1] += self.pruner.macs(rows, n_text, num_tokens=grid[0] * grid[1])
            return args, kwargs
        self.step, self.rows = step, rows
        self.groups = self._groups(rows)
        if self.fresh:  # the first call of a generation
            self.fresh = False
            self.planner.reset(rows // self.groups, grid, self._num_steps(), latents.device)
            self.pruner.probe_layers = set(getattr(self.policy, "attention_layers", ()))
        self.plan = self.planner.plan(self.step)
        batch = rows // self.groups
        attention = {l: a[-batch:] for l, a in self.pruner.attention.items()} or None
        self.indices = self.planner.select(self.plan, attention)
        if self.plan.calls_transformer:
            self.pruner.set_indices(self.indices, rows)
        self.macs.append(self.pruner.macs(rows, n_text, num_tokens=grid[0] * grid[1], kept=self.plan.kept)
                         if self.plan.calls_transformer else 0)
        return args, kwargs

    def new_forward(self, module: nn.Module, *args, **kwargs):
        """The transformer, except at a step that computes no token: then the previous call's output again
        (the copy rule's forecast of every token), and no forward at all."""
        if self.plan.kind is StepKind.SKIP and not self.extra:
            if self.last is None:
                raise RuntimeError(f"catlab: step {self.step} computes no token but no step has been computed yet")
            return self.last
        if self.graphs is not None and not self.extra:
            return self.graphs.call(self.pruner, self.fn_ref.original_forward, args, kwargs, tag="pipeline")
        return self.fn_ref.original_forward(*args, **kwargs)

    def _groups(self, rows: int) -> int:
        """How many guidance branches are stacked in the batch (2 with classifier-free guidance).

        Known from the pipeline's own ``do_classifier_free_guidance`` (SD3 stores it; for
        PixArt it is what the call passed to ``encode_prompt``), else from the guidance scale."""
        cfg = getattr(self.pipeline, "do_classifier_free_guidance", None)
        cfg = self.cfg_seen if not isinstance(cfg, bool) else cfg
        if cfg is None:
            scale = self._guidance()
            if scale is None and rows % 2 == 0 and not self._warned:
                warnings.warn("catlab: guidance scale unknown; treating every batch row as its own sample. "
                              "Pass enable_pruning(..., guidance_scale=...) so CFG branches share indices.")
                self._warned = True
            cfg = scale is not None and scale > 1.0
        return 2 if cfg and rows % 2 == 0 else 1

    def _num_steps(self) -> int:
        timesteps = getattr(getattr(self.pipeline, "scheduler", None), "timesteps", None)
        return len(timesteps) if timesteps is not None else 0

    def post_forward(self, module: nn.Module, output):
        if self.extra:
            self.pruner.set_bypass(False)
            return output
        if self.plan.kind is StepKind.SKIP:
            return output
        self.last = output
        sample = output[0] if isinstance(output, tuple) else output.sample
        channels = module.config.in_channels
        pred = sample[:, :channels].float()
        if self.groups == 2 and self.policy.observes != "branches":
            # the policy sees the guided output (the conditional rows when the scale is unknown)
            uncond, text = pred.chunk(2)
            scale = self._guidance()
            pred = text if scale is None else uncond + scale * (text - uncond)
        self.planner.observe(self.plan, patchify(pred, module.config.patch_size), self.indices)
        return output


def enable_pruning(target, policy: Policy, guidance_scale: float | None = None,
                   cuda_graphs: bool = False) -> TokenPruner:
    """Make every call of ``target`` (a pipeline or its transformer) run token-pruned by ``policy``.

    ``guidance_scale`` tells the hook how the pipeline combines its classifier-free
    guidance branches, so both branches of a sample share indices and the policy
    sees the guided output. For pipelines that store it (SD3) it is read at call
    time; give it explicitly for the others (PixArt).

    ``cuda_graphs=True`` replays each computed call from a CUDA graph captured once per
    shape (:mod:`catlab.pruning.graphs`) and kept across pipeline calls; the policy's
    selection stays eager, between the calls. Where capture is not possible (a CPU, a
    probe layer, another library's hook on the transformer) the calls run eagerly and
    one line says why. :func:`disable_pruning` frees the graphs.
    """
    if not all(callable(getattr(policy, m, None)) for m in ("reset", "num_kept", "select", "observe", "check")):
        hint = f": catlab.selectors.build({policy!r})" if isinstance(policy, str) else ""
        raise TypeError(f"enable_pruning takes a selector (a catlab Policy{hint}); got {type(policy).__name__} "
                        f"{policy!r:.60}")
    if getattr(policy, "in_step_engine", False):
        raise ValueError(f"selector '{policy.name}' prunes inside each forward and runs in catlab's sampler "
                         "(python -m catlab.run, catlab.sample); on a stock pipeline use selector atedm_reuse")
    transformer = _transformer_of(target)
    if getattr(transformer, "_catlab_pruner", None) is not None:
        disable_pruning(transformer)
    graphs = None
    if cuda_graphs:
        reason = graph_refusal(transformer, policy)
        if reason is None:
            graphs = graphs_of(transformer)
        else:
            log_refusal(reason, transformer)
    pruner = TokenPruner(transformer, pool=graphs.pool if graphs is not None else None).attach()
    pipeline = None if target is transformer else target
    hook = TokenPruningHook(pruner, policy, pipeline, guidance_scale, graphs)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, POLICY_HOOK)
    transformer._catlab_pruner = pruner
    if pipeline is not None:
        _watch_guidance(pipeline, hook)
    return pruner


def _watch_guidance(pipeline, hook: TokenPruningHook) -> None:
    """Record whether a call uses classifier-free guidance, for pipelines that do not store it (PixArt):
    their ``encode_prompt`` receives ``do_classifier_free_guidance``. The instance attribute is removed
    by :func:`disable_pruning`."""
    original = getattr(type(pipeline), "encode_prompt", None)
    if original is None or "do_classifier_free_guidance" not in inspect.signature(original).parameters:
        return

    @functools.wraps(original)
    def encode_prompt(*args, **kwargs):
        bound = inspect.signature(original).bind(pipeline, *args, **kwargs)
        bound.apply_defaults()
        hook.cfg_seen = bool(bound.arguments["do_classifier_free_guidance"])
        return original(pipeline, *args, **kwargs)

    pipeline.encode_prompt = encode_prompt
    pipeline._catlab_watch = True


def reset_pruning(target) -> None:
    """Forget all pruning state; the next call starts a new generation."""
    transformer = _transformer_of(target)
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(POLICY_HOOK) if registry is not None else None
    if hook is not None:
        hook.reset_state(transformer)


def disable_pruning(target) -> None:
    """Remove every hook and processor catlab installed; the stock model runs again."""
    transformer = _transformer_of(target)
    pruner = getattr(transformer, "_catlab_pruner", None)
    if pruner is None:
        return
    transformer._diffusers_hook.remove_hook(POLICY_HOOK, recurse=False)
    pruner.detach()
    release_graphs(transformer)
    transformer._catlab_pruner = None
    if target is not transformer and getattr(target, "_catlab_watch", False):
        del target.encode_prompt, target._catlab_watch


def pruning_macs(target) -> list[int]:
    """Analytic MACs of each transformer call since the current generation started."""
    transformer = _transformer_of(target)
    hook = transformer._diffusers_hook.get_hook(POLICY_HOOK)
    return list(hook.macs)
