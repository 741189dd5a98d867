"""``selector=duca`` on the layer engine, and both ToCa-family selectors in both loops and the CLI.

The golden file ``tests/golden/duca_authors.pt`` holds what the authors' own DuCa functions
(``Shenyi-Z/DuCa``: ``DuCa-DiT/cache_functions`` and ``DuCa-PixArt-alpha/diffusion/model/
cache_functions``) returned on a CPU: each step's type (full, ToCa, aggressive) per layer for the
DiT script's settings over 50 steps, the PixArt script's step types over 20 steps, and the DiT
fresh-ratio schedule (docs/selection.md, DuCa).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch

from catlab import disable_pruning, enable_pruning, pruning_macs
from catlab.capabilities import Capability
from catlab.registry import selectors
from catlab.sampler import SamplerConfig, sample
from tests.conftest import FAST, run_cli, tiny_pixart, tiny_sd3
from tests.test_assembly_parity import PROMPTS, SCALE, SEEDS, STEPS, _pixart, _sd3

GOLDEN = Path(__file__).resolve().parent / "golden"
KINDS = ("full", "partial", "reuse")  # the authors' "full", "ToCa", "aggressive"
DIT = {
    "alpha": 0.05,
    "force_weight": -0.4,
    "count_down": True,
    "window": [0.2, 0.4],
    "step_weight": 2.0,
    "layer_weight": -0.2,
    "mlp_weight": 2.5,
    "cross_weight": 0.0,
    "bonus_ratio": 0.8,
    "bonus_grid": 2,
}

pytestmark = pytest.mark.usefixtures("one_thread")


@cache
def authors() -> dict:
    return torch.load(GOLDEN / "duca_authors.pt")


def _duca(**kw):
    return selectors.build({"name": "duca", **kw})


def _kinds(policy, steps, layers=28):
    policy.begin_layers(1, (16, 16), steps, layers, "cpu")
    return [KINDS.index(policy.step_kind(s, steps)) for s in range(1, steps + 1)]


def test_dit_step_types_are_the_authors_first_layer():
    """catlab decides a step's kind once; the authors re-decide it per layer after the first layer of a full
    step changed the interval: their layer 0 is our step, and only 2 of the 50 steps differ after it."""
    types = authors()["dit_types"]
    assert _kinds(_duca(**DIT), 50) == types[:, 0].tolist()
    assert [i for i in range(50) if len(types[i].unique()) > 1] == [4, 17]


@pytest.mark.parametrize("threshold", [3, 4])
def test_pixart_step_types_are_the_authors(threshold):
    assert _kinds(_duca(fresh_threshold=threshold), 20) == authors()[f"pixart_types_t{threshold}"].tolist()


def test_dit_fresh_ratio_schedule_is_the_authors():
    p = _duca(**DIT)
    p.begin_layers(1, (16, 16), 50, 28, "cpu")
    ours = torch.tensor(
        [[p.fresh_ratio(50 - i, 50, layer, "mlp") for layer in range(28)] for i in range(50)], dtype=torch.float64
    )
    torch.testing.assert_close(ours, authors()["dit_ratios_mlp"], rtol=1e-12, atol=1e-12)
    assert p.fresh_ratio(40, 50, 0, "cross") == 0.0 == float(authors()["dit_ratio_attn"])


def test_aggressive_steps_run_no_block_and_reuse_the_last_output():
    """A reuse step runs only the embeddings and the final layer: far fewer MACs than a partial step, and the
    blocks' modules see no token."""
    a = tiny_pixart()
    result = sample(a, _duca(), PROMPTS, SEEDS, SamplerConfig(num_steps=6, progress=False))
    kinds = [KINDS[k] for k in _kinds(_duca(), 6, layers=3)]
    assert kinds == ["full", "partial", "reuse", "full", "partial", "reuse"]
    macs = [s.macs for s in result.trace.steps]
    assert macs[2] < 0.1 * macs[0] and macs[2] < macs[1] < macs[0]
    assert Capability.LAYER_SELECTION in _duca().capabilities


@pytest.mark.parametrize("make", [tiny_sd3, tiny_pixart])
def test_no_caching_is_the_model(make):
    """DuCa's no-caching setting (``fresh_threshold: 1``, ``force_weight: 0``, no window): the stock model."""
    a = make()
    cfg = SamplerConfig(num_steps=6, progress=False)
    full = sample(a, selectors.build("full"), PROMPTS, SEEDS, cfg).images
    got = sample(a, _duca(fresh_threshold=1), PROMPTS, SEEDS, cfg).images
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


# -- both selectors in both loops, and from the command line ---------------------------------------------
@pytest.mark.parametrize(
    "family,spec",
    [
        ("sd3", {"name": "toca", "alpha": 0.2}),
        ("sd3", {"name": "duca", "alpha": 0.3}),
        ("pixart", {"name": "toca", "alpha": 0.2, "score": "random"}),
        ("pixart", {"name": "duca"}),
    ],
)
def test_sampler_and_stock_pipeline_agree(family, spec):
    """``enable_pruning`` on a stock pipeline (same tiny transformer, scheduler, embeddings, noise) gives
    catlab's own loop's latents bit for bit, and the same MACs per step."""
    make, pipeline = {"sd3": (tiny_sd3, _sd3), "pixart": (tiny_pixart, _pixart)}[family]
    adapter = make()
    cfg = SamplerConfig(num_steps=STEPS, guidance_scale=SCALE, progress=False)
    ran = sample(adapter, selectors.build(spec), PROMPTS, SEEDS, cfg)
    pipe, call = pipeline(adapter)
    enable_pruning(pipe, selectors.build(spec), guidance_scale=SCALE)
    latents = call()
    macs = pruning_macs(pipe)
    disable_pruning(pipe)
    assert torch.equal(latents, ran.latents)
    assert macs == [s.macs for s in ran.trace.steps]
    assert not torch.allclose(latents, pipeline(make())[1](), atol=1e-4), "caching changed nothing"


@pytest.mark.slow
@pytest.mark.parametrize("selector", ["toca", "duca"])
def test_cli_runs_with_fewer_macs_than_full(selector, tmp_path):
    _, run = run_cli(f"selector={selector}", "model=tiny_sd3", "num_images=1", *FAST, tmp_path=tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["macs_ratio"] > 1.3


def test_dit_script_settings_on_a_dit():
    """The DiT script's settings on a DiT (class-conditional, self-attention and MLP blocks): no caching is the
    model; with caching the three kinds of step run and cost less than full steps."""
    from catlab.families.dit import TinyDiT

    a = TinyDiT(height=16, width=16, num_layers=2, num_heads=2, head_dim=16)
    cfg = SamplerConfig(num_steps=10, progress=False)
    full = sample(a, selectors.build("full"), PROMPTS, SEEDS, cfg)
    none = {**DIT, "fresh_threshold": 1, "force_weight": 0.0, "window": [0, 0]}
    torch.testing.assert_close(sample(a, _duca(**none), PROMPTS, SEEDS, cfg).images, full.images, atol=1e-5, rtol=0)
    kinds = [KINDS[k] for k in _kinds(_duca(**DIT), 10, layers=2)]
    assert set(kinds) == set(KINDS)
    macs = [s.macs for s in sample(a, _duca(**DIT), PROMPTS, SEEDS, cfg).trace.steps]
    assert all((m == full.trace.steps[0].macs) == (kind == "full") for m, kind in zip(macs, kinds))


def test_skip_layer_guidance_call_runs_stock_and_leaves_the_caches():
    """SD3.5's skip-layer-guidance call within a step runs stock beside the layer engine: every step full, the
    pipeline's images are the stock pipeline's exactly; cached, they differ."""
    import numpy as np

    from catlab.testing.tiny_pipelines import sd35_pipeline

    pipe = sd35_pipeline()
    kw = dict(num_inference_steps=5, height=64, width=64, output_type="np", guidance_scale=4.5)
    kw.update(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)

    def call():
        return pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images

    stock = call()
    enable_pruning(pipe, selectors.build({"name": "toca", "fresh_threshold": 1}))
    same = call()
    disable_pruning(pipe)
    enable_pruning(pipe, selectors.build({"name": "toca"}))
    cached = call()
    disable_pruning(pipe)
    assert np.array_equal(same, stock) and not np.allclose(cached, stock, atol=1e-4)
