"""Text–image alignment: CLIP score for real models, attribute accuracy for the embedded model."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from catlab.metrics.base import Metric
from catlab.registry import metrics


@metrics.register("clip_score")
@dataclass
class CLIPScore(Metric):
    """100 · max(cos(image, text), 0) with a pinned CLIP backbone (Hessel et al. 2021, w = 1 scaled to 0–100).

    Loaded from the local Hugging Face cache only; without its weights the metric
    is skipped with a notice. The backbone is named in every table.
    """

    backbone: str = "openai/clip-vit-base-patch16"
    device: str = "cpu"

    def unavailable(self, context):
        try:
            self._load()
        except Exception as err:  # noqa: BLE001  (any failure to load means "not available here")
            return f"clip_score: weights of {self.backbone} are not available locally ({type(err).__name__})"
        return None

    def _load(self):
        if not hasattr(self, "_model"):
            from transformers import CLIPModel, CLIPProcessor

            self._model = CLIPModel.from_pretrained(self.backbone, local_files_only=True).eval().to(self.device)
            self._processor = CLIPProcessor.from_pretrained(self.backbone, local_files_only=True)
        return self._model, self._processor

    @torch.no_grad()
    def __call__(self, images, reference, prompts, meta):
        model, processor = self._load()
        pixels = [(img.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy() for img in images]
        inputs = processor(text=prompts, images=pixels, return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        img = F.normalize(model.get_image_features(pixel_values=inputs["pixel_values"]), dim=-1)
        txt = F.normalize(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]), dim=-1)
        return 100 * (img * txt).sum(-1).clamp(min=0).cpu()


@metrics.register("attribute_accuracy")
@dataclass
class AttributeAccuracy(Metric):
    """Share of the attributes stated in the prompt that the embedded model's probe reads back from the image.

    Needs prompts that come with their scenes (the ``embedded_heldout`` prompt set).
    """

    def unavailable(self, context):
        meta = context.get("meta")
        if not meta or meta[0] is None:
            return "attribute_accuracy: the prompt set carries no scene descriptions (use prompts=embedded_heldout)"
        try:
            from catlab.embedded.probe import load_probe

            self._probe = load_probe()
        except Exception as err:  # noqa: BLE001
            return f"attribute_accuracy: the attribute probe could not be loaded ({err})"
        return None

    def __call__(self, images, reference, prompts, meta):
        from catlab.embedded.probe import attribute_accuracy

        return attribute_accuracy(images * 2 - 1, list(meta)).float().cpu()
