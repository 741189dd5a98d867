"""Figures that read: point labels never overlap, heat maps carry colour bars, tables say ∞ and footnote bad rows."""

from __future__ import annotations

import itertools
import shutil

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from catlab.evaluation import diagnostics, report  # noqa: E402
from catlab.evaluation.plots import label_boxes, place_labels  # noqa: E402
from catlab.redraw import read_rows, redraw  # noqa: E402
from tests.conftest import ROOT  # noqa: E402


def _no_overlaps(boxes, markers=()):
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    for a in boxes:
        for m in markers:
            assert not a.overlaps(m), (a, m)


def test_labels_of_crowded_and_coincident_points_never_overlap():
    fig, ax = plt.subplots(dpi=120)
    xs = [1.85, 1.85, 1.85, 1.86, 1.85, 1.95, 1.95, 2.0, 2.0, 2.0]
    ys = [34.2, 34.6, 34.6, 34.8, 35.1, 35.0, 34.4, 30.0, 30.0, 30.0]  # 2 and 3 coincide, as do 8, 9 and 10
    ax.scatter(xs, ys)
    ax.margins(0.1)
    annotations = place_labels(ax, xs, ys, [str(i) for i in range(1, 11)])
    texts = [a.get_text() for a in annotations]
    assert "2, 3" in texts and "8, 9, 10" in texts and len(texts) == 7
    pts = ax.transData.transform(list(zip(xs, ys)))
    r = 3.5 * fig.dpi / 72
    from matplotlib.transforms import Bbox

    _no_overlaps(label_boxes(annotations), [Bbox.from_extents(x - r, y - r, x + r, y + r) for x, y in pts])
    plt.close(fig)


def _captured(monkeypatch):
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
    return figures


def test_the_committed_pareto_plot_has_no_overlapping_labels(monkeypatch, tmp_path):
    figures = _captured(monkeypatch)
    rows = read_rows(ROOT / "docs" / "results" / "embedded_head_to_head")
    report.pareto_plot(rows, tmp_path / "pareto.png")
    ax = figures[0].axes[0]
    labels = [t for t in ax.texts]
    numbers = sorted(int(n) for t in labels for n in t.get_text().split(", "))
    assert numbers == list(range(1, len([r for r in rows if r["method"] != "full"]) + 1))  # every point, once
    _no_overlaps(label_boxes(labels))


def _colorbars(fig):
    return [a for a in fig.axes if a.get_label() == "<colorbar>"]


def test_every_heat_map_has_a_colour_bar(monkeypatch, tmp_path):
    figures = _captured(monkeypatch)
    g = torch.Generator().manual_seed(0)
    chosen = {n: [None] * 4 + [torch.randperm(64, generator=g)[:19][None] for _ in range(6)] for n in ("a", "b")}
    diagnostics.selection_maps(chosen, (8, 8), tmp_path / "maps.png", [5, 6, 10])
    diagnostics.cluster_map(torch.randint(0, 5, (64,), generator=g), (8, 8), tmp_path / "clusters.png")
    maps, clusters = figures
    assert len(_colorbars(maps)) == 1  # one bar for every "times recomputed" panel: one scale
    assert len({im.get_clim() for ax in maps.axes for im in ax.images if im.get_cmap().name == "viridis"}) == 1
    assert len(_colorbars(clusters)) == 1


def _rows(n: int, families: int) -> list[dict]:
    """``n`` strategies over ``families`` families, with long labels and points crowded on a few costs."""
    rows = [{"method": "full", "family": "full", "alpha": 1.0, "macs_ratio": 1.0, "psnr": 100.0, "speedup": 1.0}]
    for i in range(n):
        fam = f"family_{i % families}"
        name = f"{fam}[threshold={i / 100:.2f},max_skip_steps={i % 7},reuse=taylor,calibrator=taylorseer]"
        ratio = 1.2 + (i % 12) * 0.25
        rows.append({"method": name, "family": fam, "alpha": 0.3, "macs_ratio": ratio, "speedup": ratio * 0.9,
                     "speedup_min": ratio * 0.8, "speedup_max": ratio, "psnr": 45 - 4 * ratio + (i % 5) * 0.7,
                     "ssim": 0.99 - 0.02 * ratio})  # fmt: skip
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("plot", ["pareto_plot", "cost_quality_plot"])
def test_a_hundred_rows_fit_the_figure_key_and_legend_included(plot, monkeypatch, tmp_path):
    """Every text of the figure (title, key lines, legend, point labels) lies inside it, and labels never overlap."""
    figures = _captured(monkeypatch)
    getattr(report, plot)(_rows(100, 9), tmp_path / "plot.png", "a title that names what ran")
    fig = figures[0]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()  # the figure was closed after saving: draw it again as saved
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox
    texts = [*fig.texts, *(t for ax in fig.axes for t in ax.texts), *(ax.get_legend() for ax in fig.axes)]
    texts = [t for t in texts if t is not None]
    assert len(fig.texts) >= 101  # the title and a key line per strategy
    for t in texts:
        box = t.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, t
    for ax in fig.axes:
        _no_overlaps(label_boxes(list(ax.texts), renderer))


def test_families_get_distinct_colour_and_marker_pairs():
    from catlab.evaluation.plots import PALETTE, family_styles

    styles = family_styles([f"f{i}" for i in range(100)])
    assert len({(s.color, s.marker) for s in styles.values()}) == 100
    assert len({s.color for s in list(styles.values())[: len(PALETTE)]}) == len(PALETTE)


def test_axes_name_their_units_and_render_math(monkeypatch, tmp_path):
    figures = _captured(monkeypatch)
    rows = read_rows(ROOT / "docs" / "results" / "embedded_alpha_sweep")
    report.cost_quality_plot(rows, tmp_path / "cq.png")
    assert "(dB)" in figures[0].axes[0].get_ylabel() and "(×)" in figures[0].axes[0].get_xlabel()
    labels = [t.get_text() for t in figures[0].axes[0].texts]
    assert any("α=0.2" in t for t in labels)  # an α sweep's points say their α
    g = torch.Generator().manual_seed(0)
    outputs = {s: torch.randn(1, 16, 4, generator=g) for s in range(1, 12)}
    diagnostics.noise_correlation(outputs, 7, 8, tmp_path / "corr.png")
    ax = figures[1].axes[0]
    assert ax.get_xlabel().startswith("$\\Vert n_{8} - n_{7}") and "‖" not in ax.get_xlabel()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figures[1]).draw()  # mathtext parses


def test_identical_images_read_infinite_and_low_psnr_rows_carry_a_footnote():
    rows = [
        {"method": "full", "alpha": 1.0, "steps": 4, "macs_per_image": 1e9},
        {"method": "cat", "alpha": 1.0, "steps": 4, "macs_per_image": 1e9, "psnr": 100.0, "ssim": 1.0},
        {"method": "atedm", "alpha": 0.3, "steps": 4, "macs_per_image": 6e8, "psnr": 10.44, "ssim": 0.07},
    ]
    table = report.markdown_table(rows)
    assert "| ∞ (identical) |" in table and "100.00" not in table
    assert "| 10.44 † |" in table and "† PSNR below 20 dB" in table and "docs/metrics.md#psnr-below-20-db" in table
    assert "†" not in report.markdown_table(rows[:2])


@pytest.mark.parametrize(
    "folder",
    sorted(
        p.name
        for p in (ROOT / "docs" / "results").iterdir()
        if (p / "results.csv").exists() and (p / "results.md").exists()
    ),
)
def test_committed_tables_are_what_their_rows_give(folder, tmp_path, monkeypatch):
    """docs/results/*/results.md is redrawn from the results.csv beside it, unchanged (figures are not saved here)."""
    _captured(monkeypatch)
    copy = tmp_path / folder
    shutil.copytree(ROOT / "docs" / "results" / folder, copy)
    redraw(copy)
    assert (copy / "results.md").read_text() == (ROOT / "docs" / "results" / folder / "results.md").read_text()


def test_every_committed_figure_is_shown_with_a_caption_line_under_it():
    import re

    shown = {}
    for page in (ROOT / "docs").rglob("*.md"):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            for target in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", line):
                figure = (page.parent / target).resolve()
                caption = lines[i + 1].strip() if i + 1 < len(lines) else ""
                shown[figure] = shown.get(figure) or (caption.startswith("*") and caption.endswith("*"))
    figures = sorted((ROOT / "docs").rglob("*.png"))
    missing = [str(f.relative_to(ROOT)) for f in figures if not shown.get(f.resolve())]
    assert not missing, f"figures without an image line and a caption under it: {missing}"


def test_a_metric_module_brings_its_own_column(monkeypatch, tmp_path):
    """A metric registered with a :class:`~catlab.metrics.base.Column` shows in the table and the CSV in its
    declared place, with no edit of report.py; without rows measuring it, it stays out."""
    from dataclasses import dataclass

    from catlab.metrics.base import Column, Metric
    from catlab.registry import metrics

    monkeypatch.setattr(metrics, "_entries", dict(metrics._entries))  # registered for this test only

    @metrics.register("sharpness")
    @dataclass
    class Sharpness(Metric):
        column = Column("Sharpness", "{:.1f}", order=15)

    rows = [
        {"method": "full", "alpha": 1.0, "steps": 4, "macs_per_image": 2e9, "psnr": 30.0, "sharpness": 7.25},
        {"method": "cat", "alpha": 0.3, "steps": 4, "macs_per_image": 1e9, "psnr": 25.0, "clip_score": 31.0},
    ]
    table = report.markdown_table(rows).splitlines()
    assert table[0].split(" | ")[-4:] == ["CLIP score", "Sharpness", "PSNR (dB)", "SSIM |"]
    assert table[2].split(" | ")[-3:] == ["7.2", "30.00", "– |"] and table[3].split(" | ")[-3:] == [
        "–",
        "25.00",
        "– |",
    ]
    report.write_csv(rows, tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().splitlines()[
        0
    ] == "method,alpha,steps,macs_per_image,clip_score,sharpness,psnr"
    assert "Sharpness" not in report.markdown_table([{k: v for k, v in r.items() if k != "sharpness"} for r in rows])
