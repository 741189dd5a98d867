"""Step caches and per-step budgets through ``python -m catlab.run`` and ``catlab.evaluate``."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FAST, ROOT, run_cli


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_run_with_a_diffusers_step_cache_and_with_a_budget_schedule(tmp_path):
    _, cached = run_cli(
        "selector=full",
        "stepcache=taylorseer",
        "stepcache.start_step=3",
        "stepcache.cache_interval=2",
        *FAST,
        tmp_path=tmp_path / "cache",
    )
    _, budget = run_cli(
        "selector=budget_schedule",
        "reuse=taylor",
        "selector.start_step=3",
        "selector.pattern=[1,0.5,0]",
        *FAST,
        tmp_path=tmp_path / "budget",
    )
    m, b = _metrics(cached), _metrics(budget)
    assert m["stepcache"] == "taylorseer" and 1.3 < m["macs_ratio"] < 2.0
    assert b["selector"] == "budget_schedule" and b["stepcache"] is None and 1.3 < b["macs_ratio"] < 2.5
    assert len(list((cached / "images").glob("*.png"))) == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("selector=random", "stepcache=mag_cache"), "compares block residuals between steps"),
        (
            ("selector=full", "stepcache=mag_cache", "stepcache.num_steps=28"),
            "stepcache.num_steps=28 must equal sampler.num_steps=10",
        ),
        (("selector=full", "stepcache=taylorseer", "+stepcache.interval=3"), "has no config key(s) ['interval']"),
        (
            ("model=tiny_sd3", "model.num_layers=2", "selector=full", "stepcache=first_block_cache"),
            "step cache error: first_block_cache needs at least 2 cacheable blocks",
        ),
    ],
)
@pytest.mark.slow
def test_bad_step_cache_configs_end_with_a_message(tmp_path, overrides, message):
    proc, run_dir = run_cli(*overrides, *FAST, tmp_path=tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "metrics.json").exists()


def test_evaluate_compares_step_caches_with_token_strategies(tmp_path):
    """A cached 'full' is a strategy, not the reference: a plain full model is added first."""
    from hydra import compose, initialize_config_dir

    from catlab.evaluate import run

    overrides = [
        "model=tiny_sd3",
        "model.num_layers=3",
        "model.height=16",
        "model.width=16",
        "sampler.num_steps=6",
        "strategies=[{name:full,stepcache:{name:taylorseer,cache_interval:2,start_step:2}},"
        "{name:budget_schedule,start_step:2,pattern:[1,0.5,0],reuse:taylor}]",
        "batch_size=2",
        "prompts.prompts=[a red circle,a blue square]",
        "metrics=[psnr]",
        f"cache_dir={tmp_path / 'cache'}",
        "diagnostics=false",
        "save_images=false",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    (tmp_path / "out").mkdir()
    rows = {r["method"]: r for r in run(cfg, tmp_path / "out")}
    assert list(rows)[0] == "full" and rows["full"]["macs_ratio"] == pytest.approx(1.0)
    cached = rows["full[stepcache=taylorseer(cache_interval=2,start_step=2)]"]
    budget = next(r for m, r in rows.items() if m.startswith("budget_schedule"))
    assert cached["macs_ratio"] > 1.3 and budget["macs_ratio"] > 1.3
    assert 10 < cached["psnr"] < 100 and 10 < budget["psnr"] < 100  # scored against the plain full model
