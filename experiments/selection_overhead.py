"""How much of the denoising time goes to choosing the tokens.

Runs catlab's sampler with each selector and reads the per-step selection time
from its trace: the one-time clustering is part of the first pruned step. The
share is ``selection seconds / denoising seconds`` of one generation, after a
warm-up generation (imports, allocator); each step's times are the fastest of
``--repeats`` generations, so other processes on the machine inflate them less.

Two model sizes by default, both SD3-architecture transformers with random
weights (cost does not depend on the weights):

* ``tiny``: the default model of ``python -m catlab.run`` (256 tokens);
* ``sd3_width``: SD3-medium's width (24 heads × 64) on 1024 tokens with
  ``--layers`` blocks. Its share is also extrapolated to SD3-medium's 24 blocks,
  scaling the model time by 24 / layers (the blocks are nearly all of it).

    python experiments/selection_overhead.py
    python experiments/selection_overhead.py --selectors cat,random --sizes tiny --steps 28
    python experiments/selection_overhead.py --ops          # operators per pruned step, every selector

``--ops`` prints, instead of times, the ATen operators each selector dispatches in a
pruned step's selection and observation (:func:`catlab.testing.selection_ops`), also
with the selection replayed from graphs where the selector allows it (the last step):
on a GPU at batch 1 each is a kernel launch, and their number, not their FLOPs,
sets the selection's wall-clock share. ``tests/test_selection_ops.py`` bounds them.
"""

from __future__ import annotations

import argparse
import time

import torch

from catlab.families.sd3 import TinySD3
from catlab.registry import selectors
from catlab.sampler import SamplerConfig, sample
from catlab.testing import selection_ops

SIZES = {
    "tiny": dict(height=32, width=32, patch=2, num_layers=4, num_heads=4, head_dim=32, text_dim=64, text_tokens=16),
    "sd3_width": dict(height=64, width=64, patch=2, num_heads=24, head_dim=64, text_dim=64, text_tokens=16),
}
SD3_MEDIUM_LAYERS = 24


def measure(adapter, name: str, steps: int, batch: int, repeats: int) -> dict[str, float]:
    """Per step, the fastest of ``repeats`` timed generations (robust to other processes on the machine)."""
    cfg = {"name": name}
    if name == "atedm_reuse":  # probe the middle block of this model
        cfg["attention_layers"] = [len(adapter.transformer.transformer_blocks) // 2]
    policy = selectors.build(cfg)
    cfg = SamplerConfig(num_steps=steps, progress=False, sync_timing=True)
    prompts, seeds = ["a small red circle in the top left"] * batch, list(range(batch))
    sample(adapter, policy, prompts, seeds, cfg)  # warm-up
    traces = [sample(adapter, policy, prompts, seeds, cfg).trace for _ in range(repeats)]
    step = [min(t.steps[i].seconds for t in traces) for i in range(steps)]
    select = [min(t.steps[i].selection_seconds for t in traces) for i in range(steps)]
    pruned = [i for i, s in enumerate(traces[0].steps) if s.kept < traces[0].num_tokens]
    rest = [select[i] for i in pruned[1:]]
    return {
        "denoise_s": sum(step),
        "selection_s": sum(select),
        "first_ms": 1e3 * (select[pruned[0]] if pruned else 0.0),
        "step_ms": 1e3 * (sum(rest) / len(rest) if rest else 0.0),
        "share": sum(select) / sum(step),
    }


def print_ops(names: list[str]) -> None:
    """Operators per pruned step at 256 and 4096 tokens (SD3-medium's), eager and with graphed selection."""
    print(
        f"{'selector':<16}{'first pruned step':>18}{'later steps':>13}{'later, 4096 tokens':>20}"
        f"{'later, graphed':>16}   most frequent"
    )
    for name in names:
        spec = name if name == "full" else {"name": name, "start_step": 3}
        if name not in ("full", "budget_schedule"):
            spec["alpha"] = 0.3
        rows = []
        for grid, graphed in (((16, 16), False), ((64, 64), False), ((16, 16), True)):
            counts = selection_ops(selectors.build(spec), grid=grid, num_steps=14, graphed=graphed)
            rows.append([sum(c.values()) for _, c in sorted(counts.items())] or [0, 0])
        later = selection_ops(selectors.build(spec), grid=(16, 16), num_steps=14)
        common = sorted(later[max(later)].items(), key=lambda kv: -kv[1])[:3] if later else []
        print(
            f"{name:<16}{rows[0][0]:>18}{max(rows[0][1:] or [0]):>13}{max(rows[1][1:] or [0]):>20}"
            f"{rows[2][-1]:>16}   " + ", ".join(f"{op.removeprefix('aten.')} {n}" for op, n in common)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--selectors", default="cat,cat_reference,noise_staleness,atedm_reuse,random")
    parser.add_argument("--sizes", default="tiny,sd3_width")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=1, help="blocks of the sd3_width model")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations; each step keeps its fastest")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--ops", action="store_true", help="count operators per pruned step instead of timing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ops:
        print_ops(
            sorted(selectors.names())
            if args.selectors == parser.get_default("selectors")
            else args.selectors.split(",")
        )
        return

    for size in args.sizes.split(","):
        kw = dict(SIZES[size])
        kw.setdefault("num_layers", args.layers)
        adapter = TinySD3(**kw)
        tokens = (kw["height"] // kw["patch"]) * (kw["width"] // kw["patch"])
        scale = SD3_MEDIUM_LAYERS / kw["num_layers"] if size == "sd3_width" else None
        print(
            f"\n{size}: {tokens} tokens, {kw['num_layers']} blocks of width {kw['num_heads'] * kw['head_dim']}, "
            f"{args.steps} steps, batch {args.batch}, CFG on, torch threads {torch.get_num_threads()}"
        )
        header = f"{'selector':<16}{'denoise s':>10}{'first ms':>10}{'step ms':>9}{'share':>8}"
        print(header + (f"{'share@24 blocks':>17}" if scale else ""))
        for name in args.selectors.split(","):
            t = time.perf_counter()
            m = measure(adapter, name, args.steps, args.batch, args.repeats)
            line = f"{name:<16}{m['denoise_s']:>10.2f}{m['first_ms']:>10.1f}{m['step_ms']:>9.2f}{m['share']:>8.2%}"
            if scale:
                model_s = m["denoise_s"] - m["selection_s"]
                line += f"{m['selection_s'] / (m['selection_s'] + scale * model_s):>17.3%}"
            print(line + f"   ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
