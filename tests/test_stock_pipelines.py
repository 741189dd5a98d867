"""enable_pruning on complete stock pipelines, called as users call them: ``pipe("a prompt", ...)`` to PIL.

The pipelines (catlab/testing/tiny_pipelines.py) have every real component — tokenizers,
text encoders, transformer, VAE, scheduler — tiny and randomly initialised. Each
row of the table in docs/pipelines.md is one test here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from catlab import disable_pruning, enable_pruning
from catlab.selection.baselines import Sequential
from catlab.selection.budget_schedule import BudgetSchedule
from catlab.stock_pipelines import pruning_macs
from catlab.testing.tiny_pipelines import pixart_alpha_pipeline, pixart_sigma_pipeline, sd3_pipeline, sd35_pipeline

BUILDERS = {
    "sd3": sd3_pipeline,
    "sd35": sd35_pipeline,
    "pixart_sigma": pixart_sigma_pipeline,
    "pixart_alpha": pixart_alpha_pipeline,
}
STEPS = 5


pytestmark = pytest.mark.usefixtures("one_thread")


class Recording(Sequential):
    """``sequential`` that records what the hook asked of it."""

    def reset(self, batch_size, grid, num_steps, device):
        super().reset(batch_size, grid, num_steps, device)
        self.resets = getattr(self, "resets", 0) + 1
        self.seen = {"batch": batch_size, "grid": grid, "num_steps": num_steps}
        self.observed = []

    def observe(self, step, output, indices):
        super().observe(step, output, indices)
        self.observed.append((step, None if indices is None else tuple(indices.shape)))


def assert_pruned_then_stock_again(pipe, call, steps, **plain):
    """A packed pipeline (FLUX.1, Qwen-Image), one branch a call: α = 1 gives the stock images; at α = 0.5 from
    step 3 a plain ``pipe(prompt)`` call gives PIL images and the output changes; disabled, the stock pipeline is
    back bit for bit. ``call(pipe, **kw)`` runs the test's 64x64 call (``output_type="np"`` unless told), ``plain``
    what a plain call adds. Returns the MACs per step of the pruned generation."""
    stock = call(pipe)
    stock_pil = call(pipe, output_type="pil")
    enable_pruning(pipe, Recording(alpha=1.0, start_step=2))
    np.testing.assert_allclose(call(pipe), stock, atol=1e-5, rtol=0)
    disable_pruning(pipe)
    policy = Recording(alpha=0.5, start_step=2)
    enable_pruning(pipe, policy)
    images = pipe(
        "a red circle",
        num_inference_steps=steps,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        **plain,
    ).images
    pruned = call(pipe)
    macs = pruning_macs(pipe)
    disable_pruning(pipe)
    assert isinstance(images[0], Image.Image) and images[0].size == (64, 64)
    assert not np.allclose(pruned, stock, atol=1e-3)
    assert np.array_equal(np.asarray(call(pipe, output_type="pil")[0]), np.asarray(stock_pil[0]))  # bit for bit
    assert np.array_equal(call(pipe), stock)
    # one branch per call: the policy sees 1 row for 1 image, the 16x16 packed-token grid
    assert policy.seen == {"batch": 1, "grid": (16, 16), "num_steps": steps}
    assert policy.observed == [(1, None), (2, None)] + [(s, (1, 128)) for s in range(3, steps + 1)]
    return macs


def _is_pixart(pipe) -> bool:
    return type(pipe).__name__.startswith("PixArt")


def _call(pipe, prompt="a red circle", output_type="np", size=64, **kw):
    if _is_pixart(pipe):
        kw.setdefault("use_resolution_binning", False)
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    kw.setdefault("guidance_scale", 4.5)
    return pipe(
        prompt, num_inference_steps=kw.pop("steps", STEPS), height=size, width=size, output_type=output_type, **kw
    ).images


def _enable(pipe, policy, guidance_scale=4.5):
    # PixArt pipelines do not store their guidance scale: give it, as the README says
    return enable_pruning(pipe, policy, guidance_scale=guidance_scale if _is_pixart(pipe) else None)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_alpha_one_is_the_stock_pipeline_and_pruning_changes_it(name):
    pipe = BUILDERS[name]()
    stock = _call(pipe)
    _enable(pipe, Sequential(alpha=1.0, start_step=2))
    np.testing.assert_allclose(_call(pipe), stock, atol=1e-5, rtol=0)
    disable_pruning(pipe)
    policy = Recording(alpha=0.5, start_step=2)
    _enable(pipe, policy)
    pruned = _call(pipe)
    macs = pruning_macs(pipe)
    images = _call(pipe, output_type="pil")
    disable_pruning(pipe)
    assert not np.allclose(pruned, stock, atol=1e-3)
    assert np.array_equal(_call(pipe), stock)  # disabled: the stock pipeline again
    assert len(macs) == STEPS and macs[0] == macs[1] > macs[2] == macs[4]
    assert policy.resets == 2 and policy.seen == {"batch": 1, "grid": (16, 16), "num_steps": STEPS}
    assert policy.observed == [(1, None), (2, None), (3, (1, 128)), (4, (1, 128)), (5, (1, 128))]
    assert images[0].size == (64, 64)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_batches_without_guidance_and_with_generator_lists(name):
    pipe = BUILDERS[name]()
    policy = Recording(alpha=0.5, start_step=2)
    _enable(pipe, policy)
    _call(pipe, num_images_per_prompt=2)
    assert policy.seen["batch"] == 2 and policy.observed[-1] == (STEPS, (2, 128))
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    _call(pipe, prompt=["a red circle", "a blue square"], generator=gens)
    assert policy.seen["batch"] == 2
    _call(pipe, guidance_scale=1.0)  # no CFG rows: SD3 says so itself, PixArt's encode_prompt is told so
    assert policy.seen["batch"] == 1 and policy.observed[-1] == (STEPS, (1, 128))
    macs = pruning_macs(pipe)
    disable_pruning(pipe)
    stock_free = _call(pipe, guidance_scale=1.0)
    assert len(macs) == STEPS and stock_free.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("name", ["sd3", "pixart_sigma"])
def test_two_consecutive_resolutions(name):
    pipe = BUILDERS[name]()
    policy = Recording(alpha=0.5, start_step=2)
    _enable(pipe, policy)
    first = _call(pipe)
    _call(pipe, size=32)
    assert policy.seen["grid"] == (8, 8) and len(policy.observed) == STEPS
    again = _call(pipe)
    disable_pruning(pipe)
    np.testing.assert_array_equal(again, first)


def test_interrupted_generation_then_a_new_one():
    """SD3 pipelines stop on ``pipe._interrupt`` (set from a step-end callback); PixArt's have no such switch."""
    pipe = sd3_pipeline()
    policy = Recording(alpha=0.5, start_step=2)
    _enable(pipe, policy)
    first = _call(pipe)

    def stop_after_two(p, i, t, kwargs):
        if i == 1:
            p._interrupt = True
        return kwargs

    _call(pipe, callback_on_step_end=stop_after_two)
    assert len(policy.observed) == 2  # the interrupted generation computed two steps
    again = _call(pipe)  # a new generation starts from a clean state
    disable_pruning(pipe)
    np.testing.assert_array_equal(again, first)


def test_callback_that_changes_latents_is_followed():
    """A callback's new latents reach the hooked transformer as they reach the stock one, in one generation."""
    pipe = sd3_pipeline()

    def damp(p, i, t, kwargs):
        return {"latents": kwargs["latents"] * 0.9}

    damped = dict(callback_on_step_end=damp, callback_on_step_end_tensor_inputs=["latents"])
    stock, stock_damped = _call(pipe), _call(pipe, **damped)
    assert not np.allclose(stock_damped, stock, atol=1e-3)  # the callback matters
    _enable(
        pipe, Sequential(alpha=1.0, start_step=2)
    )  # pruning that keeps every token: the stock run, callback and all
    np.testing.assert_allclose(_call(pipe, **damped), stock_damped, atol=1e-5, rtol=0)

    outputs = {}
    for name, kw in (("plain", {}), ("damped", damped)):
        policy = Recording(alpha=0.5, start_step=2)
        seen = []
        observe = policy.observe
        policy.observe = lambda step, output, indices, seen=seen, observe=observe: (
            seen.append(output.clone()),
            observe(step, output, indices),
        )
        _enable(pipe, policy)
        outputs[name] = (_call(pipe, **kw), seen)
        assert policy.resets == 1 and [s for s, _ in policy.observed] == list(range(1, STEPS + 1))
    disable_pruning(pipe)
    (plain, plain_seen), (followed, followed_seen) = outputs["plain"], outputs["damped"]
    assert torch.equal(followed_seen[0], plain_seen[0])  # step 1 runs before the callback first acts
    assert all(not torch.allclose(a, b, atol=1e-4) for a, b in zip(followed_seen[1:], plain_seen[1:]))
    assert not np.allclose(followed, plain, atol=1e-3)


def test_sd35_skip_layer_guidance_keeps_one_generation_and_counts_its_steps():
    pipe = sd35_pipeline()
    slg = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    stock = _call(pipe, **slg)
    _enable(pipe, Sequential(alpha=1.0, start_step=2))
    np.testing.assert_allclose(_call(pipe, **slg), stock, atol=1e-5, rtol=0)
    policy = Recording(alpha=0.5, start_step=2)
    _enable(pipe, policy)
    pruned = _call(pipe, **slg)
    macs = pruning_macs(pipe)
    disable_pruning(pipe)
    assert policy.resets == 1 and [s for s, _ in policy.observed] == list(range(1, STEPS + 1))
    assert len(macs) == STEPS and macs[1] > macs[0]  # step 2 adds the conditional-only call
    assert not np.allclose(pruned, stock, atol=1e-3)


@pytest.mark.parametrize("name", ["sd3", "pixart_alpha"])
def test_zero_token_step_calls_no_transformer(name):
    pipe = BUILDERS[name]()
    calls = []
    handle = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    _enable(pipe, BudgetSchedule(inner="sequential", pattern=(1.0, 0.5, 0.0), start_step=2))
    out = _call(pipe, output_type="pil")
    macs = pruning_macs(pipe)
    handle.remove()
    disable_pruning(pipe)
    assert macs[4] == 0 and macs[0] == macs[2] > macs[3] > 0 and len(calls) == 4
    assert out[0].size == (64, 64)


def test_pixart_sigma_resolution_binning():
    pipe = pixart_sigma_pipeline(vae_scale_factor=8)  # binned to the 256 px bin: a 32x32 latent
    policy = Recording(alpha=0.5, start_step=2)
    _enable(pipe, policy)
    out = _call(pipe, use_resolution_binning=True, output_type="pil")
    disable_pruning(pipe)
    assert out[0].size == (64, 64) and policy.seen["grid"] == (16, 16) and len(policy.observed) == STEPS


def test_cat_reference_on_a_pipeline_scores_each_prompt_on_its_conditional_rows():
    from catlab.registry import selectors
    from catlab.testing import simulate

    pipe = sd3_pipeline()
    policy = selectors.build({"name": "cat_reference", "start_step": 2})
    shown, picked = {}, {}
    observe, select = policy.observe, policy.select
    policy.observe = lambda step, output, indices: (
        shown.__setitem__(step, output.clone()),
        observe(step, output, indices),
    )
    policy.select = lambda state: picked.setdefault(state.step, select(state))
    _enable(pipe, policy)
    out = _call(
        pipe, prompt=["a red circle", "a blue square"], generator=[torch.Generator().manual_seed(s) for s in (0, 1)]
    )
    macs = pruning_macs(pipe)
    disable_pruning(pipe)
    assert np.isfinite(out).all() and macs[2] < macs[0]
    assert {tuple(x.shape) for x in shown.values()} == {(4, 256, 64)}  # shown the stacked branches [u0, u1, c0, c1]

    def replay(rows: slice):
        """The same selector fed only those rows of what the pipeline showed it, as a guidance-free batch of two."""
        again = selectors.build({"name": "cat_reference", "start_step": 2})
        chosen = simulate(again, (16, 16), num_steps=STEPS, batch=2, outputs=lambda step: shown[step][rows])
        return again.labels, {step: idx for step, idx in enumerate(chosen, 1) if idx is not None}

    labels, chosen = replay(slice(2, 4))  # each prompt's conditional rows
    assert torch.equal(policy.labels, labels) and chosen.keys() == picked.keys()
    assert all(torch.equal(picked[step], chosen[step]) for step in picked)
    other_labels, other = replay(slice(0, 2))  # the unconditional rows pick otherwise: the check can tell them apart
    assert not torch.equal(other_labels, labels) or any(not torch.equal(picked[s], other[s]) for s in picked)
