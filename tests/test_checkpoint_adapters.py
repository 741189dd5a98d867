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
    assert adapter.make_scheduler().config.shift == pytest.approx(math.exp(mu))
    cfg = SamplerConfig(num_steps=4, guidance_scale=3.5, progress=False)
    result = sample(adapter, Random(alpha=0.3, start_step=2), ["a red circle", "a blue square"], [0, 1], cfg)
    assert result.images.shape == (2, 3, 64, 64) and [s.kept for s in result.trace.steps] == [256, 256, 76, 76]
    assert result.trace.batch_size == 2 and torch.isfinite(result.images).all()
