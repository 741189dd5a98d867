"""Weights & Biases, offline by default: no account and no network needed.

Offline runs land in ``<run dir>/wandb`` and can be uploaded later with
``wandb sync``. Set ``logger.mode=online`` to stream instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from catlab.loggers.base import Logger, image_grid
from catlab.registry import loggers


@loggers.register("wandb")
@dataclass
class WandbLogger(Logger):
    project: str = "catlab"
    entity: str | None = None
    mode: str = "offline"
    group: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode must be offline, online or disabled; got {self.mode!r}")
        self.run = None

    def start(self, run_dir, config, name, group=None, tags=None):
        super().start(run_dir, config, name, group, tags)
        import wandb

        self.run = wandb.init(
            project=self.project, entity=self.entity, mode=self.mode, dir=str(run_dir), name=name,
            group=self.group or group, tags=list(self.tags) + list(tags or []), config=config, reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log_metrics(self, metrics, step=None):
        self.run.log(dict(metrics), step=step)

    def log_images(self, key, images, captions):
        import wandb

        self.run.log({key: wandb.Image(image_grid(images), caption=" | ".join(captions))})

    def finish(self):
        if self.run is not None:
            self.run.finish()
            self.run = None
