"""``adaptive_refresh``: forecast steps that recompute the least trustworthy tokens, full steps when the rest drift."""

from __future__ import annotations

import pytest
import torch

import catlab  # noqa: F401  (registers the selectors)
from catlab.models.embedded import Embedded
from catlab.registry import reuses, selectors
from catlab.sampler import SamplerConfig, StepReuse, sample
from catlab.selection import kept_tokens
from catlab.testing import check_policy

PROMPTS, SEEDS = ["a small red circle in the top left", "a large blue square in the center"], [0, 1]
STEPS = 12


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Embedded()


@pytest.fixture(scope="module")
def full(model):
    return sample(model, selectors.build("full"), PROMPTS, SEEDS, SamplerConfig(num_steps=STEPS, progress=False))


def _run(model, **spec):
    policy = selectors.build({"name": "adaptive_refresh", **spec})
    cfg = SamplerConfig(num_steps=STEPS, progress=False)
    return policy, sample(model, policy, PROMPTS, SEEDS, cfg, StepReuse(rule=reuses.build("taylor")))


def _macs(result) -> int:
    return sum(s.macs for s in result.trace.steps)


ALL_REFRESHED = {"alpha": 1.0, "threshold": 5.0, "max_skip": 20, "forecast_steps": False}


@pytest.mark.parametrize("spec", [{"threshold": 0.0}, ALL_REFRESHED])
def test_no_forecast_left_is_the_full_model(model, full, spec):
    """threshold 0: every step full; alpha 1: every refresh step recomputes every token (the pruned path)."""
    policy, ran = _run(model, start_step=2, **spec)
    torch.testing.assert_close(ran.images, full.images, atol=1e-5, rtol=1e-5)
    if spec.get("alpha") == 1.0:  # every step after the first full three goes through the engine's pruned path
        assert [v for s, v in sorted(policy.decisions.items()) if s > 3] == [256] * (STEPS - 3)


def test_refresh_steps_compute_floor_alpha_n_tokens_and_save_macs(model, full):
    policy, ran = _run(model, alpha=0.1, threshold=0.3, start_step=2, forecast_steps=False)
    kept = [s.kept for s in ran.trace.steps]
    k = kept_tokens(0.1, 256)
    assert k == 25 and set(kept) == {256, k} and kept[:3] == [256] * 3  # step 3: too short a history to estimate
    assert {s for s, v in policy.decisions.items() if v == k} == set(policy.estimates)
    assert _macs(ran) < _macs(full)
    # the accumulated estimate of every run of refresh steps stays within the threshold
    run = 0.0
    for step in range(1, STEPS + 1):
        run = run + policy.estimates[step] if step in policy.estimates else 0.0
        assert run <= 0.3 + 1e-9


def test_forecast_refresh_and_full_steps_mix_within_the_threshold(model, full):
    """A step forecasts every token where the whole error fits, else refreshes where the rest's fits."""
    policy, ran = _run(model, alpha=0.1, threshold=0.5, start_step=2)
    kept = [s.kept for s in ran.trace.steps]
    assert {0, 25, 256} == set(kept) and _macs(ran) < _macs(full)
    run = 0.0  # each run of forecast and refresh steps stays within the threshold
    for step in range(1, STEPS + 1):
        run = run + policy.estimates[step] if step in policy.estimates else 0.0
        assert run <= 0.5 + 1e-9


def test_refreshed_tokens_are_unique_and_the_least_trustworthy():
    """On a synthetic generation: ⌊αN⌋ unique indices per row, the tokens with the largest forecast-error estimate."""
    spec = {"name": "adaptive_refresh", "alpha": 0.2, "threshold": 1e9, "start_step": 3, "forecast_steps": False}
    policy = selectors.build(spec)
    assert check_policy(policy, grid=(8, 8), num_steps=10) == 7  # steps 4-10 refresh, none reads the host
    policy.reset(1, (4, 4), 8, torch.device("cpu"))
    t = torch.arange(16.0)[:, None]
    for step in (1, 2, 3):  # token i's output is quadratic in the step with curvature i: the estimate ranks by i
        policy.observe(step, (t * step**2).expand(16, 2)[None], None)
    k = policy.num_kept(4, 16)
    assert k == 3 and sorted(policy.chosen[0].tolist()) == [13, 14, 15]


def test_deterministic(model):
    a = _run(model, alpha=0.1, threshold=0.5, start_step=2)[1]
    b = _run(model, alpha=0.1, threshold=0.5, start_step=2)[1]
    assert torch.equal(a.images, b.images) and [s.kept for s in a.trace.steps] == [s.kept for s in b.trace.steps]


@pytest.mark.parametrize(
    "bad, word",
    [
        ({"threshold": -1}, "threshold"),
        ({"max_skip": -1}, "max_skip"),
        ({"alpha": 0}, "alpha"),
        ({"partial": "all"}, "partial"),
    ],
)
def test_bad_settings_name_the_key(bad, word):
    with pytest.raises(ValueError, match=word) as err:
        selectors.build({"name": "adaptive_refresh", **bad})
    assert "\n" not in str(err.value)


def test_start_step_zero_is_refused_before_any_compute():
    with pytest.raises(ValueError, match="start_step"):
        selectors.build({"name": "adaptive_refresh", "start_step": 0}).check(12)


@pytest.mark.parametrize("partial", ["push", "output"])
def test_taylor_partial_output_keeps_full_step_histories(partial):
    """A token computed at a pruned step is used at that step; with partial=output it is not a history node."""
    rule = reuses.build({"name": "taylor", "partial": partial})
    rule.reset(1, 3, 1)
    line = lambda t: torch.tensor([[[t], [2 * t], [3 * t]]])  # noqa: E731  (every token linear in time)
    rule.compose(1, line(1.0), None)
    rule.compose(2, line(2.0), None)
    fresh = line(3.0)
    fresh[0, 0, 0] = 10.0  # token 0 computed at step 3, off the line
    out = rule.compose(3, fresh, torch.tensor([[0]]))
    assert out[0, :, 0].tolist() == [10.0, 6.0, 9.0]
    nxt = rule.compose(4, torch.zeros(1, 3, 1), torch.zeros(1, 0, dtype=torch.long))[0, :, 0].tolist()
    assert nxt == ([18.0, 8.0, 12.0] if partial == "push" else [4.0, 8.0, 12.0])
