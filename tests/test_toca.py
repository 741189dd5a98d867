"""``selector=toca`` and the layer engine it declares (``Capability.LAYER_SELECTION``).

The golden file ``tests/golden/toca_pixart_authors.pt`` holds what the authors' own ToCa cache
functions (``Shenyi-Z/ToCa``, ``PixArt-alpha-ToCa/diffusion/model/cache_functions``) returned on
synthetic CPU inputs: the fresh-ratio schedule over 20 steps × 28 layers × (cross-attention, MLP),
which steps are forced full for several thresholds and step counts, the spatial bonus on random
scores, the cross-attention entropy score, and a run of ``cache_cutfresh`` (fresh tokens and
cache-frequency counters) on a synthetic cross-attention map (docs/selection.md, ToCa, says how).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch

from catlab.assembly import CompositionError, StepReuse
from catlab.capabilities import Capability
from catlab.pruning.families import UnsupportedModelError
from catlab.pruning.layerwise import LayerCaching
from catlab.registry import reuses, selectors
from catlab.sampler import SamplerConfig, sample
from catlab.selection.toca import (
    cache_frequency,
    cross_attention_entropy,
    fresh_count,
    mark_fresh,
    spatial_bonus,
    top_fresh,
)
from tests.conftest import tiny_pixart, tiny_sd3

GOLDEN = Path(__file__).resolve().parent / "golden"
CFG = SamplerConfig(num_steps=6, progress=False)
PROMPTS, SEEDS = ["a", "b"], [0, 1]

pytestmark = pytest.mark.usefixtures("one_thread")


@cache
def authors() -> dict:
    return torch.load(GOLDEN / "toca_pixart_authors.pt")


def _toca(**kw):
    return selectors.build({"name": "toca", **kw})


def _begun(policy, num_steps, num_layers=28, grid=(8, 8), batch=2):
    policy.begin_layers(batch, grid, num_steps, num_layers, "cpu")
    return policy


# -- the rules against the authors' functions ----------------------------------------------------------
def test_fresh_ratio_schedule_is_the_authors():
    ratios = authors()["ratios"]
    p = _begun(_toca(alpha=0.3), 20)
    ours = torch.tensor(
        [
            [[p.fresh_ratio(i + 1, 20, layer, role) for role in ("cross", "mlp")] for layer in range(28)]
            for i in range(20)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(ours, ratios, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threshold,steps", [(3, 20), (4, 20), (3, 50), (5, 28)])
def test_forced_full_steps_are_the_authors(threshold, steps):
    p = _begun(_toca(fresh_threshold=threshold), steps)
    ours = [p.step_kind(s, steps) == "full" for s in range(1, steps + 1)]
    assert ours == authors()[f"full_t{threshold}_n{steps}"].tolist()


def test_spatial_bonus_is_the_authors():
    g = authors()
    torch.testing.assert_close(spatial_bonus(g["bonus_in_8x8"], (8, 8), 0.4, 4), g["bonus_out_8x8_r04_g4"])
    torch.testing.assert_close(spatial_bonus(g["bonus_in_16x16"], (16, 16), 0.8, 2), g["bonus_out_16x16_r08_g2"])


def test_cross_attention_entropy_is_the_authors():
    g = authors()
    cmaps, b = g["cmaps"], g["cmaps"].shape[0] // 2
    torch.testing.assert_close(cross_attention_entropy(cmaps[:b], cmaps[b:]), g["entropy_score"][:b])


def test_fresh_tokens_and_cache_frequency_are_the_authors():
    """The authors' cache_cutfresh (entropy score + s3, s4 bonus, top k, counters) step by step; our rules
    composed as the selector composes them give the same fresh sets (order aside) and counters."""
    g = authors()
    n = int(g["cut_n"])
    p = _begun(_toca(alpha=0.3, fresh_threshold=3), n)
    cmaps, b = g["cmaps"], g["cmaps"].shape[0] // 2
    base = cross_attention_entropy(cmaps[:b], cmaps[b:])
    counters = {role: torch.zeros(b, 64, dtype=torch.int32) for role in ("cross", "mlp")}
    calls = [(i, role) for i in (1, 2, 4, 5) for role in ("cross", "mlp")]
    for (i, role), fresh_golden, counter_golden in zip(calls, g["cut_fresh"], g["cut_counters"]):
        k = fresh_count(p.fresh_ratio(i + 1, n, 0, role), 64)
        score = spatial_bonus(base + cache_frequency(counters[role], 3, 0.25), (8, 8), 0.4, 4)
        fresh = top_fresh(score, k)
        counters[role] = mark_fresh(counters[role], fresh)
        assert k == fresh_golden.shape[1]
        assert torch.equal(fresh.sort(-1).values, fresh_golden[:b].sort(-1).values), (i, role)
        assert torch.equal(counters[role], counter_golden[:b]), (i, role)


# -- the engine ------------------------------------------------------------------------------------------
def test_declares_layer_selection_and_refuses_step_reuse():
    assert Capability.LAYER_SELECTION in _toca().capabilities
    with pytest.raises(CompositionError, match="caches each layer"):
        sample(tiny_sd3(), _toca(), PROMPTS, SEEDS, CFG, StepReuse(rule=reuses.build("taylor")))


@pytest.mark.parametrize("make", [tiny_sd3, tiny_pixart])
def test_every_step_full_is_the_model(make):
    """``fresh_threshold: 1``, ToCa's no-caching setting: every step full, the stock model to 1e-5."""
    a = make()
    full = sample(a, selectors.build("full"), PROMPTS, SEEDS, CFG).images
    got = sample(a, _toca(fresh_threshold=1), PROMPTS, SEEDS, CFG).images
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


def _first_linear(module):
    """The module's first projection: it sees the tokens the module really runs on (a call the engine answers
    from its cache runs none)."""
    return next(m for m in module.modules() if isinstance(m, torch.nn.Linear))


def _module_tokens(adapter, attrs=("attn1", "attn2", "ff")):
    """Per (layer, module): the token counts its first projection ran on, one entry per run."""
    seen: dict = {}
    handles = []
    for layer, block in enumerate(adapter.transformer.transformer_blocks):
        for attr in attrs:
            module = getattr(block, attr, None)
            if module is None:
                continue

            def pre(m, args, key=(layer, attr)):
                seen.setdefault(key, []).append(args[0].shape[1])

            handles.append(_first_linear(module).register_forward_pre_hook(pre))
    return seen, handles


def test_partial_steps_run_fresh_tokens_per_layer_and_module_on_pixart():
    """PixArt, 64 tokens, 3 blocks, 6 steps: the self-attention runs at the full steps only (its output is
    reused between them); each block's cross-attention and MLP run on their own scheduled fresh count."""
    a = tiny_pixart()
    seen, handles = _module_tokens(a)
    try:
        result = sample(a, _toca(alpha=0.2, fresh_threshold=3), PROMPTS, SEEDS, CFG)
    finally:
        for h in handles:
            h.remove()
    probe = _begun(_toca(alpha=0.2, fresh_threshold=3), 6, num_layers=3)
    kinds = [probe.step_kind(s, 6) for s in range(1, 7)]
    assert kinds == ["full", "partial", "partial", "partial", "full", "partial"]  # threshold round(3/0.8) = 4
    for layer in range(3):
        assert seen[(layer, "attn1")] == [64, 64]  # two full steps
        for attr, role in (("attn2", "cross"), ("ff", "mlp")):
            want = [
                64 if kind == "full" else fresh_count(probe.fresh_ratio(s, 6, layer, role), 64)
                for s, kind in zip(range(1, 7), kinds)
            ]
            assert seen[(layer, attr)] == [k for k in want if k], (layer, attr)
    macs = [s.macs for s in result.trace.steps]
    assert macs[0] == macs[4] and all(macs[s - 1] < macs[0] for s in (2, 3, 4, 6))
    assert len(set(macs[1:4])) == 3  # the fresh ratio changes with the step


def test_partial_step_fresh_counts_and_macs_are_exact():
    """One partial step: each cross-attention and MLP gets its own k = int(ratio·N) tokens, and the MACs
    catlab counts equal half of torch's FLOP counter (every Linear, SDPA and explicit matmul that ran)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from catlab.stepcache import MacCounter

    a = tiny_pixart()
    policy = _toca(alpha=0.2, fresh_threshold=3)
    engine = LayerCaching(policy).apply(a.transformer)
    cond = a.encode(PROMPTS, True)
    latents = torch.cat([a.initial_latents(SEEDS)] * cond.groups)
    got, hooks = _module_tokens(a, ("attn2", "ff"))
    try:
        engine.begin(len(SEEDS), (8, 8), 6, "cpu")
        with MacCounter(a.transformer) as counter:
            for step in (1, 2):
                fc = FlopCounterMode(display=False)
                with engine.context(step, 6), fc, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
                    a.predict(latents, torch.tensor(500.0), cond)
                assert counter.calls[-1] == fc.get_total_flops() // 2, f"step {step}"
        assert counter.calls[1] < 0.6 * counter.calls[0]
        for layer in range(3):
            for attr, role in (("attn2", "cross"), ("ff", "mlp")):
                want = fresh_count(policy.fresh_ratio(2, 6, layer, role), 64)
                assert got[(layer, attr)] == [64, want], (layer, attr)
    finally:
        for h in hooks:
            h.remove()
        engine.remove()


def test_full_fresh_ratio_recomputes_cross_attention_and_mlp_exactly():
    """A partial step whose every module takes all N tokens (constant ratio 1) differs from a full step only
    by the reused self-attention: with the self-attention's cache holding this step's own output (the same
    input twice), the output is the full step's to 1e-6."""
    a = tiny_pixart()
    policy = _toca(alpha=1.0, ratio_schedule="constant", fresh_threshold=3)
    engine = LayerCaching(policy).apply(a.transformer)
    cond = a.encode(PROMPTS, True)
    latents = torch.cat([a.initial_latents(SEEDS)] * cond.groups)
    try:
        engine.begin(len(SEEDS), (8, 8), 6, "cpu")
        with torch.no_grad():
            with engine.context(1, 6):
                full = a.predict(latents, torch.tensor(500.0), cond)
            with engine.context(2, 6):
                partial = a.predict(latents, torch.tensor(500.0), cond)
        torch.testing.assert_close(partial, full, atol=1e-6, rtol=0)
    finally:
        engine.remove()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="score must be one of"):
        _toca(score="attention_map")
    with pytest.raises(ValueError, match="fresh_threshold must be >= 1"):
        _toca(fresh_threshold=0)
    with pytest.raises(ValueError, match="bonus_grid must be >= 1"):
        _toca(bonus_grid=0)


def test_spatial_bonus_on_a_grid_with_partial_patches():
    """A 5×7 grid in 2×2 patches: the edge patches are smaller, each still has exactly one best token raised."""
    score = torch.rand(1, 35, generator=torch.Generator().manual_seed(0)) + 1
    out = spatial_bonus(score, (5, 7), 0.5, 2)
    raised = (out != score).reshape(5, 7)
    assert int(raised.sum()) == 3 * 4  # ceil(5/2) × ceil(7/2) patches
    assert int(raised[4, 6]) == 1  # the 1×1 corner patch: its one token is its best
    torch.testing.assert_close(out[out != score], score[out != score] * 1.5)


def test_a_family_without_layer_modules_is_refused():
    with pytest.raises(UnsupportedModelError, match="selects tokens per layer in .*; Linear is not one"):
        LayerCaching(_toca()).apply(torch.nn.Linear(2, 2))


# -- FLUX: dual- and single-stream blocks ----------------------------------------------------------------
def test_flux_every_step_full_is_the_model_and_partial_steps_cost_less():
    from tests.test_flux import tiny_flux

    a = tiny_flux()
    cfg = SamplerConfig(num_steps=5, guidance_scale=3.5, progress=False)
    full = sample(a, selectors.build("full"), ["a"], [0], cfg)
    same = sample(a, _toca(fresh_threshold=1), ["a"], [0], cfg)
    torch.testing.assert_close(same.images, full.images, atol=1e-5, rtol=0)
    cached = sample(a, _toca(alpha=0.2), ["a"], [0], cfg)
    macs = [s.macs for s in cached.trace.steps]
    assert macs[0] == full.trace.steps[0].macs and max(macs[1:4]) < 0.5 * macs[0]


def test_flux_partial_step_macs_equal_the_flop_counter_and_text_tokens_stay_fresh():
    """A FLUX partial step: single-stream blocks run their MLP input projection and output projection on the
    text tokens plus the same fresh image tokens; MACs are half of torch's FLOP count."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.overrides import TorchFunctionMode
    from torch.utils.flop_counter import FlopCounterMode

    from catlab.stepcache import MacCounter
    from tests.test_flux import _inputs, tiny_flux

    a = tiny_flux()
    t = a.transformer
    policy = _toca(alpha=0.2)
    engine = LayerCaching(policy).apply(t)
    latents, cond = _inputs(a, batch=1)
    text = cond.kwargs["encoder_hidden_states"].shape[1]
    single = t.single_transformer_blocks[0]
    seen: dict = {}
    weights = {id(getattr(single, attr).weight): attr for attr in ("proj_mlp", "proj_out")}

    class Rows(TorchFunctionMode):  # the rows each projection really ran on (a call answered from cache runs none)
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.linear and id(args[1]) in weights:
                seen.setdefault(weights[id(args[1])], []).append(args[0].shape[1])
            return func(*args, **(kwargs or {}))

    try:
        n = a.grid[0] * a.grid[1]
        engine.begin(1, a.grid, 5, "cpu")
        with MacCounter(t) as counter:
            for step in (1, 2):
                fc = FlopCounterMode(display=False)
                with engine.context(step, 5), fc, sdpa_kernel(SDPBackend.MATH), torch.no_grad(), Rows():
                    a.predict(latents, torch.tensor(500.0), cond)
                assert counter.calls[-1] == fc.get_total_flops() // 2, f"step {step}"
        layer = len(t.transformer_blocks)  # layers count across the block lists
        k = fresh_count(policy.fresh_ratio(2, 5, layer, "mlp"), n)
        assert 0 < k < n
        assert seen == {"proj_mlp": [text + n, text + k], "proj_out": [text + n, text + k]}
        assert counter.calls[1] < 0.5 * counter.calls[0]
    finally:
        engine.remove()


@pytest.mark.parametrize("score", ["frequency", "attention"])
def test_flux_stock_pipeline_equals_catlabs_loop(tmp_path, score):
    """``enable_pruning`` on a complete tiny FLUX.1 pipeline (saved, loaded by ``model=flux``'s adapter), called
    as users call it, gives catlab's loop's images and MACs per step."""
    from catlab import disable_pruning, enable_pruning, pruning_macs
    from catlab.models.packed import pack
    from catlab.registry import models
    from catlab.testing.tiny_pipelines import flux_pipeline

    flux_pipeline().save_pretrained(tmp_path)
    spec = {"name": "model", "path": str(tmp_path), "device": "cpu", "dtype": "float32", "height": 64, "width": 64}
    a = models.build({**spec, "name": "flux", "max_sequence_length": 32})
    prompts, seeds, steps = ["a red circle", "a blue square"], [0, 1], 5
    ran = sample(
        a,
        _toca(alpha=0.2, score=score),
        prompts,
        seeds,
        SamplerConfig(num_steps=steps, guidance_scale=3.5, progress=False),
    )
    pipe = a.pipeline
    enable_pruning(pipe, _toca(alpha=0.2, score=score))
    images = pipe(
        prompts,
        num_inference_steps=steps,
        height=64,
        width=64,
        guidance_scale=3.5,
        latents=pack(a.initial_latents(seeds)),
        output_type="pt",
        max_sequence_length=32,
    ).images
    macs = pruning_macs(pipe)
    disable_pruning(pipe)
    torch.testing.assert_close(images.float(), ran.images, atol=1e-5, rtol=0)
    assert macs == [s.macs for s in ran.trace.steps] and macs[1] < 0.5 * macs[0]


# -- the cross-attention entropy score (s2) ---------------------------------------------------------------
def test_cross_entropy_score_is_the_model_without_caching_and_counts_its_macs():
    """``score: cross_entropy`` writes PixArt's cross-attention out to keep its N×L map: every step full, it
    is still the stock model to 1e-5; a partial step's MACs are half of torch's FLOP count."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from catlab.stepcache import MacCounter

    a = tiny_pixart()
    full = sample(a, selectors.build("full"), PROMPTS, SEEDS, CFG).images
    got = sample(a, _toca(fresh_threshold=1, score="cross_entropy"), PROMPTS, SEEDS, CFG).images
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
    policy = _toca(alpha=0.2, score="cross_entropy")
    engine = LayerCaching(policy).apply(a.transformer)
    cond = a.encode(PROMPTS, True)
    latents = torch.cat([a.initial_latents(SEEDS)] * cond.groups)
    try:
        engine.begin(len(SEEDS), (8, 8), 6, "cpu")
        with MacCounter(a.transformer) as counter:
            for step in (1, 2):
                fc = FlopCounterMode(display=False)
                with engine.context(step, 6), fc, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
                    a.predict(latents, torch.tensor(500.0), cond)
                assert counter.calls[-1] == fc.get_total_flops() // 2, f"step {step}"
                maps = {layer: m.clone() for layer, m in engine.cross_maps.items()}
                assert set(maps) == {0, 1, 2} and maps[0].shape == (4, 64, 6)
                torch.testing.assert_close(maps[0].sum(-1), torch.ones(4, 64))
    finally:
        engine.remove()


def test_cross_entropy_selection_follows_the_recorded_map():
    """At the first partial step, layer 0's cross-attention takes the top-k of the authors' s2 + s3 + s4 on
    the map its full step recorded (both guidance branches mixed), and its map rows are refreshed for them."""
    a = tiny_pixart()
    policy = _toca(alpha=0.2, score="cross_entropy")
    engine = LayerCaching(policy).apply(a.transformer)
    cond = a.encode(PROMPTS, True)
    latents = torch.cat([a.initial_latents(SEEDS)] * cond.groups)
    try:
        engine.begin(len(SEEDS), (8, 8), 6, "cpu")
        with torch.no_grad():
            with engine.context(1, 6):
                a.predict(latents, torch.tensor(500.0), cond)
            recorded = engine.cross_maps[0].clone()
            with engine.context(2, 6):
                a.predict(latents * 0.5, torch.tensor(400.0), cond)
        b = len(SEEDS)
        k = fresh_count(policy.fresh_ratio(2, 6, 0, "cross"), 64)
        score = spatial_bonus(cross_attention_entropy(recorded[b:], recorded[:b]), (8, 8), 0.4, 4)
        want = top_fresh(score, k)
        assert torch.equal(
            policy.counters[(0, "cross")] == 0, torch.zeros(b, 64, dtype=torch.bool).scatter(1, want, True)
        )
        changed = (engine.cross_maps[0] != recorded).any(-1)[b:]  # conditional rows (the empty prompt's map is flat)
        assert torch.equal(changed, torch.zeros(b, 64, dtype=torch.bool).scatter(1, want, True))
    finally:
        engine.remove()


def test_cross_entropy_needs_a_cross_attention():
    with pytest.raises(UnsupportedModelError, match="no cross-attention"):
        LayerCaching(_toca(score="cross_entropy")).apply(tiny_sd3().transformer)
