"""One token budget for every selector: k = ⌊α·N⌋ (at least one), so tables compare like with like."""

from __future__ import annotations

import math

import pytest

from catlab.capabilities import Capability
from catlab.registry import selectors
from catlab.selection import kept_tokens
from catlab.testing import simulate

# α·N with a fractional part of at least one half, where round() and ⌊⌋ part ways
CASES = [(0.3, (16, 16)), (0.2, (8, 8)), (0.45, (5, 7))]


def floor_k(alpha: float, n: int) -> int:
    return max(1, math.floor(alpha * n))


def test_cases_separate_floor_from_round():
    for alpha, (h, w) in CASES:
        assert floor_k(alpha, h * w) == kept_tokens(alpha, h * w) == round(alpha * h * w) - 1


def test_kept_tokens_edges():
    assert kept_tokens(0.3, 4096) == 1228  # the authors' int(0.3 * 4096)
    assert kept_tokens(1e-6, 100) == 1 and kept_tokens(1.0, 100) == 100 and kept_tokens(0.999, 3) == 2


def _spec(name: str, alpha: float) -> dict:
    if name == "budget_schedule":  # its α is the pattern's mean: one pruned share, every pruned step
        return {"name": name, "pattern": [alpha], "start_step": 2, "inner": "random"}
    if name == "adaptive_refresh":  # random outputs forecast badly: a threshold that lets every step refresh
        return {"name": name, "alpha": alpha, "start_step": 2, "threshold": 1e9, "forecast_steps": False}
    return {"name": name, "alpha": alpha, "start_step": 2}


@pytest.mark.parametrize("name", selectors.builtin_names())
@pytest.mark.parametrize("alpha, grid", CASES)
def test_every_selector_keeps_floor_alpha_n(name, alpha, grid):
    policy = selectors.build(_spec(name, alpha))
    n = grid[0] * grid[1]
    if name == "atedm":  # prunes inside the forward: its plan is what the engine keeps (run below on a model)
        assert policy.plan(6, n)[policy.prune_layers[-1]] == floor_k(alpha, n)
        return
    picked = [idx for idx in simulate(policy, grid, num_steps=6) if idx is not None]
    if Capability.LAYER_SELECTION in policy.capabilities:  # fresh tokens per layer and module, inside the forward
        assert picked == []  # each module's k = int(ratio·N): tests/test_toca.py
        return
    if name == "full":
        assert picked == [] and not policy.prunes
        return
    if name == "adaptive_schedule":  # full or forecast-only steps: it never computes a share of the tokens
        assert picked == []
        return
    if name == "adaptive_refresh":  # step 3 is full (two computations cannot estimate a forecast's error)
        assert len(picked) == 3 and {int(idx.shape[1]) for idx in picked} == {floor_k(alpha, n)}
        return
    if name == "speca":  # full, forecast-only and verifying steps: the verifying ones compute ⌊α·N⌋ tokens
        assert picked and {int(idx.shape[1]) for idx in picked} == {floor_k(alpha, n)}
        return
    assert len(picked) == 4, f"{name}: steps 3-6 are pruned"
    assert {int(idx.shape[1]) for idx in picked} == {floor_k(alpha, n)}, name


def test_atedm_engine_keeps_floor_alpha_n_after_its_last_layer():
    from catlab.sampler import SamplerConfig, sample
    from tests.conftest import tiny_sd3

    a = tiny_sd3()  # 8×8 = 64 image tokens; 0.2·64 = 12.8
    seen: list[int] = []
    last = a.transformer.transformer_blocks[-1]
    handle = last.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("hidden_states", args[0] if args else None).shape[1]),
        with_kwargs=True,
    )
    try:
        policy = selectors.build(
            {"name": "atedm", "alpha": 0.2, "start_step": 2, "dsap_steps": 0, "prune_layers": [0, 1]}
        )
        sample(a, policy, ["a"], [0], SamplerConfig(num_steps=4, progress=False))
    finally:
        handle.remove()
    assert seen == [64, 64, 12, 12]


def test_equal_budget_means_equal_macs():
    """Every every-step selector spends the same MACs at one α: nobody gets a token more."""
    from catlab.sampler import SamplerConfig, sample
    from tests.conftest import tiny_sd3

    a = tiny_sd3()
    cfg = SamplerConfig(num_steps=5, progress=False, count_macs=True)
    runs = {}
    for name in ("cat", "cat_reference", "cat_rankmix", "random", "sequential", "noise", "noise_staleness"):
        policy = selectors.build({"name": name, "alpha": 0.2, "start_step": 2})
        steps = sample(a, policy, ["a"], [0], cfg).trace.steps
        runs[name] = (tuple(s.kept for s in steps), sum(s.macs for s in steps))  # the forward's MACs
    assert len(set(runs.values())) == 1, runs
    assert next(iter(runs.values()))[0][2:] == (12, 12, 12)
