"""Figure helpers shared by the result plots: point labels that never overlap.

Matplotlib puts an annotation where it is told, on top of whatever is there; with
several strategies at the same cost two numbers print as one ("910"). Here every
label is tried at a ring of positions around its point, nearest first, and takes
the first one that covers no other label, no marker and nothing outside the axes;
a label pushed away from its point gets a thin leader line. Points that coincide
on screen share one label ("9, 10").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.text import Text

#: distances from the point (in points, 1/72 inch) and directions tried, nearest first
RADII = (3, 6, 10, 15, 22, 30, 40, 52, 66)
ANGLES = (45, 135, -45, -135, 0, 180, 90, -90, 22, 158, -22, -158, 68, 112, -68, -112)


def merge_coincident(
    ax, xs: Sequence[float], ys: Sequence[float], texts: Sequence[str], within_px: float = 3.0
) -> tuple[list[float], list[float], list[str]]:
    """One label for points that land within ``within_px`` pixels of each other: their texts joined by ", "."""
    pts = ax.transData.transform(np.column_stack([xs, ys]))
    groups: list[list[int]] = []
    for i, p in enumerate(pts):
        for g in groups:
            if np.hypot(*(pts[g[0]] - p)) <= within_px:
                g.append(i)
                break
        else:
            groups.append([i])
    return ([xs[g[0]] for g in groups], [ys[g[0]] for g in groups], [", ".join(texts[i] for i in g) for g in groups])


def place_labels(
    ax,
    xs: Sequence[float],
    ys: Sequence[float],
    texts: Sequence[str],
    fontsize: float = 7,
    marker_pt: float = 3.5,
    avoid: Sequence = (),
) -> list:
    """Annotate each point (data coordinates) with its text, with no two labels and no label and marker overlapping.

    Call after the layout is final (``tight_layout`` moves the axes); ``avoid``: artists
    (a legend) that labels must not cover either. Returns the annotations. When no position in
    the rings is free (a very crowded plot), the least-covered one is used.
    """
    fig = ax.figure
    fig.canvas.draw()  # fixes the limits and the transforms
    renderer = fig.canvas.get_renderer()
    xs, ys, texts = merge_coincident(ax, list(xs), list(ys), list(texts))
    px_per_pt = fig.dpi / 72
    pts = ax.transData.transform(np.column_stack([xs, ys]))
    r = marker_pt * px_per_pt
    markers = [(x - r, y - r, x + r, y + r) for x, y in pts]
    markers += [tuple(a.get_window_extent(renderer).extents) for a in avoid]
    frame = ax.get_window_extent(renderer)
    placed: list[tuple[float, float, float, float]] = []
    annotations = []
    for (_x, _y), xd, yd, text in zip(pts, xs, ys, texts):
        best, best_cover = None, math.inf
        for radius in RADII:
            for angle in ANGLES:
                dx, dy = radius * math.cos(math.radians(angle)), radius * math.sin(math.radians(angle))
                ann = ax.annotate(
                    text,
                    (xd, yd),
                    xytext=(dx, dy),
                    textcoords="offset points",
                    fontsize=fontsize,
                    ha="left" if dx > 1e-6 else "right" if dx < -1e-6 else "center",
                    va="bottom" if dy > 1e-6 else "top" if dy < -1e-6 else "center",
                )
                ann.update_positions(renderer)
                e = Text.get_window_extent(ann, renderer)  # the text alone, not its leader line
                box = (e.x0 - 1, e.y0 - 1, e.x1 + 1, e.y1 + 1)
                inside = frame.x0 <= box[0] and box[2] <= frame.x1 and frame.y0 <= box[1] and box[3] <= frame.y1
                cover = sum(_overlap(box, other) for other in placed + markers) + (0 if inside else 1e6)
                if cover < best_cover:
                    if best is not None:
                        best[0].remove()
                    best, best_cover = (ann, box, radius), cover
                else:
                    ann.remove()
                if best_cover == 0:
                    break
            if best_cover == 0:
                break
        ann, box, radius = best
        if radius > RADII[2]:  # far from its point: a leader line says whose label it is
            ann.remove()
            ann = ax.annotate(
                text,
                (xd, yd),
                xytext=ann.xyann,
                textcoords="offset points",
                fontsize=fontsize,
                ha=ann.get_ha(),
                va=ann.get_va(),
                arrowprops=dict(arrowstyle="-", lw=0.5, color="0.45", shrinkA=0, shrinkB=2),
            )
        placed.append(box)
        annotations.append(ann)
    return annotations


def label_boxes(annotations: list, renderer=None) -> list:
    """The drawn extents of annotations' texts (for checking that none overlap)."""
    if not annotations:
        return []
    fig = annotations[0].axes.figure
    if renderer is None:
        if not hasattr(fig.canvas, "get_renderer"):  # a closed pyplot figure: draw it on a fresh Agg canvas
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            FigureCanvasAgg(fig)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
    for a in annotations:
        a.update_positions(renderer)
    return [Text.get_window_extent(a, renderer) for a in annotations]


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0
