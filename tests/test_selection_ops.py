"""Each built-in selector's per-step work is a bounded handful of operators, independent of the token count.

On a GPU at batch 1 a selector is launch-bound: its share of a generation follows the
number of kernels it dispatches per pruned step, not its FLOPs. ``selection_ops``
counts the ATen operators of one step's selection and observation (a
``TorchDispatchMode``); the bounds below are the counts measured when they were
written plus a little headroom, so a change that adds per-step work fails here.
"""

from __future__ import annotations

import pytest

from catlab.registry import selectors
from catlab.testing import selection_ops

#: selector → (most operators at its first pruned step, most at any later one); measured + ~10 %
BOUNDS = {
    "random": (3, 3),
    "sequential": (5, 5),
    "noise": (10, 10),
    "noise_staleness": (38, 38),
    "cat": (235, 106),  # the first pruned step also sizes the clusters (scikit-learn, on the host)
    "cat_rankmix": (700, 120),  # the first pruned step also clusters (torch k-means, iterations)
    "forecast_error": (145, 145),
    "budget_schedule": (145, 145),
    "atedm_reuse": (165, 165),  # 20 G-WPR iterations over one probe map
    "atedm": (0, 0),  # prunes inside the forward; nothing between steps
    "toca": (0, 0),  # fresh tokens per layer and module, chosen inside the forward (the layer engine)
    "duca": (0, 0),  # likewise
    "full": (0, 0),
    "adaptive_schedule": (0, 0),  # full or forecast-only steps: no selection (its estimate runs in num_kept)
    "ras": (17, 16),
    "speca": (166, 166),  # a verifying step: the forecast of every token, its history pushed
    "adaptive_refresh": (90, 90),  # its ranking runs in num_kept (the decision); a refresh step pushes the history
}
#: loops on the host by design (docs/cat_reference.md): its count grows with batch and clusters
UNBOUNDED = {"cat_reference"}
#: clusca's first cached step after each full step runs k-means to convergence: a data-dependent count
UNBOUNDED |= {"clusca"}


def _build(name: str):
    if name in ("full", "budget_schedule"):
        return selectors.build(name if name == "full" else {"name": name, "start_step": 3})
    if name == "adaptive_refresh":  # random outputs forecast badly: a threshold that lets every step refresh
        spec = {"alpha": 0.3, "start_step": 3, "threshold": 1e9, "forecast_steps": False}
        return selectors.build({"name": name, **spec})
    return selectors.build({"name": name, "alpha": 0.3, "start_step": 3})


def _counts(name: str, grid, batch) -> tuple[int, int]:
    per_step = [
        sum(ops.values())
        for _, ops in sorted(selection_ops(_build(name), grid=grid, num_steps=12, batch=batch).items())
    ]
    if not per_step:
        return 0, 0
    return per_step[0], max(per_step[1:])


def test_every_registered_selector_has_a_bound():
    assert set(selectors.builtin_names()) - UNBOUNDED <= set(BOUNDS), "add the new selector's operator bound here"


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_operators_per_pruned_step_are_bounded_and_do_not_grow_with_tokens_or_batch(name):
    first_bound, later_bound = BOUNDS[name]
    small = _counts(name, (16, 16), 1)
    large = _counts(name, (32, 32), 2)
    assert small[0] <= first_bound and small[1] <= later_bound, small
    assert large[1] == small[1], (small, large)  # the steady state: the same kernels at 4x tokens, 2x batch


def test_the_counter_sees_every_operator():
    """A known answer: sequential's window is arange + offset, modulo N, expanded over the batch."""
    ops = selection_ops(_build("sequential"), grid=(8, 8), num_steps=6)
    expected = {"aten.arange": 1, "aten.add": 1, "aten.remainder": 1, "aten.expand": 1}
    assert ops == {step: expected for step in (4, 5, 6)}
