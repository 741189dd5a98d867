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
import io
import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from catlab.cli import write_text

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
            try:
                row.update(json.loads((job / "metrics.json").read_text()))
            except ValueError as err:
                row.update(status="failed", error=f"unreadable metrics.json: {err}")
        elif (job / "failed.json").exists():
            row["status"] = "failed"
            try:
                row["error"] = json.loads((job / "failed.json").read_text()).get("error", "")
            except ValueError:
                row["error"] = "unreadable failed.json"
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
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    write_text(sweep_dir / "summary.csv", table.getvalue())
    shown = [k for k in SHOWN if any(k in row for row in rows)]
    split = [row["overrides"].split() for row in rows]
    shared = [o for o in split[0] if all(o in other for other in split)] if split else []
    lines = [
        f"Overrides of every job: `{' '.join(shared)}`" if shared else "",
        "",
        "| job | overrides | status | " + " | ".join(shown) + " |",
        "|---" * (3 + len(shown)) + "|",
    ]
    for row, overrides in zip(rows, split):
        cells = [_cell(row.get(k)) for k in shown]
        status = row["status"] if row["status"] != "failed" else f"failed: {_first_line(row.get('error', ''))}"
        own = " ".join(o for o in overrides if o not in shared)
        lines.append(f"| {row['job']} | `{own}` | {status} | " + " | ".join(cells) + " |")
    write_text(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    return rows


def _first_line(text: str) -> str:
    return (str(text).strip().splitlines() or [""])[0].replace("|", "\\|")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def sweep_size(overrides: list[str]) -> int:
    """How many jobs the command-line sweep ``overrides`` make (the product of each swept key's values)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    total = 1
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            total *= len(list(o.sweep_string_iterator()))
    return total


class SweepSummary(Callback):
    """Reports the sweep's progress as its jobs end; writes its summary when it ends, and says how many failed."""

    progress = None

    def on_multirun_start(self, config, **kwargs) -> None:
        from catlab.progress import Progress

        try:
            total = sweep_size(list(config.hydra.overrides.task))
        except Exception:  # a sweep syntax this count does not know: no progress, the sweep itself goes on
            return
        self.progress = Progress(total, "sweep", "jobs")

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if self.progress is not None:
            self.progress.update(1, " ".join(job_return.overrides or []))

    def on_multirun_end(self, config, **kwargs) -> None:
        if self.progress is not None:
            self.progress.close()
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        rows = write_summary(sweep_dir)
        failed = [r for r in rows if r["status"] == "failed"]
        if failed:
            from catlab.cli import CatlabExit

            raise CatlabExit(
                f"catlab: {len(failed)} of {len(rows)} sweep jobs failed (jobs "
                f"{', '.join(str(r['job']) for r in failed)}); see {sweep_dir / 'summary.md'}"
            )
        print(f"catlab: sweep summary of {len(rows)} jobs -> {sweep_dir / 'summary.md'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """``python -m catlab.sweep DIR``: rebuild and print the summary; exit status 1 when a job failed."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("catlab: usage: python -m catlab.sweep <sweep directory>", file=sys.stderr)
        return 2
    sweep_dir = Path(argv[0])
    if not sweep_dir.is_dir():
        print(f"catlab: no sweep directory {str(sweep_dir)!r}", file=sys.stderr)
        return 2
    try:
        rows = write_summary(sweep_dir)
    except OSError as err:
        from catlab.cli import io_message

        print(io_message(err), file=sys.stderr)
        return 1
    print((sweep_dir / "summary.md").read_text())
    failed = [r for r in rows if r["status"] == "failed"]
    unfinished = [r for r in rows if r["status"] == "unfinished"]
    if failed:
        print(
            f"catlab: {len(failed)} of {len(rows)} sweep jobs failed (jobs {', '.join(str(r['job']) for r in failed)})"
            + (f", {len(unfinished)} unfinished" if unfinished else ""),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
