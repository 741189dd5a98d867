"""What the sampler needs from a model family, and nothing more.

An adapter wraps one text-to-image transformer with its prompt encoding, its
initial noise, its scheduler and its decoder. It never knows which selection
strategy runs; the pruning engine reaches the transformer through hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class Conditioning:
    """Transformer keyword arguments for the stacked batch rows.

    With classifier-free guidance the rows are ``[unconditional; conditional]``
    (``groups = 2``), as in the diffusers pipelines; ``num_text_tokens`` feeds the
    MAC counter.
    """

    kwargs: dict[str, Any]
    groups: int
    num_text_tokens: int


@dataclass
class ModelAdapter:
    """Base adapter. Subclasses set ``transformer`` and override the hooks below."""

    device: str = "cpu"
    dtype: str = "float32"
    height: int = 32
    width: int = 32
    transformer: nn.Module | None = field(default=None, init=False, repr=False)
    #: seeded random weights (cost, not quality): tables say so next to the model's name
    random_weights = False
    #: the guidance scale is a model input and a step runs one branch (FLUX.1-dev), not stacked CFG branches
    guidance_distilled: ClassVar[bool] = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    # -- shapes ------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.patch_size)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def latent_size(self) -> tuple[int, int]:
        """(H, W) of the transformer's input; pixel space unless a VAE downsamples."""
        return self.height // self.vae_scale, self.width // self.vae_scale

    @property
    def vae_scale(self) -> int:
        return 1

    def fingerprint(self) -> str | None:
        """An id of the weights where the config alone does not pin them (a local checkpoint that can be
        retrained); it keys cached reference images and results. ``None``: the config identifies them."""
        return None

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.latent_size
        return h // self.patch_size, w // self.patch_size

    # -- the generation steps ------------------------------------------------------
    #: a name for how :meth:`set_timesteps` spaces the steps where that is not the scheduler's own spacing
    #: (``None``): it keys cached references and records, so a changed spacing never meets old images
    timesteps: ClassVar[str | None] = None

    def make_scheduler(self):
        raise NotImplementedError

    def set_timesteps(self, scheduler, num_steps: int) -> None:
        """Space ``scheduler``'s ``num_steps`` steps as the model's own pipeline does; by default the
        scheduler's own ``set_timesteps(num_steps)``."""
        scheduler.set_timesteps(num_steps, device=self.torch_device)

    def encode(self, prompts: list[str], guidance: bool) -> Conditioning:
        raise NotImplementedError

    def embed_guidance(self, cond: Conditioning, scale: float) -> Conditioning:
        """A guidance-distilled model's conditioning with the guidance scale as its input (others: unchanged)."""
        return cond

    def initial_latents(self, seeds: list[int]) -> torch.Tensor:
        """One seeded CPU noise draw per image, so a seed gives the same image on any device."""
        h, w = self.latent_size
        noise = [
            torch.randn(1, self.latent_channels, h, w, generator=torch.Generator().manual_seed(int(s))) for s in seeds
        ]
        return torch.cat(noise).to(self.torch_device, self.torch_dtype)

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model output for the stacked rows, in the latents' shape."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], ``(B, 3, H, W)``, float32 on the CPU; by default a pixel-space model's [-1, 1] output."""
        return ((latents.float().cpu() + 1) / 2).clamp(0, 1)


def with_unconditional(prompts: list[str], guidance: bool) -> list[str]:
    """The prompts of the stacked rows: ``["", ...] + prompts`` with classifier-free guidance."""
    return ([""] * len(prompts) + list(prompts)) if guidance else list(prompts)


@dataclass
class PipelineAdapter(ModelAdapter):
    """Base of adapters around a real diffusers pipeline loaded with ``from_pretrained``.

    ``path`` is a hub id or a local folder; the weights must be present (catlab never
    downloads inside tests). Subclasses name the pipeline class and encode/decode.
    """

    pipeline_class = ""
    path: str = ""
    height: int = 1024
    width: int = 1024
    dtype: str = "float16"
    device: str = "cuda"
    max_sequence_length: int = 256
    pipeline: object = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        self.pipeline = cls.from_pretrained(self.path, torch_dtype=self.torch_dtype).to(self.device)
        self.transformer = self.pipeline.transformer

    @property
    def vae_scale(self) -> int:
        return self.pipeline.vae_scale_factor

    def make_scheduler(self):
        return type(self.pipeline.scheduler).from_config(self.pipeline.scheduler.config)
