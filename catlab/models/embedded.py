"""The embedded default model: catlab's own small text-to-image MMDiT, trained on a shapes world.

It ships inside the package (``catlab/embedded/bundle/``), loads offline, and
really generates images of its prompts, so strategies can be judged on quality,
not only on cost. See ``docs/model_card.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers import FlowMatchEulerDiscreteScheduler

from catlab.embedded.bundle import load_bundle, weights_fingerprint
from catlab.models.base import Conditioning, ModelAdapter, with_unconditional
from catlab.registry import models


@models.register("embedded")
@dataclass
class Embedded(ModelAdapter):
    """``path`` null = the 32x32 bundle shipped with catlab, ``bundle_64`` = the shipped 64x64 one
    (``model=embedded_64``), else a bundle directory; images are pixel-space samples in [-1, 1]."""

    path: str | None = None
    height: int | None = None
    width: int | None = None
    bundle: object = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:

        self.bundle = load_bundle(self.path, device=self.device, dtype=self.torch_dtype)
        self.transformer = self.bundle.transformer
        size = self.bundle.image_size
        if (self.height or size) != size or (self.width or size) != size:
            raise ValueError(
                f"the embedded model generates {size}x{size} images; got height={self.height}, width={self.width}"
            )
        self.height = self.width = size

    def fingerprint(self) -> str:
        """A hash of the bundle's weight files: retraining the bundle invalidates cached references."""

        return weights_fingerprint(self.path)

    def make_scheduler(self):
        return FlowMatchEulerDiscreteScheduler.from_config(self.bundle.scheduler_config)

    def encode(self, prompts: list[str], guidance: bool) -> Conditioning:
        texts = with_unconditional(prompts, guidance)
        embeds, pooled = self.bundle.encode(texts)
        kw = dict(encoder_hidden_states=embeds.to(self.torch_device), pooled_projections=pooled.to(self.torch_device))
        return Conditioning(kw, 2 if guidance else 1, embeds.shape[1])

    def predict(self, latents, timestep, cond):
        t = timestep.expand(latents.shape[0]).to(latents.dtype)
        return self.transformer(hidden_states=latents, timestep=t, return_dict=False, **cond.kwargs)[0]
