"""Steps of a family's checks that every family test runs the same way (DiT, FLUX.1, Qwen-Image).

Each takes an adapter and stacked inputs ``x`` (one row per guidance branch and sample, two samples)
with their conditioning; a selection is one shuffled order of every token per sample, shared by the
sample's guidance rows.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from catlab.pruning import TokenPruner


def forward(adapter, x, cond, t=500.0):
    return adapter.predict(x, torch.tensor(t), cond)


def perm(n, rows=2, seed=0):
    """``rows`` shuffled orders of ``n`` tokens, seeded ``seed``, ``seed + 1``, ..."""
    return torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(seed + s)) for s in range(rows)])


@torch.no_grad()
def assert_macs_match_the_flop_counter(adapter, x, cond, alpha):
    """A full step, then a pruned one with ``k = max(1, int(alpha·n))`` of the ``n`` tokens counted by
    ``FlopCounterMode`` under the math SDPA kernel: the pruner's MACs are the counted FLOPs / 2.
    Returns ``k``, ``n`` and the counter's FLOPs per module, for a family's finer checks."""
    pruner = TokenPruner(adapter.transformer).attach()
    forward(adapter, x, cond)
    n = pruner.num_tokens
    k = max(1, int(alpha * n))
    pruner.set_indices(perm(n)[:, :k], rows=x.shape[0])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        forward(adapter, x, cond, t=400.0)
    assert pruner.macs(x.shape[0], cond.num_text_tokens, kept=k) == counter.get_total_flops() // 2
    pruner.detach()
    return k, n, counter.get_flop_counts()


@torch.no_grad()
def assert_wrong_rotary_gather_is_caught(adapter, x, cond, select_rotary):
    """With the family's rotary gather replaced by ``select_rotary``, a full selection in a shuffled order no
    longer gives the stock output: the α = 1 checks see a wrong gather."""
    stock = forward(adapter, x, cond)
    pruner = TokenPruner(adapter.transformer)
    pruner.spec = replace(pruner.spec, select_rotary=select_rotary)
    pruner.attach()
    forward(adapter, x, cond)
    pruner.set_indices(perm(pruner.num_tokens), rows=x.shape[0])
    assert (forward(adapter, x, cond) - stock).abs().max() > 1e-3
    pruner.detach()
