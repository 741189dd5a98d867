"""Reuse rules through the sampler and the run app."""

from __future__ import annotations

import json

import pytest
import torch

from catlab.reuse import reuses
from catlab.sampler import SamplerConfig, sample
from catlab.selection.simple import Random
from tests.conftest import run_cli, tiny_sd3

PROMPTS, SEEDS = ["a red circle", "a blue square"], [0, 1]


def test_copy_is_the_engines_own_reuse_and_taylor_forecasts():
    adapter = tiny_sd3()
    cfg = SamplerConfig(num_steps=8, progress=False)
    plain = sample(adapter, Random(alpha=0.3, start_step=3), PROMPTS, SEEDS, cfg)
    copied = sample(adapter, Random(alpha=0.3, start_step=3), PROMPTS, SEEDS, cfg, reuses.build("copy"))
    assert torch.equal(plain.latents, copied.latents)
    forecast = sample(
        adapter, Random(alpha=0.3, start_step=3), PROMPTS, SEEDS, cfg, reuses.build({"name": "taylor", "order": 1})
    )
    assert not torch.allclose(forecast.latents, plain.latents, atol=1e-4)
    assert [s.macs for s in forecast.trace.steps] == [s.macs for s in plain.trace.steps]  # same cost


@pytest.mark.slow
def test_reuse_is_a_config_group_of_the_run_app(tmp_path):
    _, run_dir = run_cli(
        "model=tiny_sd3",
        "selector=random",
        "selector.start_step=2",
        "reuse=taylor",
        "sampler.num_steps=6",
        "sampler.progress=false",
        "logger=local",
        tmp_path=tmp_path,
    )
    assert "reuse:\n  name: taylor" in (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / "metrics.json").read_text())["macs_ratio"] > 1.2


# -- kv: a reuse rule for the unselected tokens' keys and values, from a config -----------------------
def _resolved(spec, **groups):
    from omegaconf import OmegaConf

    from catlab.strategy import resolve_strategy

    return resolve_strategy(spec, OmegaConf.create({"reuse": None, "stepcache": None, "kv": None, **groups}))


def test_kv_from_a_strategy_spec_is_what_the_python_api_runs():
    """``{kv: taylor}`` in a spec builds the same StepReuse a user would build by hand: equal images,
    different from the stale cached K/V, at the same MACs."""
    from catlab.assembly import StepReuse

    adapter, cfg = tiny_sd3(), SamplerConfig(num_steps=8, progress=False)
    spec = {"name": "random", "alpha": 0.3, "start_step": 3, "reuse": "taylor"}
    policy, parts = _resolved({**spec, "kv": "taylor"}).build(cfg)
    assert parts.kv.name == "taylor" and parts.rule.name == "taylor" and parts.step_cache is None
    from_spec = sample(adapter, policy, PROMPTS, SEEDS, cfg, parts)
    by_hand = sample(
        adapter,
        Random(alpha=0.3, start_step=3),
        PROMPTS,
        SEEDS,
        cfg,
        StepReuse(rule=reuses.build("taylor"), kv=reuses.build("taylor")),
    )
    assert torch.equal(from_spec.latents, by_hand.latents)
    policy, parts = _resolved(spec).build(cfg)
    stale = sample(adapter, policy, PROMPTS, SEEDS, cfg, parts)
    assert not torch.allclose(stale.latents, from_spec.latents, atol=1e-4)
    assert [s.macs for s in stale.trace.steps] == [s.macs for s in from_spec.trace.steps]


def test_kv_keys_a_strategy_and_copy_or_none_keeps_the_old_key():
    spec = {"name": "cat", "alpha": 0.3}
    plain = _resolved(spec)
    assert _resolved({**spec, "kv": "copy"}).key({}) == plain.key({}) == _resolved(spec, kv="copy").key({})
    with_kv = _resolved({**spec, "kv": "taylor"})
    assert with_kv.key({}) != plain.key({}) and with_kv.label == "cat[kv=taylor]"
    assert _resolved(spec, kv="taylor").key({}) == with_kv.key({})  # the top-level kv= reaches every strategy


def test_kv_without_pruning_is_refused_in_one_line():
    from catlab.builders import ConfigError, assemble

    cfg = SamplerConfig(num_steps=8)
    policy, parts = _resolved({"name": "full", "kv": "taylor"}).build(cfg)
    with pytest.raises(ConfigError, match=r"selector 'full' computes every token: drop kv="):
        assemble(tiny_sd3().transformer, policy, parts, cfg)
