"""Fidelity to the full model's image with the same prompt and seed: PSNR, SSIM, LPIPS."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from catlab.metrics.base import Metric
from catlab.registry import metrics


def psnr(images: torch.Tensor, reference: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image; images in [0, max_value]. Identical images give inf."""
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(max_value ** 2 / mse)


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(images: torch.Tensor, reference: torch.Tensor, window: int = 11, sigma: float = 1.5,
         max_value: float = 1.0) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004: Gaussian window, K1 = 0.01, K2 = 0.03), mean over channels."""
    x, y = images.float(), reference.float()
    c = x.shape[1]
    window = min(window, x.shape[-1], x.shape[-2])
    g = _gaussian(window, sigma)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


@metrics.register("psnr")
@dataclass
class PSNR(Metric):
    """PSNR in dB, capped at ``cap`` so that identical images (infinite PSNR) average sensibly."""

    needs_reference = True
    cap: float = 100.0

    def __call__(self, images, reference, prompts, meta):
        return psnr(images, reference).clamp(max=self.cap)


@metrics.register("ssim")
@dataclass
class SSIM(Metric):
    needs_reference = True

    def __call__(self, images, reference, prompts, meta):
        return ssim(images, reference)


@metrics.register("lpips")
@dataclass
class LPIPS(Metric):
    """LPIPS (AlexNet) when the ``lpips`` package and its weights are installed; skipped otherwise."""

    needs_reference = True
    higher_is_better = False
    net: str = "alex"

    def unavailable(self, context):
        try:
            import lpips  # noqa: F401
        except ImportError:
            return "lpips: the 'lpips' package is not installed (pip install lpips, with its weights cached)"
        return None

    def __call__(self, images, reference, prompts, meta):
        import lpips

        if not hasattr(self, "_model"):
            self._model = lpips.LPIPS(net=self.net, verbose=False).eval()
        with torch.no_grad():
            return self._model(images * 2 - 1, reference * 2 - 1).flatten()
