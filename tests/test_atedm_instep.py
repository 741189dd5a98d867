"""``selector=atedm``: AT-EDM's in-step progressive pruning really runs fewer tokens, and restores them."""

from __future__ import annotations

import pytest
import torch

from catlab.pruning.families import UnsupportedModelError
from catlab.pruning.instep import InStepPruning
from catlab.registry import selectors, stepcaches
from catlab.sampler import SamplerConfig, StepReuse, sample
from catlab.stepcache.base import StepCacheError
from tests.conftest import tiny_pixart, tiny_sd3

CFG = SamplerConfig(num_steps=6, progress=False, count_macs=True)
PROMPTS, SEEDS = ["a", "b"], [0, 1]


def _atedm(**kw):
    return selectors.build({"name": "atedm", "start_step": 2, "dsap_steps": 1, **kw})


def _block_tokens(adapter):
    """Record, per forward, the image tokens each block receives."""
    seen: list[list[int]] = []

    def pre(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if module is adapter.transformer.transformer_blocks[0]:
            seen.append([])
        seen[-1].append(hidden.shape[1])

    handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in adapter.transformer.transformer_blocks]
    return seen, handles


@pytest.mark.parametrize("recovery", ["copy", "hold"])
def test_alpha_one_is_the_model(recovery):
    a = tiny_sd3()
    full = sample(a, selectors.build("full"), PROMPTS, SEEDS, CFG).images
    got = sample(a, _atedm(alpha=1.0, recovery=recovery), PROMPTS, SEEDS, CFG).images
    assert torch.allclose(got, full, atol=1e-5)


def test_blocks_after_each_pruning_layer_run_fewer_tokens_and_dsap_prunes_later_first():
    a = tiny_sd3()  # 3 blocks, 8×8 = 64 image tokens
    seen, handles = _block_tokens(a)
    try:
        result = sample(a, _atedm(alpha=0.25, prune_layers=[0, 1]), PROMPTS, SEEDS, CFG)
    finally:
        for h in handles:
            h.remove()
    n = 64
    assert seen[:2] == [[n, n, n]] * 2  # steps 1-2: t0, unpruned
    assert seen[2] == [n, n, 16]  # step 3, the DSAP step: only the last pruning layer prunes, to alpha·N
    assert seen[3:] == [[n, 32, 16]] * 3  # then progressively: alpha^(1/2)·N after block 0, alpha·N after block 1
    macs = [s.macs for s in result.trace.steps]
    assert macs[0] == macs[1] > macs[2] > macs[3] == macs[4] == macs[5]  # counted as they ran


def test_copy_recovery_output_has_only_kept_values():
    """After the last pruning layer only 16 tokens are computed: the restored output of each row
    holds exactly 16 distinct token outputs, each dropped token copying one of them."""
    a = tiny_sd3()
    policy = _atedm(alpha=0.25, prune_layers=[1], dsap_steps=0)
    engine_outputs = []

    original = a.transformer.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        engine_outputs.append(out[0] if isinstance(out, tuple) else out.sample)
        return out

    a.transformer.forward = forward
    try:
        sample(a, policy, ["a"], [0], SamplerConfig(num_steps=3, progress=False))
    finally:
        a.transformer.forward = original
    patch = a.transformer.config.patch_size
    out = engine_outputs[-1]  # (rows, C, H, W) of the pruned step
    rows, c, h, w = out.shape
    tokens = (
        out.reshape(rows, c, h // patch, patch, w // patch, patch)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(rows, -1, c * patch**2)
    )
    for row in tokens:
        assert len(torch.unique(row, dim=0)) == 16


def test_refuses_step_caches_reuse_rules_and_other_families():
    a = tiny_sd3()
    cache = stepcaches.build({"name": "taylorseer", "cache_interval": 2})
    with pytest.raises(StepCacheError, match="prunes inside each step"):
        sample(a, _atedm(), PROMPTS, SEEDS, CFG, StepReuse(step_cache=cache))
    with pytest.raises(UnsupportedModelError, match="SD3-family.*atedm_reuse"):
        sample(tiny_pixart(), _atedm(), PROMPTS, SEEDS, CFG)
    with pytest.raises(ValueError, match="before the last of the 3 blocks"):
        sample(a, _atedm(prune_layers=[2]), PROMPTS, SEEDS, CFG)
    with pytest.raises(ValueError, match="recovery"):
        _atedm(recovery="nearest")
    # the transformer is the stock one again after each of these
    assert not any(type(b.attn.processor).__name__ == "_RecordingJointAttn" for b in a.transformer.transformer_blocks)


def test_pruned_forward_macs_are_counted_as_they_run():
    """One pruned forward under both counters: catlab's MacCounter (Linear, SDPA, explicit matmuls: the
    written-out attention of the pruning layers and G-WPR's power iteration) equals half of torch's FLOP
    counter, and is well under the full forward's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from catlab.stepcache import MacCounter

    a = tiny_sd3()
    policy = _atedm(alpha=0.25, prune_layers=[0, 1], dsap_steps=0)
    engine = InStepPruning(policy).apply(a.transformer)
    cond = a.encode(PROMPTS, True)
    latents = torch.cat([a.initial_latents(SEEDS)] * cond.groups)
    try:
        with MacCounter(a.transformer) as counter:
            for step in (1, 3):  # unpruned (t0 = 2), then pruned
                fc = FlopCounterMode(display=False)
                with engine.context(step, 6), fc, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
                    a.predict(latents, torch.tensor(500.0), cond)
                assert counter.calls[-1] == fc.get_total_flops() // 2, f"step {step}"
        assert counter.calls[1] < 0.75 * counter.calls[0]
    finally:
        engine.remove(a.transformer)
