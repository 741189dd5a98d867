"""FLUX.1 pruned: dual- and single-stream blocks, rotary rows of the selected positions, MACs as they run."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from catlab.families.flux import flux_macs_by_kind, rotate
from catlab.pruning import TokenPruner, family_of
from catlab.sampler import SamplerConfig, sample
from catlab.selection.simple import Full, Random
from tests.family_checks import assert_macs_match_the_flop_counter, assert_wrong_rotary_gather_is_caught, forward, perm

TOL = 1e-5


def tiny_flux(**overrides):
    from catlab.families.flux import TinyFlux

    kw = dict(
        height=16,
        width=16,
        num_layers=2,
        num_single_layers=2,
        num_heads=2,
        head_dim=16,
        axes_dims_rope=(4, 6, 6),
        text_dim=24,
        pooled_dim=12,
        text_tokens=6,
    )
    kw.update(overrides)
    return TinyFlux(**kw)


@pytest.fixture
def flux():
    return tiny_flux()


def _inputs(adapter, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = adapter.embed_guidance(adapter.encode([f"prompt {i} word{i}" for i in range(batch)], False), 3.5)
    h, w = adapter.latent_size
    return torch.randn(batch, adapter.latent_channels, h, w, generator=g), cond


def test_flux_family_has_both_block_kinds(flux):
    spec = family_of(flux.transformer)
    assert spec.name == "flux" and spec.guidance_distilled and spec.packed
    pruner = TokenPruner(flux.transformer).attach()
    kinds = [type(p).__name__ for p in pruner.processors]
    assert kinds == ["PrunedFluxJointProcessor"] * 2 + ["PrunedFluxSingleProcessor"] * 2
    assert [p.layer for p in pruner.processors] == [0, 1, 2, 3]
    pruner.detach()
    assert all(
        type(b.attn.processor).__name__ == "FluxAttnProcessor"
        for b in [*flux.transformer.transformer_blocks, *flux.transformer.single_transformer_blocks]
    )


@torch.no_grad()
def test_alpha_one_reproduces_the_stock_flux_transformer(flux):
    x, cond = _inputs(flux)
    stock = forward(flux, x, cond)
    pruner = TokenPruner(flux.transformer).attach()
    torch.testing.assert_close(forward(flux, x, cond), stock, atol=TOL, rtol=0)  # a full step
    # every token in a shuffled order: right only if each token gets its own rotary row and the
    # outputs are scattered back to their positions
    pruner.set_indices(perm(pruner.num_tokens))
    torch.testing.assert_close(forward(flux, x, cond), stock, atol=TOL, rtol=0)
    pruner.detach()
    assert torch.equal(forward(flux, x, cond), stock)


@torch.no_grad()
def test_alpha_one_through_the_sampler_runs_one_branch(flux):
    cfg = SamplerConfig(num_steps=4, guidance_scale=3.5, progress=False, check_indices=True)
    full = sample(flux, Full(), ["a red circle", "a blue square"], [0, 1], cfg)
    pruned = sample(flux, Random(alpha=1.0, start_step=1), ["a red circle", "a blue square"], [0, 1], cfg)
    torch.testing.assert_close(pruned.latents, full.latents, atol=TOL, rtol=0)
    assert pruned.trace.full_step_macs == TokenPruner(flux.transformer).macs(2, 6, pruned.trace.num_tokens)  # 2 rows


@torch.no_grad()
def test_guidance_is_a_model_input(flux):
    x, _ = _inputs(flux)
    outs = [forward(flux, x, flux.embed_guidance(flux.encode(["a red circle"] * 2, False), s)) for s in (1.0, 4.0)]
    assert not torch.allclose(outs[0], outs[1])


class _RecordRotary:
    """Wraps a pruned processor; keeps the rotary tables it was handed."""

    def __init__(self, proc):
        self.proc, self.seen = proc, []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        self.seen.append(image_rotary_emb)
        return self.proc(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


@torch.no_grad()
@pytest.mark.parametrize("block", ["transformer_blocks", "single_transformer_blocks"])
def test_pruned_blocks_rotate_by_the_selected_positions(flux, block):
    x, cond = _inputs(flux)
    pruner = TokenPruner(flux.transformer).attach()
    forward(flux, x, cond)
    n, n_text = pruner.num_tokens, cond.num_text_tokens
    idx = perm(n, seed=3)[:, : n // 3]
    attn = getattr(flux.transformer, block)[1].attn
    attn.processor = recorder = _RecordRotary(attn.processor)
    pruner.set_indices(idx)
    forward(flux, x, cond, t=400.0)
    attn.processor = recorder.proc
    pruner.detach()
    cos, sin = recorder.seen[0]
    assert cos.shape == (2, n_text + idx.shape[1], flux.head_dim)
    h, w = flux.latent_size
    from catlab.models.packed import image_ids

    want_cos, want_sin = flux.transformer.pos_embed(torch.cat([cond.kwargs["txt_ids"], image_ids(h, w)]))
    for row in range(2):
        positions = torch.cat([torch.arange(n_text), n_text + idx[row]])
        assert torch.equal(cos[row], want_cos[positions]) and torch.equal(sin[row], want_sin[positions])


@torch.no_grad()
def test_cached_keys_are_rotated_keys_of_their_own_positions(flux):
    x, cond = _inputs(flux)
    pruner = TokenPruner(flux.transformer).attach()
    seen = {}

    def keep_input(module, args, kwargs):
        seen["x"] = kwargs["hidden_states"]

    single = flux.transformer.single_transformer_blocks[0]
    handle = single.attn.register_forward_pre_hook(keep_input, with_kwargs=True)
    forward(flux, x, cond)
    idx = perm(pruner.num_tokens, seed=5)[:, :5]
    pruner.set_indices(idx)
    forward(flux, x + 0.2, cond, t=400.0)
    handle.remove()
    proc, n_text = pruner.processors[2], cond.num_text_tokens
    keys = proc.key_cache.clone()  # (rows, heads, N, d)
    pruner.detach()
    a = single.attn
    h, w = flux.latent_size
    from catlab.models.packed import image_ids

    cos, sin = flux.transformer.pos_embed(torch.cat([cond.kwargs["txt_ids"], image_ids(h, w)]))
    fresh = a.norm_k(a.to_k(seen["x"][:, n_text:]).unflatten(-1, (-1, a.head_dim)))  # (rows, k, heads, d)
    for row in range(2):
        want = rotate(fresh[row : row + 1], cos[n_text + idx[row]], sin[n_text + idx[row]])[0].transpose(0, 1)
        torch.testing.assert_close(keys[row][:, idx[row]], want, atol=1e-6, rtol=0)


def test_a_wrong_rotary_gather_is_caught(flux):
    """The shuffled-selection check above fails when the blocks get rows of other positions."""

    def first_rows(tables, idx, num_tokens):  # the rows of the first k positions, not the selected ones
        n_text = tables[0].shape[0] - num_tokens
        return tuple(t[: n_text + idx.shape[1]].expand(idx.shape[0], -1, -1) for t in tables)

    assert_wrong_rotary_gather_is_caught(flux, *_inputs(flux), first_rows)


@torch.no_grad()
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.2])
def test_macs_per_block_kind_match_the_flop_counter(flux, alpha):
    x, cond = _inputs(flux)
    k, n, counts = assert_macs_match_the_flop_counter(flux, x, cond, alpha)  # the total
    blocks = {"dual": flux.transformer.transformer_blocks, "single": flux.transformer.single_transformer_blocks}
    attr = {"dual": "transformer_blocks", "single": "single_transformer_blocks"}
    measured = {
        kind: sum(sum(counts[f"FluxTransformer2DModel.{attr[kind]}.{i}"].values()) for i in range(len(b))) // 2
        for kind, b in blocks.items()
    }
    assert measured["dual"] > 0 and measured["single"] > 0
    analytic = flux_macs_by_kind(flux.transformer, 2, k, n, cond.num_text_tokens)
    assert analytic["dual"] == measured["dual"] and analytic["single"] == measured["single"]


@torch.no_grad()
def test_counted_macs_equal_the_formula_on_full_and_pruned_steps(flux):
    cfg = SamplerConfig(num_steps=4, guidance_scale=3.5, progress=False)
    prompts, seeds = ["a red circle", "a blue square"], [0, 1]
    counted = sample(flux, Random(alpha=0.25, start_step=2), prompts, seeds, replace(cfg, count_macs=True)).trace
    formula = sample(flux, Random(alpha=0.25, start_step=2), prompts, seeds, cfg).trace
    assert [s.macs for s in counted.steps] == [s.macs for s in formula.steps]
    assert counted.steps[0].macs > counted.steps[-1].macs


@pytest.mark.slow
def test_cli_runs_tiny_flux_with_three_selectors(tmp_path):
    import json

    from tests.conftest import FAST, run_cli

    run_cli("-m", "model=tiny_flux", "selector=cat,sequential,random", *FAST, tmp_path=tmp_path)
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    metrics = [json.loads(p.read_text()) for p in runs]
    assert [m["selector"] for m in metrics] == ["cat", "sequential", "random"]
    assert all(m["model"] == "tiny_flux" and m["macs_ratio"] > 1 for m in metrics)


@pytest.mark.parametrize("name", ["cat", "random"])
def test_graphed_flux_equals_eager_bit_for_bit(flux, name):
    from catlab.pruning import graphs_of
    from catlab.pruning.capture import emulate_on_cpu
    from catlab.registry import selectors

    def run(graphs):
        cfg = SamplerConfig(num_steps=5, guidance_scale=3.5, progress=False, cuda_graphs=graphs)
        return sample(
            flux, selectors.build({"name": name, "alpha": 0.3, "start_step": 2}), ["a red circle"] * 2, [0, 1], cfg
        )

    eager = run(False)
    with emulate_on_cpu():
        first, second = run(True), run(True)
    assert first.trace.graphed and torch.equal(first.images, eager.images) and torch.equal(second.images, eager.images)
    store = graphs_of(flux.transformer)
    assert store.captures == 2 == len(store.graphs) and not store.refused  # full and pruned, both generations


@pytest.mark.slow
def test_whole_pruned_flux_forward_is_one_graph(flux):
    """Rotary hook, both processors and the in-place cache writes trace: fullgraph=True, a full and a pruned graph."""
    from tests.test_compile import count_graphs

    torch._dynamo.reset()
    x, cond = _inputs(flux)
    n = flux.grid[0] * flux.grid[1]

    def steps(run):
        pruner, outs = TokenPruner(flux.transformer).attach(), []
        with torch.inference_mode():
            for step in range(3):
                pruner.set_indices(None if step == 0 else perm(n, seed=step)[:, : n // 3])
                outs.append(run(x + 0.1 * step, 600.0 - 100 * step).clone())
        pruner.detach()
        return outs

    eager = steps(lambda x, t: forward(flux, x, cond, t))
    backend, graphs = count_graphs("aot_eager")
    stock_forward = flux.transformer.forward
    flux.transformer.forward = torch.compile(stock_forward, fullgraph=True, dynamic=False, backend=backend)
    try:
        got = steps(lambda x, t: forward(flux, x, cond, t))
    finally:
        flux.transformer.forward = stock_forward
        torch._dynamo.reset()
    assert len(graphs) == 2
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


COMPOSITIONS = {
    "probes (atedm_reuse)": lambda: ({"name": "atedm_reuse", "alpha": 0.3, "start_step": 2}, {}),
    "reuse taylor": lambda: ({"name": "cat", "alpha": 0.3, "start_step": 2}, {"rule": "taylor"}),
    "K/V taylor": lambda: ({"name": "random", "alpha": 0.3, "start_step": 2}, {"kv": "taylor"}),
    "cat + taylorseer": lambda: (
        {"name": "cat", "alpha": 0.3, "start_step": 2},
        {"step_cache": {"name": "taylorseer", "cache_interval": 2, "start_step": 2}},
    ),
    "budget_schedule": lambda: ({"name": "budget_schedule", "start_step": 2}, {"rule": "taylor"}),
}


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(COMPOSITIONS))
def test_the_other_parts_run_on_flux(flux, name):
    from catlab.registry import reuses, selectors
    from catlab.sampler import StepReuse
    from catlab.stepcache import stepcaches

    spec, parts = COMPOSITIONS[name]()
    reuse = StepReuse(
        rule=reuses.build(parts["rule"]) if "rule" in parts else None,
        kv=reuses.build(parts["kv"]) if "kv" in parts else None,
        step_cache=stepcaches.build(parts["step_cache"]) if "step_cache" in parts else None,
    )
    cfg = SamplerConfig(num_steps=6, guidance_scale=3.5, progress=False, count_macs=True)
    full = sample(flux, Full(), ["a red circle"], [0], cfg).trace
    result = sample(flux, selectors.build(spec), ["a red circle"], [0], cfg, reuse)
    assert torch.isfinite(result.latents).all()
    assert result.trace.macs < full.macs  # selection included


def test_in_step_atedm_refuses_flux_in_one_line(flux):
    from catlab.pruning import UnsupportedModelError
    from catlab.registry import selectors

    with pytest.raises(UnsupportedModelError, match="FluxTransformer2DModel is not one: use selector=atedm_reuse"):
        sample(
            flux,
            selectors.build({"name": "atedm", "start_step": 2}),
            ["a red circle"],
            [0],
            SamplerConfig(num_steps=4, progress=False),
        )


@pytest.mark.parametrize("name", ["random", "sequential"])
def test_pruned_flux_steps_read_nothing_on_the_host(flux, name):
    from catlab.registry import selectors

    cfg = SamplerConfig(num_steps=5, guidance_scale=3.5, progress=False, check_sync=True)  # raises on a host read
    trace = sample(
        flux, selectors.build({"name": name, "alpha": 0.3, "start_step": 2}), ["a red circle"], [0], cfg
    ).trace
    assert [s.kept < trace.num_tokens for s in trace.steps] == [False, False, True, True, True]


@pytest.mark.slow
def test_compile_pruned_compiles_both_block_lists(flux):
    from catlab.pruning import compile_pruned, uncompile
    from catlab.registry import selectors

    cfg = SamplerConfig(num_steps=4, guidance_scale=3.5, progress=False)
    run = lambda: (
        sample(
            flux,
            selectors.build({"name": "random", "alpha": 0.3, "start_step": 2}),  # noqa: E731
            ["a red circle"],
            [0],
            cfg,
        ).latents
    )
    eager = run()
    torch._dynamo.reset()
    compile_pruned(flux, backend="aot_eager")
    try:
        blocks = [*flux.transformer.transformer_blocks, *flux.transformer.single_transformer_blocks]
        assert all(b._compiled_call_impl is not None for b in blocks)
        torch.testing.assert_close(run(), eager, atol=1e-5, rtol=0)
    finally:
        uncompile(flux)
        torch._dynamo.reset()
    assert all(b._compiled_call_impl is None for b in blocks)


def test_bad_sizes_are_named_before_anything_loads():
    from catlab.registry import models

    with pytest.raises(ValueError, match=r"model.axes_dims_rope=\[4, 6, 6\] must sum to model.head_dim=32"):
        tiny_flux(head_dim=32)
    with pytest.raises(ValueError, match="height and width must be even; got 17x16"):
        tiny_flux(height=17)
    with pytest.raises(ValueError, match="flux: model.height and model.width must be multiples of 16.*1000x1024"):
        models.build({"name": "flux", "path": "/nonexistent", "height": 1000, "width": 1024})


def test_probe_macs_count_the_text_keys(flux):
    """A probe layer's attention map in FLUX covers the text keys too (they sit in the layer's cache)."""
    pruner = TokenPruner(flux.transformer)
    pruner.num_tokens, pruner.probe_layers = 64, {1, 3}
    inner = flux.transformer.transformer_blocks[0].attn.to_q.out_features
    assert pruner.probe_macs(rows=2, num_text_tokens=6, kept=19) == 2 * 2 * 19 * (64 + 6) * inner


@torch.no_grad()
def test_counted_probe_maps_equal_the_formula_at_pruned_steps(flux):
    """The MAC counter sees the probe maps (an explicit ``@``) that the formula adds as selection cost."""
    from catlab.registry import selectors

    def run(count):
        cfg = SamplerConfig(num_steps=4, guidance_scale=3.5, progress=False, count_macs=count)
        policy = selectors.build({"name": "atedm_reuse", "alpha": 0.3, "start_step": 2, "attention_layers": [1, 3]})
        return sample(flux, policy, ["a red circle"], [0], cfg).trace.steps

    counted, formula = run(True), run(False)
    assert [s.macs + s.selection_macs for s in counted[2:]] == [s.macs + s.selection_macs for s in formula[2:]]
    assert counted[2].macs > formula[2].macs  # the maps run inside the forward, where the counter counts them
