"""enable_pruning on FLUX.1's pipelines beyond text-to-image: img2img, inpainting, Fill, ControlNet, Kontext.

The pipelines (catlab/testing/tiny_flux_variants.py) are complete, tiny and random, called
as users call them. Per pipeline, three columns of docs/pipelines.md: token pruning (``cat``),
a forecast schedule (``budget_schedule`` with ``reuse=taylor``) and a step cache (TaylorSeer
composed with ``cat``); then what each variant adds: ``strength`` < 1 (steps count those the
pipeline runs), the mask, the ControlNet's residuals and MACs, Kontext's reference tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from catlab import disable_pruning, enable_pruning, pruning_macs
from catlab.assembly import StepReuse
from catlab.pruning import TokenPruner
from catlab.pruning.state import peek_state
from catlab.registry import reuses, selectors, stepcaches
from catlab.selection.baselines import Sequential
from catlab.stepcache.macs import MacCounter
from catlab.stock_pipelines import _hook, controlnet_macs
from catlab.testing.tiny_flux_variants import (
    flux_controlnet_pipeline,
    flux_fill_pipeline,
    flux_img2img_pipeline,
    flux_inpaint_pipeline,
    flux_kontext_pipeline,
    tiny_image,
    tiny_mask,
)
from tests.test_stock_pipelines import Recording

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE, MASK = tiny_image(), tiny_mask()
TEXT, N = 32, 256  # text tokens (max_sequence_length) and image tokens of a 64x64 call
RUN = 4  # steps every call runs (img2img and inpainting: 5 steps at strength 0.8)

VARIANTS = {
    "img2img": (flux_img2img_pipeline, dict(image=IMAGE, strength=0.8, num_inference_steps=5)),
    "inpaint": (flux_inpaint_pipeline, dict(image=IMAGE, mask_image=MASK, strength=0.8, num_inference_steps=5)),
    "fill": (flux_fill_pipeline, dict(image=IMAGE, mask_image=MASK)),
    "controlnet": (flux_controlnet_pipeline, dict(control_image=IMAGE, controlnet_conditioning_scale=0.7)),
    "kontext": (flux_kontext_pipeline, dict(image=IMAGE, _auto_resize=False, max_area=64**2)),
}
NAMES = sorted(VARIANTS)


def _call(pipe, name, output_type="np", **kw):
    args = dict(VARIANTS[name][1])
    args.setdefault("num_inference_steps", RUN)
    args.update(kw)
    return pipe(
        prompt="a red circle",
        height=64,
        width=64,
        guidance_scale=3.5,
        max_sequence_length=TEXT,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
        **args,
    ).images


def _cat(alpha: float):
    return selectors.build({"name": "cat", "alpha": alpha, "start_step": 1})


def _check_column(name, policy, reuse=None, full_policy=None, full_reuse=None, reference=None):
    """What every cell of the matrix asserts: alpha = 1 (``full_policy``) equals the stock pipeline to 1e-5 (or,
    with a step cache, ``reference``: the same cache without pruning), the pruned output is deterministic and
    differs from it, its MACs are fewer than the full run's, and ``disable_pruning`` gives the never-enabled
    pipeline back bit for bit. Returns the pipeline, its MACs per step and those of the alpha = 1 run."""
    pipe = VARIANTS[name][0]()
    stock = _call(pipe, name)
    if reference is not None:
        enable_pruning(pipe, selectors.build("full"), reuse=reference)
        stock = _call(pipe, name)
    enable_pruning(pipe, full_policy or _cat(1.0), reuse=full_reuse)
    np.testing.assert_allclose(_call(pipe, name), stock, atol=1e-5, rtol=0)
    full = pruning_macs(pipe)
    enable_pruning(pipe, policy, reuse=reuse)
    first, second = _call(pipe, name), _call(pipe, name)
    macs = pruning_macs(pipe)
    disable_pruning(pipe)
    assert np.array_equal(first, second)  # deterministic
    assert not np.allclose(first, stock, atol=1e-3)  # pruning acted
    assert len(macs) == len(full) == RUN and sum(macs) < sum(full)
    assert np.array_equal(_call(pipe, name), _call(VARIANTS[name][0](), name))  # disabled: stock, bit for bit
    return pipe, macs, full


@pytest.mark.parametrize("name", NAMES)
def test_cat_prunes_each_flux_variant(name):
    pipe, macs, full = _check_column(name, _cat(0.5))
    assert macs[0] == full[0] > macs[1] == macs[-1]  # step 1 in full, then k = 128 of 256 tokens


@pytest.mark.parametrize("name", NAMES)
def test_budget_schedule_with_taylor_on_each_flux_variant(name):
    """Steps 2 full, 3 half the tokens, 4 none (every token forecast by the Taylor rule, no transformer call)."""
    schedule = dict(name="budget_schedule", inner="cat", pattern=(1.0, 0.5, 0.0), start_step=1)
    pipe, macs, full = _check_column(
        name,
        selectors.build(schedule),
        reuse=reuses.build("taylor"),
        full_policy=selectors.build({**schedule, "pattern": (1.0,)}),
        full_reuse=reuses.build("taylor"),
    )
    assert macs[0] == macs[1] == full[0] > macs[2] > macs[3] == 0  # no transformer call at step 4


@pytest.mark.parametrize("name", NAMES)
def test_taylorseer_step_cache_with_cat_on_each_flux_variant(name):
    """TaylorSeer composed with token pruning: catlab sets the cache context around each call itself, so it runs
    where diffusers' own pipelines set none (these five; see test_diffusers_own_cache_needs_a_context)."""

    def cache():
        return StepReuse(step_cache=stepcaches.build({"name": "taylorseer", "cache_interval": 2, "start_step": 2}))

    pipe, macs, full = _check_column(name, _cat(0.5), reuse=cache(), full_reuse=cache(), reference=cache())
    assert macs[0] == full[0] and macs[2] < macs[1] < full[1]  # step 3 forecast by the cache, step 2 pruned


def test_diffusers_own_cache_needs_a_context_catlabs_sets_it():
    """diffusers' FirstBlockCache on a pipeline that sets no cache context fails (diffusers #12760); catlab's
    ``first_block_cache`` (with ``selector=full``: it does not compose with pruning) sets it and runs."""
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = flux_img2img_pipeline()
    stock = _call(pipe, "img2img")
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    with pytest.raises(ValueError, match="No cache context is set"):
        _call(pipe, "img2img")
    pipe.transformer.disable_cache()
    fbc = StepReuse(step_cache=stepcaches.build({"name": "first_block_cache", "threshold": 0.0}))
    enable_pruning(pipe, selectors.build("full"), reuse=fbc)
    np.testing.assert_allclose(_call(pipe, "img2img"), stock, atol=1e-5, rtol=0)  # threshold 0: never skips
    assert len(pruning_macs(pipe)) == RUN
    disable_pruning(pipe)


def test_strength_counts_the_steps_the_pipeline_runs():
    """img2img at strength 0.8 of 5 steps runs 4, from the scheduler's index 1: step 1 is the first it runs, t0
    counts from there, the policy is told 4 steps, a forecast in sigma reads the sigmas of the steps that run, and
    the output moved away from the input image."""
    pipe = flux_img2img_pipeline()
    policy = Recording(alpha=0.5, start_step=2)
    enable_pruning(pipe, policy)
    out = _call(pipe, "img2img", output_type="latent")
    macs = pruning_macs(pipe)
    disable_pruning(pipe)
    assert pipe.scheduler.begin_index == 1 and policy.seen == {"batch": 1, "grid": (16, 16), "num_steps": RUN}
    assert policy.observed == [(1, None), (2, None), (3, (1, 128)), (4, (1, 128))]
    assert macs[0] == macs[1] > macs[2] == macs[3]
    times = []
    enable_pruning(pipe, policy, reuse=StepReuse(rule=reuses.build("taylor"), time="sigma"))
    hook = _hook(pipe.transformer)
    _call(pipe, "img2img", callback_on_step_end=lambda p, i, t, kw: times.append(hook.time) or kw)
    disable_pruning(pipe)
    assert times == [float(s) for s in pipe.scheduler.sigmas[1:5]]  # the sigmas of the steps that run
    pixels = pipe.image_processor.preprocess(IMAGE, 64, 64)
    start = pipe._pack_latents(pipe._encode_vae_image(pixels, torch.Generator().manual_seed(0)), 1, 4, 32, 32)
    stock = _call(pipe, "img2img", output_type="latent")
    assert (out - start).abs().mean() > 0.5 * (stock - start).abs().mean() > 0.05  # not the input image


def _masked_tokens() -> torch.Tensor:
    """The tokens MASK repaints: its centre half, rows and columns 4..11 of the 16x16 token grid."""
    grid = torch.zeros(16, 16, dtype=torch.bool)
    grid[4:12, 4:12] = True
    return grid.flatten()


def test_inpainting_repaints_the_mask_and_keeps_the_rest():
    """Pruned inpainting: outside the mask the latents are the input image's (the pipeline resets them), inside
    they are generated -- the mask is not pruned away."""
    pipe = flux_inpaint_pipeline()
    enable_pruning(pipe, _cat(0.5))
    out = _call(pipe, "inpaint", output_type="latent")
    kept = _call(pipe, "inpaint", output_type="latent", mask_image=Image.new("L", (64, 64), 0))  # the image's
    disable_pruning(pipe)
    m = _masked_tokens()
    torch.testing.assert_close(out[:, ~m], kept[:, ~m], atol=1e-6, rtol=0)
    assert (out[:, m] - kept[:, m]).abs().mean() > 0.1


def test_fill_follows_its_mask_under_pruning():
    """FLUX.1-Fill's transformer reads the mask as input channels (48 in, 16 out): a pruned run with another
    mask gives another image, and the repainted region differs from the image's."""
    pipe = flux_fill_pipeline()
    assert pipe.transformer.config.in_channels == 48 and pipe.transformer.config.out_channels == 16
    enable_pruning(pipe, _cat(0.5))
    out = _call(pipe, "fill", output_type="latent")
    left = Image.fromarray(np.repeat((np.arange(64) < 32)[None] * np.uint8(255), 64, 0))
    other = _call(pipe, "fill", output_type="latent", mask_image=left)
    blank = _call(pipe, "fill", output_type="latent", mask_image=Image.new("L", (64, 64), 0))
    disable_pruning(pipe)
    assert not torch.allclose(out, other, atol=1e-3) and not torch.allclose(out, blank, atol=1e-3)


class Permuted(Sequential):
    """Every token, in a seeded random order: pruned execution over all N tokens, gathered out of order."""

    def select(self, state):
        order = torch.randperm(state.num_tokens, generator=torch.Generator().manual_seed(state.step))
        return order.expand(state.batch_size, -1).to(state.device)


@pytest.mark.parametrize("name", ["controlnet", "kontext"])
def test_permuted_full_selection_is_the_stock_pipeline(name):
    """All N tokens computed in a shuffled order equal the stock pipeline only if everything that meets the
    tokens is gathered in that order: the ControlNet's residuals (per dual- and single-stream block), and
    Kontext's rotary rows with the reference tokens appended after the selection."""
    pipe = VARIANTS[name][0]()
    stock = _call(pipe, name)
    enable_pruning(pipe, Permuted(alpha=1.0, start_step=1))
    np.testing.assert_allclose(_call(pipe, name), stock, atol=1e-5, rtol=0)
    disable_pruning(pipe)


def test_controlnet_residuals_follow_the_control_image_and_its_macs_are_counted():
    """The control image steers a pruned run; ``pruning_macs`` counts the transformer (the formula's pruned
    counts), ``controlnet_macs`` the ControlNet's unpruned forward at every step, also at a step that calls no
    transformer (the pipeline calls the ControlNet first)."""
    pipe = flux_controlnet_pipeline()
    counter = MacCounter(pipe.controlnet).attach()  # the ControlNet's own MACs, counted apart
    _call(pipe, "controlnet")
    counter.detach()
    assert len(counter.calls) == RUN and len(set(counter.calls)) == 1 and counter.calls[0] > 0
    enable_pruning(pipe, _cat(0.5))
    out = _call(pipe, "controlnet")
    macs, side = pruning_macs(pipe), controlnet_macs(pipe)
    weak = _call(pipe, "controlnet", controlnet_conditioning_scale=0.0)
    nothing = {"name": "budget_schedule", "inner": "cat", "pattern": (0.0,), "start_step": 1}  # steps 2..: 0 tokens
    enable_pruning(pipe, selectors.build(nothing))
    _call(pipe, "controlnet")
    skipped, skipped_side = pruning_macs(pipe), controlnet_macs(pipe)
    disable_pruning(pipe)
    assert not np.allclose(out, weak, atol=1e-3)  # the residuals reach the pruned blocks
    pruner = TokenPruner(pipe.transformer)
    assert macs == [pruner.macs(1, TEXT, N)] + [pruner.macs(1, TEXT, N, kept=128)] * (RUN - 1)
    assert side == skipped_side == counter.calls and skipped[1:] == [0] * (RUN - 1)
    assert controlnet_macs(flux_img2img_pipeline()) == []


@pytest.mark.parametrize("reference_tokens", ["computed", "cached"])
def test_kontext_reference_tokens_are_never_selected(reference_tokens):
    """The reference image's 256 tokens follow the generated 256: the policy's grid is the generated image's,
    its indices never reach the reference; ``computed`` appends every reference token to each row's k, ``cached``
    computes them at full steps only. MACs as the family formula counts them, and as a counter counts them."""
    pipe = flux_kontext_pipeline()
    policy = Recording(alpha=0.5, start_step=1)
    enable_pruning(pipe, policy, reference_tokens=reference_tokens)
    rows = []

    def record(module, args):
        idx = peek_state(pipe.transformer).session.pruner.row_indices
        rows.append(None if idx is None else idx.clone())

    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(record)
    out = _call(pipe, "kontext")
    macs = pruning_macs(pipe)
    enable_pruning(pipe, Recording(alpha=0.5, start_step=1), reference_tokens=reference_tokens, count_macs=True)
    rows.clear()
    again = _call(pipe, "kontext")
    counted = pruning_macs(pipe)
    disable_pruning(pipe)
    assert np.array_equal(out, again) and policy.seen["grid"] == (16, 16)
    assert policy.observed == [(1, None)] + [(s, (1, 128)) for s in range(2, RUN + 1)]
    assert rows[0] is None and all(r.shape[0] == 1 for r in rows[1:])
    for r in rows[1:]:
        assert int(r[:, :128].max()) < N  # the selection: generated tokens only
        if reference_tokens == "computed":
            assert torch.equal(r[0, 128:], torch.arange(N, 2 * N))
        else:
            assert r.shape[1] == 128
    pruner = TokenPruner(pipe.transformer)
    kept = 128 + (N if reference_tokens == "computed" else 0)
    assert macs == [pruner.macs(1, TEXT, 2 * N)] + [pruner.macs(1, TEXT, 2 * N, kept=kept)] * (RUN - 1)
    assert counted == macs


def test_reference_tokens_setting_is_checked():
    with pytest.raises(ValueError, match="reference_tokens must be 'computed' or 'cached'; got 'pruned'"):
        enable_pruning(flux_kontext_pipeline(), _cat(0.5), reference_tokens="pruned")


@pytest.mark.parametrize("name", ["controlnet", "kontext"])
def test_graphed_controlnet_and_kontext_equal_eager(name):
    """``cuda_graphs=True`` on the CPU stand-in of capture and replay: the gathered ControlNet residuals and
    Kontext's appended reference indices are graph inputs like the others; one graph per shape, bit for bit."""
    from catlab.pruning.capture import emulate_on_cpu

    pipe = VARIANTS[name][0]()
    enable_pruning(pipe, Recording(alpha=0.5, start_step=2))
    eager = _call(pipe, name)
    disable_pruning(pipe)
    with emulate_on_cpu():
        enable_pruning(pipe, Recording(alpha=0.5, start_step=2), cuda_graphs=True)
        first, second = _call(pipe, name), _call(pipe, name)
        store = peek_state(pipe.transformer).graphs
        assert store.captures == len(store.graphs) == 2 and not store.refused
        disable_pruning(pipe)
    assert np.array_equal(first, eager) and np.array_equal(second, eager)


def test_true_cfg_with_a_step_cache_on_a_pipeline_without_cache_context():
    """img2img with a negative prompt calls the transformer twice a step and sets no cache context: catlab keeps the
    second call's TaylorSeer state apart under its own context; alpha = 1 equals the same cache without pruning."""
    pipe = flux_img2img_pipeline()
    cfg = dict(negative_prompt="blurry", true_cfg_scale=2.0)

    def cache():
        return StepReuse(step_cache=stepcaches.build({"name": "taylorseer", "cache_interval": 2, "start_step": 2}))

    enable_pruning(pipe, selectors.build("full"), reuse=cache())
    reference = _call(pipe, "img2img", **cfg)
    enable_pruning(pipe, _cat(1.0), reuse=cache())
    np.testing.assert_allclose(_call(pipe, "img2img", **cfg), reference, atol=1e-5, rtol=0)
    enable_pruning(pipe, _cat(0.5), reuse=cache())
    first, second = _call(pipe, "img2img", **cfg), _call(pipe, "img2img", **cfg)
    macs = pruning_macs(pipe)
    disable_pruning(pipe)
    assert np.array_equal(first, second) and not np.allclose(first, reference, atol=1e-3)
    assert len(macs) == RUN and macs[2] < macs[1] < macs[0]  # step 3 forecast (both calls), step 2 pruned + stock
