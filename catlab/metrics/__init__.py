"""Metrics: cost (MACs, time), fidelity to the full model (PSNR, SSIM, LPIPS), alignment (CLIP, attributes)."""

from catlab.metrics.base import Metric
from catlab.metrics.cost import cost_metrics
from catlab.metrics.fidelity import psnr, ssim
from catlab.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["Metric", "cost_metrics", "psnr", "ssim"]
