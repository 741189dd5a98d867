"""Paired comparisons per prompt: is one strategy's quality above another's, or is the gap noise?

Two strategies of one evaluation scored the same images (prompt, seed), so their difference is taken image by
image and its mean is given with a 95 % bootstrap interval (the images resampled with replacement, a seeded
generator, percentile bounds). A strategy **wins** only where that interval lies above zero, **loses** where it
lies below, and the two **tie** otherwise -- ten prompts cannot separate methods a dB apart, and the tables say so.

Per-image values come from the result store's records (``per_image_values``); a frontier reads a family's value
between two measured front points per image, with the same linear weights as its mean
(:func:`values_at`), so the paired mean equals the difference of the two fronts' interpolated means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from catlab.evaluation.store import record_name

#: the per-image values an evaluation run writes beside results.json (catlab.evaluate, catlab.evaluation.merge)
PER_IMAGE = "per_image.json"
#: an image of an evaluation: (prompt id, seed)
ImageId = tuple[int, int]
RESAMPLES = 10_000
LEVEL = 0.95


@dataclass(frozen=True)
class Paired:
    """The mean per-image difference ``a - b``, its bootstrap interval and the images it was taken over."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def verdict(self) -> str:
        """``"win"`` (interval above zero), ``"loss"`` (below) or ``"tie"`` (it holds zero)."""
        return "win" if self.low > 0 else "loss" if self.high < 0 else "tie"

    def cell(self, digits: int = 2) -> str:
        """``+1.23 [+0.40, +2.01] win`` for a table."""
        f = f"{{:+.{digits}f}}"
        return f"{f.format(self.mean)} [{f.format(self.low)}, {f.format(self.high)}] {self.verdict}"


def paired_difference(
    a: dict[ImageId, float],
    b: dict[ImageId, float],
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Paired | None:
    """``a - b`` over the images both have, with its ``level`` bootstrap interval; ``None`` below 2 images.

    Deterministic for given inputs (``seed``). With every difference equal the interval is that value.
    """
    common = sorted(a.keys() & b.keys())
    if len(common) < 2:
        return None
    d = np.array([a[i] - b[i] for i in common], dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Paired(float(d.mean()), float(min(low, d.mean())), float(max(high, d.mean())), len(common))


def values_at(
    front: list[Any], x: float, per_image: dict[str, dict[ImageId, dict[str, float]]], quality: str
) -> dict[ImageId, float] | None:
    """Each image's ``quality`` on a front at MACs ratio ``x``: linear between the measured front points around
    ``x`` (points carry ``key``, ``x``), as :func:`catlab.evaluation.frontier.value_at` does for the mean.

    ``None`` outside the front's range or where a point's records are not at hand.
    """
    if not front or x < front[0].x or x > front[-1].x:
        return None
    for a, b in zip(front, front[1:]) if len(front) > 1 else [(front[0], front[0])]:
        if a.x <= x <= b.x:
            va, vb = _values(per_image, a, quality), _values(per_image, b, quality)
            if va is None or vb is None:
                return None
            if b.x == a.x:
                return va if a.y >= b.y else vb
            w = (x - a.x) / (b.x - a.x)
            return {i: va[i] + (vb[i] - va[i]) * w for i in va.keys() & vb.keys()}
    return None


def _values(per_image, point, quality: str) -> dict[ImageId, float] | None:
    records = per_image.get(getattr(point, "key", None) or "")
    if not records:
        return None
    found = {i: m[quality] for i, m in records.items() if m.get(quality) is not None}
    return found or None


def per_image_values(store, plan: dict[str, Any]) -> dict[str, dict[ImageId, dict[str, float]]]:
    """``{strategy key: {(prompt id, seed): {metric: value}}}`` from the valid records of ``plan``'s jobs."""
    names = [
        (pid, seed, record_name(pid, seed, bid)) for bid, items in plan["batches"].items() for pid, _, seed in items
    ]
    out: dict[str, dict[ImageId, dict[str, float]]] = {}
    for info in plan["strategies"]:
        mine = {}
        for pid, seed, name in names:
            record = store.load(info["key"], name)
            if record is not None:
                mine[(int(pid), int(seed))] = {k: float(v) for k, v in record["metrics"].items()}
        out[info["key"]] = mine
    return out


def to_json(per_image: dict[str, dict[ImageId, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """JSON keys: ``"<prompt id>/<seed>"``."""
    return {key: {f"{p}/{s}": m for (p, s), m in images.items()} for key, images in per_image.items()}


def from_json(data: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[ImageId, dict[str, float]]]:
    out = {}
    for key, images in data.items():
        out[key] = {}
        for name, metrics in images.items():
            p, s = name.split("/")
            out[key][(int(p), int(s))] = {k: float(v) for k, v in metrics.items()}
    return out
