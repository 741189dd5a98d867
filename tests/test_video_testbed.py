"""The embedded video testbed: its world, probe, metrics, video files and model adapter."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from catlab.embedded.video_probe import attribute_table, probe_hits
from catlab.embedded.video_world import (
    FRAMES,
    MOTION_VECTORS,
    MOTIONS,
    SIZE,
    clip_batch,
    heldout_clips,
    render_clips,
)
from catlab.embedded.world import COLOUR_RGB, COLOURS, SHAPES, SIZES
from catlab.loggers.video import save_gif, save_sample
from catlab.metrics.video import frame_psnr, frame_ssim, temporal_error, video_metrics
from tests.conftest import ROOT, run_cli

BUNDLE = ROOT / "catlab" / "embedded" / "video_bundle"


def frames_first(videos: torch.Tensor) -> torch.Tensor:
    return videos.transpose(1, 2)  # Wan's (B, 3, F, H, W) -> (B, F, 3, H, W)


# -- the world -------------------------------------------------------------------------------------


def test_world_is_deterministic_and_batches_differ():
    a, b = clip_batch(3, 7, 5), clip_batch(3, 7, 5)
    assert a == b
    assert torch.equal(render_clips(a), render_clips(b))
    assert clip_batch(3, 8, 5) != a and clip_batch(4, 7, 5) != a
    clips, captions = heldout_clips(16)
    assert heldout_clips(16) == (clips, captions)
    train = {c.caption for i in range(4) for c in clip_batch(0, i, 16)}
    assert render_clips(clips).shape == (16, 3, FRAMES, SIZE, SIZE)
    assert len(set(captions)) > 8 and train  # varied captions, and both streams produce clips


def test_captions_state_attributes_and_motion_the_pixels_show():
    """Each object's phrase names its size, colour, shape and motion; its exact-colour pixels move that way."""
    clips, captions = heldout_clips(40)
    videos = render_clips(clips)  # (B, 3, F, S, S)
    checked = set()
    for clip, caption, video in zip(clips, captions, videos):
        phrases = caption.split(" and a ")
        assert len(phrases) == len(clip.objects)
        assert len({o.colour for o in clip.objects}) == len(clip.objects)  # colours tell objects apart
        for o, phrase in zip(clip.objects, phrases):
            words = phrase.removeprefix("a ").split()
            assert words[:3] == [SIZES[o.size], COLOURS[o.colour], SHAPES[o.shape]]
            assert " ".join(words[3:]) == (
                "staying still" if MOTIONS[o.motion] == "still" else f"moving {MOTIONS[o.motion]}"
            )
            mask = ((video - COLOUR_RGB[o.colour][:, None, None, None]).abs().amax(0) < 0.02).float()  # (F, S, S)
            assert (mask.sum((1, 2)) > 10).all(), "the object is fully visible in every frame"
            xs = torch.arange(SIZE, dtype=torch.float32)
            cx = (mask.sum(1) * xs).sum(1) / mask.sum((1, 2))
            cy = (mask.sum(2) * xs).sum(1) / mask.sum((1, 2))
            dx, dy = float(cx[-1] - cx[0]), float(cy[-1] - cy[0])
            vx, vy = MOTION_VECTORS[o.motion]
            assert dx * vx > 4 or dy * vy > 4 or (vx, vy) == (0.0, 0.0)
            if (vx, vy) == (0.0, 0.0):
                assert abs(dx) < 0.5 and abs(dy) < 0.5
            checked.add(o.motion)
    assert checked == set(range(len(MOTIONS)))


# -- the probe -------------------------------------------------------------------------------------


def test_probe_reads_real_clips():
    clips, _ = heldout_clips(64)
    table = attribute_table(frames_first(render_clips(clips)), clips)
    assert table["present"] == 1.0 and table["motion"] == 1.0
    assert table["shape"] >= 0.97 and table["size"] >= 0.97 and table["accuracy"] >= 0.98


def test_probe_refuses_wrong_motion_shape_and_missing_objects():
    """Known answers: a clip read against a caption that states another motion, shape or colour."""
    clips, _ = heldout_clips(32)
    clip = next(c for c in clips if len(c.objects) == 1 and MOTIONS[c.objects[0].motion] == "right")
    video = frames_first(render_clips([clip]))
    o = clip.objects[0]
    assert probe_hits(video, [clip])[0].tolist() == [[True, True, True, True]]
    wrong_motion = dataclasses.replace(clip, objects=(dataclasses.replace(o, motion=MOTIONS.index("left")),))
    assert probe_hits(video, [wrong_motion])[0].tolist() == [[True, True, True, False]]
    wrong_shape = dataclasses.replace(clip, objects=(dataclasses.replace(o, shape=(o.shape + 1) % 3),))
    assert probe_hits(video, [wrong_shape])[0].tolist() == [[True, False, True, True]]
    absent = dataclasses.replace(clip, objects=(dataclasses.replace(o, colour=(o.colour + 1) % len(COLOURS)),))
    assert probe_hits(video, [absent])[0].tolist() == [[False, False, False, False]]
    frozen = video[:, :1].expand_as(video)  # the first frame held: the object no longer moves
    assert probe_hits(frozen, [clip])[0].tolist() == [[True, True, True, False]]


# -- metrics ---------------------------------------------------------------------------------------


def test_video_metrics_known_answers():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 4, 3, 16, 16, generator=g) * 0.8
    assert torch.equal(frame_psnr(ref, ref), torch.full((2,), 100.0))
    assert torch.allclose(frame_ssim(ref, ref), torch.ones(2), atol=1e-6)
    assert torch.equal(temporal_error(ref, ref), torch.zeros(2))
    shifted = ref + 0.1  # every frame off by the same 0.1: PSNR 20 dB, consecutive differences unchanged
    assert torch.allclose(frame_psnr(shifted, ref), torch.full((2,), 20.0), atol=1e-4)
    assert torch.allclose(temporal_error(shifted, ref), torch.zeros(2), atol=1e-6)
    zeros = torch.zeros(1, 3, 3, 8, 8)
    flicker = zeros.clone()
    flicker[:, 1] = 0.5  # frame differences +0.5 then -0.5 where the reference has none
    assert torch.allclose(temporal_error(flicker, zeros), torch.tensor([0.5]))
    assert torch.allclose(frame_psnr(flicker[:, :2], zeros[:, :2]), torch.tensor([(100.0 + 10 * math.log10(4)) / 2]))
    out = video_metrics(shifted, ref)
    assert out["frame_psnr"] == pytest.approx(20.0, abs=1e-4) and out["temporal_error"] == pytest.approx(0.0, abs=1e-6)
    assert "frame_lpips" in out or out["frame_lpips_skipped"].startswith("lpips:")
    with pytest.raises(ValueError, match="differ in shape"):
        frame_psnr(ref, ref[:, :3])


# -- files -----------------------------------------------------------------------------------------


def test_gif_is_written_playable_with_every_frame(tmp_path):
    clips, _ = heldout_clips(1)
    video = frames_first(render_clips(clips))[0]  # (F, 3, S, S)
    path = save_gif(video, tmp_path / "clip.gif", scale=2)
    with Image.open(path) as gif:
        assert gif.n_frames == FRAMES and gif.size == (2 * SIZE, 2 * SIZE)
        for f in range(FRAMES):
            gif.seek(f)
            frame = torch.tensor(np.asarray(gif.convert("RGB"))).float() / 255
            expect = video[f].permute(1, 2, 0).repeat_interleave(2, 0).repeat_interleave(2, 1)
            assert (frame - expect).abs().mean() < 0.02  # the palette quantises a little
    written = save_sample(video, tmp_path / "run", "00000_seed0")
    assert [p.relative_to(tmp_path / "run").as_posix() for p in written] == [
        "videos/00000_seed0.gif",
        "images/00000_seed0.png",
    ]
    assert Image.open(written[1]).size == (FRAMES * SIZE, SIZE)


@pytest.mark.slow  # W&B's service takes 10-40 s to start on a busy machine
def test_wandb_logs_videos_offline(tmp_path, monkeypatch):
    from catlab.loggers.wandb_logger import WandbLogger, offline_records

    monkeypatch.setenv("WANDB_SILENT", "true")
    clips, captions = heldout_clips(2)
    videos = frames_first(render_clips(clips))
    logger = WandbLogger(mode="offline")
    logger.start(tmp_path, {"model": "embedded_video"}, name="video-test")
    logger.log_videos("samples_video", videos, captions)
    logger.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history = [m for k, m in offline_records(run_file) if k == "history"]
    items = {tuple(i.nested_key): json.loads(i.value_json) for h in history for i in h.item}
    assert ("samples_video", "_type") in items, (list(items), [k for k, _ in offline_records(run_file)])
    assert items[("samples_video", "_type")] == "videos" and items[("samples_video", "count")] == 2
    assert items[("samples_video", "captions")] == captions
    (files,) = tmp_path.glob("wandb/offline-run-*/files")
    gifs = sorted((files / "media" / "videos").glob("samples_video_*.gif"))
    assert len(gifs) == 2 and Image.open(gifs[0]).n_frames == FRAMES


# -- the model -------------------------------------------------------------------------------------


def test_adapter_matches_the_bundles_own_sampler():
    """The adapter's stacked-frames layout (encode, noise, predict, decode) is the video model's own sampling."""
    from catlab.embedded.video import generate_video
    from catlab.models.embedded_video import EmbeddedVideo

    torch.manual_seed(0)
    adapter = EmbeddedVideo()
    assert adapter.grid == (8, 16, 16) and adapter.patch_size == 2
    prompt = ["a small red circle moving right"]
    expected = generate_video(adapter.bundle, prompt, steps=2, guidance=4.0, seed=5)
    scheduler = adapter.make_scheduler()
    scheduler.set_timesteps(2)
    cond = adapter.encode(prompt, guidance=True)
    x = adapter.initial_latents([5])
    assert x.shape == (1, 3, 8 * 32, 32)
    with torch.no_grad():
        for t in scheduler.timesteps:
            v_unc, v_cond = adapter.predict(torch.cat([x, x]), t, cond).chunk(2)
            x = scheduler.step(v_unc + 4.0 * (v_cond - v_unc), t, x).prev_sample
    video = adapter.decode(x)
    assert video.shape == (1, 8, 3, 32, 32) and 0 <= video.min() and video.max() <= 1
    assert torch.allclose(video, ((expected.clamp(-1, 1) + 1) / 2).transpose(1, 2), atol=1e-5)


def test_bundle_is_small_and_records_its_training():
    size = sum(f.stat().st_size for f in BUNDLE.rglob("*") if f.is_file())
    assert size < 8e6
    info = json.loads((BUNDLE / "train_info.json").read_text())
    assert info["steps"] > 0 and info["config"]["denoiser"]["frames"] == 8
    assert json.loads((BUNDLE / "video.json").read_text()) == {"frames": 8, "image_size": 32}


def test_train_video_resumes_exactly(tmp_path):
    """Two steps, stopped and resumed to three, equal three steps in one go (tiny sizes)."""
    from hydra import compose, initialize_config_dir

    from catlab.train_video import train

    tiny = [
        "denoiser.frames=2",
        "denoiser.image_size=8",
        "denoiser.num_layers=1",
        "denoiser.num_heads=2",
        "denoiser.head_dim=12",
        "text.hidden_size=16",
        "text.num_layers=1",
        "text.num_heads=2",
        "batch_size=2",
        "sample_every=0",
        "ckpt_every=1",
        "log_every=1",
        "warmup=2",
        "short_steps=0",
    ]

    def run(out: Path, steps: int):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="train_video", overrides=[*tiny, f"steps={steps}", f"out_dir={out}"])
        return train(cfg)

    run(tmp_path / "split", 2)
    info = run(tmp_path / "split", 3)
    run(tmp_path / "whole", 3)
    assert info["steps"] == 3
    a = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    for sa, sb in zip(a["ema"] + a["modules"], b["ema"] + b["modules"]):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    losses = [json.loads(line)["loss"] for line in (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 3


def _wan_family_registered() -> bool:
    import catlab  # noqa: F401
    from catlab.registry import families

    return any("wan" in name for name in families.names())


@pytest.mark.skipif(not _wan_family_registered(), reason="pruning a WanTransformer3DModel needs catlab.families.wan")
def test_run_cli_writes_a_gif_per_video(tmp_path):
    _, run_dir = run_cli(
        "model=embedded_video",
        "selector=full",
        "prompts=video_demo",
        "sampler.num_steps=3",
        "sampler.progress=false",
        "logger=local",
        tmp_path=tmp_path,
    )
    gifs = sorted((run_dir / "videos").glob("*.gif"))
    assert len(gifs) == 2
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames == FRAMES
    assert len(list((run_dir / "images").glob("*.png"))) == 2
    assert (run_dir / "samples_video.gif").exists()
    assert json.loads((run_dir / "metrics.json").read_text())["macs_per_image"] > 0


def test_run_writes_videos_of_a_video_adapter(tmp_path):
    """``catlab.run`` with a model whose decode gives videos: a GIF per video, its frames as a PNG, the
    local logger's GIF of the samples. The stand-in video model is the embedded image model whose
    32x32 images are read as two 16x32 frames (the Wan adapter runs once its family is registered)."""
    from hydra import compose, initialize_config_dir

    from catlab.models.embedded import Embedded
    from catlab.registry import models
    from catlab.run import run

    if "test_two_frames" not in models.names():

        @models.register("test_two_frames")
        class TwoFrames(Embedded):
            def decode(self, latents):
                return super().decode(latents).unflatten(2, (2, 16)).permute(0, 2, 1, 3, 4)  # (B, 2, 3, 16, 32)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["selector=full", "model.name=test_two_frames", "sampler.num_steps=2", "logger=local"],
        )
    run(cfg, tmp_path)
    gifs = sorted((tmp_path / "videos").glob("*.gif"))
    pngs = sorted((tmp_path / "images").glob("*.png"))
    assert len(gifs) == len(pngs) == 2
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames == 2 and gif.size == (4 * 32, 4 * 16)
    assert Image.open(pngs[0]).size == (2 * 32, 16)
    with Image.open(tmp_path / "samples_video.gif") as gif:
        assert gif.n_frames == 2
    assert (tmp_path / "samples.png").exists() and (tmp_path / "metrics.json").exists()


def test_probe_keeps_the_largest_blob_and_ignores_speckle():
    from catlab.embedded.video_probe import largest_component, read_object

    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, 2:8, 3:9] = True  # a 6x6 square
    mask[:, 12, ::3] = True  # isolated pixels
    mask[1, 10:12, 12:14] = True  # a 2x2 blob, smaller than the square
    kept = largest_component(mask)
    assert kept.sum((1, 2)).tolist() == [36, 36] and kept[:, 2:8, 3:9].all()
    g = torch.Generator().manual_seed(0)
    speckle = torch.rand(8, 32, 32, generator=g) < 0.08  # scattered pixels of one colour: no object
    assert read_object(speckle, 32)["present"] is False


def test_video_tokenizer_covers_every_caption_and_names_its_vocabulary():
    from catlab.embedded.text import build_tokenizer, tokenize
    from catlab.embedded.video_world import vocabulary

    tok = build_tokenizer(20, vocabulary())
    _, captions = heldout_clips(64)
    ids = tokenize(tok, captions)
    assert tok.unk_token_id not in ids.tolist() and (ids[:, -1] == tok.pad_token_id).all()  # none is cut
    with pytest.warns(UserWarning, match=r"unknown words \['center', 'in', 'the'\].*'moving'"):
        tokenize(tok, ["a red circle in the center"])
