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
    forecast = sample(adapter, Random(alpha=0.3, start_step=3), PROMPTS, SEEDS, cfg,
                      reuses.build({"name": "taylor", "order": 1}))
    assert not torch.allclose(forecast.latents, plain.latents, atol=1e-4)
    assert [s.macs for s in forecast.trace.steps] == [s.macs for s in plain.trace.steps]  # same cost


@pytest.mark.slow
def test_reuse_is_a_config_group_of_the_run_app(tmp_path):
    _, run_dir = run_cli("model=tiny_sd3", "selector=random", "selector.start_step=2", "reuse=taylor",
                         "sampler.num_steps=6", "sampler.progress=false", "logger=local", tmp_path=tmp_path)
    assert "reuse:\n  name: taylor" in (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / "metrics.json").read_text())["macs_ratio"] > 1.2
