"""Graphed execution (catlab.pruning.graphs): bookkeeping on a CPU stand-in, and on CUDA where present.

The stand-in (``emulate_on_cpu``) runs the same code as a real capture/replay on the
same static buffers, so everything but the GPU's own replay is checked here: shape
keys, buffers kept across generations, reset, re-capture, release, fallbacks, and
bit-identical images against eager execution.
"""

from __future__ import annotations

import logging

import pytest
import torch

from catlab import disable_pruning, enable_pruning
from catlab.pruning import compile_pruned, graphs_of, release_graphs, uncompile
from catlab.pruning.buffers import BufferAllocationError, BufferPool
from catlab.pruning.capture import emulate_on_cpu
from catlab.pruning.state import peek_state
from catlab.registry import selectors
from catlab.sampler import SamplerConfig, StepReuse, sample
from catlab.stepcache import stepcaches
from tests.conftest import tiny_pixart, tiny_sd3

PROMPTS, SEEDS = ["a red circle", "a blue square"], [0, 1]
SELECTORS = ["full", "cat", "sequential", "random", "budget_schedule"]


def _graphs(transformer):
    """The transformer's graph store as catlab's per-module state holds it (None: none)."""
    state = peek_state(transformer)
    return None if state is None else state.graphs


def _policy(name: str, alpha: float = 0.3):
    if name == "full":
        return selectors.build(name)
    if name == "budget_schedule":  # pattern [1, 0.3, 0, 0]: full, pruned and skipped steps
        return selectors.build({"name": name, "start_step": 2})
    return selectors.build({"name": name, "alpha": alpha, "start_step": 2})


def _run(adapter, name, graphs: bool, prompts=PROMPTS, seeds=SEEDS, alpha=0.3, **cfg):
    config = SamplerConfig(num_steps=6, progress=False, cuda_graphs=graphs, **cfg)
    return sample(adapter, _policy(name, alpha), prompts, seeds, config)


@pytest.mark.parametrize("make", [tiny_sd3, tiny_pixart], ids=["sd3", "pixart"])
@pytest.mark.parametrize("name", SELECTORS)
def test_graphed_images_equal_eager_bit_for_bit(make, name):
    adapter = make()
    eager = _run(adapter, name, graphs=False)
    with emulate_on_cpu():
        first, second = _run(adapter, name, graphs=True), _run(adapter, name, graphs=True)
    assert torch.equal(first.images, eager.images) and torch.equal(second.images, eager.images)
    assert first.trace.macs == eager.trace.macs and second.trace.graphed and not eager.trace.graphed
    # graphed means replayed: a first generation whose one pruned step was its capture is not graphed
    counts = first.trace.graph_counts
    assert first.trace.graphed == (counts["pruned_replays"] > 0 or counts["pruned_forwards"] == 0)
    again = second.trace.graph_counts
    assert again["forward_captures"] == 0 and again["forward_replays"] == 6 - sum(
        s.kept == 0 for s in second.trace.steps
    )
    assert again["pruned_replays"] == again["pruned_forwards"] and not again["refusals"]
    store = graphs_of(adapter.transformer)
    pruned = any(0 < s.kept < first.trace.num_tokens for s in first.trace.steps)
    assert pruned == (name != "full")
    assert store.captures == (2 if pruned else 1) == len(store.graphs)  # the second generation captured nothing
    assert all(g.replays > 0 for g in store.graphs.values()) and not store.refused


def test_buffers_are_allocated_once_and_kept_across_generations():
    adapter = tiny_sd3()
    with emulate_on_cpu():
        _run(adapter, "cat", graphs=True)
        store = graphs_of(adapter.transformer)
        before = {k: v.data_ptr() for k, v in store.pool._buffers.items()}
        generation = store.generation
        _run(adapter, "cat", graphs=True)
    assert {k: v.data_ptr() for k, v in store.pool._buffers.items()} == before
    assert store.generation == generation + 1
    names = {key[0] for key in before}
    assert "output" in names and "indices" in names and "transformer_blocks.0.attn.keys" in names
    assert any(name.startswith("argument.") for name in names)  # the static copies of latents, timestep, text


def test_a_changed_batch_or_k_captures_another_graph_and_release_frees_the_unused():
    adapter = tiny_sd3()
    with emulate_on_cpu():
        _run(adapter, "random", graphs=True)
        store = graphs_of(adapter.transformer)
        assert store.captures == 2
        one = _run(adapter, "random", graphs=True, prompts=PROMPTS[:1], seeds=SEEDS[:1])  # 2 rows, not 4
        assert store.captures == 4
        other_k = _run(adapter, "random", graphs=True, alpha=0.5)  # same rows, another k: only the pruned graph
        assert store.captures == 5
        keys = {key[1] for key in store.graphs}
        assert keys == {None, (4, 19), (2, 19), (4, 32)}  # full steps share a key; (rows, k) for pruned ones
        assert torch.equal(
            one.images, _run(adapter, "random", graphs=False, prompts=PROMPTS[:1], seeds=SEEDS[:1]).images
        )
        assert torch.equal(other_k.images, _run(adapter, "random", graphs=False, alpha=0.5).images)
        freed = store.release(unused_only=True)  # the last generation used the 4-row full graph and k = 32
        assert {key[1] for key in store.graphs} == {None, (4, 32)} and freed > 0
        assert all(key[1][0] != 2 for key in store.pool.keys() if key[0].endswith(".keys"))
        assert ("indices", (4, 32), torch.long, torch.device("cpu")) in store.pool.keys()  # set outside the forward
        again = _run(adapter, "random", graphs=True, alpha=0.5)  # the kept graphs replay: nothing re-captured
        assert store.captures == 5 and torch.equal(again.images, other_k.images)
        store.pool.release()  # behind the graphs' back: they notice and capture again rather than replay stale memory
        assert torch.equal(_run(adapter, "random", graphs=True, alpha=0.5).images, other_k.images)
        assert store.captures == 7
        assert release_graphs(adapter.transformer) > 0 and _graphs(adapter.transformer) is None


def test_reset_between_generations_forgets_the_previous_images_state():
    """A generation after another prompt's gives what it gives alone: the replayed caches were reset by full steps."""
    adapter = tiny_pixart()
    alone = _run(adapter, "cat", graphs=False, prompts=["a green triangle", "a cat"])
    with emulate_on_cpu():
        _run(adapter, "cat", graphs=True)
        after = _run(adapter, "cat", graphs=True, prompts=["a green triangle", "a cat"])
    assert torch.equal(after.images, alone.images)


def test_fallbacks_say_why_in_one_line_and_run_eagerly(caplog):
    adapter = tiny_sd3()
    eager = _run(adapter, "random", graphs=False)
    with caplog.at_level(logging.WARNING, logger="catlab.graphs"):
        cpu = _run(adapter, "random", graphs=True)  # no emulation: a CPU cannot capture
    assert torch.equal(cpu.images, eager.images)
    assert "cuda_graphs=true but running eagerly: the transformer is on cpu" in caplog.text
    assert _graphs(adapter.transformer) is None
    cases = [
        (dict(count_macs=True), "random", None, "count_macs"),
        ({}, {"name": "atedm_reuse", "alpha": 0.3, "start_step": 2, "attention_layers": [1]}, None, "probe layers"),
        ({}, {"name": "atedm", "alpha": 0.3, "start_step": 2}, None, "prunes inside each forward"),
        ({}, "full", StepReuse(step_cache=stepcaches.build({"name": "taylorseer", "start_step": 2})), "step cache"),
    ]
    for cfg, name, reuse, words in cases:
        caplog.clear()
        policy = selectors.build(name) if isinstance(name, dict) else _policy(name)
        with emulate_on_cpu(), caplog.at_level(logging.WARNING, logger="catlab.graphs"):
            sample(
                adapter,
                policy,
                PROMPTS,
                SEEDS,
                SamplerConfig(num_steps=6, progress=False, cuda_graphs=True, **cfg),
                reuse,
            )
        lines = [r.getMessage() for r in caplog.records if "running eagerly" in r.getMessage()]
        assert len(lines) == 1 and words in lines[0], caplog.text


def test_a_host_read_inside_the_forward_fails_the_capture_and_leaves_that_shape_eager(caplog, monkeypatch):
    adapter = tiny_sd3()
    eager = _run(adapter, "sequential", graphs=False)
    block = adapter.transformer.transformer_blocks[1]
    original = block.forward

    def reads_a_value(*args, **kwargs):
        out = original(*args, **kwargs)
        if out[1].shape[1] < 64:  # pruned steps only; shapes are fine, values are not
            float(out[1].abs().max())
        return out

    monkeypatch.setattr(block, "forward", reads_a_value)
    with emulate_on_cpu(), caplog.at_level(logging.WARNING, logger="catlab.graphs"):
        got = _run(adapter, "sequential", graphs=True)
    store = graphs_of(adapter.transformer)
    assert torch.equal(got.images, eager.images)
    assert len(store.graphs) == 1 and len(store.refused) == 1  # the full step captured, the pruned one eager
    assert "capture failed for a pruned step of k=19" in caplog.text and "float(tensor)" in caplog.text


def test_a_frozen_pool_refuses_new_buffers_but_hands_out_existing_ones():
    pool = BufferPool()
    a = pool.get("x", (2, 3), torch.float32, "cpu")
    pool.frozen = "while testing"
    assert pool.get("x", (2, 3), torch.float32, "cpu") is a
    with pytest.raises(BufferAllocationError, match="'x' \\(3, 3\\) first requested while testing"):
        pool.get("x", (3, 3), torch.float32, "cpu")


@pytest.mark.parametrize("name", SELECTORS)
def test_stock_pipeline_graphed_equals_eager(name):
    from tests.test_diffusers_hooks import _sd3

    pipe, call = _sd3()
    enable_pruning(pipe, _policy(name))
    eager = call()
    disable_pruning(pipe)
    with emulate_on_cpu():
        enable_pruning(pipe, _policy(name), cuda_graphs=True)
        first, second = call(), call()
        store = _graphs(pipe.transformer)
        assert store.captures == len(store.graphs) >= 1 and store.generation == 2
        disable_pruning(pipe)
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert _graphs(pipe.transformer) is None  # disable_pruning frees them


@pytest.mark.slow
def test_compiled_blocks_are_another_key_and_replay_equal():
    from tests.test_compile import count_graphs

    adapter = tiny_sd3()
    eager = _run(adapter, "cat", graphs=False)
    with emulate_on_cpu():
        _run(adapter, "cat", graphs=True)
        backend, _ = count_graphs("aot_eager")
        compile_pruned(adapter, backend=backend)
        try:
            first, second = _run(adapter, "cat", graphs=True), _run(adapter, "cat", graphs=True)
        finally:
            uncompile(adapter)
    store = graphs_of(adapter.transformer)
    assert store.captures == 4 and {key[2] for key in store.graphs} == {False, True}
    torch.testing.assert_close(first.images, eager.images, atol=1e-5, rtol=0)
    torch.testing.assert_close(second.images, eager.images, atol=1e-5, rtol=0)


def test_reduce_overhead_compilation_is_refused_with_the_way_that_works():  # and test_compile.py: every such mode
    with pytest.raises(ValueError, match="cuda_graphs=true"):
        compile_pruned(tiny_sd3(), mode="reduce-overhead")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@cuda
@pytest.mark.parametrize("name", sorted(set(selectors.builtin_names()) - {"cat_reference"}))
def test_cuda_capture_and_replay_equal_eager_for_every_selector(name, caplog):
    """Real CUDA graphs: the images equal eager, and the graphs were replayed, not silently skipped.

    12 steps from t0 = 2: ten pruned steps, enough for `cat`'s selection graph (captured at its
    4th pruned step) to replay. The graphed generations run under the host-sync guard (the
    selectors that still read the host once, test_sync.NOT_YET_CLEAN, without it)."""
    from catlab.pruning.graphs import graph_refusal
    from tests.test_sync import NOT_YET_CLEAN

    adapter = tiny_sd3(device="cuda", dtype="float16")
    spec = {
        "name": name,
        "alpha": 0.3,
        "start_step": 2,
        **({"attention_layers": [1]} if name == "atedm_reuse" else {}),
    }
    policy = lambda: _policy(name) if name in SELECTORS else selectors.build(spec)  # noqa: E731
    config = lambda graphs: SamplerConfig(
        num_steps=12,
        progress=False,
        cuda_graphs=graphs,  # noqa: E731
        check_sync=graphs and name not in NOT_YET_CLEAN,
    )
    eager = sample(adapter, policy(), PROMPTS, SEEDS, config(False)).images
    with caplog.at_level(logging.WARNING, logger="catlab.graphs"):
        runs = [sample(adapter, policy(), PROMPTS, SEEDS, config(True)) for _ in range(2)]
    assert "capture failed" not in caplog.text and "not captured" not in caplog.text
    for run in runs:
        torch.testing.assert_close(run.images, eager, atol=2e-3, rtol=0)
    if graph_refusal(adapter.transformer, policy()) is not None:  # refused as a whole, and labelled so
        assert not any(run.trace.graphed for run in runs) and runs[-1].trace.graph_counts["refusals"]
        return
    counts = runs[-1].trace.graph_counts
    assert runs[-1].trace.graphed and counts["forward_captures"] == 0 and counts["forward_replays"] > 0, counts
    assert counts["pruned_replays"] == counts["pruned_forwards"] and not counts["refusals"], counts
    if hasattr(policy(), "prepare_step"):  # a selector with a selection graph replayed it
        assert counts["selection_captures"] == 1 and counts["selection_replays"] >= 5, counts


def test_a_table_that_mixes_graphed_and_eager_rows_says_so():
    from catlab.evaluation.merge import aggregate
    from catlab.evaluation.report import markdown_table

    record = dict(
        macs=1.0,
        selection_macs=0.0,
        full_macs=2.0,
        seconds=1.0,
        denoise_seconds=1.0,
        selection_seconds=0.0,
        metrics={},
    )
    assert aggregate([dict(record, graphed=True)] * 2)["graphed"]
    assert not aggregate([dict(record, graphed=True), record])["graphed"]  # records written before the flag: eager
    rows = [
        {"method": "full", "macs_per_image": 2e9, "graphed": True},
        {"method": "taylorseer", "macs_per_image": 1e9, "graphed": False},
    ]
    table = markdown_table(rows)
    assert "| taylorseer (eager) |" in table and "| full |" in table and "not like for like" in table
    assert "(eager)" not in markdown_table([dict(r, graphed=False) for r in rows])


def test_replaced_weights_drop_the_graphs_so_replays_never_run_stale_ones(caplog):
    adapter = tiny_sd3()
    with emulate_on_cpu():
        _run(adapter, "random", graphs=True)
        store = graphs_of(adapter.transformer)
        assert store.captures == 2
        proj = adapter.transformer.proj_out
        proj.weight = torch.nn.Parameter(proj.weight.detach() * 2)  # a new tensor, as loading other weights does
        with caplog.at_level(logging.WARNING, logger="catlab.graphs"):
            got = _run(adapter, "random", graphs=True)
    assert "re-captured" in caplog.text and store.captures == 4
    assert torch.equal(got.images, _run(adapter, "random", graphs=False).images)


def _drive(policy, selection_graphs, steps=14, batch=2, grid=(16, 16)):
    """One synthetic generation through the planner (cat sees the stacked guidance branches)."""
    from catlab.planner import StepPlanner

    planner = StepPlanner(policy, selection_graphs=selection_graphs)
    planner.reset(batch, grid, steps, "cpu")
    gen, chosen = torch.Generator().manual_seed(0), []
    for step in range(1, steps + 1):
        plan = planner.plan(step)
        idx = planner.select(plan)
        planner.observe(plan, torch.randn(2 * batch, grid[0] * grid[1], 8, generator=gen), idx)
        chosen.append(idx)
    return chosen


def test_cat_selection_replayed_from_a_graph_chooses_what_eager_chooses():
    from catlab.pruning.selection_graphs import SelectionGraphs

    eager = _drive(_policy("cat"), None)
    graphs = SelectionGraphs("cpu")
    for _generation in range(2):  # a new generation re-captures: cat's state tensors are made anew
        got = _drive(_policy("cat"), graphs)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, eager))
        # pruned steps 3..14: the 1st clusters (host), the 2nd and 3rd take a path once each and run
        # eagerly, the 4th captures the steady path, the 5th to 12th replay it
        assert graphs.captures == 1 and graphs.replays == 8  # counted per generation


def test_a_graphed_cat_step_dispatches_a_handful_of_operators():
    from catlab.testing import selection_ops

    counts = selection_ops(_policy("cat"), grid=(16, 16), num_steps=14, graphed=True)
    steady = [sum(ops.values()) for step, ops in counts.items() if step >= 8]
    assert steady and max(steady) <= 8, counts  # copy the output in, clone the indices out, observe's update


def test_a_select_tensors_that_rebinds_state_is_not_captured(caplog):
    from catlab.capabilities import Capability
    from catlab.pruning.selection_graphs import SelectionGraphs
    from catlab.selection.base import Policy

    class Rebinding(Policy):
        capabilities = Capability.REPLAYS_SELECTION

        def reset(self, batch_size, grid, num_steps, device):
            self.total = torch.zeros(batch_size, grid[0] * grid[1])

        def prepare_step(self, state):
            return "always"

        def select_tensors(self, state):
            self.total = self.total + state.output[-state.batch_size :].norm(dim=-1)  # a new tensor: not replayable
            return self.total.topk(state.k, dim=1).indices

        def select(self, state):
            self.prepare_step(state)
            return self.select_tensors(state)

    graphs = SelectionGraphs("cpu")
    with caplog.at_level(logging.WARNING, logger="catlab.graphs"):
        got = _drive(Rebinding(alpha=0.3, start_step=2), graphs)
    eager = _drive(Rebinding(alpha=0.3, start_step=2), None)
    assert all(torch.equal(a, b) for a, b in zip(got[2:], eager[2:]))  # eager, and right
    assert graphs.captures == 0 and "select_tensors rebinds total" in caplog.text


def test_graphed_cat_over_more_steps_replays_the_selection_and_equals_eager():
    adapter = tiny_sd3()
    cfg = dict(num_steps=12, progress=False)
    eager = sample(adapter, _policy("cat"), PROMPTS, SEEDS, SamplerConfig(**cfg))
    with emulate_on_cpu():
        graphed = sample(adapter, _policy("cat"), PROMPTS, SEEDS, SamplerConfig(cuda_graphs=True, **cfg))
    assert torch.equal(graphed.images, eager.images)
    assert all(torch.equal(a, b) for a, b in zip(graphed.trace.indices[2:], eager.trace.indices[2:]))


def test_a_pruners_own_pool_keeps_one_set_of_caches_whatever_the_batch():
    """Eager, a pipeline called at several batch sizes or resolutions does not accumulate caches."""
    from catlab.pruning import TokenPruner

    adapter = tiny_sd3()
    pruner = TokenPruner(adapter.transformer).attach()
    cond = {n: adapter.encode(PROMPTS[:n], True) for n in (1, 2)}
    try:
        for n in (2, 1, 2):
            latents = torch.cat([adapter.initial_latents(SEEDS[:n])] * 2)
            pruner.set_indices(None)
            adapter.predict(latents, torch.tensor(900.0), cond[n])
        names = [key[0] for key in pruner.pool.keys()]
        assert len(names) == len(set(names)) and "output" in names
        assert all(key[1][0] == 4 for key in pruner.pool.keys() if key[0] == "output")
    finally:
        pruner.detach()
    assert not graphs_of(adapter.transformer).pool.one_shape_per_name  # graphs keep every shape they replay


def test_a_failed_capture_logs_its_own_reason_and_the_store_captures_nothing_more_that_generation(caplog, monkeypatch):
    """Every forward reads a value on the host: the first capture (a full step) fails with that reason,
    not the end-of-capture error that follows it; the pruned shape is then not even tried."""
    adapter = tiny_sd3()
    eager = _run(adapter, "sequential", graphs=False)
    block = adapter.transformer.transformer_blocks[0]
    original = block.forward

    def reads_a_value(*args, **kwargs):
        out = original(*args, **kwargs)
        float(out[1].abs().max())
        return out

    monkeypatch.setattr(block, "forward", reads_a_value)
    with emulate_on_cpu(), caplog.at_level(logging.WARNING, logger="catlab.graphs"):
        got = _run(adapter, "sequential", graphs=True)
    store = graphs_of(adapter.transformer)
    assert torch.equal(got.images, eager.images) and not got.trace.graphed
    failures = [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()]
    assert len(failures) == 1 and "a full step" in failures[0] and "float(tensor)" in failures[0], caplog.text
    assert "previous error during capture" not in caplog.text
    assert "nothing more is captured until the next generation" in failures[0]
    assert not store.graphs and len(store.refused) == 1  # the pruned shape was never tried
    counts = got.trace.graph_counts
    assert counts["forward_captures"] == counts["forward_replays"] == 0
    assert any("float(tensor)" in r for r in counts["refusals"])
    assert any(r.startswith("a pruned step of k=19") and "a capture failed earlier" in r for r in counts["refusals"])


def test_a_capture_keeps_the_first_error_and_ends_the_pool_allocation_when_capture_end_throws(monkeypatch):
    from types import SimpleNamespace

    from catlab.pruning import capture

    ended, calls = [], []

    def failing_end():
        calls.append("end")
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    def fails():
        raise ValueError("the real reason")

    with pytest.raises(ValueError, match="the real reason"):
        capture.record(lambda: calls.append("begin"), fails, failing_end)
    assert calls == ["begin", "end"]  # the capture was still ended
    with pytest.raises(RuntimeError, match="previous error"):  # fn fine, the end fails: that is the reason
        capture.record(lambda: None, lambda: 1, failing_end)

    class Graph:
        def capture_end(self):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    backend = object.__new__(capture._CudaBackend)  # no device here: its end-of-capture step alone
    backend.graph, backend.stream, backend.mempool = Graph(), SimpleNamespace(device="cuda:0"), (0, 7)
    monkeypatch.setattr(capture, "end_pool_allocation", lambda device, pool: ended.append((device, pool)))
    with pytest.raises(RuntimeError, match="not permitted"):
        backend._end()
    assert ended == [("cuda:0", (0, 7))]


def test_a_selection_graph_whose_state_observe_rebinds_is_dropped_before_it_replays(caplog):
    """cat with a late reference output: observe sets the scorer's reference after the graph was captured."""
    from catlab.pruning.selection_graphs import SelectionGraphs

    spec = {"name": "cat", "alpha": 0.3, "start_step": 2, "scorer": {"name": "relative_noise", "reference_step": 10}}
    eager = _drive(selectors.build(spec), None, steps=14)
    graphs = SelectionGraphs("cpu")
    with caplog.at_level(logging.WARNING, logger="catlab.graphs"):
        got = _drive(selectors.build(spec), graphs, steps=14)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, eager))
    assert graphs.captures == 1 and 0 < graphs.replays < 8  # replayed until the reference appeared, then eager
    assert "observe or prepare_step rebinds scorer.reference" in caplog.text
    assert not graphs.graphs and list(graphs.reasons.values())[0].startswith("selector 'cat' step:")


def test_run_metrics_carry_the_graph_counters(tmp_path):
    """catlab.run with sampler.cuda_graphs=true on the CPU stand-in: metrics.json counts captures and replays."""
    import json

    from hydra import compose, initialize_config_dir

    from catlab.run import run
    from tests.conftest import ROOT

    overrides = [
        "model=tiny_sd3",
        "model.num_layers=1",
        "model.height=16",
        "model.width=16",
        "selector=cat",
        "selector.start_step=2",
        "sampler.num_steps=12",
        "sampler.progress=false",
        "sampler.cuda_graphs=true",
        "logger=local",
        "num_images=2",
        "batch_size=1",
        "save_images=false",
        "experiment_name=graphs",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with emulate_on_cpu():
        metrics = run(cfg, tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["forward_captures"] == metrics["forward_captures"] == 2  # full and pruned, in the first generation
    assert saved["forward_replays"] == 2 * 12 - 2  # every other forward of the two generations
    assert (
        saved["selection_captures"] == 2 and saved["selection_replays"] > 0
    )  # cat's selection graph, each generation
    assert saved["graph_refusals"] == [] and saved["graphed"] is True
    cpu = run(cfg, tmp_path)  # no stand-in: a CPU cannot capture, and the metrics say why
    assert cpu["forward_replays"] == 0 and not cpu["graphed"] and "on cpu" in cpu["graph_refusals"][0]
