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

import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from catlab.fileio import CatlabExit, io_message, write_text
from catlab.progress import Progress

#: metrics shown in the markdown table, in this order, when any job has them
SHOWN = ("macs_ratio", "seconds_per_image", "selection_share", "psnr", "ssim", "attribute_accuracy", "clip_score")


def is_sweep(sweep_dir: Path) -> bool:
    """A folder Hydra made for a multirun: its ``multirun.yaml``, or numbered job folders with a ``.hydra/``."""
    return (sweep_dir / "multirun.yaml").is_file() or any(
        p.name.isdigit() and (p / ".hydra").is_dir() for p in sweep_dir.iterdir()
    )


def expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """The overrides of every job the sweep launches, expanded from ``multirun.yaml`` as Hydra's basic sweeper
    does (job ``i`` is the ``i``-th); None where they cannot be known (another sweeper, an unreadable file)."""
    try:
        conf = OmegaConf.load(sweep_dir / "multirun.yaml")
        if not str(OmegaConf.select(conf, "hydra.sweeper._target_", default="")).endswith("BasicSweeper"):
            return None
        params = OmegaConf.select(conf, "hydra.sweeper.params", default=None) or {}
        task = OmegaConf.select(conf, "hydra.overrides.task", default=None) or []
        args = [f"{k}={v}" for k, v in params.items()] + [str(a) for a in task]
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
        return [job for batch in batches for job in batch]
    except Exception:  # noqa: BLE001 (a file that is not Hydra's: the job folders alone say what ran)
        return None


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job: overrides, status (done, failed, unfinished, or missing: never started) and flat metrics.

    The jobs are the numbered folders Hydra made and, where ``multirun.yaml`` says
    how many were launched, those that never made theirs (a killed sweep).
    """
    folders = {int(p.name): p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()}
    expected = expected_jobs(sweep_dir)
    count = max([len(expected or []), *(i + 1 for i in folders)], default=0)
    rows = []
    for i in range(count):
        planned = expected[i] if expected is not None and i < len(expected) else None
        if i not in folders:
            if planned is not None or i < max(folders, default=-1):  # a gap: a job that never ran
                rows.append({"job": i, "overrides": " ".join(planned or []), "status": "missing"})
            continue
        rows.append(_row(i, folders[i], planned))
    return rows


def _row(i: int, job: Path, planned: list[str] | None) -> dict[str, Any]:
    overrides = _overrides(job / ".hydra" / "overrides.yaml")
    if overrides is None:
        overrides = planned or []
    row: dict[str, Any] = {"job": i, "overrides": " ".join(overrides)}
    if (job / "metrics.json").exists():
        metrics = _json_object(job / "metrics.json")
        if isinstance(metrics, str):
            row.update(status="failed", error=f"unreadable metrics.json: {metrics}")
        else:
            row.update({k: v for k, v in metrics.items() if k not in ("job", "overrides", "status", "error")})
            row["status"] = "done"
    elif (job / "failed.json").exists():
        record = _json_object(job / "failed.json")
        error = record.get("error") if isinstance(record, dict) else None
        row.update(status="failed", error=str(error) if error else f"unreadable failed.json: {record}")
    else:
        row["status"] = "unfinished"
    return row


def _json_object(path: Path) -> dict | str:
    """A JSON file's object, or what is wrong with it (not JSON, not an object, unreadable)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return value if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"


def _overrides(path: Path) -> list[str] | None:
    """A job's overrides (a YAML list of strings); None where the file is missing or not such a list."""
    try:
        value = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if value is None:
        return []
    return [str(o) for o in value] if isinstance(value, list) else None


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
        "| " + " | ".join(["job", "overrides", "status", *shown]) + " |",
        "|---" * (3 + len(shown)) + "|",
    ]
    for row, overrides in zip(rows, split):
        cells = [_cell(row.get(k)) for k in shown]
        status = row["status"] if row["status"] != "failed" else f"failed: {_first_line(row.get('error', ''))}"
        own = " ".join(o for o in overrides if o not in shared)
        lines.append("| " + " | ".join([str(row["job"]), f"`{own}`", status, *cells]) + " |")
    write_text(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    return rows


def _first_line(text: str) -> str:
    return (str(text).strip().splitlines() or [""])[0].replace("|", "\\|")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def verdict(rows: list[dict[str, Any]], sweep_dir: Path) -> str | None:
    """The line for a sweep whose jobs did not all finish, each kind listed
    (``catlab: 1 of 3 sweep jobs failed (jobs 0); 1 never ran (jobs 2); see ...``); None: all done."""
    parts = []
    for status, words in (("failed", "failed"), ("missing", "never ran"), ("unfinished", "unfinished")):
        jobs = [str(r["job"]) for r in rows if r["status"] == status]
        if jobs:
            parts.append(f"{len(jobs)}{{of}} {words} (jobs {', '.join(jobs)})")
    if not parts:
        return None
    parts[0] = parts[0].replace("{of}", f" of {len(rows)} sweep jobs")
    return "catlab: " + "; ".join(part.replace("{of}", "") for part in parts) + f"; see {sweep_dir / 'summary.md'}"


def summarise_aborted(sweep_dir: Path, reason: str) -> str:
    """The one line for a sweep that stopped early (a killed worker): the summary of what finished, written."""
    try:
        rows = write_summary(sweep_dir)
    except OSError as err:
        return f"catlab: {reason}; {io_message(err).removeprefix('catlab: ')}"
    done = sum(r["status"] == "done" for r in rows)
    return f"catlab: {reason}; {done} of {len(rows)} jobs done, see {sweep_dir / 'summary.md'}"


def sweep_size(overrides: list[str]) -> int:
    """How many jobs the command-line sweep ``overrides`` make, expanded as Hydra's basic sweeper does."""
    return sum(
        len(batch) for batch in BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
    )


class SweepSummary(Callback):
    """Reports the sweep's progress as its jobs end; writes its summary when it ends, and says which jobs did not
    finish."""

    progress = None

    def __getstate__(self) -> dict:
        # Hydra's process launchers send the callbacks to their workers: the progress (a thread and its lock)
        # stays with the sweep's own process
        return {k: v for k, v in self.__dict__.items() if k != "progress"}

    def on_multirun_start(self, config, **kwargs) -> None:
        try:
            total = sweep_size(list(config.hydra.overrides.task))
        except Exception:  # a sweep syntax this count does not know: no progress, the sweep itself goes on
            return
        self.progress = Progress(total, "sweep", "jobs")

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if self.progress is not None:
            self.progress.update(1, " ".join(job_return.overrides or []))

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir) if sweep_dir.exists() else None
        if self.progress is not None:
            if rows is not None:  # under a process launcher the jobs end in its workers: count them here
                ended = sum(r["status"] in ("done", "failed") for r in rows)
                self.progress.update(max(0, ended - self.progress.done))
            self.progress.close()
        if rows is None:
            return
        line = verdict(rows, sweep_dir)
        if line is not None:
            raise CatlabExit(line)
        print(f"catlab: sweep summary of {len(rows)} jobs -> {sweep_dir / 'summary.md'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """``python -m catlab.sweep DIR``: rebuild and print the summary; exit status 1 unless every job is done.

    A folder that is not a sweep is refused (status 2) and nothing is written into it.
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("catlab: usage: python -m catlab.sweep <sweep directory>", file=sys.stderr)
        return 2
    sweep_dir = Path(argv[0])
    if not sweep_dir.is_dir():
        print(f"catlab: no sweep directory {str(sweep_dir)!r}", file=sys.stderr)
        return 2
    if not is_sweep(sweep_dir):
        print(
            f"catlab: {str(sweep_dir)!r} is not a sweep folder (no multirun.yaml, no numbered job folders with "
            ".hydra/); nothing written",
            file=sys.stderr,
        )
        return 2
    try:
        rows = write_summary(sweep_dir)
    except OSError as err:
        print(io_message(err, sweep_dir), file=sys.stderr)
        return 1
    print((sweep_dir / "summary.md").read_text())
    line = verdict(rows, sweep_dir)
    if line is not None:
        print(line, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
