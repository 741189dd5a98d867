"""The logger interface every sink implements."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, cols: int | None = None) -> Image.Image:
    """``(B, 3, H, W)`` in [0, 1] → one PIL grid image."""
    b, _, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = torch.ones(3, rows * h, cols * w)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    return to_pil(grid)


def to_pil(image: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` in [0, 1] → PIL image."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def from_pil(image: Image.Image) -> torch.Tensor:
    """PIL image → ``(3, H, W)`` float in [0, 1] (the inverse of :func:`to_pil`, up to its rounding)."""
    array = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    return array.permute(2, 0, 1).float() / 255


class Logger:
    """Receives a run's config, metrics and images. Subclasses write them somewhere."""

    def start(
        self, run_dir: Path, config: dict[str, Any], name: str, group: str | None = None, tags: list[str] | None = None
    ) -> None:
        self.run_dir = Path(run_dir)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_images(self, key: str, images: torch.Tensor, captions: list[str]) -> None:
        pass

    def log_videos(self, key: str, videos: torch.Tensor, captions: list[str]) -> None:
        """Videos ``(B, frames, 3, H, W)`` in [0, 1]; sinks without videos ignore them (the run folder
        holds them as GIFs already, see catlab.loggers.video)."""

    def log_video_file(self, key: str, path: Path, caption: str = "") -> None:
        """A video already written to ``path`` (GIF); a sink that keeps the run directory ignores it."""

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A table (one list of cells per row, in ``columns`` order); sinks without tables ignore it."""

    def log_figure(self, key: str, path: Path) -> None:
        """A figure already written to ``path`` (PNG); a sink that keeps the run directory ignores it."""

    def finish(self, failed: bool = False) -> None:
        """End the run; ``failed``: it stopped on an error (the app re-raises it after this call)."""
