"""Fidelity to the full model's image with the same prompt and seed: PSNR, SSIM (torchmetrics), LPIPS."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from catlab.metrics.base import Column, Metric
from catlab.registry import metrics


def psnr(images: torch.Tensor, reference: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image; images in [0, max_value]. Identical images give inf.

    torchmetrics' ``peak_signal_noise_ratio`` with the mean squared error taken over each image
    (``dim=(1, 2, 3)``, ``reduction="none"``) and a fixed ``data_range`` (a number, so nothing is clamped).
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(
        images.float(),
        reference.float(),
        data_range=float(max_value),
        reduction="none",
        dim=tuple(range(1, images.dim())),
    )


def ssim(
    images: torch.Tensor, reference: torch.Tensor, window: int = 11, sigma: float = 1.5, max_value: float = 1.0
) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004: Gaussian window, K1 = 0.01, K2 = 0.03), mean over channels
    and over the positions where the whole window lies inside the image.

    The SSIM map is torchmetrics' ``structural_similarity_index_measure`` (``return_full_image=True``). Its own
    per-image mean is not used: torchmetrics pads the images by reflection, and its mean leaves that border out
    in 1.4 but takes it in from 1.6 on; the border is cut off here, so only whole windows count in any release.
    torchmetrics' Gaussian window is ``2 * int(3.5 * sigma + 0.5) + 1`` wide (11 for sigma = 1.5); ``window``
    must agree with that, and the images must be at least that wide and high.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    size = 2 * int(3.5 * sigma + 0.5) + 1
    if window != size:
        raise ValueError(f"ssim: a Gaussian window of sigma {sigma} is {size} pixels wide; got window={window}")
    if min(images.shape[-2:]) < size:
        raise ValueError(f"ssim: images of {tuple(images.shape[-2:])} pixels are smaller than the {size}-pixel window")
    _, full = structural_similarity_index_measure(
        images.float(),
        reference.float(),
        gaussian_kernel=True,
        sigma=sigma,
        kernel_size=size,
        reduction="none",
        data_range=float(max_value),
        k1=0.01,
        k2=0.03,
        return_full_image=True,
    )
    pad = (size - 1) // 2
    return full[..., pad:-pad, pad:-pad].flatten(1).mean(1)


def per_frame(fn, videos: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``fn(frames, reference frames)`` over every frame of videos ``(B, frames, 3, H, W)``: ``(B, frames)``."""
    if videos.shape != reference.shape:
        raise ValueError(f"videos {tuple(videos.shape)} and reference {tuple(reference.shape)} differ in shape")
    b, f = videos.shape[:2]
    return fn(videos.flatten(0, 1), reference.flatten(0, 1)).reshape(b, f)


@metrics.register("psnr")
@dataclass
class PSNR(Metric):
    """PSNR in dB, capped at ``cap`` so that identical images (infinite PSNR) average sensibly; for videos the
    mean of the frames' PSNRs (each capped)."""

    needs_reference = True
    column = Column("PSNR (dB)", "{:.2f}", order=20, always=True)
    #: PSNR (dB) under which a table cell carries a dagger: the image no longer shows the full model's content
    low: ClassVar[float] = 20.0
    cap: float = 100.0

    @classmethod
    def cell(cls, value: float | None) -> str:
        """ "∞ (identical)" at the cap (every image equal to the full model's), a dagger below :attr:`low`."""
        if value is None:
            return "–"
        if value >= cls.cap:
            return "∞ (identical)"
        return f"{value:.2f}" + (" †" if value < cls.low else "")

    def __call__(self, images, reference, prompts, meta):
        if images.ndim == 5:  # videos: the mean of the frames' PSNRs (catlab.metrics.video.frame_psnr)
            return per_frame(psnr, images, reference).clamp(max=self.cap).mean(1)
        return psnr(images, reference).clamp(max=self.cap)


@metrics.register("ssim")
@dataclass
class SSIM(Metric):
    """SSIM per image; for videos the mean of the frames' SSIMs."""

    needs_reference = True
    column = Column("SSIM", "{:.4f}", order=21, always=True)

    def __call__(self, images, reference, prompts, meta):
        if images.ndim == 5:
            return per_frame(ssim, images, reference).mean(1)
        return ssim(images, reference)


@metrics.register("lpips")
@dataclass
class LPIPS(Metric):
    """LPIPS (AlexNet) when the ``lpips`` package and its weights are installed; skipped otherwise.

    Not torchmetrics' LPIPS: that one builds its backbone with torchvision and fetches the backbone's
    weights from the network, and catlab installs neither.
    """

    needs_reference = True
    higher_is_better = False
    column = Column("LPIPS", "{:.4f}", order=30)
    net: str = "alex"

    def unavailable(self, context):
        try:
            import lpips  # noqa: F401
        except ImportError:
            return "lpips: the 'lpips' package is not installed (pip install lpips, with its weights cached)"
        return None

    def __call__(self, images, reference, prompts, meta):
        import lpips

        if images.ndim == 5:  # videos: the mean over frames
            b, f = images.shape[:2]
            return self(images.flatten(0, 1), reference.flatten(0, 1), prompts, meta).reshape(b, f).mean(1)
        if not hasattr(self, "_model"):
            self._model = lpips.LPIPS(net=self.net, verbose=False).eval()
        with torch.no_grad():
            return self._model(images * 2 - 1, reference * 2 - 1).flatten()
