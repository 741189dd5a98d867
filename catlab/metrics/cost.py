"""Cost figures from sampler traces: MACs, MAC ratio, time, selection share."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only (the import graph counts them: metrics sit above the sampler)
    from catlab.sampler import Trace

#: the version of the MAC-counting rule (the formulas of catlab/families/, the selection's MACs, what a
#: record's ``macs`` include); evaluation records are keyed by it, so raise it whenever a change to that rule
#: changes a count, and stored records made under the old rule are recomputed instead of averaged in
MACS_RULE = 1


def cost_metrics(traces: list[Trace], wall_seconds: float) -> dict[str, float]:
    """Flat cost metrics over every batch of a run.

    ``macs_ratio`` is the full model's MACs over this run's (> 1 means cheaper),
    with the selection's own MACs counted in this run's.

    ``selection_share`` is the share of the denoising time spent choosing tokens
    (the policy's ``select`` and ``observe``), after the warm-up: the run's first
    pruned step is left out of both sides, since it carries one-time costs
    (imports, the first clustering's set-up) that an evaluation's warm-up batch
    also leaves out. ``selection_warmup_seconds`` is that step's selection time and
    ``selection_share_with_warmup`` the share over every step.
    """
    images = sum(t.batch_size for t in traces)
    macs = sum(t.macs for t in traces)
    full = sum(t.full_macs for t in traces)
    selection_macs = sum(s.selection_macs for t in traces for s in t.steps)
    denoise = sum(t.seconds for t in traces)
    selection = sum(t.selection_seconds for t in traces)
    first = next(((t, s) for t in traces for s in t.steps if s.kept < t.num_tokens and s.kept > 0), None)
    warmup = first[1].selection_seconds if first else 0.0
    warm_denoise = denoise - (first[1].seconds if first else 0.0)
    pruned_steps = [s.kept for t in traces for s in t.steps if s.kept < t.num_tokens]
    return graph_metrics(traces) | {
        "num_images": images,
        "macs_per_image": macs / images,
        "full_macs_per_image": full / images,
        "macs_ratio": full / macs,
        "selection_macs_per_image": selection_macs / images,
        "seconds_per_image": wall_seconds / images,
        "denoise_seconds_per_image": denoise / images,
        "images_per_second": images / wall_seconds,
        "selection_share": (selection - warmup) / warm_denoise if warm_denoise > 0 else 0.0,
        "selection_share_with_warmup": selection / denoise if denoise else 0.0,
        "selection_warmup_seconds": warmup,
        "pruned_steps": len(pruned_steps) / max(len(traces), 1),
        "mean_kept_tokens": (sum(pruned_steps) / len(pruned_steps)) if pruned_steps else float(traces[0].num_tokens),
    }


GRAPH_COUNTERS = ("forward_captures", "forward_replays", "selection_captures", "selection_replays")


def graph_metrics(traces: list[Trace]) -> dict:
    """With ``sampler.cuda_graphs``: the CUDA-graph counters summed over the run, every refusal's reason once,
    and ``graphed`` (every generation replayed its pruned forwards and refused nothing); else nothing."""
    counted = [t.graph_counts for t in traces if t.graph_counts]
    if not counted:
        return {}
    reasons = list(dict.fromkeys(r for c in counted for r in c.get("refusals", ())))
    return {
        **{k: sum(c.get(k, 0) for c in counted) for k in GRAPH_COUNTERS},
        "graph_refusals": reasons,
        "graphed": all(t.graphed for t in traces),
    }
