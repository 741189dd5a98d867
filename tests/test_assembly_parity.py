"""One assembly, two loops: each capability run through catlab's sampler and through ``enable_pruning``
on a stock pipeline (the same tiny SD3 transformer, scheduler, embeddings and initial noise) gives the
same latents and the same MACs per step.

| capability        | parts                                         |
| ----------------- | --------------------------------------------- |
| plain pruning     | random, cat (output-reading, branches)        |
| (PixArt-Σ too)    | random, reuse rule, SKIP, MAC count, probes   |
| reuse rule        | taylor reuse after the transformer (step and sigma time) |
| step cache        | taylorseer (the rule moves inside)            |
| K/V reuse         | taylor on the stale K/V                       |
| MAC count         | count_macs: MACs counted as they run          |
| SKIP step         | budget_schedule [1, 0.5, 0], copy and taylor  |
| CUDA-graph flag   | cuda_graphs under the CPU stand-in            |
| probes            | atedm_reuse (attention maps of a probe layer) |
| in-step engine    | atedm                                         |
"""

from __future__ import annotations

import gc

import pytest
import torch
from diffusers import PixArtSigmaPipeline, StableDiffusion3Pipeline

from catlab import disable_pruning, enable_pruning, pruning_macs
from catlab.assembly import StepReuse
from catlab.pruning import BufferPool, emulate_on_cpu, release_graphs
from catlab.pruning.state import hook_names
from catlab.registry import reuses, selectors, stepcaches
from catlab.sampler import SamplerConfig, sample
from tests.conftest import tiny_pixart, tiny_sd3

PROMPTS, SEEDS, STEPS, SCALE = ["a red circle", "a blue square"], [0, 1], 6, 4.0
PRUNED = {"alpha": 0.3, "start_step": 2}

# name: (selector spec, StepReuse parts factory, sampler/hook options, exact)
TABLE = {
    "random": ({"name": "random", **PRUNED}, lambda: StepReuse(), {}, True),
    "cat": ({"name": "cat", **PRUNED}, lambda: StepReuse(), {}, True),
    "reuse rule": ({"name": "noise", **PRUNED}, lambda: StepReuse(rule=reuses.build("taylor")), {}, False),
    "step cache": (
        {"name": "random", **PRUNED},
        lambda: StepReuse(
            rule=reuses.build("taylor"), step_cache=stepcaches.build({"name": "taylorseer", "cache_interval": 2})
        ),
        {},
        False,
    ),
    "reuse rule, sigma time": (
        {"name": "noise", **PRUNED},
        lambda: StepReuse(rule=reuses.build("taylor"), time="sigma"),
        {},
        False,
    ),
    "K/V reuse": ({"name": "random", **PRUNED}, lambda: StepReuse(kv=reuses.build("taylor")), {}, True),
    "MAC count": ({"name": "noise", **PRUNED}, lambda: StepReuse(), {"count_macs": True}, True),
    "SKIP step": (
        {"name": "budget_schedule", "start_step": 2, "inner": "random", "pattern": [1, 0.5, 0]},
        lambda: StepReuse(),
        {},
        True,
    ),
    "SKIP step, taylor": (
        {"name": "budget_schedule", "start_step": 2, "inner": "random", "pattern": [1, 0.5, 0]},
        lambda: StepReuse(rule=reuses.build("taylor")),
        {},
        False,
    ),
    "CUDA-graph flag": ({"name": "cat", **PRUNED}, lambda: StepReuse(), {"cuda_graphs": True}, True),
    "probes": ({"name": "atedm_reuse", **PRUNED, "attention_layers": [1]}, lambda: StepReuse(), {}, True),
    "in-step engine": (
        {"name": "atedm", "alpha": 0.5, "start_step": 2, "prune_layers": [0]},
        lambda: StepReuse(),
        {},
        True,
    ),
}


def _sd3(adapter):
    pipe = StableDiffusion3Pipeline(
        transformer=adapter.transformer,
        scheduler=adapter.make_scheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    c = adapter.encode(PROMPTS, True).kwargs
    e, p = c["encoder_hidden_states"], c["pooled_projections"]

    def call():
        return pipe(
            prompt_embeds=e[2:],
            pooled_prompt_embeds=p[2:],
            negative_prompt_embeds=e[:2],
            negative_pooled_prompt_embeds=p[:2],
            num_inference_steps=STEPS,
            height=128,
            width=128,
            guidance_scale=SCALE,
            output_type="latent",
            latents=adapter.initial_latents(SEEDS),
        ).images

    return pipe, call


def _pixart(adapter):
    pipe = PixArtSigmaPipeline(
        transformer=adapter.transformer,
        scheduler=adapter.make_scheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
    )
    c = adapter.encode(PROMPTS, True).kwargs
    e, m = c["encoder_hidden_states"], c["encoder_attention_mask"]

    def call():
        return pipe(
            prompt_embeds=e[2:],
            prompt_attention_mask=m[2:],
            negative_prompt=None,
            negative_prompt_embeds=e[:2],
            negative_prompt_attention_mask=m[:2],
            num_inference_steps=STEPS,
            height=128,
            width=128,
            guidance_scale=SCALE,
            output_type="latent",
            use_resolution_binning=False,
            latents=adapter.initial_latents(SEEDS),
        ).images

    return pipe, call


FAMILIES = {"sd3": (tiny_sd3, _sd3), "pixart": (tiny_pixart, _pixart)}
#: the in-step engine and K/V-less SD3-only rows aside, PixArt (self-attention, learned sigma, a multistep
#: scheduler) runs the rows that touch the hook's handling of outputs
PIXART = ("random", "reuse rule", "SKIP step, taylor", "MAC count", "probes")
CASES = [("sd3", name) for name in TABLE] + [("pixart", name) for name in PIXART]


@pytest.mark.parametrize("family,name", CASES)
def test_sampler_and_stock_pipeline_agree(family, name):
    spec, parts, options, exact = TABLE[name]
    make, pipeline = FAMILIES[family]
    adapter = make()
    cfg = SamplerConfig(num_steps=STEPS, guidance_scale=SCALE, progress=False, **options)
    with emulate_on_cpu():
        ran = sample(adapter, selectors.build(spec), PROMPTS, SEEDS, cfg, parts())
        release_graphs(adapter.transformer)  # the sampler's buffers are inference tensors; the pipeline's are not
        pipe, call = pipeline(adapter)
        session = enable_pruning(pipe, selectors.build(spec), guidance_scale=SCALE, reuse=parts(), **options)
        graphed = session.graphs is not None
        latents = call()
        macs = pruning_macs(pipe)
        disable_pruning(pipe)
    assert graphed == ran.trace.graphed == ("cuda_graphs" in options)
    if exact:
        assert torch.equal(latents, ran.latents), name
    else:  # a row-wise rule on the stacked rows vs after guidance: equal up to rounding
        torch.testing.assert_close(latents, ran.latents, atol=1e-4, rtol=1e-4)
    assert macs == [s.macs for s in ran.trace.steps], name
    stock = pipeline(make())[1]()
    assert not torch.allclose(latents, stock, atol=1e-4), "the capability changed nothing"


def test_no_reference_cycle_keeps_a_generations_buffers():
    """Each generation's buffer pool is freed when the generation ends (``catlab.sample``) or pruning is
    disabled (a stock pipeline), by reference counting alone."""
    adapter = tiny_sd3()
    cfg = SamplerConfig(num_steps=4, progress=False)
    policy = selectors.build({"name": "random", **PRUNED})
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for parts in (None, StepReuse(rule=reuses.build("taylor")), StepReuse(kv=reuses.build("taylor"))) * 2:
            sample(adapter, policy, PROMPTS, SEEDS, cfg, parts)
        live = sum(isinstance(o, BufferPool) for o in gc.get_objects())
        pipe, call = _sd3(adapter)
        for _ in range(2):
            enable_pruning(
                pipe, selectors.build({"name": "random", **PRUNED}), reuse=StepReuse(kv=reuses.build("taylor"))
            )
            call()
            disable_pruning(pipe)
        live += sum(isinstance(o, BufferPool) for o in gc.get_objects())
    finally:
        if was:
            gc.enable()
    assert live == 0, f"{live} buffer pools outlive their generation"


def test_the_composition_is_checked_once_from_declared_capabilities():
    """The same refusals in both loops, from what the parts declare (no marker attributes)."""
    from dataclasses import dataclass

    from catlab.assembly import CompositionError, PruningSession
    from catlab.capabilities import Capability
    from catlab.reuse.base import Reuse

    @dataclass
    class Squared(Reuse):  # not linear in the output: may run after guidance only
        capabilities = Capability.NONE

    adapter = tiny_sd3()
    atedm = {"name": "atedm", "alpha": 0.5, "start_step": 2, "prune_layers": [0]}
    cache = lambda: stepcaches.build("first_block_cache")  # noqa: E731  (does not compose with pruning)
    refused = [
        (atedm, StepReuse(rule=reuses.build("taylor")), "prunes inside each step"),
        ({"name": "random", **PRUNED}, StepReuse(step_cache=cache()), "residuals"),
        ({"name": "random", **PRUNED}, StepReuse(rule=Squared(), kv=reuses.build("taylor")), "row by row"),
    ]
    cfg = SamplerConfig(num_steps=STEPS, progress=False)
    for spec, parts, why in refused:
        with pytest.raises(CompositionError, match=why):
            sample(adapter, selectors.build(spec), PROMPTS, SEEDS, cfg, parts)
        with pytest.raises(CompositionError, match=why):
            enable_pruning(_sd3(adapter)[0], selectors.build(spec), reuse=parts)
    sample(adapter, selectors.build({"name": "random", **PRUNED}), PROMPTS, SEEDS, cfg, Squared())  # after guidance
    with pytest.raises(CompositionError, match="row by row"):  # a stock pipeline shows it the stacked rows
        PruningSession(
            adapter.transformer,
            selectors.build({"name": "random", **PRUNED}),
            StepReuse(rule=Squared()),
            rows_stacked=True,
        )
    assert not any(hook_names(m) for m in adapter.transformer.modules())  # a refusal leaves nothing installed
