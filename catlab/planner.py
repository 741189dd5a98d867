"""The step plan: what happens at denoising step t, decided in one place for every loop.

Every loop that runs a policy — :func:`catlab.sampler.sample`, the hook that
prunes a stock diffusers pipeline (:func:`catlab.enable_pruning`), the host-sync
checker and the test drivers in :mod:`catlab.testing` — drives it the same way::

    planner = StepPlanner(policy, step_cache)
    planner.reset(batch, grid, num_steps, device)
    for step in range(1, num_steps + 1):          # steps count from 1
        plan = planner.plan(step)                  # FULL | PRUNED(k) | SKIP | CACHED
        indices = planner.select(plan)             # (B, k) at a PRUNED step, else None
        ... the forward (none at a SKIP step) ...
        planner.observe(plan, output, indices)     # output: (B, N, C), guidance combined

This module is the only caller of a policy's ``select`` and ``observe``, so the
rule "a 0-token step calls no transformer" or "a step the cache forecasts asks
the policy nothing" cannot differ between loops.
"""

from __future__ import annotations

import contextlib
import enum
import time
from dataclasses import dataclass

import torch

from catlab.capabilities import Capability
from catlab.grid import Grid, check_grid, grid_tokens
from catlab.selection.base import Policy, StepState, select_indices  # noqa: F401  (re-exported)


class StepKind(enum.Enum):
    FULL = "full"  #: every token is computed
    PRUNED = "pruned"  #: k tokens are computed, the others reused
    SKIP = "skip"  #: no token is computed: no transformer call, the reuse rule forecasts every token
    CACHED = "cached"  #: the transformer is called but a step cache forecasts inside it; the policy is not asked


@dataclass(frozen=True)
class StepPlan:
    """One step's plan: ``step`` (1-based), its kind and the number of image tokens it computes."""

    step: int
    kind: StepKind
    kept: int

    @property
    def computes(self) -> bool:
        """Whether the model computes tokens itself at this step (the policy observes its output)."""
        return self.kind in (StepKind.FULL, StepKind.PRUNED)

    @property
    def calls_transformer(self) -> bool:
        return self.kind is not StepKind.SKIP


class StepPlanner:
    """Turns a policy (and optionally a step cache's fixed schedule) into a plan per step.

    It also keeps the latest output in token space, the state a policy selects from.
    Every selector's indices are checked against the contract (a tensor of shape
    ``(B, k)``, an integer dtype, in ``[0, N)``, unique per row) at every pruned step
    (a comparison-only selector, which may break it by design, at its first only):
    the form from metadata alone; the values on the host on a CPU, and on a GPU at
    the first pruned step of each generation (one host read) and after it into a
    device-side flag read once, at the generation's last step (no sync per step);
    ``check_indices`` reads every pruned step's values at once. A
    selector that breaks it, or raises, stops the run with :class:`IndexContractError`
    naming the selector, the step and what was wrong. With ``selection_graphs`` (a
    :class:`~catlab.pruning.selection_graphs.SelectionGraphs`), a policy that splits its selection
    (``prepare_step`` / ``select_tensors``, declaring ``Capability.REPLAYS_SELECTION``) has the tensor
    part replayed from CUDA graphs.
    """

    def __init__(self, policy: Policy, step_cache=None, check_indices: bool = False, selection_graphs=None):
        self.policy, self.step_cache, self.check_indices = policy, step_cache, check_indices
        self.selection_graphs = selection_graphs
        self.batch_size, self.grid, self.num_steps = 0, (0, 0), 0
        self.device = torch.device("cpu")
        self.output: torch.Tensor | None = None
        self.state: StepState | None = None
        self.checked = False  # whether this generation's indices have met the contract once
        self.flag: torch.Tensor | None = None  # on a GPU: the first later pruned step whose indices broke it (0: none)

    @property
    def num_tokens(self) -> int:
        return grid_tokens(self.grid)

    def reset(self, batch_size: int, grid: Grid, num_steps: int, device: torch.device | str) -> None:
        """A new generation starts: the policy forgets everything."""
        self.batch_size, self.grid, self.num_steps = batch_size, check_grid(grid), num_steps
        self.device = torch.device(device)
        self.output, self.state, self.checked, self.flag = None, None, False, None
        self.policy.reset(batch_size, self.grid, num_steps, self.device)
        if self.selection_graphs is not None:  # the policy's state tensors are new: so must the graphs be
            self.selection_graphs.reset()

    def plan(self, step: int) -> StepPlan:
        """The plan of ``step`` (1-based)."""
        n = self.num_tokens
        if self.step_cache is not None and self.step_cache.computes(step) is False:
            return StepPlan(step, StepKind.CACHED, 0)
        k = self.policy.num_kept(step, n)
        if k is None:
            return StepPlan(step, StepKind.FULL, n)
        if k == 0:
            return StepPlan(step, StepKind.SKIP, 0)
        return StepPlan(step, StepKind.PRUNED, k)

    def select(self, plan: StepPlan, attention: dict[int, torch.Tensor] | None = None) -> torch.Tensor | None:
        """The ``(B, k)`` tokens to compute at a PRUNED step (``None`` at any other)."""
        self.state = None
        if plan.kind is not StepKind.PRUNED:
            return None
        self.state = StepState(
            step=plan.step,
            num_steps=self.num_steps,
            grid=self.grid,
            batch_size=self.batch_size,
            k=plan.kept,
            output=self.output,
            attention=attention,
            device=self.device,
        )
        try:
            if self.selection_graphs is not None and Capability.REPLAYS_SELECTION in self.policy.capabilities:
                indices = self.selection_graphs.select(self.policy, self.state)
            else:
                indices = select_indices(self.policy, self.state)
        except Exception as err:
            self._fail(err, plan.step)
        args = (self.batch_size, plan.kept, self.num_tokens, self.policy.name, plan.step)
        # a comparison-only selector (an authors' variant) may break the contract after its first step, by design
        strict = Capability.COMPARISON_ONLY not in self.policy.capabilities
        if self.check_indices or not self.checked or (strict and indices.device.type == "cpu"):
            check_index_form(indices, *args)  # metadata only
            with _unguarded():  # the one host read this check costs, allowed under a host-sync guard
                check_indices(indices, *args)
            self.checked = True
        elif strict:
            check_index_form(indices, *args)  # metadata only: no host read
            self.flag = flag_broken(indices, self.num_tokens, plan.step, self.flag)
        return indices

    def selection_macs(self) -> int:
        """Multiply-accumulates the latest selection spent (0 when the step selected nothing)."""
        return self.policy.selection_macs(self.state) if self.state is not None else 0

    def observe(self, plan: StepPlan, output: torch.Tensor, indices: torch.Tensor | None) -> float:
        """Show the policy a computed step's output; every step's output becomes the next selection's state.

        Returns the seconds the policy spent (its bookkeeping counts as selection time)."""
        start = time.perf_counter()
        if plan.computes:
            try:
                self.policy.observe(plan.step, output, indices)
            except Exception as err:
                self._fail(err, plan.step, " observing its output")
        self.output = output
        if plan.step == self.num_steps and self.flag is not None:
            self.read_flag()
        return time.perf_counter() - start

    def _fail(self, err: Exception, step: int, doing: str = "") -> None:
        """Raise a selector's own error as one line naming the selector and the step (the error stays chained)."""
        if isinstance(err, IndexContractError) or type(err).__name__ == "HostSyncError":
            raise err  # already names the selector (a nested one's contract, or a host read under a guard)
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise SelectorFailed(
            f"selector '{self.policy.name}' failed at step {step}{doing}: {type(err).__name__}: {first}"
        ) from err

    def read_flag(self) -> None:
        """Fail if the indices of a pruned step checked on the device broke the contract (one host read)."""
        flag, self.flag = self.flag, None
        with _unguarded():
            step = int(flag)
        if step:
            raise IndexContractError(
                f"selector '{self.policy.name}' at step {step} returned indices outside [0, {self.num_tokens}) "
                "or a token twice in one sample; indices must be unique per row "
                "(sampler.check_indices=true names the fault)"
            )


class IndexContractError(ValueError):
    """A selector returned indices that are not ``(B, k)`` unique integers in ``[0, N)``, or raised."""


class SelectorFailed(IndexContractError):
    """A selector's ``select`` raised: ``selector '<name>' failed at step <t>: <error>``."""


def check_index_form(idx, batch: int, k: int, n: int, name: str, step: int | None = None) -> None:
    """Fail unless ``idx`` is a tensor of shape ``(batch, k)`` and an integer dtype, on a device that holds values.

    Reads metadata only (no host sync): cheap enough for every pruned step."""
    where = f"selector '{name}'" + (f" at step {step}" if step is not None else "")
    if not torch.is_tensor(idx):
        raise IndexContractError(
            f"{where} returned {type(idx).__name__}, not a tensor of ({batch}, {k}) token indices"
        )
    if idx.device.type == "meta":
        raise IndexContractError(f"{where} returned indices on meta, a device that holds no values")
    if idx.dtype not in (torch.int64, torch.int32):
        raise IndexContractError(f"{where} returned {idx.dtype} indices; token indices must be torch.int64 (or int32)")
    if tuple(idx.shape) != (batch, k):
        raise IndexContractError(
            f"{where} returned shape {tuple(idx.shape)}; expected ({batch}, {k}) = (batch, k tokens this step)"
        )


def flag_broken(idx: torch.Tensor, n: int, step: int, flag: torch.Tensor | None) -> torch.Tensor:
    """``flag`` (the first broken step so far, 0: none) updated on the device with ``idx`` at ``step``: no sync."""
    broken = (idx < 0).any() | (idx >= n).any()
    if idx.shape[1] > 1:
        broken = broken | (idx.sort(dim=1).values.diff(dim=1) == 0).any()
    flag = torch.zeros((), dtype=torch.int64, device=idx.device) if flag is None else flag
    return torch.where((flag == 0) & broken, torch.full_like(flag, step), flag)


def check_indices(idx, batch: int, k: int, n: int, name: str, step: int | None = None) -> None:
    """Fail unless ``idx`` is ``(batch, k)`` integer indices in ``[0, n)``, unique per row.

    Raises :class:`IndexContractError` naming the selector (``name``), the step and what was wrong.
    """
    where = f"selector '{name}'" + (f" at step {step}" if step is not None else "")
    if torch.is_tensor(idx) and idx.device.type == "meta":
        raise IndexContractError(f"{where} returned indices on meta, a device that holds no values")
    if not torch.is_tensor(idx):
        raise IndexContractError(
            f"{where} returned {type(idx).__name__}, not a tensor of ({batch}, {k}) token indices"
        )
    if idx.dtype not in (torch.int64, torch.int32):
        raise IndexContractError(f"{where} returned {idx.dtype} indices; token indices must be torch.int64 (or int32)")
    if tuple(idx.shape) != (batch, k):
        raise IndexContractError(
            f"{where} returned shape {tuple(idx.shape)}; expected ({batch}, {k}) = (batch, k tokens this step)"
        )
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise IndexContractError(
            f"{where} returned indices in [{int(idx.min())}, {int(idx.max())}]; tokens are [0, {n})"
        )
    if k > 1 and bool((idx.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise IndexContractError(f"{where} returned a token twice in one sample; indices must be unique per row")


@contextlib.contextmanager
def _unguarded():
    """Suspend :func:`~catlab.pruning.sync_check.no_host_sync`, CUDA's sync debug mode and operator counters
    (:class:`catlab.testing.OpCounter`) for one check: it is the loop's, not the selector's, work."""
    from torch.utils._python_dispatch import _disable_current_modes

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    mode = torch.cuda.get_sync_debug_mode() if cuda else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        with torch._C.DisableTorchFunction(), _disable_current_modes():
            yield
    finally:
        if mode:
            torch.cuda.set_sync_debug_mode(mode)
