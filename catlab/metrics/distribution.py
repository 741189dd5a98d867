"""Set-level fidelity: Fréchet distance between a strategy's images and the full model's (torchmetrics' FID)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from catlab.metrics.base import Column, SetMetric
from catlab.registry import metrics

#: the InceptionV3 weights torch-fidelity (and so torchmetrics' standard FID) loads
INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


class ClipImageFeatures(nn.Module):
    """A CLIP image encoder as an FID feature extractor: images in [0, 1] → projected embeddings."""

    def __init__(self, model, image_processor):
        super().__init__()
        self.model = model
        size = image_processor.crop_size  # a dict, or transformers 5's SizeDict
        h, w = (
            (getattr(size, "height", None), getattr(size, "width", None))
            if not isinstance(size, dict)
            else (size["height"], size["width"])
        )
        self.size = (int(h), int(w))
        self.register_buffer("mean", torch.tensor(image_processor.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(image_processor.image_std).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / (255.0 if images.dtype == torch.uint8 else 1.0)
        x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False, antialias=True)
        out = self.model.get_image_features(pixel_values=(x - self.mean) / self.std)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


@metrics.register("fid")
@dataclass
class FID(SetMetric):
    """Fréchet distance of a strategy's image set from the full model's (lower is better), by torchmetrics.

    ``feature: inception`` is the standard FID: torch-fidelity's InceptionV3, its weights
    from ``weights`` (a file) or torch's hub cache; ``feature: clip`` uses the image
    encoder of a local CLIP (``backbone``: a Hugging Face id in the local cache or a
    ``save_pretrained`` folder). Nothing is downloaded: without the package or the
    weights the metric is skipped with a one-line notice. With fewer images than feature
    dimensions the covariances are singular; compare values of equal set sizes only.
    """

    higher_is_better = False
    column = Column("FID", "{:.2f}", order=31)

    feature: str = "inception"
    weights: str | None = None
    backbone: str = "openai/clip-vit-base-patch16"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.feature not in ("inception", "clip"):
            raise ValueError(f"fid: feature must be 'inception' or 'clip'; got {self.feature!r}")

    def unavailable(self, context):
        try:
            self._extractor()
        except Exception as err:  # noqa: BLE001  (any failure to load means "not available here")
            what = self.backbone if self.feature == "clip" else (self.weights or INCEPTION_WEIGHTS)
            return f"fid: {self.feature} features need {what} locally ({type(err).__name__}: {str(err)[:80]})"
        return None

    def _extractor(self):
        if hasattr(self, "_feature"):
            return self._feature
        if self.feature == "clip":
            from transformers import CLIPImageProcessor, CLIPModel

            model = CLIPModel.from_pretrained(self.backbone, local_files_only=True).eval()
            processor = CLIPImageProcessor.from_pretrained(self.backbone, local_files_only=True)
            self._feature = ClipImageFeatures(model, processor).to(self.device)
        else:
            import torch_fidelity  # noqa: F401  (torchmetrics' InceptionV3 comes from it)

            path = (
                Path(self.weights) if self.weights else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
            )
            if not path.is_file():
                raise FileNotFoundError(f"no {path}")
            self._feature = 2048
            self._weights_path = str(path)
        return self._feature

    @torch.no_grad()
    def compute(self, images: torch.Tensor, reference: torch.Tensor) -> float:
        from torchmetrics.image.fid import FrechetInceptionDistance

        feature = self._extractor()
        kwargs = {"feature_extractor_weights_path": self._weights_path} if feature == 2048 else {}
        fid = FrechetInceptionDistance(feature=feature, normalize=True, **kwargs).to(self.device)
        fid.update(reference.clamp(0, 1).to(self.device), real=True)
        fid.update(images.clamp(0, 1).to(self.device), real=False)
        return float(fid.compute())
