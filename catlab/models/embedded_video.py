"""The embedded video model: catlab's own small Wan2.1-architecture text-to-video model.

It ships inside the package (``catlab/embedded/video_bundle/``), loads offline and generates
8-frame 32x32 clips of moving shapes (2,048 video tokens), so video strategies can be judged on
quality (catlab.embedded.video_probe reads attributes and motion back), not only on cost.
See ``docs/model_card_video.md``.

Layout: the sampler's latents are ``(B, 3, frames * H, W)``, the frames stacked along the
height. Row-major 2x2 patches of that image are exactly Wan's (1, 2, 2) patches of the
``(B, 3, frames, H, W)`` video in Wan's token order (frames outermost), with the same channel
layout (p_h, p_w, C), so the loop's patchify/unpatchify serve it unchanged while the transformer
sees the video; :attr:`grid` declares the (frames, h, w) token grid. :meth:`decode` returns videos
``(B, frames, 3, H, W)`` in [0, 1] (the image adapters' range).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from catlab.embedded.video import default_video_bundle_path, load_video_bundle, video_weights_fingerprint
from catlab.models.base import Conditioning, ModelAdapter, with_unconditional
from catlab.registry import models


@models.register("embedded_video")
@dataclass
class EmbeddedVideo(ModelAdapter):
    """``path`` null = the bundle shipped with catlab, else a video bundle directory."""

    path: str | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    bundle: object = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.bundle = load_video_bundle(self.path, device=self.device, dtype=self.torch_dtype)
        self.transformer = self.bundle.transformer
        size, frames = self.bundle.image_size, self.bundle.frames
        if (self.height or size) != size or (self.width or size) != size or (self.frames or frames) != frames:
            raise ValueError(
                f"the embedded video model generates {frames} frames of {size}x{size}; "
                f"got frames={self.frames}, height={self.height}, width={self.width}"
            )
        self.height = self.width = size
        self.frames = frames

    def fingerprint(self) -> str:
        """A hash of the bundle's weight files: retraining invalidates cached references."""
        return video_weights_fingerprint(self.path)

    # -- shapes: a video of `frames` frames stacked along the height -------------------
    @property
    def patch_size(self) -> int:
        """The spatial patch (Wan's is (1, p, p): one frame deep)."""
        return int(self.transformer.config.patch_size[-1])

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.frames * self.height, self.width

    @property
    def grid(self) -> tuple[int, int, int]:
        p = self.patch_size
        return self.frames, self.height // p, self.width // p

    # -- generation --------------------------------------------------------------------
    def make_scheduler(self):
        return FlowMatchEulerDiscreteScheduler.from_config(self.bundle.scheduler_config)

    def encode(self, prompts: list[str], guidance: bool) -> Conditioning:
        texts = with_unconditional(prompts, guidance)
        states = self.bundle.encode(texts).to(self.torch_device)
        return Conditioning({"encoder_hidden_states": states}, 2 if guidance else 1, states.shape[1])

    def initial_latents(self, seeds: list[int]) -> torch.Tensor:
        """One seeded CPU draw per video, (B, 3, frames * H, W): the same draw, frame by frame, as
        ``torch.randn(1, 3, frames, H, W)`` (what :func:`catlab.embedded.video.generate_video` draws)."""
        noise = [
            torch.randn(1, 3, self.frames, self.height, self.width, generator=torch.Generator().manual_seed(int(s)))
            for s in seeds
        ]
        return self.to_stacked(torch.cat(noise)).to(self.torch_device, self.torch_dtype)

    def to_video(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, frames * H, W) -> Wan's (B, C, frames, H, W)."""
        b, c = latents.shape[:2]
        return latents.reshape(b, c, self.frames, self.height, self.width)

    def to_stacked(self, video: torch.Tensor) -> torch.Tensor:
        """Wan's (B, C, frames, H, W) -> (B, C, frames * H, W)."""
        b, c = video.shape[:2]
        return video.reshape(b, c, self.frames * self.height, self.width)

    def predict(self, latents, timestep, cond):
        t = timestep.expand(latents.shape[0]).to(latents.dtype)
        out = self.transformer(hidden_states=self.to_video(latents), timestep=t, return_dict=False, **cond.kwargs)[0]
        return self.to_stacked(out)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Videos in [0, 1], ``(B, frames, 3, H, W)``, float32 on the CPU."""
        video = self.to_video(latents.float().cpu()).transpose(1, 2)
        return ((video + 1) / 2).clamp(0, 1)


__all__ = ["EmbeddedVideo", "default_video_bundle_path"]
