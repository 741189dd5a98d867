"""Rebuild the tables of an evaluation from its results store and its manifest.

``python -m catlab.evaluation.merge <run dir or its store/>`` rewrites
``results.csv``, ``results.md``, ``cost_quality.png`` and ``pareto.png`` in the run
directory. The run directory's ``evaluation.json`` (written by ``catlab.evaluate``
before it computes anything) lists the strategies and the batches of jobs; only
the records of those jobs enter the table, every one validated on read, and the
records of other configurations in the same store are counted and left out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from catlab.evaluation import report
from catlab.evaluation.store import ResultStore, record_name

MANIFEST = "evaluation.json"


def aggregate(records: list[dict[str, Any]]) -> dict[str, float]:
    """Per-image records → one row of cost and quality means."""
    n = len(records)
    macs = sum(r["macs"] + r["selection_macs"] for r in records)
    full = sum(r["full_macs"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    denoise = sum(r["denoise_seconds"] for r in records)
    row = {
        "num_images": n,
        "macs_per_image": macs / n,
        "full_macs_per_image": full / n,
        "macs_ratio": full / macs,
        "selection_macs_per_image": sum(r["selection_macs"] for r in records) / n,
        "seconds_per_image": seconds / n,
        "images_per_second": n / seconds,
        "selection_share": sum(r["selection_seconds"] for r in records) / denoise if denoise else 0.0,
        "graphed": all(r.get("graphed", False) for r in records),
    }
    names = sorted({k for r in records for k in r["metrics"]})
    for name in names:
        vals = [r["metrics"][name] for r in records if name in r["metrics"]]
        row[name] = sum(vals) / len(vals)
    return row


def manifest(
    strategies: list[dict[str, Any]], batches: list, store: Path, out: Path, notes: list[str]
) -> dict[str, Any]:
    """What :func:`rows_from_store` needs to rebuild a table: strategies in order (the full model first), the
    batches (``Batch.describe()`` of each, by id) and the store's path (relative to ``out`` when inside it)."""
    store, out = Path(store).resolve(), Path(out).resolve()
    where = os.path.relpath(store, out) if store.is_relative_to(out) else str(store)
    return {"strategies": strategies, "batches": {b.id: b.describe() for b in batches}, "store": where, "notes": notes}


def write_manifest(out: Path, data: dict[str, Any]) -> None:
    tmp = out / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)


def rows_from_store(
    store: ResultStore, plan: dict[str, Any], then: str = "it will be recomputed"
) -> tuple[list[dict[str, Any]], list[str]]:
    """(one row per strategy of ``plan``, full model first, with speed-ups; the notes the table needs).

    A row averages the valid records of the plan's jobs only. Its speed-up is the full
    model's wall clock over the strategy's on the batches both were timed on by one
    process (pairs from several processes pool; no ratio ever spans two processes);
    without such a pair it is ``None`` and a note says why.
    """
    names = [record_name(pid, seed, bid) for bid, items in plan["batches"].items() for pid, _, seed in items]
    batch_ids = set(plan["batches"])
    rows, used = [], 0
    full_key = plan["strategies"][0]["key"]
    full_times = store.timings(full_key)
    unpaired = []
    for info in plan["strategies"]:
        key = info["key"]
        records = [r for r in (store.load(key, n, then) for n in names) if r is not None]
        used += len(records)
        if not records:
            continue
        row = {
            "method": info["label"],
            "family": report.family(info.get("spec") or {"name": info["label"]}),
            "alpha": info["alpha"],
            "start_step": info["start_step"],
            "steps": info["steps"],
            "key": key,
            **aggregate(records),
        }
        if len(records) != len(names):
            row["incomplete"] = f"{len(records)}/{len(names)}"
        if key == full_key:
            row["speedup"] = 1.0
        else:
            mine = store.timings(key)
            pairs = [bp for bp in mine if bp[0] in batch_ids and bp in full_times]
            row["speedup_batches"] = len(pairs)
            if pairs:
                row["speedup"] = sum(full_times[bp] for bp in pairs) / sum(mine[bp] for bp in pairs)
                ratios = [full_times[bp] / mine[bp] for bp in pairs]  # its spread across batches
                row["speedup_min"], row["speedup_max"] = min(ratios), max(ratios)
            else:
                row["speedup"] = None
                unpaired.append(info["label"])
        rows.append(row)
    notes = []
    if unpaired:
        notes.append(
            f"Speed-up –: {', '.join(unpaired)}: no batch was timed beside the full model in one process "
            "(retime_batches=0); rerun with retime_batches ≥ 1 to time some."
        )
    foreign = len(store.record_files()) - used
    if foreign > 0:
        notes.append(
            f"{foreign} records from another configuration ignored (other prompts, seeds, batches or "
            "settings in the same store)."
        )
    return rows, notes


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
    out = args.path if (args.path / MANIFEST).exists() or args.path.name != "store" else args.path.parent
    try:
        plan = json.loads((out / MANIFEST).read_text())
        store_dir = out / plan["store"]
        if not store_dir.is_dir():
            raise FileNotFoundError(f"its store {store_dir} is missing")
    except (OSError, ValueError, KeyError, TypeError) as err:
        sys.exit(
            f"catlab: cannot merge {args.path}: no readable {MANIFEST} and store ({err.__class__.__name__}: "
            f"{err}); rerun catlab.evaluate with hydra.run.dir={out} to rebuild it"
        )
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    rows, notes = rows_from_store(ResultStore(store_dir), plan, "rerun the evaluation to recompute it")
    write_tables(rows, out, args.title or str(plan.get("title", "")), [*plan.get("notes", []), *notes])
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
