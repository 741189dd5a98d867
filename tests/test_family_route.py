"""A family added the documented way (docs/architecture.md, "Adding a family"): one module, one YAML.

DiT (``catlab/families/dit.py`` + ``conf/model/tiny_dit.yaml``) is the worked example: these
tests check it end to end (the stock model at α = 1, MACs as the flop counter sees them, a
generation through ``catlab.run``) and that nothing else in catlab names it.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from catlab.pruning import TokenPruner, family_of
from catlab.sampler import SamplerConfig, sample
from catlab.selection.simple import Full, Random
from tests.family_checks import assert_macs_match_the_flop_counter, perm

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture
def dit():
    from catlab.families.dit import TinyDiT

    return TinyDiT(height=16, width=16, num_layers=2, num_heads=2, head_dim=16)


def _inputs(adapter, seed=0):
    cond = adapter.encode(PROMPTS, guidance=True)  # 4 rows: 2 null-class, 2 conditional
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed)), cond


def test_nothing_outside_the_module_and_its_yaml_names_the_family():
    """The route is one module + one YAML: no registry, tuple or branch elsewhere in catlab knows DiT."""
    own = {ROOT / "catlab/families/dit.py", ROOT / "conf/model/tiny_dit.yaml"}
    # its identifiers (the word "DiT" as a kind of model is prose, used elsewhere too)
    pattern = re.compile(r"tiny_dit|DiTTransformer2DModel|families[./]dit|\bDIT\b|TinyDiT|dit_macs")
    files = [*(ROOT / "catlab").rglob("*.py"), *(ROOT / "conf").rglob("*.yaml")]
    naming = [str(p.relative_to(ROOT)) for p in files if p not in own and pattern.search(p.read_text())]
    assert naming == []
    assert all(pattern.search(p.read_text()) for p in own)  # the check can see a mention


def test_the_pruning_engine_names_no_family():
    """``catlab/pruning/`` is family-agnostic: every family's names, classes and processors live in its module."""
    from catlab.pruning import family_specs

    words = {"SD3", "PixArt", "FLUX", "Flux", "Qwen", "DiT"}
    for spec in family_specs():
        words |= {spec.name, spec.title, spec.transformer_type}
        words |= {b.block_type for b in spec.extra_blocks} | {cls.__name__ for _, cls in spec.attentions}
    words -= {"", "PrunedSelfAttnProcessor", "BasicTransformerBlock"}  # the generic processor; diffusers' block
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, words))) + r")\b")
    found = {
        f"{p.relative_to(ROOT)}:{i}": line.strip()
        for p in sorted((ROOT / "catlab" / "pruning").glob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line.replace("cache-dit", "cache_dit"))  # the library, not the family
    }
    assert found == {}
    assert pattern.search("runs on FluxTransformer2DModel") and pattern.search("an sd3 spec")


def test_the_family_is_found_from_its_own_module(dit):
    from catlab.families.dit import DIT
    from catlab.pruning.processors import PrunedSelfAttnProcessor
    from catlab.registry import models

    assert family_of(dit.transformer) is DIT and "tiny_dit" in models.names()
    pruner = TokenPruner(dit.transformer).attach()
    assert [type(p) for p in pruner.processors] == [PrunedSelfAttnProcessor] * 2
    pruner.detach()


@torch.no_grad()
def test_alpha_one_reproduces_the_stock_transformer(dit):
    x, cond = _inputs(dit)
    stock = dit.predict(x, torch.tensor(500.0), cond)
    pruner = TokenPruner(dit.transformer).attach()
    torch.testing.assert_close(dit.predict(x, torch.tensor(500.0), cond), stock, atol=TOL, rtol=0)
    pruner.set_indices(perm(pruner.num_tokens), rows=4)  # every token, shuffled
    torch.testing.assert_close(dit.predict(x, torch.tensor(500.0), cond), stock, atol=TOL, rtol=0)
    pruner.set_indices(perm(pruner.num_tokens)[:, : pruner.num_tokens // 4], rows=4)
    assert (dit.predict(x, torch.tensor(400.0), cond) - stock).abs().max() > 1e-3  # pruned: not the stock output
    pruner.detach()
    assert torch.equal(dit.predict(x, torch.tensor(500.0), cond), stock)


def test_alpha_one_through_the_sampler(dit):
    cfg = SamplerConfig(num_steps=4, guidance_scale=4.0, progress=False, check_indices=True)
    full = sample(dit, Full(), PROMPTS, [0, 1], cfg)
    pruned = sample(dit, Random(alpha=1.0, start_step=1), PROMPTS, [0, 1], cfg)
    torch.testing.assert_close(pruned.latents, full.latents, atol=TOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.2])
def test_macs_match_the_flop_counter(dit, alpha):
    assert_macs_match_the_flop_counter(dit, *_inputs(dit), alpha)


def test_counted_macs_equal_the_formula(dit):
    cfg = SamplerConfig(num_steps=4, guidance_scale=4.0, progress=False)
    counted = sample(dit, Random(alpha=0.25, start_step=2), PROMPTS[:1], [0], replace(cfg, count_macs=True)).trace
    formula = sample(dit, Random(alpha=0.25, start_step=2), PROMPTS[:1], [0], cfg).trace
    assert [s.macs for s in counted.steps] == [s.macs for s in formula.steps]


def test_other_blocks_are_refused_by_name():
    from diffusers import DiTTransformer2DModel

    from catlab.pruning import UnsupportedModelError

    t = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=3,
        num_layers=1,
        sample_size=8,
        num_embeds_ada_norm=10,
    )
    t.transformer_blocks[0].norm_type = "layer_norm"
    with pytest.raises(UnsupportedModelError, match="block 0: DiT pruning needs"):
        TokenPruner(t)


def test_a_family_check_lives_in_its_spec():
    """PixArt's block layout is checked by its spec's own ``check``, not by a branch of the shared code."""
    from catlab.families.pixart import PIXART, TinyPixArt, check_pixart
    from catlab.pruning import UnsupportedModelError

    assert PIXART.check is check_pixart
    t = TinyPixArt(height=16, width=16, num_layers=2, num_heads=2, head_dim=16, text_dim=24).transformer
    t.transformer_blocks[1].attn2 = None
    with pytest.raises(UnsupportedModelError, match="block 1: PixArt pruning needs"):
        TokenPruner(t)


@pytest.mark.slow
def test_cli_runs_tiny_dit(tmp_path):
    from tests.conftest import FAST, run_cli

    run_cli(
        "-m", "model=tiny_dit", "model.height=16", "model.width=16", "selector=cat,random", *FAST, tmp_path=tmp_path
    )
    metrics = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/metrics.json"))]
    assert [m["selector"] for m in metrics] == ["cat", "random"] and all(m["macs_ratio"] > 1 for m in metrics)
