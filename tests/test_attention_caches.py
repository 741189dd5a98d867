"""diffusers' attention-level step caches (Pyramid Attention Broadcast, FasterCache) and cache-dit's FoCa and DMD
calibrators as catlab step caches: schedules known by hand, MACs counted as they run, removed cleanly."""

from __future__ import annotations

import pytest
import torch

from catlab.builders import ConfigError, assemble
from catlab.registry import selectors
from catlab.sampler import SamplerConfig, StepReuse
from catlab.stepcache import StepCacheError, stepcaches
from tests.conftest import generate, tiny_pixart, tiny_sd3

STEPS = 8
PROMPTS, SEEDS = ["a red square"], [0]
EVERYWHERE = [-1, 2000]  # a timestep range holding every step
NOWHERE = [2000, 3000]  # one holding none


@pytest.fixture(scope="module")
def models():
    from catlab.models.embedded import Embedded

    torch.manual_seed(0)
    return {"sd3": tiny_sd3(), "pixart": tiny_pixart(), "embedded": Embedded()}


@pytest.fixture(scope="module")
def full_runs(models):
    return {name: generate(m, selectors.build("full"), PROMPTS, SEEDS, num_steps=STEPS) for name, m in models.items()}


def _forward(adapter):
    cond = adapter.encode(PROMPTS, True)
    x = torch.cat([adapter.initial_latents(SEEDS)] * 2)
    with torch.no_grad():
        return adapter.predict(x, torch.tensor(500.0), cond)


def _run(model, spec, **kw):
    return generate(
        model, selectors.build("full"), PROMPTS, SEEDS, num_steps=STEPS, step_cache=stepcaches.build(spec), **kw
    )


def _fractions(result, full):
    return [m / full.full_step_macs for m in result.step_macs]


@pytest.mark.parametrize("family", ["sd3", "pixart", "embedded"])
def test_pyramid_attention_broadcast_computes_every_other_call(models, full_runs, family):
    """spatial_skip=2 over every timestep: attention runs at the 1st, 3rd, ... call and is reused between."""
    model, full = models[family], full_runs[family]
    before = _forward(model)
    result = _run(model, {"name": "pyramid_attention_broadcast", "spatial_skip": 2, "timestep_range": EVERYWHERE})
    fractions = _fractions(result, full)
    assert fractions[0::2] == [1.0] * (STEPS // 2)
    assert all(f < 1.0 for f in fractions[1::2]) and len(set(fractions[1::2])) == 1
    assert torch.isfinite(result.images).all() and not torch.equal(result.images, full.images)
    assert torch.equal(_forward(model), before)  # removed: the stock model again, bit for bit


def test_pyramid_attention_broadcast_on_cross_attention_skips_more(models, full_runs):
    self_only = _run(models["pixart"], {"name": "pyramid_attention_broadcast", "timestep_range": EVERYWHERE})
    both = _run(
        models["pixart"], {"name": "pyramid_attention_broadcast", "cross_skip": 2, "timestep_range": EVERYWHERE}
    )
    assert both.macs < self_only.macs < full_runs["pixart"].macs


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "pyramid_attention_broadcast", "timestep_range": NOWHERE},
        {
            "name": "faster_cache",
            "attention_timestep_range": NOWHERE,
            "uncond_timestep_range": NOWHERE,
        },
    ],
    ids=lambda s: s["name"],
)
@pytest.mark.parametrize("family", ["sd3", "embedded"])
def test_outside_their_timestep_ranges_they_are_the_full_model(models, full_runs, family, spec):
    result = _run(models[family], spec)
    assert result.step_macs == [full_runs[family].full_step_macs] * STEPS
    assert torch.equal(result.images, full_runs[family].images)


@pytest.mark.parametrize("family", ["sd3", "pixart", "embedded"])
def test_faster_cache_skipping_the_unconditional_branch_halves_its_steps(models, full_runs, family):
    """uncond_skip=2, attention never reused: every 2nd step runs the conditional rows only, exactly half."""
    full = full_runs[family]
    spec = {"name": "faster_cache", "uncond_skip": 2, "uncond_timestep_range": EVERYWHERE}
    result = _run(models[family], {**spec, "attention_timestep_range": NOWHERE})
    assert [2 * m for m in result.step_macs[1::2]] == [full.full_step_macs] * (STEPS // 2)
    assert result.step_macs[0::2] == [full.full_step_macs] * (STEPS // 2)
    assert torch.isfinite(result.images).all() and not torch.equal(result.images, full.images)
    both = _run(models[family], {**spec, "attention_timestep_range": EVERYWHERE})
    assert both.macs < result.macs  # the attention part skips more


def test_faster_cache_needs_guidance_rows(models):
    with pytest.raises(StepCacheError, match="faster_cache rebuilds the unconditional guidance branch.*no guidance"):
        _run(models["sd3"], {"name": "faster_cache"}, guidance_scale=1.0)


@pytest.mark.parametrize("name", ["pyramid_attention_broadcast", "faster_cache"])
def test_attention_caches_refuse_to_compose_with_pruning(models, name):
    cfg = SamplerConfig(num_steps=STEPS)
    with pytest.raises(ConfigError, match=f"step cache '{name}' reuses attention outputs between steps"):
        assemble(
            models["sd3"].transformer,
            selectors.build({"name": "random", "alpha": 0.5, "start_step": 2}),
            StepReuse(step_cache=stepcaches.build(name)),
            cfg,
        )


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "pyramid_attention_broadcast", "spatial_skip": None}, "set at least one of"),
        ({"name": "pyramid_attention_broadcast", "spatial_skip": 0}, "spatial_skip must be null or >= 1"),
        ({"name": "pyramid_attention_broadcast", "timestep_range": [800, 100]}, "timestep_range must have low < high"),
        ({"name": "faster_cache", "uncond_skip": None}, "uncond_skip must be >= 1"),
        ({"name": "faster_cache", "low_update_range": 5}, r"low_update_range must be \[low, high\]"),
    ],
)
def test_bad_settings_fail_at_build(spec, message):
    with pytest.raises(StepCacheError, match=message):
        stepcaches.build(spec)


def test_faster_cache_refuses_packed_tokens_with_stacked_branches(models, monkeypatch):
    """A family whose stacked guidance rows come out as tokens (B, N, C) has no image to split into frequencies."""
    import dataclasses

    from catlab.stepcache import attention_caches

    transformer = models["sd3"].transformer
    packed = dataclasses.replace(attention_caches.family_of(transformer), packed=True, guidance_distilled=False)
    monkeypatch.setattr(attention_caches, "family_of", lambda _: packed)
    with pytest.raises(StepCacheError, match="returns packed tokens"):
        stepcaches.build("faster_cache").apply(transformer)
    assert not attention_caches._hooked(transformer, "faster_cache_denoiser")


@pytest.mark.parametrize("calibrator", ["foca", "dmd"])
@pytest.mark.parametrize("family", ["sd3", "embedded"])
def test_cachedit_foca_and_dmd_calibrators_run_counted(models, full_runs, family, calibrator):
    pytest.importorskip("cache_dit", reason='cache-dit is not installed (pip install "catlab[peers]")')
    full = full_runs[family]
    spec = {"name": "cachedit_dbcache", "calibrator": calibrator, "start_step": 3}
    loose = _run(models[family], {**spec, "threshold": 0.9})
    assert loose.step_macs[:3] == [full.full_step_macs] * 3 and loose.macs < full.macs
    assert torch.isfinite(loose.images).all()
    exact = _run(models[family], {**spec, "threshold": 0.0})
    assert exact.step_macs == [full.full_step_macs] * STEPS
    assert torch.allclose(exact.images, full.images, atol=1e-5)


def test_foca_forecasts_the_reused_residual(models):
    pytest.importorskip("cache_dit", reason='cache-dit is not installed (pip install "catlab[peers]")')
    runs = [
        _run(models["sd3"], {"name": "cachedit_dbcache", "calibrator": c, "start_step": 3, "threshold": 0.9})
        for c in (None, "foca")
    ]
    assert runs[0].step_macs == runs[1].step_macs
    assert not torch.equal(runs[0].images, runs[1].images)


WAN_CACHES = [
    {"name": "taylorseer", "start_step": 3, "cache_interval": 2},
    {"name": "first_block_cache", "threshold": 10.0},
    {"name": "mag_cache", "threshold": 10.0, "num_steps": STEPS, "mag_ratios": [1.0] * STEPS},
    {"name": "pyramid_attention_broadcast", "cross_skip": 2, "timestep_range": EVERYWHERE},
    {"name": "faster_cache", "uncond_skip": 2, "uncond_timestep_range": EVERYWHERE},
]


@pytest.fixture(scope="module")
def wan():
    from catlab.registry import models

    torch.manual_seed(0)
    model = models.build({"name": "tiny_wan"})
    return model, generate(model, selectors.build("full"), PROMPTS, SEEDS, num_steps=STEPS)


@pytest.mark.parametrize("spec", WAN_CACHES, ids=lambda s: s["name"])
def test_every_step_cache_runs_on_a_video_transformer(wan, spec):
    """Wan's block list is ``blocks``: the caches find it through its family, skip work and count it."""
    model, full = wan
    result = _run(model, spec)
    assert result.macs < full.macs and min(result.step_macs) < full.full_step_macs
    assert torch.isfinite(result.images).all()
