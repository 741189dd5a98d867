"""Redraw an evaluation's table and figures from what it wrote, without evaluating again.

``python -m catlab.redraw <folder>`` reads ``results.csv`` (the committed
result folders under ``docs/results/`` keep it) and rewrites ``results.md`` (its title
and notes kept) and the cost figures it holds (``cost_quality.png``, ``pareto.png``, and the quality frontier's
``frontier_psnr.png`` / ``frontier_ssim.png``, each strategy's spec read back from its label). With ``--diagnostics
<overrides>`` it also regenerates the
diagnostic figures (selection maps, cluster maps, the relative-noise correlation,
the full model's samples), which need the selections themselves: it composes the
evaluation's config from the overrides and runs only its warm-up batch (the first
``batch_size`` images, each strategy once), as ``catlab.evaluate`` does before
timing, so the figures are the ones the evaluation drew::

    python -m catlab.redraw docs/results/embedded_table2 --diagnostics experiment=embedded_table2
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir

from catlab.builders import build_model, set_threads
from catlab.cli import quiet_libraries
from catlab.evaluate import prepare, write_diagnostics
from catlab.evaluation import frontier, report
from catlab.evaluation.harness import EvaluatedStrategy, make_jobs
from catlab.evaluation.recorder import RecordingPolicy
from catlab.sampler import calibrate, sample

#: lines of a results.md that the table writer adds itself (rewritten, not kept as notes)
GENERATED = ("† PSNR below", "Rows marked (eager)", "Speed-up: summed full-model time")
FIGURES = ("cost_quality.png", "pareto.png")


def read_rows(folder: Path) -> list[dict[str, Any]]:
    """The rows of ``results.json``, else of ``results.csv`` with numbers and booleans typed back."""
    if (folder / "results.json").exists():
        return json.loads((folder / "results.json").read_text())
    rows = []
    with open(folder / "results.csv", newline="") as f:
        for raw in csv.DictReader(f):
            rows.append({k: _typed(v) for k, v in raw.items() if v != ""})
    return rows


def _typed(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    try:
        return float(text) if any(c in text for c in ".eEn") else int(text)
    except ValueError:
        return text


def title_and_notes(markdown: str) -> tuple[str, list[str]]:
    """The ``### title`` and the paragraphs after the table of a results.md made by :func:`report.markdown_table`."""
    lines = markdown.splitlines()
    title = lines[0][4:].strip() if lines and lines[0].startswith("### ") else ""
    after = [line for line in lines if not line.startswith(("|", "### "))]
    paragraphs = [p.strip() for p in "\n".join(after).split("\n\n") if p.strip()]
    return title, [p for p in paragraphs if not p.startswith(GENERATED)]


def spec_of(label: str) -> dict[str, Any]:
    """A strategy's spec read back from its table label: ``name[key=value,key=inner(key=value)]`` → a mapping."""
    name, _, rest = label.partition("[")
    spec: dict[str, Any] = {"name": name.strip()}
    for part in _top_level(rest[:-1] if rest.endswith("]") else rest):
        key, _, value = part.partition("=")
        spec[key.strip()] = _value(value.strip())
    return spec


def _top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [p for p in [*parts, text[start:]] if p.strip()]


def _value(text: str) -> Any:
    if "(" in text and text.endswith(")"):  # an inner component: name(key=value,...)
        name, _, inner = text[:-1].partition("(")
        return {"name": name, **{k: _value(v) for k, _, v in (p.partition("=") for p in _top_level(inner))}}
    return _typed(text)


def redraw(folder: Path) -> list[Path]:
    """Rewrite ``results.md`` and the cost figures of ``folder`` from its rows; returns what was written."""
    rows = read_rows(folder)
    for row in rows:  # read back from CSV, integers that the table prints as such
        if isinstance(row.get("steps"), float):
            row["steps"] = int(row["steps"])
    md = folder / "results.md"
    title, notes = title_and_notes(md.read_text()) if md.exists() else ("", [])
    md.write_text(report.markdown_table(rows, title, notes))
    written = [md]
    for name in [name for name in FIGURES if (folder / name).exists()]:
        draw = report.cost_quality_plot if name == "cost_quality.png" else report.pareto_plot
        draw(rows, folder / name, title)
        written.append(folder / name)
    if (folder / "frontier_psnr.png").exists() or (folder / "frontier_ssim.png").exists():
        fr = frontier.Frontier.from_rows(rows, {r.get("key"): spec_of(r["method"]) for r in rows})
        for q in frontier.QUALITIES:
            if (folder / f"frontier_{q}.png").exists():
                frontier.plot(fr, q, folder / f"frontier_{q}.png", title)
                written.append(folder / f"frontier_{q}.png")
    return written


def redraw_diagnostics(folder: Path, overrides: list[str]) -> list[Path]:
    """The warm-up batch of the evaluation ``overrides`` compose, and its diagnostic figures, into ``folder``.

    Only the figures ``folder`` already holds are replaced (all of them when it holds none), so a
    results folder keeps the set it was committed with. Returns what was written.
    """
    import shutil
    import tempfile

    fresh = Path(tempfile.mkdtemp(prefix="catlab_redraw_"))
    try:
        _warm_up_diagnostics(fresh, overrides)
        drawn = sorted(fresh.glob("*.png"))
        keep = [p for p in drawn if (folder / p.name).exists()] or drawn
        for p in keep:
            shutil.copyfile(p, folder / p.name)
        return [folder / p.name for p in keep]
    finally:
        shutil.rmtree(fresh, ignore_errors=True)


def _warm_up_diagnostics(folder: Path, overrides: list[str]) -> None:
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    quiet_libraries()
    sampler_cfg, resolved, prompts, meta, _, _, model_cfg = prepare(cfg)
    set_threads(cfg.threads)
    adapter = build_model(model_cfg)
    first = make_jobs(prompts, meta, list(cfg.seeds), cfg.num_prompts, int(cfg.subset_seed))[: int(cfg.batch_size)]
    texts, seeds = [j.prompt for j in first], [j.seed for j in first]
    strategies, warm = [], {}
    for strategy, (policy, parts) in resolved:
        s = EvaluatedStrategy(strategy.label, RecordingPolicy(policy, keep_outputs=not policy.prunes), "", {}, parts)
        if s.step_cache is not None:
            calibrate(s.step_cache, adapter, texts, seeds, sampler_cfg)
        warm[s.label] = sample(adapter, s.policy, texts, seeds, sampler_cfg, s.reuse_parts)
        strategies.append(s)
    write_diagnostics(strategies, warm, folder, texts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a folder with results.csv (or results.json)")
    parser.add_argument(
        "--diagnostics",
        nargs="+",
        metavar="OVERRIDE",
        help="also redraw the diagnostic figures from the evaluation these overrides compose",
    )
    args = parser.parse_args(argv)
    if not (args.folder / "results.csv").exists() and not (args.folder / "results.json").exists():
        raise SystemExit(f"catlab: {args.folder} has no results.csv or results.json to redraw from")
    for path in redraw(args.folder):
        print(path)
    if args.diagnostics:
        for path in redraw_diagnostics(args.folder, args.diagnostics):
            print(path)


if __name__ == "__main__":
    main()
