"""Cost figures from sampler traces: MACs, MAC ratio, time, selection share."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: metrics sit below the sampler
    from catlab.sampler import Trace

#: the version of the MAC-counting rule (catlab/pruning/families.py's formulas, the selection's MACs, what a
#: record's ``macs`` include); evaluation records are keyed by it, so raise it whenever a change to that rule
#: changes a count, and stored records made under the old rule are recomputed instead of averaged in
MACS_RULE = 1


def cost_metrics(traces: list[Trace], wall_seconds: float) -> dict[str, float]:
    """Flat cost metrics over every batch of a run.

    ``macs_ratio`` is the full model's MACs over this run's (> 1 means cheaper),
    with the selection's own MACs counted in this run's.
    """
    images = sum(t.batch_size for t in traces)
    macs = sum(t.macs for t in traces)
    full = sum(t.full_macs for t in traces)
    selection_macs = sum(s.selection_macs for t in traces for s in t.steps)
    denoise = sum(t.seconds for t in traces)
    selection = sum(t.selection_seconds for t in traces)
    pruned_steps = [s.kept for t in traces for s in t.steps if s.kept < t.num_tokens]
    return {
        "num_images": images,
        "macs_per_image": macs / images,
        "full_macs_per_image": full / images,
        "macs_ratio": full / macs,
        "selection_macs_per_image": selection_macs / images,
        "seconds_per_image": wall_seconds / images,
        "denoise_seconds_per_image": denoise / images,
        "images_per_second": images / wall_seconds,
        "selection_share": selection / denoise if denoise else 0.0,
        "pruned_steps": len(pruned_steps) / max(len(traces), 1),
        "mean_kept_tokens": (sum(pruned_steps) / len(pruned_steps)) if pruned_steps else float(traces[0].num_tokens),
    }
