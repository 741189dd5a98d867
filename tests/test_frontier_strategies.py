"""The frontier's catlab strategies: the adaptive full-step schedule and the per-token best-order forecast."""

from __future__ import annotations

import pytest
import torch

from catlab.registry import selectors
from catlab.reuse import reuses
from tests.conftest import generate, tiny_sd3

STEPS = 8
PROMPTS, SEEDS = ["a red square"], [0]


@pytest.fixture(scope="module")
def model():
    return tiny_sd3()


def quadratic(step, c=0.5):
    """Two tokens, one channel: y = 1 + 2·s + c·s² (the second divided difference is c)."""
    return torch.full((1, 2, 1), 1.0 + 2.0 * step + c * step * step)


def test_adaptive_schedule_estimates_the_next_newton_term_and_skips_within_the_threshold():
    policy = selectors.build({"name": "adaptive_schedule", "start_step": 3, "threshold": 0.0, "max_skip": 4})
    policy.threshold = None  # set below, once the scale is known
    policy.reset(1, (1, 2), 12, "cpu")
    assert policy.num_kept(1, 2) is None and policy.estimate(4) is None  # no history yet
    for s in (1, 2, 3):
        policy.observe(s, quadratic(s), None)
    y3 = float(quadratic(3)[0, 0, 0])  # 14.5
    # order 1 through (3, 2) misses step s by c·(s − 3)(s − 2): 1.0 at step 4, 3.0 at step 5
    assert policy.estimate(4) == pytest.approx(0.5 * 1 * 2 / y3)
    assert policy.estimate(5) == pytest.approx(0.5 * 2 * 3 / y3)
    policy.threshold = 4.5 / y3  # step 4 (1.0) fits, 4 and 5 together (1.0 + 3.0 = 4.0) fit, 4..6 (+6.0) do not
    assert [policy.num_kept(s, 2) for s in (4, 5, 6)] == [0, 0, None]
    assert policy.num_kept(5, 2) == 0  # asked again: the same decision
    assert policy.estimates == {4: pytest.approx(1.0 / y3), 5: pytest.approx(3.0 / y3)}


def test_adaptive_schedule_caps_forecast_steps_in_a_row_and_waits_for_history():
    policy = selectors.build({"name": "adaptive_schedule", "start_step": 2, "threshold": 1e9, "max_skip": 2})
    policy.reset(1, (1, 2), 12, "cpu")
    for s in (1, 2):
        policy.observe(s, quadratic(s), None)
    assert policy.num_kept(3, 2) is None  # two outputs: no second difference yet
    policy.observe(3, quadratic(3), None)
    assert [policy.num_kept(s, 2) for s in (4, 5, 6)] == [0, 0, None]
    assert policy.alpha == pytest.approx(1 / 3)


def test_adaptive_schedule_copy_order_uses_the_first_difference():
    policy = selectors.build({"name": "adaptive_schedule", "start_step": 2, "order": 0})
    policy.reset(1, (1, 2), 12, "cpu")
    for s in (1, 2):
        policy.observe(s, quadratic(s), None)
    # copy misses step 4 by d1·(4 − 2), d1 = y(2) − y(1) = 2 + 0.5·3 = 3.5
    assert policy.estimate(4) == pytest.approx(3.5 * 2 / float(quadratic(2)[0, 0, 0]))


def test_adaptive_schedule_force_full_runs_the_named_steps_in_full(model):
    """``force_full: [-2]`` (the step before the last) and a 1-based step: full whatever the estimate, and the
    forecast run restarts after them; without it the same schedule forecasts those steps."""
    spec = {"name": "adaptive_schedule", "start_step": 3, "threshold": 10.0, "max_skip": 2}
    free = generate(model, selectors.build(spec), PROMPTS, SEEDS, num_steps=STEPS, reuse=reuses.build("taylor"))
    assert free.computed_tokens == [64, 64, 64, 0, 0, 64, 0, 0]
    forced = selectors.build({**spec, "force_full": [-2, 4]})
    result = generate(model, forced, PROMPTS, SEEDS, num_steps=STEPS, reuse=reuses.build("taylor"))
    assert forced.forced() == {7, 4}
    assert result.computed_tokens == [64, 64, 64, 64, 0, 0, 64, 0]


@pytest.mark.parametrize("bad", [[0], [1.5], ["last"], [True]])
def test_adaptive_schedule_refuses_bad_forced_steps(bad):
    with pytest.raises(ValueError, match="force_full must list non-zero step numbers"):
        selectors.build({"name": "adaptive_schedule", "force_full": bad})


@pytest.mark.parametrize("step", [9, -9])
def test_adaptive_schedule_refuses_a_forced_step_outside_the_run(step):
    policy = selectors.build({"name": "adaptive_schedule", "start_step": 2, "force_full": [step]})
    with pytest.raises(ValueError, match=f"force_full names step {step}, outside the run's 8 steps"):
        policy.check(STEPS)  # the check every run makes before any compute


@pytest.mark.parametrize("bad", [{"threshold": -1}, {"max_skip": -1}, {"order": 2}])
def test_adaptive_schedule_refuses_bad_settings(bad):
    with pytest.raises(ValueError, match="adaptive_schedule: " + next(iter(bad))):
        selectors.build({"name": "adaptive_schedule", **bad})


def test_adaptive_schedule_at_threshold_zero_is_the_full_model(model):
    full = generate(model, selectors.build("full"), PROMPTS, SEEDS, num_steps=STEPS)
    policy = selectors.build({"name": "adaptive_schedule", "start_step": 2, "threshold": 0.0})
    mine = generate(model, policy, PROMPTS, SEEDS, num_steps=STEPS, reuse=reuses.build("taylor"))
    assert mine.computed_tokens == [64] * STEPS
    torch.testing.assert_close(mine.images, full.images, rtol=0, atol=1e-5)


def test_adaptive_schedule_skips_steps_and_pays_only_for_the_full_ones(model):
    policy = selectors.build({"name": "adaptive_schedule", "start_step": 3, "threshold": 10.0, "max_skip": 2})
    result = generate(model, policy, PROMPTS, SEEDS, num_steps=STEPS, reuse=reuses.build("taylor"))
    assert result.computed_tokens == [64, 64, 64, 0, 0, 64, 0, 0]
    assert result.step_macs == [result.full_step_macs if k else 0 for k in result.computed_tokens]
    assert torch.isfinite(result.images).all()


def series(values):
    """A (1, N, 1) output per step from per-token value lists."""
    return [torch.tensor([[[v[i]] for v in values]]) for i in range(len(values[0]))]


def test_best_order_forecasts_each_token_with_the_order_that_was_closest():
    # token 0 quadratic (order 2 exact), token 1 straight (order 1 exact, 2 equal), token 2 back to rest (copy exact)
    values = [[1.0, 4.0, 9.0, 16.0], [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, 0.0]]
    rule = reuses.build({"name": "best_order", "decay": 0.0})  # the latest error alone
    rule.reset(1, 3, 1)
    for t, out in enumerate(series(values), 1):
        assert torch.equal(rule.compose(t, out, None), out)  # every token computed: the output itself
    # scored at t = 4 (forecasts from t = 1..3): token 0 errors (7, 2, 0), token 1 (1, 0, 0), token 2 (0, 1, 3)
    torch.testing.assert_close(rule.errors[0], torch.tensor([[7.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 3.0]]))
    assert rule.choice().tolist() == [[2, 1, 0]]
    none = torch.zeros(1, 0, dtype=torch.long)
    out = rule.compose(5, torch.zeros(1, 3, 1), none)
    # order 2 through 16, 9, 4 at 5: 25; order 1 through 4, 3: 5; copy of 0: 0
    torch.testing.assert_close(out[0, :, 0], torch.tensor([25.0, 5.0, 0.0]))


def test_best_order_running_error_decays_and_unscored_tokens_use_order_one():
    rule = reuses.build({"name": "best_order", "decay": 0.5})
    rule.reset(1, 2, 1)
    rule.compose(1, torch.tensor([[[0.0], [0.0]]]), None)
    rule.compose(2, torch.tensor([[[1.0], [1.0]]]), None)
    # token 1 not computed at 3: its errors stay those measured at 2 (copy 1, order 1 not yet scorable)
    rule.compose(3, torch.tensor([[[2.0], [5.0]]]), torch.tensor([[0]]))
    assert rule.errors[0, 1, 0] == 1.0 and torch.isinf(rule.errors[0, 1, 1:]).all()
    # token 0 at 3: copy missed by 1 → 0.5·1 + 0.5·1 = 1; order 1 (0 → 1 → 2) exact: 0
    torch.testing.assert_close(rule.errors[0, 0, :2], torch.tensor([1.0, 0.0]))
    fresh = reuses.build("best_order")
    fresh.reset(1, 1, 1)
    fresh.compose(1, torch.tensor([[[2.0]]]), None)
    assert fresh.choice().tolist() == [[0]]  # one value: only a copy is possible
    fresh.count.fill_(2)
    fresh.errors.fill_(float("inf"))
    assert fresh.choice().tolist() == [[1]]


def test_best_order_refuses_bad_settings():
    with pytest.raises(ValueError, match="best_order reuse: order"):
        reuses.build({"name": "best_order", "order": 0})
    with pytest.raises(ValueError, match="best_order reuse: decay"):
        reuses.build({"name": "best_order", "decay": 1.0})


def test_best_order_with_every_token_computed_is_the_full_model(model):
    full = generate(model, selectors.build("full"), PROMPTS, SEEDS, num_steps=STEPS)
    mine = generate(
        model,
        selectors.build({"name": "budget_schedule", "pattern": [1.0], "start_step": 2}),
        PROMPTS,
        SEEDS,
        num_steps=STEPS,
        reuse=reuses.build("best_order"),
    )
    torch.testing.assert_close(mine.images, full.images, rtol=0, atol=1e-5)
    skipping = generate(
        model,
        selectors.build({"name": "budget_schedule", "pattern": [1.0, 0.0], "start_step": 3}),
        PROMPTS,
        SEEDS,
        num_steps=STEPS,
        reuse=reuses.build("best_order"),
    )
    assert skipping.computed_tokens == [64, 64, 64, 64, 0, 64, 0, 64]
    assert torch.isfinite(skipping.images).all()
