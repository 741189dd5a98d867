"""Qwen-Image pruned, added as one family module: α = 1, MACs as they run, rotary rows of the selected tokens."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from catlab.pruning import TokenPruner, family_of
from catlab.sampler import SamplerConfig, sample
from catlab.selection.simple import Full, Random
from tests.family_checks import assert_macs_match_the_flop_counter, assert_wrong_rotary_gather_is_caught, forward, perm

TOL = 1e-5


@pytest.fixture
def qwen():
    from catlab.families.qwen_image import TinyQwenImage

    return TinyQwenImage(
        height=16,
        width=16,
        num_layers=2,
        num_heads=2,
        head_dim=16,
        axes_dims_rope=(4, 6, 6),
        text_dim=24,
        text_tokens=6,
    )


def _inputs(adapter, seed=0):
    cond = adapter.encode(["a red circle", "a blue square"], guidance=True)  # 4 rows: 2 unconditional (masked)
    h, w = adapter.latent_size
    return torch.randn(4, adapter.latent_channels, h, w, generator=torch.Generator().manual_seed(seed)), cond


def test_the_family_comes_from_its_own_module(qwen):
    from catlab.families.qwen_image import QWEN_IMAGE, PrunedQwenAttnProcessor

    assert family_of(qwen.transformer) is QWEN_IMAGE
    pruner = TokenPruner(qwen.transformer).attach()
    assert [type(p) for p in pruner.processors] == [PrunedQwenAttnProcessor] * 2 and all(
        p.text for p in pruner.processors
    )
    pruner.detach()


@torch.no_grad()
def test_alpha_one_reproduces_the_stock_transformer(qwen):
    x, cond = _inputs(qwen)
    stock = forward(qwen, x, cond)
    pruner = TokenPruner(qwen.transformer).attach()
    torch.testing.assert_close(forward(qwen, x, cond), stock, atol=TOL, rtol=0)
    pruner.set_indices(perm(pruner.num_tokens), rows=4)  # every token, shuffled: own rotary rows, own places
    torch.testing.assert_close(forward(qwen, x, cond), stock, atol=TOL, rtol=0)
    pruner.detach()
    assert torch.equal(forward(qwen, x, cond), stock)


def test_alpha_one_through_the_sampler(qwen):
    cfg = SamplerConfig(num_steps=4, guidance_scale=4.0, progress=False, check_indices=True)
    full = sample(qwen, Full(), ["a red circle", "a blue square"], [0, 1], cfg)
    pruned = sample(qwen, Random(alpha=1.0, start_step=1), ["a red circle", "a blue square"], [0, 1], cfg)
    torch.testing.assert_close(pruned.latents, full.latents, atol=TOL, rtol=0)


@torch.no_grad()
def test_pruned_blocks_get_the_rotary_rows_of_the_selected_tokens(qwen):
    x, cond = _inputs(qwen)
    pruner = TokenPruner(qwen.transformer).attach()
    forward(qwen, x, cond)
    seen = []
    attn = qwen.transformer.transformer_blocks[1].attn
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["image_rotary_emb"]), with_kwargs=True)
    n = pruner.num_tokens
    idx = perm(n, seed=4)[:, : n // 4]
    pruner.set_indices(idx, rows=4)
    forward(qwen, x, cond, t=400.0)
    handle.remove()
    pruner.detach()
    image, text = seen[0]
    h, w = qwen.grid
    want_image, want_text = qwen.transformer.pos_embed([(1, h, w)], max_txt_seq_len=cond.num_text_tokens, device="cpu")
    rows = idx.repeat(2, 1)  # the guidance branches share their sample's tokens
    assert image.shape == (4, n // 4, want_image.shape[-1]) and torch.equal(text, want_text)
    for r in range(4):
        assert torch.equal(image[r], want_image[rows[r]])


def test_a_wrong_rotary_gather_is_caught(qwen):
    def first_rows(tables, idx, num_tokens):  # the first k positions' rows, not the selected ones
        image, text = tables
        return image[: idx.shape[1]].expand(idx.shape[0], -1, -1), text

    assert_wrong_rotary_gather_is_caught(qwen, *_inputs(qwen), first_rows)


@torch.no_grad()
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.2])
def test_macs_match_the_flop_counter(qwen, alpha):
    assert_macs_match_the_flop_counter(qwen, *_inputs(qwen), alpha)


@torch.no_grad()
def test_counted_macs_equal_the_formula(qwen):
    cfg = SamplerConfig(num_steps=4, guidance_scale=4.0, progress=False)
    counted = sample(
        qwen, Random(alpha=0.25, start_step=2), ["a red circle"], [0], replace(cfg, count_macs=True)
    ).trace
    formula = sample(qwen, Random(alpha=0.25, start_step=2), ["a red circle"], [0], cfg).trace
    assert [s.macs for s in counted.steps] == [s.macs for s in formula.steps]


@pytest.mark.slow
def test_cli_runs_tiny_qwen_image(tmp_path):
    import json

    from tests.conftest import FAST, run_cli

    run_cli("-m", "model=tiny_qwen_image", "selector=cat,random", *FAST, tmp_path=tmp_path)
    metrics = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/metrics.json"))]
    assert [m["selector"] for m in metrics] == ["cat", "random"] and all(m["macs_ratio"] > 1 for m in metrics)


@pytest.mark.parametrize("name", ["cat", "random"])
def test_graphed_equals_eager_and_pruned_steps_read_nothing_on_the_host(qwen, name):
    from catlab.pruning import graphs_of
    from catlab.pruning.capture import emulate_on_cpu
    from catlab.registry import selectors

    def run(**cfg):
        config = SamplerConfig(num_steps=5, guidance_scale=4.0, progress=False, **cfg)
        return sample(
            qwen, selectors.build({"name": name, "alpha": 0.3, "start_step": 2}), ["a red circle"] * 2, [0, 1], config
        )

    eager = run(check_sync=name != "cat")  # cat's scikit-learn clustering reads the host once, by design
    with emulate_on_cpu():
        first, second = run(cuda_graphs=True), run(cuda_graphs=True)
    assert first.trace.graphed and torch.equal(first.images, eager.images) and torch.equal(second.images, eager.images)
    assert graphs_of(qwen.transformer).captures == 2


@pytest.mark.parametrize("cache", ["taylorseer", "cachedit_dbcache"])
def test_step_caches_run_on_qwen_image(qwen, cache):
    from catlab.registry import selectors
    from catlab.sampler import StepReuse
    from catlab.stepcache import stepcaches
    from catlab.stepcache.cachedit import available

    if cache.startswith("cachedit") and not available():
        pytest.skip("cache-dit is not installed")
    policy = selectors.build({"name": "cat", "alpha": 0.3, "start_step": 2} if cache == "taylorseer" else "full")
    step_cache = stepcaches.build({"name": cache, "start_step": 2})
    cfg = SamplerConfig(num_steps=6, guidance_scale=4.0, progress=False)
    result = sample(qwen, policy, ["a red circle"], [0], cfg, StepReuse(step_cache=step_cache))
    assert torch.isfinite(result.latents).all()


def test_edit_variants_are_refused_by_name():
    from diffusers import QwenImageTransformer2DModel

    from catlab.pruning import UnsupportedModelError

    t = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=12,
        out_channels=3,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        axes_dims_rope=(4, 6, 6),
        zero_cond_t=True,
    )
    with pytest.raises(UnsupportedModelError, match="zero_cond_t or use_layer3d_rope.*Qwen-Image-Edit"):
        TokenPruner(t)
