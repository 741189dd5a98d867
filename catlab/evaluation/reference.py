"""An on-disk cache of the full model's images (or videos), shared by every strategy of a sweep.

Entries are keyed by the model config, the sampler config, the prompt, the
seed and the batch the image was generated in (float rounding depends on a
sample's batch), so a change to any of them misses the cache instead of
comparing against a stale reference. Writes are atomic (write to a temporary name, then rename):
a killed job never leaves a half-written entry behind, a failed write removes its
own temporary file, and temporary files whose writer is gone are removed when the
cache opens.

An entry is checked on read: a tensor (``weights_only``: never a pickle), of the
image's shape, float, finite, in [0, 1] and not blank. One that fails is named in
one warning line, moved to ``rejected/`` and generated again, so a damaged cache
never turns into a wrong PSNR.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import torch

from catlab.evaluation.store import BadRecord, atomic_write_bytes, clean_temporary, read_regular
from catlab.hashing import config_hash  # noqa: F401  (re-exported: evaluation code imports it from here)

log = logging.getLogger("catlab.evaluate")
#: the largest entry read (a 4096×4096 RGB image in float32 is 200 MB)
MAX_BYTES = 1 << 28


class ReferenceCache:
    def __init__(self, root: str | Path, model_cfg: dict, sampler_cfg: dict):
        setup = {
            "model": model_cfg,
            "sampler": {k: v for k, v in sampler_cfg.items() if k in ("num_steps", "guidance_scale")},
        }
        self.root = Path(root).expanduser() / "references" / config_hash(setup)
        self.root.mkdir(parents=True, exist_ok=True)
        clean_temporary(self.root)
        meta = self.root / "setup.json"
        if not meta.exists():
            atomic_write_bytes(meta, json.dumps(setup, indent=2, default=str).encode())

    def path(self, prompt: str, seed: int, batch: str | None = None) -> Path:
        return self.root / f"{config_hash([prompt, int(seed)] + ([batch] if batch else []), 20)}.pt"

    def get(
        self, prompt: str, seed: int, batch: str | None = None, shape: tuple[int, ...] | None = None
    ) -> torch.Tensor | None:
        """The cached image, or ``None``: absent, or not a valid image of ``shape`` (then set aside, to be
        generated again)."""
        p = self.path(prompt, seed, batch)
        try:
            data = read_regular(p, MAX_BYTES)
        except FileNotFoundError:
            return None
        except BadRecord as err:
            self.reject(p, str(err))
            return None
        try:
            image = torch.load(io.BytesIO(data), weights_only=True)
        except Exception as err:  # noqa: BLE001 -- a truncated or foreign file: a cache entry is always recomputable
            self.reject(p, f"not a saved tensor ({err.__class__.__name__})")
            return None
        reason = image_problem(image, shape)
        if reason:
            self.reject(p, reason)
            return None
        return image

    def put(self, prompt: str, seed: int, image: torch.Tensor, batch: str | None = None) -> None:
        data = io.BytesIO()  # serialised here, written through Python: a full disk is an OSError naming the file
        torch.save(image.detach().cpu().float().clone(), data)
        atomic_write_bytes(self.path(prompt, seed, batch), data.getvalue())

    def reject(self, path: Path, reason: str) -> None:
        """Move a bad entry to ``rejected/`` (never deleted) and say so in one line."""
        dest = self.root / "rejected" / path.name
        dest.parent.mkdir(exist_ok=True)
        n = 1
        while dest.exists():
            dest, n = dest.with_name(f"{path.name}.{n}"), n + 1
        try:
            os.replace(path, dest)
        except FileNotFoundError:
            return  # another process set it aside first
        log.warning("catlab: bad cached reference %s: %s; moved to %s, it will be generated again", path, reason, dest)


def image_problem(image, shape: tuple[int, ...] | None = None) -> str | None:
    """Why ``image`` is not a valid reference (an image ``(C, H, W)`` or a video ``(frames, C, H, W)`` of floats
    in [0, 1], finite, not blank), or ``None``."""
    if not torch.is_tensor(image):
        return f"a {type(image).__name__}, not an image tensor"
    if not image.is_floating_point():
        return f"{image.dtype}, not a float image"
    if shape is not None and tuple(image.shape) != tuple(shape):
        return f"shape {tuple(image.shape)}, not the image shape {tuple(shape)}"
    if image.dim() not in (3, 4) or image.numel() == 0:
        return f"shape {tuple(image.shape)}, not (channels, height, width) or (frames, channels, height, width)"
    if not bool(torch.isfinite(image).all()):
        return "it holds NaN or infinite values"
    if float(image.min()) < 0 or float(image.max()) > 1:
        return f"values in [{float(image.min()):.3g}, {float(image.max()):.3g}], not [0, 1]"
    if float(image.max()) == float(image.min()):
        return f"a blank image (every value {float(image.min()):.3g})"
    return None
