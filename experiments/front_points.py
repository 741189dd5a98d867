"""The strategies of a finished ``catlab.evaluate`` run that lie on their family's front.

A frontier experiment on an expensive testbed need not run every point of a cheaper
one: a point below its own family's front (by PSNR and by SSIM) cannot set that
family's value at any budget. This prints, as experiment-YAML entries in the run's
order, the strategies on their family's PSNR or SSIM front (the full model first),
so that a new experiment can run only those::

    python experiments/front_points.py RUN_DIR [--max-per-family K]

``--max-per-family`` keeps, per family, at most K of its front points, spread evenly
along the MACs ratio (the cheapest and the most aggressive always kept).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from catlab.evaluation.frontier import QUALITIES, Frontier


def front_keys(run: Path, max_per_family: int | None = None) -> list[dict]:
    """The specs on a family front of ``run``, in the run's strategy order, the full model first."""
    rows = json.loads((run / "results.json").read_text())
    plan = json.loads((run / "evaluation.json").read_text())
    specs = {s["key"]: s.get("spec") or {"name": s["label"]} for s in plan["strategies"]}
    fr = Frontier.from_rows(rows, specs)
    keep: set[str] = set()
    for fam in fr.families():
        on = {p.key: p.x for q in QUALITIES for p in fr.front(q, fam)}
        ranked = sorted(on, key=on.get)
        if max_per_family and len(ranked) > max_per_family:
            step = (len(ranked) - 1) / (max_per_family - 1) if max_per_family > 1 else 0
            ranked = [ranked[round(i * step)] for i in range(max_per_family)]
        keep.update(ranked)
    out = [{"name": "full"}]
    out += [specs[s["key"]] for s in plan["strategies"] if s["key"] in keep]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--max-per-family", type=int, default=None)
    args = parser.parse_args(argv)
    for spec in front_keys(args.run, args.max_per_family):
        print("  - " + (spec["name"] if spec == {"name": "full"} else json.dumps(spec).replace('"', "")))


if __name__ == "__main__":
    main()
