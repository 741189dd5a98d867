"""enable_pruning / disable_pruning on stock diffusers pipelines."""

from __future__ import annotations

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
)

from catlab import disable_pruning, enable_pruning
from catlab.selection.simple import Random
from catlab.stock_pipelines import pruning_macs
from tests.conftest import tiny_pixart, tiny_sd3

PROMPTS = ["a red circle", "a blue square"]


def _sd3():
    a = tiny_sd3()
    pipe = StableDiffusion3Pipeline(
        transformer=a.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    c = a.encode(PROMPTS, True).kwargs
    e, p = c["encoder_hidden_states"], c["pooled_projections"]

    def call():
        return pipe(
            prompt_embeds=e[2:],
            pooled_prompt_embeds=p[2:],
            negative_prompt_embeds=e[:2],
            negative_pooled_prompt_embeds=p[:2],
            num_inference_steps=5,
            height=128,
            width=128,
            guidance_scale=4.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images

    return pipe, call


def _pixart():
    a = tiny_pixart()
    pipe = PixArtSigmaPipeline(
        transformer=a.transformer, scheduler=DPMSolverMultistepScheduler(), vae=None, text_encoder=None, tokenizer=None
    )
    c = a.encode(PROMPTS, True).kwargs
    e, m = c["encoder_hidden_states"], c["encoder_attention_mask"]

    def call():
        return pipe(
            prompt_embeds=e[2:],
            prompt_attention_mask=m[2:],
            negative_prompt=None,
            negative_prompt_embeds=e[:2],
            negative_prompt_attention_mask=m[:2],
            num_inference_steps=5,
            height=128,
            width=128,
            guidance_scale=4.5,
            output_type="latent",
            use_resolution_binning=False,
            generator=torch.Generator().manual_seed(0),
        ).images

    return pipe, call


def _check_family(make, guidance_scale):
    pipe, call = make()
    stock = call()
    assert stock.shape[-2:] == (16, 16)  # 128 px through the pipelines' default VAE factor of 8
    enable_pruning(pipe, Random(alpha=1.0, start_step=1), guidance_scale=guidance_scale)
    torch.testing.assert_close(call(), stock, atol=1e-5, rtol=0)
    disable_pruning(pipe)
    assert torch.equal(call(), stock)

    enable_pruning(pipe, Random(alpha=0.3, start_step=2), guidance_scale=guidance_scale)
    first = call()
    macs = pruning_macs(pipe)
    assert len(macs) == 5 and macs[0] == macs[1] > macs[2] == macs[4]
    assert torch.equal(call(), first)  # state resets between generations: same seed, same image
    assert not torch.allclose(first, stock, atol=1e-3)
    disable_pruning(pipe)
    assert torch.equal(call(), stock)


def test_sd3_pipeline():
    _check_family(_sd3, guidance_scale=None)  # SD3 pipelines expose their guidance scale


def test_pixart_pipeline():
    _check_family(_pixart, guidance_scale=4.5)


def test_zero_token_step_skips_the_transformer_on_a_stock_pipeline():
    """budget_schedule [1, 0.5, 0] under enable_pruning: the 0-token step calls no transformer and costs 0 MACs."""
    from catlab.selection.budget_schedule import BudgetSchedule

    pipe, call = _sd3()
    stock = call()
    calls = []
    handle = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    enable_pruning(pipe, BudgetSchedule(inner="sequential", pattern=(1.0, 0.5, 0.0), start_step=2))
    images = call()
    macs = pruning_macs(pipe)
    handle.remove()
    disable_pruning(pipe)
    # steps 1-2 full, then the pattern: 3 full, 4 half the tokens, 5 none
    assert macs[4] == 0 and macs[0] == macs[1] == macs[2] > macs[3] > 0
    assert len(calls) == 4  # the transformer's blocks ran at steps 1-4 only
    assert torch.isfinite(images).all() and not torch.equal(images, stock)


def test_skip_layer_guidance_is_one_step_not_a_new_generation():
    """SD3.5's skip-layer guidance calls the transformer twice in a step: 5 steps of MACs, pruned images."""
    from catlab.selection.baselines import Sequential

    pipe, _ = _sd3()
    a = tiny_sd3()
    c = a.encode(PROMPTS, True).kwargs
    e, p = c["encoder_hidden_states"], c["pooled_projections"]

    def call(**slg):
        return pipe(
            prompt_embeds=e[2:],
            pooled_prompt_embeds=p[2:],
            negative_prompt_embeds=e[:2],
            negative_pooled_prompt_embeds=p[:2],
            num_inference_steps=5,
            height=128,
            width=128,
            guidance_scale=4.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **slg,
        ).images

    slg = dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    stock = call(**slg)
    enable_pruning(pipe, Sequential(alpha=0.5, start_step=2))
    pruned = call(**slg)
    macs = pruning_macs(pipe)
    call()
    plain_macs = pruning_macs(pipe)
    disable_pruning(pipe)
    assert len(macs) == 5 and len(plain_macs) == 5
    assert all(m > q for m, q in zip(macs[1:], plain_macs[1:]))  # the extra call's MACs are in its step
    assert macs[1] > macs[2]  # step 2 (full, + its extra call) costs more than step 3 (pruned, + its extra call)
    assert not torch.allclose(pruned, stock, atol=1e-3)  # the pruned steps really ran pruned
    assert torch.equal(call(**slg), stock)  # disable_pruning restored the stock model


def test_skip_layer_guidance_keeps_the_policy_state():
    from catlab.selection.baselines import Sequential

    class Counting(Sequential):
        resets = 0

        def reset(self, *args):
            super().reset(*args)
            type(self).resets += 1
            self.observed = []

        def observe(self, step, output, indices):
            super().observe(step, output, indices)
            self.observed.append((step, indices is not None))

    pipe, _ = _sd3()
    a = tiny_sd3()
    c = a.encode(PROMPTS, True).kwargs
    e, p = c["encoder_hidden_states"], c["pooled_projections"]
    policy = Counting(alpha=0.5, start_step=2)
    enable_pruning(pipe, policy)
    pipe(
        prompt_embeds=e[2:],
        pooled_prompt_embeds=p[2:],
        negative_prompt_embeds=e[:2],
        negative_pooled_prompt_embeds=p[:2],
        num_inference_steps=5,
        height=128,
        width=128,
        guidance_scale=4.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        skip_guidance_layers=[0],
        skip_layer_guidance_start=0.0,
        skip_layer_guidance_stop=1.0,
    )
    disable_pruning(pipe)
    assert Counting.resets == 1  # no reset mid-generation
    assert policy.observed == [(1, False), (2, False), (3, True), (4, True), (5, True)]
