"""Figure helpers shared by the result plots: a style per family, a key that never clips, labels that never overlap.

A figure with dozens of strategies cannot name them beside their points, nor in a
legend drawn over the axes. Here points carry short numbers, and :func:`keyed_figure`
lays the figure out in inches: the plot panels on top with the family legend beside
them, outside the axes, and the numbered key below in as many columns as fit, the
figure made as tall as the key needs, so no key line is ever cut. Families get a
colour from a colour-blind-safe palette and a marker of their own (:func:`family_styles`).

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
from dataclasses import dataclass

import numpy as np
from matplotlib.text import Text

#: distinct hues that stay apart for colour-blind readers (Okabe–Ito, then Paul Tol's muted set and a few
#: more), none grey or near black (the overall front is black) and no yellow on white
PALETTE = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#332288",
    "#882255",
    "#117733",
    "#AA4499",
    "#999933",
    "#44AA99",
    "#CC6677",
    "#8C564B",
    "#6A3D9A",
    "#B8860B",
)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*", "d", "H", "8", "x")

#: distances from the point (in points, 1/72 inch) and directions tried, nearest first
RADII = (3, 6, 10, 15, 22, 30, 40, 52, 66)
ANGLES = (45, 135, -45, -135, 0, 180, 90, -90, 22, 158, -22, -158, 68, 112, -68, -112)


@dataclass(frozen=True)
class Style:
    """How one family is drawn: its colour and its marker."""

    color: str
    marker: str


def family_styles(families: Sequence[str]) -> dict[str, Style]:
    """A colour and a marker per family, in order; past the palette the markers keep pairs distinct."""
    n = len(PALETTE)
    return {f: Style(PALETTE[i % n], MARKERS[(i + i // n) % len(MARKERS)]) for i, f in enumerate(families)}


#: the layout of :func:`keyed_figure`, in inches (``CHAR``: a monospace character's width per point of font size)
PANEL, MARGIN, CHAR, LINE = (6.4, 4.6), dict(left=0.9, right=0.25, top=0.75, gap=0.9, below=0.75), 0.62 / 72, 1.45 / 72
#: key lines per column before the key takes another column (widening the figure, up to ``MAX_WIDTH`` inches)
KEY_LINES, MAX_WIDTH = 38, 19.0


def keyed_figure(panels: int, key: Sequence[tuple[str, str]], legend: Sequence[str] = (), fontsize: float = 7.0):
    """A figure of ``panels`` plot axes (two per row), room for a legend of ``legend`` names to the right of the
    first row, and the numbered ``key`` (``(text, colour)`` lines) below, drawn here. Returns ``(fig, axes)``.

    Every size is computed from the texts, so the key and legend fit whatever their length and count; a long
    key takes several columns and widens the panels with it.
    """
    import matplotlib.pyplot as plt

    pw, ph = PANEL
    across, down = min(2, panels), -(-panels // 2)
    legend_w = (max((len(t) for t in legend), default=0) * 8 * CHAR + 0.9) if legend else 0.0
    fixed = MARGIN["left"] + (across - 1) * MARGIN["gap"] + legend_w + MARGIN["right"]
    col_w = max((len(t) for t, _ in key), default=0) * fontsize * CHAR + 0.3
    cols = max(1, min(-(-len(key) // KEY_LINES), int((MAX_WIDTH - 0.4) // col_w))) if key else 1
    width = max(fixed + across * pw, cols * col_w + 0.4)
    pw = (width - fixed) / across
    cols = max(cols, int((width - 0.4) // col_w)) if key else 1
    per_col = -(-len(key) // cols)
    key_h = per_col * fontsize * LINE + 0.35 if key else 0.0
    row_h = ph + MARGIN["below"] + (MARGIN["top"] - 0.35)
    height = 0.35 + down * row_h + key_h
    fig = plt.figure(figsize=(width, height), dpi=120)
    axes = []
    for i in range(panels):
        r, c = divmod(i, across)
        left = MARGIN["left"] + c * (pw + MARGIN["gap"])
        bottom = height - MARGIN["top"] - ph - r * row_h
        axes.append(fig.add_axes((left / width, bottom / height, pw / width, ph / height)))
    line = fontsize * LINE / height
    for i, (text, color) in enumerate(key):
        c, r = divmod(i, per_col)
        fig.text(
            (0.2 + c * col_w) / width,
            (key_h - 0.15) / height - r * line,
            text,
            color=color,
            family="monospace",
            fontsize=fontsize,
            va="top",
        )
    return fig, axes


def outside_legend(ax, handles: list, title: str | None = None):
    """The legend right of ``ax`` (the last of the first row), outside it (room left by :func:`keyed_figure`)."""
    return ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, title=title, title_fontsize=8
    )


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
    points: Sequence[tuple[float, float]] = (),
) -> list:
    """Annotate each point (data coordinates) with its text, with no two labels and no label and marker overlapping.

    Call after the layout is final (``tight_layout`` moves the axes); ``avoid``: artists
    (a legend) that labels must not cover either; ``points``: other markers (data coordinates) to keep clear of.
    Returns the annotations. When no position in
    the rings is free (a very crowded plot), the least-covered one is used.
    """
    fig = ax.figure
    fig.canvas.draw()  # fixes the limits and the transforms
    renderer = fig.canvas.get_renderer()
    xs, ys, texts = merge_coincident(ax, list(xs), list(ys), list(texts))
    px_per_pt = fig.dpi / 72
    pts = ax.transData.transform(np.column_stack([xs, ys]))
    r = marker_pt * px_per_pt
    others = ax.transData.transform(np.array(points, dtype=float).reshape(-1, 2))
    markers = [(x - r, y - r, x + r, y + r) for x, y in [*pts, *others]]
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
