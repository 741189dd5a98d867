"""The checkpoint adapters (``model=flux``, ``model=qwen_image``) on complete tiny pipelines saved to a folder.

The real checkpoints need a GPU and a download; the adapters' code (prompt encoding,
the scheduler's resolution-dependent shift, packing, VAE decode) is the same on a
tiny pipeline saved locally with ``save_pretrained``, which is what runs here.
"""

from __future__ import annotations

import pytest
import torch

from catlab.sampler import SamplerConfig, sample
from catlab.selection.simple import Random


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_checkpoint_adapters_load_a_local_pipeline_folder(tmp_path, family):
    """``model=flux`` / ``model=qwen_image`` on a complete tiny pipeline saved to a folder: encode, shifted
    scheduler, pruned sampling and VAE decode, offline."""
    import math

    from catlab.registry import models
    from catlab.testing.tiny_pipelines import flux_pipeline, qwen_image_pipeline

    (flux_pipeline if family == "flux" else qwen_image_pipeline)().save_pretrained(tmp_path)
    adapter = models.build(
        {
            "name": family,
            "path": str(tmp_path),
            "device": "cpu",
            "dtype": "float32",
            "height": 64,
            "width": 64,
            "max_sequence_length": 32,
        }
    )
    assert adapter.grid == (16, 16) and adapter.latent_channels == 4
    config = adapter.pipeline.scheduler.config
    mu = config.base_shift + (config.max_shift - config.base_shift) * (256 - config.base_image_seq_len) / (
        config.max_image_seq_len - config.base_image_seq_len
    )
    scheduler = adapter.make_scheduler()
    adapter.set_timesteps(scheduler, 4)  # the pipeline's spacing: 1 … 1/4 unshifted, shifted by exp(mu)
    shift, even = math.exp(mu), torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    torch.testing.assert_close(
        scheduler.sigmas[:-1].double(), shift * even / (1 + (shift - 1) * even), atol=1e-6, rtol=0
    )
    cfg = SamplerConfig(num_steps=4, guidance_scale=3.5, progress=False)
    result = sample(adapter, Random(alpha=0.3, start_step=2), ["a red circle", "a blue square"], [0, 1], cfg)
    assert result.images.shape == (2, 3, 64, 64) and [s.kept for s in result.trace.steps] == [256, 256, 76, 76]
    assert result.trace.batch_size == 2 and torch.isfinite(result.images).all()


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_the_full_model_in_catlabs_loop_is_the_stock_pipeline_call(tmp_path, family):
    """catlab's loop steps a FLUX.1 or Qwen-Image checkpoint as its pipeline does (the same sigmas, the same
    resolution shift): with ``selector=full`` its images are the stock call's with the same initial noise, so
    a pruned image's PSNR is measured against what users get from the pipeline."""
    from catlab.models.packed import pack
    from catlab.registry import models, selectors
    from catlab.testing.tiny_pipelines import flux_pipeline, qwen_image_pipeline

    (flux_pipeline if family == "flux" else qwen_image_pipeline)().save_pretrained(tmp_path)
    spec = {"name": family, "path": str(tmp_path), "device": "cpu", "dtype": "float32", "height": 64, "width": 64}
    adapter = models.build({**spec, "max_sequence_length": 32})
    prompts, seeds, steps = ["a red circle", "a blue square"], [0, 1], 5
    scale = 3.5 if family == "flux" else 1.0  # FLUX.1: the distilled guidance input; Qwen-Image: no true CFG
    ran = sample(
        adapter,
        selectors.build("full"),
        prompts,
        seeds,
        SamplerConfig(num_steps=steps, guidance_scale=scale, progress=False),
    )
    kwargs = {"guidance_scale": scale} if family == "flux" else {"true_cfg_scale": 1.0}
    stock = adapter.pipeline(
        prompts,
        num_inference_steps=steps,
        height=64,
        width=64,
        latents=pack(adapter.initial_latents(seeds)),
        output_type="pt",
        max_sequence_length=32,
        **kwargs,
    ).images
    torch.testing.assert_close(stock.float(), ran.images, atol=1e-5, rtol=0)
