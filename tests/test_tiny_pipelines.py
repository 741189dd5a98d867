"""The tiny offline pipelines of catlab/testing/tiny_pipelines.py, run stock (no catlab) the way users call them.

Also pins down how the stock pipelines call their transformer -- one call per step with CFG batched
(uncond rows first), and SD3's extra skip-layer-guidance call -- since pruning hooks rely on it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from catlab.testing import tiny_pipelines as tp

BUILDERS = {
    "sd3": tp.sd3_pipeline,
    "sd35": tp.sd35_pipeline,
    "pixart_sigma": tp.pixart_sigma_pipeline,
    "pixart_alpha": tp.pixart_alpha_pipeline,
}
PROMPT = "a red circle"


pytestmark = pytest.mark.usefixtures("one_thread")


def _is_pixart(pipe) -> bool:
    return type(pipe).__name__.startswith("PixArt")


def _call(pipe, prompt=PROMPT, seed=0, steps=3, size=64, guidance_scale=4.0, **kw):
    """One call as a user would make it; PixArt's resolution binning is off unless ``kw`` turns it on (with
    ``sample_size=32`` binning denoises at 256 px; it has its own test)."""
    if _is_pixart(pipe):
        kw.setdefault("use_resolution_binning", False)
    if "generator" not in kw:
        kw["generator"] = torch.Generator().manual_seed(seed)
    return pipe(
        prompt,
        num_inference_steps=steps,
        height=size,
        width=size,
        guidance_scale=guidance_scale,
        output_type="pil",
        **kw,
    ).images


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


class _Calls:
    """Records every transformer forward: batch rows, timestep values, the ``skip_layers`` kwarg."""

    def __init__(self, transformer):
        self.calls = []
        self._handle = transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.calls.append(
            dict(
                rows=hidden.shape[0],
                latent=tuple(hidden.shape[-2:]),
                timestep=kwargs["timestep"].tolist(),
                text_rows=kwargs["encoder_hidden_states"].shape[0],
                skip_layers=kwargs.get("skip_layers"),
            )
        )

    def remove(self):
        self._handle.remove()


# -- every pipeline ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_stock_call_gives_a_deterministic_pil_image(name):
    pipe = BUILDERS[name]()
    first = _call(pipe)
    assert len(first) == 1 and isinstance(first[0], Image.Image)
    assert first[0].size == (64, 64) and first[0].mode == "RGB"
    again = _call(pipe)
    np.testing.assert_array_equal(_pixels(first[0]), _pixels(again[0]))
    other_seed = _call(pipe, seed=1)
    assert np.abs(_pixels(first[0]) - _pixels(other_seed[0])).max() > 0


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_build_is_seeded_and_leaves_the_global_rng_alone(name):
    state = torch.get_rng_state()
    a, b = BUILDERS[name](), BUILDERS[name]()
    assert torch.equal(state, torch.get_rng_state())
    for part in ("transformer", "vae", "text_encoder"):
        for (key, x), (_, y) in zip(getattr(a, part).state_dict().items(), getattr(b, part).state_dict().items()):
            assert torch.equal(x, y), f"{part}.{key}"
    c = BUILDERS[name](seed=1)
    assert not all(torch.equal(x, y) for x, y in zip(a.transformer.parameters(), c.transformer.parameters()))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_num_images_per_prompt(name):
    pipe = BUILDERS[name]()
    calls = _Calls(pipe.transformer)
    images = _call(pipe, num_images_per_prompt=2)
    assert len(images) == 2 and all(im.size == (64, 64) for im in images)
    assert np.abs(_pixels(images[0]) - _pixels(images[1])).max() > 0  # two different noises
    assert {c["rows"] for c in calls.calls} == {4}  # 2 images x (uncond, cond)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_two_prompts_with_a_generator_each(name):
    pipe = BUILDERS[name]()
    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    images = _call(pipe, prompt=["a red circle", "a blue square"], generator=generators)
    assert len(images) == 2 and all(im.size == (64, 64) for im in images)
    # Row 0 is the single-prompt call with seed 0 (batched matmuls may round differently: allow 1-2 levels).
    alone = _call(pipe, prompt="a red circle", seed=0)
    assert np.abs(_pixels(images[0]) - _pixels(alone[0])).max() <= 2
    again = _call(
        pipe,
        prompt=["a red circle", "a blue square"],
        generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)],
    )
    for x, y in zip(images, again):
        np.testing.assert_array_equal(_pixels(x), _pixels(y))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_guidance_scale_one_runs_without_cfg(name):
    pipe = BUILDERS[name]()
    calls = _Calls(pipe.transformer)
    images = _call(pipe, guidance_scale=1.0)
    assert images[0].size == (64, 64)
    assert len(calls.calls) == 3 and all(c["rows"] == 1 and c["text_rows"] == 1 for c in calls.calls)
    np.testing.assert_array_equal(_pixels(images[0]), _pixels(_call(pipe, guidance_scale=1.0)[0]))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_one_batched_cfg_call_per_step(name):
    pipe = BUILDERS[name]()
    calls = _Calls(pipe.transformer)
    _call(pipe, steps=4)
    assert len(calls.calls) == 4
    assert all(c["rows"] == 2 and c["text_rows"] == 2 and c["skip_layers"] is None for c in calls.calls)
    assert all(c["latent"] == (32, 32) for c in calls.calls)  # 64 px / VAE factor 2
    assert all(len(set(c["timestep"])) == 1 for c in calls.calls)
    assert len({c["timestep"][0] for c in calls.calls}) == 4


# -- SD3.5 skip-layer guidance -------------------------------------------------------------------------------------


def test_sd35_skip_layer_guidance_adds_a_conditional_only_call():
    pipe = tp.sd35_pipeline()
    plain = _call(pipe)
    calls = _Calls(pipe.transformer)
    # The extra call happens at steps i with steps*start < i < steps*stop (both strict, i from 0).
    guided = _call(pipe, skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    assert guided[0].size == (64, 64)
    assert np.abs(_pixels(plain[0]) - _pixels(guided[0])).max() > 0
    main = [c for c in calls.calls if c["skip_layers"] is None]
    extra = [c for c in calls.calls if c["skip_layers"] is not None]
    assert len(main) == 3 and len(extra) == 2
    # Sequence: step 0 main; step 1 main, skip; step 2 main, skip.
    assert [c["skip_layers"] for c in calls.calls] == [None, None, [1], None, [1]]
    for step, skip in ((1, calls.calls[2]), (2, calls.calls[4])):
        assert skip["rows"] == 1 and skip["text_rows"] == 1  # conditional rows only
        assert main[step]["rows"] == 2
        assert skip["timestep"] == main[step]["timestep"][:1]  # same t as that step's main call
        assert skip["latent"] == main[step]["latent"]


def test_sd35_skip_layer_guidance_default_window():
    pipe = tp.sd35_pipeline()
    calls = _Calls(pipe.transformer)
    # Defaults start=0.01, stop=0.2: at 3 steps no i satisfies 0.03 < i < 0.6, so nothing is skipped ...
    _call(pipe, skip_guidance_layers=[1])
    assert len(calls.calls) == 3 and all(c["skip_layers"] is None for c in calls.calls)
    calls.calls.clear()
    # ... at 10 steps only i == 1 (0.1 < i < 2) gets the extra call.
    _call(pipe, steps=10, skip_guidance_layers=[1])
    assert [i for i, c in enumerate(calls.calls) if c["skip_layers"] is not None] == [2]
    assert len(calls.calls) == 11


def test_sd35_skip_layer_guidance_is_ignored_without_cfg():
    pipe = tp.sd35_pipeline()
    calls = _Calls(pipe.transformer)
    _call(
        pipe, guidance_scale=1.0, skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0
    )
    assert len(calls.calls) == 3 and all(c["skip_layers"] is None for c in calls.calls)


# -- PixArt-Sigma resolution binning -------------------------------------------------------------------------------


def test_pixart_sigma_resolution_binning():
    # sample_size=32 selects the 256-px aspect-ratio bins: a 64x64 request is denoised at 256x256 px
    # (a 128x128 latent with the VAE factor of 2) and resized back to 64x64.
    pipe = tp.pixart_sigma_pipeline()
    calls = _Calls(pipe.transformer)
    images = _call(pipe, steps=2, use_resolution_binning=True)
    assert images[0].size == (64, 64)
    assert {c["latent"] for c in calls.calls} == {(128, 128)}
    np.testing.assert_array_equal(_pixels(images[0]), _pixels(_call(pipe, steps=2, use_resolution_binning=True)[0]))


def test_pixart_sigma_resolution_binning_with_a_coarser_vae():
    # With a VAE factor of 8 the same 256-px bin is a 32x32 latent (256 tokens at patch 2); non-square request.
    pipe = tp.pixart_sigma_pipeline(vae_scale_factor=8)
    calls = _Calls(pipe.transformer)
    images = pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=96,
        output_type="pil",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images[0].size == (96, 64)
    (latent,) = {c["latent"] for c in calls.calls}
    assert latent[0] < latent[1] and latent[0] * 8 in range(160, 257) and latent[1] * 8 in range(256, 400)


# -- tokenizers ----------------------------------------------------------------------------------------------------


def test_tokenizers_cover_any_prompt():
    clip, t5 = tp.clip_tokenizer(), tp.t5_tokenizer()
    ids = clip("A red circle, 2 Dogs!").input_ids
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    assert clip.convert_ids_to_tokens(ids[1:4]) == ["a</w>", "red</w>", "circle</w>"]
    padded = clip(PROMPT, padding="max_length", max_length=clip.model_max_length).input_ids
    assert len(padded) == 77 and padded[-1] == clip.pad_token_id
    ids = t5("A red circle, 2 Dogs!").input_ids
    assert ids[-1] == t5.eos_token_id and t5.unk_token_id not in ids
    assert t5.convert_ids_to_tokens(t5(PROMPT).input_ids) == ["\u2581a", "\u2581red", "\u2581circle", "</s>"]
