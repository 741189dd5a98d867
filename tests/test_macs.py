"""The analytic MAC counter agrees with torch's FlopCounterMode and scales with k."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from catlab.pruning import TokenPruner
from catlab.selection.base import kept_tokens


@torch.no_grad()
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.3, 0.1])
def test_analytic_macs_match_flop_counter(adapter, alpha):
    cond = adapter.encode(["a red circle", "a blue square"], guidance=True)
    h, w = adapter.latent_size
    x = torch.randn(4, adapter.latent_channels, h, w)
    pruner = TokenPruner(adapter.transformer).attach()
    adapter.predict(x, torch.tensor(500.0), cond)  # full step fills the caches
    n = pruner.num_tokens
    k = kept_tokens(alpha, n)
    pruner.set_indices(torch.stack([torch.randperm(n)[:k] for _ in range(2)]), rows=4)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        adapter.predict(x, torch.tensor(400.0), cond)
    measured = counter.get_total_flops() / 2
    analytic = pruner.macs(rows=4, num_text_tokens=cond.num_text_tokens, kept=k)
    assert abs(analytic - measured) / measured < 0.02
    pruner.detach()


def test_macs_scale_affinely_with_k(adapter):
    pruner = TokenPruner(adapter.transformer)
    n = adapter.grid[0] * adapter.grid[1]
    macs = [pruner.macs(rows=2, num_text_tokens=6, num_tokens=n, kept=k) for k in range(1, n + 1)]
    per_token = macs[1] - macs[0]
    assert per_token > 0
    assert all(b - a == per_token for a, b in zip(macs, macs[1:]))  # every recomputed token costs the same
    full = pruner.macs(rows=2, num_text_tokens=6, num_tokens=n)
    assert macs[-1] == full
    fixed = full - n * per_token  # what a step costs with no image token recomputed (text, embeddings)
    assert 0 < fixed < full
