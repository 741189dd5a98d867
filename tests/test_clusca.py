"""``clusca`` and ``cluster_propagate`` against outputs recorded from the authors' ClusCa code, and in catlab's loop.

``tests/golden/clusca_reference.json`` was recorded by running, on a CPU, the authors' own
``Kmeans.fit`` (L1, warm-started from given centroids), ``propagation_update_cache`` (one token per
cluster, ratio 0.3), ``select_one_fresh_index_per_cluster`` and ``cache_init`` + ``cal_type``
(Cache4Diffusion ``dit/clusca-dit``; their attention module's ``timm`` import stubbed, it is not used).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import catlab  # noqa: F401  (registers the components)
from catlab.registry import reuses, selectors
from catlab.reuse.cluster_propagate import kmeans_l1, propagate
from catlab.sampler import SamplerConfig, StepReuse, sample
from catlab.selection.clusca import one_per_cluster
from catlab.testing.tiny_pipelines import flux_pipeline
from tests.conftest import tiny_sd3

GOLDEN = json.loads((Path(__file__).resolve().parent / "golden" / "clusca_reference.json").read_text())


def test_kmeans_matches_the_authors():
    g = GOLDEN["kmeans"]
    labels, centroids = kmeans_l1(torch.tensor(g["x"]), torch.tensor(g["init"]))
    assert labels.tolist() == g["labels"]
    torch.testing.assert_close(centroids, torch.tensor(g["centroids"]), atol=1e-5, rtol=1e-5)


def test_propagation_matches_the_authors():
    g = GOLDEN["propagate"]
    labels, indices = torch.tensor(g["labels"]), torch.tensor(g["indices"])
    assert all(sorted(labels[b, indices[b]].tolist()) == list(range(5)) for b in range(2))  # one per cluster
    ours = propagate(torch.tensor(g["base"]), labels, indices, torch.tensor(g["computed"]), g["ratio"])
    torch.testing.assert_close(ours, torch.tensor(g["result"]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("interval", ["4", "5"])
def test_schedule_matches_the_authors(interval):
    g = GOLDEN["schedule"][interval]
    policy = selectors.build({"name": "clusca", "start_step": g["first_enhance"], "interval": int(interval)})
    ours = ["full" if policy.num_kept(s, 4096) is None else "ClusCa" for s in range(1, 51)]
    assert ours == g["kinds"]


def test_a_cluster_without_a_computed_token_keeps_its_values():
    base = torch.arange(12.0).reshape(1, 4, 3)
    labels = torch.tensor([[0, 0, 1, 1]])
    out = propagate(base, labels, torch.tensor([[0]]), torch.full((1, 1, 3), 100.0), 0.5)
    assert torch.equal(out[0, 2:], base[0, 2:]) and torch.equal(out[0, 0], torch.full((3,), 100.0))
    assert torch.allclose(out[0, 1], 0.5 * 100 + 0.5 * base[0, 1])


def test_one_token_per_cluster_and_exactly_k_distinct():
    labels = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 0], [3, 3, 3, 3, 3, 3, 0, 0]])  # row 1: clusters 1, 2 empty
    idx = one_per_cluster(labels, 4, torch.Generator().manual_seed(0))
    assert idx.shape == (2, 4) and all(len(set(r.tolist())) == 4 for r in idx)
    assert set(labels[0, idx[0]].tolist()) == {0, 1, 2}  # every non-empty cluster of row 0 is picked
    assert {0, 3} <= set(labels[1, idx[1]].tolist())


PROMPTS, SEEDS = ["a red circle", "a blue square"], [0, 1]


def test_no_caching_is_the_full_model_and_clusca_saves_macs():
    adapter = tiny_sd3()
    cfg = SamplerConfig(num_steps=10, guidance_scale=4.0, progress=False)
    full = sample(adapter, selectors.build("full"), PROMPTS, SEEDS, cfg)
    rule = lambda: StepReuse(rule=reuses.build("cluster_propagate"))  # noqa: E731
    same = sample(adapter, selectors.build({"name": "clusca", "interval": 1}), PROMPTS, SEEDS, cfg, rule())
    torch.testing.assert_close(same.images, full.images, atol=1e-5, rtol=1e-5)
    ran = sample(adapter, selectors.build({"name": "clusca", "alpha": 0.0625}), PROMPTS, SEEDS, cfg, rule())
    assert [s.kept for s in ran.trace.steps] == [64, 64, 64, 4, 4, 4, 4, 64, 4, 4]
    assert sum(s.macs for s in ran.trace.steps) < sum(s.macs for s in full.trace.steps)
    assert torch.isfinite(ran.images).all() and not torch.allclose(ran.images, full.images, atol=1e-4)


def test_the_rule_and_the_selector_hold_the_same_clusters():
    adapter = tiny_sd3()
    cfg = SamplerConfig(num_steps=6, guidance_scale=4.0, progress=False)
    policy, rule = selectors.build({"name": "clusca", "alpha": 0.0625}), reuses.build("cluster_propagate")
    sample(adapter, policy, PROMPTS, SEEDS, cfg, StepReuse(rule=rule))
    assert torch.equal(policy.clusters.labels, rule.clusters.labels)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["embedded", "tiny_sd3", "tiny_flux"])
def test_clusca_runs_from_the_command_line(tmp_path, model):
    from tests.conftest import FAST, run_cli

    _, run_dir = run_cli(
        f"model={model}",
        "selector=clusca",
        "selector.alpha=0.0625",
        "reuse=cluster_propagate",
        "num_images=1",
        "batch_size=1",
        "save_images=false",
        *FAST,
        tmp_path=tmp_path,
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["selector"] == "clusca" and metrics["macs_ratio"] > 1


def test_stock_flux_pipeline_equals_catlabs_loop_with_the_propagating_rule(tmp_path):
    """ClusCa whole (selector and ``cluster_propagate``) under ``enable_pruning`` on a complete tiny FLUX.1
    pipeline, called as users call it: catlab's loop's images, clusters and MACs per step. FLUX.1 runs one row
    per image in a call, so the k-means rule, which is not row-wise, runs on a stock pipeline here."""
    from catlab import disable_pruning, enable_pruning, pruning_macs
    from catlab.models.packed import pack
    from catlab.registry import models

    flux_pipeline().save_pretrained(tmp_path)
    spec = {"name": "flux", "path": str(tmp_path), "device": "cpu", "dtype": "float32", "height": 64, "width": 64}
    adapter = models.build({**spec, "max_sequence_length": 32})
    clusca = {"name": "clusca", "alpha": 0.0625, "start_step": 2, "interval": 3}
    parts = lambda: StepReuse(rule=reuses.build({"name": "cluster_propagate", "propagation_ratio": 0.3}))  # noqa: E731
    prompts, seeds, steps = ["a red circle", "a blue square"], [0, 1], 8
    policy = selectors.build(clusca)
    cfg = SamplerConfig(num_steps=steps, guidance_scale=3.5, progress=False)
    ran = sample(adapter, policy, prompts, seeds, cfg, parts())
    pipe, hooked = adapter.pipeline, selectors.build(clusca)
    enable_pruning(pipe, hooked, reuse=parts())
    images = pipe(
        prompts,
        num_inference_steps=steps,
        height=64,
        width=64,
        guidance_scale=3.5,
        latents=pack(adapter.initial_latents(seeds)),
        output_type="pt",
        max_sequence_length=32,
    ).images
    macs = pruning_macs(pipe)
    disable_pruning(pipe)
    assert torch.equal(hooked.clusters.labels, policy.clusters.labels)
    torch.testing.assert_close(images.float(), ran.images, atol=1e-5, rtol=0)
    full, cached = macs[0], macs[2]
    assert macs == [s.macs for s in ran.trace.steps]
    assert macs == [full, full, cached, cached, full, cached, cached, full] and cached < full / 4


def test_the_propagating_rule_is_refused_on_stacked_guidance_rows():
    """On SD3's stock pipeline a call stacks the guidance branches: k-means over them is not the rule after
    guidance, so ``cluster_propagate`` is refused there in one line (``taylor`` runs: next test)."""
    from catlab import enable_pruning
    from catlab.assembly import CompositionError
    from tests.test_assembly_parity import _sd3

    pipe, _ = _sd3(tiny_sd3())
    spec = {"name": "clusca", "alpha": 0.0625, "start_step": 2, "interval": 3}
    with pytest.raises(CompositionError, match="row by row"):
        enable_pruning(pipe, selectors.build(spec), reuse=StepReuse(rule=reuses.build("cluster_propagate")))


def test_stock_sd3_pipeline_equals_catlabs_loop_with_taylor_reuse():
    from catlab import disable_pruning, enable_pruning
    from tests.test_assembly_parity import SCALE, STEPS, _sd3

    spec = {"name": "clusca", "alpha": 0.0625, "start_step": 2, "interval": 3}
    parts = lambda: StepReuse(rule=reuses.build("taylor"))  # noqa: E731
    adapter = tiny_sd3()
    cfg = SamplerConfig(num_steps=STEPS, guidance_scale=SCALE, progress=False)
    policy = selectors.build(spec)
    ran = sample(adapter, policy, PROMPTS, SEEDS, cfg, parts())
    pipe, call = _sd3(adapter)
    hooked = selectors.build(spec)
    enable_pruning(pipe, hooked, guidance_scale=SCALE, reuse=parts())
    latents = call()
    disable_pruning(pipe)
    assert torch.equal(hooked.clusters.labels, policy.clusters.labels)
    torch.testing.assert_close(latents, ran.latents, atol=1e-4, rtol=1e-4)
