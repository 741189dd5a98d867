"""A playing comparison of chosen strategies from a finished video evaluation (``save_images=true``).

An evaluation's own ``comparison.gif`` has a column for every strategy, too wide to show when a frontier
runs dozens. This picks the columns: each ``--strategy`` is a row label of ``results.json`` (``method``),
the full model first::

    python experiments/video_comparison_gif.py <run folder> --prompts 4 --out comparison.gif \\
        --strategy full --strategy "full[stepcache=taylorseer(cache_interval=3,start_step=4)]" ...

Reads the saved GIFs of each strategy (``images/<folder>/*.gif``, in prompt order) and writes one GIF
whose rows are prompts and whose columns are the strategies, every cell playing in step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from catlab.evaluation.store import ResultStore, record_name
from catlab.hashing import folder_name
from catlab.loggers.video import comparison_gif, load_gif


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished catlab.evaluate run folder of a video model")
    ap.add_argument("--strategy", action="append", required=True, help="a row label (results.json `method`)")
    ap.add_argument("--name", action="append", default=None, help="the column heading of each --strategy")
    ap.add_argument("--prompts", type=int, default=4, help="how many prompts (rows)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    rows = {r["method"]: r for r in json.loads((args.run / "results.json").read_text())}
    names = args.name or args.strategy
    if len(names) != len(args.strategy):
        sys.exit("video_comparison_gif: give one --name per --strategy (or none)")
    columns = {}
    for label, name in zip(args.strategy, names):
        if label not in rows:
            sys.exit(f"video_comparison_gif: no row {label!r} in {args.run / 'results.json'}")
        folder = args.run / "images" / folder_name(label, rows[label].get("key", ""))
        gifs = sorted(folder.glob("*.gif"))[: args.prompts]
        if not gifs:
            sys.exit(f"video_comparison_gif: no saved videos in {folder} (run the evaluation with save_images=true)")
        columns[name] = torch.stack([load_gif(g) for g in gifs])
    print(comparison_gif(columns, prompts_of(args.run, rows[args.strategy[0]]["key"])[: args.prompts], args.out))


def prompts_of(run: Path, key: str) -> list[str]:
    """The prompts of a strategy's records in the run's store, by prompt id (the order of its saved GIFs)."""
    plan = json.loads((run / "evaluation.json").read_text())
    store = ResultStore(run / plan.get("store", "store"))
    found = {}
    for batch, items in plan["batches"].items():
        for pid, _, seed in items:
            record = store.load(key, record_name(int(pid), int(seed), batch))
            if record is not None:
                found[int(pid)] = record["prompt"]
    return [found[i] for i in sorted(found)]


if __name__ == "__main__":
    main()
