"""``config_hash``: the short stable hash that names a configuration (a run's, a record's, a reference's)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def config_hash(obj: Any, length: int = 12) -> str:
    """A short stable hash of a JSON-able config."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]
