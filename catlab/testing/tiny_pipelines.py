"""Complete, tiny, randomly initialised diffusers pipelines, built offline from configs.

Every component of a real text-to-image pipeline is here -- tokenizers, text encoders, transformer, VAE and
scheduler -- so a test can call ``pipe("a prompt", num_inference_steps=3, output_type="pil")`` exactly as a user
would.  Nothing is read from a model hub: the tokenizers are made from a small vocabulary written below (through
the ``tokenizers`` library that backs the transformers tokenizer classes) and every weight is drawn from a seeded
generator.  The global torch RNG of the caller is left untouched.

Shapes.  All transformers have ``sample_size=32`` and ``patch_size=2`` and the default VAE downsamples by 2, so
the default (and the usual test) resolution is 64x64 px: a 32x32 latent, i.e. 256 image tokens.

* ``sd3_pipeline`` / ``sd35_pipeline``: two CLIP encoders (hidden 16 and 24, projections 16 and 24, so the pooled
  vector has 40 = ``pooled_projection_dim`` features) and a T5 encoder with ``d_model`` 48
  (= ``joint_attention_dim``; the concatenated CLIP states, 16 + 24 = 40 wide, are zero-padded up to it).  Text
  tokens per prompt: 77 (CLIP) + ``max_sequence_length`` (T5, 256 unless the call says otherwise).
* ``pixart_sigma_pipeline`` / ``pixart_alpha_pipeline``: a T5 encoder with ``d_model`` 32 (= ``caption_channels``),
  4 latent channels, 8 output channels (learned sigma).  PixArt pipelines bin the resolution by default
  (``use_resolution_binning=True``): with ``sample_size=32`` they generate at the 256-px aspect-ratio bin and
  resize back, so a 64x64 request is denoised at 256x256 px (128x128 latent, 4096 tokens with the default VAE).
  Pass ``use_resolution_binning=False`` to denoise at the requested size, or build with ``vae_scale_factor=8``
  to make the binned 256-px run a 32x32 latent (256 tokens).
* ``flux_pipeline``: FLUX.1-dev's layout (guidance input, dual- then single-stream blocks, rotary positions): a
  CLIP text encoder (hidden 16, its pooled output = ``pooled_projection_dim``) and a T5 encoder with ``d_model``
  32 (= ``joint_attention_dim``), 4 latent channels packed 2x2 into 16-channel tokens.  A 64x64 request is a
  32x32 latent, 16x16 = 256 tokens; text tokens per prompt: ``max_sequence_length`` (T5, 512 unless the call
  says otherwise).
* ``qwen_image_pipeline``: Qwen-Image's layout (dual-stream blocks, complex rotary positions, a text mask, true
  CFG as a second call): a Qwen2.5-VL text encoder (text hidden 32 = ``joint_attention_dim``, one layer; a
  one-block vision tower) with a byte-level BPE tokenizer, the 3D-causal Qwen-Image VAE (4 latent channels,
  downsampling by 2).  A 64x64 request is a 32x32 latent, 16x16 = 256 tokens; the text tokens are the prompt's
  after the pipeline's 34-token template.
"""

from __future__ import annotations

import json
import math
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

# Whole words get their own token (CLIP: a BPE merge chain, T5: a unigram piece); anything else is spelled out of
# single characters, so every prompt tokenizes.
WORDS = (
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "at",
    "with",
    "and",
    "photo",
    "painting",
    "picture",
    "drawing",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "orange",
    "purple",
    "small",
    "large",
    "big",
    "circle",
    "square",
    "triangle",
    "star",
    "cat",
    "dog",
    "bird",
    "horse",
    "car",
    "house",
    "tree",
    "flower",
    "sky",
    "sea",
    "mountain",
    "city",
    "table",
    "cup",
    "apple",
    "banana",
    "astronaut",
    "riding",
    "sitting",
    "background",
    "blurry",
    "deformed",
    "ugly",
    "low",
    "quality",
)

CLIP_MAX_LENGTH = 77


@contextmanager
def _seeded(seed: int):
    """Draw from torch's CPU RNG seeded with ``seed`` and restore the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# -- tokenizers --------------------------------------------------------------------------------------------------


def clip_tokenizer(words=WORDS, model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer: the 256 byte symbols (alone and word-final), one merge chain per word.

    Special tokens come last, as in OpenAI's vocabulary: ``<|startoftext|>`` (bos) then ``<|endoftext|>``
    (eos, unk and pad).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [s + "</w>" for s in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
            parts = [merged] + parts[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def t5_tokenizer(words=WORDS, model_max_length: int = 512) -> T5Tokenizer:
    """A unigram T5 tokenizer: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, the word-start marker, single characters
    (cheap fallback) and one piece per word (preferred)."""
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [(c, -8.0) for c in chars]
    pieces += [("\u2581" + c, -7.0) for c in chars]
    pieces += [("\u2581" + w, -2.0) for w in words if len(w) > 1]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


# -- text encoders -----------------------------------------------------------------------------------------------


def _clip_encoder(
    tokenizer: CLIPTokenizer, hidden: int, projection: int, seed: int, cls=CLIPTextModelWithProjection
) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        return cls(config).eval()


def _t5_encoder(
    tokenizer: T5Tokenizer, d_model: int, seed: int, model_cls=T5EncoderModel, config_cls=T5Config
) -> T5EncoderModel:
    """A two-layer T5 encoder (or, with ``model_cls``/``config_cls``, another of its kind: Wan's UMT5)."""
    config = config_cls(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        return model_cls(config).eval()


# -- VAE ---------------------------------------------------------------------------------------------------------


def tiny_vae(latent_channels: int, vae_scale_factor: int = 2, seed: int = 0, **config) -> AutoencoderKL:
    """An AutoencoderKL with ``log2(vae_scale_factor) + 1`` blocks of 8 channels (pipelines read the scale factor
    from ``len(block_out_channels)``)."""
    blocks = int(math.log2(vae_scale_factor)) + 1
    if 2 ** (blocks - 1) != vae_scale_factor:
        raise ValueError(f"vae_scale_factor must be a power of two, got {vae_scale_factor}")
    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=latent_channels,
            block_out_channels=(8,) * blocks,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=64,
            **config,
        ).eval()


# -- Stable Diffusion 3 / 3.5 ------------------------------------------------------------------------------------

SD3_CLIP_L = dict(hidden=16, projection=16)
SD3_CLIP_G = dict(hidden=24, projection=24)
SD3_T5_DIM = 48  # >= 16 + 24: the joined CLIP states are zero-padded to the T5 width
SD3_LATENT_CHANNELS = 16


def _sd3(transformer_config: dict, seed: int, vae_scale_factor: int) -> StableDiffusion3Pipeline:
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    config = dict(
        sample_size=32,
        patch_size=2,
        in_channels=SD3_LATENT_CHANNELS,
        out_channels=SD3_LATENT_CHANNELS,
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        caption_projection_dim=32,
        joint_attention_dim=SD3_T5_DIM,
        pooled_projection_dim=SD3_CLIP_L["projection"] + SD3_CLIP_G["projection"],
        pos_embed_max_size=96,
    )
    config.update(transformer_config)
    with _seeded(seed):
        transformer = SD3Transformer2DModel(**config).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=tiny_vae(
            SD3_LATENT_CHANNELS,
            vae_scale_factor,
            seed=seed + 1,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=1.5305,
            shift_factor=0.0609,
        ),
        text_encoder=_clip_encoder(tokenizer, **SD3_CLIP_L, seed=seed + 2),
        tokenizer=tokenizer,
        text_encoder_2=_clip_encoder(tokenizer_2, **SD3_CLIP_G, seed=seed + 3),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(tokenizer_3, SD3_T5_DIM, seed=seed + 4),
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipeline(seed: int = 0, vae_scale_factor: int = 2, **transformer_config) -> StableDiffusion3Pipeline:
    """SD3-medium in miniature: 3 joint blocks (the last one context-pre-only), 2 heads of 16, no qk-norm.

    Keyword arguments override the SD3Transformer2DModel config (e.g. ``num_layers=2``).
    """
    return _sd3(transformer_config, seed, vae_scale_factor)


def sd35_pipeline(seed: int = 0, vae_scale_factor: int = 2, **transformer_config) -> StableDiffusion3Pipeline:
    """SD3.5-medium in miniature: RMS qk-norm and a second (image-only) attention in block 0; 3 blocks, so
    ``skip_guidance_layers=[1]`` (the SD3.5 recommendation is [7, 8, 9]) names a real middle block."""
    config = dict(qk_norm="rms_norm", dual_attention_layers=(0,), num_layers=3)
    config.update(transformer_config)
    return _sd3(config, seed, vae_scale_factor)


# -- PixArt-alpha / PixArt-Sigma ---------------------------------------------------------------------------------

PIXART_T5_DIM = 32
PIXART_LATENT_CHANNELS = 4


def _pixart(cls, transformer_config: dict, seed: int, vae_scale_factor: int):
    tokenizer = t5_tokenizer()
    config = dict(
        sample_size=32,
        patch_size=2,
        in_channels=PIXART_LATENT_CHANNELS,
        out_channels=2 * PIXART_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        cross_attention_dim=32,
        caption_channels=PIXART_T5_DIM,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    config.update(transformer_config)
    with _seeded(seed):
        transformer = PixArtTransformer2DModel(**config).eval()
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        solver_order=2,
        algorithm_type="dpmsolver++",
        lower_order_final=True,
    )
    pipe = cls(
        tokenizer=tokenizer,
        text_encoder=_t5_encoder(tokenizer, PIXART_T5_DIM, seed=seed + 4),
        vae=tiny_vae(PIXART_LATENT_CHANNELS, vae_scale_factor, seed=seed + 1, scaling_factor=0.18215),
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_sigma_pipeline(seed: int = 0, vae_scale_factor: int = 2, **transformer_config) -> PixArtSigmaPipeline:
    """PixArt-Sigma in miniature: 2 blocks (self-attention, cross-attention to T5, adaLN-single), learned sigma.

    The pipeline's default ``max_sequence_length`` is 300 T5 tokens.  Keyword arguments override the
    PixArtTransformer2DModel config; ``sample_size`` must stay 32, 64, 128 or 256 for resolution binning.
    """
    return _pixart(PixArtSigmaPipeline, transformer_config, seed, vae_scale_factor)


def pixart_alpha_pipeline(seed: int = 0, vae_scale_factor: int = 2, **transformer_config) -> PixArtAlphaPipeline:
    """PixArt-alpha in miniature, the same components as :func:`pixart_sigma_pipeline` (120 T5 tokens by default).

    With ``sample_size=128`` the transformer would also take resolution/aspect-ratio micro-conditions; at 32 it
    does not (as with the 256/512 checkpoints).
    """
    return _pixart(PixArtAlphaPipeline, transformer_config, seed, vae_scale_factor)


# -- FLUX.1 ------------------------------------------------------------------------------------------------------

FLUX_CLIP_DIM = 16
FLUX_T5_DIM = 32
FLUX_LATENT_CHANNELS = 4


def flux_pipeline(seed: int = 0, vae_scale_factor: int = 2, **transformer_config) -> FluxPipeline:
    """FLUX.1-dev in miniature: 2 dual-stream and 2 single-stream blocks, 2 heads of 16 (rotary axes 4+6+6),
    the guidance embedding, a scheduler with FLUX's resolution-dependent shift.

    Keyword arguments override the FluxTransformer2DModel config (``guidance_embeds=False``: schnell's layout).
    """
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    config = dict(
        patch_size=1,
        in_channels=4 * FLUX_LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=FLUX_T5_DIM,
        pooled_projection_dim=FLUX_CLIP_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    config.update(transformer_config)
    with _seeded(seed):
        transformer = FluxTransformer2DModel(**config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(
            FLUX_LATENT_CHANNELS,
            vae_scale_factor,
            seed=seed + 1,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        ),
        text_encoder=_clip_encoder(tokenizer, FLUX_CLIP_DIM, FLUX_CLIP_DIM, seed=seed + 2, cls=CLIPTextModel),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(tokenizer_2, FLUX_T5_DIM, seed=seed + 4),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- Qwen-Image -------------------------------------------------------------------------------------------------

QWEN_TEXT_DIM = 32
QWEN_LATENT_CHANNELS = 4


def qwen_tokenizer(words=WORDS) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer in Qwen2's format: the 256 byte symbols, one merge chain per space-led word,
    and the chat template's special tokens (``<|endoftext|>`` pads)."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = list("\u0120" + word)  # byte-level BPE writes a leading space as U+0120
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            parts = [pair[0] + pair[1]] + parts[2:]
    folder = Path(tempfile.mkdtemp(prefix="catlab_qwen_tokenizer_"))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges))
    tokenizer = Qwen2Tokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def _qwen_text_encoder(tokenizer: Qwen2Tokenizer, seed: int) -> Qwen2_5_VLForConditionalGeneration:
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=QWEN_TEXT_DIM,
            intermediate_size=2 * QWEN_TEXT_DIM,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            max_position_embeddings=2048,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=QWEN_TEXT_DIM,
            fullatt_block_indexes=[0],
        ),
    )
    with _seeded(seed):
        return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_image_pipeline(seed: int = 0, **transformer_config) -> QwenImagePipeline:
    """Qwen-Image in miniature: 2 dual-stream blocks, 2 heads of 16 (rotary axes 4+6+6), a scheduler with the
    resolution-dependent shift. Keyword arguments override the QwenImageTransformer2DModel config."""
    tokenizer = qwen_tokenizer()
    config = dict(
        patch_size=2,
        in_channels=4 * QWEN_LATENT_CHANNELS,
        out_channels=QWEN_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=QWEN_TEXT_DIM,
        axes_dims_rope=(4, 6, 6),
    )
    config.update(transformer_config)
    with _seeded(seed):
        transformer = QwenImageTransformer2DModel(**config).eval()
    with _seeded(seed + 1):
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=QWEN_LATENT_CHANNELS,
            dim_mult=[1, 2],
            num_res_blocks=1,
            temperal_downsample=[False],
            latents_mean=[0.0] * QWEN_LATENT_CHANNELS,
            latents_std=[1.0] * QWEN_LATENT_CHANNELS,
        ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift=1.0,
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=_qwen_text_encoder(tokenizer, seed + 2),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
