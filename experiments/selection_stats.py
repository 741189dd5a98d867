"""Numbers behind the selection maps: how each selector spreads its budget over the image.

Generates held-out prompts with each selector on an embedded model and, from the
token indices of every pruned step, prints per selector:

* ``cv``: coefficient of variation of how often each token is recomputed after t0
  (0 = every token equally often, as ``sequential``; high = the budget returns to
  the same tokens);
* ``wait``: the longest run of pruned steps any token goes without being recomputed,
  averaged over images (``max``: the worst image);
* ``never``: share of tokens never recomputed after t0;
* ``clumped``: share of recomputed tokens whose four grid neighbours were all
  recomputed at the same step (how spatially grouped one step's choice is; a
  neighbour beyond the image border counts as recomputed);
* ``clusters``: for selectors with clusters, the number made and their mean size.

    python experiments/selection_stats.py                      # the 32×32 model (256 tokens)
    python experiments/selection_stats.py --model embedded_64  # the 64×64 model (1024 tokens)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from catlab.builders import build_model, set_threads
from catlab.embedded.world import heldout_scenes
from catlab.registry import selectors
from catlab.sampler import SamplerConfig, sample

MODELS = {"embedded": {"name": "embedded"}, "embedded_64": {"name": "embedded", "path": "bundle_64"}}


def stats(indices: list[torch.Tensor | None], grid: tuple[int, int]) -> dict[str, float]:
    """Statistics of one generation's selections (``(B, k)`` per pruned step, ``None`` for full steps)."""
    pruned = [i for i in indices if i is not None]
    b, n = pruned[0].shape[0], grid[0] * grid[1]
    masks = torch.stack([torch.zeros(b, n, dtype=torch.bool).scatter_(1, i, True) for i in pruned])  # (S, B, N)
    counts = masks.sum(0).float()
    wait = torch.zeros(b, n)
    run = torch.zeros(b, n)
    for m in masks:
        run = torch.where(m, torch.zeros_like(run), run + 1)
        wait = torch.maximum(wait, run)
    h, w = grid
    img = masks.view(-1, 1, h, w).float()
    kernel = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.float32).view(1, 1, 3, 3)
    neighbours = F.conv2d(F.pad(img, (1, 1, 1, 1), value=1.0), kernel)  # border counts as recomputed
    clumped = ((neighbours == 4) & (img > 0)).sum() / img.sum()
    longest = wait.amax(1)
    return {
        "cv": float((counts.std(1) / counts.mean(1)).mean()),
        "wait": float(longest.mean()),
        "max": float(longest.max()),
        "never": float((counts == 0).float().mean()),
        "clumped": float(clumped),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="embedded")
    parser.add_argument("--selectors", default="cat,cat_rankmix,sequential,noise_staleness,random,noise,atedm_reuse")
    parser.add_argument("--n", type=int, default=4, help="held-out prompts (one batch)")
    parser.add_argument("--steps", type=int, default=28)
    args = parser.parse_args()
    set_threads(1)
    adapter = build_model(MODELS[args.model])
    prompts = heldout_scenes(args.n)[1]
    cfg = SamplerConfig(num_steps=args.steps, progress=False)
    print(
        f"{args.model}: {adapter.grid[0]}×{adapter.grid[1]} tokens, {args.n} prompts, {args.steps} steps, α 0.3, t0 8"
    )
    print("| selector | cv | wait (steps) | max wait | never | clumped | clusters |")
    print("|---|---|---|---|---|---|---|")
    for name in args.selectors.split(","):
        policy = selectors.build(name)
        trace = sample(adapter, policy, prompts, list(range(args.n)), cfg).trace
        s = stats(trace.indices, adapter.grid)
        labels = getattr(policy, "labels", None)
        clusters = "–"
        if labels is not None:
            c = int(labels.max()) + 1
            clusters = f"{c} (~{labels.shape[1] / c:.0f} tokens)"
        print(
            f"| {name} | {s['cv']:.2f} | {s['wait']:.1f} | {s['max']:.0f} | {s['never']:.1%} | {s['clumped']:.1%} "
            f"| {clusters} |"
        )


if __name__ == "__main__":
    main()
