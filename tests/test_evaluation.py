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
    assert table.splitlines()[0].startswith("| Method | α | Steps | MACs | MACs ratio | s / image | Speed-up")
    assert "| full | 1.00 | 5 |" in table and "| random | 0.30 | 5 |" in table
    for name in ("cost_quality.png", "results.csv", "diagnostics/selection_maps.png"):
        assert (tmp_path / "a" / name).exists()
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
