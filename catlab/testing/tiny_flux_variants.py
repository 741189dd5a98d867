"""Tiny FLUX.1 pipelines beyond text-to-image, built offline from the components of
:func:`~catlab.testing.tiny_pipelines.flux_pipeline` (the same tokenizers, text encoders, VAE, scheduler and
seeded random weights).

* ``flux_img2img_pipeline``: ``FluxImg2ImgPipeline`` -- ``pipe(prompt, image=..., strength=0.6)`` starts from the
  image's latents, noised to the ``strength``-th step, and runs ``int(steps * strength)`` steps.
* ``flux_inpaint_pipeline``: ``FluxInpaintPipeline`` -- ``pipe(prompt, image=..., mask_image=...)``: after each step
  the latents outside the mask (white = repaint) are reset to the image's, noised to the next step.
* ``flux_fill_pipeline``: ``FluxFillPipeline`` (FLUX.1-Fill's layout) -- the transformer takes each token's latent
  channels concatenated with the masked image's and the mask's: ``in_channels`` = 16 + 16 + 4·(VAE scale)² = 48
  with the default VAE (FLUX.1-Fill: 64 + 64 + 256 = 384), ``out_channels`` 16.
* ``flux_controlnet_pipeline``: ``FluxControlNetPipeline`` with a tiny ``FluxControlNetModel`` (1 dual- and 1
  single-stream block, seeded): ``pipe(prompt, control_image=..., controlnet_conditioning_scale=0.7)``; its
  per-block residuals are added to the transformer's image tokens.
* ``flux_kontext_pipeline``: ``FluxKontextPipeline`` (image editing) -- ``pipe(prompt, image=...)``: the reference
  image's tokens follow the generated image's in the transformer's sequence (their ``img_ids`` first coordinate is
  1); pass ``_auto_resize=False, max_area=64**2`` for a 64x64 run (the pipeline otherwise resizes the reference
  and the output to ~1 Mpx).

Shapes as for ``flux_pipeline``: a 64x64 request is a 32x32 latent, 16x16 = 256 tokens; a 64x64 reference adds
256 more to Kontext's sequence. :func:`tiny_image` and :func:`tiny_mask` make inputs for them.
"""

from __future__ import annotations

import inspect

import numpy as np
from diffusers import (
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextPipeline,
)
from PIL import Image

from catlab.testing.tiny_pipelines import FLUX_CLIP_DIM, FLUX_LATENT_CHANNELS, FLUX_T5_DIM, _seeded, flux_pipeline


def _from_flux(cls, seed: int, vae_scale_factor: int, transformer_config: dict, **extra):
    components = flux_pipeline(seed, vae_scale_factor, **transformer_config).components
    accepted = inspect.signature(cls.__init__).parameters
    pipe = cls(**{k: v for k, v in components.items() if k in accepted}, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_img2img_pipeline(seed: int = 0, vae_scale_factor: int = 2, **transformer_config) -> FluxImg2ImgPipeline:
    """FLUX.1 image-to-image in miniature (the components of :func:`flux_pipeline`)."""
    return _from_flux(FluxImg2ImgPipeline, seed, vae_scale_factor, transformer_config)


def flux_inpaint_pipeline(seed: int = 0, vae_scale_factor: int = 2, **transformer_config) -> FluxInpaintPipeline:
    """FLUX.1 inpainting in miniature (the components of :func:`flux_pipeline`)."""
    return _from_flux(FluxInpaintPipeline, seed, vae_scale_factor, transformer_config)


def flux_fill_pipeline(seed: int = 0, vae_scale_factor: int = 2, **transformer_config) -> FluxFillPipeline:
    """FLUX.1-Fill in miniature: the transformer's tokens carry latents, masked-image latents and the mask."""
    packed = 4 * FLUX_LATENT_CHANNELS
    config = dict(in_channels=2 * packed + 4 * vae_scale_factor**2, out_channels=packed)
    config.update(transformer_config)
    return _from_flux(FluxFillPipeline, seed, vae_scale_factor, config)


def tiny_flux_controlnet(seed: int = 10, num_layers: int = 1, num_single_layers: int = 1) -> FluxControlNetModel:
    """A FluxControlNetModel matching :func:`flux_pipeline`'s transformer (heads, text and pooled widths, rotary
    axes, guidance input), seeded. Its output blocks are zero-initialised in diffusers; they are drawn here so the
    control image matters."""
    with _seeded(seed):
        net = FluxControlNetModel(
            patch_size=1,
            in_channels=4 * FLUX_LATENT_CHANNELS,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=FLUX_T5_DIM,
            pooled_projection_dim=FLUX_CLIP_DIM,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ).eval()
        for proj in (*net.controlnet_blocks, *net.controlnet_single_blocks, net.controlnet_x_embedder):
            proj.weight.data.normal_(0.0, 0.2)
    return net


def flux_controlnet_pipeline(seed: int = 0, vae_scale_factor: int = 2, **transformer_config) -> FluxControlNetPipeline:
    """FLUX.1 with a tiny ControlNet (:func:`tiny_flux_controlnet`)."""
    return _from_flux(
        FluxControlNetPipeline, seed, vae_scale_factor, transformer_config, controlnet=tiny_flux_controlnet(seed + 10)
    )


def flux_kontext_pipeline(seed: int = 0, vae_scale_factor: int = 2, **transformer_config) -> FluxKontextPipeline:
    """FLUX.1-Kontext in miniature (image editing; the components of :func:`flux_pipeline`)."""
    return _from_flux(FluxKontextPipeline, seed, vae_scale_factor, transformer_config)


def tiny_image(size: int = 64, seed: int = 0) -> Image.Image:
    """A seeded RGB test image: smooth colour ramps plus noise, ``size`` x ``size``."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)
    rgb = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), 255 - ramp[None, :].repeat(size, 0)])
    rgb = rgb.transpose(1, 2, 0) + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def tiny_mask(size: int = 64) -> Image.Image:
    """A mask that repaints (white) the centre half of a ``size`` x ``size`` image and keeps the rest (black)."""
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(mask)


__all__ = [
    "flux_img2img_pipeline",
    "flux_inpaint_pipeline",
    "flux_fill_pipeline",
    "flux_controlnet_pipeline",
    "flux_kontext_pipeline",
    "tiny_flux_controlnet",
    "tiny_image",
    "tiny_mask",
]
