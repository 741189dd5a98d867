"""Rebuild the tables of an evaluation from its results store and its manifest.

``python -m catlab.evaluation.merge <run dir or its store/>`` rewrites
``results.csv``, ``results.md``, ``cost_quality.png`` and ``pareto.png`` in the run
directory. The run directory's ``evaluation.json`` (written by ``catlab.evaluate``
before it computes anything) lists the strategies and the batches of jobs; only
the records of those jobs enter the table, every one validated on read, and the
records of other configurations in the same store are counted and left out.

``evaluation.json`` is data, not an instruction: its store must lie inside the
run directory (a store kept elsewhere is named on the command line with
``--store``), its strategy keys and batch ids must be hashes, and its jobs
numbers, so no file outside the run directory and its store is read, moved or
deleted because of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from catlab.evaluation import paired, report
from catlab.evaluation.paired import PER_IMAGE
from catlab.evaluation.store import HASH, BadRecord, ResultStore, atomic_write_bytes, read_json, record_name

MANIFEST = "evaluation.json"
#: what an evaluation writes beside its manifest (a rerun removes the old ones first: a failed rerun leaves none)
TABLES = ("results.csv", "results.md", "results.json", "cost_quality.png", "pareto.png")


def aggregate(records: list[dict[str, Any]], metrics: list[str] | None = None) -> dict[str, float]:
    """Per-image records → one row of cost and quality means (of ``metrics``, default: those every record has)."""
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
    names = metrics if metrics is not None else sorted(set.intersection(*(set(r["metrics"]) for r in records)))
    for name in names:
        row[name] = sum(r["metrics"][name] for r in records) / n
    return row


def check_plan(plan: Any) -> None:
    """Raise ``ValueError`` unless ``plan`` is a manifest whose keys and ids are hashes and whose jobs are numbers."""
    if not isinstance(plan, dict) or not isinstance(plan.get("strategies"), list) or not plan["strategies"]:
        raise ValueError("no list of strategies")
    for info in plan["strategies"]:
        if not isinstance(info, dict) or not HASH.fullmatch(str(info.get("key"))):
            raise ValueError(f"a strategy key that is not a hash: {str(info)[:80]!r}")
        names = info.get("metrics", [])
        if not isinstance(names, list) or not all(isinstance(m, str) for m in names):
            raise ValueError(f"metrics of {info['key']} that are not a list of names")
        kinds = {"label": str, "alpha": (int, float), "start_step": int, "steps": int, "spec": (dict, type(None))}
        for field, kind in kinds.items():
            value = info.get(field)
            if not isinstance(value, kind) or isinstance(value, bool) or value != value:
                raise ValueError(f"strategy {info['key']}: its {field} is not a {getattr(kind, '__name__', 'number')}")
    if not isinstance(plan.get("notes", []), list) or not all(isinstance(n, str) for n in plan.get("notes", [])):
        raise ValueError("notes that are not a list of lines")
    if not isinstance(plan.get("batches"), dict):
        raise ValueError("no batches")
    for bid, items in plan["batches"].items():
        if not HASH.fullmatch(bid) or not isinstance(items, list):
            raise ValueError(f"a batch id that is not a hash: {bid[:80]!r}")
        for item in items:
            if not (isinstance(item, list) and len(item) == 3 and all(type(item[i]) is int for i in (0, 2))):
                raise ValueError(f"a job of batch {bid} that is not [prompt id, prompt hash, seed]")


def manifest(
    strategies: list[dict[str, Any]], batches: list, store: Path, out: Path, notes: list[str]
) -> dict[str, Any]:
    """What :func:`rows_from_store` needs to rebuild a table: strategies in order (the full model first), the
    batches (``Batch.describe()`` of each, by id) and the store's path (relative to ``out`` when inside it)."""
    store, out = Path(store).resolve(), Path(out).resolve()
    where = os.path.relpath(store, out) if store.is_relative_to(out) else str(store)
    return {"strategies": strategies, "batches": {b.id: b.describe() for b in batches}, "store": where, "notes": notes}


def write_manifest(out: Path, data: dict[str, Any]) -> None:
    """Write ``evaluation.json``; the tables of an earlier evaluation in ``out`` go first (they state other jobs)."""
    if (out / MANIFEST).is_file():
        for name in TABLES:
            if (out / name).is_file() and not (out / name).is_symlink():
                (out / name).unlink()
    atomic_write_bytes(out / MANIFEST, (json.dumps(data, indent=1) + "\n").encode())


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
    lacking = {}
    for info in plan["strategies"]:
        key, needs = info["key"], info.get("metrics")
        records = [r for r in (store.load(key, n, then) for n in names) if r is not None]
        used += len(records)
        if needs is not None:  # a record made with another metrics list is not averaged over fewer images
            short = [r for r in records if not set(needs) <= r["metrics"].keys()]
            if short:
                lacking[info["label"]] = sorted(set(needs) - set.intersection(*(set(r["metrics"]) for r in short)))
                records = [r for r in records if r not in short]
        if not records:
            continue
        row = {
            "method": info["label"],
            "family": report.family(info.get("spec") or {"name": info["label"]}),
            "alpha": info["alpha"],
            "start_step": info["start_step"],
            "steps": info["steps"],
            "key": key,
            **aggregate(records, needs),
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
    if lacking:
        notes.append(
            "Records without a metric of this table left out: "
            + "; ".join(f"{label} (lack {', '.join(m)})" for label, m in lacking.items())
            + "; rerun the evaluation to compute them."
        )
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


def write_tables(
    rows: list[dict[str, Any]],
    out: Path,
    title: str = "",
    notes: list[str] | None = None,
    per_image: dict | None = None,
) -> None:
    """Each table and figure whole or not at all; ``per_image`` (each strategy's per-image values) as
    ``per_image.json``, which the frontier's paired intervals are read from."""
    if per_image is not None:
        atomic_write_bytes(out / PER_IMAGE, (json.dumps(paired.to_json(per_image)) + "\n").encode())
    atomic_write_bytes(out / "results.csv", write=lambda tmp: report.write_csv(rows, tmp))
    atomic_write_bytes(out / "results.md", report.markdown_table(rows, title, notes).encode())
    atomic_write_bytes(out / "results.json", (json.dumps(rows, indent=2) + "\n").encode())
    for name, plot in (("cost_quality.png", report.cost_quality_plot), ("pareto.png", report.pareto_plot)):
        atomic_write_bytes(out / name, write=lambda tmp, plot=plot: _figure(plot, rows, tmp, title))


def _figure(plot, rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """A figure into a file whose name does not say PNG (a temporary one): through a file object."""
    with open(path, "wb") as f:
        plot(rows, f, title)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="an evaluation run directory, or its store/ folder")
    parser.add_argument("--title", default="")
    parser.add_argument("--store", type=Path, help="the results store, when the evaluation kept it elsewhere")
    args = parser.parse_args(argv)
    out = args.path if (args.path / MANIFEST).exists() or args.path.name != "store" else args.path.parent
    try:
        plan = read_json(out / MANIFEST, 1 << 28)
        check_plan(plan)
        store_dir = args.store if args.store is not None else inside(out, plan.get("store"))
        if not store_dir.is_dir():
            raise FileNotFoundError(f"its store {store_dir} is missing")
    except (OSError, ValueError) as err:
        reason = str(err) if isinstance(err, BadRecord) else f"{err.__class__.__name__}: {err}"
        sys.exit(
            f"catlab: cannot merge {args.path}: no readable {MANIFEST} and store ({reason}); "
            f"rerun catlab.evaluate with hydra.run.dir={out} to rebuild it"
        )
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    store = ResultStore(store_dir)
    rows, notes = rows_from_store(store, plan, "rerun the evaluation to recompute it")
    title, notes = args.title or str(plan.get("title", "")), [*plan.get("notes", []), *notes]
    write_tables(rows, out, title, notes, paired.per_image_values(store, plan))
    print((out / "results.md").read_text())


def inside(out: Path, where: Any) -> Path:
    """The store a manifest names, refused (``ValueError``) unless it lies inside the run directory ``out``."""
    if not isinstance(where, str) or not where:
        raise ValueError("it names no store")
    path = out / where
    if Path(where).is_absolute() or out.resolve() not in [path.resolve(), *path.resolve().parents]:
        raise ValueError(
            f"it names the store {where[:200]!r}, outside the run folder (name a store kept elsewhere with --store)"
        )
    return path


if __name__ == "__main__":
    main()
