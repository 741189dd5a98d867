"""Videos as files a person can play: animated GIFs (Pillow) and per-frame PNG strips.

A video here is a float tensor in [0, 1] laid out ``(frames, 3, H, W)``, the layout a video
adapter's ``decode`` returns per sample; :func:`frames_first` also accepts Wan's ``(3, frames, H, W)``.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch


def frames_first(video: torch.Tensor) -> torch.Tensor:
    """``(frames, 3, H, W)`` from that layout or from ``(3, frames, H, W)``."""
    if video.ndim != 4:
        raise ValueError(f"a video is (frames, 3, H, W); got shape {tuple(video.shape)}")
    if video.shape[1] == 3:
        return video
    if video.shape[0] == 3:
        return video.transpose(0, 1)
    raise ValueError(f"a video is (frames, 3, H, W) or (3, frames, H, W); got shape {tuple(video.shape)}")


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[0, 1] float video -> uint8 array (frames, H, W, 3)."""
    x = frames_first(video).detach().float().cpu().clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_gif(video: torch.Tensor, path, fps: float = 6.0, scale: int = 4) -> pathlib.Path:
    """Write ``video`` ([0, 1], (frames, 3, H, W)) as a looping GIF, upscaled ``scale`` times (nearest)."""
    from PIL import Image

    frames = [Image.fromarray(f) for f in to_uint8_frames(video)]
    if scale != 1:
        frames = [f.resize((f.width * scale, f.height * scale), Image.NEAREST) for f in frames]
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(
        path, save_all=True, append_images=frames[1:], duration=int(round(1000 / fps)), loop=0, optimize=False
    )
    return path


def frame_strip(video: torch.Tensor) -> torch.Tensor:
    """The frames side by side, (3, H, frames * W): one row of a video's frame grid."""
    x = frames_first(video)
    return torch.cat(list(x), dim=-1)


def is_video_batch(images: torch.Tensor) -> bool:
    """True for a batch of videos ``(B, frames, 3, H, W)``, False for images ``(B, 3, H, W)``."""
    return images.ndim == 5


def save_sample(image: torch.Tensor, run_dir, stem: str) -> list[pathlib.Path]:
    """Write one generated sample of a run: an image as ``images/<stem>.png``; a video
    ``(frames, 3, H, W)`` as ``videos/<stem>.gif`` (playable) and its frames side by side as
    ``images/<stem>.png``. Returns the paths written."""
    from catlab.loggers.base import to_pil

    run_dir = pathlib.Path(run_dir)
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    if image.ndim == 3:
        path = run_dir / "images" / f"{stem}.png"
        to_pil(image).save(path)
        return [path]
    gif = save_gif(image, run_dir / "videos" / f"{stem}.gif")
    strip = run_dir / "images" / f"{stem}.png"
    to_pil(frame_strip(image)).save(strip)
    return [gif, strip]


def log_samples(logger, key: str, images: torch.Tensor, captions: list[str], run_dir=None) -> None:
    """Hand a run's samples to its logger: images as an image grid; videos as their frame strips
    (a grid, one video per cell) and, for sinks that take videos, as GIFs (``Logger.log_videos``)."""
    if not is_video_batch(images):
        logger.log_images(key, images, captions)
        return
    logger.log_images(key, torch.stack([frame_strip(v) for v in images]), captions)
    logger.log_videos(f"{key}_video", images, captions)


def save_evaluated(sample: torch.Tensor, folder, stem: str) -> list[pathlib.Path]:
    """An evaluation's saved sample in its strategy's folder: an image as ``<stem>.png``; a video as
    ``<stem>.gif`` (playable) and its frames side by side as ``<stem>.png`` (what image grids and FID read)."""
    from catlab.loggers.base import to_pil

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"{stem}.png"
    if sample.ndim == 3:
        to_pil(sample).save(png)
        return [png]
    gif = save_gif(sample, folder / f"{stem}.gif")
    to_pil(frame_strip(sample)).save(png)
    return [gif, png]


def load_gif(path, scale: int = 4) -> torch.Tensor:
    """A GIF written by :func:`save_gif` back as ``(frames, 3, H, W)`` in [0, 1], shrunk by ``scale`` (every
    ``scale``-th pixel, which undoes its nearest-neighbour enlargement). GIF colours are a 256-colour palette:
    for showing, not for measuring."""
    from PIL import Image, ImageSequence

    with Image.open(path) as gif:
        frames = [np.asarray(f.convert("RGB"))[::scale, ::scale] for f in ImageSequence.Iterator(gif)]
    return torch.from_numpy(np.stack(frames).copy()).permute(0, 3, 1, 2).float() / 255


def comparison_gif(columns: dict[str, torch.Tensor], prompts: list[str], path, fps: float = 6.0) -> pathlib.Path:
    """The comparison grid of :func:`catlab.loggers.grids.comparison_grid` as a playing GIF: rows ``prompts``,
    columns strategies (``columns``: label → that strategy's videos ``(B, frames, 3, H, W)`` of those prompts),
    every cell playing its video in step with the others."""
    from catlab.loggers.grids import comparison_grid

    frames = min(v.shape[1] for v in columns.values())
    pictures = [comparison_grid({k: v[:, f] for k, v in columns.items()}, prompts) for f in range(frames)]
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures[0].save(
        path, save_all=True, append_images=pictures[1:], duration=int(round(1000 / fps)), loop=0, optimize=False
    )
    return path
