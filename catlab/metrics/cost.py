"""Cost figures from sampler traces: MACs, MAC ratio, time, selection share."""
from __future__ import annotations

from catlab.sampler import Trace


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
    return graph_metrics(traces) | {
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


GRAPH_COUNTERS = ("forward_captures", "forward_replays", "selection_captures", "selection_replays")


def graph_metrics(traces: list[Trace]) -> dict:
    """With ``sampler.cuda_graphs``: the CUDA-graph counters summed over the run, every refusal's reason once,
    and ``graphed`` (every generation replayed its pruned forwards and refused nothing); else nothing."""
    counted = [t.graph_counts for t in traces if t.graph_counts]
    if not counted:
        return {}
    reasons = list(dict.fromkeys(r for c in counted for r in c.get("refusals", ())))
    return {**{k: sum(c.get(k, 0) for c in counted) for k in GRAPH_COUNTERS}, "graph_refusals": reasons,
            "graphed": all(t.graphed for t in traces)}
