"""cache-dit's DBCache and DBPrune as catlab step caches: applied through the sampler, counted, removed cleanly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("cache_dit", reason='cache-dit is not installed (pip install "catlab[peers]")')

from catlab.assembly import StepReuse  # noqa: E402
from catlab.builders import ConfigError, assemble, build_step_cache  # noqa: E402
from catlab.registry import selectors  # noqa: E402
from catlab.sampler import SamplerConfig  # noqa: E402
from catlab.stepcache import StepCacheError, stepcaches  # noqa: E402
from tests.conftest import generate, tiny_pixart, tiny_sd3  # noqa: E402

STEPS, START = 8, 3
PROMPTS, SEEDS = ["a red square"], [0]


@pytest.fixture(scope="module")
def models():
    from catlab.builders import build_model
    from catlab.models.embedded import Embedded

    torch.manual_seed(0)
    return {
        "sd3": tiny_sd3(),
        "pixart": tiny_pixart(),
        "embedded": Embedded(),
        "wan": build_model({"name": "tiny_wan"}),
    }


@pytest.fixture(scope="module")
def full_runs(models):
    """Each model's full generation, computed once."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = generate(models[family], selectors.build("full"), PROMPTS, SEEDS, num_steps=STEPS)
        return cache[family]

    return get


def _forward(adapter):
    cond = adapter.encode(PROMPTS, True)
    x = torch.cat([adapter.initial_latents(SEEDS)] * 2)
    with torch.no_grad():
        return adapter.predict(x, torch.tensor(500.0), cond)


def _state(t):
    """What a cache could leave behind: instance attributes of the transformer and its block list, weights."""
    return (
        set(t.__dict__) - {"_diffusers_hook"},
        set((t.blocks if hasattr(t, "blocks") else t.transformer_blocks).__dict__),  # Wan's list: `blocks`
        {k: v.clone() for k, v in t.state_dict().items()},
    )


def _run(model, spec, **over):
    cache = stepcaches.build({**spec, "start_step": START, **over})
    return generate(model, selectors.build("full"), PROMPTS, SEEDS, num_steps=STEPS, step_cache=cache), cache


CACHES = [
    ("sd3", {"name": "cachedit_dbcache"}),
    ("sd3", {"name": "cachedit_dbcache", "calibrator": "taylorseer"}),
    ("sd3", {"name": "cachedit_dbprune"}),
    ("pixart", {"name": "cachedit_dbcache"}),
    ("pixart", {"name": "cachedit_dbcache", "calibrator": "taylorseer", "taylorseer_order": 2}),
    ("embedded", {"name": "cachedit_dbcache", "calibrator": "taylorseer"}),
    ("embedded", {"name": "cachedit_dbprune"}),
    ("wan", {"name": "cachedit_dbcache"}),
    ("wan", {"name": "cachedit_dbcache", "calibrator": "foca"}),
]


@pytest.mark.parametrize(
    "family, spec",
    CACHES,
    ids=lambda x: x if isinstance(x, str) else x["name"] + ("_" + x["calibrator"] if "calibrator" in x else ""),
)
def test_cachedit_skips_counted_work_and_removes_cleanly(models, full_runs, family, spec):
    model = models[family]
    t = model.transformer
    before, (attrs, block_attrs, weights) = _forward(model), _state(t)
    full = full_runs(family)

    result, loose = _run(model, spec, threshold=0.9)
    assert result.step_macs[:START] == [full.full_step_macs] * START  # warm-up steps 1..start_step in full
    assert result.macs < full.macs and min(result.step_macs) < full.full_step_macs  # the counter saw skipped blocks
    assert torch.isfinite(result.images).all()

    zero, exact = _run(model, spec, threshold=0.0)
    assert zero.step_macs == [full.full_step_macs] * STEPS
    assert torch.allclose(zero.images, full.images, atol=1e-5)

    assert not loose.is_applied and not exact.is_applied
    assert torch.equal(_forward(model), before)  # the stock model again, bit for bit
    assert _state(t)[:2] == (attrs, block_attrs) and "forward" not in t.__dict__
    assert all(torch.equal(v, weights[k]) for k, v in t.state_dict().items())


def test_state_is_reset_per_generation(models):
    """Two generations with one cache: the same images and steps (no residual or counter carried over)."""
    model, cache = models["sd3"], stepcaches.build({"name": "cachedit_dbprune", "threshold": 0.9, "start_step": START})
    runs = [
        generate(model, selectors.build("full"), PROMPTS, SEEDS, num_steps=STEPS, step_cache=cache) for _ in range(2)
    ]
    assert torch.equal(runs[0].images, runs[1].images) and runs[0].step_macs == runs[1].step_macs


def test_taylorseer_calibrator_changes_the_reused_residual(models):
    """Same steps reused; TaylorSeer forecasts the residual (it needs 4 computed steps for a first derivative)."""
    runs = [
        _run(models["sd3"], {"name": "cachedit_dbcache", "calibrator": c}, threshold=0.9, start_step=4)[0]
        for c in (None, "taylorseer")
    ]
    assert runs[0].step_macs == runs[1].step_macs
    assert not torch.equal(runs[0].images, runs[1].images)


def test_limits_reach_cache_dit(models):
    result, _ = _run(models["sd3"], {"name": "cachedit_dbcache", "max_cached_steps": 2}, threshold=0.9)
    assert sum(m < result.full_step_macs for m in result.step_macs) == 2


def _dbprune_runs_on_pixart_unchecked(monkeypatch) -> bool:
    """Whether the installed cache-dit's DBPrune really gets through a PixArt generation, catlab's check bypassed."""
    from catlab.stepcache.cachedit import CacheDitDBPrune

    with monkeypatch.context() as m:
        m.setattr(CacheDitDBPrune, "_check_supported", lambda self, pattern_name, pattern: None)
        try:
            _run(tiny_pixart(), {"name": "cachedit_dbprune"}, threshold=0.9)
        except TypeError:
            return False
    return True


def test_dbprune_on_pixart_is_refused_with_the_reason(models, monkeypatch):
    """Refused exactly when the installed cache-dit fails on PixArt's blocks (1.5.3 does), and then with the reason."""
    t = models["pixart"].transformer
    before = _state(t)
    cache = stepcaches.build({"name": "cachedit_dbprune"})
    if _dbprune_runs_on_pixart_unchecked(monkeypatch):  # a cache-dit without the mismatch: nothing to refuse
        cache.apply(t)
        assert cache.is_applied
        cache.remove(t)
    else:
        with pytest.raises(StepCacheError, match="Pattern_3.*fails at the first step; use cachedit_dbcache"):
            cache.apply(t)
    after = _state(t)
    assert not cache.is_applied and "forward" not in t.__dict__
    assert after[:2] == before[:2] and all(torch.equal(after[2][k], v) for k, v in before[2].items())


def test_pruning_inside_is_refused_before_compute(models):
    policy = selectors.build({"name": "random", "alpha": 0.5, "start_step": 3})
    cfg = SamplerConfig(num_steps=STEPS)
    parts = StepReuse(step_cache=build_step_cache({"name": "cachedit_dbcache"}, cfg))
    with pytest.raises(ConfigError, match="different tokens"):
        assemble(models["sd3"].transformer, policy, parts, cfg)


def test_bad_options_fail_at_build():
    with pytest.raises(StepCacheError, match="calibrator must be"):
        stepcaches.build({"name": "cachedit_dbcache", "calibrator": "taylor"})
    with pytest.raises(StepCacheError, match="max_skip_steps"):
        stepcaches.build({"name": "cachedit_dbprune", "max_skip_steps": -1})


@pytest.mark.slow
def test_without_cache_dit_catlab_imports_and_the_config_fails_in_one_line():
    """cache-dit hidden: catlab imports, the components are registered, building one names the install line."""
    code = (
        "import sys; sys.modules['cache_dit'] = None\n"
        "import catlab, catlab.stepcache as s\n"
        "from catlab.builders import build_step_cache; from catlab.registry import selectors\n"
        "from catlab.sampler import SamplerConfig\n"
        "assert 'cachedit_dbcache' in s.stepcaches.names()\n"
        "try:\n"
        "    build_step_cache({'name': 'cachedit_dbcache'}, SamplerConfig())\n"
        "except s.StepCacheError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "step cache 'cachedit_dbcache' needs cache-dit, which is not installed: pip install \"catlab[peers]\""
    )
