"""Wan2.1 (text to video) pruned, added as one family module: α = 1 is the stock model, MACs as the flop counter
sees them, the 3D rotary rows of the selected tokens, the frames-major token order, and a stock ``WanPipeline``
(catlab/testing/tiny_wan.py) pruned by ``enable_pruning`` equal to catlab's own loop."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from catlab import disable_pruning, enable_pruning, pruning_macs
from catlab.pruning import TokenPruner, UnsupportedModelError, family_of
from catlab.pruning.families import patchify
from catlab.registry import models, selectors
from catlab.reuse.base import unpatchify
from catlab.sampler import SamplerConfig, sample
from catlab.selection.simple import Full, Random
from tests.family_checks import assert_macs_match_the_flop_counter, assert_wrong_rotary_gather_is_caught, forward, perm

TOL = 1e-5
PROMPTS, SEEDS = ["a red circle", "a blue square"], [0, 1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def wan():
    from catlab.families.wan import TinyWan

    return TinyWan(frames=3, height=8, width=8, num_layers=2, num_heads=2, head_dim=16, text_dim=24, text_tokens=6)


def _inputs(adapter, seed=0):
    cond = adapter.encode(PROMPTS, guidance=True)  # 4 rows: 2 unconditional, 2 conditional
    h, w = adapter.latent_size
    shape = (4, adapter.latent_channels, adapter.latent_frames, h, w)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)), cond


def test_the_family_comes_from_its_own_module(wan):
    from catlab.families.wan import WAN, PrunedWanSelfAttnProcessor

    assert family_of(wan.transformer) is WAN and "tiny_wan" in models.names() and "wan2_1_t2v" in models.names()
    pruner = TokenPruner(wan.transformer).attach()
    assert [(type(p), p.name) for p in pruner.processors] == [
        (PrunedWanSelfAttnProcessor, f"blocks.{i}.attn1") for i in range(2)
    ]
    pruner.detach()
    assert wan.grid == (3, 4, 4)


@torch.no_grad()
def test_alpha_one_reproduces_the_stock_transformer(wan):
    x, cond = _inputs(wan)
    stock = forward(wan, x, cond)
    pruner = TokenPruner(wan.transformer).attach()
    torch.testing.assert_close(forward(wan, x, cond), stock, atol=TOL, rtol=0)
    pruner.set_indices(perm(pruner.num_tokens), rows=4)  # every token, shuffled: own rotary rows, own places
    torch.testing.assert_close(forward(wan, x, cond), stock, atol=TOL, rtol=0)
    pruner.detach()
    assert torch.equal(forward(wan, x, cond), stock)


def test_alpha_one_through_the_sampler(wan):
    cfg = SamplerConfig(num_steps=4, guidance_scale=5.0, progress=False, check_indices=True)
    full = sample(wan, Full(), PROMPTS, SEEDS, cfg)
    pruned = sample(wan, Random(alpha=1.0, start_step=1), PROMPTS, SEEDS, cfg)
    torch.testing.assert_close(pruned.latents, full.latents, atol=TOL, rtol=0)
    assert full.images.shape == (2, 3, 3, 8, 8)  # (B, F, C, H, W)


@torch.no_grad()
def test_pruned_blocks_get_the_rotary_rows_of_the_selected_tokens(wan):
    x, cond = _inputs(wan)
    pruner = TokenPruner(wan.transformer).attach()
    forward(wan, x, cond)
    seen = []
    attn = wan.transformer.blocks[1].attn1
    handle = attn.register_forward_pre_hook(lambda m, args: seen.append(args[3]))
    n = pruner.num_tokens
    idx = perm(n, seed=4)[:, : n // 4]
    pruner.set_indices(idx, rows=4)
    forward(wan, x, cond, t=400.0)
    handle.remove()
    pruner.detach()
    want_cos, want_sin = wan.transformer.rope(x)
    rows = idx.repeat(2, 1)  # the guidance branches share their sample's tokens
    cos, sin = seen[0]
    assert cos.shape == (4, n // 4, 1, want_cos.shape[-1])
    for r in range(4):
        assert torch.equal(cos[r], want_cos[0, rows[r]]) and torch.equal(sin[r], want_sin[0, rows[r]])


def test_a_wrong_rotary_gather_is_caught(wan):
    def first_rows(tables, idx, num_tokens):  # the first k positions' rows, not the selected ones
        return tuple(t[:, : idx.shape[1]].expand(idx.shape[0], -1, -1, -1) for t in tables)

    assert_wrong_rotary_gather_is_caught(wan, *_inputs(wan), first_rows)


@torch.no_grad()
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.2])
def test_macs_match_the_flop_counter(wan, alpha):
    assert_macs_match_the_flop_counter(wan, *_inputs(wan), alpha)


@torch.no_grad()
def test_tokens_are_frames_major_then_row_major(wan):
    """catlab's token layout is the transformer's: token ``t·h·w + r·w + c`` is frame t, row r, column c, and
    unpatchify of the output projection's tokens gives the transformer's output."""
    x, cond = _inputs(wan)
    f, h, w = wan.grid
    tokens = patchify(x, 2)
    t, r, c = 2, 1, 3
    want = x[:, :, t, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].permute(0, 2, 3, 1).reshape(4, -1)
    assert torch.equal(tokens[:, t * h * w + r * w + c], want)
    assert torch.equal(unpatchify(tokens, 2, *x.shape[2:]), x)
    seen = []
    handle = wan.transformer.proj_out.register_forward_hook(lambda m, a, out: seen.append(out))
    out = forward(wan, x, cond)
    handle.remove()
    assert torch.equal(unpatchify(seen[0], (1, 2, 2), *x.shape[2:]), out)


def test_pruned_runs_fewer_macs_exactly_k_tokens_and_is_deterministic(wan):
    cfg = SamplerConfig(num_steps=5, guidance_scale=5.0, progress=False, check_indices=True)
    full = sample(wan, Full(), PROMPTS, SEEDS, cfg)
    runs = [sample(wan, selectors.build({"name": "random", "alpha": 0.3, "start_step": 2}), PROMPTS, SEEDS, cfg)]
    runs.append(sample(wan, selectors.build({"name": "random", "alpha": 0.3, "start_step": 2}), PROMPTS, SEEDS, cfg))
    n = 48
    assert [s.kept for s in runs[0].trace.steps] == [n, n, int(0.3 * n), int(0.3 * n), int(0.3 * n)]
    assert runs[0].trace.macs < 0.7 * full.trace.macs
    assert torch.equal(runs[0].latents, runs[1].latents)
    assert not torch.allclose(runs[0].latents, full.latents, atol=1e-4)
    for idx in runs[0].trace.indices[2:]:
        assert idx.shape == (2, int(0.3 * n)) and all(len(set(row.tolist())) == idx.shape[1] for row in idx)


def test_counted_macs_equal_the_formula(wan):
    """``count_macs`` counts what ran (the Conv3d patch embedding from its input, SDPA called with keywords by the
    stock cross-attention): the same as the formula on full and pruned steps."""
    cfg = SamplerConfig(num_steps=4, guidance_scale=5.0, progress=False)
    policy = {"name": "random", "alpha": 0.25, "start_step": 2}
    counted = sample(wan, selectors.build(policy), PROMPTS[:1], [0], replace(cfg, count_macs=True)).trace
    formula = sample(wan, selectors.build(policy), PROMPTS[:1], [0], cfg).trace
    assert [s.macs for s in counted.steps] == [s.macs for s in formula.steps]


def test_graphed_equals_eager_and_pruned_steps_read_nothing_on_the_host(wan):
    from catlab.pruning import graphs_of
    from catlab.pruning.capture import emulate_on_cpu

    def run(**options):
        cfg = SamplerConfig(num_steps=5, guidance_scale=5.0, progress=False, **options)
        return sample(wan, selectors.build({"name": "random", "alpha": 0.3, "start_step": 2}), PROMPTS, SEEDS, cfg)

    eager = run(check_sync=True)
    with emulate_on_cpu():
        first, second = run(cuda_graphs=True), run(cuda_graphs=True)
    assert first.trace.graphed and torch.equal(first.images, eager.images) and torch.equal(second.images, eager.images)
    assert graphs_of(wan.transformer).captures == 2


def test_grid_blind_selectors_run_on_the_video_grid(wan):
    cfg = SamplerConfig(num_steps=6, guidance_scale=5.0, progress=False, check_indices=True)
    noise = sample(wan, selectors.build({"name": "noise", "alpha": 0.25, "start_step": 2}), PROMPTS, SEEDS, cfg)
    schedule = {"name": "budget_schedule", "start_step": 2, "inner": "random", "pattern": [1, 0.5, 0]}
    skipping = sample(wan, selectors.build(schedule), PROMPTS, SEEDS, cfg)
    assert [s.kept for s in noise.trace.steps] == [48, 48, 12, 12, 12, 12]
    assert [s.kept for s in skipping.trace.steps] == [48, 48, 48, 24, 0, 48]
    assert torch.isfinite(skipping.images).all() and skipping.images.abs().max() <= 1


def test_image_to_video_variants_are_refused():
    from diffusers import WanTransformer3DModel

    t = WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=8, freq_dim=8,
        ffn_dim=16, num_layers=1, image_dim=8, added_kv_proj_dim=24,
    )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="added_kv_proj_dim=24 / image_dim=8 .image-to-video"):
        TokenPruner(t)


def test_checkpoint_adapter_checks_sizes_before_loading():
    with pytest.raises(ValueError, match="num_frames must be 4·n \\+ 1"):
        models.build({"name": "wan2_1_t2v", "path": "/nonexistent", "num_frames": 8, "device": "cpu"})
    with pytest.raises(ValueError, match="multiples of 16"):
        models.build({"name": "wan2_1_t2v", "path": "/nonexistent", "height": 40, "device": "cpu"})


# -- a stock WanPipeline -------------------------------------------------------------------------------------------

STEPS, SIZE, FRAMES, TEXT = 4, 32, 5, 16


@pytest.fixture(scope="module")
def saved():
    """The checkpoint adapter (``model=wan2_1_t2v``) around the tiny WanPipeline, held in memory."""
    from catlab.testing.tiny_wan import checkpoint_adapter

    return checkpoint_adapter(SIZE, SIZE, FRAMES, TEXT)


def _pipe(adapter):
    from catlab.testing.tiny_wan import stock_pipeline

    return stock_pipeline(adapter)


def _call(pipe, adapter, guidance=1.0, output_type="latent"):
    with torch.no_grad():  # as in catlab's loop (the text encoder takes another path under autograd)
        embeds = adapter.encode(PROMPTS, guidance > 1).kwargs["encoder_hidden_states"]
    negative = dict(negative_prompt_embeds=embeds[:2]) if guidance > 1 else {}
    return pipe(
        prompt_embeds=embeds[-2:],
        **negative,
        height=SIZE,
        width=SIZE,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        latents=adapter.initial_latents(SEEDS),
        output_type=output_type,
    ).frames


def test_checkpoint_adapter_shapes_and_decode_contract(saved):
    """``decode`` gives ``(B, F, C, H, W)`` in [0, 1]: the pipeline's own ``pt`` video."""
    assert saved.grid == (2, 4, 4) and saved.latent_channels == 4 and saved.make_scheduler().config.flow_shift == 3.0
    assert saved.initial_latents(SEEDS).shape == (2, 4, 2, 8, 8)
    pipe = _pipe(saved)
    latents = _call(pipe, saved)
    video = saved.decode(latents)
    assert video.shape == (2, FRAMES, 3, SIZE, SIZE) and video.dtype == torch.float32
    torch.testing.assert_close(video, _call(pipe, saved, output_type="pt"), atol=1e-5, rtol=0)


def test_stock_pipeline_pruned_equals_catlabs_loop_and_disable_gives_it_back(saved):
    """One branch per call (guidance 1): the pruned WanPipeline's latents and MACs per step are catlab's loop's;
    after ``disable_pruning`` the pipeline is the stock one bit for bit."""
    pipe = _pipe(saved)
    stock = _call(pipe, saved)
    spec = {"name": "random", "alpha": 0.3, "start_step": 2}
    cfg = SamplerConfig(num_steps=STEPS, guidance_scale=1.0, progress=False)
    ran = sample(saved, selectors.build(spec), PROMPTS, SEEDS, cfg)
    enable_pruning(pipe, selectors.build(spec))
    pruned = _call(pipe, saved)
    macs = pruning_macs(pipe)
    disable_pruning(pipe)
    assert torch.equal(pruned, ran.latents) and macs == [s.macs for s in ran.trace.steps]
    assert macs[0] == macs[1] > 2 * macs[2] and not torch.allclose(pruned, stock, atol=1e-4)
    assert torch.equal(_call(pipe, saved), stock)
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in pipe.transformer.modules())


def test_stock_pipeline_with_guidance_prunes_the_prompts_call(saved):
    """Guidance as Wan runs it: two transformer calls per step; the prompt's is pruned, the negative prompt's
    runs stock, and the step stays one step for the policy."""
    pipe = _pipe(saved)
    stock = _call(pipe, saved, guidance=5.0)
    policy = selectors.build({"name": "random", "alpha": 0.25, "start_step": 2})
    enable_pruning(pipe, policy)
    pruned = _call(pipe, saved, guidance=5.0)
    macs = pruning_macs(pipe)
    disable_pruning(pipe)
    assert len(macs) == STEPS and macs[0] / 2 < macs[-1] < macs[0]
    assert not torch.allclose(pruned, stock, atol=1e-4) and torch.isfinite(pruned).all()
    assert torch.equal(_call(pipe, saved, guidance=5.0), stock)
