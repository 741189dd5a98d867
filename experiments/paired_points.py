"""The paired difference per image between two measured strategies of one ``catlab.evaluate`` run.

The frontier tables compare families along their fronts; this compares two single points
(e.g. a strategy against its own control at the same threshold), from the run folder's
``results.csv`` and ``per_image.json``, with the same bootstrap as the tables
(``catlab.evaluation.paired``)::

    python experiments/paired_points.py RUN_DIR 'label A' 'label B' ['label C' 'label D' ...]
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from catlab.evaluation.paired import paired_difference


def main(run: Path, labels: list[str]) -> None:
    rows = {r["method"]: r for r in csv.DictReader((run / "results.csv").open())}
    per = json.loads((run / "per_image.json").read_text())
    if len(labels) % 2:
        raise SystemExit("paired_points: give the labels in pairs (A B [C D ...])")
    for a, b in zip(labels[::2], labels[1::2]):
        missing = [x for x in (a, b) if x not in rows]
        if missing:
            raise SystemExit(f"paired_points: no row {missing[0]!r} in {run / 'results.csv'}")
        cells = []
        for quality, digits in (("psnr", 2), ("ssim", 4)):
            va, vb = ({i: v[quality] for i, v in per[rows[x]["key"]].items() if quality in v} for x in (a, b))
            cells.append(f"{quality.upper()} {paired_difference(va, vb).cell(digits)}")
        ratios = " vs ".join(f"{float(rows[x]['macs_ratio']):.2f}x" for x in (a, b))
        print(f"{a} − {b} ({ratios}): {'; '.join(cells)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
