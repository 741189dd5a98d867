"""The quality frontier: which strategy to use at a given speed budget.

An evaluation's rows (one per strategy setting) are grouped into *families*, one
per method with its own knob (TaylorSeer's interval, MagCache's threshold, a
token pruner's α, a budget pattern, ...). For each family and each quality
metric (PSNR, SSIM) the Pareto front against the MACs ratio is kept: the
settings no other setting of the family beats on both. A family's quality at a
budget (say 2.5×) is read off its front by linear interpolation between the two
measured front points around it; outside the family's measured range it has no
value (never extrapolated), and the measured front point nearest to the budget is shown beside it.

Written by ``catlab.evaluate ... frontier=true`` next to the usual tables, or
afterwards from a finished run directory::

    python -m catlab.evaluation.frontier outputs/evaluate/<run>

Files: ``frontier.md`` (best strategy per budget, every family per budget, each
family's front), ``frontier.csv`` (every family × budget × metric),
``frontier_psnr.png`` and ``frontier_ssim.png`` (one front per family, the
overall front as a wide band beneath them).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catlab.evaluation.paired import PER_IMAGE, Paired, from_json, paired_difference, values_at
from catlab.evaluation.plots import family_styles, keyed_figure, outside_legend
from catlab.evaluation.report import QUALITY_AXIS, RATIO_AXIS

#: the budgets of the summary table (MACs ratio against the full model)
BUDGETS = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
QUALITIES = ("psnr", "ssim")
_QUALITY_NAME = {"psnr": "PSNR (dB)", "ssim": "SSIM"}
#: selectors whose α is derived from their own knob (shown in its place)
NO_ALPHA = {"full", "budget_schedule", "adaptive_schedule"}
_CACHE_NAME = {
    "pyramid_attention_broadcast": "PAB",
    "faster_cache": "FasterCache",
    "taylorseer": "TaylorSeer",
    "mag_cache": "MagCache",
    "first_block_cache": "FirstBlockCache",
    "cachedit_dbcache": "DBCache",
    "cachedit_dbprune": "DBPrune",
    "sea_cache": "SeaCache",
}


@dataclass(frozen=True)
class Point:
    """One measured setting: its label, family, MACs ratio and quality (higher is better on both axes)."""

    label: str
    family: str
    x: float
    y: float
    #: the measured wall-clock speed-up of the same row (``None``: not timed beside the full model)
    speedup: float | None = None
    #: the strategy key of the row (its per-image records, for paired comparisons)
    key: str | None = None


def family_of(spec: dict[str, Any]) -> str:
    """The family a strategy spec belongs to: everything that is not its own knob.

    A step cache on the full model is named after the cache (with its order or
    calibrator when not the default); a selector after itself, its inner selector,
    its reuse rule and any step cache it runs inside. α, thresholds, intervals,
    patterns and warm-ups are the knob a family sweeps, so they are left out.
    """
    cache = spec.get("stepcache")
    cache = {"name": cache} if isinstance(cache, str) else dict(cache or {})
    name = spec.get("name", "")
    parts = []
    if cache:
        c = _CACHE_NAME.get(cache["name"], cache["name"])
        if int(cache.get("max_order", 1)) != 1:
            c += f" order {cache['max_order']}"
        if cache.get("calibrator"):
            c += f" + {cache['calibrator']} calibrator"
        if name == "full":
            return c
        parts.append(f"inside {c}")
    inner = spec.get("inner")
    if isinstance(inner, dict):
        inner = inner.get("name")
    head = name + (f"({inner})" if inner else "")
    reuse = spec.get("reuse")
    reuse = reuse.get("name") if isinstance(reuse, dict) else reuse
    if reuse and reuse != "copy":
        head += f" + {reuse}"
    return " ".join([head, *parts])


#: the token-level methods of other authors, in catlab (their families are peers, like the step caches)
PEER_SELECTORS = {"ras", "toca", "duca", "clusca", "speca"}


def is_peer(spec: dict[str, Any]) -> bool:
    """A peer's method: a step cache on the full model, or another group's token-level method (RAS, ToCa, DuCa,
    ClusCa, SpeCa) -- what a catlab strategy is measured against."""
    return is_step_cache("", spec) or (spec.get("name") in PEER_SELECTORS and not spec.get("stepcache"))


def is_step_cache(family: str, spec: dict[str, Any]) -> bool:
    """A peer's step cache on the full model."""
    return spec.get("name") == "full" and bool(spec.get("stepcache"))


def pareto_front(points: list[Point]) -> list[Point]:
    """The points no other point beats on both axes (x and y both higher is better), by increasing x.

    A point is dropped when another has x ≥ and y ≥ with one of them strictly
    greater; of exact duplicates the first is kept.
    """
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (-p.x, -p.y)):
        if not front or p.y > front[-1].y:
            front.append(p)
    return front[::-1]


def value_at(front: list[Point], x: float) -> float | None:
    """The front's quality at MACs ratio ``x``: linear between the measured front points around it.

    ``None`` outside the front's measured range (no extrapolation). ``front`` is
    sorted by increasing x, as :func:`pareto_front` returns it.
    """
    if not front or x < front[0].x or x > front[-1].x:
        return None
    for a, b in zip(front, front[1:]):
        if a.x <= x <= b.x:
            if b.x == a.x:
                return max(a.y, b.y)
            return a.y + (b.y - a.y) * (x - a.x) / (b.x - a.x)
    return front[0].y  # a one-point front at exactly x


def nearest(points: list[Point], x: float) -> Point | None:
    """The measured point whose MACs ratio is closest to ``x`` (the better one on a tie)."""
    return min(points, key=lambda p: (abs(p.x - x), -p.y)) if points else None


@dataclass
class Frontier:
    """Every family's points and fronts, per quality metric."""

    points: dict[str, dict[str, list[Point]]]  # quality -> family -> points
    peers: set[str]  # the peers' families: step caches on the full model, other groups' token-level methods
    #: strategy key -> (prompt id, seed) -> metric -> value: the records behind the rows (paired comparisons)
    per_image: dict = field(default_factory=dict)

    @classmethod
    def from_rows(
        cls, rows: list[dict[str, Any]], specs: dict[str, dict[str, Any]], per_image: dict | None = None
    ) -> Frontier:
        """``rows``: an evaluation's rows (``key``, ``macs_ratio``, metrics); ``specs``: each key's strategy spec;
        ``per_image``: the per-image values of each key (:func:`catlab.evaluation.paired.per_image_values`), which
        add paired intervals to the tables.

        The full model (no step cache) is the reference and belongs to no family.
        """
        points: dict[str, dict[str, list[Point]]] = {q: {} for q in QUALITIES}
        peers = set()
        for r in rows:
            spec = specs.get(r.get("key"), {"name": r["method"]})
            if spec.get("name") == "full" and not spec.get("stepcache"):
                continue
            fam = family_of(spec)
            if is_peer(spec):
                peers.add(fam)
            for q in QUALITIES:
                if r.get(q) is not None:
                    points[q].setdefault(fam, []).append(
                        Point(
                            point_label(r, spec),
                            fam,
                            float(r["macs_ratio"]),
                            float(r[q]),
                            r.get("speedup"),
                            r.get("key"),
                        )
                    )
        return cls(points, peers, per_image or {})

    def families(self) -> list[str]:
        return list(dict.fromkeys(f for q in QUALITIES for f in self.points[q]))

    def front(self, quality: str, family: str | None = None) -> list[Point]:
        """One family's front, or with ``family=None`` the overall front of every point."""
        pts = (
            self.points[quality].get(family, []) if family else [p for ps in self.points[quality].values() for p in ps]
        )
        return pareto_front(pts)

    def at(self, quality: str, family: str, x: float) -> tuple[float | None, Point | None]:
        """(the family's interpolated quality at ``x``, the measured point of its front nearest to ``x``)."""
        front = self.front(quality, family)
        return value_at(front, x), nearest(front, x)

    def paired(self, quality: str, a: str, b: str, x: float) -> Paired | None:
        """Family ``a`` minus family ``b`` at ``x``, image by image on their fronts, with its 95 % bootstrap
        interval; ``None`` where either has no value there or its records are not at hand."""
        va = values_at(self.front(quality, a), x, self.per_image, quality)
        vb = values_at(self.front(quality, b), x, self.per_image, quality)
        return None if va is None or vb is None else paired_difference(va, vb)

    def best(self, quality: str, x: float, among: set[str] | None = None) -> tuple[str, float, Point] | None:
        """(family, interpolated quality, its nearest point) of the best family at ``x``; ``None``: none reaches it."""
        found = []
        for fam in self.points[quality]:
            if among is not None and fam not in among:
                continue
            v, p = self.at(quality, fam, x)
            if v is not None:
                found.append((fam, v, p))
        return max(found, key=lambda t: t[1]) if found else None


def point_label(row: dict[str, Any], spec: dict[str, Any]) -> str:
    """The row's own knob, short: the spec's settings beyond its family, α for a pruner, t0 when set."""
    knob = []
    if spec.get("name") not in NO_ALPHA and "alpha" in row and row.get("alpha", 1.0) < 1.0:
        knob.append(f"α={row['alpha']:.2g}")
    cache = spec.get("stepcache")
    if isinstance(cache, dict):
        knob += [f"{k}={_short(v)}" for k, v in cache.items() if k not in ("name", "max_order", "calibrator")]
    knob += [
        f"{k}={_short(v)}"
        for k, v in spec.items()
        if k not in ("name", "alpha", "stepcache", "reuse", "inner", "start_step")
    ]
    if spec.get("name") != "full" and "start_step" in spec:
        knob.append(f"t0={spec['start_step']}")
    return ", ".join(knob) or row.get("method", spec.get("name", ""))


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "/".join(f"{x:g}" if isinstance(x, (int, float)) else str(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _fmt(v: float | None, quality: str) -> str:
    return "–" if v is None else (f"{v:.2f}" if quality == "psnr" else f"{v:.4f}")


def markdown(fr: Frontier, budgets=BUDGETS, title: str = "") -> str:
    """The best strategy per budget, against the best peer (step cache or token-level method), every family,
    every front."""
    lines = [f"### {title}", ""] if title else []
    lines += [
        "Best strategy at each MACs ratio: each family's Pareto front interpolated linearly between its "
        "measured points (– : the family has no measured points on both sides); in brackets the "
        "measured point of the family's front nearest to it (its knob, MACs ratio, value).",
        "",
    ]
    paired = bool(fr.per_image)
    if paired:
        lines += [
            "Margins are checked image by image: the mean paired difference with its 95 % bootstrap interval "
            "(images resampled; catlab/evaluation/paired.py). A family **wins** only where the interval lies "
            "above zero; where it holds zero the two **tie**, whatever the means say.",
            "",
        ]
    for q in QUALITIES:
        digits = 2 if q == "psnr" else 4
        extra = " paired per image [95 % CI] |" if paired else ""
        lines += [
            f"#### Best by {_QUALITY_NAME[q]}",
            "",
            "| MACs ratio | best family | "
            + _QUALITY_NAME[q]
            + " | nearest measured point | best peer | "
            + _QUALITY_NAME[q]
            + " | margin |"
            + extra,
            "|---|---|---|---|---|---|---|" + ("---|" if paired else ""),
        ]
        for x in budgets:
            top, peer = fr.best(q, x), fr.best(q, x, fr.peers)
            if top is None:
                lines.append(f"| {x:g}× | – | – | – | – | – | – |" + (" – |" if paired else ""))
                continue
            fam, v, p = top
            cells = [f"{x:g}×", fam, _fmt(v, q), f"{p.label} ({p.x:.2f}×, {_fmt(p.y, q)})"]
            if peer is None:
                cells += ["–", "–", "–"]
            else:
                cells += [peer[0], _fmt(peer[1], q), ("+" if v >= peer[1] else "") + _fmt(v - peer[1], q)]
            if paired:
                d = fr.paired(q, fam, peer[0], x) if peer is not None and peer[0] != fam else None
                cells.append("–" if d is None else d.cell(digits))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if paired:
        lines += _paired_tables(fr, budgets)
        lines += _temporal_table(fr, budgets)
    for q in QUALITIES:
        lines += [
            f"#### Every family, {_QUALITY_NAME[q]} at each MACs ratio",
            "",
            "| family | measured range | " + " | ".join(f"{x:g}×" for x in budgets) + " |",
            "|---|---|" + "---|" * len(budgets),
        ]
        for fam in fr.families():
            pts = fr.points[q].get(fam, [])
            if not pts:
                continue
            span = f"{min(p.x for p in pts):.2f}–{max(p.x for p in pts):.2f}×"
            vals = [_fmt(fr.at(q, fam, x)[0], q) for x in budgets]
            lines.append(f"| {fam} | {span} | " + " | ".join(vals) + " |")
        lines.append("")
    lines += [
        "#### Each family's front (PSNR), with the measured wall-clock speed-up",
        "",
        "| family | point | MACs ratio | PSNR (dB) | speed-up | speed-up / MACs ratio |",
        "|---|---|---|---|---|---|",
    ]
    for fam in fr.families():
        for p in fr.front("psnr", fam):
            sp = "–" if p.speedup is None else f"{p.speedup:.2f}×"
            share = "–" if p.speedup is None else f"{p.speedup / p.x:.0%}"
            lines.append(f"| {fam} | {p.label} | {p.x:.2f}× | {p.y:.2f} | {sp} | {share} |")
    return "\n".join(lines) + "\n"


def _paired_tables(fr: Frontier, budgets) -> list[str]:
    """Per quality: at each budget, the best family that is not a peer's against every peer family,
    as mean paired difference [95 % CI] and win / tie / loss."""
    lines = []
    peers = sorted(fr.peers)
    for q in QUALITIES:
        digits = 2 if q == "psnr" else 4
        lines += [
            f"#### Paired per image, {_QUALITY_NAME[q]}: catlab's best family against each peer",
            "",
            "| MACs ratio | catlab's best family | " + " | ".join(peers) + " |",
            "|---|---|" + "---|" * len(peers),
        ]
        for x in budgets:
            top = fr.best(q, x, set(fr.points[q]) - fr.peers)
            if top is None:
                continue
            cells = []
            for peer in peers:
                d = fr.paired(q, top[0], peer, x)
                cells.append("–" if d is None else d.cell(digits))
            lines.append(f"| {x:g}× | {top[0]} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _temporal_table(fr: Frontier, budgets) -> list[str]:
    """Videos: the temporal error (lower is better) of catlab's best family by PSNR and of each peer, on their
    PSNR fronts at each budget, as catlab minus peer per video [95 % CI]; empty without temporal errors."""
    if not any("temporal_error" in m for images in fr.per_image.values() for m in images.values()):
        return []
    peers = sorted(fr.peers)
    lines = [
        "#### Temporal error of the PSNR winners (videos; lower is better)",
        "",
        "On each family's PSNR front at the budget: catlab's best family's temporal error (the error of its "
        "consecutive-frame differences against the full model's, catlab/metrics/video.py), and catlab minus each "
        "peer per video [95 % CI]: **better** where the interval lies below zero, **worse** above, else tie.",
        "",
        "| MACs ratio | catlab's best family | its temporal error | " + " | ".join(peers) + " |",
        "|---|---|---|" + "---|" * len(peers),
    ]

    def errors(fam: str, x: float):
        return values_at(fr.front("psnr", fam), x, fr.per_image, "temporal_error")

    for x in budgets:
        top = fr.best("psnr", x, set(fr.points["psnr"]) - fr.peers)
        mine = errors(top[0], x) if top is not None else None
        if mine is None:
            continue
        cells = []
        for peer in peers:
            theirs = errors(peer, x)
            d = paired_difference(mine, theirs) if theirs is not None else None
            if d is None:
                cells.append("–")
                continue
            verdict = "better" if d.high < 0 else "worse" if d.low > 0 else "tie"
            cells.append(f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}] {verdict}")
        mean = sum(mine.values()) / len(mine)
        lines.append(f"| {x:g}× | {top[0]} | {mean:.4f} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_csv(fr: Frontier, path: Path, budgets=BUDGETS) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "quality",
                "family",
                "step_cache",
                "macs_ratio",
                "value",
                "nearest_label",
                "nearest_macs_ratio",
                "nearest_value",
            ]
        )
        for q in QUALITIES:
            for fam in fr.points[q]:
                for x in budgets:
                    v, p = fr.at(q, fam, x)
                    w.writerow(
                        [
                            q,
                            fam,
                            fam in fr.peers,
                            x,
                            "" if v is None else f"{v:.6g}",
                            p.label if p else "",
                            f"{p.x:.4f}" if p else "",
                            f"{p.y:.6g}" if p else "",
                        ]
                    )


def plot(fr: Frontier, quality: str, path: Path, title: str = "", budgets=BUDGETS) -> None:
    """Every family's points (faded) and front (bold; peers' methods dashed), the overall front as a wide band
    beneath them, so the family that holds each stretch of it stays visible.

    One colour and marker per family (:func:`catlab.evaluation.plots.family_styles`); the legend sits
    outside the axes, so no point is hidden at any number of families.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f in fr.families() if fr.points[quality].get(f)]
    if not fams:
        return
    styles = family_styles(fams)
    fig, (ax,) = keyed_figure(1, [], [*fams, "overall front (band)"])
    for fam in fams:
        st = styles[fam]
        pts = fr.points[quality][fam]
        ax.scatter(
            [p.x for p in pts], [p.y for p in pts], color=st.color, marker=st.marker, s=16, alpha=0.35, zorder=2
        )
        front = fr.front(quality, fam)
        ax.plot(
            [p.x for p in front],
            [p.y for p in front],
            color=st.color,
            marker=st.marker,
            ms=5,
            lw=1.8,
            zorder=3,
            ls="--" if fam in fr.peers else "-",
            label=fam,
        )
    overall = fr.front(quality)
    ax.plot(
        [p.x for p in overall],
        [p.y for p in overall],
        color="black",
        lw=9,
        alpha=0.18,
        zorder=1.5,
        solid_capstyle="round",
        label="overall front (band)",
    )  # under the families' own lines
    for x in budgets:
        ax.axvline(x, color="0.6", lw=0.6, ls=":", zorder=1)
    ax.set_xlabel(RATIO_AXIS)
    ax.set_ylabel(QUALITY_AXIS[quality])
    ax.grid(alpha=0.25)
    outside_legend(ax, ax.get_legend_handles_labels()[0], title="front per family (peers' methods dashed)")
    # wrapped: an experiment's title with its setting runs wider than the figure
    fig.suptitle(textwrap.fill(title.replace("`", ""), 110) if title else f"{quality.upper()} frontier", fontsize=11)
    fig.savefig(path)
    plt.close(fig)


def write(
    rows: list[dict[str, Any]],
    specs: dict[str, dict[str, Any]],
    out: Path,
    title: str = "",
    per_image: dict | None = None,
) -> Frontier:
    """Write ``frontier.md``, ``frontier.csv`` and the two figures into ``out``; with ``per_image`` (each key's
    per-image values) the tables carry paired intervals and win / tie / loss."""
    fr = Frontier.from_rows(rows, specs, per_image)
    (out / "frontier.md").write_text(markdown(fr, title=title))
    write_csv(fr, out / "frontier.csv")
    for q in QUALITIES:
        plot(fr, q, out / f"frontier_{q}.png", title)
    return fr


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the quality frontier of a finished evaluation run.")
    parser.add_argument("path", type=Path, help="a catlab.evaluate run directory (results.json, evaluation.json)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    try:
        rows = json.loads((args.path / "results.json").read_text())
        plan = json.loads((args.path / "evaluation.json").read_text())
        specs = {s["key"]: s.get("spec") or {"name": s["label"]} for s in plan["strategies"]}
        per_image_file = args.path / PER_IMAGE
        per_image = from_json(json.loads(per_image_file.read_text())) if per_image_file.exists() else None
    except (OSError, ValueError, KeyError, TypeError) as err:
        sys.exit(
            f"catlab: cannot read the run {args.path}: {err.__class__.__name__}: {err} (it needs results.json "
            "and evaluation.json, as catlab.evaluate writes them)"
        )
    write(rows, specs, args.path, args.title, per_image)
    print((args.path / "frontier.md").read_text())


if __name__ == "__main__":
    main()
