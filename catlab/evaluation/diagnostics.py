"""Diagnostic figures: selection maps, cluster maps, and the relative-noise correlation (paper Figs. 2, 5, 6).

A map of a video grid ``(frames, h, w)`` is drawn as a row of its frames, left to right, one blank
column between two frames (:func:`frame_row`); an image's map is drawn as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from catlab.grid import Grid, as_video, grid_tokens


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def frame_row(values: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Per-token ``values`` ``(N,)`` as one 2D picture: ``(h, w)`` for an image (or a one-frame video);
    for a video the frames side by side, ``(h, frames·w + frames − 1)``, NaN (drawn blank) between them."""
    frames, h, w = as_video(grid)
    maps = values.reshape(frames, h, w).float()
    if frames == 1:
        return maps[0]
    gap = torch.full((frames, h, 1), float("nan"))
    return torch.cat([maps, gap], dim=2).permute(1, 0, 2).reshape(h, frames * (w + 1))[:, :-1]


def selection_counts(indices: list[torch.Tensor | None], grid: Grid, sample: int = 0) -> torch.Tensor:
    """How often each token was recomputed over the pruned steps, as a map of the grid's shape."""
    counts = torch.zeros(grid_tokens(grid))
    for idx in indices:
        if idx is not None:
            counts[idx[sample].long()] += 1
    return counts.view(*grid)


def _panel_width(grid: Grid) -> float:
    """A panel's width relative to an image's: a video's row of frames is that many frames wide."""
    frames, _, w = as_video(grid)
    return 1.0 if frames == 1 else (frames * (w + 1) - 1) / w


def selection_maps(
    results: dict[str, list[torch.Tensor | None]], grid: Grid, path: Path, steps: list[int], sample: int = 0
) -> None:
    """Rows: strategies; columns: the selected tokens at a few steps, then the count over all steps.

    The count maps share one colour range and one colour bar, so a colour means the same count in every row.
    On a video grid each panel is a row of the frames (first frame left).
    """
    plt = _plt()
    wide = _panel_width(grid)
    fig, axes = plt.subplots(
        len(results),
        len(steps) + 1,
        figsize=(1.8 * wide * (len(steps) + 1) + 1.0, 1.9 * len(results) + 0.4),
        squeeze=False,
    )
    counts = {name: selection_counts(indices, grid, sample) for name, indices in results.items()}
    top = max(1.0, max(float(c.max()) for c in counts.values()))
    video = as_video(grid)[0] > 1
    for r, (name, indices) in enumerate(results.items()):
        for c, step in enumerate(steps):
            mask = torch.zeros(grid_tokens(grid))
            idx = indices[step - 1] if step - 1 < len(indices) else None
            if idx is not None:
                mask[idx[sample].long()] = 1
            axes[r][c].imshow(frame_row(mask, grid), cmap="gray", vmin=0, vmax=1)
            first = f"step {step}: white = recomputed" + (", frames left to right" if video else "")
            axes[r][c].set_title(first if c == 0 else f"step {step}", fontsize=7)
        image = axes[r][-1].imshow(frame_row(counts[name].flatten(), grid), cmap="viridis", vmin=0, vmax=top)
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


def cluster_map(labels: torch.Tensor, grid: Grid, path: Path, image: torch.Tensor | None = None) -> None:
    """The token clusters of one sample (paper Fig. 6), beside its image when given.

    On a video grid the clusters are drawn as a row of frames, so a cluster that spans frames shows one
    colour in several of them; ``image`` may then be the video ``(frames, 3, H, W)``, drawn the same way.
    """
    plt = _plt()
    n = 2 if image is not None else 1
    frames = as_video(grid)[0]
    wide = _panel_width(grid)
    fig, axes = plt.subplots(1, n, figsize=(3 * wide * n + 0.6, 3), squeeze=False)
    count = int(labels.max()) + 1
    shown = axes[0][0].imshow(
        frame_row(labels.cpu(), grid), cmap="tab20" if count <= 20 else "nipy_spectral", vmin=-0.5, vmax=count - 0.5
    )
    bar = fig.colorbar(shown, ax=axes[0][0], fraction=0.046, pad=0.04)
    bar.set_label("cluster", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    bar.ax.yaxis.get_major_locator().set_params(integer=True)
    axes[0][0].set_title(f"{count} clusters" + (f", frames 1-{frames} left to right" if frames > 1 else ""))
    if image is not None:
        picture = image.clamp(0, 1).cpu()
        if picture.dim() == 4:  # a video: its frames side by side
            picture = torch.cat(list(picture), dim=2)
        axes[0][1].imshow(picture.permute(1, 2, 0))
        axes[0][1].set_title("image" if image.dim() == 3 else "video")
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
