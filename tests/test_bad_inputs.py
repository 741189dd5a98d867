"""Bad input through the command line: one line naming what is wrong, before compute, and no empty run left behind."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import FAST, run_cli

CASES = [
    ("empty prompts file", ["prompts=file", "prompts.path={blank}"], "holds no prompts"),
    ("no clusters", ["clusterer.num_clusters=0"], "num_clusters must be >= 1; got 0"),
    ("negative clusters", ["clusterer.num_clusters=-5"], "num_clusters must be >= 1; got -5"),
    ("no images", ["num_images=0"], "num_images must be >= 1 or null"),
    ("in-step atedm with a reuse rule", ["selector=atedm", "reuse=taylor"], "prunes inside each step"),
]


@pytest.mark.slow
@pytest.mark.parametrize("what, overrides, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_no_run_directory(tmp_path, what, overrides, message):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n# only a comment\n")
    proc, run_dir = run_cli(*FAST, *[o.format(blank=blank) for o in overrides], tmp_path=tmp_path, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("catlab: config error:") and message in last
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_a_model_the_selector_cannot_prune_is_one_line_and_leaves_nothing(tmp_path):
    """In-step AT-EDM on PixArt is refused once the model is built, before compute and before a W&B run starts:
    one line, and no run folder."""
    proc, run_dir = run_cli(
        "sampler.num_steps=10",
        "sampler.progress=false",
        "logger=wandb",
        "model=tiny_pixart",
        "selector=atedm",
        tmp_path=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("catlab: config error: selector atedm prunes inside") and "use selector=atedm_reuse" in last
    assert not run_dir.exists()


@pytest.mark.slow
def test_a_failed_sweep_job_is_marked_failed(tmp_path):
    proc, _ = run_cli("-m", *FAST, "clusterer.num_clusters=0", tmp_path=tmp_path, check=False)
    assert proc.returncode != 0 and "1 of 1 sweep jobs failed" in proc.stderr
    failed = json.loads((tmp_path / "sweep" / "0" / "failed.json").read_text())
    assert "num_clusters must be >= 1" in failed["error"]


def test_half_precision_embedded_model_runs_on_a_cpu():
    """model.dtype=float16 / bfloat16 used to fail inside diffusers' patch embedding: the whole bundle is cast now."""
    from catlab.models.embedded import Embedded
    from catlab.registry import selectors
    from catlab.sampler import SamplerConfig, sample

    cfg = SamplerConfig(num_steps=4, progress=False)
    full = sample(Embedded(), selectors.build({"name": "cat", "start_step": 2}), ["a red circle"], [0], cfg).images
    for dtype in ("float16", "bfloat16"):
        adapter = Embedded(dtype=dtype)
        assert {p.dtype for p in adapter.transformer.parameters()} == {getattr(torch, dtype)}
        half = sample(adapter, selectors.build({"name": "cat", "start_step": 2}), ["a red circle"], [0], cfg).images
        assert torch.isfinite(half.float()).all() and (half.float() - full).abs().mean() < 0.1


def test_clusters_say_when_the_count_is_not_the_configured_one(caplog):
    from catlab.registry import clusterers

    with caplog.at_level("INFO", logger="catlab"):
        assert clusterers.build({"name": "kmeans", "num_clusters": 5, "per_tokens": 4096}).count(256) == 2
        assert clusterers.build({"name": "kmeans", "num_clusters": 5}).count(256) == 5  # per_tokens=0: exact
    assert "2 clusters for 256 tokens" in caplog.text and "per_tokens=0" in caplog.text


@pytest.mark.slow
def test_a_sweep_goes_on_past_a_failed_job_and_summarises_every_job(tmp_path):
    proc, _ = run_cli(
        "-m",
        *FAST,
        "sampler.num_steps=3",
        "selector.start_step=1",
        "num_images=1",
        "clusterer.num_clusters=0,20",
        tmp_path=tmp_path,
        check=False,
    )
    assert proc.returncode != 0 and "1 of 2 sweep jobs failed" in proc.stderr
    rows = (tmp_path / "sweep" / "summary.md").read_text().splitlines()[4:]
    assert "clusterer.num_clusters=0" in rows[0] and "failed: catlab: config error" in rows[0]
    assert "clusterer.num_clusters=20" in rows[1] and "| done |" in rows[1]
    assert (tmp_path / "sweep" / "1" / "metrics.json").exists()
