"""Tables and the cost–quality plot, in the layout of the paper's Table 2.

The cost columns are fixed here; every quality column comes from the metric that
measures it (its :class:`~catlab.metrics.base.Column`: header, cell format, place), so a
new metric module adds its column to the tables and the CSV without an edit here.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from catlab.evaluation.plots import family_styles, keyed_figure, outside_legend, place_labels
from catlab.metrics.fidelity import PSNR
from catlab.registry import metrics

#: the CSV's leading columns: the run and its cost (the metrics' follow, :func:`metric_columns`)
COST_COLUMNS = [
    "method",
    "family",
    "alpha",
    "steps",
    "macs_per_image",
    "macs_ratio",
    "seconds_per_image",
    "speedup",
    "speedup_min",
    "speedup_max",
    "images_per_second",
    "selection_share",
]


def metric_columns(rows: list[dict[str, Any]] | None = None) -> list[tuple[str, Any]]:
    """``(name, metric class)`` of every registered metric with a column, in column order; given ``rows``,
    only those a table shows: measured in some row, or declared ``always``."""

    declared = [(n, metrics.get(n)) for n in metrics.names() if getattr(metrics.get(n), "column", None) is not None]
    declared.sort(key=lambda nc: (nc[1].column.order, nc[0]))
    if rows is None:
        return declared
    return [(n, c) for n, c in declared if c.column.always or any(n in r for r in rows)]


def columns() -> list[str]:
    """The CSV's known columns, in order: the cost columns, then every metric's."""
    return COST_COLUMNS + [n for n, _ in metric_columns()]


def _macs(v: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if v >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:.0f}"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys = [c for c in columns() if any(c in r for r in rows)]
    keys += sorted({k for r in rows for k in r} - set(keys))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})


def settings_title(title: str, prompts: int, seeds: int, steps: int, guidance: float) -> str:
    """The title a table, its figures and W&B show: the experiment's name, then what actually ran
    (counted from the jobs, never copied from a config text that an override can make wrong)."""
    ran = f"{prompts} prompt{'s' * (prompts != 1)} × {seeds} seed{'s' * (seeds != 1)}, {steps} steps, CFG {guidance:g}"
    return f"{title}: {ran}" if title else ran


def markdown_table(rows: list[dict[str, Any]], title: str = "", notes: list[str] | None = None) -> str:
    """Method, α, steps, MACs, MACs ratio, s/image, speed-up, selection share, then each metric's column."""
    quality = metric_columns(rows)
    head = [
        "Method",
        "α",
        "Steps",
        "MACs",
        "MACs ratio",
        "s / image",
        "Speed-up",
        "Selection share",
        *[c.column.header for _, c in quality],
    ]
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mixed = any(r.get("graphed") for r in rows) and not all(r.get("graphed") for r in rows)
    for r in rows:

        def num(key, fmt, r=r):
            return fmt.format(r[key]) if key in r and r[key] is not None else "–"

        method = r["method"] + (" (eager)" if mixed and not r.get("graphed") else "")
        cells = [
            method,
            num("alpha", "{:.2f}"),
            str(r.get("steps", "")),
            _macs(r["macs_per_image"]),
            num("macs_ratio", "{:.2f}×"),
            num("seconds_per_image", "{:.3f}"),
            _speedup(r),
            num("selection_share", "{:.1%}"),
            *[c.cell(r.get(n)) for n, c in quality],
        ]
        lines.append("| " + " | ".join(cells) + " |")

    if any(r.get("psnr") is not None and r["psnr"] < PSNR.low for r in rows):
        notes = [
            *(notes or []),
            f"† PSNR below {PSNR.low:.0f} dB: the images differ from the full model's in content, "
            "not only in detail; why, strategy by strategy: docs/metrics.md#psnr-below-20-db.",
        ]
    if any(_spread(r) for r in rows):
        notes = [
            *(notes or []),
            "Speed-up: summed full-model time over summed strategy time on the batches both were timed on; "
            "in brackets the lowest and highest ratio of a single batch (its spread across batches).",
        ]
    if mixed:
        notes = [
            *(notes or []),
            "Rows marked (eager) could not replay CUDA graphs (sampler.cuda_graphs=true; "
            "docs/performance.md says why) while the others did: their speed-ups are not "
            "like for like.",
        ]
    for note in notes or []:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _spread(r: dict[str, Any]) -> bool:
    lo, hi = r.get("speedup_min"), r.get("speedup_max")
    return isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and r.get("speedup_batches", 2) > 1


def _speedup(r: dict[str, Any]) -> str:
    """``2.35×``, with its spread across batches when several were timed: ``2.35× (2.10–2.61)``."""
    if not isinstance(r.get("speedup"), (int, float)):
        return "–"
    cell = f"{r['speedup']:.2f}×"
    return cell + (f" ({r['speedup_min']:.2f}–{r['speedup_max']:.2f})" if _spread(r) else "")


def psnr_cell(value: float | None) -> str:
    """PSNR for a table (the metric's own cell: "∞ (identical)" at its cap, a dagger below its threshold)."""

    return PSNR.cell(value)


#: axis names, with their units
QUALITY_AXIS = {
    "psnr": "PSNR to the full model's image (dB)",
    "ssim": "SSIM to the full model's image (1 = identical)",
    "attribute_accuracy": "attribute accuracy (fraction correct)",
    "clip_score": "CLIP score (cosine × 100)",
}
RATIO_AXIS = "MACs ratio: full model's MACs / method's (×, higher = cheaper)"


def _groups(rows: list[dict[str, Any]]) -> list[str]:
    """What colours each row: its family when the rows span several, else its method (name before ``[``)."""
    families = {r.get("family", "other") for r in rows}
    if len(families) > 1:
        return [r.get("family", "other") for r in rows]
    return [r["method"].split("[")[0] for r in rows]


def _alpha(r: dict[str, Any], swept: set[str] = frozenset()) -> str:
    """`` α=…`` for a pruning row (and for every row of a method run at several α, in ``swept``)."""
    a = r.get("alpha")
    return f" α={a:.2g}" if isinstance(a, (int, float)) and (a != 1.0 or r["method"] in swept) else ""


def _swept(rows: list[dict[str, Any]]) -> set[str]:
    """The methods run at more than one α (an α sweep)."""
    seen: dict[str, set] = {}
    for r in rows:
        seen.setdefault(r["method"], set()).add(r.get("alpha"))
    return {m for m, alphas in seen.items() if len(alphas) > 1}


def _save(fig, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title.replace("`", ""), y=1 - 0.25 / fig.get_figheight(), fontsize=11)
    fig.savefig(path)
    plt.close(fig)


def cost_quality_plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """MACs ratio (filled marker) and measured speed-up (hollow, with its spread across batches when known)
    against each quality metric, one numbered point per strategy, one colour and marker per family.

    The key below the plot names the numbers; a method run at several α is joined by a line in α order.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.lines import Line2D

    quality = [k for k in ("psnr", "ssim", "attribute_accuracy", "clip_score") if any(k in r for r in rows)][:3]
    shown = [r for r in rows if r["method"] != "full"]
    groups = _groups(shown)
    styles = family_styles(list(dict.fromkeys(groups)))
    swept, key = _swept(shown), []
    for i, (r, g) in enumerate(zip(shown, groups), 1):
        speed = f", speed-up {r['speedup']:.2f}×" if isinstance(r.get("speedup"), (int, float)) else ""
        key.append((f"{i:>2}  {r['method']}{_alpha(r, swept)}  (MACs {r['macs_ratio']:.2f}×{speed})", styles[g].color))
    fig, axes = keyed_figure(max(1, len(quality)), key, [*styles, "MACs ratio (filled)"])
    for ax, q in zip(axes, quality):
        identical = [r for r in shown if q == "psnr" and r.get(q, 0) >= PSNR.cap]
        if identical:  # infinite PSNR has no place on the axis: said in words instead
            ax.text(0.99, 0.99, f"not drawn, identical to the full model (PSNR ∞): {len(identical)} row(s)",
                    transform=ax.transAxes, ha="right", va="top", fontsize=7, color="0.3")  # fmt: skip
        xs, ys, labels, hollow = [], [], [], []
        for i, (r, g) in enumerate(zip(shown, groups), 1):
            if q not in r or r in identical:
                continue
            st = styles[g]
            speed = r.get("speedup")
            if isinstance(speed, (int, float)):
                ax.plot([r["macs_ratio"], speed], [r[q], r[q]], color=st.color, alpha=0.35, lw=0.8, zorder=2)
                hollow.append((speed, r[q]))
                lo, hi = r.get("speedup_min"), r.get("speedup_max")
                err = (
                    [[speed - lo], [hi - speed]]
                    if isinstance(lo, (int, float)) and isinstance(hi, (int, float))
                    else None
                )
                ax.errorbar(speed, r[q], xerr=err, color=st.color, marker=st.marker, mfc="white", ms=6, lw=0.8,
                            capsize=2, zorder=3)  # fmt: skip
            ax.scatter(r["macs_ratio"], r[q], color=st.color, marker=st.marker, s=34, zorder=4)
            label = f"{i}: α={r['alpha']:.2g}" if r["method"] in swept else str(i)  # a sweep's points say their α
            xs, ys, labels = [*xs, r["macs_ratio"]], [*ys, r[q]], [*labels, label]
        for method in dict.fromkeys(r["method"] for r in shown):  # an α sweep: one line through its points
            sweep = sorted(
                (r["macs_ratio"], r[q]) for r in shown if r["method"] == method and q in r and r not in identical
            )
            if len(sweep) > 1:
                g = groups[next(i for i, r in enumerate(shown) if r["method"] == method)]
                ax.plot(*zip(*sweep), color=styles[g].color, lw=1.2, alpha=0.7, zorder=2)
        ax.margins(x=0.1, y=0.12)
        ax.set_xlabel("cost reduction vs the full model (×): filled = MACs ratio, hollow = measured speed-up")
        ax.set_ylabel(QUALITY_AXIS.get(q, q))
        ax.grid(alpha=0.3)
        place_labels(ax, xs, ys, labels, points=hollow)
    handles = [Line2D([], [], color=st.color, marker=st.marker, ls="", label=g) for g, st in styles.items()]
    handles += [
        Line2D([], [], color="0.3", marker="o", ls="", label="MACs ratio (filled)"),
        Line2D([], [], color="0.3", marker="o", mfc="white", ls="-", lw=0.8, label="speed-up (hollow, spread)"),
    ]
    outside_legend(axes[min(1, len(axes) - 1)], handles)
    _save(fig, path, title)


def family(spec: dict[str, Any]) -> str:
    """The kind of method a strategy spec is, for grouping: full, a step cache, token pruning, a budget schedule."""
    cache = spec.get("stepcache")
    cache = cache.get("name") if isinstance(cache, dict) else cache
    name = spec.get("name", "")
    if cache:
        return cache if name == "full" else f"token pruning + {cache}"
    if name == "full":
        return "full"
    if name == "budget_schedule":
        return "budget schedule"
    return "token pruning, every step"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (higher x and higher y are better), by increasing x."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front[::-1]


def pareto_plot(rows: list[dict[str, Any]], path: Path, title: str = "", quality: str = "psnr") -> None:
    """``quality`` against MACs ratio, one colour and marker per method family, each family's Pareto front
    drawn bold (its dominated points faded). Points are numbered; the key below names them, at any row count.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.lines import Line2D

    pts = [r for r in rows if quality in r and r["method"] != "full"]
    if not pts:
        return
    groups = _groups(pts)
    order = list(dict.fromkeys(groups))
    pts, groups = zip(*sorted(zip(pts, groups), key=lambda rg: (order.index(rg[1]), rg[0]["macs_ratio"])))
    styles = family_styles(order)
    key = [
        (f"{i:>2}  {r['method']}{_alpha(r)}  ({r['macs_ratio']:.2f}×, {r[quality]:.2f})", styles[g].color)
        for i, (r, g) in enumerate(zip(pts, groups), 1)
    ]
    fig, (ax,) = keyed_figure(1, key, [*order, "a family's Pareto front"])
    for g in order:
        mine = [r for r, h in zip(pts, groups) if h == g]
        st = styles[g]
        front = pareto_front([(r["macs_ratio"], r[quality]) for r in mine])
        on = [r for r in mine if (r["macs_ratio"], r[quality]) in front]
        off = [r for r in mine if r not in on]
        ax.scatter([r["macs_ratio"] for r in off], [r[quality] for r in off], color=st.color, marker=st.marker,
                   s=22, alpha=0.4, zorder=3)  # fmt: skip
        ax.scatter([r["macs_ratio"] for r in on], [r[quality] for r in on], color=st.color, marker=st.marker,
                   s=42, edgecolor="black", linewidth=0.5, zorder=4)  # fmt: skip
        if len(front) > 1:
            ax.plot(*zip(*front), color=st.color, lw=2.0, zorder=2)
    ax.set_xlabel(RATIO_AXIS)
    ax.set_ylabel(QUALITY_AXIS.get(quality, quality))
    ax.margins(x=0.06, y=0.08)  # the axes fit the points, not a range set elsewhere
    ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=styles[g].color, marker=styles[g].marker, lw=2.0, label=g) for g in order]
    handles.append(Line2D([], [], color="0.4", marker="o", alpha=0.4, ls="", label="dominated (faded)"))
    outside_legend(ax, handles, title="family: its Pareto front")
    place_labels(
        ax, [r["macs_ratio"] for r in pts], [r[quality] for r in pts], [str(i) for i in range(1, len(pts) + 1)]
    )
    _save(fig, path, title)
