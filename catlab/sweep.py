"""One table across the jobs of a sweep: ``python -m catlab.run -m ...`` ends with ``summary.csv`` and ``summary.md``.

A Hydra callback (configured in ``conf/config.yaml``) reads each job directory
of the sweep when the sweep ends: the overrides that made the job
(``.hydra/overrides.yaml``), its ``metrics.json`` or its ``failed.json``. Jobs are
named by their overrides, not only by their number, and a failed job is a row
that says so, never a missing one. The same summary can be rebuilt at any time
(for example while a SLURM array is still running)::

    python -m catlab.sweep multirun/2026-11-27/10-00-00
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

#: metrics shown in the markdown table, in this order, when any job has them
SHOWN = ("macs_ratio", "seconds_per_image", "selection_share", "psnr", "ssim", "attribute_accuracy", "clip_score")


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory (numbered, as Hydra names them): overrides, status and flat metrics."""
    rows = []
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    for job in jobs:
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = _overrides(overrides_file) if overrides_file.exists() else []
        row: dict[str, Any] = {"job": int(job.name), "overrides": " ".join(overrides)}
        if (job / "metrics.json").exists():
            row["status"] = "done"
            row.update(json.loads((job / "metrics.json").read_text()))
        elif (job / "failed.json").exists():
            row["status"] = "failed"
            row["error"] = json.loads((job / "failed.json").read_text()).get("error", "")
        else:
            row["status"] = "unfinished"
        rows.append(row)
    return rows


def _overrides(path: Path) -> list[str]:
    import yaml

    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])]


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write ``summary.csv`` (every key of every job) and ``summary.md`` (the main columns) into ``sweep_dir``."""
    rows = job_rows(sweep_dir)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    shown = [k for k in SHOWN if any(k in row for row in rows)]
    split = [row["overrides"].split() for row in rows]
    shared = [o for o in split[0] if all(o in other for other in split)] if split else []
    lines = [f"Overrides of every job: `{' '.join(shared)}`" if shared else "", "",
             "| job | overrides | status | " + " | ".join(shown) + " |", "|---" * (3 + len(shown)) + "|"]
    for row, overrides in zip(rows, split):
        cells = [_cell(row.get(k)) for k in shown]
        status = row["status"] if row["status"] != "failed" else f"failed: {row.get('error', '')}"
        own = " ".join(o for o in overrides if o not in shared)
        lines.append(f"| {row['job']} | `{own}` | {status} | " + " | ".join(cells) + " |")
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


class SweepSummary(Callback):
    """Writes the sweep's summary when a multirun ends, and says how many jobs failed."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        rows = write_summary(sweep_dir)
        failed = [r for r in rows if r["status"] == "failed"]
        print(f"catlab: sweep summary of {len(rows)} jobs -> {sweep_dir / 'summary.md'}", file=sys.stderr)
        if failed:
            raise SystemExit(f"catlab: {len(failed)} of {len(rows)} sweep jobs failed (jobs "
                             f"{', '.join(str(r['job']) for r in failed)}); see {sweep_dir / 'summary.md'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m catlab.sweep <sweep directory>")
    write_summary(Path(sys.argv[1]))
    print((Path(sys.argv[1]) / "summary.md").read_text())
