"""scikit-learn's KMeans re-done in torch (`kmeans_matched`), and `cat`'s default clusterer (`auto`)."""

from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_limits

from catlab.registry import clusterers, selectors
from catlab.selection.clustering import cluster_features, cluster_means


@pytest.mark.parametrize("n, channels, c", [(256, 4, 20), (1024, 16, 20), (576, 8, 5)])
def test_kmeans_matched_gives_scikit_learns_labels(n, channels, c):
    side = int(n**0.5)
    noise = torch.randn(3, n, channels, generator=torch.Generator().manual_seed(n))
    features = cluster_features(noise, (side, side), 0.05)
    with threadpool_limits(1):
        expected = clusterers.build({"name": "kmeans_sklearn", "num_clusters": c})(features, (side, side))
    got = clusterers.build({"name": "kmeans_matched", "num_clusters": c})(features, (side, side))
    assert torch.equal(got, expected)


def test_cat_with_kmeans_matched_picks_the_authors_sets_on_the_golden_inputs():
    import importlib.util
    import sys

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("golden_overlap", ROOT / "experiments" / "golden_overlap.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("golden_overlap", module)
    spec.loader.exec_module(module)
    for seed in (0, 1):  # the harness's overlap of cat with scikit-learn is 0.9996 / 1.0: the same sets, step for step
        matched = module.overlap({"name": "cat", "clusterer": {"name": "kmeans_matched"}}, seed)
        assert matched == module.overlap({"name": "cat", "clusterer": {"name": "kmeans_sklearn"}}, seed) > 0.999


def test_cluster_means_are_a_deterministic_sum_equal_to_scatter_add():
    x = torch.randn(2, 300, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 6, (2, 300), generator=torch.Generator().manual_seed(1))
    labels[labels == 5] = 4  # cluster 5 left empty: it keeps its previous centre
    previous = torch.full((2, 6, 8), 7.0)
    sums = torch.zeros(2, 6, 8).scatter_add_(1, labels[..., None].expand(-1, -1, 8), x)
    counts = torch.zeros(2, 6).scatter_add_(1, labels, torch.ones(2, 300))
    expected = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], previous)
    got = cluster_means(x, labels, previous)
    torch.testing.assert_close(got, expected)
    assert torch.equal(got[:, 5], previous[:, 5]) and torch.equal(got, cluster_means(x, labels, previous))


def test_cats_default_clusters_with_scikit_learn_on_a_cpu_and_on_the_device_elsewhere(monkeypatch):
    cat = selectors.build({"name": "cat", "alpha": 0.3, "start_step": 2})
    auto = cat.clusterer
    assert auto.registered_name == "auto"
    assert auto.host.registered_name == "kmeans_sklearn" and auto.device.registered_name == "kmeans_matched"
    calls = []
    monkeypatch.setattr(auto, "host", lambda f, grid, g=None: calls.append("host"))
    monkeypatch.setattr(auto, "device", lambda f, grid, g=None: calls.append("device"))
    auto(torch.zeros(1, 4, 2), (2, 2))
    auto(torch.zeros(1, 4, 2, device="meta"), (2, 2))  # any device that is not the CPU
    assert calls == ["host", "device"]
    explicit = selectors.build({"name": "cat", "clusterer": {"name": "kmeans_sklearn"}})
    assert explicit.clusterer.registered_name == "kmeans_sklearn"  # the authors' exact path, on any device
