"""Rebuild the tables of an evaluation from its results store alone.

``python -m catlab.evaluation.merge <run dir or store dir>`` rewrites
``results.csv``, ``results.md``, ``cost_quality.png`` and ``pareto.png`` beside the store.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from catlab.evaluation import report
from catlab.evaluation.store import ResultStore


def aggregate(records: list[dict[str, Any]]) -> dict[str, float]:
    """Per-image records → one row of cost and quality means."""
    n = len(records)
    macs = sum(r["macs"] + r["selection_macs"] for r in records)
    full = sum(r["full_macs"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    denoise = sum(r["denoise_seconds"] for r in records)
    row = {
        "num_images": n, "macs_per_image": macs / n, "full_macs_per_image": full / n, "macs_ratio": full / macs,
        "selection_macs_per_image": sum(r["selection_macs"] for r in records) / n,
        "seconds_per_image": seconds / n, "images_per_second": n / seconds,
        "selection_share": sum(r["selection_seconds"] for r in records) / denoise if denoise else 0.0,
        "graphed": all(r.get("graphed", False) for r in records),
    }
    names = sorted({k for r in records for k in r["metrics"]})
    for name in names:
        vals = [r["metrics"][name] for r in records if name in r["metrics"]]
        row[name] = sum(vals) / len(vals)
    return row


def rows_from_store(store: ResultStore, keys: list[str] | None = None,
                    expected: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """One row per strategy (in ``keys`` order, or the store's), full model first, with speed-ups."""
    infos = store.strategies()
    keys = keys or list(infos)
    rows = []
    for key in keys:
        records = store.records(key)
        if not records:
            continue
        info = infos[key]
        row = {"method": info["label"], "family": report.family(info.get("spec") or {"name": info["label"]}),
               "alpha": info["alpha"], "start_step": info["start_step"],
               "steps": info["steps"], "key": key, **aggregate(records)}
        if expected and len(records) != expected.get(key, len(records)):
            row["incomplete"] = f"{len(records)}/{expected[key]}"
        rows.append(row)
    rows.sort(key=lambda r: r["method"] != "full")
    full = next((r for r in rows if r["method"] == "full"), None)
    for r in rows:
        r["speedup"] = full["seconds_per_image"] / r["seconds_per_image"] if full else None
    return rows


def write_tables(rows: list[dict[str, Any]], out: Path, title: str = "", notes: list[str] | None = None) -> None:
    report.write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(report.markdown_table(rows, title, notes))
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    report.cost_quality_plot(rows, out / "cost_quality.png", title)
    report.pareto_plot(rows, out / "pareto.png", title)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="an evaluation run directory, or its store/ folder")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    store_dir = args.path / "store" if (args.path / "store").is_dir() else args.path
    out = store_dir.parent
    rows = rows_from_store(ResultStore(store_dir))
    write_tables(rows, out, args.title)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
