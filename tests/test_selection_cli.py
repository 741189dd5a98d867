"""The selection config groups compose with the run app, and CAT runs from the command line."""

import json
import os
import sys
from pathlib import Path

import pytest

import catlab  # noqa: F401  (registers the built-in components)
from catlab.registry import REGISTRIES, selectors
from catlab.sampler import SamplerConfig
from tests.conftest import run_python

ROOT = Path(__file__).resolve().parents[1]

PARTS = {kind: REGISTRIES[kind].builtin_names() for kind in ("clusterer", "pooling", "staleness", "scorer")}


def _prepare(*overrides):
    from hydra import compose, initialize_config_dir

    from catlab.run import prepare

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return prepare(compose(config_name="config", overrides=list(overrides)))[1]


@pytest.mark.parametrize("name", selectors.builtin_names())
def test_every_selector_config_builds(name):
    policy = _prepare(f"selector={name}")
    assert policy.name == name
    own = {"ras": 4, "speca": 3, "clusca": 3, "toca": 1, "duca": 1}  # the authors' own warm-ups (their scripts')
    own["adaptive_refresh"] = 3  # short by design: built for 4x-5x, where an 8-step warm-up is out of reach
    assert policy.start_step == own.get(name, 8 if policy.prunes else 0)  # the paper's t0 = 8 of 28


@pytest.mark.parametrize("kind, name", [(k, n) for k, names in PARTS.items() for n in names])
def test_every_part_config_reaches_cat(kind, name):
    policy = _prepare("selector=cat", f"{kind}={name}")
    assert getattr(policy, kind).registered_name == name


@pytest.mark.slow
def test_cat_runs_from_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "catlab.run",
        "selector=cat",
        "clusterer=spectral",
        "selector.start_step=2",
        "sampler.num_steps=5",
        "sampler.progress=false",
        "num_images=1",
        "batch_size=1",
        "logger=local",
        "save_images=false",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = run_python(cmd, env=env, cwd=ROOT, clean=(run_dir,))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["selector"] == "cat" and metrics["pruned_steps"] == 3 and metrics["macs_ratio"] > 1.0


def test_cat_rankmix_keeps_its_own_parts_against_the_top_level_groups():
    from catlab.strategy import resolve_strategy

    groups = {
        "clusterer": {"name": "kmeans_sklearn"},
        "pooling": {"name": "channel_max"},
        "staleness": {"name": "ewma"},
        "scorer": {"name": "relative_noise"},
    }
    assert resolve_strategy("cat_rankmix", groups).parts == {}
    assert resolve_strategy("cat", groups).parts == groups
    policy, _ = resolve_strategy({"name": "cat_rankmix", "alpha": 0.3}, groups).build(SamplerConfig(num_steps=10))
    assert policy.pooling.registered_name == "graph" and policy.staleness.ties == "random"
    assert policy.clusterer.registered_name == "kmeans" and policy.clusterer.per_tokens == 4096
