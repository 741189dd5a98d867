"""Diagnostic figures: selection maps, cluster maps, and the relative-noise correlation (paper Figs. 2, 5, 6)."""

from __future__ import annotations

from pathlib import Path

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def selection_counts(indices: list[torch.Tensor | None], grid: tuple[int, int], sample: int = 0) -> torch.Tensor:
    """How often each token was recomputed over the pruned steps, as an (h, w) map."""
    counts = torch.zeros(grid[0] * grid[1])
    for idx in indices:
        if idx is not None:
            counts[idx[sample].long()] += 1
    return counts.view(*grid)


def selection_maps(
    results: dict[str, list[torch.Tensor | None]], grid: tuple[int, int], path: Path, steps: list[int], sample: int = 0
) -> None:
    """Rows: strategies; columns: the selected tokens at a few steps, then the count over all steps.

    The count maps share one colour range and one colour bar, so a colour means the same count in every row.
    """
    plt = _plt()
    fig, axes = plt.subplots(
        len(results), len(steps) + 1, figsize=(1.8 * (len(steps) + 1) + 1.0, 1.9 * len(results) + 0.4), squeeze=False
    )
    counts = {name: selection_counts(indices, grid, sample) for name, indices in results.items()}
    top = max(1.0, max(float(c.max()) for c in counts.values()))
    for r, (name, indices) in enumerate(results.items()):
        for c, step in enumerate(steps):
            mask = torch.zeros(grid[0] * grid[1])
            idx = indices[step - 1] if step - 1 < len(indices) else None
            if idx is not None:
                mask[idx[sample].long()] = 1
            axes[r][c].imshow(mask.view(*grid), cmap="gray", vmin=0, vmax=1)
            axes[r][c].set_title(f"step {step}: white = recomputed" if c == 0 else f"step {step}", fontsize=7)
        image = axes[r][-1].imshow(counts[name], cmap="viridis", vmin=0, vmax=top)
        axes[r][-1].set_title(f"times recomputed (of {sum(i is not None for i in indices)})", fontsize=7)
        axes[r][0].set_ylabel(name, fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    slot = fig.add_axes((0.91, 0.1, 0.02, 0.8), label="<colorbar>")
    bar = fig.colorbar(image, cax=slot)  # one scale for every row
    bar.set_label("times recomputed (every row)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    bar.ax.yaxis.get_major_locator().set_params(integer=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cluster_map(labels: torch.Tensor, grid: tuple[int, int], path: Path, image: torch.Tensor | None = None) -> None:
    """The token clusters of one sample (paper Fig. 6), beside its image when given."""
    plt = _plt()
    n = 2 if image is not None else 1
    fig, axes = plt.subplots(1, n, figsize=(3 * n + 0.6, 3), squeeze=False)
    count = int(labels.max()) + 1
    shown = axes[0][0].imshow(
        labels.view(*grid).cpu(), cmap="tab20" if count <= 20 else "nipy_spectral", vmin=-0.5, vmax=count - 0.5
    )
    bar = fig.colorbar(shown, ax=axes[0][0], fraction=0.046, pad=0.04)
    bar.set_label("cluster", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    bar.ax.yaxis.get_major_locator().set_params(integer=True)
    axes[0][0].set_title(f"{count} clusters")
    if image is not None:
        axes[0][1].imshow(image.permute(1, 2, 0).clamp(0, 1).cpu())
        axes[0][1].set_title("image")
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def relative_noise_norms(outputs: dict[int, torch.Tensor], reference_step: int) -> dict[int, torch.Tensor]:
    """‖n_t − n_ref‖₂ per token for every recorded step after the reference, (B, N) each."""
    ref = outputs[reference_step]
    return {s: (o - ref).norm(dim=-1) for s, o in outputs.items() if s > reference_step}


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.flatten().double(), y.flatten().double()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()).clamp(min=1e-12))


def noise_correlation(outputs: dict[int, torch.Tensor], reference_step: int, step: int, path: Path) -> float:
    """Scatter of the relative-noise norm at ``step`` against ``step + 1`` with Pearson r (paper Fig. 2)."""
    norms = relative_noise_norms(outputs, reference_step)
    x, y = norms[step].flatten(), norms[step + 1].flatten()
    r = pearson(x, y)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.scatter(x, y, s=3, alpha=0.5)
    ax.set_xlabel(rf"$\Vert n_{{{step}}} - n_{{{reference_step}}} \Vert_2$ per token, step {step}")
    ax.set_ylabel(rf"$\Vert n_{{{step + 1}}} - n_{{{reference_step}}} \Vert_2$ per token, step {step + 1}")
    ax.set_title(f"Pearson r = {r:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return r
