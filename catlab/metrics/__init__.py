"""Metrics: cost (MACs, time), fidelity to the full model (PSNR, SSIM, LPIPS), alignment (CLIP, attributes)."""
from catlab.metrics.base import Metric
from catlab.metrics.cost import cost_metrics
from catlab.metrics import alignment, fidelity  # noqa: F401  (register)
from catlab.metrics.fidelity import psnr, ssim

__all__ = ["Metric", "cost_metrics", "psnr", "ssim"]
