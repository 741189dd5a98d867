"""Tiny SD3 and PixArt-Σ pipelines beyond text-to-image, built offline from :mod:`catlab.testing.tiny_pipelines`.

Each builder takes the components of the matching text-to-image pipeline (the same tokenizers, text encoders,
transformer, VAE and scheduler, drawn from the same seeds) and puts them into another stock diffusers pipeline
class, so a pruned variant can be compared with the stock text-to-image one component for component:

* ``sd3_img2img_pipeline``: ``StableDiffusion3Img2ImgPipeline``; called with ``image=`` and ``strength=``.
* ``sd3_inpaint_pipeline``: ``StableDiffusion3InpaintPipeline`` with the 16-channel transformer (the mask is
  applied by blending the noised input latents into the unmasked region after every step).
* ``sd3_controlnet_pipeline``: ``StableDiffusion3ControlNetPipeline`` with a tiny ``SD3ControlNetModel`` (2 joint
  blocks, the transformer's widths).  diffusers initialises a ControlNet's output projections and its
  conditioning embedding to zero (training starts from "no effect"); here they are drawn from a seeded normal
  distribution, so the residuals are non-zero and a test can see whether they reach the right tokens.
* ``pixart_sigma_dpm_pipeline``: ``PixArtSigmaPipeline`` with a ``DPMSolverMultistepScheduler`` configured
  otherwise than the text-to-image builder's (by default the stochastic ``sde-dpmsolver++`` with Karras
  sigmas: it draws noise from the call's generator at every step); keyword arguments override its config.

Import them from here (``from catlab.testing.tiny_sd3_variants import sd3_img2img_pipeline``): this module
builds on :mod:`catlab.testing.tiny_pipelines`, which therefore does not re-export it (that would be an import
circle).

``control_image``, ``init_image`` and ``inpaint_mask`` make the inputs these calls take: seeded PIL images of any
size (64x64 px by default, the builders' usual resolution: a 32x32 latent, 256 image tokens).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    PixArtSigmaPipeline,
    SD3ControlNetModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
)
from PIL import Image

from catlab.testing.tiny_pipelines import _seeded, pixart_sigma_pipeline, sd3_pipeline


def _components(pipe) -> dict:
    """A pipeline's components without the optional ones another pipeline class may not take."""
    return {name: module for name, module in pipe.components.items() if module is not None}


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_img2img_pipeline(seed: int = 0, vae_scale_factor: int = 2, **transformer_config):
    """:func:`~catlab.testing.tiny_pipelines.sd3_pipeline`'s components in a ``StableDiffusion3Img2ImgPipeline``."""
    t2i = sd3_pipeline(seed, vae_scale_factor, **transformer_config)
    return _quiet(StableDiffusion3Img2ImgPipeline(**_components(t2i)))


def sd3_inpaint_pipeline(seed: int = 0, vae_scale_factor: int = 2, **transformer_config):
    """:func:`~catlab.testing.tiny_pipelines.sd3_pipeline`'s components in a ``StableDiffusion3InpaintPipeline``."""
    t2i = sd3_pipeline(seed, vae_scale_factor, **transformer_config)
    return _quiet(StableDiffusion3InpaintPipeline(**_components(t2i)))


def tiny_sd3_controlnet(transformer, num_layers: int = 2, seed: int = 10, scale: float = 0.02) -> SD3ControlNetModel:
    """An ``SD3ControlNetModel`` with ``transformer``'s widths and ``num_layers`` joint blocks, every weight drawn
    from seeded generators; the zero-initialised output projections and conditioning embedding get
    ``N(0, scale²)`` weights so the ControlNet has an effect."""
    c = transformer.config
    with _seeded(seed):
        net = SD3ControlNetModel(
            sample_size=c.sample_size,
            patch_size=c.patch_size,
            in_channels=c.in_channels,
            num_layers=num_layers,
            attention_head_dim=c.attention_head_dim,
            num_attention_heads=c.num_attention_heads,
            joint_attention_dim=c.joint_attention_dim,
            caption_projection_dim=c.caption_projection_dim,
            pooled_projection_dim=c.pooled_projection_dim,
            out_channels=c.out_channels,
            pos_embed_max_size=c.pos_embed_max_size,
        ).eval()
        zeroed = [*net.controlnet_blocks, net.pos_embed_input]
        with torch.no_grad():
            for module in zeroed:
                for param in module.parameters():
                    param.normal_(0.0, scale)
    return net


def sd3_controlnet_pipeline(seed: int = 0, vae_scale_factor: int = 2, controlnet_layers: int = 2, **config):
    """:func:`~catlab.testing.tiny_pipelines.sd3_pipeline`'s components and :func:`tiny_sd3_controlnet` in a
    ``StableDiffusion3ControlNetPipeline`` (3 transformer blocks, 2 ControlNet blocks: diffusers adds ControlNet
    block ``int(i / 1.5)``'s residual after transformer block ``i``, except the context-pre-only last block)."""
    t2i = sd3_pipeline(seed, vae_scale_factor, **config)
    controlnet = tiny_sd3_controlnet(t2i.transformer, controlnet_layers, seed=seed + 10)
    return _quiet(StableDiffusion3ControlNetPipeline(**_components(t2i), controlnet=controlnet))


def pixart_sigma_dpm_pipeline(seed: int = 0, vae_scale_factor: int = 2, **scheduler_config) -> PixArtSigmaPipeline:
    """:func:`~catlab.testing.tiny_pipelines.pixart_sigma_pipeline` with the stochastic multistep DPM-Solver
    (``sde-dpmsolver++``, order 2, Karras sigmas) unless ``scheduler_config`` says otherwise."""
    pipe = pixart_sigma_pipeline(seed, vae_scale_factor)
    config = dict(algorithm_type="sde-dpmsolver++", solver_order=2, use_karras_sigmas=True)
    config.update(scheduler_config)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **config)
    return pipe


# -- inputs ------------------------------------------------------------------------------------------------------


def init_image(size: int = 64, seed: int = 0) -> Image.Image:
    """A smooth seeded RGB image (a colour gradient plus a disc): an img2img / inpainting input."""
    gen = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    colour = gen.uniform(0.2, 0.8, size=(3, 3))
    rgb = np.stack([colour[c, 0] * x + colour[c, 1] * y + colour[c, 2] * (1 - x) for c in range(3)], -1)
    disc = (x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.08
    rgb[disc] = gen.uniform(0, 1, size=3)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def inpaint_mask(size: int = 64, left: float = 0.5) -> Image.Image:
    """A mask that repaints the right part of the image (white, from ``left`` of the width on) and keeps the rest;
    its edge falls on a latent pixel boundary for even ``size * left``."""
    mask = np.zeros((size, size), np.uint8)
    mask[:, int(size * left) :] = 255
    return Image.fromarray(mask, mode="L")


def control_image(size: int = 64, seed: int = 1) -> Image.Image:
    """A seeded edge-like control image: white lines on black."""
    gen = np.random.default_rng(seed)
    img = np.zeros((size, size), np.uint8)
    for _ in range(4):
        if gen.uniform() < 0.5:
            img[int(gen.integers(0, size)), :] = 255
        else:
            img[:, int(gen.integers(0, size))] = 255
    return Image.fromarray(img, mode="L").convert("RGB")


__all__ = [
    "sd3_img2img_pipeline",
    "sd3_inpaint_pipeline",
    "sd3_controlnet_pipeline",
    "tiny_sd3_controlnet",
    "pixart_sigma_dpm_pipeline",
    "init_image",
    "inpaint_mask",
    "control_image",
]
