"""torch.compile of the pruned transformer: one graph, no breaks, no recompiles in steady state.

The graph checks use the ``aot_eager`` backend (tracing and functionalisation
without code generation), so they run in seconds on a CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from catlab.pruning import TokenPruner, compile_pruned, uncompile
from catlab.sampler import SamplerConfig, sample
from catlab.selection.simple import Random
from tests.conftest import tiny_pixart, tiny_sd3


def count_graphs(backend: str = "aot_eager"):
    """A ``torch.compile`` backend that records every graph it compiles (one per compilation), and that record."""
    from torch._dynamo.backends.registry import lookup_backend

    inner, graphs = lookup_backend(backend), []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return inner(gm, example_inputs)

    return counting, graphs


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _steps(adapter, forward, n_pruned=2):
    """A full step then ``n_pruned`` pruned steps with fixed indices; the outputs of each."""
    cond = adapter.encode(["a red circle", "a blue square"], guidance=True)
    h, w = adapter.latent_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, adapter.latent_channels, h, w, generator=g)
    pruner = TokenPruner(adapter.transformer).attach()
    n = adapter.grid[0] * adapter.grid[1]
    outputs = []
    with torch.inference_mode():
        for step in range(1 + n_pruned):
            idx = None if step == 0 else torch.rand(2, n, generator=g).topk(n // 3, dim=1).indices
            pruner.set_indices(idx, rows=4)
            t = torch.full((4,), 600.0 - 100 * step)
            outputs.append(forward(hidden_states=x, timestep=t, **cond.kwargs)[0].clone())
    pruner.detach()
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("make", [tiny_sd3, tiny_pixart], ids=["sd3", "pixart"])
def test_whole_pruned_forward_is_one_graph(make):
    """Hooks, processors and in-place cache writes all trace: fullgraph=True, two graphs (full, pruned)."""
    adapter = make()
    eager = _steps(adapter, lambda **kw: adapter.transformer(return_dict=False, **kw), n_pruned=3)
    backend, graphs = count_graphs("aot_eager")
    compiled = torch.compile(adapter.transformer.forward, fullgraph=True, dynamic=False, backend=backend)
    got = _steps(adapter, lambda **kw: compiled(return_dict=False, **kw), n_pruned=3)
    assert len(graphs) == 2  # full step, pruned step; the later pruned steps reuse the second
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compile_pruned_through_the_sampler():
    """Compiled blocks match eager; a second generation (a new pruner) compiles nothing new."""
    adapter = tiny_sd3()
    cfg = SamplerConfig(num_steps=5, progress=False)

    def run():
        return sample(adapter, Random(alpha=0.3, start_step=2), ["a red circle", "a blue square"], [0, 1], cfg).latents

    eager = run()
    backend, graphs = count_graphs("aot_eager")
    compile_pruned(adapter, backend=backend)
    first = run()
    compiled = len(graphs)
    second = run()
    assert len(graphs) == compiled == 4  # (joint block, last context-pre-only block) x (full, pruned)
    torch.testing.assert_close(first, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, eager, atol=1e-5, rtol=1e-5)
    uncompile(adapter)
    assert all(block._compiled_call_impl is None for block in adapter.transformer.transformer_blocks)


@pytest.mark.slow
def test_compiled_blocks_under_a_stock_pipeline():
    """enable_pruning's policy hook stays eager around compiled blocks."""
    from catlab import disable_pruning, enable_pruning
    from tests.test_diffusers_hooks import _pixart

    pipe, call = _pixart()
    enable_pruning(pipe, Random(alpha=0.3, start_step=2), guidance_scale=4.5)
    eager = call()
    backend, graphs = count_graphs("aot_eager")
    compile_pruned(pipe, backend=backend)
    torch.testing.assert_close(call(), eager, atol=1e-5, rtol=1e-5)
    compiled = len(graphs)
    torch.testing.assert_close(call(), eager, atol=1e-5, rtol=1e-5)
    # full and pruned steps, and the first block's full step again: its input (the patch
    # embedding's output) has other strides than the later blocks' inputs
    assert len(graphs) == compiled == 3
    disable_pruning(pipe)
    uncompile(pipe)


def inductor(test):
    """Opt-in: a cold inductor compile is slow on a small CPU."""
    reason = (
        "inductor test: a cold inductor compile of even the tiny model took ~65 s on a 2-core CI machine; "
        "set CATLAB_TEST_INDUCTOR=1 to run it"
    )
    return pytest.mark.inductor(pytest.mark.skipif(os.environ.get("CATLAB_TEST_INDUCTOR") != "1", reason=reason)(test))


@inductor
def test_inductor_matches_eager():
    adapter = tiny_pixart()
    cfg = SamplerConfig(num_steps=4, progress=False)
    eager = sample(adapter, Random(alpha=0.3, start_step=2), ["a red circle"], [0], cfg).latents
    compile_pruned(adapter)
    compiled = sample(adapter, Random(alpha=0.3, start_step=2), ["a red circle"], [0], cfg).latents
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-3)
    uncompile(adapter)


@inductor
def test_inductor_kernels_inside_graphed_execution_match_eager():
    """compile_pruned (inductor), then cuda_graphs: the compiled kernels are what the graphs replay."""
    from catlab.pruning.capture import emulate_on_cpu
    from catlab.pruning.graphs import graphs_of

    adapter = tiny_pixart()
    cfg = dict(num_steps=4, progress=False)
    eager = sample(adapter, Random(alpha=0.3, start_step=2), ["a red circle"], [0], SamplerConfig(**cfg)).latents
    compile_pruned(adapter)
    with emulate_on_cpu():
        graphed = [
            sample(
                adapter, Random(alpha=0.3, start_step=2), ["a red circle"], [0], SamplerConfig(cuda_graphs=True, **cfg)
            ).latents
            for _ in range(2)
        ]
    uncompile(adapter)
    store = graphs_of(adapter.transformer)
    assert store.captures == 2 and not store.refused and all(key[2] for key in store.graphs)  # compiled keys
    for latents in graphed:
        torch.testing.assert_close(latents, eager, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(mode="reduce-overhead"), "mode='reduce-overhead'"),
        (dict(mode="max-autotune"), "mode='max-autotune-no-cudagraphs' is the same without them"),
        (dict(options={"triton.cudagraphs": True}), "triton.cudagraphs"),
    ],
)
def test_every_mode_that_turns_on_inductors_cuda_graphs_is_refused(kwargs, words):
    with pytest.raises(ValueError, match="cuda_graphs=true") as err:
        compile_pruned(tiny_sd3(), **kwargs)
    assert words in str(err.value)


def test_inductor_graphs_are_switched_off_and_the_recompile_limit_covers_the_family(monkeypatch):

    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw))
    config, previous = torch._dynamo.config, torch._dynamo.config.recompile_limit
    config.recompile_limit = 8
    try:
        _compile_and_check(tiny_sd3(), seen)
    finally:
        config.recompile_limit = previous


def _compile_and_check(adapter, seen):  # tiny_sd3's last block is context_pre_only: two variants
    from catlab.pruning.compile import recompiles_needed

    compile_pruned(adapter)
    assert all(kw["options"] == {"triton.cudagraphs": False} for kw in seen) and len(seen) == 3
    assert recompiles_needed(adapter.transformer, 4) == 24 == torch._dynamo.config.recompile_limit  # (2+1)x2x4
    assert recompiles_needed(tiny_pixart().transformer, 2) == 8  # one variant
    seen.clear()
    compile_pruned(adapter, mode="max-autotune-no-cudagraphs")  # a mode: passed on as it is
    assert seen[0] == dict(fullgraph=True, dynamic=False, mode="max-autotune-no-cudagraphs")
    compile_pruned(adapter, backend="aot_eager", row_counts=1)  # another backend: no inductor options; never lowered
    assert "options" not in seen[-1] and torch._dynamo.config.recompile_limit == 24
