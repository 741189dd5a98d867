"""The results store: one JSON record per (strategy config hash, prompt id, seed).

Each record is written atomically (temporary file, then rename), so a crash or
a killed job leaves either a whole record or none. A rerun of the same
evaluation skips every record already present; records are never duplicated,
since the path is the key. Tables are rebuilt from the store alone
(:func:`catlab.evaluation.merge.merge`), so any number of processes or ranks may
write into one store.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class ResultStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- strategies ----------------------------------------------------------------
    def register_strategy(self, key: str, info: dict[str, Any]) -> None:
        """Remember what a strategy hash stands for (label, selector config, model, sampler)."""
        folder = self.root / key
        folder.mkdir(exist_ok=True)
        path = folder / "strategy.json"
        if not path.exists():
            _atomic_write(path, info)

    def strategies(self) -> dict[str, dict[str, Any]]:
        """Every registered strategy by key, in the order the evaluation listed them (``order``), then by key."""
        infos = {p.parent.name: json.loads(p.read_text()) for p in sorted(self.root.glob("*/strategy.json"))}
        return dict(sorted(infos.items(), key=lambda kv: (kv[1].get("order", float("inf")), kv[0])))

    # -- records -------------------------------------------------------------------
    def path(self, key: str, prompt_id: int, seed: int) -> Path:
        return self.root / key / f"p{int(prompt_id):06d}_s{int(seed)}.json"

    def has(self, key: str, prompt_id: int, seed: int) -> bool:
        return self.path(key, prompt_id, seed).exists()

    def put(self, key: str, record: dict[str, Any]) -> None:
        _atomic_write(self.path(key, record["prompt_id"], record["seed"]), record)

    def records(self, key: str) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted((self.root / key).glob("p*_s*.json"))]


def _atomic_write(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)
