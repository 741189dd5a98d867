"""Load and save the embedded model bundle (diffusers/transformers standard layout).

    bundle/
      transformer/   SD3Transformer2DModel (config.json + safetensors)
      text_encoder/  CLIPTextModelWithProjection or BertModel (config.json + safetensors)
      tokenizer/     tokenizer.json (PreTrainedTokenizerFast)
      scheduler/     scheduler_config.json (FlowMatchEulerDiscreteScheduler)
      probe/         attribute probe (see catlab.embedded.probe)

Each part loads with its own class's `from_pretrained(local path)`; nothing is downloaded.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import torch
import transformers
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from catlab.embedded.text import ENCODERS, encode_ids, tokenize


@dataclass
class EmbeddedBundle:
    transformer: SD3Transformer2DModel
    text_encoder: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    scheduler_config: dict  # for FlowMatchEulerDiscreteScheduler.from_config
    image_size: int

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (B, L, joint_attention_dim), pooled (B, pooled_projection_dim)).

        ``""`` is the unconditional prompt.
        """
        ids = tokenize(self.tokenizer, list(prompts))
        embeds, pooled = encode_ids(self.text_encoder, ids)
        dtype = self.transformer.dtype
        return embeds.to(dtype), pooled.to(dtype)


def default_bundle_path() -> pathlib.Path:
    """The bundle shipped inside the package."""
    return pathlib.Path(__file__).resolve().parent / "bundle"


SHIPPED = {"bundle": "32x32 images, 256 tokens", "bundle_64": "64x64 images, 1024 tokens"}


def resolve_bundle_path(path=None) -> pathlib.Path:
    """None -> the shipped 32x32 bundle; the name of a bundle shipped beside it (e.g. "bundle_64")
    -> that one inside the package, unless a directory of that name exists here; else a path."""
    if path is None:
        return default_bundle_path()
    path = pathlib.Path(path)
    if not path.is_dir() and str(path) in SHIPPED:
        return default_bundle_path().parent / str(path)
    return path


def load_bundle(path=None, device="cpu", dtype=torch.float32) -> EmbeddedBundle:
    path = resolve_bundle_path(path)
    if not (path / "transformer" / "config.json").exists():
        hint = (
            "python -m catlab.train_toy --config-name train_toy_64 export_to=catlab/embedded/bundle_64"
            if path.name == "bundle_64"
            else "python -m catlab.train_toy"
        )
        raise FileNotFoundError(f"no embedded bundle at {path}; train one with `{hint}`")
    transformer = SD3Transformer2DModel.from_pretrained(path / "transformer", torch_dtype=dtype)
    text_encoder = _text_encoder_class(path / "text_encoder").from_pretrained(path / "text_encoder", dtype=dtype)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
    transformer.to(device).eval()
    if next(transformer.parameters()).dtype != dtype:  # from_pretrained left this local folder in float32
        transformer.to(dtype=dtype)
    text_encoder.to(device).eval()
    return EmbeddedBundle(
        transformer=transformer,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=dict(scheduler.config),
        image_size=int(transformer.config.sample_size),
    )


def _text_encoder_class(folder: pathlib.Path):
    """The transformers class named in the text encoder's config (one of catlab.embedded.text.ENCODERS)."""

    arch = (json.loads((folder / "config.json").read_text()).get("architectures") or ["CLIPTextModelWithProjection"])[
        0
    ]
    allowed = {cls.__name__ for cls in ENCODERS.values()}
    if arch not in allowed:
        raise ValueError(f"{folder}: text encoder {arch!r} is not one catlab builds ({sorted(allowed)})")
    return getattr(transformers, arch)


def save_bundle(bundle: EmbeddedBundle, path, extra: dict | None = None) -> pathlib.Path:
    """Write the four standard parts (and `train_info.json` when `extra` is given)."""
    path = pathlib.Path(path)
    bundle.transformer.save_pretrained(path / "transformer", safe_serialization=True)
    bundle.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
    bundle.tokenizer.save_pretrained(path / "tokenizer")
    FlowMatchEulerDiscreteScheduler.from_config(bundle.scheduler_config).save_pretrained(path / "scheduler")
    if extra is not None:
        (path / "train_info.json").write_text(json.dumps(extra, indent=2, sort_keys=True))
    return path


def weights_fingerprint(path=None, length: int = 12) -> str:
    """sha256 over the bundle's transformer and text-encoder weight files (a short hex id)."""
    import hashlib

    path = resolve_bundle_path(path)
    digest = hashlib.sha256()
    for part in ("transformer", "text_encoder"):
        for f in sorted((path / part).glob("*.safetensors")):
            digest.update(f.name.encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:length]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images (B, 3, S, S) -> uint8 (B, S, S, 3), ready for PIL."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()


def save_grid(images: torch.Tensor, path, nrow: int, scale: int = 4) -> None:
    """Save [-1, 1] images (B, 3, S, S) as one PNG grid with `nrow` images per row, upscaled."""
    from PIL import Image

    x = to_uint8(images)  # (B, S, S, 3)
    b, s = x.shape[0], x.shape[1]
    rows = -(-b // nrow)
    canvas = torch.zeros(rows * (s + 2), nrow * (s + 2), 3, dtype=torch.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        canvas[r * (s + 2) + 1 : r * (s + 2) + 1 + s, c * (s + 2) + 1 : c * (s + 2) + 1 + s] = x[i]
    img = Image.fromarray(canvas.numpy())
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
