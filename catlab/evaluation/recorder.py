"""A transparent wrapper that records what a policy saw and chose, for diagnostic figures."""

from __future__ import annotations

import torch

from catlab.planner import select_indices
from catlab.selection.base import Policy, StepState


class RecordingPolicy:
    """Delegates everything to ``policy`` and keeps each step's model output (sample 0..B) on the CPU."""

    def __init__(self, policy: Policy, keep_outputs: bool = True):
        self.policy = policy
        self.keep_outputs = keep_outputs
        self.outputs: dict[int, torch.Tensor] = {}

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def check(self, num_steps: int) -> None:
        self.policy.check(num_steps)

    def reset(self, *args, **kwargs) -> None:
        self.outputs = {}
        self.policy.reset(*args, **kwargs)

    def num_kept(self, step: int, num_tokens: int):
        return self.policy.num_kept(step, num_tokens)

    def select(self, state: StepState) -> torch.Tensor:
        return select_indices(self.policy, state)

    def selection_macs(self, state: StepState) -> int:
        return self.policy.selection_macs(state)

    def observe(self, step: int, output: torch.Tensor, indices) -> None:
        if self.keep_outputs:
            self.outputs[step] = output.detach().float().cpu()
        self.policy.observe(step, output, indices)
