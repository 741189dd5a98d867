"""An evaluation's results in the logger: the table, image samples per strategy, and the plots.

Called once at the end of ``catlab.evaluate``. With ``logger=wandb`` (offline unless
``logger.mode=online``) this is a W&B Table with one row per strategy and its cost and
quality columns (``docs/metrics.md`` defines them), an image grid per strategy under
``samples/<folder>`` (the strategy's :func:`~catlab.hashing.folder_name`; each image captioned with its
prompt), the comparison grid (rows: prompts, columns: strategies, the full model first; also written to the run
directory as ``comparison.png``), and every figure of the run directory under ``plots/``.

For a video model the samples are videos: each strategy's are logged as a grid of frame strips and as
playable videos (``Logger.log_videos``: ``wandb.Video`` in W&B) under ``samples/<folder>_video``, and the
comparison is also written as ``comparison.gif`` (every cell playing; the first :data:`PLAYED` strategies), which
W&B shows under ``videos/comparison``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from catlab.hashing import folder_name
from catlab.loggers.base import Logger, from_pil
from catlab.loggers.grids import comparison_grid
from catlab.loggers.video import comparison_gif, frame_strip, load_gif, log_samples

#: the table's columns, in this order, when any row has them
COLUMNS = (
    "method",
    "family",
    "alpha",
    "steps",
    "num_images",
    "incomplete",
    "macs_per_image",
    "macs_ratio",
    "seconds_per_image",
    "speedup",
    "images_per_second",
    "selection_share",
    "psnr",
    "ssim",
    "lpips",
    "fid",
    "clip_score",
    "temporal_error",
    "attribute_accuracy",
)
SAMPLES = 8  # images per strategy
COMPARED = 6  # prompts (rows) of the comparison grid
#: strategies (columns) of the playing comparison, in row order: a frontier's dozens of columns would make a GIF of
#: tens of MB (experiments/video_comparison_gif.py picks the columns of a finished run)
PLAYED = 12


def samples_per_strategy(
    rows: list[dict[str, Any]], warm: dict[str, Any], image_dir: Path | None
) -> dict[str, torch.Tensor]:
    """Up to ``SAMPLES`` images (or videos, ``(B, frames, 3, H, W)``) per strategy: its warm-up batch, else the
    samples the evaluation saved (a video strategy's GIFs)."""
    from PIL import Image

    out = {}
    for row in rows:
        label, folder = row["method"], folder_name(row["method"], row.get("key", ""))
        result = warm.get(label)
        if result is not None:
            out[label] = result.images[:SAMPLES].float().cpu()
        elif image_dir is not None and (image_dir / folder).is_dir():
            gifs = sorted((image_dir / folder).glob("*.gif"))[:SAMPLES]
            files = sorted((image_dir / folder).glob("*.png"))[:SAMPLES]
            if gifs:
                out[label] = torch.stack([load_gif(f) for f in gifs])
            elif files:
                out[label] = torch.stack([from_pil(Image.open(f)) for f in files])
    return out


def log_evaluation(
    logger: Logger,
    rows: list[dict[str, Any]],
    out: Path,
    warm: dict[str, Any],
    image_dir: Path | None = None,
    prompts: list[str] | None = None,
) -> None:
    """Log the results table, the samples per strategy, the comparison grid (written to ``out`` first) and the
    figures of ``out`` (and ``out/diagnostics``). ``prompts``: the evaluation's images' prompts, in job order
    (the captions; without them the strategy's label)."""
    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    logger.log_table("results", columns, [[_cell(r.get(c)) for c in columns] for r in rows])
    keys = {r["method"]: r.get("key", "") for r in rows}
    samples = samples_per_strategy(rows, warm, image_dir)
    for label, images in samples.items():  # one file name per strategy
        captions = list(prompts or [])[: len(images)] or [label] * len(images)
        log_samples(logger, f"samples/{folder_name(label, keys[label])}", images, captions)
    if samples and prompts:
        compared = {label: images[:COMPARED] for label, images in samples.items()}
        videos = all(v.ndim == 5 for v in compared.values())
        if videos:
            played = dict(list(compared.items())[:PLAYED])
            gif = comparison_gif(played, list(prompts)[:COMPARED], out / "comparison.gif")
            logger.log_video_file("videos/comparison", gif, "rows: prompts; columns: strategies")
            compared = {label: torch.stack([frame_strip(x) for x in v]) for label, v in compared.items()}
        comparison_grid(compared, list(prompts)[:COMPARED]).save(out / "comparison.png")
    for path in sorted(out.glob("*.png")) + sorted((out / "diagnostics").glob("*.png")):
        logger.log_figure(f"plots/{path.stem}", path)


def _cell(value: Any) -> Any:
    """A table cell W&B can type: numbers stay numbers (∞ for identical images is a float), the rest text."""
    if value is None or isinstance(value, (int, float, str)):
        return value
    return str(value)
