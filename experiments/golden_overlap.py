"""How far each selector, or `cat` with one part swapped, lands from the authors' CAT selection.

Drives each selector over the golden inputs of ``tests/golden/`` (64×64 grid, 28 steps,
t0 = 8, α = 0.3) and prints, per seed, the mean Jaccard overlap of the tokens it
computes with the tokens the authors' compiled path computes, over the pruned steps
9–28. This is the table in ``docs/selection.md``; ``tests/test_cat_reference_golden.py``
asserts the exact rows (`cat`, `cat_reference`).

    python experiments/golden_overlap.py
    python experiments/golden_overlap.py --seeds 0 --variants cat,random
    python experiments/golden_overlap.py --variants cat,clusterer=kmeans_matched --digits 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import catlab  # noqa: E402,F401  (registers the selectors)
from catlab.registry import selectors  # noqa: E402
from catlab.testing import simulate  # noqa: E402
from tests.test_cat_reference_golden import _golden, _jaccard, _outputs  # noqa: E402

VARIANTS = {
    "cat": {"name": "cat"},
    "clusterer=kmeans": {"name": "cat", "clusterer": {"name": "kmeans"}},
    "clusterer=kmeans_matched": {"name": "cat", "clusterer": {"name": "kmeans_matched"}},
    "clusterer.n_init=4": {"name": "cat", "clusterer": {"name": "kmeans_sklearn", "n_init": 4}},
    "clusterer=spectral": {"name": "cat", "clusterer": {"name": "spectral"}},
    "pooling=graph": {"name": "cat", "pooling": {"name": "graph"}},
    "staleness.ties=random": {"name": "cat", "staleness": {"name": "ewma", "ties": "random"}},
    "noise_staleness": {"name": "noise_staleness"},
    "cat_rankmix": {"name": "cat_rankmix"},
    "sequential": {"name": "sequential"},
    "random": {"name": "random"},
}


def overlap(spec: dict, seed: int) -> float:
    """Mean Jaccard of the computed sets against the authors' (counted + padding) over the pruned steps."""
    grid = (64, 64)
    out = _outputs(seed, grid)
    policy = selectors.build(spec)
    rows = (lambda s: out[s - 1]) if policy.observes == "branches" else (lambda s: out[s - 1][1:])
    got = {}
    simulate(
        policy,
        grid,
        28,
        batch=1,
        outputs=rows,
        on_select=lambda step, state, idx: got.setdefault(
            step, torch.zeros(4096, dtype=torch.bool).scatter_(0, idx[0], True)
        ),
    )
    gold = _golden("compiled", grid)[seed]
    values = [_jaccard(got[s], gold["counted"][r] | gold["padding"][r]) for r, s in enumerate(gold["steps"])]
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--digits", type=int, default=3, help="decimals of each Jaccard")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    print("| variant | Jaccard (seeds " + " / ".join(map(str, seeds)) + ") |\n| --- | --- |")
    with threadpool_limits(1):  # scikit-learn's KMeans on one thread, as the golden files were made
        for name in args.variants.split(","):
            values = [overlap(VARIANTS[name], s) for s in seeds]
            print(f"| `{name}` | " + " / ".join(f"{v:.{args.digits}f}" for v in values) + " |")


if __name__ == "__main__":
    main()
