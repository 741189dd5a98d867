"""Stock diffusers pipelines, pruned: ``enable_pruning`` / ``disable_pruning``.

::

    pipe = StableDiffusion3Pipeline.from_pretrained(...)
    catlab.enable_pruning(pipe, catlab.selectors.build("cat"))
    image = pipe("a teddy bear").images[0]      # runs pruned
    catlab.disable_pruning(pipe)                 # the stock pipeline again

The run is put together by the same assembly as catlab's sampler
(:class:`~catlab.assembly.PruningSession`): reuse rules, K/V reuse, step caches,
the in-step engine, MAC counting, captured graphs and probes all work here as they
do in ``catlab.run``. A stateful hook on the transformer is the loop's driver: it
counts the denoising steps, and before each call plans the step and asks the
policy for indices; after it, it shows the policy the guided output and applies
the reuse rule to the stacked guidance rows (the rule acts row by row, so this
equals applying it after guidance; a guidance-distilled family's call, FLUX.1's or
Qwen-Image's, has one row per image, so there a rule that is not row-wise, ClusCa's
k-means propagation, runs too). A step whose budget is 0 tokens
(``budget_schedule``) calls no transformer: the hook returns the rule's forecast
of every token, or the previous call's output (the copy rule).

Steps are the pipeline's, not its transformer calls: the step is read from the
scheduler's own counter, so a second call within a step (SD3's skip-layer
guidance, on the conditional rows with some layers skipped) is recognised as
such. Such a call runs the stock forward on all tokens, leaving the pruning
caches and the policy untouched (its rows and skipped layers do not match the
step's caches); its MACs are added to its step's.

With ``strength`` < 1 (img2img, inpainting) a pipeline runs only the last steps of its
schedule (``scheduler.set_begin_index``): the generation is the steps it runs, numbered
from 1 at the first of them. ``start_step`` t0 counts full steps from there (the first
t0 steps the pipeline runs compute every token), a schedule's pattern (``budget_schedule``)
is laid over the steps run, and the policy is told their number; the time variable
``sigma`` is still the scheduler's own sigma of each step.

Tokens of a reference image after the generated image's in the sequence (FLUX.1
Kontext) are never selected: ``reference_tokens="computed"`` (the default) computes
them at every step, ``"cached"`` at full steps only. A pipeline's ControlNet runs in
full beside the transformer; its MACs are counted apart (:func:`controlnet_macs`).

A new generation is detected when the pipeline's scheduler holds a new
timestep tensor (every pipeline call runs ``scheduler.set_timesteps``), and
everything is reset then; ``reset_pruning(pipe)`` does it by hand. Neither test
reads a tensor on the host, so the hook adds no device synchronisation to a step.
Without a pipeline (a bare transformer) the hook counts a call at a higher
timestep value than the last as a new generation and one at the same value as a
second call within the step, which reads the timestep on the host once per call.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import warnings

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from catlab.assembly import PruningSession, StepReuse
from catlab.grid import grid_tokens
from catlab.planner import StepKind
from catlab.pruning.families import family_of, patchify
from catlab.pruning.graphs import release_graphs
from catlab.pruning.state import peek_state, state_of
from catlab.reuse.base import Reuse, unpatchify
from catlab.selection.base import Policy

POLICY_HOOK = "catlab_token_pruning"
#: how a pruned step treats the tokens after the generated image's (a reference image's, FLUX.1 Kontext)
REFERENCE_TOKENS = ("computed", "cached")


def _transformer_of(target) -> nn.Module:
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, nn.Module):
        return transformer
    if isinstance(target, nn.Module):
        return target
    raise TypeError(
        f"expected a diffusers pipeline with a .transformer or a transformer module; got {type(target).__name__}"
    )


class TokenPruningHook(ModelHook):
    """Drives a :class:`~catlab.assembly.PruningSession` from inside a stock pipeline call."""

    #: not reset by diffusers' ``reset_stateful_hooks`` (a step cache calls it at each generation's start,
    #: from inside this hook's first call): the hook detects generations itself (``reset_pruning`` by hand)
    _is_stateful = False

    def __init__(
        self,
        session: PruningSession,
        pipeline=None,
        guidance_scale: float | None = None,
        reference_tokens: str = "computed",
    ):
        super().__init__()
        self.session, self.policy, self.pipeline, self.guidance_scale = (
            session,
            session.policy,
            pipeline,
            guidance_scale,
        )
        #: ``do_classifier_free_guidance`` as the pipeline's latest ``encode_prompt`` call passed it (PixArt)
        self.cfg_seen: bool | None = None
        #: the transformer takes and returns tokens, not latent images (FLUX, Qwen-Image); where their grid is
        self.packed, self.token_grid = session.pruner.spec.packed, session.pruner.spec.token_grid
        self._warned = False
        self.reference_tokens = reference_tokens
        self.reset_state(None)

    def reset_state(self, module: nn.Module | None) -> nn.Module | None:
        self.step, self.plan, self.indices, self.time = 0, None, None, None
        #: the scheduler's timesteps (or the last timestep value) of the current generation
        self.marker: torch.Tensor | float | None = None
        #: the latest call's output, and its guidance rows in token space (for a step that computes no token)
        self.last = self.last_tokens = None
        #: whether the current call is a second call within its step (skip-layer guidance)
        self.extra, self.fresh = False, True
        #: MACs per step (every call of the step), and those of the pipeline's ControlNet per step
        self.macs: list[int] = []
        self.side: list[int] = []
        self.session.extra_call(False)
        return module

    def _guidance(self) -> float | None:
        if self.guidance_scale is not None:
            return self.guidance_scale
        scale = getattr(self.pipeline, "_guidance_scale", None)
        return float(scale) if scale is not None else None

    def _scheduler(self):
        return getattr(self.pipeline, "scheduler", None)

    def _generation_marker(self, timestep) -> torch.Tensor | float:
        """What tells one generation from the next: the scheduler's timestep tensor (compared by
        identity, no host read) or, for a bare transformer, the timestep value (read on the host)."""
        timesteps = getattr(self._scheduler(), "timesteps", None)
        if timesteps is not None:
            return timesteps
        return float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)

    def _step_of_call(self, marker) -> int:
        """The 1-based denoising step this call belongs to: the scheduler's own counter (so a second
        call within a step belongs to it), or on a bare transformer a change of timestep value."""
        scheduler = self._scheduler()
        if scheduler is not None and hasattr(scheduler, "step_index"):
            return self._schedule_index() - _begin_index(scheduler) + 1
        return self.step if marker == self.marker else self.step + 1

    def _schedule_index(self) -> int:
        """The position in the scheduler's timesteps of the step being computed (before the first
        ``scheduler.step`` of a generation its counter is unset: the pipeline's start, ``begin_index``)."""
        scheduler = self._scheduler()
        index = scheduler.step_index
        return _begin_index(scheduler) if index is None else index

    def _starts_generation(self, marker, step: int) -> bool:
        if self.marker is None or torch.is_tensor(marker) != torch.is_tensor(self.marker):
            return True
        if torch.is_tensor(marker):  # every pipeline call runs set_timesteps: a new tensor
            return marker is not self.marker or step < self.step
        return marker > self.marker  # a bare transformer: the timestep went up again

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        latents = kwargs.get("hidden_states", args[0] if args else None)
        rows, session = latents.shape[0], self.session
        marker = self._generation_marker(kwargs.get("timestep"))
        if self._starts_generation(marker, self._step_of_call(marker)):
            self.reset_state(module)
        step = self._step_of_call(marker)
        self.marker, self.extra = marker, step == self.step
        text = kwargs.get("encoder_hidden_states")
        self.call_rows, self.call_text = rows, text.shape[1] if text is not None else 0
        if self.extra:  # another call within the step: the stock forward, caches untouched
            session.extra_call(True)
            self.side[-1] += session.side_macs()
            return args, kwargs
        patch = module.config.patch_size
        self.step, self.groups = step, self._groups(rows)
        if self.fresh:  # the first call of a generation
            self.fresh = False
            grid = _grid(module, self.token_grid, latents, kwargs)
            session.begin(
                rows // self.groups,
                self.groups,
                grid,
                self._num_steps(),
                self.call_text,
                _latent_channels(module) * _patch_volume(patch),
                latents.device,
                tail=latents.shape[1] - grid_tokens(grid) if self.packed else 0,  # a reference image's tokens
                tail_computed=self.reference_tokens == "computed",
            )
        self.plan = session.plan(step)
        self.indices = session.select(self.plan)
        self.time = self._time()
        if self.plan.calls_transformer:
            session.prepare(self.plan, self.indices, self.time, self._step_sigma())
        self.macs.append(0)
        self.side.append(session.side_macs())  # the ControlNet's call, which comes before the transformer's
        return args, kwargs

    def new_forward(self, module: nn.Module, *args, **kwargs):
        """The transformer, except at a step that computes no token: then the forecast of every token
        (or the previous call's output), and no forward at all."""
        if self.extra:
            cache = self.session.parts.step_cache  # its hooks need a context: the extra call's own state
            if cache is None:
                return self.fn_ref.original_forward(*args, **kwargs)
            info = self.session.step_info()  # the step's sigma, read in pre_forward
            with cache.context(self.step, self.session.num_steps, name="catlab_extra_call", **info):
                return self.fn_ref.original_forward(*args, **kwargs)
        if self.plan.kind is StepKind.SKIP:
            return self._forecast(module)
        return self.session.forward(self.plan, self.fn_ref.original_forward, args, kwargs, tag="pipeline")

    def post_forward(self, module: nn.Module, output):
        session = self.session
        if self.extra:
            session.extra_call(False)
            self.macs[-1] += session.call_macs(None, self.call_rows, self.call_text)
            return output
        self.macs[-1] += session.call_macs(self.plan)
        sample = _sample_of(output)
        tokens = _tokens(module, self.packed, sample)[:, : session.num_tokens]  # the grid's stacked guidance rows
        session.observe(self.plan, self._shown(tokens), self.indices)
        composed = session.compose(self.plan, tokens, self.indices, self.time)
        if composed is not tokens and self.indices is not None:
            output = _with_sample(output, _from_tokens(module, self.packed, composed, sample))
        self.last, self.last_tokens = output, composed
        return output

    def _shown(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the policy sees: the guided output (the conditional rows when the scale is unknown),
        or the stacked branches for a policy that observes them."""
        if self.groups != 2 or self.policy.observes == "branches":
            return tokens
        uncond, text = tokens.chunk(2)
        scale = self._guidance()
        return text if scale is None else uncond + scale * (text - uncond)

    def _forecast(self, module: nn.Module):
        """A step that computes no token: the rule's forecast of every token, or the previous call's output."""
        if self.last is None:
            raise RuntimeError(f"catlab: step {self.step} computes no token but no step has been computed yet")
        tokens = self.session.forecast(self.step, self.last_tokens, self.time)
        if tokens is None:
            return self.last
        return _with_sample(self.last, _from_tokens(module, self.packed, tokens, _sample_of(self.last)))

    def _groups(self, rows: int) -> int:
        """How many guidance branches are stacked in the batch (2 with classifier-free guidance).

        Known from the pipeline's own ``do_classifier_free_guidance`` (SD3 stores it; for
        PixArt it is what the call passed to ``encode_prompt``), else from the guidance scale."""
        if self.session.pruner.spec.guidance_distilled:  # FLUX: one branch per call (true CFG: a second call)
            return 1
        cfg = getattr(self.pipeline, "do_classifier_free_guidance", None)
        cfg = self.cfg_seen if not isinstance(cfg, bool) else cfg
        if cfg is None:
            scale = self._guidance()
            if scale is None and rows % 2 == 0 and not self._warned:
                warnings.warn(
                    "catlab: guidance scale unknown; treating every batch row as its own sample. "
                    "Pass enable_pruning(..., guidance_scale=...) so CFG branches share indices.",
                    stacklevel=2,
                )
                self._warned = True
            cfg = scale is not None and scale > 1.0
        return 2 if cfg and rows % 2 == 0 else 1

    def _num_steps(self) -> int:
        scheduler = self._scheduler()
        timesteps = getattr(scheduler, "timesteps", None)
        return len(timesteps) - _begin_index(scheduler) if timesteps is not None else 0

    def _step_sigma(self) -> float | None:
        """The scheduler's sigma of this step, for the step cache's context (``None`` without one)."""
        scheduler = self._scheduler()
        return None if scheduler is None else self.session.step_sigma(scheduler, self._schedule_index())

    def _time(self) -> float | None:
        """The forecasts' time variable: ``None`` (the step) or the scheduler's sigma of this step."""
        scheduler = self._scheduler()
        if self.session.parts.time != "sigma" or scheduler is None:
            return None
        return float(scheduler.sigmas[self._schedule_index()])


def _begin_index(scheduler) -> int:
    """Where in its timesteps the pipeline starts (img2img and inpainting with ``strength`` < 1 skip the
    first ones, ``scheduler.set_begin_index``); 0 for a pipeline that runs them all."""
    return getattr(scheduler, "begin_index", None) or 0


def _patch_volume(patch) -> int:
    """Latent values per token of a patch size: ``p`` (an image's ``p x p``) or ``(pt, ph, pw)`` (a video's)."""
    return patch * patch if isinstance(patch, int) else math.prod(patch)


def _grid(module: nn.Module, token_grid, latents: torch.Tensor, kwargs: dict) -> tuple[int, ...]:
    """The token grid of a call: from the latent image, or the family's ``token_grid`` of the call's arguments
    (packed tokens: the transformer takes and returns tokens, not latent images; a video: (frames, h, w)),
    once per generation."""
    if token_grid is not None:
        return token_grid({**kwargs, "hidden_states": latents})
    patch = module.config.patch_size
    if latents.ndim == 5:  # a video (B, C, F, H, W): tokens frames-major, row-major
        return tuple(size // p for size, p in zip(latents.shape[2:], patch))
    return latents.shape[-2] // patch, latents.shape[-1] // patch


def _latent_channels(module: nn.Module) -> int:
    """The latent channels a call's output predicts: fewer than the output's with a learned variance (PixArt's
    ``out_channels`` twice ``in_channels``), fewer than the input's where the input carries more (an inpainting
    transformer that takes the mask and the masked image's latents too)."""
    out = getattr(module.config, "out_channels", None) or module.config.in_channels
    return min(module.config.in_channels, out)


def _tokens(module: nn.Module, packed: bool, sample: torch.Tensor) -> torch.Tensor:
    """A call's output as ``(rows, N, C)`` tokens of the latent channels (a learned variance left out)."""
    if packed:
        return sample.float()
    return patchify(sample[:, : _latent_channels(module)].float(), module.config.patch_size)  # 4D, or 5D video


def _from_tokens(module: nn.Module, packed: bool, tokens: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """``tokens`` back in the layout of the call's output ``sample``; channels (or a reference image's tokens
    after the grid's) they lack as in ``sample``."""
    if packed:
        tokens = tokens.to(sample.dtype)
        return torch.cat([tokens, sample[:, tokens.shape[1] :]], 1) if tokens.shape[1] < sample.shape[1] else tokens
    image = unpatchify(tokens, module.config.patch_size, *sample.shape[2:]).to(sample.dtype)
    if image.shape[1] < sample.shape[1]:  # the latent channels only: the rest (learned variance) as computed
        image = torch.cat([image, sample[:, image.shape[1] :]], 1)
    return image


def _sample_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _with_sample(output, sample: torch.Tensor):
    """``output`` (a tuple or a diffusers output object) with its sample replaced."""
    if isinstance(output, tuple):
        return (sample, *output[1:])
    return type(output)(sample=sample)


def enable_pruning(
    target,
    policy: Policy,
    guidance_scale: float | None = None,
    cuda_graphs: bool = False,
    reuse: StepReuse | Reuse | None = None,
    count_macs: bool = False,
    reference_tokens: str = "computed",
) -> PruningSession:
    """Make every call of ``target`` (a pipeline or its transformer) run token-pruned by ``policy``.

    Enabling again replaces the previous pruning; :func:`disable_pruning` removes it.
    The composition (selector, reuse rule, step cache) is checked here, before any call.

    Args:
        target: a diffusers pipeline (SD3, PixArt-Σ, FLUX.1, ...) or its transformer.
        policy: a built selector, e.g. ``catlab.selectors.build({"name": "cat", "alpha": 0.3})``.
        guidance_scale: how the pipeline combines its classifier-free guidance branches, so
            both branches of a sample share indices and the selector sees the guided output.
            For pipelines that store it (SD3) it is read at call time; give it for the others
            (PixArt). A guidance-distilled family (FLUX.1) runs one branch per call, its scale
            a model input: nothing to give.
        cuda_graphs: replay each computed call from a CUDA graph captured once per shape
            (:mod:`catlab.pruning.graphs`) and kept across pipeline calls; the selection stays
            eager, between the calls. Where capture is not possible (a CPU, a probe layer,
            another library's hook on the transformer) the calls run eagerly and one line says
            why. :func:`disable_pruning` frees the graphs.
        reuse: a reuse rule for the unselected tokens or a :class:`~catlab.assembly.StepReuse`
            (rule, K/V rule, step cache, time variable), as in :func:`catlab.sample`.
        count_macs: count the MACs that really ran (always on with a step cache or an in-step
            engine); :func:`pruning_macs` reports them per step.
        reference_tokens: what a pruned step does with a reference image's tokens, which follow the generated
            image's in the sequence (FLUX.1 Kontext) and are never selected: ``"computed"`` (every step computes
            them, besides the k selected) or ``"cached"`` (only full steps do; in between the generated tokens
            attend over their K/V of the last full step, as over an unselected token's).

    Returns:
        The run's assembly (:class:`~catlab.assembly.PruningSession`).

    Raises:
        TypeError: ``policy`` is not a built selector (a name, say).
        ValueError: ``reference_tokens`` is not one of ``"computed"``, ``"cached"``.
        CompositionError: the parts cannot run together (:func:`catlab.assembly.check_composition`).
    """
    if not isinstance(policy, Policy):
        hint = f": catlab.selectors.build({policy!r})" if isinstance(policy, str) else ""
        raise TypeError(
            f"enable_pruning takes a selector (a catlab Policy{hint}); got {type(policy).__name__} {policy!r:.60}"
        )
    if reference_tokens not in REFERENCE_TOKENS:
        raise ValueError(f"enable_pruning: reference_tokens must be 'computed' or 'cached'; got {reference_tokens!r}")
    transformer = _transformer_of(target)
    if peek_state(transformer) is not None and state_of(transformer).session is not None:
        disable_pruning(transformer)
    parts = reuse if isinstance(reuse, StepReuse) else StepReuse(rule=reuse)
    if parts.step_cache is not None and any(
        getattr(m, "_compiled_call_impl", None) is not None for m in transformer.modules()
    ):
        raise ValueError(
            f"enable_pruning: the transformer's blocks are compiled (compile_pruned), and the step cache "
            f"{parts.step_cache.name!r} decides on the host at each step whether a block computes, which a compiled "
            "block cannot; catlab.pruning.uncompile(pipe) first, or run without the step cache"
        )
    pipeline = None if target is transformer else target
    controlnet = getattr(pipeline, "controlnet", None)  # runs every token beside the transformer: its MACs counted
    with _inside_offload_hook(transformer):
        session = PruningSession(
            transformer,
            policy,
            parts,
            cuda_graphs=cuda_graphs,
            count_macs=count_macs,
            rows_stacked=not family_of(transformer).guidance_distilled,  # FLUX: one row per image in a call
            side_models=(controlnet,) if isinstance(controlnet, nn.Module) else (),
        ).attach()
        hook = TokenPruningHook(session, pipeline, guidance_scale, reference_tokens)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, POLICY_HOOK)
    state = state_of(transformer)
    state.session = session
    if pipeline is not None and _watch_guidance(pipeline, hook):
        state.watched = pipeline
    return session


@contextlib.contextmanager
def _inside_offload_hook(transformer: nn.Module):
    """Add or remove catlab's hook beneath accelerate's (``enable_model_cpu_offload``), never on top of it.

    accelerate wraps the transformer's ``forward`` and, when the pipeline re-installs its offload hooks at the
    end of every call, restores the ``forward`` it wrapped: a hook added on top of accelerate's would drop out
    of the call path after the first call (its token hooks left behind with stale indices), and one removed
    beneath it would come back. So accelerate's hook is lifted off while catlab's is added or removed.
    """
    offload = getattr(transformer, "_hf_hook", None)
    if offload is None:
        yield
        return
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    remove_hook_from_module(transformer)
    try:
        yield
    finally:
        add_hook_to_module(transformer, offload)


def _watch_guidance(pipeline, hook: TokenPruningHook) -> bool:
    """Record whether a call uses classifier-free guidance, for pipelines that do not store it (PixArt):
    their ``encode_prompt`` receives ``do_classifier_free_guidance``. The instance attribute is removed
    by :func:`disable_pruning`. Returns whether the pipeline is watched."""
    original = getattr(type(pipeline), "encode_prompt", None)
    if original is None or "do_classifier_free_guidance" not in inspect.signature(original).parameters:
        return False

    @functools.wraps(original)
    def encode_prompt(*args, **kwargs):
        bound = inspect.signature(original).bind(pipeline, *args, **kwargs)
        bound.apply_defaults()
        hook.cfg_seen = bool(bound.arguments["do_classifier_free_guidance"])
        return original(pipeline, *args, **kwargs)

    pipeline.encode_prompt = encode_prompt
    return True


def _hook(transformer: nn.Module) -> TokenPruningHook | None:
    state = peek_state(transformer)
    if state is None or state.session is None:
        return None
    return HookRegistry.check_if_exists_or_initialize(transformer).get_hook(POLICY_HOOK)


def reset_pruning(target) -> None:
    """Forget all pruning state; the next call starts a new generation.

    Args:
        target: the pipeline or transformer given to :func:`enable_pruning`; one that is not
            pruned is left as it is.
    """
    transformer = _transformer_of(target)
    hook = _hook(transformer)
    if hook is not None:
        hook.reset_state(transformer)


def disable_pruning(target) -> None:
    """Remove every hook and processor catlab installed; the stock model runs again.

    Args:
        target: the pipeline or transformer given to :func:`enable_pruning`; one that is not
            pruned is left as it is.
    """
    transformer = _transformer_of(target)
    state = peek_state(transformer)
    if state is None or state.session is None:
        return
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    hook = registry.get_hook(POLICY_HOOK)
    with _inside_offload_hook(transformer):
        registry.remove_hook(POLICY_HOOK, recurse=False)
        if hook is not None:
            hook.session = None  # the hook and diffusers' reference to it form a cycle: hold nothing
        state.session.detach()
    release_graphs(transformer)
    state.session = None
    if state.watched is not None:
        state.watched.__dict__.pop("encode_prompt", None)
        state.watched = None


def pruning_macs(target) -> list[int]:
    """MACs of each denoising step since the current generation started (every transformer call of the step).

    Args:
        target: the pipeline or transformer given to :func:`enable_pruning`.

    Returns:
        One count per step: counted as they ran where the run counts them (``count_macs``, a
        step cache), else the family's analytic formula; empty when ``target`` is not pruned.
    """
    hook = _hook(_transformer_of(target))
    return list(hook.macs) if hook is not None else []


def controlnet_macs(target) -> list[int]:
    """MACs of the pipeline's ControlNet at each denoising step of the current generation, counted as they ran.

    A ControlNet runs unpruned, on every token, before the transformer at each step (also at a step that calls
    no transformer); :func:`pruning_macs` counts the transformer only, so a step's total is the two summed.

    Args:
        target: the pipeline given to :func:`enable_pruning`.

    Returns:
        One count per step; empty when ``target`` is not pruned or has no ControlNet.
    """
    hook = _hook(_transformer_of(target))
    return list(hook.side) if hook is not None and hook.session.side else []


__all__ = [
    "enable_pruning",
    "disable_pruning",
    "reset_pruning",
    "pruning_macs",
    "controlnet_macs",
    "TokenPruningHook",
    "POLICY_HOOK",
]
