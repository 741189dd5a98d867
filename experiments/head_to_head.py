"""Token pruning vs diffusers' step-level caches, on one model, one scheduler, one MAC counter.

    python experiments/head_to_head.py --quick                        # a few minutes on a CPU
    python experiments/head_to_head.py --model embedded --model-path /path/to/bundle
    python experiments/head_to_head.py --prompts 16 --seeds 0 1 --out outputs/h2h

Every method generates the same (prompt, seed) batch with the model's scheduler
and the same guidance, through :func:`catlab.stepcache.loop.generate`; MACs are
what :class:`catlab.stepcache.MacCounter` saw run (plus the selection's own MACs).
Methods: the full model; token strategies (``random``, ``sequential``,
``noise_staleness``, ``cat`` when registered, and ``forecast_error``) with ``copy``
and ``taylor`` reuse;
TaylorSeer at several intervals; FirstBlockCache and MagCache (calibrated on the
full model) at several thresholds; per-step token budgets
(:class:`catlab.stepcache.BudgetSchedule`: full, forecast-only and pruned steps
in a repeating pattern, with ``taylor`` reuse); token pruning composed with
diffusers' TaylorSeer.
Fidelity is to the full model's images: PSNR, SSIM; attribute accuracy when the
model is the embedded one and the prompts are its held-out captions.

Writes ``results.md`` (one table), ``results.json`` and ``pareto.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import catlab  # noqa: F401  (registers the built-in components)
import catlab.reuse  # noqa: F401  (registers forecast_error)
from catlab.metrics.fidelity import psnr, ssim
from catlab.registry import models, prompt_sets, selectors
from catlab.reuse import reuses
from catlab.stepcache import BudgetSchedule, stepcaches
from catlab.stepcache.loop import generate

TOKEN_STRATEGIES = ("random", "sequential", "noise_staleness", "cat", "forecast_error")
REUSES = {"copy": {"name": "copy"}, "taylor1": {"name": "taylor", "order": 1}, "taylor2": {"name": "taylor", "order": 2}}


def methods(args) -> list[dict]:
    """Every configuration to run: label, group, selector spec, reuse spec, step-cache spec."""
    start, alpha = args.start_step, args.alpha
    tok = [s for s in TOKEN_STRATEGIES if s in selectors.names()]
    out = [dict(label="full", group="full", policy={"name": "full"})]
    reuse_names = ["copy", "taylor1"] if args.quick else list(REUSES)
    for s in tok:
        for r in reuse_names:
            out.append(dict(label=f"{s} α={alpha} +{r}", group=f"token/{r}",
                            policy={"name": s, "alpha": alpha, "start_step": start}, reuse=REUSES[r]))
        if s in ("sequential", "cat", "forecast_error") and not args.quick:  # forecast the stale K/V too
            out.append(dict(label=f"{s} α={alpha} +taylor1 +kv", group="token/taylor1+kv",
                            policy={"name": s, "alpha": alpha, "start_step": start}, reuse=REUSES["taylor1"],
                            kv=REUSES["taylor1"]))
    for interval in args.intervals:
        for order in ([1] if args.quick else [1, 2]):
            out.append(dict(label=f"taylorseer n={interval} o={order}", group="taylorseer", policy={"name": "full"},
                            cache={"name": "taylorseer", "cache_interval": interval, "max_order": order,
                                   "disable_cache_before_step": start}))
    for th in args.fbc:
        out.append(dict(label=f"first_block_cache {th}", group="first_block_cache", policy={"name": "full"},
                        cache={"name": "first_block_cache", "threshold": th}))
    for th in args.mag:
        out.append(dict(label=f"mag_cache {th}", group="mag_cache", policy={"name": "full"},
                        cache={"name": "mag_cache", "threshold": th, "num_steps": args.steps}))
    for s in [s for s in ("sequential", "cat", "forecast_error") if s in tok]:
        for pattern in args.patterns:
            if s != "sequential" and all(p in (0.0, 1.0) for p in pattern):
                continue  # no pruned step: the selector never runs, one row is enough
            for r in ["taylor1"] if args.quick else ["taylor1", "taylor2"]:
                out.append(dict(label=f"{s} schedule {'/'.join(f'{p:g}' for p in pattern)} +{r}", group="schedule",
                                policy={"name": "budget_schedule", "inner": s, "pattern": pattern,
                                        "start_step": start}, reuse=REUSES[r]))
        for a, interval in args.composed if s != "forecast_error" else ():
            for r in ["taylor1"] if args.quick else ["taylor1", "taylor2"]:
                out.append(dict(label=f"{s} α={a} +{r} + taylorseer n={interval}", group="composed",
                                policy={"name": s, "alpha": a, "start_step": start}, reuse=REUSES[r],
                                cache={"name": "taylorseer", "cache_interval": interval,
                                       "disable_cache_before_step": start, "max_order": int(r[-1])}))
    return [m for m in out if not args.only or m["group"] == "full" or m["group"].split("/")[0] in args.only]


def build_policy(spec: dict):
    if spec["name"] == "budget_schedule":
        return BudgetSchedule(**{k: v for k, v in spec.items() if k != "name"})
    return selectors.build(spec)


def load_model(args):
    if args.model == "auto":
        for name, kw in (("embedded", {"path": args.model_path}), ("tiny_sd3", {})):
            try:
                return name, models.build({"name": name, **kw})
            except Exception as err:  # noqa: BLE001  (fall back to the next model, saying why)
                print(f"[head_to_head] model {name} not available: {err}")
        raise SystemExit("no model could be loaded")
    kw = {"path": args.model_path} if args.model == "embedded" else {}
    return args.model, models.build({"name": args.model, **kw})


def load_prompts(args, model_name):
    if model_name == "embedded":
        prompts, meta = prompt_sets.build({"name": "embedded_heldout", "n": args.prompts}).load_with_meta()
        return prompts, meta
    words = ["red square", "blue circle", "green triangle", "yellow star", "purple square left of a red circle",
             "small orange circle", "two blue squares", "a large green circle above a small red square"]
    return [words[i % len(words)] for i in range(args.prompts)], None


def attribute_metric(meta):
    if meta is None:
        return None
    from catlab.metrics.alignment import AttributeAccuracy

    metric = AttributeAccuracy()
    return None if metric.unavailable({"meta": meta}) else metric


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    model_name, adapter = load_model(args)
    prompts, meta = load_prompts(args, model_name)
    jobs = [(p, m, s) for p, m in zip(prompts, meta or [None] * len(prompts)) for s in args.seeds]
    P, M, S = [j[0] for j in jobs], [j[1] for j in jobs], [j[2] for j in jobs]
    accuracy = attribute_metric(meta)
    kw = dict(num_steps=args.steps, guidance_scale=args.guidance)
    rows, reference, calibrated = [], None, {}
    print(f"[head_to_head] model={model_name} images={len(jobs)} steps={args.steps} guidance={args.guidance}")
    for spec in methods(args):
        cache = stepcaches.build(spec["cache"]) if spec.get("cache") else None
        if cache is not None and cache.needs_calibration:  # once per cache kind, on the full model
            if cache.name not in calibrated:
                calibrated[cache.name] = cache.calibrate(
                    adapter.transformer, lambda: generate(adapter, selectors.build("full"), P, S, step_cache=cache, **kw))
            cache.mag_ratios = calibrated[cache.name]
        reuse = reuses.build(spec["reuse"]) if spec.get("reuse") else None
        kv = reuses.build(spec["kv"]) if spec.get("kv") else None
        t0 = time.perf_counter()
        result = generate(adapter, build_policy(spec["policy"]), P, S, reuse=reuse, step_cache=cache,
                          kv_reuse=kv, **kw)
        seconds = time.perf_counter() - t0
        if reference is None:
            reference = result.images
        row = dict(label=spec["label"], group=spec["group"], macs_ratio=result.macs_ratio,
                   psnr=psnr(result.images, reference).clamp(max=100).mean().item(),
                   ssim=ssim(result.images, reference).mean().item(), seconds=seconds)
        if accuracy is not None:
            row["attribute_accuracy"] = accuracy(result.images, reference, P, M).mean().item()
        rows.append(row)
        print(f"  {row['label']:<48} MACs ×{row['macs_ratio']:.2f}  PSNR {row['psnr']:6.2f}  SSIM {row['ssim']:.4f}"
              + (f"  acc {row['attribute_accuracy']:.3f}" if "attribute_accuracy" in row else "") + f"  {seconds:.1f}s")
    return [dict(r, model=model_name, images=len(jobs)) for r in rows]


def table(rows: list[dict]) -> str:
    acc = any("attribute_accuracy" in r for r in rows)
    head = "| method | group | MACs ratio | PSNR (dB) | SSIM |" + (" attr. acc. |" if acc else "")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["group"] != "full", -r["macs_ratio"])):
        cells = [r["label"], r["group"], f"{r['macs_ratio']:.2f}×", f"{r['psnr']:.2f}", f"{r['ssim']:.4f}"]
        if acc:
            cells.append(f"{r.get('attribute_accuracy', float('nan')):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pareto(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both MACs ratio and PSNR."""
    return [r for r in rows if not any(o["macs_ratio"] >= r["macs_ratio"] and o["psnr"] >= r["psnr"]
                                       and (o["macs_ratio"], o["psnr"]) != (r["macs_ratio"], r["psnr"]) for o in rows)]


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    pts = [r for r in rows if r["group"] != "full" and r["macs_ratio"] > 1.05]  # methods that saved nothing: table only
    step_level = ("taylorseer", "first_block_cache", "mag_cache")
    for g in sorted({r["group"] for r in pts}):
        sel = [r for r in pts if r["group"] == g]
        ax.scatter([r["macs_ratio"] for r in sel], [r["psnr"] for r in sel], label=g, s=30,
                   marker="s" if g in step_level else "o")
    front = sorted(pareto(pts), key=lambda r: r["macs_ratio"])
    ax.plot([r["macs_ratio"] for r in front], [r["psnr"] for r in front], "k--", lw=0.8, label="Pareto front")
    for r in front:
        ax.annotate(r["label"], (r["macs_ratio"], r["psnr"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("MACs ratio (full / method, higher = cheaper)")
    ax.set_ylabel("PSNR to the full model (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="auto", help="a registered adapter; auto = embedded if it loads, else tiny_sd3")
    ap.add_argument("--model-path", default=None, help="bundle directory for the embedded model")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--start-step", type=int, default=8, help="full steps before pruning/caching starts (t0)")
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--fbc", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4, 0.8])
    ap.add_argument("--mag", type=float, nargs="+", default=[0.03, 0.06, 0.12, 0.24])
    ap.add_argument("--composed", type=str, nargs="+", default=["0.5:2", "0.6:2", "0.4:2"],
                    help="alpha:interval pairs for token pruning inside TaylorSeer's computed steps")
    ap.add_argument("--patterns", type=str, nargs="+",
                    default=["1/0/0", "1/0/0/0", "1/0.3/0/0", "1/0/0.3/0", "1/0.15/0.15/0", "1/0.1/0.1/0.1"],
                    help="budget_schedule patterns after t0: 1 = full step, 0 = forecast only, else the kept share")
    ap.add_argument("--only", type=str, nargs="+", default=None,
                    help="run only these groups (token, taylorseer, first_block_cache, mag_cache, schedule, composed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="4 prompts and a reduced grid")
    ap.add_argument("--out", default="outputs/head_to_head")
    ap.add_argument("--plot", default=None, help="also write the Pareto plot here (e.g. docs/img/head_to_head.png)")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts = min(args.prompts, 4)
        args.intervals, args.fbc, args.mag = [2, 3], [0.1, 0.8], [0.06, 0.24]
        args.composed = args.composed[:1]
        args.patterns = ["1/0/0", "1/0.3/0/0", "1/0.15/0.15/0"]
    args.patterns = [tuple(float(x) for x in p.split("/")) for p in args.patterns]
    args.composed = [(float(a), int(n)) for a, n in (c.split(":") for c in args.composed)]
    return args


def main(argv=None) -> None:
    args = parse(argv)
    rows = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = rows[0]["model"]
    title = (f"{model}: {rows[0]['images']} images, {args.steps} steps, t0={args.start_step}, "
             f"CFG {args.guidance}; PSNR to the full model")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text(f"{title}\n\n" + table(rows))
    plot(rows, out / "pareto.png", title)
    if args.plot:
        plot(rows, Path(args.plot), title)
    print(table(rows))


if __name__ == "__main__":
    main()
