"""What a selection strategy sees and must return.

A strategy (a *policy*) never touches the model. Before each denoising step the
sampler (or the diffusers hook) asks :meth:`Policy.num_kept` whether the step is
pruned; if so it calls :meth:`Policy.select` with a small :class:`StepState` and
gets back ``(B, k)`` token indices, one row per sample. After the step the policy
is shown the model output through :meth:`Policy.observe`, so it can keep whatever
history it needs (a reference output, staleness counters, ...).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, is_dataclass
from typing import ClassVar

import torch

from catlab.capabilities import Capability
from catlab.grid import Grid, grid_tokens
from catlab.registry import Named


@dataclass
class StepState:
    """The step as a policy sees it.

    ``output`` is the latest model output in token space, ``(B, N, C)`` with the
    classifier-free-guidance branches combined (the "predicted noise" n_t of the
    paper), or the ``(2B, N, C)`` stacked branches for a policy whose
    :attr:`Policy.observes` is ``"branches"``; ``None`` before the first step. ``attention`` maps each probe layer the
    policy asked for (:attr:`Policy.attention_layers`) to ``(B, N, N)`` image-to-image
    attention probabilities averaged over heads, each row as last computed.
    """

    step: int
    num_steps: int
    grid: Grid
    batch_size: int
    k: int
    output: torch.Tensor | None = None
    attention: dict[int, torch.Tensor] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def num_tokens(self) -> int:
        return grid_tokens(self.grid)


def kept_tokens(alpha: float, num_tokens: int) -> int:
    """The one budget rule: k = ⌊α·N⌋, at least one token and at most N.

    The authors' ``int(select_factor * N)`` (1228 of 4096 at α = 0.3), taken in the
    same floating-point arithmetic so that their index sets are reproducible. Every
    selector's k comes from here, so strategies are always compared at the same
    token budget.
    """
    return max(1, min(int(num_tokens), int(float(alpha) * int(num_tokens))))


@dataclass
class Policy(Named):
    """Base of every selector: the pruning schedule plus the selection hooks.

    ``alpha`` is the fraction of image tokens kept (recomputed) at a pruned step;
    steps ``1..start_step`` (the paper's t0) run every token and pruning starts at
    ``start_step + 1``. Subclasses override :meth:`select` and, if they keep
    history, :meth:`reset` and :meth:`observe`.
    """

    alpha: float = 0.3
    start_step: int = 8
    seed: int = 0

    #: what this selector needs from the run (:class:`~catlab.capabilities.Capability`), declared as a class
    #: attribute like a step cache's or a reuse rule's (``capabilities = Capability.REPLAYS_SELECTION``); read
    #: through the :attr:`capabilities` property, which adds what the instance implies (probe layers)
    _declared: ClassVar[Capability] = Capability.NONE
    #: probe layers whose attention probabilities :attr:`StepState.attention` must carry (any: the
    #: selector has :attr:`Capability.ATTENTION_PROBES <catlab.capabilities.Capability>`)
    attention_layers: ClassVar[tuple[int, ...]] = ()
    #: what :attr:`StepState.output` and :meth:`observe` show: ``"guided"`` (B rows, the
    #: classifier-free-guidance combination) or ``"branches"`` (the 2·B rows as the
    #: transformer computed them, unconditional first; B rows when a run has no guidance)
    observes: ClassVar[str] = "guided"

    def __init_subclass__(cls, **kwargs) -> None:
        """A subclass's ``capabilities = Capability...`` becomes its declared set, read by the property below
        (``declares``, the former name, still works and warns)."""
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("capabilities")
        if "declares" in cls.__dict__:
            warnings.warn(
                f"{cls.__name__}.declares is deprecated: set capabilities = ... instead",
                DeprecationWarning,
                stacklevel=2,
            )
            declared = cls.__dict__["declares"]
        if isinstance(declared, Capability):
            cls._declared = declared
            cls.capabilities = Policy.__dict__["capabilities"]

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(
                f"alpha must be a number in (0, 1] (the fraction of tokens kept); got {self.alpha!r}, "
                f"a {type(self.alpha).__name__}"
            )
        if not (0.0 < float(self.alpha) <= 1.0):
            raise ValueError(f"alpha must be in (0, 1] (the fraction of tokens kept); got {self.alpha}")
        if int(self.start_step) < 0:
            raise ValueError(f"start_step must be >= 0; got {self.start_step}")

    def check(self, num_steps: int) -> None:
        """Fail before any compute if the schedule cannot work with ``num_steps``."""
        if self.prunes and self.start_step >= num_steps:
            raise ValueError(
                f"start_step={self.start_step} must be < num_steps={num_steps}: pruning starts at step start_step + 1"
            )
        if self.prunes and self.start_step < 1 and not self.capabilities & Capability.IN_STEP_ENGINE:
            raise ValueError(
                f"start_step={self.start_step} must be >= 1: a pruned step reuses the outputs of a full step before "
                "it (steps 1..start_step run every token)"
            )

    @property
    def capabilities(self) -> Capability:
        """What the run must provide: the declared set, plus attention probes when probe layers are named."""
        caps = type(self)._declared
        return caps | Capability.ATTENTION_PROBES if self.attention_layers else caps

    @property
    def prunes(self) -> bool:
        return True

    def reset(self, batch_size: int, grid: Grid, num_steps: int, device: torch.device) -> None:
        """Forget everything: a new generation starts."""
        self.generator = torch.Generator(device="cpu").manual_seed(int(self.seed))
        for part in vars(self).values():  # parts (clusterer, scorer, ...) name their selector in their log lines
            if is_dataclass(part) and not isinstance(part, type):
                try:
                    part.owner = self.name
                except AttributeError:  # a frozen or slotted part: its lines go without the name
                    pass

    def num_kept(self, step: int, num_tokens: int) -> int | None:
        """Tokens to recompute at ``step`` (1-based); ``None`` means every token, unpruned."""
        if not self.prunes or step <= self.start_step:
            return None
        return kept_tokens(self.alpha, num_tokens)

    def select(self, state: StepState) -> torch.Tensor:
        raise NotImplementedError

    # A selector may also split :meth:`select` in two, so that with ``cuda_graphs`` its per-step
    # tensor work is captured once and replayed (catlab.pruning.selection_graphs.SelectionGraphs):
    #
    #   prepare_step(state) -> Hashable | None   host-side bookkeeping (counters, once-per-generation
    #                                            set-up); returns a key naming the code path
    #                                            select_tensors will take, None when it cannot be
    #                                            replayed this step
    #   select_tensors(state) -> Tensor           tensor operations only: reads state, rebinds no tensor
    #                                            attribute (writes outputs for observe in place), and
    #                                            changes nothing the next call reads
    #
    # with select(state) = prepare_step(state), then select_tensors(state), and capabilities =
    # Capability.REPLAYS_SELECTION. ``cat`` does.

    def observe(self, step: int, output: torch.Tensor, indices: torch.Tensor | None) -> None:
        """See the model output ``(B, N, C)`` of ``step`` and the indices used (``None``: all)."""

    def selection_macs(self, state: StepState) -> int:
        """Multiply-accumulates the selection itself spent at this step (for cost accounting)."""
        return 0


def select_indices(policy: Policy, state: StepState) -> torch.Tensor:
    """The one call of ``policy.select``; a selector that wraps another (``budget_schedule``) delegates through it."""
    return policy.select(state)


def build_part(registry, spec):
    """A selector's part (scorer, staleness, ...) from ``{"name": ..., **params}`` or a bare name.

    An already-built object passes through unchanged, so parts can be shared or
    constructed in code.
    """
    if isinstance(spec, (str, Mapping)):
        return registry.build(spec)
    return spec
