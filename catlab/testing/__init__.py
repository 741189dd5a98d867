"""Drivers for checking a selector without a model: the sampler's protocol on synthetic outputs.

They run the same :class:`~catlab.planner.StepPlanner` as the sampler and the
stock-pipeline hook, so a policy tested here meets exactly the calls it meets
in a real generation. Useful in a plugin's own tests::

    from catlab.testing import simulate
    for indices in simulate(my_policy, grid=(8, 8), num_steps=12):
        ...                                   # (B, k) at pruned steps, None elsewhere
    check_policy(my_policy, grid=(3, 8, 8))   # a video grid: 3 frames of 8×8 tokens

A grid is ``(height, width)`` or ``(frames, height, width)`` (:mod:`catlab.grid`); the synthetic
outputs have one row per token of the whole grid, numbered frames-major then row-major.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from catlab.capabilities import Capability
from catlab.grid import Grid, check_grid, grid_tokens
from catlab.planner import StepKind, StepPlanner
from catlab.pruning import SelectionGraphs, no_host_sync, replaying
from catlab.selection import Policy, StepState

CPU = torch.device("cpu")


def simulate(
    policy: Policy,
    grid: Grid,
    num_steps: int,
    batch: int = 2,
    channels: int = 4,
    seed: int = 0,
    outputs: Callable[[int], torch.Tensor] | None = None,
    on_select: Callable[[int, StepState, torch.Tensor], None] | None = None,
    device: torch.device | str = CPU,
    guard: Callable[[int, StepKind], bool] | None = None,
    check_indices: bool = False,
) -> list[torch.Tensor | None]:
    """One generation of ``num_steps`` with random ``(B, N, C)`` outputs (or ``outputs(step)``), N the tokens of
    ``grid`` (an image's ``(h, w)`` or a video's ``(frames, h, w)``).

    Probe attention maps, when the policy asks for them, are random softmax rows.
    ``on_select(step, state, indices)`` sees each selection. ``guard(step, kind)``
    returning True runs that step's selection and observation under
    :func:`~catlab.pruning.sync_check.no_host_sync`. The planner checks the index contract at every
    pruned step (on a GPU the later steps' values on the device, read at the last step; at once with
    ``check_indices``). Returns the indices per step.
    """
    device = torch.device(device)
    grid = check_grid(grid)
    n = grid_tokens(grid)
    gen = torch.Generator().manual_seed(seed)
    planner = StepPlanner(policy, check_indices=check_indices)
    policy.check(num_steps)
    planner.reset(batch, grid, num_steps, device)
    chosen = []
    for step in range(1, num_steps + 1):
        plan = planner.plan(step)
        checked = guard is not None and guard(step, plan.kind)
        attention = None
        if plan.kind is StepKind.PRUNED:
            attention = {
                layer: torch.softmax(torch.randn(batch, n, n, generator=gen), -1).to(device)
                for layer in _probes(policy)
            } or None
        with _guarded(checked, policy, step):
            idx = planner.select(plan, attention)
            if idx is not None:
                policy.selection_macs(planner.state)
        if on_select is not None and idx is not None:
            on_select(step, planner.state, idx)
        if plan.kind is StepKind.SKIP:
            output = planner.output  # nothing computed: the previous output stands
        else:
            output = (outputs(step) if outputs else torch.randn(batch, n, channels, generator=gen)).to(device)
        with _guarded(checked, policy, step):
            planner.observe(plan, output, idx)
        chosen.append(idx)
    return chosen


def _probes(policy: Policy) -> tuple[int, ...]:
    """The probe layers whose (random) attention maps a policy with attention probes is shown."""
    return tuple(policy.attention_layers) if Capability.ATTENTION_PROBES in policy.capabilities else ()


def _guarded(checked: bool, policy: Policy, step: int):
    return no_host_sync(f"{policy.name} at step {step}") if checked else nullcontext()


def check_policy(
    policy: Policy,
    grid: Grid = (8, 8),
    batch_size: int = 2,
    num_steps: int | None = None,
    device: torch.device | str = CPU,
    skip_first_pruned: bool = False,
    declared: bool = True,
) -> int:
    """Drive ``policy`` through one synthetic generation: the index contract at every pruned step, and each
    pruned step under ``no_host_sync``.

    Every pruned step's indices must be ``(batch_size, k)`` integers in ``[0, N)``, unique per row
    (:class:`~catlab.planner.IndexContractError` otherwise). The host reads a policy declares are
    allowed: with ``Capability.HOST_SETUP`` (a one-time set-up, e.g. its clusters) its first pruned
    step is left unguarded, with ``Capability.HOST_LOOPS`` (a host-side reference) every step is.

    Args:
        policy: the selector to drive, as built (its ``alpha``, ``start_step``, ...).
        grid: the token grid, ``(height, width)`` or ``(frames, height, width)``.
        batch_size: samples per generation.
        num_steps: steps of the generation; by default the policy's ``start_step`` + 8, so any
            policy's defaults get 8 pruned steps.
        device: where the synthetic outputs live.
        skip_first_pruned: leave the first pruned step unguarded even without ``HOST_SETUP``.
        declared: ``False`` guards the declared host steps too (to list them, as catlab's tests do).

    Returns:
        The number of guarded steps.

    Raises:
        HostSyncError: a guarded step read the host (:mod:`catlab.pruning.sync_check`).
        IndexContractError: a pruned step's indices broke the contract.
    """
    if num_steps is None:
        num_steps = int(getattr(policy, "start_step", 0)) + 8
    caps = policy.capabilities if declared else Capability.NONE
    skip_first_pruned = skip_first_pruned or Capability.HOST_SETUP in caps
    pruned: list[int] = []
    guarded: list[int] = []

    def guard(step: int, kind: StepKind) -> bool:
        if kind is not StepKind.PRUNED:
            return False
        pruned.append(step)
        if Capability.HOST_LOOPS in caps or (skip_first_pruned and len(pruned) == 1):
            return False
        guarded.append(step)
        return True

    simulate(policy, grid, num_steps, batch=batch_size, channels=8, device=device, guard=guard, check_indices=True)
    return len(guarded)


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched from the host while active (``with OpCounter() as c: ...``).

    On a GPU each is one kernel launch or more, except views (``views=False`` leaves them out).
    Operators the CPU stand-in re-runs while replaying a captured graph are not counted: a real
    replay dispatches none.
    """

    def __init__(self, views: bool = True):
        super().__init__()
        self.views = views
        self.count = 0
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not replaying() and (self.views or not func.is_view):
            self.count += 1
            name = str(func.overloadpacket)
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def selection_ops(
    policy: Policy,
    grid: Grid = (16, 16),
    num_steps: int = 12,
    batch: int = 1,
    channels: int = 16,
    seed: int = 0,
    graphed: bool = False,
) -> dict[int, dict[str, int]]:
    """ATen operators each pruned step of ``policy`` dispatches from the host in its selection and observation.

    One synthetic generation as in :func:`simulate`; returns ``{step: {op name: count}}`` for the
    pruned steps. A selector's per-step work is launch-bound on a GPU at batch 1, so this
    count, not its FLOPs, is what its wall-clock share follows. ``graphed``: with the selection
    replayed from graphs where the policy allows it (the CPU stand-in; a replay counts nothing).
    """
    n = grid_tokens(grid)
    gen = torch.Generator().manual_seed(seed)
    planner = StepPlanner(policy, selection_graphs=SelectionGraphs(CPU) if graphed else None)
    policy.check(num_steps)
    planner.reset(batch, grid, num_steps, CPU)
    counts: dict[int, dict[str, int]] = {}
    for step in range(1, num_steps + 1):
        plan = planner.plan(step)
        attention = None
        if plan.kind is StepKind.PRUNED:
            attention = {
                layer: torch.softmax(torch.randn(batch, n, n, generator=gen), -1) for layer in _probes(policy)
            } or None
        output = torch.randn(batch, n, channels, generator=gen)
        counter = OpCounter()
        with counter if plan.kind is StepKind.PRUNED else nullcontext():
            idx = planner.select(plan, attention)
            planner.observe(plan, output if plan.kind is not StepKind.SKIP else planner.output, idx)
        if plan.kind is StepKind.PRUNED:
            counts[step] = counter.ops
    return counts
