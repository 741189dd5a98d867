"""Train the embedded default model: `python -m catlab.train_toy [key=value ...]`.

Text encoder and SD3 transformer are trained jointly from scratch with
rectified flow on the procedural world (catlab.embedded.world). Captions are
dropped to "" at a fixed rate so the model supports classifier-free guidance.
The bundle (EMA weights) is written to `${out_dir}/bundle`, sample grids of
held-out prompts to `${out_dir}/samples/`, and a loss log to `${out_dir}/train_log.jsonl`.
Config: conf/train_toy.yaml. `init_from=<bundle dir>` starts from a trained
bundle's weights instead of from scratch (a continuation stage, see
conf/train_toy_continue.yaml); the shipped bundle is stage 1 (train_toy.yaml)
followed by stage 2 (train_toy_continue.yaml). Every `sample_every` steps the
EMA bundle is also written, so an interrupted run leaves usable weights.
"""

from __future__ import annotations

import copy
import json
import pathlib
import shutil
import time

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from catlab.embedded.bundle import EmbeddedBundle, load_bundle, save_bundle, save_grid
from catlab.embedded.denoiser import (
    DenoiserConfig,
    build_transformer,
    flow_loss,
    generate,
    load_grown,
    lr_at,
    param_count,
    sample_sigmas,
    scheduler_config,
    shift_sigmas,
)
from catlab.embedded.text import TextConfig, build_text_encoder, build_tokenizer, encode_ids, pooled_dim, tokenize
from catlab.embedded.world import heldout_scenes, render, scene_stream

BUNDLE_PARTS = ("transformer", "text_encoder", "tokenizer", "scheduler", "train_info.json")


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.modules = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
        self.src = modules
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for ema, src in zip(self.modules, self.src):
            torch._foreach_lerp_(list(ema.parameters()), list(src.parameters()), 1 - d)


def sample_grid(bundle: EmbeddedBundle, cfg: DictConfig, path: pathlib.Path, n: int = 8) -> None:
    """Generated images for n held-out prompts (top row) above their rendered scenes."""
    scenes, captions = heldout_scenes(n, seed=cfg.seed)
    fake = generate(bundle, captions, steps=cfg.sample_steps, guidance=cfg.sample_guidance, seed=cfg.seed)
    real = render(scenes, bundle.image_size) * 2 - 1
    save_grid(torch.cat([fake, real]), path, nrow=n)
    (path.with_suffix(".txt")).write_text("\n".join(captions) + "\n")


def train(cfg: DictConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = pathlib.Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(cfg.seed)

    tcfg, dcfg = TextConfig(**cfg.text), DenoiserConfig(**cfg.denoiser)
    tokenizer = build_tokenizer(tcfg.max_length)
    text_encoder = build_text_encoder(tcfg, tokenizer)
    proj_dim = pooled_dim(text_encoder)
    transformer = build_transformer(dcfg, tcfg.hidden_size, proj_dim)
    if cfg.get("init_from"):
        load_weights(pathlib.Path(cfg.init_from), transformer, text_encoder)
    modules = [transformer, text_encoder]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = EMA(modules, cfg.ema_decay)
    ema_bundle = EmbeddedBundle(
        ema.modules[0], ema.modules[1], tokenizer, scheduler_config(cfg.shift), dcfg.image_size
    )
    print(
        f"transformer {param_count(transformer) / 1e6:.2f}M params, "
        f"text encoder {param_count(text_encoder) / 1e6:.2f}M"
    )

    stream = scene_stream(cfg.seed, cfg.batch_size)
    log = (out / "train_log.jsonl").open("w")
    recent: list[float] = []
    start = time.time()
    bar = tqdm(range(cfg.steps), desc="train_toy", mininterval=5.0)
    for step in bar:
        scenes = next(stream)
        x0 = render(scenes, dcfg.image_size) * 2 - 1
        drop = torch.rand(len(scenes), generator=gen) < cfg.caption_dropout
        captions = ["" if d else s.caption for s, d in zip(scenes, drop.tolist())]
        sigmas = sample_sigmas(len(scenes), cfg.timestep_sampling, gen, cfg.logit_mean, cfg.logit_std)
        sigmas = shift_sigmas(sigmas, cfg.shift)
        noise = torch.randn(x0.shape, generator=gen)

        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
        embeds, pooled = encode_ids(text_encoder, tokenize(tokenizer, captions, warn=False))
        loss = flow_loss(transformer, x0, embeds, pooled, sigmas, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema.update(step)

        recent = (recent + [loss.item()])[-100:]
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            avg = sum(recent) / len(recent)
            bar.set_postfix(loss=f"{avg:.4f}")
            log.write(json.dumps({"step": step + 1, "loss": avg, "seconds": time.time() - start}) + "\n")
            log.flush()
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
            sample_grid(ema_bundle, cfg, out / "samples" / f"step_{step + 1:06d}.png")
            save_bundle(ema_bundle, out / "bundle", extra=run_info(cfg, step + 1, recent, start, modules))

    info = run_info(cfg, cfg.steps, recent, start, modules)
    bundle_dir = save_bundle(ema_bundle, out / "bundle", extra=info)
    sample_grid(ema_bundle, cfg, out / "samples" / "final.png")
    if cfg.export_to:
        export(bundle_dir, pathlib.Path(cfg.export_to))
    print(json.dumps({k: v for k, v in info.items() if k != "config"}))
    return info


def run_info(cfg: DictConfig, steps_done: int, recent: list[float], start: float, modules) -> dict:
    """What `train_info.json` records: steps, loss, wall time, sizes, the config (and its parent stage)."""
    transformer, text_encoder = modules
    info = {
        "steps": steps_done,
        "final_loss_last100": sum(recent) / len(recent),
        "wall_seconds": round(time.time() - start, 1),
        "threads": cfg.threads,
        "transformer_params": param_count(transformer),
        "text_encoder_params": param_count(text_encoder),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    parent = pathlib.Path(cfg.init_from) / "train_info.json" if cfg.get("init_from") else None
    if parent is not None and parent.exists():
        info["init_from_info"] = json.loads(parent.read_text())
    return info


def load_weights(path: pathlib.Path, transformer: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
    """Start from a trained bundle's transformer and text encoder; their shapes must match the config,
    except the image size: a bundle trained at a smaller size has its positional table grown
    to this config's grid (catlab.embedded.denoiser.grow_pos_embed)."""
    if not (path / "transformer" / "config.json").exists():
        raise FileNotFoundError(f"init_from={path}: no bundle there (expected {path}/transformer/config.json)")
    trained = load_bundle(path)
    try:
        grown = load_grown(transformer, trained.transformer.state_dict())
    except ValueError as err:
        raise ValueError(
            f"init_from={path}: its transformer does not match this config's `denoiser` sizes: {err}"
        ) from None
    if grown:
        src, dst = int(trained.transformer.config.sample_size), int(transformer.config.sample_size)
        print(
            f"init_from={path}: {src}x{src} bundle, positional table grown to {dst}x{dst} images ({', '.join(grown)})"
        )
    try:
        text_encoder.load_state_dict(trained.text_encoder.state_dict())
    except RuntimeError as err:
        raise ValueError(
            f"init_from={path}: its text_encoder does not match this config's `text` sizes: {err}"
        ) from None


def export(src: pathlib.Path, dst: pathlib.Path, parts=BUNDLE_PARTS) -> None:
    """Copy the model ``parts`` into `dst`, leaving anything else there (e.g. the probe) alone."""
    dst.mkdir(parents=True, exist_ok=True)
    for part in parts:
        if (dst / part).is_dir():
            shutil.rmtree(dst / part)
        if (src / part).is_dir():
            shutil.copytree(src / part, dst / part)
        elif (src / part).exists():
            shutil.copy2(src / part, dst / part)


@hydra.main(config_path="../conf", config_name="train_toy", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
