"""``frontier=true`` on any strategy list, and the committed frontier sweep, through catlab.evaluate."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _evaluate(out, cache, overrides):
    from hydra import compose, initialize_config_dir

    from catlab.evaluate import run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[*overrides, f"cache_dir={cache}"])
    out.mkdir(parents=True)
    return run(cfg, out)


def test_frontier_true_writes_the_front_for_any_strategy_list(tmp_path):
    strategies = (
        "strategies=[full,{name:random,alpha:0.5},{name:random,alpha:0.25},"
        "{name:full,stepcache:{name:taylorseer,cache_interval:2,start_step:2}},"
        "{name:budget_schedule,pattern:[1,0],reuse:taylor},"
        "{name:adaptive_schedule,threshold:10.0,max_skip:2,reuse:taylor}]"
    )
    _evaluate(
        tmp_path / "run",
        tmp_path / "cache",
        [
            "model=tiny_sd3",
            "model.num_layers=1",
            "model.height=16",
            "model.width=16",
            "sampler.num_steps=6",
            "sampler.progress=false",
            "+strategy_defaults.start_step=2",
            strategies,
            "batch_size=2",
            "prompts.prompts=[a red circle,a blue square]",
            "metrics=[psnr,ssim]",
            "diagnostics=false",
            "save_images=false",
            "warmup=false",
            "frontier=true",
        ],
    )
    md = (tmp_path / "run" / "frontier.md").read_text()
    for family in ("random", "TaylorSeer", "budget_schedule + taylor", "adaptive_schedule + taylor"):
        assert f"| {family} |" in md
    assert "#### Best by PSNR (dB)" in md and "#### Best by SSIM" in md
    for name in ("frontier.csv", "frontier_psnr.png", "frontier_ssim.png", "results.md"):
        assert (tmp_path / "run" / name).exists()


def test_frontier_is_off_by_default(tmp_path):
    _evaluate(
        tmp_path / "run",
        tmp_path / "cache",
        [
            "model=tiny_sd3",
            "model.num_layers=1",
            "model.height=16",
            "model.width=16",
            "sampler.num_steps=4",
            "sampler.progress=false",
            "+strategy_defaults.start_step=2",
            "strategies=[full,random]",
            "batch_size=1",
            "prompts.prompts=[a red circle]",
            "metrics=[psnr]",
            "diagnostics=false",
            "save_images=false",
            "warmup=false",
        ],
    )
    assert (tmp_path / "run" / "results.md").exists() and not (tmp_path / "run" / "frontier.md").exists()


@pytest.mark.slow
def test_the_committed_frontier_sweep_runs_every_row(tmp_path):
    """experiment=embedded_frontier as committed, on one prompt at 14 steps (its rows' warm-ups reach t0 = 12)."""
    rows = _evaluate(
        tmp_path / "run",
        tmp_path / "cache",
        [
            "experiment=embedded_frontier",
            "num_prompts=1",
            "batch_size=1",
            "sampler.num_steps=14",
            "sampler.progress=false",
            "metrics=[psnr]",
            "retime_batches=0",
        ],
    )
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["experiment=embedded_frontier"])
    assert len(rows) == len(cfg.strategies)
    assert all(r["macs_ratio"] >= 1.0 for r in rows)
    md = (tmp_path / "run" / "frontier.md").read_text()
    assert "| adaptive_schedule + taylor |" in md and "| MagCache |" in md
