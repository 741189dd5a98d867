"""The image side of the embedded model: a small SD3 transformer in pixel space.

Training objective is rectified flow as in SD3: x_t = (1 - s) x_0 + s * noise,
the model predicts the velocity v = noise - x_0 at timestep t = 1000 s, which is
exactly what diffusers' `FlowMatchEulerDiscreteScheduler` integrates at sampling
time. There is no VAE: the transformer denoises 3-channel images in [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class DenoiserConfig:
    image_size: int = 32
    patch_size: int = 2  # 32 / 2 = 16x16 = 256 image tokens
    num_layers: int = 6
    num_heads: int = 4
    head_dim: int = 32


def build_transformer(cfg: DenoiserConfig, text_dim: int, pooled_dim: int) -> SD3Transformer2DModel:
    """A fresh SD3 transformer: joint text-image attention on pixel patches."""
    grid = cfg.image_size // cfg.patch_size
    return SD3Transformer2DModel(
        sample_size=cfg.image_size,
        patch_size=cfg.patch_size,
        in_channels=3,
        out_channels=3,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=text_dim,
        caption_projection_dim=cfg.num_heads * cfg.head_dim,
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=grid,
    )


POS_EMBED_KEY = "pos_embed.pos_embed"


def sincos_table(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """SD3's 2D sin-cos table (1, n*n, D) evaluated at 1D `positions` (n,) along each axis."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid

    grid = torch.stack(torch.meshgrid(positions, positions, indexing="xy"))  # (2, n, n), w first as diffusers
    table = get_2d_sincos_pos_embed_from_grid(embed_dim, grid.reshape(2, 1, len(positions), len(positions)))
    return table.float().unsqueeze(0)


def grow_pos_embed(table: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Resize a (1, g*g, D) positional table to (1, new_grid**2, D) covering the same image extent.

    Patch i of the new grid has its centre at old-grid coordinate (i + 0.5) * g / new_grid - 0.5,
    so every new token gets the position its pixels had in the old model. SD3's table is a fixed
    sin-cos function of position; when `table` is exactly that (the trained bundles' case) it is
    evaluated at those fractional coordinates, otherwise the table is resampled bicubically.
    """
    n, dim = table.shape[1], table.shape[2]
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"positional table of {n} tokens is not a square grid")
    if g == new_grid:
        return table.clone()
    old = sincos_table(dim, torch.arange(g, dtype=torch.float32))
    if torch.allclose(table.float(), old, atol=1e-5):
        pos = (torch.arange(new_grid, dtype=torch.float32) + 0.5) * g / new_grid - 0.5
        return sincos_table(dim, pos).to(table.dtype)
    img = table.reshape(1, g, g, dim).permute(0, 3, 1, 2)
    img = torch.nn.functional.interpolate(img.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(table.dtype)


def load_grown(transformer: SD3Transformer2DModel, state: dict[str, torch.Tensor]) -> list[str]:
    """Load a trained transformer's `state` into `transformer`, growing the positional table if the grids differ.

    Every other tensor must match in name and shape (same patch size, widths, depth);
    returns the keys that were resized (empty when the grids already match).
    """
    own = transformer.state_dict()
    state = dict(state)
    grown = []
    if POS_EMBED_KEY in state and POS_EMBED_KEY in own and state[POS_EMBED_KEY].shape != own[POS_EMBED_KEY].shape:
        new_grid = math.isqrt(own[POS_EMBED_KEY].shape[1])
        if state[POS_EMBED_KEY].shape[2] != own[POS_EMBED_KEY].shape[2]:
            raise ValueError(
                f"{POS_EMBED_KEY}: width {state[POS_EMBED_KEY].shape[2]} vs {own[POS_EMBED_KEY].shape[2]}; "
                "only the grid can grow, not the model width"
            )
        state[POS_EMBED_KEY] = grow_pos_embed(state[POS_EMBED_KEY], new_grid)
        grown.append(POS_EMBED_KEY)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(
                "shape mismatch: "
                + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:6])
            )
        if missing:
            parts.append(f"missing: {missing[:6]}")
        if unexpected:
            parts.append(f"unexpected: {unexpected[:6]}")
        raise ValueError("; ".join(parts))
    transformer.load_state_dict(state)
    return grown


def scheduler_config(shift: float = 1.0) -> dict:
    """The sampling scheduler's config, saved in the bundle."""
    return dict(FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift).config)


def sample_sigmas(n: int, mode: str, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Noise levels in (0, 1): 'logit_normal' (SD3's choice, favours mid levels) or 'uniform'."""
    if mode == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    if mode == "uniform":
        return torch.rand(n, generator=generator)
    raise ValueError(f"unknown timestep sampling {mode!r}; use 'logit_normal' or 'uniform'")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The scheduler's time shift, applied identically at training time."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_loss(
    transformer: SD3Transformer2DModel,
    x0: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Rectified-flow MSE between predicted and true velocity."""
    s = sigmas.view(-1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    pred = transformer(
        hidden_states=xt,
        timestep=sigmas * NUM_TRAIN_TIMESTEPS,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled,
        return_dict=False,
    )[0]
    return torch.nn.functional.mse_loss(pred, noise - x0)


@torch.no_grad()
def generate(
    bundle,
    prompts: list[str],
    steps: int = 28,
    guidance: float = 4.0,
    seed: int = 0,
    batch_size: int = 50,
) -> torch.Tensor:
    """Sample images in [-1, 1], (B, 3, S, S), with the bundle's Euler flow scheduler and CFG."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        g = torch.Generator().manual_seed(seed + i)
        out.append(_generate_batch(bundle, chunk, steps, guidance, g))
    return torch.cat(out)


def _generate_batch(bundle, prompts, steps, guidance, generator):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(bundle.scheduler_config)
    scheduler.set_timesteps(steps)
    b, s = len(prompts), bundle.image_size
    param = next(bundle.transformer.parameters())
    x = torch.randn(b, 3, s, s, generator=generator).to(param.device, param.dtype)
    cond, cond_pooled = bundle.encode(prompts)
    use_cfg = guidance != 1.0
    if use_cfg:
        unc, unc_pooled = bundle.encode([""] * b)
        cond, cond_pooled = torch.cat([unc, cond]), torch.cat([unc_pooled, cond_pooled])
    for t in scheduler.timesteps:
        inp = torch.cat([x, x]) if use_cfg else x
        v = bundle.transformer(
            hidden_states=inp,
            timestep=t.expand(inp.shape[0]).to(x.device),
            encoder_hidden_states=cond,
            pooled_projections=cond_pooled,
            return_dict=False,
        )[0]
        if use_cfg:
            v_unc, v_cond = v.chunk(2)
            v = v_unc + guidance * (v_cond - v_unc)
        x = scheduler.step(v, t, x).prev_sample
    return x.clamp(-1, 1).float().cpu()


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of base."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
