"""Selectors driven through the sampler's protocol with simulated model outputs."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from catlab.registry import selectors
from catlab.selection import Policy, StepState, kept_tokens
from catlab.testing import simulate

CPU = torch.device("cpu")


def _assert_exact(idx, batch, k, n):
    assert idx.shape == (batch, k) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    assert (idx.sort(dim=1).values.diff(dim=1) != 0).all(), "repeated index"


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(selectors.builtin_names()),
    alpha=st.floats(0.01, 1.0),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    batch=st.integers(1, 3),
    start=st.integers(0, 3),
    clusterer=st.sampled_from(["kmeans", "spectral", "grid", "none"]),
)
def test_exactly_k_unique_indices(name, alpha, h, w, batch, start, clusterer):
    cfg = {"name": name, "alpha": alpha, "start_step": start}
    if name == "cat":
        cfg["clusterer"] = {"name": clusterer}
    policy = selectors.build(cfg)
    n = h * w
    try:
        policy.check(5)
    except ValueError:
        assume(False)  # a schedule this policy refuses up front (e.g. forecast_error without a full step)

    def exact(step, state, idx):
        _assert_exact(idx, batch, state.k, n)
        if type(policy).num_kept is Policy.num_kept:  # the one rule: k = floor(alpha * N)
            assert state.k == kept_tokens(alpha, n)

    simulate(policy, (h, w), num_steps=5, batch=batch, on_select=exact)


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "cat", "clusterer": {"name": "spectral"}},
        {"name": "cat", "clusterer": {"name": "grid"}, "pooling": {"name": "mean"}},
        {"name": "cat", "clusterer": {"name": "none"}, "staleness": {"name": "age"}},
        {"name": "cat", "clusterer": {"name": "kmeans_sklearn"}},
        {"name": "atedm_reuse", "schedule": "step_aware"},
    ],
)
def test_variants_keep_exactly_k(cfg):
    policy = selectors.build({**cfg, "start_step": 3})
    ks = []
    for idx in simulate(policy, (8, 10), num_steps=12):
        if idx is not None:
            _assert_exact(idx, 2, idx.shape[1], 80)
            ks.append(idx.shape[1])
    if cfg.get("schedule") == "step_aware":
        assert ks[0] > kept_tokens(0.3, 80) > ks[-1] and ks == sorted(ks, reverse=True)
        assert abs(sum(ks) / len(ks) - 0.3 * 80) < 1.5


@pytest.mark.parametrize(
    "cfg, share",
    [
        ({"name": "cat"}, 0.75),
        ({"name": "cat", "cluster_share": 0.9, "staleness": {"name": "age"}}, 0.1),
        ({"name": "noise_staleness", "staleness_share": 0.2}, 0.2),
        ({"name": "cat_reference"}, 0.75),
    ],
)
def test_every_token_is_recomputed_within_a_bounded_number_of_steps(cfg, share):
    grid, steps, start = (16, 16), 80, 4
    n = grid[0] * grid[1]
    k = kept_tokens(0.3, n)
    stale_budget = k - round((1 - share) * k)
    bound = math.ceil(n / stale_budget) + 2
    policy = selectors.build({**cfg, "start_step": start})
    last = torch.full((2, n), start)
    worst = 0
    for step, idx in enumerate(simulate(policy, grid, steps), start=1):
        if idx is None:
            continue
        worst = max(worst, int((step - last).max()))
        last.scatter_(1, idx, step)
    assert worst <= bound, f"a token waited {worst} steps; bound {bound}"


def test_noise_alone_starves_tokens():
    """The failure the staleness part exists for (paper Fig. 3): a fixed noise field pins the selection."""
    grid, n = (8, 8), 64
    fixed = torch.linspace(0, 1, n)[None, :, None].expand(2, -1, 4)
    chosen = simulate(selectors.build({"name": "noise", "start_step": 2}), grid, 20, outputs=lambda s: fixed * s)
    seen = torch.zeros(2, n, dtype=torch.bool)
    for idx in chosen[2:]:
        seen.scatter_(1, idx, True)
    assert seen.sum(1).tolist() == [kept_tokens(0.3, n)] * 2


def test_cat_first_pruned_step_takes_each_best_clusters_noisiest_tenth_of_k():
    """First pruned step (docs/selection.md, rows "first-step quota" and "walk"): the clusters, best first,
    each give their ⌊k/10⌋ noisiest tokens until more than k are taken; the cut keeps k; one token changes
    most inside the best cluster."""
    grid = (16, 16)
    i = torch.arange(16).repeat_interleave(16).float()
    j = torch.arange(16).repeat(16).float()
    blob = torch.exp(-((i - 3) ** 2 + (j - 12) ** 2) / 6)  # changes only around (3, 12)
    gen = torch.Generator().manual_seed(0)
    ramp = torch.rand(256, generator=gen)  # a distinct small change everywhere: no ties in the noise

    def outputs(step):
        return ((blob + 0.01 * ramp) * (step >= 8))[None, :, None].expand(1, -1, 4).clone()

    picked = {}
    policy = selectors.build({"name": "cat", "alpha": 0.3, "start_step": 8, "clusterer": {"name": "kmeans"}})
    simulate(policy, grid, 9, batch=1, outputs=outputs, on_select=lambda s, st_, idx: picked.setdefault(s, idx))
    k, q = 76, 7  # ⌊0.3·256⌋, ⌊k/10⌋
    counted, labels = policy.counted[0], policy.labels[0]
    assert picked[9].shape == (1, k) and int(counted.sum()) == k  # 11 clusters × 7 = 77 > 76, cut to 76
    assert int(blob.argmax()) in picked[9][0].tolist()
    givers = labels[counted].unique()
    assert len(givers) == 11
    score = blob + 0.01 * ramp
    full = [c for c in givers.tolist() if int((counted & (labels == c)).sum()) == q]
    assert len(full) == 10  # the last cluster walked gave 6 after the cut
    for c in full:  # each gives exactly its q noisiest tokens
        members = (labels == c).nonzero().squeeze(1)
        top = set(members[score[members].topk(q).indices].tolist())
        assert top == set(counted.nonzero().squeeze(1).tolist()) & set(members.tolist())


def test_cat_reference_first_step_quota_is_a_tenth_of_k():
    """At the first pruned step each cluster gives exactly its k//10 noisiest tokens (the rest is padding)."""
    policy = selectors.build({"name": "cat_reference", "start_step": 3, "num_clusters": 4, "per_tokens": 256})
    simulate(policy, (16, 16), 4, batch=1)  # makes the clusters at step 4
    k = kept_tokens(0.3, 256)
    noise = torch.randn(256, 8, generator=torch.Generator().manual_seed(3))
    rule = policy._first(noise, 0, k)
    assert len(rule) == 4 * (k // 10) and len(set(rule.tolist())) == len(rule)
    norms = noise.norm(dim=-1)
    for members in policy.members[0]:
        top = set(members[norms[members].topk(k // 10).indices].tolist())
        assert top == {i for i in rule.tolist() if i in set(members.tolist())}


def test_sequential_walks_rows_and_wraps():
    policy = selectors.build({"name": "sequential", "alpha": 0.5, "start_step": 1})
    chosen = simulate(policy, (4, 4), 4, batch=2)
    assert chosen[0] is None
    assert chosen[1][1].tolist() == list(range(8))
    assert chosen[2][0].tolist() == list(range(8, 16))
    assert chosen[3][0].tolist() == list(range(8))


def test_atedm_keeps_the_most_attended_tokens():
    n = 16
    attention = torch.full((1, n, n), 0.01)
    attention[:, :, [5, 9]] = 1.0
    policy = selectors.build({"name": "atedm_reuse", "alpha": 2 / 16, "attention_layers": [0, 1]})
    policy.reset(1, (4, 4), 28, CPU)
    state = StepState(step=9, num_steps=28, grid=(4, 4), batch_size=1, k=2, attention={0: attention, 1: attention})
    assert sorted(policy.select(state)[0].tolist()) == [5, 9]
    assert policy.attention_layers == (0, 1)
    with pytest.raises(RuntimeError, match="attention"):
        policy.select(StepState(step=9, num_steps=28, grid=(4, 4), batch_size=1, k=2))


def test_parts_come_from_configs_or_objects():
    from catlab.registry import clusterers

    built = clusterers.build({"name": "grid"})
    policy = selectors.build({"name": "cat", "clusterer": built, "staleness": "age"})
    assert policy.clusterer is built and type(policy.staleness).__name__ == "AgeStaleness"
    with pytest.raises(ValueError, match="cluster_share"):
        selectors.build({"name": "cat", "cluster_share": 1.5})


def test_selection_is_reproducible():
    runs = [
        simulate(selectors.build({"name": "cat", "start_step": 3, "seed": 7}), (8, 8), 8, seed=1) for _ in range(2)
    ]
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(*runs))


def test_a_policy_that_observes_branches_is_shown_the_stacked_rows():
    """cat_reference scores each sample's conditional row: the sampler shows it both guidance branches."""
    from catlab.sampler import SamplerConfig, sample
    from catlab.selection.baselines import Sequential
    from tests.conftest import tiny_sd3

    class Branches(Sequential):
        observes = "branches"

        def observe(self, step, output, indices):
            super().observe(step, output, indices)
            self.rows = getattr(self, "rows", []) + [output.shape[0]]

    class Guided(Branches):
        observes = "guided"

    shown = {}
    for cls in (Branches, Guided):
        policy = cls(alpha=0.5, start_step=2)
        sample(
            tiny_sd3(), policy, ["a red circle", "a blue square"], [0, 1], SamplerConfig(num_steps=4, progress=False)
        )
        shown[cls.observes] = policy.rows
    assert shown == {"branches": [4, 4, 4, 4], "guided": [2, 2, 2, 2]}
    assert selectors.get("cat_reference").observes == "branches"
