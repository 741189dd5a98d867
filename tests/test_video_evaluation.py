"""catlab.evaluate on a video model: per-frame fidelity, temporal error and the video probe as registered
metrics, references and saved samples as videos, a playable video per strategy and in the W&B run."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from catlab.evaluation.reference import ReferenceCache, image_problem
from catlab.loggers.video import comparison_gif, load_gif, save_evaluated
from catlab.metrics.video import frame_psnr, frame_ssim, temporal_error
from catlab.registry import metrics
from tests.test_wandb_runs import _cli, _run


def _videos(seed: int = 0, b: int = 2, f: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(b, f, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_registered_fidelity_metrics_take_videos_frame_by_frame():
    ref = _videos(0)
    noisy = (ref + 0.05 * _videos(1)).clamp(0, 1)
    psnr, ssim = metrics.build({"name": "psnr"}), metrics.build({"name": "ssim"})
    assert torch.allclose(psnr(noisy, ref, [], None), frame_psnr(noisy, ref))
    assert torch.allclose(ssim(noisy, ref, [], None), frame_ssim(noisy, ref))
    # the mean of per-frame PSNRs, not the PSNR of the whole clip: a frame far off does not average away
    worse = noisy.clone()
    worse[:, 0] = 1 - ref[:, 0]
    per_frame = psnr(worse, ref, [], None)
    assert torch.all(per_frame < psnr(noisy, ref, [], None))
    assert psnr(ref, ref, [], None).tolist() == [100.0, 100.0]  # identical videos: the cap


def test_temporal_error_metric_known_answers():
    metric = metrics.build({"name": "temporal_error"})
    assert not metric.higher_is_better
    ref = _videos(0)
    assert torch.allclose(metric((ref + 0.1).clamp(max=5), ref + 0.0, [], None), torch.zeros(2), atol=1e-6)
    flicker = ref.clone()
    flicker[:, 1::2] += 0.2  # every other frame brighter: consecutive differences off by 0.2 everywhere
    assert torch.allclose(metric(flicker, ref, [], None), torch.full((2,), 0.2), atol=1e-5)
    assert torch.allclose(metric(flicker, ref, [], None), temporal_error(flicker, ref))
    assert metric.unavailable({"model": "embedded", "video": False}).startswith("temporal_error: model 'embedded'")
    assert metric.unavailable({"model": "embedded_video", "video": True}) is None
    with pytest.raises(ValueError, match="compares videos"):
        metric(ref[:, 0], ref[:, 0], [], None)


def test_attribute_accuracy_runs_the_video_probe_on_video_prompts():
    from catlab.embedded.video_probe import video_accuracy
    from catlab.embedded.video_world import heldout_clips, render_clips

    clips, _ = heldout_clips(4, seed=3)
    real = render_clips(clips)
    metric = metrics.build({"name": "attribute_accuracy"})
    assert metric.unavailable({"meta": list(clips)}) is None  # nothing to load for the video probe
    got = metric(real, None, [], list(clips))
    assert torch.equal(got, video_accuracy(real, clips))
    assert float(got.mean()) > 0.9  # the rendered clips show what their captions say
    blank = torch.zeros_like(real)
    assert float(metric(blank, None, [], list(clips)).max()) == 0.0


def test_reference_cache_keeps_videos_and_checks_their_shape(tmp_path):
    cache = ReferenceCache(tmp_path, {"name": "v"}, {"num_steps": 2, "guidance_scale": 1.0})
    video = _videos(0)[0]
    cache.put("a clip", 0, video, "b")
    assert torch.equal(cache.get("a clip", 0, "b", tuple(video.shape)), video)
    assert image_problem(video) is None
    assert "not (channels, height, width)" in image_problem(_videos(0))  # a batch is not one reference
    assert cache.get("a clip", 0, "b", (2, 3, 16, 16)) is None  # another frame count: generated again


def test_saved_samples_are_playable_and_read_back(tmp_path):
    video = _videos(0, b=1, f=5)[0]
    gif, png = save_evaluated(video, tmp_path / "s", "p000001_s0")
    with Image.open(gif) as g:
        assert g.n_frames == 5
    assert Image.open(png).size == (5 * 16, 16)  # the frames side by side
    back = load_gif(gif)
    assert back.shape == video.shape and (back - video).abs().mean() < 0.05  # a 256-colour palette
    (image_png,) = save_evaluated(video[0], tmp_path / "i", "p000001_s0")
    assert image_png.suffix == ".png"
    path = comparison_gif({"full": _videos(0), "cat": _videos(1)}, ["one", "two"], tmp_path / "c.gif")
    with Image.open(path) as g:
        assert g.n_frames == 4


@pytest.mark.slow
def test_evaluate_on_a_video_model_writes_videos_per_strategy_and_logs_them(tmp_path):
    out = tmp_path / "eval"
    _cli(
        "catlab.evaluate",
        "model=tiny_wan",
        "sampler.num_steps=4",
        "+strategy_defaults.start_step=2",
        "strategies=[full,{name: cat, alpha: 0.5},"
        "{name: full, stepcache: {name: taylorseer, cache_interval: 2, start_step: 2}}]",
        "batch_size=2",
        "num_prompts=2",
        "seeds=[0]",
        "prompts.prompts=[a red circle,a blue square]",
        "metrics=[psnr,ssim,temporal_error]",
        "save_images=true",
        "frontier=true",
        "threads=1",
        "logger=wandb",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert len(rows) == 3
    for label, row in rows.items():
        if label == "full":
            continue
        assert row["macs_ratio"] > 1.1 and 0 < row["temporal_error"] < 1 and row["psnr"] > 5 and 0 < row["ssim"] < 1
    folders = sorted(p for p in (out / "images").iterdir())
    assert len(folders) == 3
    for folder in folders:  # a playable video per strategy and prompt, beside its frame strip
        gifs = sorted(folder.glob("*.gif"))
        assert len(gifs) == 2 and len(list(folder.glob("*.png"))) == 2
        with Image.open(gifs[0]) as g:
            assert g.n_frames == 5
    with Image.open(out / "comparison.gif") as g:
        assert g.n_frames == 5
    assert "Temporal err." in (out / "results.md").read_text()
    # a chosen few strategies side by side, playing (experiments/video_comparison_gif.py)
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("video_comparison_gif", ROOT / "experiments/video_comparison_gif.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(
        [
            str(out),
            "--strategy",
            "full",
            "--strategy",
            "cat[alpha=0.5]",
            "--prompts",
            "2",
            "--out",
            str(tmp_path / "c.gif"),
        ]
    )
    with Image.open(tmp_path / "c.gif") as g:
        assert g.n_frames == 5
    assert script.prompts_of(out, rows["full"]["key"]) == ["a red circle", "a blue square"]
    _, files = _run(out)
    videos = list((files / "media" / "videos").rglob("*.gif"))
    # one per strategy and sample under samples/, and the playing comparison grid
    assert len([v for v in videos if "samples" in str(v)]) == 3 * 2
    assert any("comparison" in str(v) for v in videos)


def test_set_metrics_skip_a_video_models_frame_strips(tmp_path, caplog):
    from catlab.evaluation.harness import set_metrics
    from catlab.hashing import folder_name
    from catlab.metrics.base import SetMetric

    class Counting(SetMetric):
        name = "counting"

        def compute(self, images, reference):
            raise AssertionError("a set metric must not see frame strips")

    rows = [{"method": "full", "key": "a"}, {"method": "cat", "key": "b"}]
    for row in rows:
        save_evaluated(_videos(0, b=1)[0], tmp_path / folder_name(row["method"], row["key"]), "p000000_s0")
    set_metrics(rows, [Counting()], tmp_path)
    assert "counting" not in rows[1] and "this model makes videos" in caplog.text
