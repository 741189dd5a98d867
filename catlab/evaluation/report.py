"""Tables and the cost–quality plot, in the layout of the paper's Table 2.

The cost columns are fixed here; every quality column comes from the metric that
measures it (its :class:`~catlab.metrics.base.Column`: header, cell format, place), so a
new metric module adds its column to the tables and the CSV without an edit here.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from catlab.evaluation.plots import place_labels

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
    "images_per_second",
    "selection_share",
]


def metric_columns(rows: list[dict[str, Any]] | None = None) -> list[tuple[str, Any]]:
    """``(name, metric class)`` of every registered metric with a column, in column order; given ``rows``,
    only those a table shows: measured in some row, or declared ``always``."""
    from catlab.registry import metrics

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
            num("speedup", "{:.2f}×"),
            num("selection_share", "{:.1%}"),
            *[c.cell(r.get(n)) for n, c in quality],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    from catlab.metrics.fidelity import PSNR

    if any(r.get("psnr") is not None and r["psnr"] < PSNR.low for r in rows):
        notes = [
            *(notes or []),
            f"† PSNR below {PSNR.low:.0f} dB: the images differ from the full model's in content, "
            "not only in detail; why, strategy by strategy: docs/metrics.md#psnr-below-20-db.",
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


def psnr_cell(value: float | None) -> str:
    """PSNR for a table (the metric's own cell: "∞ (identical)" at its cap, a dagger below its threshold)."""
    from catlab.metrics.fidelity import PSNR

    return PSNR.cell(value)


def cost_quality_plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Speed-up and MACs ratio against PSNR (and alignment), one point per strategy and α.

    Methods are told apart by colour in one legend (no labels on the points, which
    overlap when strategies cost the same); ``o`` is the MACs ratio, ``x`` the measured
    speed-up of the same row, joined by a thin line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    quality = [k for k in ("psnr", "attribute_accuracy", "clip_score") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(quality), figsize=(5.5 * len(quality), 4.4), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: plt.cm.tab10(i % 10) if len(methods) <= 10 else plt.cm.tab20(i % 20) for i, m in enumerate(methods)}
    from catlab.metrics.fidelity import PSNR

    for ax, q in zip(axes[0], quality):
        identical = [r for r in rows if q == "psnr" and r["method"] != "full" and r.get(q, 0) >= PSNR.cap]
        if identical:  # infinite PSNR has no place on the axis: said in words instead
            ax.text(
                0.99,
                0.99,
                f"not drawn, identical to the full model (PSNR ∞): {len(identical)} row(s)",
                transform=ax.transAxes,
                ha="right",
                va="top",
                fontsize=7,
                color="0.3",
            )
        for r in rows:
            if q not in r or (q == "psnr" and r["method"] == "full") or r in identical:
                continue
            c = colors[r["method"]]
            ax.plot([r["macs_ratio"], r["speedup"]], [r[q], r[q]], color=c, alpha=0.35, lw=0.8)
            ax.scatter(r["macs_ratio"], r[q], color=c, marker="o", s=28, zorder=3)
            ax.scatter(r["speedup"], r[q], color=c, marker="x", s=28, zorder=3)
        ax.margins(x=0.08, y=0.1)
        ax.set_xlabel("cost reduction vs full (o: MACs ratio, x: measured speed-up)")
        ax.set_ylabel(
            {
                "psnr": "PSNR to full model (dB)",
                "attribute_accuracy": "attribute accuracy",
                "clip_score": "CLIP score",
            }[q]
        )
        ax.grid(alpha=0.3)

    def label(m: str) -> str:
        alphas = sorted({r["alpha"] for r in rows if r["method"] == m})
        return m + (f" (α={alphas[0]:.2g})" if len(alphas) == 1 and m != "full" else "")

    handles = [Line2D([], [], color=colors[m], marker="o", ls="", label=label(m)) for m in methods]
    handles += [
        Line2D([], [], color="k", marker="o", ls="", label="MACs ratio"),
        Line2D([], [], color="k", marker="x", ls="", label="measured speed-up"),
    ]
    fig.legend(handles=handles, fontsize=7, loc="lower center", ncol=min(5, len(handles)), bbox_to_anchor=(0.5, 0))
    fig.suptitle(title)
    rows_of_legend = -(-len(handles) // min(5, len(handles)))
    fig.tight_layout(rect=(0, 0.05 + 0.045 * rows_of_legend, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    """``quality`` against MACs ratio, one colour per method family, each family's Pareto front as a line.

    Points are numbered; the key beside the plot names them. Readable with dozens of rows,
    where :func:`cost_quality_plot` is not.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if quality in r and r["method"] != "full"]
    if not pts:
        return
    families = list(dict.fromkeys(r.get("family", "other") for r in pts))
    pts.sort(key=lambda r: (families.index(r.get("family", "other")), r["macs_ratio"]))
    colors = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    fig, (ax, key) = plt.subplots(1, 2, figsize=(12, 6), gridspec_kw={"width_ratios": [1.4, 1]}, dpi=120)
    for f in families:
        mine = [r for r in pts if r.get("family", "other") == f]
        ax.scatter([r["macs_ratio"] for r in mine], [r[quality] for r in mine], color=colors[f], label=f, zorder=3)
        front = pareto_front([(r["macs_ratio"], r[quality]) for r in mine])
        if len(front) > 1:
            ax.plot(*zip(*front), color=colors[f], alpha=0.6, zorder=2)
    lines = []
    for i, r in enumerate(pts, 1):
        alpha = f" α={r['alpha']:.2g}" if str(r.get("family", "")).startswith("token pruning") else ""
        lines.append(f"{i:>2}  {r['method']}{alpha}  ({r['macs_ratio']:.2f}×, {r[quality]:.2f})")
    ax.set_xlabel("MACs ratio vs full (higher = cheaper)")
    ax.set_ylabel({"psnr": "PSNR to full model (dB)", "ssim": "SSIM to full model"}.get(quality, quality))
    ax.margins(x=0.06, y=0.08)  # the axes fit the points, not a range set elsewhere
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize=8)
    key.axis("off")
    key.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=6.5 if len(lines) > 24 else 7.5)
    fig.suptitle(title)
    fig.tight_layout()  # the layout first: labels are placed in the figure as it will be saved
    place_labels(
        ax,
        [r["macs_ratio"] for r in pts],
        [r[quality] for r in pts],
        [str(i) for i in range(1, len(pts) + 1)],
        avoid=[legend],
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)
