"""Step caches from diffusers as catlab components: apply/remove, MAC accounting, composition with pruning."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from catlab.pruning.engine import TokenPruner
from catlab.registry import selectors
from catlab.reuse import reuses
from catlab.sampler import SamplerConfig, StepReuse, calibrate, sample
from catlab.stepcache import MacCounter, StepCacheError, stepcaches
from tests.conftest import generate, tiny_sd3

STEPS = 8
PROMPTS, SEEDS = ["a red square"], [0]


@pytest.fixture(scope="module")
def model():
    return tiny_sd3()


def _forward(adapter, t=500.0):
    cond = adapter.encode(PROMPTS, True)
    x = torch.cat([adapter.initial_latents(SEEDS)] * 2)
    with torch.no_grad():
        return adapter.predict(x, torch.tensor(t), cond), cond


def _hooks(transformer):
    return {name for m in transformer.modules() if hasattr(m, "_diffusers_hook") for name in m._diffusers_hook.hooks}


def test_mac_counter_matches_the_analytic_count_and_flop_counter(model):
    t = model.transformer
    pruner = TokenPruner(t).attach()
    try:
        with MacCounter(t) as counter:
            _, cond = _forward(model)
            fc = FlopCounterMode(display=False)
            with fc, sdpa_kernel(SDPBackend.MATH):  # the math path is made of matmuls FlopCounterMode counts
                _forward(model)
            pruner.set_indices(torch.randperm(64)[:19][None], rows=2)
            _forward(model, 400.0)
        n_text = cond.num_text_tokens
        assert counter.calls[0] == pruner.macs(2, n_text, 64) == fc.get_total_flops() // 2
        assert counter.calls[2] == pruner.macs(2, n_text, 64, kept=19)
    finally:
        pruner.detach()


CACHES = [
    {"name": "taylorseer", "cache_interval": 2, "start_step": 3},
    {"name": "taylorseer", "cache_interval": 2, "start_step": 3, "mode": "attention"},
    {"name": "first_block_cache", "threshold": 10.0},
    {"name": "mag_cache", "threshold": 10.0, "num_steps": STEPS, "mag_ratios": [1.0] * STEPS},
]


@pytest.mark.parametrize("spec", CACHES, ids=lambda s: s["name"] + s.get("mode", ""))
def test_step_caches_skip_counted_work_and_remove_cleanly(model, spec):
    t = model.transformer
    before, _ = _forward(model)
    state = {k: v.clone() for k, v in t.state_dict().items()}
    full = generate(model, selectors.build("full"), PROMPTS, SEEDS, num_steps=STEPS)
    cache = stepcaches.build(spec)
    result = generate(model, selectors.build("full"), PROMPTS, SEEDS, num_steps=STEPS, step_cache=cache)
    assert result.macs < full.macs and result.macs_ratio > 1.1
    assert min(result.step_macs) < full.full_step_macs  # some steps skipped work, and the counter saw it
    assert torch.isfinite(result.images).all()
    assert not (_hooks(t) & set(cache.hook_names))
    after, _ = _forward(model)
    assert torch.equal(before, after)
    assert all(torch.equal(v, state[k]) for k, v in t.state_dict().items())


def test_taylorseer_schedule_matches_its_step_costs(model):
    cache = stepcaches.build({"name": "taylorseer", "cache_interval": 2, "start_step": 3})
    result = generate(model, selectors.build("full"), PROMPTS, SEEDS, num_steps=STEPS, step_cache=cache)
    for i, macs in enumerate(result.step_macs):
        assert (macs == result.full_step_macs) == cache.computes(i + 1)


def test_first_block_cache_runs_on_sd3_and_refuses_too_few_blocks():
    small = tiny_sd3(num_layers=2)
    cache = stepcaches.build({"name": "first_block_cache"})
    with pytest.raises(StepCacheError, match="at least 2 cacheable blocks"):
        cache.apply(small.transformer)
    assert not _hooks(small.transformer) & set(cache.hook_names)


def test_mag_cache_calibrates_from_a_full_generation(model):
    cache = stepcaches.build({"name": "mag_cache", "num_steps": STEPS})
    with pytest.raises(StepCacheError, match="calibrate"):
        cache.apply(model.transformer)
    full = selectors.build("full")
    ratios = cache.calibrate(
        model.transformer, lambda: generate(model, full, PROMPTS, SEEDS, num_steps=STEPS, step_cache=cache)
    )
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    assert not _hooks(model.transformer) & set(cache.hook_names)


def test_pruning_composes_with_taylorseer_and_macs_add_up(model):
    t = model.transformer
    cache = stepcaches.build({"name": "taylorseer", "cache_interval": 2, "start_step": 3})
    policy = selectors.build({"name": "random", "alpha": 0.25, "start_step": 3})
    result = generate(model, policy, PROMPTS, SEEDS, num_steps=STEPS, reuse=reuses.build("taylor"), step_cache=cache)
    pruned_step = TokenPruner(t).macs(2, 6, num_tokens=64, kept=16)
    for i, macs in enumerate(result.step_macs):
        step = i + 1
        if step <= 3:
            assert macs == result.full_step_macs
        elif cache.computes(i + 1):
            assert macs == pruned_step
        else:
            assert macs < pruned_step / 4
    assert torch.isfinite(result.images).all()
    assert not any(m._diffusers_hook.hooks for m in t.modules() if hasattr(m, "_diffusers_hook"))


def test_block_caches_refuse_to_compose_with_pruning(model):
    policy = selectors.build({"name": "random", "alpha": 0.5, "start_step": 3})
    with pytest.raises(StepCacheError, match="different tokens"):
        generate(model, policy, PROMPTS, SEEDS, num_steps=STEPS, step_cache=stepcaches.build("first_block_cache"))


def test_loop_with_copy_reuse_is_the_sampler(model):
    policy = selectors.build({"name": "random", "alpha": 0.5, "start_step": 3})
    ours = generate(model, policy, PROMPTS, SEEDS, num_steps=STEPS, reuse=reuses.build("copy"))
    ref = sample(model, policy, PROMPTS, SEEDS, SamplerConfig(num_steps=STEPS, progress=False))
    assert torch.equal(ours.images, ref.images)
    assert ours.macs == ref.trace.macs


def test_budget_schedule_mixes_full_forecast_and_pruned_steps(model):
    from catlab.selection.budget_schedule import BudgetSchedule

    policy = BudgetSchedule(inner="sequential", pattern=(1.0, 0.25, 0.0), start_step=3)
    result = generate(model, policy, PROMPTS, SEEDS, num_steps=STEPS, reuse=reuses.build("taylor"))
    assert result.computed_tokens == [64, 64, 64, 64, 16, 0, 64, 16]
    pruned = TokenPruner(model.transformer).macs(2, 6, num_tokens=64, kept=16)
    assert result.step_macs == [result.full_step_macs] * 4 + [pruned, 0, result.full_step_macs, pruned]
    assert torch.isfinite(result.images).all()


def test_budget_schedule_aligned_at_the_end_puts_its_full_step_next_to_last(model):
    """align='end': the pattern's first entry falls on step N-1 whatever N is, so (1, 0) ends on a full step and a
    one-step forecast; here (8 steps, t0 = 3) that is the start-aligned (0, 1), image for image."""
    from catlab.selection.budget_schedule import BudgetSchedule

    taylor = reuses.build("taylor")
    end = generate(
        model,
        BudgetSchedule(inner="sequential", pattern=(1.0, 0.0), start_step=3, align="end"),
        PROMPTS,
        SEEDS,
        num_steps=STEPS,
        reuse=taylor,
    )
    shifted = generate(
        model,
        BudgetSchedule(inner="sequential", pattern=(0.0, 1.0), start_step=3),
        PROMPTS,
        SEEDS,
        num_steps=STEPS,
        reuse=reuses.build("taylor"),
    )
    assert end.computed_tokens == [64, 64, 64, 0, 64, 0, 64, 0]
    assert torch.equal(end.images, shifted.images)
    with pytest.raises(ValueError, match="align must be 'start' or 'end'"):
        BudgetSchedule(pattern=(1.0, 0.0), align="middle")


def test_skipped_step_without_a_rule_reuses_the_last_prediction(model):
    """A 0 budget with no reuse rule repeats the previous prediction: the same images as the copy rule."""
    from catlab.selection.budget_schedule import BudgetSchedule

    policy = BudgetSchedule(inner="sequential", pattern=(1.0, 0.0), start_step=3)
    plain = generate(model, policy, PROMPTS, SEEDS, num_steps=STEPS)
    copied = generate(model, policy, PROMPTS, SEEDS, num_steps=STEPS, reuse=reuses.build("copy"))
    taylor = generate(model, policy, PROMPTS, SEEDS, num_steps=STEPS, reuse=reuses.build("taylor"))
    assert plain.computed_tokens == [64, 64, 64, 64, 0, 64, 0, 64]
    assert torch.equal(plain.images, copied.images)
    assert not torch.allclose(plain.images, taylor.images)


def test_forecast_only_schedule_is_taylorseer_at_token_granularity(model):
    """Pattern (1, 0) with order-1 taylor reuse forecasts like TaylorSeer on the output: close images."""
    from catlab.metrics.fidelity import psnr
    from catlab.selection.budget_schedule import BudgetSchedule

    full = generate(model, selectors.build("full"), PROMPTS, SEEDS, num_steps=STEPS).images
    ours = generate(
        model,
        BudgetSchedule(inner="sequential", pattern=(1.0, 0.0), start_step=3),
        PROMPTS,
        SEEDS,
        num_steps=STEPS,
        reuse=reuses.build("taylor"),
    ).images
    assert psnr(ours, full).min() > 35


def test_skipped_steps_cost_nothing_counted_or_analytic(model):
    """A 0-budget step records 0 MACs whether MACs are counted as they run or computed analytically."""
    from catlab.selection.budget_schedule import BudgetSchedule

    policy = BudgetSchedule(inner="sequential", pattern=(1.0, 0.25, 0.0), start_step=3)
    runs = [
        sample(
            model,
            policy,
            PROMPTS,
            SEEDS,
            SamplerConfig(num_steps=STEPS, progress=False, count_macs=c),
            reuses.build("taylor"),
        )
        for c in (False, True)
    ]
    analytic, counted = ([s.macs for s in r.trace.steps] for r in runs)
    assert analytic == counted and analytic[5] == 0 and analytic[4] < analytic[3]
    assert [s.kept for s in runs[0].trace.steps] == [64, 64, 64, 64, 16, 0, 64, 16]
    assert torch.equal(runs[0].images, runs[1].images)


def test_mag_cache_calibrates_once_then_skips(model):
    cache = stepcaches.build({"name": "mag_cache", "threshold": 0.5, "num_steps": STEPS})
    full = selectors.build("full")
    cfg = SamplerConfig(num_steps=STEPS, progress=False)
    with pytest.raises(StepCacheError, match="calibrate"):
        sample(model, full, PROMPTS, SEEDS, cfg, StepReuse(step_cache=cache))
    calibrate(cache, model, PROMPTS, SEEDS, cfg)
    assert cache.calibrated and len(cache.mag_ratios) == STEPS
    ratios = list(cache.mag_ratios)
    calibrate(cache, model, PROMPTS, SEEDS, cfg)
    first = sample(model, full, PROMPTS, SEEDS, cfg, StepReuse(step_cache=cache))
    again = sample(model, full, PROMPTS, SEEDS, cfg, StepReuse(step_cache=cache))
    assert cache.mag_ratios == ratios  # calibrated once, kept for later batches
    assert torch.equal(first.images, again.images)
    assert first.trace.macs < first.trace.full_macs
    assert not _hooks(model.transformer) & set(cache.hook_names)


def test_taylorseer_takes_diffusers_old_name_with_a_warning():
    with pytest.warns(DeprecationWarning, match="use start_step"):
        cache = stepcaches.build({"name": "taylorseer", "disable_cache_before_step": 3})
    assert cache.start_step == 3 and [cache.computes(s) for s in range(1, 8)] == [True] * 3 + [
        False,
        True,
        False,
        False,
    ]
