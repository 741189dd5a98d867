"""Reuse rules: copy keeps stale values; taylor is exact on polynomials of its order, with irregular refreshes."""

from __future__ import annotations

import pytest
import torch

from catlab.pruning.families import patchify
from catlab.reuse import Copy, Taylor, reuses, unpatchify

B, N, C = 2, 12, 3


def _run(rule, signal, schedule, times=None):
    """Drive ``rule`` over steps 1..len(schedule); ``schedule[s]`` = indices (B, k) or None; return outputs."""
    rule.reset(B, N, C)
    stale = None
    outs = []
    for s, idx in enumerate(schedule, start=1):
        fresh = signal(s if times is None else times[s - 1])
        if idx is None:
            stale = fresh.clone()
        else:  # what the engine hands over: fresh at idx, stale copies elsewhere
            index = idx[..., None].expand(-1, -1, C)
            stale = stale.scatter(1, index, fresh.gather(1, index))
        outs.append(rule.compose(s, stale, idx, time=None if times is None else times[s - 1]))
    return outs


def _irregular_schedule(steps=14, warm=3, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [None] * warm + [
        torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B)]) for _ in range(steps - warm)
    ]


def _poly(order):
    g = torch.Generator().manual_seed(1)
    coef = [torch.randn(B, N, C, generator=g, dtype=torch.float64) for _ in range(order + 1)]
    return lambda t: sum(c * float(t) ** i for i, c in enumerate(coef))


@pytest.mark.parametrize("order", [1, 2])
def test_taylor_is_exact_on_polynomials_of_its_order(order):
    signal = _poly(order)
    schedule = _irregular_schedule()
    rule = Taylor(order=order)
    outs = _run(rule, lambda t: signal(t).float(), schedule)
    for s, out in enumerate(outs, start=1):
        torch.testing.assert_close(out, signal(s).float(), rtol=1e-4, atol=1e-4)


def test_taylor_order1_is_not_exact_on_a_quadratic_but_order2_is():
    signal = _poly(2)
    schedule = _irregular_schedule()
    err1 = (
        (_run(Taylor(order=1), lambda t: signal(t).float(), schedule)[-1] - signal(len(schedule)).float()).abs().max()
    )
    err2 = (
        (_run(Taylor(order=2), lambda t: signal(t).float(), schedule)[-1] - signal(len(schedule)).float()).abs().max()
    )
    assert err1 > 1e-2 and err2 < 1e-3


def test_taylor_uses_the_given_time_variable():
    times = [1.0 - 0.07 * s**1.3 for s in range(14)]  # an irregular sigma-like schedule
    signal = _poly(1)
    outs = _run(Taylor(order=1), lambda t: signal(t).float(), _irregular_schedule(), times=times)
    torch.testing.assert_close(outs[-1], signal(times[-1]).float(), rtol=1e-4, atol=1e-4)


def test_copy_reproduces_the_stale_values():
    signal = _poly(1)
    schedule = _irregular_schedule()
    outs = _run(Copy(), lambda t: signal(t).float(), schedule)
    last_seen = torch.zeros(B, N, dtype=torch.long)
    for s, idx in enumerate(schedule, start=1):
        if idx is None:
            last_seen[:] = s
        else:
            last_seen.scatter_(1, idx, s)
        expected = torch.stack(
            [torch.stack([signal(int(last_seen[b, n]))[b, n] for n in range(N)]) for b in range(B)]
        ).float()
        torch.testing.assert_close(outs[s - 1], expected)


def test_fresh_tokens_pass_through_and_skipped_steps_forecast_everything():
    signal = _poly(1)
    rule = Taylor(order=1)
    schedule = [None, None, torch.zeros(B, 0, dtype=torch.long), torch.zeros(B, 0, dtype=torch.long)]
    outs = _run(rule, lambda t: signal(t).float(), schedule)
    torch.testing.assert_close(outs[-1], signal(4).float(), rtol=1e-4, atol=1e-4)


def test_max_horizon_holds_the_forecast():
    signal = _poly(1)
    schedule = [None, None] + [torch.zeros(B, 0, dtype=torch.long)] * 4
    out = _run(Taylor(order=1, max_horizon=1.0), lambda t: signal(t).float(), schedule)[-1]
    torch.testing.assert_close(out, signal(3).float(), rtol=1e-4, atol=1e-4)


def test_registry_and_unpatchify_roundtrip():
    assert {"copy", "taylor"} <= set(reuses.names())
    assert reuses.build({"name": "taylor", "order": 2}).order == 2
    x = torch.randn(2, 3, 8, 12)
    torch.testing.assert_close(unpatchify(patchify(x, 2), 2, 8, 12), x)


def test_kv_reuse_with_copy_is_the_engine_and_detaches():
    from catlab.registry import selectors
    from tests.conftest import generate, tiny_sd3

    model = tiny_sd3()
    policy = selectors.build({"name": "random", "alpha": 0.4, "start_step": 2})
    kw = dict(num_steps=5, reuse=Copy())
    plain = generate(model, policy, ["a red square"], [0], **kw)
    with_kv = generate(model, policy, ["a red square"], [0], kv_reuse=Copy(), **kw)
    forecast = generate(model, policy, ["a red square"], [0], kv_reuse=Taylor(order=1), **kw)
    torch.testing.assert_close(with_kv.images, plain.images, rtol=1e-5, atol=1e-6)
    assert not torch.equal(forecast.images, plain.images)
    assert with_kv.macs == plain.macs == forecast.macs


def test_forecast_error_picks_the_curved_tokens():
    from catlab.registry import selectors
    from catlab.selection.base import StepState

    policy = selectors.build({"name": "forecast_error", "alpha": 0.25, "start_step": 3})
    policy.reset(1, (2, 4), 6, torch.device("cpu"))
    slope = torch.randn(1, 8, 3)
    curve = torch.zeros(1, 8, 3)
    curve[:, [1, 4]] = 1.0
    for s in (1, 2, 3):
        policy.observe(s, slope * s + curve * s * s, None)
    idx = policy.select(StepState(step=4, num_steps=6, grid=(2, 4), batch_size=1, k=2))
    assert sorted(idx[0].tolist()) == [1, 4]
