"""Video metrics against the full model's video with the same prompt and seed.

Videos are float tensors in [0, 1], ``(B, frames, 3, H, W)`` (a video adapter's ``decode``).

In ``catlab.evaluate`` the registered ``psnr``, ``ssim`` and ``lpips`` take a video model's videos
frame by frame (the functions below), ``temporal_error`` is registered here, and
``attribute_accuracy`` runs the video probe on the ``embedded_video_heldout`` prompts.

- per-frame fidelity: PSNR and SSIM (catlab.metrics.fidelity) of each frame against the same
  frame of the reference, averaged over the frames of a video; LPIPS the same way where the
  ``lpips`` package and its weights are installed (else a one-line reason, see :func:`lpips_skip`);
- temporal consistency: ``temporal_error`` is the RMSE between the consecutive-frame differences
  of a video and of its reference, ``x[f+1] - x[f]`` against ``r[f+1] - r[f]``. It is 0 when the
  video changes from frame to frame exactly as the reference does (even if both are offset by the
  same error), and grows with flicker or motion the reference does not have;
- the video probe's accuracy (catlab.embedded.video_probe) on the stated attributes and motion
  of the embedded video model's prompts, where the clips are known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from catlab.metrics.base import Column, Metric
from catlab.metrics.fidelity import per_frame, psnr, ssim
from catlab.registry import metrics


def _check(videos: torch.Tensor, reference: torch.Tensor) -> None:
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos are (B, frames, 3, H, W); got shape {tuple(videos.shape)}")
    if videos.shape != reference.shape:
        raise ValueError(f"videos {tuple(videos.shape)} and reference {tuple(reference.shape)} differ in shape")


def _per_frame(fn, videos: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``fn`` over every frame, (B, frames)."""
    _check(videos, reference)
    return per_frame(fn, videos, reference)


def frame_psnr(videos: torch.Tensor, reference: torch.Tensor, cap: float = 100.0) -> torch.Tensor:
    """Mean over frames of each frame's PSNR (dB, capped at ``cap``: identical frames are infinite), (B,)."""
    return _per_frame(psnr, videos, reference).clamp(max=cap).mean(1)


def frame_ssim(videos: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean over frames of each frame's SSIM, (B,)."""
    return _per_frame(ssim, videos, reference).mean(1)


def lpips_skip() -> str | None:
    """Why per-frame LPIPS cannot run here (None when it can)."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return "lpips: the 'lpips' package is not installed (pip install lpips, with its weights cached)"
    return None


def frame_lpips(videos: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean over frames of each frame's LPIPS (AlexNet), (B,); needs the ``lpips`` package (:func:`lpips_skip`)."""
    from catlab.metrics.fidelity import LPIPS

    metric = LPIPS()
    return _per_frame(lambda a, b: metric(a, b, None, None), videos, reference).mean(1)


def temporal_error(videos: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """RMSE between consecutive-frame differences of each video and of its reference, (B,); 0 for one frame."""
    _check(videos, reference)
    if videos.shape[1] < 2:
        return torch.zeros(videos.shape[0])
    dv = videos.float().diff(dim=1)
    dr = reference.float().diff(dim=1)
    return (dv - dr).pow(2).flatten(1).mean(1).sqrt()


def video_metrics(
    videos: torch.Tensor, reference: torch.Tensor | None = None, clips: Sequence | None = None
) -> dict[str, float | str]:
    """Means over the batch: per-frame PSNR/SSIM (and LPIPS or the reason it is skipped) and the
    temporal error against ``reference`` where given; the probe's accuracy where ``clips`` are given."""
    out: dict[str, float | str] = {}
    if reference is not None:
        out["frame_psnr"] = float(frame_psnr(videos, reference).mean())
        out["frame_ssim"] = float(frame_ssim(videos, reference).mean())
        skip = lpips_skip()
        if skip is None:
            out["frame_lpips"] = float(frame_lpips(videos, reference).mean())
        else:
            out["frame_lpips_skipped"] = skip
        out["temporal_error"] = float(temporal_error(videos, reference).mean())
    if clips is not None:
        from catlab.embedded.video_probe import attribute_table

        out.update({f"probe_{k}": v for k, v in attribute_table(videos, clips).items()})
    return out


@metrics.register("temporal_error")
@dataclass
class TemporalError(Metric):
    """:func:`temporal_error` of each video against the full model's (lower is better); skipped for images."""

    needs_reference = True
    higher_is_better = False
    column = Column("Temporal err.", "{:.4f}", order=24)

    def unavailable(self, context):
        if context.get("video") is False:
            return f"temporal_error: model {context.get('model')!r} makes images, not videos"
        return None

    def __call__(self, images, reference, prompts, meta):
        if images.ndim != 5:
            raise ValueError(f"temporal_error compares videos (B, frames, 3, H, W); got images {tuple(images.shape)}")
        return temporal_error(images, reference)
