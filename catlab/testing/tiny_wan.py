"""A complete, tiny, randomly initialised ``WanPipeline`` (Wan2.1 text to video), built offline from configs.

Every component of the real pipeline is here: a UMT5 text encoder with a unigram tokenizer in T5's format (made
the way :mod:`catlab.testing.tiny_pipelines` makes T5's), the 3D causal Wan VAE, the Wan transformer and Wan's
UniPC flow-matching scheduler (``flow_shift`` 3.0, the 480p setting), so a test calls
``pipe("a prompt", height=64, width=64, num_frames=5, num_inference_steps=4)`` as a user would. Nothing is read
from a model hub; every weight is drawn from a seeded generator and the caller's RNG is left untouched.

Shapes. The VAE downsamples by 4 in space and 4 in time (as the real one does in time; 8 in space there):
5 frames of 64x64 px are a latent of 2 frames of 16x16 with 4 channels; with the transformer's ``(1, 2, 2)``
patches that is a ``(2, 8, 8)`` token grid, 128 tokens. Text tokens per prompt: ``max_sequence_length``
(512 unless the call says otherwise), zero-padded after the prompt's own, as the pipeline pads them.
"""

from __future__ import annotations

from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

from catlab.testing.tiny_pipelines import _seeded, _t5_encoder, t5_tokenizer

#: whole words get their own piece; anything else is spelled out of single characters
WORDS = (
    "a", "an", "the", "of", "on", "in", "and", "red", "green", "blue", "yellow", "white", "black",
    "small", "large", "circle", "square", "triangle", "star", "cat", "dog", "car", "moving", "left",
    "right", "up", "down", "slowly", "fast", "rotating", "bouncing", "background", "blurry", "static",
)  # fmt: skip
WAN_TEXT_DIM = 32
WAN_LATENT_CHANNELS = 4


def umt5_tokenizer(words=WORDS, model_max_length: int = 512) -> T5Tokenizer:
    """UMT5's tokenizer has T5's format: catlab's tiny unigram T5 tokenizer over Wan's test words."""
    return t5_tokenizer(words, model_max_length)


def _umt5_encoder(tokenizer, seed: int) -> UMT5EncoderModel:
    return _t5_encoder(tokenizer, WAN_TEXT_DIM, seed, UMT5EncoderModel, UMT5Config)


def tiny_wan_vae(seed: int = 1) -> AutoencoderKLWan:
    """The Wan VAE with 8 base channels, two spatial and two temporal downsamplings (factors 4 and 4)."""
    with _seeded(seed):
        return AutoencoderKLWan(
            base_dim=8,
            z_dim=WAN_LATENT_CHANNELS,
            dim_mult=[1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[True, True],
            latents_mean=[0.0] * WAN_LATENT_CHANNELS,
            latents_std=[1.0] * WAN_LATENT_CHANNELS,
            scale_factor_temporal=4,
            scale_factor_spatial=4,
        ).eval()


def wan_pipeline(seed: int = 0, **transformer_config) -> WanPipeline:
    """Wan2.1 text to video in miniature: 2 blocks, 2 heads of 16 (3D rotary positions), UMT5 text of width 32.

    Keyword arguments override the WanTransformer3DModel config (e.g. ``num_layers=1``)."""
    tokenizer = umt5_tokenizer()
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=WAN_LATENT_CHANNELS,
        out_channels=WAN_LATENT_CHANNELS,
        text_dim=WAN_TEXT_DIM,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        rope_max_seq_len=64,
    )
    config.update(transformer_config)
    with _seeded(seed):
        transformer = WanTransformer3DModel(**config).eval()
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_umt5_encoder(tokenizer, seed + 2),
        vae=tiny_wan_vae(seed + 1),
        scheduler=scheduler,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def checkpoint_adapter(
    height: int = 32, width: int = 32, num_frames: int = 5, max_sequence_length: int = 16, **kwargs
):
    """The checkpoint adapter (``model=wan2_1_t2v``) around :func:`wan_pipeline`, held in memory: everything but
    ``from_pretrained`` (which, for a Wan transformer, needs the ``accelerate`` package)."""
    from dataclasses import dataclass

    from catlab.families.wan import Wan21T2V

    @dataclass
    class InMemory(Wan21T2V):
        given: object = None

        def load(self):
            self.pipeline, self.transformer = self.given, self.given.transformer

    return InMemory(
        device="cpu", dtype="float32", height=height, width=width, num_frames=num_frames,
        max_sequence_length=max_sequence_length, given=wan_pipeline(), **kwargs,
    )  # fmt: skip


def stock_pipeline(adapter) -> WanPipeline:
    """A stock ``WanPipeline`` on ``adapter``'s components and a fresh scheduler of its settings (no progress bar)."""
    pipe = WanPipeline(**{**adapter.pipeline.components, "scheduler": adapter.make_scheduler()})
    pipe.set_progress_bar_config(disable=True)
    return pipe
