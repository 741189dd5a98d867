"""Known answers for the parts of a selector on hand-made inputs."""

import pytest
import torch

from catlab.pruning.instep import gwpr
from catlab.registry import clusterers, poolings, stalenesses
from catlab.selection.clustering import cluster_features, positional_encoding
from catlab.selection.pooling import cluster_graph
from catlab.selection.ranking import first_k_unchosen, order_by
from catlab.selection.scorers import RelativeNoise


def _ewma(decay, selections, n=4, ties="index"):
    tracker = stalenesses.build({"name": "ewma", "decay": decay, "ties": ties})
    tracker.reset(1, n, torch.device("cpu"), torch.Generator().manual_seed(0))
    for sel in selections:
        tracker.update(torch.tensor([sel]))
    return tracker


def test_ewma_after_a_selection_sequence():
    tracker = _ewma(0.5, [[0, 1], [1, 2], [0, 3]])
    # f0 = [1, 1, 0, 0]; f1 = [.5, 1.5, 1, 0]; f2 = [1.25, .75, .5, 1]
    assert tracker.frequency.tolist() == [[1.25, 0.75, 0.5, 1.0]]
    assert tracker.order().tolist() == [[2, 1, 3, 0]]
    assert tracker.age.tolist() == [[0, 1, 1, 0]]


def test_ewma_ties_fall_to_the_lowest_index_by_default():
    tracker = _ewma(0.0, [[0], [1]])  # f = [0, 1, 0, 0]
    assert tracker.order().tolist() == [[0, 2, 3, 1]]


def test_ewma_counts_a_mask_of_computed_tokens():
    tracker = _ewma(0.5, [])
    tracker.update(torch.tensor([[True, False, True, False]]))
    assert tracker.frequency.tolist() == [[1.0, 0.0, 1.0, 0.0]] and tracker.age.tolist() == [[0, 1, 0, 1]]


def test_ewma_random_ties_fall_to_the_oldest_then_at_random():
    tracker = _ewma(0.0, [[0], [1]], ties="random")  # f = [0, 1, 0, 0]; ages [1, 0, 2, 2]
    firsts = set()
    for _ in range(20):
        order = tracker.order()[0].tolist()
        assert set(order[:2]) == {2, 3} and order[2:] == [0, 1]
        firsts.add(order[0])
    assert firsts == {2, 3}


def test_full_step_leaves_the_ewma_order_unchanged():
    tracker = _ewma(0.5, [[0, 1]])
    tracker.update(None)
    assert tracker.frequency.tolist() == [[1.5, 1.5, 1.0, 1.0]] and tracker.age.tolist() == [[0, 0, 0, 0]]


def test_age_staleness_orders_by_steps_since_computed():
    tracker = stalenesses.build("age")
    tracker.reset(1, 3, torch.device("cpu"), torch.Generator().manual_seed(0))
    for sel in ([0], [1], [2], [0]):
        tracker.update(torch.tensor([sel]))
    assert tracker.order().tolist() == [[1, 2, 0]]


def test_positional_encoding():
    pe = positional_encoding((2, 4), 5)
    assert pe.shape == (8, 5)
    assert pe[7].tolist() == [0.5, 0.5, 0.75, 0.75, 0.75]  # token (1, 3): i/h twice, j/w three times
    assert pe[2].tolist() == [0.0, 0.0, 0.5, 0.5, 0.5]


def test_relative_noise_uses_step_before_t0_as_reference():
    scorer = RelativeNoise()
    scorer.reset(start_step=8)
    for step in range(1, 9):
        scorer.observe(step, torch.full((1, 2, 3), float(step)))
    score = scorer.score(torch.tensor([[[8.0, 8.0, 8.0], [7.0, 11.0, 7.0]]]), (1, 2), torch.device("cpu"))
    assert score.tolist() == [[pytest.approx(3**0.5), 4.0]]


def _components(labels, grid):
    """Sizes of the 4-connected regions of each label on the grid, largest first."""
    h, w = grid
    lab = labels.view(h, w).tolist()
    seen, sizes = set(), {}
    for si in range(h):
        for sj in range(w):
            if (si, sj) in seen:
                continue
            seen.add((si, sj))
            stack, size = [(si, sj)], 0
            while stack:
                i, j = stack.pop()
                size += 1
                for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                    if 0 <= a < h and 0 <= b < w and (a, b) not in seen and lab[a][b] == lab[i][j]:
                        seen.add((a, b))
                        stack.append((a, b))
            sizes.setdefault(lab[si][sj], []).append(size)
    return {k: sorted(v, reverse=True) for k, v in sizes.items()}


def _two_blobs(grid=(16, 16), channels=8):
    h, w = grid
    i = torch.arange(h).repeat_interleave(w).float()
    j = torch.arange(w).repeat(h).float()
    field = torch.exp(-((i - 4) ** 2 + (j - 4) ** 2) / 8) + torch.exp(-((i - 11) ** 2 + (j - 11) ** 2) / 8)
    jitter = 0.01 * torch.randn(h * w, channels, generator=torch.Generator().manual_seed(0))
    return (field[:, None] * torch.linspace(0.5, 1.5, channels) + jitter)[None]


@pytest.mark.parametrize("name", ["kmeans", "kmeans_sklearn", "spectral", "grid"])
def test_clusterer_on_two_blobs_gives_contiguous_clusters(name):
    grid = (16, 16)
    features = cluster_features(_two_blobs(grid), grid, noise_weight=0.1)
    clusterer = clusterers.build({"name": name, "num_clusters": 20, "per_tokens": 4096})
    labels = clusterer(features, grid, torch.Generator().manual_seed(0))
    assert labels.shape == (1, 256) and clusterer.count(256) == 2  # 20 per 4096 → 1.25, at least min_clusters
    clusterer = clusterers.build({"name": name, "num_clusters": 6, "per_tokens": 256})
    labels = clusterer(features, grid, torch.Generator().manual_seed(0))
    assert 2 <= len(labels.unique()) <= 9  # grid: 3×3 patches of 7 tokens
    regions = _components(labels[0], grid)
    if name in ("spectral", "grid"):
        assert all(len(r) == 1 for r in regions.values()), regions
    else:  # k-means on [noise + position] may leave a stray token at a blob's rim
        assert all(r[0] >= 0.95 * sum(r) for r in regions.values()), regions


def test_cluster_count_is_exact_by_default_and_scales_with_per_tokens():
    assert [clusterers.build("kmeans").count(n) for n in (4096, 1024, 256, 16384, 5)] == [20, 20, 20, 20, 5]
    km = clusterers.build({"name": "kmeans", "per_tokens": 4096})
    assert [km.count(n) for n in (4096, 1024, 256, 16384, 1)] == [20, 5, 2, 80, 1]


@pytest.mark.parametrize("name", ["kmeans", "kmeans_sklearn", "spectral"])
def test_clusters_follow_the_noise_when_it_weighs_more(name):
    grid = (12, 12)
    i = torch.arange(12).repeat_interleave(12).float()
    j = torch.arange(12).repeat(12).float()
    disk = (((i - 5.5) ** 2 + (j - 5.5) ** 2) < 9).float()
    features = cluster_features(disk[None, :, None].expand(1, -1, 4), grid, noise_weight=3.0)
    clusterer = clusterers.build({"name": name, "num_clusters": 2, "per_tokens": 144})
    labels = clusterer(features, grid, torch.Generator().manual_seed(0))[0]
    inside, outside = labels[disk.bool()], labels[~disk.bool()]
    assert len(inside.unique()) == 1 and len(outside.unique()) == 1 and inside[0] != outside[0]


def test_kmeans_is_deterministic_for_a_seed():
    features = cluster_features(_two_blobs(), (16, 16), 0.5)
    km = clusterers.build({"name": "kmeans", "num_clusters": 5, "per_tokens": 256})
    a = km(features, (16, 16), torch.Generator().manual_seed(3))
    b = km(features, (16, 16), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_grid_and_none_clusterers():
    feats = torch.zeros(2, 16, 2)
    labels = clusterers.build({"name": "grid", "num_clusters": 4, "per_tokens": 16})(feats, (4, 4))
    assert labels[0].view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert clusterers.build("none")(feats, (4, 4)).eq(0).all()


def test_cluster_graph_and_graph_pooling_on_a_chain():
    labels = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 2, 2, 1, 1, 1]])
    edges = cluster_graph(labels, (1, 6), 3)
    assert sorted(map(tuple, edges.t().tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1), (4, 5), (5, 4)]
    scores = torch.tensor([[1.0, 3.0, 2.0, 2.0, 6.0, 6.0], [1.0, 1.0, 1.0, 4.0, 4.0, 4.0]])
    graph = poolings.build({"name": "graph", "neighbor_weight": 0.5})
    graph.setup(labels, (1, 6), 3)
    out = graph(scores)
    # sample 0: means [2, 2, 6]; c0 = (2 + 2)/2, c1 = 2/2 + mean(2, 6)/2, c2 = (6 + 2)/2
    assert out[0].tolist() == [2.0, 3.0, 4.0]
    # sample 1: cluster 0 is empty; c1 = (4 + 1)/2, c2 = (1 + 4)/2
    assert out[1].tolist() == [float("-inf"), 2.5, 2.5]
    mean = poolings.build("mean")
    mean.setup(labels, (1, 6), 3)
    assert mean(scores)[0].tolist() == [2.0, 2.0, 6.0]


def test_graph_pooling_on_a_grid_of_clusters():
    # 2×2 blocks of a 4×4 grid: every cluster touches two others (not the diagonal one)
    labels = clusterers.build({"name": "grid", "num_clusters": 4, "per_tokens": 16})(torch.zeros(1, 16, 2), (4, 4))
    pool = poolings.build({"name": "graph", "neighbor_weight": 0.5})
    pool.setup(labels, (4, 4), 4)
    scores = torch.tensor([[0.0, 4.0, 8.0, 12.0]]).gather(1, labels)
    assert pool(scores).tolist() == [[3.0, 5.0, 7.0, 9.0]]  # c0 = 0/2 + mean(4, 8)/2, ...


def test_gwpr_on_hand_made_attention():
    # token 0 attends half to itself, half to 1; token 1 attends only to 0 → s = (2/3, 1/3)
    a = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])
    assert gwpr(a, iterations=60)[0].tolist() == pytest.approx([2 / 3, 1 / 3], abs=1e-6)
    # everyone attends to token 1: it holds all the importance
    star = torch.tensor([[[0.0, 1.0, 0.0]] * 3])
    assert gwpr(star, iterations=3)[0].tolist() == pytest.approx([0.0, 1.0, 0.0])
    # rows are renormalised (image→image attention drops the text part)
    assert gwpr(0.3 * a, iterations=60)[0].tolist() == pytest.approx([2 / 3, 1 / 3], abs=1e-6)


def test_order_by_and_first_k_unchosen():
    order = order_by(torch.tensor([[1.0, 0.0, 1.0, 0.0]]), torch.tensor([[0.0, 5.0, 3.0, 1.0]]))
    assert order.tolist() == [[3, 1, 0, 2]]
    chosen = torch.tensor([[False, False, True, False]])
    assert first_k_unchosen(order, chosen, 3).tolist() == [[3, 1, 2]]


def test_channel_max_pooling_known_answer():
    """docs/selection.md rows "cluster score": signed per-channel max, L2 norm; the first step adds mean + sum + max
    over the cluster and its grid neighbours (what the authors' SimpleConv computes, checked against it too)."""
    from torch_geometric.nn import MultiAggregation, SimpleConv

    labels = torch.tensor([[0, 0, 1, 1, 2, 2]])
    x = torch.tensor([[[1.0, -2.0], [-1.0, 3.0], [2.0, 0.0], [0.0, -1.0], [-3.0, -3.0], [-1.0, -4.0]]])
    pool = poolings.build("channel_max")
    pool.setup(labels, (1, 6), 3)
    assert pool.pooled(x)[0].tolist() == [[1.0, 3.0], [2.0, 0.0], [-1.0, -3.0]]
    assert torch.allclose(pool(x)[0], torch.tensor([10.0, 4.0, 10.0]).sqrt())
    # c0 sees {c0, c1}: mean [1.5, 1.5] + sum [3, 3] + max [2, 3]; c1 sees all three; c2 sees {c1, c2}
    expected = torch.tensor([[6.5, 7.5], [2 / 3 + 2 + 2, 0 + 0 + 3], [0.5 + 1 + 2, -1.5 - 3 + 0]]).norm(dim=-1)
    assert torch.allclose(pool(x, first=True)[0], expected)
    conv = SimpleConv(aggr=MultiAggregation(["mean", "mean", "max"], mode="sum"), combine_root="self_loop")
    authors = conv(pool.pooled(x)[0], cluster_graph(labels, (1, 6), 3)).norm(dim=-1)
    assert torch.allclose(pool(x, first=True)[0], authors)
