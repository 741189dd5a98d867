"""Train the embedded video model: `python -m catlab.train_video [key=value ...]`.

The text encoder and a small Wan transformer (catlab.embedded.video) are trained jointly from
scratch with rectified flow on the moving-shapes world (catlab.embedded.video_world): logit-normal
noise levels, captions dropped to "" at a fixed rate (for classifier-free guidance), an EMA of the
weights. The first ``short_steps`` steps may train on shorter clips (``short_frames``): appearance
is learnt at a fraction of the cost, and the 3D rotary positions carry over to full-length clips.

Everything lives in ``out_dir``: ``train_log.jsonl`` (loss and wall time every ``log_every``
steps), ``checkpoint.pt`` (weights, EMA, optimizer and step, every ``ckpt_every`` steps),
``bundle/`` (the EMA weights as a loadable bundle, written with each checkpoint) and
``samples/`` (GIFs and frame grids of held-out prompts). Batch ``i`` and its noise are drawn from
seed-tree branches of their own, so a run that is stopped and started again with the same command
(``resume: true``) continues exactly where it stopped; raising ``steps`` continues a finished run.
``max_minutes`` ends a run cleanly (checkpoint written) after that much wall time; a larger value continues it.
Config: conf/train_video.yaml.
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from catlab.embedded.denoiser import lr_at, param_count, sample_sigmas, scheduler_config, shift_sigmas
from catlab.embedded.text import TextConfig, build_text_encoder, build_tokenizer, tokenize
from catlab.embedded.video import (
    VideoBundle,
    VideoDenoiserConfig,
    build_video_transformer,
    encode_video_ids,
    generate_video,
    save_video_bundle,
    video_flow_loss,
)
from catlab.embedded.video_world import clip_batch, heldout_clips, render_clips, vocabulary
from catlab.train_toy import EMA
from catlab.train_toy import export as export_parts

VIDEO_BUNDLE_PARTS = ("transformer", "text_encoder", "tokenizer", "scheduler", "video.json", "train_info.json")


def learning_rate(cfg: DictConfig, step: int) -> float:
    """Linear warm-up, then constant (a run that may be continued) or cosine to 10% over ``steps``."""
    if cfg.schedule == "cosine":
        return lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
    if cfg.schedule == "constant":
        return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
    raise ValueError(f"schedule must be 'constant' or 'cosine'; got {cfg.schedule!r}")


def frames_at(cfg: DictConfig, step: int) -> int:
    return int(cfg.short_frames) if step < int(cfg.short_steps) else int(cfg.denoiser.frames)


def write_samples(bundle: VideoBundle, cfg: DictConfig, stem: pathlib.Path) -> None:
    """GIFs (generated above real) and a caption list for ``sample_prompts`` held-out prompts."""
    from catlab.loggers.video import save_gif

    clips, captions = heldout_clips(cfg.sample_prompts, seed=cfg.seed)
    fake = generate_video(bundle, captions, steps=cfg.sample_steps, guidance=cfg.sample_guidance, seed=cfg.seed)
    real = render_clips(clips, bundle.frames, bundle.image_size)
    stem.parent.mkdir(parents=True, exist_ok=True)
    both = torch.cat([(fake + 1) / 2, real], dim=-2)  # (B, 3, F, 2H, W): generated above the real clip
    save_gif(torch.cat(list(both), dim=-1), stem.with_suffix(".gif"))  # prompts side by side
    stem.with_suffix(".txt").write_text("\n".join(captions) + "\n")


def train(cfg: DictConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = pathlib.Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tcfg = TextConfig(**cfg.text)
    dcfg = VideoDenoiserConfig(**{**cfg.denoiser, "patch_size": tuple(cfg.denoiser.patch_size)})
    tokenizer = build_tokenizer(tcfg.max_length, vocabulary())
    text_encoder = build_text_encoder(tcfg, tokenizer)
    transformer = build_video_transformer(dcfg, tcfg.hidden_size)
    modules = [transformer, text_encoder]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = EMA(modules, cfg.ema_decay)

    ckpt_path = out / "checkpoint.pt"
    start_step, wall_before, recent = 0, 0.0, []
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        for m, state in zip(modules, ckpt["modules"]):
            m.load_state_dict(state)
        for m, state in zip(ema.modules, ckpt["ema"]):
            m.load_state_dict(state)
        opt.load_state_dict(ckpt["optimizer"])
        start_step, wall_before, recent = ckpt["step"], ckpt["wall_seconds"], ckpt["recent"]
        print(f"resumed from {ckpt_path} at step {start_step} ({wall_before / 60:.1f} min trained)", flush=True)
    ema_bundle = VideoBundle(
        ema.modules[0], ema.modules[1], tokenizer, scheduler_config(cfg.shift), dcfg.frames, dcfg.image_size
    )
    print(
        f"transformer {param_count(transformer) / 1e6:.2f}M params, "
        f"text encoder {param_count(text_encoder) / 1e6:.2f}M; "
        f"{dcfg.frames}x{dcfg.image_size // dcfg.patch_size[1]}x{dcfg.image_size // dcfg.patch_size[2]} video tokens",
        flush=True,
    )

    def checkpoint(step: int, wall: float) -> None:
        state = {
            "modules": [m.state_dict() for m in modules],
            "ema": [m.state_dict() for m in ema.modules],
            "optimizer": opt.state_dict(),
            "step": step,
            "wall_seconds": wall,
            "recent": recent,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        torch.save(state, out / "checkpoint.tmp")
        (out / "checkpoint.tmp").replace(ckpt_path)
        save_video_bundle(ema_bundle, out / "bundle", extra=run_info(cfg, step, recent, wall, modules))

    log = (out / "train_log.jsonl").open("a")
    start = time.time()
    done = start_step
    for step in range(start_step, cfg.steps):
        if cfg.max_minutes and wall_before + time.time() - start > 60 * cfg.max_minutes:
            minutes = wall_before / 60
            print(f"trained {minutes:.1f} >= max_minutes={cfg.max_minutes}; raise it to continue", flush=True)
            break
        frames = frames_at(cfg, step)
        clips = clip_batch(cfg.seed, step, cfg.batch_size, frames)
        x0 = render_clips(clips, frames, dcfg.image_size) * 2 - 1
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # the text encoder's dropout: a resumed step draws the same
        drop = torch.rand(len(clips), generator=gen) < cfg.caption_dropout
        captions = ["" if d else c.caption for c, d in zip(clips, drop.tolist())]
        sigmas = sample_sigmas(len(clips), cfg.timestep_sampling, gen, cfg.logit_mean, cfg.logit_std)
        sigmas = shift_sigmas(sigmas, cfg.shift)
        noise = torch.randn(x0.shape, generator=gen)

        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        ids = tokenize(tokenizer, captions, warn=False)
        text = encode_video_ids(text_encoder, ids, tokenizer.pad_token_id)
        loss = video_flow_loss(transformer, x0, text, sigmas, noise)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower lr (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema.update(step)

        recent = (recent + [loss.item()])[-50:]
        done = step + 1
        wall = wall_before + time.time() - start
        if done % cfg.log_every == 0 or done == cfg.steps:
            row = {"step": done, "loss": sum(recent) / len(recent), "frames": frames, "seconds": round(wall, 1)}
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(json.dumps(row), flush=True)
        out_of_time = cfg.max_minutes and wall > 60 * cfg.max_minutes
        if done % cfg.ckpt_every == 0 or done == cfg.steps or out_of_time:
            checkpoint(done, wall)
        if cfg.sample_every and done % cfg.sample_every == 0:
            write_samples(ema_bundle, cfg, out / "samples" / f"step_{done:06d}")
        if out_of_time:
            print(f"max_minutes={cfg.max_minutes} reached at step {done}; raise it to continue", flush=True)
            break
    if start_step >= cfg.steps:
        print(f"already trained {start_step} >= steps={cfg.steps} steps; raise `steps` to continue", flush=True)

    info = run_info(cfg, done, recent, wall_before + time.time() - start, modules)
    if cfg.export_to:
        export(out / "bundle", pathlib.Path(cfg.export_to))
    print(json.dumps({k: v for k, v in info.items() if k != "config"}), flush=True)
    return info


def run_info(cfg: DictConfig, steps_done: int, recent: list[float], wall: float, modules) -> dict:
    """What `train_info.json` records: steps, loss, wall time, sizes and the config."""
    transformer, text_encoder = modules
    return {
        "steps": steps_done,
        "final_loss_last50": sum(recent) / len(recent) if recent else None,
        "wall_seconds": round(wall, 1),
        "threads": cfg.threads,
        "transformer_params": param_count(transformer),
        "text_encoder_params": param_count(text_encoder),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def export(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Copy the bundle parts into `dst`, leaving anything else there alone."""
    export_parts(src, dst, VIDEO_BUNDLE_PARTS)


@hydra.main(config_path="../conf", config_name="train_video", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
