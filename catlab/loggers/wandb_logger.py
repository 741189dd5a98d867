"""Weights & Biases, offline by default: no account and no network needed.

Offline runs land in ``<run dir>/wandb/offline-run-*`` and can be uploaded later with
``wandb sync``. Set ``logger.mode=online`` to stream instead. A run holds, besides
its config, metrics and images: the console (``output.log``), and, as run files,
the run directory's ``config.yaml``, ``metrics.json``, Hydra's log (``run.log`` /
``evaluate.log``) and an evaluation's ``results.md/csv/json``.
"""

from __future__ import annotations

import contextlib
import io
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from catlab.loggers.base import Logger
from catlab.loggers.grids import captioned_grid
from catlab.registry import loggers

#: files of the run directory saved with the W&B run, when present
RUN_FILES = ("config.yaml", "metrics.json", "results.md", "results.csv", "results.json", "summary.md", "*.log")


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
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            dir=str(run_dir),
            name=name,
            group=self.group or group,
            tags=list(self.tags) + list(tags or []),
            config=config,
            reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="wrap"),  # the console is kept as the run's output.log
        )

    def log_metrics(self, metrics, step=None):
        self.run.log(dict(metrics), step=step)

    def log_images(self, key, images, captions):
        import wandb

        self.run.log({key: wandb.Image(captioned_grid(images, captions), caption=" | ".join(captions))})

    def log_videos(self, key, videos, captions):
        """One ``wandb.Video`` per video, from a GIF written by Pillow (no video encoder needed)."""
        import wandb

        from catlab.loggers.video import save_gif

        folder = self.run_dir / "wandb_videos"
        items = []
        for i, (video, caption) in enumerate(zip(videos, captions)):
            path = save_gif(video, folder / f"{key.replace('/', '_')}_{i:03d}.gif")
            items.append(wandb.Video(str(path), caption=caption, format="gif"))
        self.run.log({key: items})

    def log_video_file(self, key, path, caption=""):
        import wandb

        self.run.log({key: wandb.Video(str(path), caption=caption or Path(path).name, format="gif")})

    def log_table(self, key, columns, rows):
        import wandb

        self.run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def log_figure(self, key, path):
        import wandb

        self.run.log({key: wandb.Image(str(path), caption=Path(path).name)})

    def finish(self, failed=False):
        if self.run is not None:
            said = io.StringIO()
            with contextlib.redirect_stderr(said):  # W&B warns "Symlinked 1 file..." per file: expected, not news
                for pattern in RUN_FILES:  # linked, not copied: a file written after this point is saved as it ends
                    for path in sorted(self.run_dir.glob(pattern)):
                        self.run.save(str(path.resolve()), base_path=str(self.run_dir.resolve()), policy="end")
            rest = [line for line in said.getvalue().splitlines() if "Symlinked" not in line]
            if rest:
                print("\n".join(rest), file=sys.stderr)
            self.run.finish(exit_code=1 if failed else 0)  # a failed run shows as failed in W&B, and its files close
            self.run = None


def offline_records(path: Path) -> list[tuple[str, object]]:
    """The records of an offline run's ``.wandb`` file, as ``(kind, protobuf message)`` pairs.

    Reads the file's framing (32 KiB blocks of checksummed chunks after a 7-byte
    header) without the W&B service: for checking what a run holds before
    ``wandb sync``, e.g. ``[m for k, m in offline_records(p) if k == "run"][0].config``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, records, pos, parts = Path(path).read_bytes(), 32768, [], 7, b""
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(parts)
            records.append((record.WhichOneof("record_type"), getattr(record, record.WhichOneof("record_type"))))
            parts = b""
    return records
