"""The evaluation harness: known-answer metrics, reproducible reruns, skipped metrics, the table."""

from __future__ import annotations

import json
import math

import pytest
import torch

from catlab.metrics import psnr, ssim
from tests.conftest import ROOT


def test_psnr_known_answers():
    a = torch.zeros(1, 3, 8, 8)
    b = torch.full((1, 3, 8, 8), 0.1)
    assert psnr(a, b).item() == pytest.approx(20.0, abs=1e-4)  # 10·log10(1 / 0.01)
    assert math.isinf(psnr(a, a).item())


def test_ssim_known_answers():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    assert ssim(x, 1 - x).max() < 0  # anti-correlated images
    noisy = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert 0.5 < ssim(x, noisy).min() < 1


def _evaluate(out, cache):
    from hydra import compose, initialize_config_dir

    from catlab.evaluate import run

    overrides = [
        "model=tiny_sd3",
        "model.num_layers=1",
        "model.height=16",
        "model.width=16",
        "sampler.num_steps=5",
        "+strategy_defaults.start_step=2",
        "strategies=[full,random]",
        "batch_size=2",
        "prompts.prompts=[a red circle,a blue square,a green star]",
        "metrics=[psnr,ssim,clip_score]",
        f"cache_dir={cache}",
        "diagnostics=true",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    out.mkdir(parents=True)
    return run(cfg, out)


def test_rerun_with_the_same_seed_gives_the_same_images_and_figures(tmp_path, caplog):
    rows1 = _evaluate(tmp_path / "a", tmp_path / "cache")
    rows2 = _evaluate(tmp_path / "b", tmp_path / "cache2")
    for r1, r2 in zip(rows1, rows2):
        assert (r1["method"], r1.get("psnr"), r1.get("ssim"), r1["macs_per_image"]) == (
            r2["method"],
            r2.get("psnr"),
            r2.get("ssim"),
            r2["macs_per_image"],
        )
    for image in sorted((tmp_path / "a" / "images").rglob("*.png")):
        twin = tmp_path / "b" / image.relative_to(tmp_path / "a")
        assert image.read_bytes() == twin.read_bytes()
    # CLIP weights are absent here: the metric is skipped with a one-line notice, not a crash
    assert any("skipped metric — clip_score" in r.message for r in caplog.records)
    # the table, the plot and the diagnostics are written
    table = (tmp_path / "a" / "results.md").read_text()
    assert table.splitlines()[0] == "### 3 prompts × 1 seed, 5 steps, CFG 7"  # what ran, counted
    assert table.splitlines()[2].startswith("| Method | α | Steps | MACs | MACs ratio | s / image | Speed-up")
    assert "| full | 1.00 | 5 |" in table and "| random | 0.30 | 5 |" in table
    for name in ("cost_quality.png", "results.csv", "diagnostics/selection_maps.png", "comparison.png"):
        assert (tmp_path / "a" / name).exists()
    from PIL import Image

    with Image.open(tmp_path / "a" / "comparison.png") as grid:  # 2 prompts of the warm-up batch × 2 strategies
        assert grid.width > 2 * 150 and grid.height > 2 * 150
    rows = json.loads((tmp_path / "a" / "results.json").read_text())
    assert rows[0]["macs_ratio"] == pytest.approx(1.0) and rows[1]["macs_ratio"] > 1.2
    assert 10 < rows[1]["psnr"] < 100


def test_reference_images_are_cached_and_reused(tmp_path):
    _evaluate(tmp_path / "a", tmp_path / "cache")
    cached = sorted((tmp_path / "cache" / "references").rglob("*.pt"))
    assert len(cached) == 3  # one per (prompt, seed)
    stamps = [p.stat().st_mtime_ns for p in cached]
    _evaluate(tmp_path / "b", tmp_path / "cache")
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # reused, not rewritten


def test_pareto_front_and_method_families():
    from catlab.evaluation.report import family, pareto_front

    pts = [(1.5, 40.0), (1.9, 38.0), (1.9, 36.0), (2.0, 39.0), (2.5, 30.0), (1.2, 39.5)]
    assert pareto_front(pts) == [(1.5, 40.0), (2.0, 39.0), (2.5, 30.0)]
    assert family({"name": "full"}) == "full"
    assert family({"name": "full", "stepcache": {"name": "mag_cache"}}) == "mag_cache"
    assert family({"name": "cat", "stepcache": "taylorseer"}) == "token pruning + taylorseer"
    assert family({"name": "budget_schedule", "reuse": "taylor"}) == "budget schedule"
    assert family({"name": "cat", "reuse": "taylor"}) == "token pruning, every step"


def test_titles_say_what_ran_not_what_the_config_text_said():
    from catlab.evaluation.report import settings_title

    assert settings_title("Embedded model, held-out prompts", 4, 1, 28, 7.0) == (
        "Embedded model, held-out prompts: 4 prompts × 1 seed, 28 steps, CFG 7"
    )
    assert settings_title("", 1, 2, 50, 4.5) == "1 prompt × 2 seeds, 50 steps, CFG 4.5"


def test_speedup_cells_carry_their_spread_across_batches():
    from catlab.evaluation.report import markdown_table

    rows = [
        {"method": "full", "alpha": 1.0, "steps": 4, "macs_per_image": 1e9, "speedup": 1.0},
        {
            "method": "cat",
            "alpha": 0.3,
            "steps": 4,
            "macs_per_image": 5e8,
            "macs_ratio": 2.0,
            "speedup": 2.35,
            "speedup_min": 2.1,
            "speedup_max": 2.61,
            "speedup_batches": 5,
        },  # fmt: skip
    ]
    table = markdown_table(rows)
    assert "| 2.35× (2.10–2.61) |" in table and "| 1.00× |" in table
    assert "lowest and highest ratio of a single batch" in table
    rows[1]["speedup_batches"] = 1  # one batch: no spread to show
    assert "(2.10–2.61)" not in markdown_table(rows)


def test_a_clock_says_when_the_wall_clock_is_not_to_be_trusted():
    from catlab.evaluation.clock import Clock

    quiet = Clock(1, cores=2, load_before=0.3, load_after=0.5, wall=10.0, cpu_seconds=9.5)
    assert quiet.note() is None
    busier = Clock(1, cores=2, load_before=0.3, load_after=2.5, wall=10.0, cpu_seconds=9.5)
    assert "load average went from 0.3 to 2.5 on 2 cores" in busier.note()
    starved = Clock(1, cores=2, load_before=1.0, load_after=1.2, wall=10.0, cpu_seconds=4.0)
    assert "got 40% of its 1 thread(s)' time" in starved.note()
    assert Clock(1, cpu=False, cores=2, load_before=1.0, load_after=1.2, wall=10.0, cpu_seconds=4.0).note() is None
    measured = Clock(1).start()
    sum(i * i for i in range(20000))
    assert measured.stop().wall > 0 and measured.cpu_seconds >= 0 and measured.load_after is not None


def test_grids_are_readable_and_captioned_with_prompts():
    from catlab.loggers.grids import CELL, captioned_grid, comparison_grid

    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=g)
    grid = captioned_grid(images, ["a red circle", "a blue square", "a green star", "a small yellow triangle"])
    assert grid.width >= 2 * CELL and grid.height >= 2 * CELL  # 32-pixel images enlarged, not a 64-pixel smudge
    import numpy as np

    assert (np.asarray(grid.crop((0, CELL + 6, grid.width, CELL + 40)).convert("L")) < 128).any()  # captions
    columns = {"full": images[:3], "cat": images[1:4], "random[seed=1]": images[:3]}
    table = comparison_grid(columns, ["a red circle", "a blue square", "a green star"])
    assert table.width > 3 * CELL and 3 * CELL < table.height < 4 * CELL + 200
