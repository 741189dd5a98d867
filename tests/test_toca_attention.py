"""ToCa's s1 score, ``selector=toca`` with ``score: attention``: the attention each image token received.

``tests/golden/toca_attention_authors.pt`` holds what the authors' FLUX and DiT functions computed on a CPU
(``python tests/golden/record_toca_attention.py AUTHORS_DIR``); catlab's map comes from the layer engine,
which sees each self-attention's SDPA call at a full step (``catlab/pruning/layerwise.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import catlab.pruning.layerwise as layerwise
from catlab.pruning.layerwise import LayerCaching, received_attention
from catlab.registry import selectors
from catlab.sampler import SamplerConfig, sample
from catlab.selection.toca import attention_received, cache_frequency, fresh_count, spatial_bonus, top_fresh
from tests.conftest import tiny_pixart, tiny_sd3

GOLDEN = torch.load(Path(__file__).resolve().parent / "golden" / "toca_attention_authors.pt", weights_only=True)
CFG = SamplerConfig(num_steps=6, progress=False)
PROMPTS, SEEDS = ["a", "b"], [0, 1]


def _toca(**kw):
    return selectors.build({"name": "toca", "score": "attention", **kw})


def test_the_flux_score_and_its_top_tokens_are_the_authors():
    """FLUX: the map's mean over heads and queries (text and image), its image columns L2-normalised, plus s3."""
    g = GOLDEN["flux"]
    total = received_attention(g["q"], g["k"], g["v"])
    torch.testing.assert_close(total, g["total"], atol=1e-6, rtol=1e-5)
    image = total[:, g["text"] :]
    score = attention_received(image, image) + cache_frequency(
        g["counter"], g["fresh_threshold"], g["soft_fresh_weight"]
    )
    torch.testing.assert_close(score, g["score"], atol=1e-6, rtol=1e-5)
    assert torch.equal(top_fresh(score, 4).sort(-1).values, g["top4"].sort(-1).values)


def test_the_dit_score_is_the_authors():
    """DiT: the head-averaged map summed over queries, L2-normalised (a mean over queries normalises alike)."""
    g = GOLDEN["dit"]
    received = received_attention(g["q"], g["k"])
    torch.testing.assert_close(received * g["q"].shape[-2], g["attn_map"].sum(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention_received(received, received), g["score"], atol=1e-6, rtol=1e-5)


def test_received_attention_is_the_softmax_maps_mean_with_masks_and_in_chunks(monkeypatch):
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 4, 11, 8, generator=g)
    want = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1).mean(dim=(1, 2))
    torch.testing.assert_close(received_attention(q, k), want)
    keep = torch.rand(2, 1, 1, 11, generator=g) > 0.3
    masked = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~keep, float("-inf")).softmax(-1).mean(dim=(1, 2))
    torch.testing.assert_close(received_attention(q, k, attn_mask=keep), masked)
    assert torch.all(masked[~keep[:, 0, 0]] == 0)
    bias = torch.randn(2, 4, 9, 11, generator=g)
    biased = (q @ k.transpose(-1, -2) / 8**0.5 + bias).softmax(-1).mean(dim=(1, 2))
    torch.testing.assert_close(received_attention(q, k, attn_mask=bias), biased)
    monkeypatch.setattr(layerwise, "CHUNK_ELEMENTS", 2 * 4 * 11 * 2)  # two queries per chunk
    torch.testing.assert_close(received_attention(q, k, attn_mask=bias), biased)


def _tiny_flux():
    from tests.test_flux import tiny_flux

    return tiny_flux()


def _tiny_dit():
    from catlab.families.dit import TinyDiT

    return TinyDiT(height=16, width=16, num_layers=2, num_heads=2, head_dim=16)


@pytest.mark.parametrize("make", [tiny_sd3, tiny_pixart, _tiny_flux, _tiny_dit])
def test_every_step_full_is_the_model(make):
    """``fresh_threshold: 1`` (ToCa's no caching) with the map computed beside every attention: the stock model."""
    a = make()
    cfg = SamplerConfig(num_steps=5, guidance_scale=3.5 if a.guidance_distilled else 4.0, progress=False)
    full = sample(a, selectors.build("full"), PROMPTS, SEEDS, cfg).images
    got = sample(a, _toca(fresh_threshold=1), PROMPTS, SEEDS, cfg).images
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


def test_flux_maps_are_the_image_columns_and_selection_follows_them():
    """FLUX puts the text first: layer 0 keeps the image columns of its map (the rest, the text's share); the
    first partial step's image MLP takes the top-k of s1 + s3 on that map; MACs equal half of torch's FLOP count
    on the full step (the map's extra QKᵀ included) and on the partial one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from catlab.stepcache import MacCounter
    from tests.test_flux import _inputs

    a = _tiny_flux()
    policy = _toca(alpha=0.2, bonus_ratio=0)
    engine = LayerCaching(policy).apply(a.transformer)
    latents, cond = _inputs(a, batch=1)
    n = a.grid[0] * a.grid[1]
    try:
        engine.begin(1, a.grid, 5, "cpu")
        with MacCounter(a.transformer) as counter:
            for step in (1, 2):
                fc = FlopCounterMode(display=False)
                with engine.context(step, 5), fc, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
                    a.predict(latents, torch.tensor(500.0), cond)
                assert counter.calls[-1] == fc.get_total_flops() // 2, f"step {step}"
                if step == 1:
                    maps = {layer: m.clone() for layer, m in engine.received.items()}
        layers = len(a.transformer.transformer_blocks) + len(a.transformer.single_transformer_blocks)
        assert set(maps) == set(range(layers)) and maps[0].shape == (1, n)
        assert torch.all(maps[0] > 0) and float(maps[0].sum()) < 1.0  # the text's columns hold the rest
        k = fresh_count(policy.fresh_ratio(2, 5, 0, "mlp"), n)
        want = top_fresh(attention_received(maps[0], maps[0]), k)  # s3 is zero at the first partial step
        fresh = policy.counters[(0, "mlp")] == 0
        assert torch.equal(fresh, torch.zeros(1, n, dtype=torch.bool).scatter(1, want, True))
    finally:
        engine.remove()


def test_image_only_attention_maps_sum_to_one_and_partial_steps_keep_them():
    """PixArt's self-attention holds only image tokens: each kept map sums to 1; partial steps (no attention
    runs) leave the last full step's maps as they were."""
    a = tiny_pixart()
    policy = _toca(alpha=0.2)
    engine = LayerCaching(policy).apply(a.transformer)
    cond = a.encode(PROMPTS, True)
    latents = torch.cat([a.initial_latents(SEEDS)] * cond.groups)
    try:
        engine.begin(len(SEEDS), a.grid, 6, "cpu")
        with torch.no_grad():
            with engine.context(1, 6):
                a.predict(latents, torch.tensor(500.0), cond)
            full = {layer: m.clone() for layer, m in engine.received.items()}
            with engine.context(2, 6):
                a.predict(latents * 0.5, torch.tensor(400.0), cond)
        assert full and all(torch.allclose(m.sum(-1), torch.ones(4)) for m in full.values())
        assert all(torch.equal(engine.received[layer], m) for layer, m in full.items())
    finally:
        engine.remove()


def test_the_score_needs_a_full_step_first():
    policy = _toca()
    policy.begin_layers(1, (4, 4), 5, 2, "cpu")
    with pytest.raises(RuntimeError, match="no attention map of layer 0"):
        policy.fresh_tokens(2, 5, 0, "mlp", 1, 16)


def test_spatial_bonus_composes_with_the_attention_score():
    """s4 on top of s1 (catlab's default bonus) picks each patch's best token first, as with the other scores."""
    score = attention_received(torch.rand(1, 64, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 64))
    boosted = spatial_bonus(score, (8, 8), 0.4, 4)
    assert torch.equal(boosted >= score, torch.ones_like(score, dtype=torch.bool))


def test_an_attention_without_sdpa_is_named_at_the_full_step():
    """An attention processor that never calls torch's SDPA (diffusers' ``AttnProcessor`` writes it out) leaves
    no map: the full step says so in one line rather than a later step failing for want of a map."""
    from diffusers.models.attention_processor import AttnProcessor

    a = tiny_pixart()
    a.transformer.transformer_blocks[1].attn1.set_processor(AttnProcessor())
    with pytest.raises(RuntimeError, match="layer 1's attention ran without torch's scaled_dot_product_attention"):
        sample(a, _toca(), PROMPTS, SEEDS, CFG)
