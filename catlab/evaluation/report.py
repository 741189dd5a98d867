"""Tables and the cost–quality plot, in the layout of the paper's Table 2."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

COLUMNS = ["method", "alpha", "steps", "macs_per_image", "macs_ratio", "seconds_per_image", "speedup",
           "images_per_second", "selection_share", "clip_score", "attribute_accuracy", "psnr", "ssim", "lpips"]


def _macs(v: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if v >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:.0f}"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys = [c for c in COLUMNS if any(c in r for r in rows)]
    keys += sorted({k for r in rows for k in r} - set(keys))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})


def markdown_table(rows: list[dict[str, Any]], title: str = "", notes: list[str] | None = None) -> str:
    """Method, α, steps, MACs, MACs ratio, s/image, speed-up, alignment, PSNR, SSIM (+ LPIPS when measured)."""
    align = [c for c in ("clip_score", "attribute_accuracy") if any(c in r for r in rows)]
    extra = [c for c in ("lpips",) if any(c in r for r in rows)]
    head = ["Method", "α", "Steps", "MACs", "MACs ratio", "s / image", "Speed-up", "Selection share",
            *[{"clip_score": "CLIP score", "attribute_accuracy": "Attribute acc."}[c] for c in align],
            "PSNR (dB)", "SSIM", *[c.upper() for c in extra]]
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        def num(key, fmt):
            return fmt.format(r[key]) if key in r and r[key] is not None else "–"
        cells = [r["method"], num("alpha", "{:.2f}"), str(r.get("steps", "")), _macs(r["macs_per_image"]),
                 num("macs_ratio", "{:.2f}×"), num("seconds_per_image", "{:.3f}"), num("speedup", "{:.2f}×"),
                 num("selection_share", "{:.1%}"), *[num(c, "{:.3f}") for c in align],
                 num("psnr", "{:.2f}"), num("ssim", "{:.4f}"), *[num(c, "{:.4f}") for c in extra]]
        lines.append("| " + " | ".join(cells) + " |")
    for note in notes or []:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def cost_quality_plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Speed-up and MACs ratio against PSNR (and alignment), one point per strategy and α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = [k for k in ("psnr", "attribute_accuracy", "clip_score") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(quality), figsize=(5.5 * len(quality), 4.2), squeeze=False)
    methods = sorted({r["method"] for r in rows})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for ax, q in zip(axes[0], quality):
        for r in rows:
            if q not in r or (q == "psnr" and r["method"] == "full"):
                continue
            c = colors[r["method"]]
            ax.scatter(r["macs_ratio"], r[q], color=c, marker="o", label=f"{r['method']} (MACs)")
            ax.scatter(r["speedup"], r[q], color=c, marker="x", label=f"{r['method']} (wall clock)")
            ax.annotate(f"{r['method']} α={r['alpha']:.2g}", (r["macs_ratio"], r[q]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("cost reduction vs full (o: MACs ratio, x: measured speed-up)")
        ax.set_ylabel({"psnr": "PSNR to full model (dB)", "attribute_accuracy": "attribute accuracy",
                       "clip_score": "CLIP score"}[q])
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = {}
    for h, lab in zip(handles, labels):
        seen.setdefault(lab, h)
    fig.legend(seen.values(), seen.keys(), fontsize=7, loc="lower center", ncol=4, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
