"""The embedded video model: a small Wan2.1-architecture text-to-video transformer in pixel space.

The transformer is a diffusers ``WanTransformer3DModel`` (3D rotary positions, self-attention over
all space-time tokens, cross-attention to the text, time modulation) denoising 3-channel videos in
[-1, 1], laid out (B, 3, frames, H, W) as Wan's latents are; there is no VAE. Its text encoder is
the image model's word-level tokenizer (over the video world's vocabulary) and a small BERT whose
per-token states are the cross-attention context; as in ``WanPipeline``, the states past a prompt's
last token are zeroed. Training is rectified flow as in ``catlab.embedded.denoiser``.

The bundle layout mirrors the image model's (``catlab.embedded.bundle``)::

    video_bundle/
      transformer/   WanTransformer3DModel (config.json + safetensors)
      text_encoder/  BertModel
      tokenizer/     tokenizer.json
      scheduler/     FlowMatchEulerDiscreteScheduler
      train_info.json
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from transformers import BertModel, PreTrainedModel, PreTrainedTokenizerFast

from catlab.embedded.denoiser import NUM_TRAIN_TIMESTEPS
from catlab.embedded.text import tokenize


@dataclass
class VideoDenoiserConfig:
    frames: int = 8
    image_size: int = 32
    patch_size: tuple[int, int, int] = (1, 2, 2)  # 8 x 16 x 16 = 2048 video tokens
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    ffn_mult: int = 2
    freq_dim: int = 64


def build_video_transformer(cfg: VideoDenoiserConfig, text_dim: int) -> WanTransformer3DModel:
    """A fresh Wan transformer on pixel patches of (frames, H, W) videos."""
    width = cfg.num_heads * cfg.head_dim
    return WanTransformer3DModel(
        patch_size=tuple(cfg.patch_size),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=3,
        out_channels=3,
        text_dim=text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_mult * width,
        num_layers=cfg.num_layers,
        rope_max_seq_len=max(64, cfg.frames, cfg.image_size),
    )


def encode_video_ids(text_encoder: PreTrainedModel, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Per-token states (B, L, hidden), zero past each prompt's last token (as WanPipeline pads)."""
    ids = ids.to(text_encoder.device)
    mask = (ids != pad_id).long()
    states = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return states * mask[..., None].to(states.dtype)


@dataclass
class VideoBundle:
    transformer: WanTransformer3DModel
    text_encoder: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    scheduler_config: dict
    frames: int
    image_size: int

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Text states (B, L, text_dim); ``""`` is the unconditional prompt."""
        ids = tokenize(self.tokenizer, list(prompts))
        states = encode_video_ids(self.text_encoder, ids, self.tokenizer.pad_token_id)
        return states.to(self.transformer.dtype)


def default_video_bundle_path() -> pathlib.Path:
    """The video bundle shipped inside the package."""
    return pathlib.Path(__file__).resolve().parent / "video_bundle"


def load_wan_transformer(folder: pathlib.Path) -> WanTransformer3DModel:
    """The transformer from its config and safetensors. Built by hand: diffusers' ``from_pretrained``
    refuses Wan (it keeps some modules in fp32) unless ``accelerate`` is installed."""
    from safetensors.torch import load_file

    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(folder))
    model.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"))
    return model


def load_video_bundle(path=None, device="cpu", dtype=torch.float32) -> VideoBundle:
    path = pathlib.Path(path) if path is not None else default_video_bundle_path()
    if not (path / "transformer" / "config.json").exists():
        raise FileNotFoundError(f"no embedded video bundle at {path}; train one with `python -m catlab.train_video`")
    transformer = load_wan_transformer(path / "transformer")
    text_encoder = BertModel.from_pretrained(path / "text_encoder", dtype=dtype)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
    info = json.loads((path / "video.json").read_text())
    transformer.to(device).eval()
    if dtype != torch.float32:  # Wan keeps its norms, time embedding and rope in float32 (diffusers' rule)
        transformer.to(dtype=dtype)
    text_encoder.to(device).eval()
    frames, size = info["frames"], info["image_size"]
    return VideoBundle(transformer, text_encoder, tokenizer, dict(scheduler.config), frames, size)


def video_weights_fingerprint(path=None, length: int = 12) -> str:
    """sha256 over the bundle's transformer and text-encoder weight files (a short hex id)."""
    import hashlib

    path = pathlib.Path(path) if path is not None else default_video_bundle_path()
    digest = hashlib.sha256()
    for part in ("transformer", "text_encoder"):
        for f in sorted((path / part).glob("*.safetensors")):
            digest.update(f.name.encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:length]


def save_video_bundle(bundle: VideoBundle, path, extra: dict | None = None) -> pathlib.Path:
    """Write the standard parts, ``video.json`` (clip shape) and ``train_info.json`` when ``extra`` is given."""
    path = pathlib.Path(path)
    bundle.transformer.save_pretrained(path / "transformer", safe_serialization=True)
    bundle.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
    bundle.tokenizer.save_pretrained(path / "tokenizer")
    FlowMatchEulerDiscreteScheduler.from_config(bundle.scheduler_config).save_pretrained(path / "scheduler")
    (path / "video.json").write_text(json.dumps({"frames": bundle.frames, "image_size": bundle.image_size}) + "\n")
    if extra is not None:
        (path / "train_info.json").write_text(json.dumps(extra, indent=2, sort_keys=True))
    return path


def video_flow_loss(
    transformer: WanTransformer3DModel,
    x0: torch.Tensor,
    text: torch.Tensor,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Rectified-flow MSE between the predicted and the true velocity ``noise - x0`` on (B, 3, F, H, W)."""
    s = sigmas.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    pred = transformer(
        hidden_states=xt, timestep=sigmas * NUM_TRAIN_TIMESTEPS, encoder_hidden_states=text, return_dict=False
    )[0]
    return torch.nn.functional.mse_loss(pred, noise - x0)


@torch.no_grad()
def generate_video(
    bundle: VideoBundle, prompts: list[str], steps: int = 20, guidance: float = 4.0, seed: int = 0, batch_size: int = 8
) -> torch.Tensor:
    """Sample videos in [-1, 1], (B, 3, F, S, S), with the bundle's Euler flow scheduler and CFG."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        g = torch.Generator().manual_seed(seed + i)
        out.append(_generate_batch(bundle, chunk, steps, guidance, g))
    return torch.cat(out)


def _generate_batch(bundle: VideoBundle, prompts, steps, guidance, generator):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(bundle.scheduler_config)
    scheduler.set_timesteps(steps)
    b, s = len(prompts), bundle.image_size
    param = next(bundle.transformer.parameters())
    x = torch.randn(b, 3, bundle.frames, s, s, generator=generator).to(param.device, param.dtype)
    text = bundle.encode(prompts)
    use_cfg = guidance != 1.0
    if use_cfg:
        text = torch.cat([bundle.encode([""] * b), text])
    for t in scheduler.timesteps:
        inp = torch.cat([x, x]) if use_cfg else x
        v = bundle.transformer(
            hidden_states=inp,
            timestep=t.expand(inp.shape[0]).to(x.device),
            encoder_hidden_states=text,
            return_dict=False,
        )[0]
        if use_cfg:
            v_unc, v_cond = v.chunk(2)
            v = v_unc + guidance * (v_cond - v_unc)
        x = scheduler.step(v, t, x).prev_sample
    return x.clamp(-1, 1).float().cpu()
