"""Selection on a video grid (frames, height, width): clusters over space and time, ⌊αN⌋ tokens for every
selector, the 6-neighbour grid graph, and an image being exactly a one-frame video."""

from __future__ import annotations

import math

import pytest
import torch

from catlab.capabilities import Capability
from catlab.evaluation import diagnostics
from catlab.registry import clusterers, selectors
from catlab.selection.clustering import cluster_features, grid_edges, positional_encoding
from catlab.selection.pooling import cluster_graph
from catlab.testing import check_policy, simulate

VIDEO = (3, 8, 8)


def _spec(name: str, alpha: float = 0.3, **extra) -> dict:
    if name == "budget_schedule":  # its α is the pattern's mean: one pruned share, every pruned step
        return {"name": name, "pattern": [alpha], "start_step": 2, "inner": "random", **extra}
    if name == "adaptive_refresh":  # random outputs forecast badly: a threshold that lets every step refresh
        extra = {"threshold": 1e9, "forecast_steps": False, **extra}
    return {"name": name, "alpha": alpha, "start_step": 2, **extra}


# -- positional encoding -------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 5, 8, 16])
def test_positional_encoding_of_one_frame_equals_the_image_one(dim):
    assert torch.equal(positional_encoding((1, 4, 6), dim), positional_encoding((4, 6), dim))


@pytest.mark.parametrize("dim", [4, 5, 8, 11])
def test_frame_is_a_third_separate_coordinate_one_spatial_step_away(dim):
    frames, h, w = 3, 4, 5
    pe = positional_encoding((frames, h, w), dim)
    assert pe.shape == (frames * h * w, dim)

    def token(f, i, j):
        return pe[f * h * w + i * w + j]

    def d2(a, b):
        return float((a - b).pow(2).sum())

    row = d2(token(0, 1, 0), token(0, 0, 0))
    col = d2(token(0, 0, 1), token(0, 0, 0))
    assert row == pytest.approx((dim // 2) / h**2) and col == pytest.approx((dim - dim // 2) / w**2)  # Eq. 3 as before
    frame = d2(token(1, 0, 0), token(0, 0, 0))
    assert frame == pytest.approx((row + col) / 2)  # one frame away = the mean spatial step
    assert d2(token(2, 0, 0), token(0, 0, 0)) == pytest.approx(4 * frame)
    # no cross terms: a diagonal move in space and time adds up its parts
    assert d2(token(1, 2, 3), token(0, 0, 0)) == pytest.approx(4 * row + 9 * col + frame)
    assert torch.equal(pe[: h * w], positional_encoding((h, w), dim))  # frame 0 is the image encoding
    far = positional_encoding((frames, h, w), dim, frame_step=3.0)
    assert float((far[h * w] - far[0]).pow(2).sum()) == pytest.approx(9 * frame)


def test_a_video_encoding_without_room_for_time_is_refused():
    with pytest.raises(ValueError, match="dim >= 3"):
        positional_encoding(VIDEO, 2)
    assert cluster_features(torch.ones(1, 192, 1), VIDEO, 0.1).shape == (1, 192, 4)  # widened for it


# -- the grid graph ------------------------------------------------------------------------------


def test_grid_edges_in_3d_known_answer():
    # (2, 1, 2): tokens 0 1 in frame 0, 2 3 in frame 1
    assert sorted(map(tuple, grid_edges((2, 1, 2)).T.tolist())) == [(0, 1), (0, 2), (1, 3), (2, 3)]
    frames, h, w = 3, 4, 5
    edges = grid_edges((frames, h, w))
    assert edges.shape[1] == frames * h * (w - 1) + frames * (h - 1) * w + (frames - 1) * h * w == 48 + 45 + 40
    assert len(set(map(tuple, edges.T.tolist()))) == edges.shape[1]  # each pair once
    a, b = (torch.stack([e // (h * w), e % (h * w) // w, e % w]) for e in edges)  # (frame, row, column) of each end
    assert ((b - a).abs().sum(0) == 1).all()  # every edge joins 6-neighbours: one step along one axis
    assert int(((b - a)[0] == 1).sum()) == (frames - 1) * h * w  # next-frame edges
    assert torch.equal(grid_edges((1, h, w)), grid_edges((h, w)))  # an image's edges, in the same order


def test_clusters_touch_across_frames():
    # (2, 2, 2): frame 0 is cluster 0, frame 1 cluster 1: only the next-frame edges join them
    labels = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    assert cluster_graph(labels, (2, 2, 2), 2).T.tolist() == [[0, 1], [1, 0]]
    assert cluster_graph(labels, (8, 1), 2).T.tolist() == [[0, 1], [1, 0]]  # as an 8×1 image: one border too
    split = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1]])  # left/right halves, the same in both frames
    assert cluster_graph(split, (2, 2, 2), 2).T.tolist() == [[0, 1], [1, 0]]


# -- clusters over space and time ----------------------------------------------------------------


def _static_video(frames=3, h=8, w=8, channels=8, batch=2):
    """Every frame the same: two bright blobs on a dark field (static content), a little per-token jitter."""
    i = torch.arange(h).repeat_interleave(w).float()
    j = torch.arange(w).repeat(h).float()
    field = torch.exp(-((i - 2) ** 2 + (j - 2) ** 2) / 4) + torch.exp(-((i - 5) ** 2 + (j - 5) ** 2) / 4)
    frame = field[:, None] * torch.linspace(0.5, 1.5, channels)
    return frame.repeat(frames, 1)[None].expand(batch, -1, -1).contiguous()


def _frames_of_each_cluster(labels: torch.Tensor, grid) -> list[set[int]]:
    frames, h, w = grid
    frame = torch.arange(frames).repeat_interleave(h * w)
    return [set(frame[labels == c].tolist()) for c in labels.unique().tolist()]


@pytest.mark.parametrize("clusterer", ["auto", "kmeans", "spectral", "grid"])
def test_cat_clusters_span_frames_on_static_content(clusterer):
    """A hand-made static clip: cat's clusters (made at its first pruned step) hold tokens of several frames."""
    still = _static_video()
    rng = torch.Generator().manual_seed(0)

    def outputs(step: int) -> torch.Tensor:  # the same content every frame, a little change per step
        return still * (1 + 0.05 * step) + 1e-3 * torch.randn(still.shape, generator=rng)

    policy = selectors.build(_spec("cat", clusterer={"name": clusterer}))
    simulate(policy, VIDEO, num_steps=4, batch=2, channels=8, outputs=outputs)
    for sample in range(2):
        spans = _frames_of_each_cluster(policy.labels[sample], VIDEO)
        assert max(len(frames) for frames in spans) > 1, (clusterer, spans)
        assert sum(len(frames) > 1 for frames in spans) >= len(spans) // 2, (clusterer, spans)


@pytest.mark.parametrize("frame_step, spans", [(1.0, True), (20.0, False)])
def test_the_frame_scale_decides_whether_clusters_span_frames(frame_step, spans):
    """k-means on the static clip's features: one frame one spatial step away, clusters span frames; frames
    20 steps apart, every cluster stays in one frame."""
    still = _static_video(batch=1)
    pe = positional_encoding(VIDEO, still.shape[-1], frame_step=frame_step)
    labels = clusterers.build({"name": "kmeans_sklearn"})(0.05 * still + pe, VIDEO)[0]
    assert any(len(frames) > 1 for frames in _frames_of_each_cluster(labels, VIDEO)) == spans


def test_on_an_image_clusters_stay_as_they_were():
    """The same clusterers on a one-frame video give the image's labels exactly."""
    still = _static_video(frames=1, batch=1)
    for name in ("kmeans_sklearn", "spectral", "grid"):
        clusterer = clusterers.build({"name": name})
        image = clusterer(cluster_features(still, (8, 8), 0.1), (8, 8), torch.Generator().manual_seed(0))
        video = clusterer(cluster_features(still, (1, 8, 8), 0.1), (1, 8, 8), torch.Generator().manual_seed(0))
        assert torch.equal(image, video), name


# -- every selector on a video grid --------------------------------------------------------------


@pytest.mark.parametrize("name", selectors.builtin_names())
def test_every_selector_keeps_floor_alpha_n_unique_tokens_on_a_video_grid(name):
    alpha, n = 0.3, math.prod(VIDEO)
    k = math.floor(alpha * n)  # 57 of 192
    policy = selectors.build(_spec(name, alpha))
    if name == "atedm":  # prunes inside the forward: its plan is what the engine keeps
        assert policy.plan(6, n)[policy.prune_layers[-1]] == k
        return
    check_policy(policy, VIDEO, batch_size=2, num_steps=6)  # the index contract, host-sync-free steps
    picked = [idx for idx in simulate(selectors.build(_spec(name, alpha)), VIDEO, num_steps=6) if idx is not None]
    if name in ("full", "adaptive_schedule"):  # every token, or whole steps forecast: no share of tokens
        assert picked == []
        return
    if Capability.LAYER_SELECTION in policy.capabilities:  # fresh tokens per layer, chosen inside the forward
        assert picked == []  # (their counts per layer and module: tests/test_toca.py, tests/test_duca.py)
        return
    # speca: full, forecast-only and verifying steps (its plan follows its errors); adaptive_refresh: step 3 full
    # (two computations cannot estimate a forecast's error), 4-6 refreshed; the others prune steps 3-6
    expected = {"adaptive_refresh": 3}.get(name, 4)
    assert (len(picked) >= 1) if name == "speca" else (len(picked) == expected), f"{name}: steps 3-6 are pruned"
    for idx in picked:
        assert idx.shape == (2, k), name
        assert all(len(set(row.tolist())) == k for row in idx), name
        assert int(idx.min()) >= 0 and int(idx.max()) < n, name


@pytest.mark.parametrize("name", ["cat", "cat_reference", "cat_rankmix", "sequential", "noise_staleness", "noise"])
def test_a_one_frame_video_is_the_image(name):
    """The selectors' picks on an (h, w) grid and on (1, h, w) are the same, step by step."""

    def run(grid):
        policy = selectors.build(_spec(name))
        return simulate(policy, grid, num_steps=6, channels=8, seed=3)

    for image, video in zip(run((8, 8)), run((1, 8, 8))):
        assert (image is None and video is None) or torch.equal(image, video), name


def test_sequential_takes_the_next_rows_of_every_frame():
    # 3 frames of 4×4, α = 0.375: k = 18, six tokens of each frame per step
    policy = selectors.build(_spec("sequential", 0.375))
    picked = [idx[0] for idx in simulate(policy, (3, 4, 4), num_steps=5, batch=1) if idx is not None]
    first = sorted(picked[0].tolist())
    assert first == [f * 16 + p for f in range(3) for p in range(6)]  # rows 0 and half of 1, in every frame
    second = sorted(picked[1].tolist())
    assert second == [f * 16 + p for f in range(3) for p in range(6, 12)]
    third = sorted(picked[2].tolist())  # positions 12..15 of every frame, then it wraps to 0..1
    assert third == sorted(f * 16 + p for f in range(3) for p in (12, 13, 14, 15, 0, 1))


# -- maps drawn per frame ------------------------------------------------------------------------


def test_diagnostics_draw_a_video_grid_as_a_row_of_frames(tmp_path):
    import matplotlib.image

    row = diagnostics.frame_row(torch.arange(192.0), VIDEO)
    assert row.shape == (8, 3 * 8 + 2)  # three frames, one blank column between two
    assert torch.isnan(row[:, [8, 17]]).all() and not torch.isnan(row[:, :8]).any()
    assert torch.equal(row[:, 9:17], torch.arange(64.0, 128.0).view(8, 8))  # frame 2 in the middle
    assert torch.equal(diagnostics.frame_row(torch.arange(64.0), (8, 8)), torch.arange(64.0).view(8, 8))

    policies = {name: selectors.build(_spec(name)) for name in ("cat", "sequential")}
    chosen = {name: simulate(p, VIDEO, num_steps=6) for name, p in policies.items()}
    diagnostics.selection_maps(chosen, VIDEO, tmp_path / "maps.png", [3, 6])
    image = {"image": simulate(selectors.build(_spec("cat")), (8, 8), num_steps=6)}
    diagnostics.selection_maps(image, (8, 8), tmp_path / "i.png", [3, 6])
    video = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    diagnostics.cluster_map(policies["cat"].labels[0], VIDEO, tmp_path / "clusters.png", video)
    diagnostics.cluster_map(policies["cat"].labels[0][:64] % 5, (8, 8), tmp_path / "image_clusters.png")
    for name in ("maps.png", "clusters.png"):
        assert (tmp_path / name).stat().st_size > 0
    wide, narrow = (matplotlib.image.imread(tmp_path / f).shape for f in ("maps.png", "i.png"))
    assert wide[1] > 2 * narrow[1]  # each panel is three frames wide
    clusters = matplotlib.image.imread(tmp_path / "clusters.png").shape
    assert clusters[1] > 3 * clusters[0]
