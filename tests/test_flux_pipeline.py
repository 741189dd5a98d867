"""enable_pruning on a complete tiny FLUX.1 pipeline, called as users call it: ``pipe("a prompt")`` to PIL.

The pipeline (catlab/testing/tiny_pipelines.py ``flux_pipeline``) has every component of
FLUX.1-dev — CLIP and T5 encoders with their tokenizers, the transformer with
dual- and single-stream blocks and a guidance input, a VAE, the shifting
scheduler — tiny, random and built offline.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catlab import disable_pruning, enable_pruning, pruning_macs
from catlab.pruning import TokenPruner
from catlab.testing.tiny_pipelines import flux_pipeline
from tests.test_stock_pipelines import Recording, assert_pruned_then_stock_again

STEPS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pipe():
    return flux_pipeline()


def _call(pipe, prompt="a red circle", output_type="np", size=64, **kw):
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    kw.setdefault("guidance_scale", 3.5)
    kw.setdefault("max_sequence_length", 32)
    return pipe(
        prompt, num_inference_steps=kw.pop("steps", STEPS), height=size, width=size, output_type=output_type, **kw
    ).images


def test_pruned_flux_pipeline_gives_pil_and_disable_gives_the_stock_pipeline_back(pipe):
    macs = assert_pruned_then_stock_again(pipe, _call, STEPS, max_sequence_length=32)
    pruner = TokenPruner(pipe.transformer)
    assert macs == [pruner.macs(1, 32, 256)] * 2 + [pruner.macs(1, 32, 256, kept=128)] * 2


def test_guidance_input_batches_prompt_lists_and_two_resolutions(pipe):
    policy = Recording(alpha=0.5, start_step=2)
    enable_pruning(pipe, policy)
    low, high = _call(pipe, guidance_scale=1.5), _call(pipe, guidance_scale=5.0)
    assert policy.seen["batch"] == 1 and not np.allclose(low, high, atol=1e-3)  # the scale is an input
    _call(pipe, num_images_per_prompt=2)
    assert policy.seen["batch"] == 2 and policy.observed[-1] == (STEPS, (2, 128))
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    two = _call(pipe, prompt=["a red circle", "a blue square"], generator=gens)
    assert two.shape == (2, 64, 64, 3) and policy.seen["batch"] == 2
    first = _call(pipe)
    small = _call(pipe, size=32, output_type="pil")
    assert small[0].size == (32, 32) and policy.seen["grid"] == (8, 8)
    again = _call(pipe)
    disable_pruning(pipe)
    np.testing.assert_array_equal(again, first)


def test_true_cfg_second_call_runs_stock(pipe):
    """FLUX's optional true CFG (a negative prompt) calls the transformer twice a step: the second call runs the
    stock forward and leaves the caches alone; the step is one step."""
    policy = Recording(alpha=0.5, start_step=2)
    enable_pruning(pipe, policy)
    out = _call(pipe, negative_prompt="blurry", true_cfg_scale=2.0)
    macs = pruning_macs(pipe)
    disable_pruning(pipe)
    assert out.shape == (1, 64, 64, 3) and len(policy.observed) == STEPS and len(macs) == STEPS
    pruner = TokenPruner(pipe.transformer)
    assert macs[-1] == pruner.macs(1, 32, 256, kept=128) + pruner.macs(1, 32, 256)


def test_schnell_layout_without_guidance_input():
    """FLUX.1-schnell's transformer has no guidance embedding: the pipeline passes none, pruning runs as for dev."""
    pipe = flux_pipeline(guidance_embeds=False)
    stock = _call(pipe)
    policy = Recording(alpha=0.5, start_step=1)
    enable_pruning(pipe, policy)
    pruned = _call(pipe)
    disable_pruning(pipe)
    assert policy.observed == [(1, None)] + [(s, (1, 128)) for s in range(2, STEPS + 1)]
    assert not np.allclose(pruned, stock, atol=1e-3) and np.array_equal(_call(pipe), stock)


def test_graphed_flux_pipeline_equals_eager(pipe):
    from catlab.pruning.capture import emulate_on_cpu
    from catlab.pruning.state import peek_state

    enable_pruning(pipe, Recording(alpha=0.5, start_step=2))
    eager = _call(pipe)
    disable_pruning(pipe)
    with emulate_on_cpu():
        enable_pruning(pipe, Recording(alpha=0.5, start_step=2), cuda_graphs=True)
        first, second = _call(pipe), _call(pipe)
        store = peek_state(pipe.transformer).graphs
        assert store.captures == len(store.graphs) == 2 and store.generation == 2 and not store.refused
        disable_pruning(pipe)
    assert np.array_equal(first, eager) and np.array_equal(second, eager)
