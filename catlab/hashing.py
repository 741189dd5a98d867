"""Names made from hashes: ``config_hash`` names a configuration (a run's, a record's, a reference's), ``folder_name``
a strategy's files."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any


def config_hash(obj: Any, length: int = 12) -> str:
    """A short stable hash of a JSON-able config."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def folder_name(label: str, key: str, limit: int = 80) -> str:
    """A file or folder name for a strategy: its ``label`` as a safe slug (letters, digits and ``.=,+-``; at most
    ``limit`` characters) plus a short hash of its ``key``. One path component, never hidden, never nested, and
    distinct for distinct keys even where two slugs are alike."""
    slug = re.sub(r"[^A-Za-z0-9.=,+-]+", "_", label).strip("._-")[:limit].rstrip("._-") or "strategy"
    return f"{slug}-{hashlib.sha256(str(key).encode()).hexdigest()[:8]}"
