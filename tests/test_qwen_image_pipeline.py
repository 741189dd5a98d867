"""enable_pruning on a complete tiny Qwen-Image pipeline, called as users call it: ``pipe("a prompt")`` to PIL.

The pipeline (catlab/testing/tiny_pipelines.py ``qwen_image_pipeline``) has every component
of Qwen-Image — a Qwen2.5-VL text encoder and its tokenizer, the dual-stream
transformer, the 3D-causal VAE, the shifting scheduler — tiny, random and built
offline.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catlab import disable_pruning, enable_pruning, pruning_macs
from catlab.testing.tiny_pipelines import qwen_image_pipeline
from tests.test_stock_pipelines import Recording, assert_pruned_then_stock_again

STEPS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return qwen_image_pipeline()


def _call(pipe, prompt="a red circle", output_type="np", size=64, **kw):
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    kw.setdefault("true_cfg_scale", 1.0)  # no negative prompt: one call per step
    return pipe(
        prompt, num_inference_steps=kw.pop("steps", STEPS), height=size, width=size, output_type=output_type, **kw
    ).images


def test_pruned_qwen_image_pipeline_gives_pil_and_disable_gives_the_stock_pipeline_back(pipe):
    macs = assert_pruned_then_stock_again(pipe, _call, STEPS, true_cfg_scale=1.0)
    assert macs[0] == macs[1] > macs[2] == macs[3] and macs[2] < macs[0] * 0.75


def test_batches_prompt_lists_resolutions_and_true_cfg(pipe):
    policy = Recording(alpha=0.5, start_step=2)
    enable_pruning(pipe, policy)
    _call(pipe, num_images_per_prompt=2)
    assert policy.seen["batch"] == 2 and policy.observed[-1] == (STEPS, (2, 128))
    two = _call(
        pipe, prompt=["a red circle", "a blue square"], generator=[torch.Generator().manual_seed(s) for s in (0, 1)]
    )
    assert two.shape == (2, 64, 64, 3) and policy.seen["batch"] == 2
    first = _call(pipe)
    small = _call(pipe, size=32, output_type="pil")
    assert small[0].size == (32, 32) and policy.seen["grid"] == (8, 8)
    again = _call(pipe)
    # true CFG: the negative prompt is a second call of each step, run stock; the step stays one step
    guided = _call(pipe, negative_prompt="blurry", true_cfg_scale=4.0)
    macs = pruning_macs(pipe)
    disable_pruning(pipe)
    np.testing.assert_array_equal(again, first)
    assert guided.shape == (1, 64, 64, 3) and len(policy.observed) == STEPS and len(macs) == STEPS
    assert macs[0] / 2 < macs[-1] < macs[0]  # a pruned call plus a full one (step 1: two full calls)
