"""A plain local sink: JSON lines and PNG grids in the run directory."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from catlab.loggers.base import Logger
from catlab.loggers.grids import captioned_grid
from catlab.registry import loggers


@loggers.register("local")
@dataclass
class LocalLogger(Logger):
    """Appends metrics to ``log.jsonl`` and writes image grids as ``<key>.png``."""

    def log_metrics(self, metrics, step=None):
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def log_images(self, key, images, captions):
        stem = key.replace("/", "_")
        captioned_grid(images, captions).save(self.run_dir / f"{stem}.png")
        (self.run_dir / f"{stem}.txt").write_text("\n".join(captions) + "\n")

    def log_videos(self, key, videos, captions):
        """The videos side by side as one GIF, ``<key>.gif``."""
        from catlab.loggers.video import save_gif

        save_gif(torch.cat(list(videos), dim=-1), self.run_dir / f"{key.replace('/', '_')}.gif")
