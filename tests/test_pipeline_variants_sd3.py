"""Stock SD3 img2img, inpainting and ControlNet pipelines and PixArt-Σ with the stochastic DPM-Solver, pruned.

The pipelines are catlab.testing.tiny_sd3_variants' (the text-to-image builders' components in other stock
pipeline classes), called as users call them at 64x64 px. Each cell of the matrix in docs/pipelines.md
("Image-to-image, inpainting and ControlNet") is one test here: token pruning (``cat``), a forecast schedule
(``budget_schedule`` with ``reuse=taylor``) and a step cache, per pipeline.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

from catlab import disable_pruning, enable_pruning, pruning_macs
from catlab.assembly import CompositionError, StepReuse
from catlab.registry import reuses, selectors, stepcaches
from catlab.selection.baselines import Sequential
from catlab.selection.budget_schedule import BudgetSchedule
from catlab.stock_pipelines import _hook
from catlab.testing.tiny_pipelines import sd3_pipeline
from catlab.testing.tiny_sd3_variants import (
    control_image,
    init_image,
    inpaint_mask,
    pixart_sigma_dpm_pipeline,
    sd3_controlnet_pipeline,
    sd3_img2img_pipeline,
    sd3_inpaint_pipeline,
)
from tests.test_stock_pipelines import Recording

pytestmark = pytest.mark.usefixtures("one_thread")

# name: (builder, what the call adds, steps asked for, steps the pipeline runs)
VARIANTS = {
    "img2img": (sd3_img2img_pipeline, lambda: dict(image=init_image(), strength=0.625), 8, 5),
    "inpaint": (sd3_inpaint_pipeline, lambda: dict(image=init_image(), mask_image=inpaint_mask(), strength=1.0), 5, 5),
    "controlnet": (sd3_controlnet_pipeline, lambda: dict(control_image=control_image()), 5, 5),
    "pixart_sigma_dpm": (pixart_sigma_dpm_pipeline, lambda: dict(use_resolution_binning=False), 5, 5),
}
NAMES = sorted(VARIANTS)
SCALE = 4.5
PRUNED = {"alpha": 0.5, "start_step": 2}


def _call(pipe, name: str, output_type="np", **kw):
    """The variant's 64x64 call, seeded. The ControlNet pipeline encodes its control image with the global RNG
    (``latent_dist.sample()`` without the call's generator): seeded too, and the caller's RNG restored."""
    _, extra, steps, _ = VARIANTS[name]
    args = dict(height=64, width=64, guidance_scale=SCALE, generator=torch.Generator().manual_seed(0))
    args.update(extra(), output_type=output_type, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return pipe("a red circle", num_inference_steps=args.pop("steps", steps), **args).images


def _enable(pipe, policy, **kw):
    # PixArt pipelines do not store their guidance scale: given, as docs/pipelines.md says
    scale = SCALE if type(pipe).__name__.startswith("PixArt") else None
    return enable_pruning(pipe, policy, guidance_scale=scale, **kw)


def _full_macs(pipe, name: str) -> int:
    """MACs of one full step of the variant's call (the stock forward, every token)."""
    _enable(pipe, selectors.build({"name": "full"}), count_macs=True)
    _call(pipe, name, steps=2 if name != "img2img" else 3)
    macs = pruning_macs(pipe)
    disable_pruning(pipe)
    return macs[0]


def _check_column(pipe, name: str, stock, enable_pruned, enable_identity=None):
    """The properties every cell asserts: ``enable_identity`` (a setting that computes every token) gives the
    stock images to 1e-5; the pruned run is deterministic, differs from the stock one, and counts fewer MACs
    than full steps would; ``disable_pruning`` gives the stock pipeline back bit for bit. Returns the pruned
    images and MACs per step."""
    full = _full_macs(pipe, name)
    if enable_identity is not None:
        enable_identity()
        np.testing.assert_allclose(_call(pipe, name), stock, atol=1e-5, rtol=0)
        disable_pruning(pipe)
    enable_pruned()
    pruned = _call(pipe, name)
    macs = pruning_macs(pipe)
    again = _call(pipe, name)
    disable_pruning(pipe)
    assert np.array_equal(again, pruned)  # deterministic
    assert not np.allclose(pruned, stock, atol=1e-4)
    assert len(macs) == VARIANTS[name][3] and macs[0] == full and sum(macs) < full * len(macs)
    assert np.array_equal(_call(pipe, name), stock)  # disabled: bit for bit the never-pruned pipeline
    return pruned, macs


def _check_variant(name: str, pruned, stock) -> None:
    """What each variant must still do when pruned: img2img changes its input image; inpainting repaints the
    masked part and keeps the rest as the stock pipeline does."""
    source = np.asarray(init_image(), np.float32) / 255
    if name == "img2img":
        assert np.abs(pruned[0] - source).mean() > 0.02
    if name == "inpaint":
        kept, painted = slice(0, 24), slice(32, 64)  # columns away from the mask edge (the VAE mixes 8 px)
        np.testing.assert_allclose(pruned[0][:, kept], stock[0][:, kept], atol=0.02, rtol=0)
        assert np.abs(pruned[0][:, painted] - source[:, painted]).mean() > 0.02


# -- the columns ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_cat_prunes_the_variant(name):
    pipe = VARIANTS[name][0]()
    stock = _call(pipe, name)
    pruned, macs = _check_column(
        pipe,
        name,
        stock,
        lambda: _enable(pipe, selectors.build({"name": "cat", **PRUNED})),
        lambda: _enable(pipe, selectors.build({"name": "cat", "alpha": 1.0, "start_step": 2})),
    )
    assert macs[0] == macs[1] > macs[2]
    _check_variant(name, pruned, stock)


@pytest.mark.parametrize("name", NAMES)
def test_budget_schedule_with_taylor_on_the_variant(name):
    pipe = VARIANTS[name][0]()
    stock = _call(pipe, name)
    taylor = reuses.build("taylor")

    def schedule(pattern):
        return lambda: _enable(
            pipe, BudgetSchedule(inner="cat", pattern=pattern, start_step=2), reuse=StepReuse(rule=taylor)
        )

    pruned, macs = _check_column(pipe, name, stock, schedule((1.0, 0.5, 0.0)), schedule((1.0,)))
    assert macs[4] == 0 and macs[0] == macs[2] > macs[3] > 0  # steps 3, 4, 5: full, half, none
    _check_variant(name, pruned, stock)


@pytest.mark.parametrize("name", NAMES)
def test_taylorseer_step_cache_with_cat_on_the_variant(name):
    pipe = VARIANTS[name][0]()
    stock = _call(pipe, name)

    def cached(start_step, alpha):
        cache = stepcaches.build({"name": "taylorseer", "cache_interval": 2, "start_step": start_step})
        policy = selectors.build({"name": "cat", "alpha": alpha, "start_step": 2})
        return lambda: _enable(pipe, policy, reuse=StepReuse(step_cache=cache))

    # every step computed (start_step past the last) and every token: the stock images
    pruned, _ = _check_column(pipe, name, stock, cached(2, 0.5), cached(10, 1.0))
    _check_variant(name, pruned, stock)


@pytest.mark.parametrize("name", NAMES)
def test_first_block_cache_on_the_variant_where_diffusers_own_has_no_context(name):
    """diffusers' own FirstBlockCache on these pipelines fails (they set no cache context, diffusers #12760);
    through catlab each call runs in a context catlab sets. Threshold 0 never skips: the stock images."""
    pipe = VARIANTS[name][0]()
    stock = _call(pipe, name)

    def cached(threshold):
        cache = stepcaches.build({"name": "first_block_cache", "threshold": threshold})
        return lambda: _enable(pipe, selectors.build({"name": "full"}), reuse=StepReuse(step_cache=cache))

    pruned, _ = _check_column(pipe, name, stock, cached(10.0), cached(0.0))
    _check_variant(name, pruned, stock)

    cache = stepcaches.build({"name": "first_block_cache", "threshold": 0.05})
    with pytest.raises(CompositionError, match="first_block_cache' compares block residuals.*'taylorseer'"):
        _enable(pipe, selectors.build({"name": "cat", **PRUNED}), reuse=StepReuse(step_cache=cache))

    own = VARIANTS[name][0]()
    apply_first_block_cache(own.transformer, FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(ValueError, match="No cache context is set"):
        _call(own, name)


# -- what each variant adds ----------------------------------------------------------------------------------------


def test_strength_numbers_the_steps_from_the_first_one_the_pipeline_runs():
    """img2img with 8 steps at strength 0.625 runs the last 5 of the schedule: the policy sees a 5-step
    generation, start_step counts full steps from the first step run, a schedule's pattern is laid over the
    steps run (the same MACs as a 5-step text-to-image call), and the time variable ``sigma`` is the
    scheduler's sigma of each step run."""
    pipe = sd3_img2img_pipeline()
    policy = Recording(alpha=0.5, start_step=2)
    _enable(pipe, policy, reuse=StepReuse(rule=reuses.build("taylor"), time="sigma"))
    hook = _hook(pipe.transformer)
    times, time_of = [], hook._time
    hook._time = lambda: times.append(time_of()) or times[-1]
    _call(pipe, "img2img")
    assert policy.seen["num_steps"] == 5
    assert policy.observed == [(1, None), (2, None), (3, (1, 128)), (4, (1, 128)), (5, (1, 128))]
    assert times == pytest.approx(pipe.scheduler.sigmas[3:8].tolist())

    _call(pipe, "img2img", strength=0.25)  # 2 steps run: both full
    assert policy.seen["num_steps"] == 2 and policy.observed == [(1, None), (2, None)]

    schedule = {"inner": "sequential", "pattern": (1.0, 0.5, 0.0), "start_step": 2}
    _enable(pipe, selectors.build({"name": "budget_schedule", **schedule}))
    _call(pipe, "img2img")
    img2img = pruning_macs(pipe)
    disable_pruning(pipe)
    t2i = sd3_pipeline()
    _enable(t2i, selectors.build({"name": "budget_schedule", **schedule}))
    t2i("a red circle", num_inference_steps=5, height=64, width=64, output_type="latent")
    assert img2img == pruning_macs(t2i) and img2img[4] == 0


def test_inpainting_keeps_the_unmasked_latents_and_repaints_the_masked_ones():
    """The pipeline blends the noised input into the unmasked region after every step, outside the transformer:
    pruning cannot drop the mask. The final latents of the kept half are the stock pipeline's exactly."""
    pipe = sd3_inpaint_pipeline()
    stock = _call(pipe, "inpaint", output_type="latent")
    _enable(pipe, selectors.build({"name": "cat", **PRUNED}))
    pruned = _call(pipe, "inpaint", output_type="latent")
    disable_pruning(pipe)
    kept, painted = slice(0, 16), slice(16, 32)  # the mask's right half, in the 32x32 latent
    assert torch.equal(pruned[..., kept], stock[..., kept])
    assert not torch.allclose(pruned[..., painted], stock[..., painted], atol=1e-4)


class Reversed(Sequential):
    """``sequential``'s tokens in reverse order: every token at α = 1, but not in the order of the image."""

    def select(self, state):
        return super().select(state).flip(-1)


def test_controlnet_residuals_follow_the_selected_tokens():
    """diffusers adds ControlNet residuals ``(rows, N, D)`` to the image tokens after each block; pruned, each of
    the k computed tokens gets its own. Every token in reverse order gives the stock images only if each residual
    row is gathered with its token; the control image still steers a pruned run; and ``pruning_macs`` counts the
    transformer only (the ControlNet runs unpruned on all tokens, its MACs not counted): the same counts as
    the text-to-image pipeline with the same transformer."""
    pipe = sd3_controlnet_pipeline()
    stock = _call(pipe, "controlnet")
    assert not np.allclose(_call(pipe, "controlnet", controlnet_conditioning_scale=0.0), stock, atol=1e-3)
    _enable(pipe, Reversed(alpha=1.0, start_step=2))
    np.testing.assert_allclose(_call(pipe, "controlnet"), stock, atol=1e-5, rtol=0)
    _enable(pipe, Sequential(**PRUNED))
    steered = _call(pipe, "controlnet")
    macs = pruning_macs(pipe)
    unsteered = _call(pipe, "controlnet", controlnet_conditioning_scale=0.0)
    disable_pruning(pipe)
    assert not np.allclose(steered, unsteered, atol=1e-3)

    t2i = sd3_pipeline()
    _enable(t2i, Sequential(**PRUNED))
    t2i("a red circle", num_inference_steps=5, height=64, width=64, guidance_scale=SCALE, output_type="latent")
    assert macs == pruning_macs(t2i)


def test_pixart_sigma_dpm_scheduler_is_stochastic_and_seeded():
    """The SDE DPM-Solver draws noise from the call's generator at every step: another seed gives other images,
    the same seed the same ones, pruned or not."""
    pipe = pixart_sigma_dpm_pipeline()
    assert pipe.scheduler.config.algorithm_type == "sde-dpmsolver++" and pipe.scheduler.config.use_karras_sigmas
    _enable(pipe, selectors.build({"name": "cat", **PRUNED}))
    first = _call(pipe, "pixart_sigma_dpm")
    assert np.array_equal(_call(pipe, "pixart_sigma_dpm"), first)
    assert not np.allclose(_call(pipe, "pixart_sigma_dpm", generator=torch.Generator().manual_seed(1)), first)
    disable_pruning(pipe)


def test_controlnet_graphed_equals_eager_with_a_new_control_image():
    """The ControlNet residuals are inputs of a captured call: a replay with another control image uses its
    residuals (CPU stand-in of capture and replay)."""
    from catlab.pruning.capture import emulate_on_cpu
    from catlab.pruning.graphs import graphs_of

    pipe = sd3_controlnet_pipeline()
    other = dict(control_image=control_image(seed=5))
    _enable(pipe, selectors.build({"name": "cat", **PRUNED}))
    eager, eager_other = _call(pipe, "controlnet"), _call(pipe, "controlnet", **other)
    disable_pruning(pipe)
    assert not np.allclose(eager, eager_other, atol=1e-3)
    with emulate_on_cpu():
        _enable(pipe, selectors.build({"name": "cat", **PRUNED}), cuda_graphs=True)
        graphed, graphed_other = _call(pipe, "controlnet"), _call(pipe, "controlnet", **other)
        store = graphs_of(pipe.transformer)
        assert store.captures >= 2 and store.replays >= 6  # a full and a pruned graph, replayed
        disable_pruning(pipe)
    np.testing.assert_array_equal(graphed, eager)
    np.testing.assert_array_equal(graphed_other, eager_other)


def test_inpainting_transformer_that_takes_the_mask_channels():
    """A 33-channel inpainting transformer (latents, mask, masked image's latents in; 16 latent channels out):
    the reuse rule acts on the 16 channels the transformer predicts. diffusers blends the input into the kept
    region only for a 16-channel transformer; this one is left to keep it itself."""
    pipe = sd3_inpaint_pipeline(in_channels=33, out_channels=16)
    stock = _call(pipe, "inpaint")
    taylor = StepReuse(rule=reuses.build("taylor"))
    _enable(pipe, BudgetSchedule(inner="cat", pattern=(1.0,), start_step=2), reuse=taylor)
    np.testing.assert_allclose(_call(pipe, "inpaint"), stock, atol=1e-5, rtol=0)
    _enable(pipe, BudgetSchedule(inner="cat", pattern=(1.0, 0.5, 0.0), start_step=2), reuse=taylor)
    pruned = _call(pipe, "inpaint")
    macs = pruning_macs(pipe)
    disable_pruning(pipe)
    assert macs[4] == 0 and macs[0] == macs[2] > macs[3] > 0
    assert not np.allclose(pruned, stock, atol=1e-4)  # this pipeline blends nothing: the model keeps the rest
