"""An on-disk cache of the full model's images, shared by every strategy of a sweep.

Entries are keyed by the model config, the sampler config, the prompt, the
seed and the batch the image was generated in (float rounding depends on a
sample's batch), so a change to any of them misses the cache instead of
comparing against a stale reference. Writes are atomic (write to a temporary name, then rename):
a killed job never leaves a half-written entry behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from catlab.hashing import config_hash  # noqa: F401  (re-exported: evaluation code imports it from here)


class ReferenceCache:
    def __init__(self, root: str | Path, model_cfg: dict, sampler_cfg: dict):
        setup = {
            "model": model_cfg,
            "sampler": {k: v for k, v in sampler_cfg.items() if k in ("num_steps", "guidance_scale")},
        }
        self.root = Path(root).expanduser() / "references" / config_hash(setup)
        self.root.mkdir(parents=True, exist_ok=True)
        meta = self.root / "setup.json"
        if not meta.exists():
            _atomic_write_bytes(meta, json.dumps(setup, indent=2, default=str).encode())

    def path(self, prompt: str, seed: int, batch: str | None = None) -> Path:
        return self.root / f"{config_hash([prompt, int(seed)] + ([batch] if batch else []), 20)}.pt"

    def get(self, prompt: str, seed: int, batch: str | None = None) -> torch.Tensor | None:
        """The cached image, or ``None`` (absent, or unreadable: then removed, to be generated again)."""
        p = self.path(prompt, seed, batch)
        if not p.exists():
            return None
        try:
            return torch.load(p, weights_only=True)
        except Exception:  # noqa: BLE001 -- a truncated or foreign file: a cache entry is always recomputable
            p.unlink(missing_ok=True)
            return None

    def put(self, prompt: str, seed: int, image: torch.Tensor, batch: str | None = None) -> None:
        p = self.path(prompt, seed, batch)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        torch.save(image.detach().cpu().float().clone(), tmp)
        os.replace(tmp, p)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
