"""Attribute probe: reads each grid cell of an image back into (shape or empty, colour, size).

This is the alignment metric of the embedded model, in the role CLIP score
plays for real models: `attribute_accuracy(images, scenes)` is, per prompt,
the share of the attributes its caption states (position, shape, colour and
size of each object) that the probe finds in the image.

The probe is a small CNN trained on rendered scenes of the same world, with
mild noise and blur so that it also reads slightly imperfect generations.
It is trained by its own command and shipped in `catlab/embedded/bundle/probe/`:

    python -m catlab.embedded.probe            # writes catlab/embedded/bundle/probe
    python -m catlab.embedded.probe --out DIR --steps 200

A probe reads images of any size: they are resampled to the size it was trained
at. The 64x64 model (bundle_64) is read by the shipped 32x32 probe after a 2x
area downsample unless its bundle holds its own `probe/` (`--image-size 64`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from catlab.embedded.bundle import resolve_bundle_path
from catlab.embedded.world import COLOURS, SHAPES, SIZES, Scene, cell_targets, heldout_scenes, render, sample_scenes

PROBE_SEED_BRANCH = 7  # the probe's training scenes come from their own branch of the seed tree


@dataclass
class ProbeConfig:
    image_size: int = 32
    width: int = 32
    steps: int = 1200
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    noise_std: float = 0.08  # augmentation: gaussian pixel noise (in [-1, 1] units)


class AttributeProbe(nn.Module):
    """CNN -> 3x3 cell features -> per-cell logits for shape (empty + shapes), colour and size."""

    def __init__(self, cfg: ProbeConfig):
        super().__init__()
        w = cfg.width
        self.cfg = cfg
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
        )  # fmt: skip
        self.heads = nn.Conv2d(4 * w, len(SHAPES) + 1 + len(COLOURS) + len(SIZES), 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images in [-1, 1], (B, 3, S, S) -> logits (B, 9, classes) per attribute.

        Images of another size are first resampled to the size the probe was trained at
        (area averaging when shrinking), so the 32x32 probe also reads the 64x64 model's images.
        """
        size = self.cfg.image_size
        if images.shape[-2:] != (size, size):
            shrink = images.shape[-1] > size
            images = F.interpolate(
                images,
                size=(size, size),
                mode="area" if shrink else "bilinear",
                **({} if shrink else {"align_corners": False}),
            )
        f = self.features(images)
        cells = torch.cat([F.adaptive_avg_pool2d(f, 3), F.adaptive_max_pool2d(f, 3)], dim=1)
        logits = self.heads(cells).flatten(2).transpose(1, 2)  # (B, 9, C)
        n_shape, n_colour = len(SHAPES) + 1, len(COLOURS)
        return {
            "shape": logits[..., :n_shape],
            "colour": logits[..., n_shape : n_shape + n_colour],
            "size": logits[..., n_shape + n_colour :],
        }

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-cell class indices (B, 9); shape 0 means the cell is empty."""
        return {k: v.argmax(-1) for k, v in self(images.float()).items()}


def default_probe_path() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parent / "bundle" / "probe"


def probe_path_for(bundle_path=None) -> pathlib.Path:
    """The probe that goes with a bundle: its own `probe/` folder, else the shipped probe."""

    own = resolve_bundle_path(bundle_path) / "probe"
    return own if (own / "config.json").exists() else default_probe_path()


def load_probe(path=None) -> AttributeProbe:
    path = pathlib.Path(path) if path is not None else default_probe_path()
    cfg = ProbeConfig(**json.loads((path / "config.json").read_text()))
    probe = AttributeProbe(cfg)
    probe.load_state_dict(load_file(path / "model.safetensors"))
    return probe.eval()


def save_probe(probe: AttributeProbe, path, extra: dict | None = None) -> None:
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(asdict(probe.cfg), indent=2))
    if extra is not None:
        (path / "train_info.json").write_text(json.dumps(extra, indent=2))


_DEFAULT: AttributeProbe | None = None


ATTRIBUTES = ("position", "shape", "colour", "size")


def attribute_hits(
    images: torch.Tensor, scenes: Sequence[Scene], probe: AttributeProbe | None = None
) -> list[torch.Tensor]:
    """Per scene, a bool tensor (objects, 4): which of position, shape, colour, size the probe finds.

    An object's position counts as found when the probe sees an object in its
    cell; its shape, colour and size when the probe reads that value there.
    Colour and size only count where an object was seen at all.
    """
    global _DEFAULT
    if probe is None:
        if _DEFAULT is None:
            _DEFAULT = load_probe()
        probe = _DEFAULT
    pred = probe.predict(images.to(next(probe.parameters()).device))
    out = []
    for i, scene in enumerate(scenes):
        rows = []
        for o in scene.objects:
            shape, colour, size = (int(pred[k][i, o.cell]) for k in ("shape", "colour", "size"))
            seen = shape != 0
            rows.append([seen, shape == 1 + o.shape, seen and colour == o.colour, seen and size == o.size])
        out.append(torch.tensor(rows, dtype=torch.bool))
    return out


def attribute_accuracy(
    images: torch.Tensor, scenes: Sequence[Scene], probe: AttributeProbe | None = None
) -> torch.Tensor:
    """Per-prompt share (B,) of stated attributes (position, shape, colour, size of each object) found."""
    return torch.stack([h.float().mean() for h in attribute_hits(images, scenes, probe)])


def _augment(x: torch.Tensor, cfg: ProbeConfig, g: torch.Generator) -> torch.Tensor:
    """Pixel noise and, for half the batch, a light blur: generations are never pixel-perfect."""
    blur = torch.tensor([0.25, 0.5, 0.25])
    k = (blur[:, None] * blur[None, :]).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    pick = (torch.rand(x.shape[0], 1, 1, 1, generator=g) < 0.5).float()
    x = pick * blurred + (1 - pick) * x
    return x + cfg.noise_std * torch.rand(x.shape[0], 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)


def train_probe(cfg: ProbeConfig, log_every: int = 100) -> AttributeProbe:
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    probe = AttributeProbe(cfg)
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    for step in range(cfg.steps):
        scenes = sample_scenes(cfg.batch_size, seed=cfg.seed * 100_003 + step, branch=PROBE_SEED_BRANCH)
        x = _augment(render(scenes, cfg.image_size) * 2 - 1, cfg, g)
        target = cell_targets(scenes)
        logits = probe(x)
        loss = sum(F.cross_entropy(logits[k].reshape(-1, logits[k].shape[-1]), target[k].reshape(-1)) for k in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0:
            print(f"probe step {step + 1}/{cfg.steps} loss {loss.item():.4f}", flush=True)
    return probe.eval()


def main(argv=None) -> None:

    ap = argparse.ArgumentParser(description="Train the embedded model's attribute probe.")
    ap.add_argument("--out", default=str(default_probe_path()))
    ap.add_argument("--steps", type=int, default=ProbeConfig.steps)
    ap.add_argument("--seed", type=int, default=ProbeConfig.seed)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--image-size",
        type=int,
        default=ProbeConfig.image_size,
        help="size the probe is trained at (other sizes are resampled to it when read)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = ProbeConfig(steps=args.steps, seed=args.seed, image_size=args.image_size)
    start = time.time()
    probe = train_probe(cfg)
    scenes, _ = heldout_scenes(200, seed=0)
    acc = attribute_accuracy(render(scenes, cfg.image_size) * 2 - 1, scenes, probe).mean().item()
    info = {"wall_seconds": round(time.time() - start, 1), "heldout_rendered_accuracy": acc}
    save_probe(probe, args.out, extra=info)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
