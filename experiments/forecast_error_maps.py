"""Per-token error maps of the order-1 Taylor forecast, and the tokens ``adaptive_refresh`` would recompute.

One embedded prompt runs with every step full; each step's guided output (token space)
is kept. At a few steps ``s`` the order-1 forecast from the two full steps before a gap
(``s0 = s − g``, ``s1 = s0 − g``) is compared with the true output: the first row of the
figure is the true per-token error ``|y_s − forecast|`` (relative to the mean token
norm), the second the estimate ``adaptive_refresh`` ranks by (its second divided
difference through ``s0, s1, s2`` times the node polynomial), the third the ``⌊α·N⌋``
tokens that estimate picks (white) over the true top ``⌊α·N⌋`` (red where missed). The
printed lines give each step's recall (picked ∩ true top-k over k) and the share of the
total error those true top-k tokens carry. Usage::

    python experiments/forecast_error_maps.py --out docs/results/forecast_error/forecast_error_maps.png
"""

from __future__ import annotations

import argparse
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from catlab.models.embedded import Embedded  # noqa: E402
from catlab.sampler import SamplerConfig, sample  # noqa: E402
from catlab.selection.base import kept_tokens  # noqa: E402
from catlab.selection.simple import Full  # noqa: E402

DEFAULT_OUT = "docs/results/forecast_error/forecast_error_maps.png"


class Recording(Full):
    """The full model, keeping each step's guided output ``(B, N, C)``."""

    def reset(self, batch_size, grid, num_steps, device) -> None:
        super().reset(batch_size, grid, num_steps, device)
        self.grid_shape, self.outputs = tuple(grid), {}

    def observe(self, step, output, indices) -> None:
        self.outputs[step] = output.detach().double()


def maps(outputs: dict, step: int, gap: int, alpha: float):
    """True and estimated per-token error of the order-1 forecast of ``step`` from ``step − gap``, ``step − 2·gap``."""
    s0, s1, s2 = step - gap, step - 2 * gap, step - 3 * gap
    y0, y1, y2, ys = outputs[s0][0], outputs[s1][0], outputs[s2][0], outputs[step][0]
    scale = y0.norm(dim=-1).mean()
    d1 = (y0 - y1) / (s0 - s1)
    true = (ys - (y0 + d1 * (step - s0))).norm(dim=-1) / scale
    d2 = (d1 - (y1 - y2) / (s1 - s2)) / (s0 - s2)
    est = d2.norm(dim=-1) * abs((step - s0) * (step - s1)) / scale
    k = kept_tokens(alpha, true.numel())
    picked, top = est.topk(k).indices, true.topk(k).indices
    recall = len(set(picked.tolist()) & set(top.tolist())) / k
    share = float(true[top].sum() / true.sum())
    return true, est, picked, top, recall, share


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", default="a large red square in the top left and a small blue circle in the center")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, nargs="+", default=[8, 14, 20, 26])
    ap.add_argument("--gap", type=int, default=2, help="steps between the full steps the forecast comes from")
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("docs/results/forecast_error/forecast_error_maps.png")
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    adapter, policy = Embedded(), Recording()
    sample(adapter, policy, [args.prompt], [args.seed], SamplerConfig(num_steps=28, progress=False))
    h, w = policy.grid_shape
    fig, axes = plt.subplots(3, len(args.steps), figsize=(2.3 * len(args.steps), 7.0), squeeze=False)
    for col, step in enumerate(args.steps):
        true, est, picked, top, recall, share = maps(policy.outputs, step, args.gap, args.alpha)
        vmax = float(true.max())
        bar = axes[0][col].imshow(true.view(h, w), cmap="magma", vmin=0, vmax=vmax)
        fig.colorbar(bar, ax=axes[0][col], fraction=0.046, pad=0.04)
        axes[0][col].set_title(f"step {step}: true error", fontsize=8)
        bar = axes[1][col].imshow(est.view(h, w), cmap="magma", vmin=0)
        fig.colorbar(bar, ax=axes[1][col], fraction=0.046, pad=0.04)
        axes[1][col].set_title("estimate (relative)", fontsize=8)
        mask = torch.zeros(h * w, 3)
        mask[top] = torch.tensor([0.85, 0.1, 0.1])
        mask[picked] = torch.tensor([1.0, 1.0, 1.0])
        axes[2][col].imshow(mask.view(h, w, 3))
        axes[2][col].set_title(f"picked (white), missed (red)\nrecall {recall:.2f}", fontsize=8)
        print(
            f"step {step}: forecast from steps {step - args.gap}, {step - 2 * args.gap}; mean true error "
            f"{float(true.mean()):.4f}, estimate {float(est.mean()):.4f}; top {len(top)} tokens carry "
            f"{share:.0%} of the error, the estimate's pick recalls {recall:.0%} of them"
        )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"order-1 forecast error per token (gap {args.gap}, alpha {args.alpha}): {args.prompt}", fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
