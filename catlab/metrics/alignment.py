"""Text–image alignment: CLIP score for real models, attribute accuracy for the embedded model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catlab.embedded.probe import attribute_accuracy, load_probe
from catlab.metrics.base import Column, Metric
from catlab.registry import metrics


class _Truncating:
    """A CLIP processor that cuts prompts to the text encoder's length, keeping the end-of-text token.

    torchmetrics pads without truncating and then cuts the token ids itself, which drops the end-of-text
    token (where CLIP reads the text embedding) from prompts longer than the encoder's context.
    """

    def __init__(self, processor, max_length: int):
        self.processor, self.max_length = processor, max_length

    def __call__(self, *args, **kwargs):
        if kwargs.get("text") is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        return self.processor(*args, **kwargs)


class _Embeddings:
    """A CLIP model whose ``get_*_features`` return the projected embedding as a tensor.

    transformers 5 returns a model output there (the embedding is its ``pooler_output``), which
    torchmetrics 1.9.0 cannot normalise; with transformers 4 this passes the tensor through.
    """

    def __init__(self, model):
        self.model, self.config = model, model.config

    def to(self, device):
        self.model.to(device)
        return self

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


@metrics.register("clip_score")
@dataclass
class CLIPScore(Metric):
    """100 · max(cos(image, text), 0) with a pinned CLIP backbone (Hessel et al. 2021, w = 1 scaled to 0–100).

    Computed per image by torchmetrics' ``clip_score``. ``backbone`` is a Hugging Face model id, looked up
    in the local cache only, or the path of a folder written by ``save_pretrained`` (a ``CLIPModel`` and
    its ``CLIPProcessor``); nothing is downloaded. Without the weights the metric is skipped with a notice.
    The backbone is named in every table.

    The model reaches torchmetrics as a loader (a callable ``model_name_or_path``, torchmetrics >= 1.7):
    given a name, torchmetrics accepts only the hub ids it lists and may download them.
    """

    column = Column("CLIP score", "{:.3f}", order=10)

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

            model = CLIPModel.from_pretrained(self.backbone, local_files_only=True).eval().to(self.device)
            processor = CLIPProcessor.from_pretrained(self.backbone, local_files_only=True)
            self._model = _Embeddings(model)
            self._processor = _Truncating(processor, model.config.text_config.max_position_embeddings)
        return self._model, self._processor

    @torch.no_grad()
    def __call__(self, images, reference, prompts, meta):
        from torchmetrics.functional.multimodal import clip_score

        self._load()
        # uint8 pixels, channels first: the processor rescales them to [0, 1] and normalises them itself
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).to(self.device)
        # torchmetrics' clip_score averages a batch before clamping at 0: one call per image keeps the per-image score
        return torch.stack(
            [
                clip_score(img, prompt, model_name_or_path=self._load).cpu().float()
                for img, prompt in zip(pixels, prompts)
            ]
        )


@metrics.register("attribute_accuracy")
@dataclass
class AttributeAccuracy(Metric):
    """Share of the attributes stated in the prompt that the embedded model's probe reads back from the image.

    Needs prompts that come with their scenes (the ``embedded_heldout`` prompt set). For the embedded video
    model's videos (prompts ``embedded_video_heldout``, which come with their clips) it is the video probe's
    share (catlab.embedded.video_probe: presence, shape, size and motion of each object).
    """

    column = Column("Attribute acc.", "{:.3f}", order=11)

    def unavailable(self, context):
        meta = context.get("meta")
        if not meta or meta[0] is None:
            return (
                "attribute_accuracy: the prompt set carries no scene descriptions "
                "(use prompts=embedded_heldout, or embedded_video_heldout for model=embedded_video)"
            )
        if _is_clip(meta[0]):
            return None  # the video probe reads colours and tracks: nothing to load
        try:
            self._probe = load_probe()
        except Exception as err:  # noqa: BLE001
            return f"attribute_accuracy: the attribute probe could not be loaded ({err})"
        return None

    def __call__(self, images, reference, prompts, meta):
        if images.ndim == 5:
            from catlab.embedded.video_probe import video_accuracy

            return video_accuracy(images, list(meta)).float().cpu()
        return attribute_accuracy(images * 2 - 1, list(meta)).float().cpu()


def _is_clip(scene) -> bool:
    from catlab.embedded.video_world import Clip

    return isinstance(scene, Clip)
