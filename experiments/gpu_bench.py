"""Wall-clock speed-ups of token pruning and step caching at SD3-medium and PixArt-Σ scale, against their MACs ratios.

Builds each transformer from its published config with random weights (cost does
not depend on the weights; nothing is downloaded), feeds random prompt embeddings
of the right shapes, and times ``catlab.sampler.sample`` for the full model and,
interleaved with it in the same process, for each strategy:

* ``cat`` — CAT Pruning, α = ``--alpha``, t0 = ``--start-step``;
* ``sequential`` — the rolling window at the same α;
* ``taylorseer`` — diffusers' TaylorSeer (full steps every 3rd step, forecasts between);
* ``schedule`` — catlab's ``budget_schedule`` pattern [1, 0, 0] with ``reuse=taylor``
  (the same MACs as TaylorSeer: steps that skip the transformer);
* ``adaptive`` — catlab's ``adaptive_schedule`` (threshold 0.4, at most 6 forecast steps in a
  row, t0 = 4) with ``reuse=taylor``, the frontier's strategy at 2.5× (docs/results/README.md).
  With random weights its full steps fall where random outputs put them: read its row as
  speed-up per MACs saved.

in each mode: ``eager``; ``compiled`` (``--compile``: the blocks compiled by
``compile_pruned``); ``graphed`` (``--graphs``: ``sampler.cuda_graphs=true``, each
forward replayed from a CUDA graph); ``compiled+graphed`` (both flags: inductor
kernels captured in the graphs). TaylorSeer is left out of the graphed modes (its
hooks run Python in the forward) and the compiled ones (its hooks inside the blocks
are excluded from compilation, so the blocks cannot compile whole), said once.
Batch 1 with classifier-free guidance, and on CUDA 4 prompts per batch too
(``--batch``; beyond 1 prompt only full against ``cat``, at the first of ``--steps``). The time of a generation
is the fastest of ``--repeats`` (device-synchronised at the end of the loop); the
selection share comes from one extra run with ``sync_timing=True``.
``--peers`` adds cache-dit's DBCache (``cachedit_dbcache``, F1B0, ``--peer-threshold``)
against the full model, eager (skipped, with the reason printed, when cache-dit is not
installed: ``pip install "catlab[peers]"``). With random weights the steps DBCache
reuses are not those of a trained model: read its row as speed-up per MACs saved.

    python experiments/gpu_bench.py --graphs                 # SD3-medium and PixArt-Σ, fp16, CUDA: eager and graphed
    python experiments/gpu_bench.py --graphs --compile       # ... and compiled, and compiled inside the graphs
    python experiments/gpu_bench.py --device cpu --tiny      # small shapes: a smoke test on any CPU
    python experiments/gpu_bench.py --peers                  # ... and cache-dit's DBCache beside them
    python experiments/gpu_bench.py --device cpu --hidden 384 --tokens 1024 --models sd3 --steps 28 --strategies cat
    python experiments/gpu_bench.py --device cpu --count-ops --steps 28   # host operators per generation

The last line is a compute-bound configuration for a CPU: an SD3-architecture
transformer (``--layers`` blocks, 64-dim heads) with ``--hidden`` width and
``--tokens`` image tokens. ``--json PATH`` also writes the rows.

``--count-ops`` times nothing: it counts the operators the host dispatches in one
generation, eager and graphed, for the full model and ``cat``, at each family's full
depth (small width and token count: the same operators), on any device — what a
launch-bound step costs, measurable without a GPU.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch
from diffusers.utils import logging as diffusers_logging
from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel,
                       SD3Transformer2DModel)

from catlab.models.base import Conditioning, ModelAdapter
from catlab.pruning import compile_pruned, release_graphs, uncompile
from catlab.registry import selectors
from catlab.reuse import reuses
from catlab.sampler import SamplerConfig, StepReuse, Trace, sample
from catlab.stepcache import stepcaches

#: (transformer class, config, text tokens, text embedding width, pooled width)
FULL_SIZE = {
    "sd3": (SD3Transformer2DModel, dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192), 333, 4096, 2048),
    "pixart": (PixArtTransformer2DModel, dict(
        sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=28, attention_head_dim=72,
        num_attention_heads=16, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, use_additional_conditions=False), 300, 4096, 0),
}


def scaled_config(name: str, hidden: int, tokens: int, layers: int, text_tokens: int):
    """The family's architecture at another width / token count / depth (64-dim heads)."""
    cls, cfg, _, _, pooled = FULL_SIZE[name]
    side = math.isqrt(tokens)
    if side * side != tokens or hidden % 64:
        raise SystemExit(f"--tokens must be a square number and --hidden a multiple of 64; got {tokens}, {hidden}")
    cfg = dict(cfg, sample_size=2 * side, num_layers=layers, attention_head_dim=64, num_attention_heads=hidden // 64)
    if name == "sd3":
        cfg.update(joint_attention_dim=hidden, caption_projection_dim=hidden, pooled_projection_dim=hidden,
                   pos_embed_max_size=2 * side)
        return cls, cfg, text_tokens, hidden, hidden
    cfg.update(cross_attention_dim=hidden, caption_channels=hidden)
    return cls, cfg, text_tokens, hidden, pooled


@dataclass
class RandomPromptAdapter(ModelAdapter):
    """A transformer in latent space with random prompt embeddings of the right shapes (no text encoder, no VAE)."""

    family: str = "sd3"
    text_tokens: int = 77
    text_dim: int = 64
    pooled_dim: int = 0

    def make_scheduler(self):
        return FlowMatchEulerDiscreteScheduler(shift=3.0) if self.family == "sd3" else DPMSolverMultistepScheduler()

    def encode(self, prompts: list[str], guidance: bool) -> Conditioning:
        rows = len(prompts) * (2 if guidance else 1)
        g = torch.Generator().manual_seed(0)
        embeds = torch.randn(rows, self.text_tokens, self.text_dim, generator=g).to(self.torch_device, self.torch_dtype)
        kwargs = {"encoder_hidden_states": embeds}
        if self.family == "sd3":
            kwargs["pooled_projections"] = torch.randn(rows, self.pooled_dim, generator=g).to(self.torch_device, self.torch_dtype)
        return Conditioning(kwargs, 2 if guidance else 1, self.text_tokens)

    def predict(self, latents, timestep, cond):
        t = timestep.expand(latents.shape[0])
        if self.family == "sd3":
            return self.transformer(hidden_states=latents, timestep=t.to(latents.dtype), return_dict=False, **cond.kwargs)[0]
        out = self.transformer(latents, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                               return_dict=False, **cond.kwargs)[0]
        return out[:, : latents.shape[1]]  # drop the learned variance

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents[:, :3].float().cpu()


def build(name: str, args) -> RandomPromptAdapter:
    if args.tiny:
        cls, cfg, text, text_dim, pooled = scaled_config(name, 64, 64, 1, 8)
    elif args.hidden or args.tokens:
        cls, cfg, text, text_dim, pooled = scaled_config(name, args.hidden or 384, args.tokens or 1024, args.layers,
                                                          args.text_tokens or 77)
    else:
        cls, cfg, text, text_dim, pooled = FULL_SIZE[name]
        text = args.text_tokens or text
    torch.manual_seed(0)
    with torch.device(args.device):  # random init straight on the device: fast, no host copy of 2B weights
        transformer = cls(**cfg)
    transformer = transformer.to(dtype=getattr(torch, args.dtype)).eval().requires_grad_(False)
    size = cfg["sample_size"]
    adapter = RandomPromptAdapter(device=args.device, dtype=args.dtype, height=size, width=size, family=name,
                                  text_tokens=text, text_dim=text_dim, pooled_dim=pooled)
    adapter.transformer = transformer
    return adapter


#: strategy → (policy spec, what stands in for skipped work); ``args`` fills α and t0
STRATEGIES = {
    "cat": lambda a: ({"name": "cat", "alpha": a.alpha, "start_step": a.start_step}, None),
    "sequential": lambda a: ({"name": "sequential", "alpha": a.alpha, "start_step": a.start_step}, None),
    "taylorseer": lambda a: ("full", {"step_cache": {"name": "taylorseer", "cache_interval": 3, "start_step": a.start_step}}),
    "schedule": lambda a: ({"name": "budget_schedule", "pattern": [1, 0, 0], "start_step": a.start_step},
                           {"rule": {"name": "taylor"}}),
    "adaptive": lambda a: ({"name": "adaptive_schedule", "threshold": 0.4, "max_skip": 6,
                            "start_step": min(4, a.start_step)}, {"rule": {"name": "taylor"}}),
}
#: (strategy, what it cannot run under, why): those rows are left out, said once
EXCLUDED = [
    ("taylorseer", "graphed", "its hooks decide per call, in Python: nothing to capture"),
    ("taylorseer", "compiled", "its hooks inside the blocks are torch.compiler.disable'd: no full-graph blocks"),
]


def excluded(name: str, mode: str) -> bool:
    return any(s == name and m in mode for s, m, _ in EXCLUDED)


def strategy(name: str, args):
    """A factory of fresh (policy, StepReuse | None) pairs for one strategy (or ``full``)."""
    if name == "full":
        return lambda: (selectors.build("full"), None)
    spec, reuse = STRATEGIES[name](args)

    def make():
        parts = None
        if reuse is not None:
            parts = StepReuse(rule=reuses.build(reuse["rule"]) if "rule" in reuse else None,
                              step_cache=stepcaches.build(reuse["step_cache"]) if "step_cache" in reuse else None)
        return selectors.build(spec), parts
    return make


def timed(adapter, makes, steps: int, repeats: int, batch: int = 1, graphs: bool = False) -> list[tuple[float, Trace]]:
    """For each factory: (seconds of one generation, a trace); interleaved so drift hits all alike.

    On an accelerator the seconds are the fastest generation (synchronised at the end
    of the loop). On a CPU, which other processes may share, they are the sum over
    steps of each step's fastest time: a burst of contention then spoils one step of
    one repeat, not a whole generation.
    """
    cfg = SamplerConfig(num_steps=steps, guidance_scale=4.5, progress=False, cuda_graphs=graphs)
    prompts, seeds = ["a prompt"] * batch, list(range(batch))
    traces: list[list[Trace]] = [[] for _ in makes]
    for _ in range(repeats):
        for i, make in enumerate(makes):
            policy, parts = make()
            traces[i].append(sample(adapter, policy, prompts, seeds, cfg, parts).trace)
    if adapter.torch_device.type != "cpu":
        return [min(((t.seconds, t) for t in ts), key=lambda x: x[0]) for ts in traces]
    return [(sum(min(t.steps[j].seconds for t in ts) for j in range(steps)), ts[0]) for ts in traces]


def selection_share(adapter, make, steps: int, trace: Trace, batch: int = 1, graphs: bool = False) -> float:
    """Share of a generation's time spent selecting; on an accelerator from one extra synchronised run."""
    if adapter.torch_device.type != "cpu":
        policy, parts = make()
        cfg = SamplerConfig(num_steps=steps, guidance_scale=4.5, progress=False, sync_timing=True, cuda_graphs=graphs)
        trace = sample(adapter, policy, ["a prompt"] * batch, list(range(batch)), cfg, parts).trace
    return trace.selection_seconds / sum(s.seconds for s in trace.steps)


def count_ops(name: str, args) -> list[dict]:
    """Operators the host dispatches per generation, eager and graphed, views left out.

    The model has the family's full depth (the operator graph of a step is that of the full
    model) at a small width and token count, so this runs anywhere; on a CPU the graphed run
    uses the stand-in for capture and replay, whose replays dispatch nothing, as on a GPU.
    A warm-up generation first captures the graphs: what is counted is the steady state.
    """
    from catlab.pruning.capture import emulate_on_cpu
    from catlab.testing import OpCounter

    depth = FULL_SIZE[name][1]["num_layers"]
    cls, cfg, text, text_dim, pooled = scaled_config(name, 64, 64, depth, 8)
    torch.manual_seed(0)
    with torch.device(args.device):
        transformer = cls(**cfg)
    adapter = RandomPromptAdapter(device=args.device, dtype=args.dtype, height=cfg["sample_size"],
                                  width=cfg["sample_size"], family=name, text_tokens=text, text_dim=text_dim,
                                  pooled_dim=pooled)
    adapter.transformer = transformer.to(dtype=getattr(torch, args.dtype)).eval().requires_grad_(False)
    rows, steps = [], args.steps[0]
    for strategy_name in ("full", "cat"):
        make = strategy(strategy_name, args)
        for graphs in (False, True):
            cfg_s = SamplerConfig(num_steps=steps, guidance_scale=4.5, progress=False, cuda_graphs=graphs)
            with emulate_on_cpu():
                sample(adapter, make()[0], ["a prompt"], [0], cfg_s)  # warm-up: captures
                with OpCounter(views=False) as counter:
                    sample(adapter, make()[0], ["a prompt"], [0], cfg_s)
            rows.append(dict(model=name, strategy=strategy_name, mode="graphed" if graphs else "eager", steps=steps,
                             layers=depth, ops=counter.count))
            print(f"{name:<7} {depth:>6} {strategy_name:<9} {rows[-1]['mode']:<8} {steps:>5} {counter.count:>10} "
                  f"{counter.count / steps:>10.0f}", flush=True)
    release_graphs(adapter.transformer)
    return rows


def modes(args) -> list[str]:
    out = ["eager"] + (["compiled"] if args.compile else [])
    if args.graphs:
        out += ["graphed"] + (["compiled+graphed"] if args.compile else [])
    return out


def bench(name: str, args) -> list[dict]:
    adapter = build(name, args)
    rows = []
    for mode in modes(args):
        graphs = "graphed" in mode
        if "compiled" in mode:
            compile_pruned(adapter.transformer, mode=args.compile_mode)
        else:
            uncompile(adapter.transformer)
        for batch in args.batch:
            names = [s for s in args.strategies if not excluded(s, mode)]
            steps_list = args.steps
            if batch > 1:  # the wide batch: full against cat, at the first step count
                names, steps_list = [s for s in names if s == "cat"], args.steps[:1]
            if not names:
                continue
            makes = [strategy("full", args)] + [strategy(s, args) for s in names]
            warm = SamplerConfig(num_steps=args.start_step + 4, guidance_scale=4.5, progress=False, cuda_graphs=graphs)
            for make in makes:  # warm-up: allocator, kernels, compiled code, graphs of every shape, clustering
                policy, parts = make()
                sample(adapter, policy, ["a prompt"] * batch, list(range(batch)), warm, parts)
            store = getattr(adapter.transformer, "_catlab_graphs", None)
            label = mode if not graphs or (store is not None and store.graphs) else mode + " (ran eager)"
            for steps in steps_list:
                (full_s, full), *timings = timed(adapter, makes, steps, args.repeats, batch, graphs)
                for s, make, (pruned_s, trace) in zip(names, makes[1:], timings):
                    share = selection_share(adapter, make, steps, trace, batch, graphs) if s != "taylorseer" else 0.0
                    row = dict(model=name, mode=label, batch=batch, steps=steps, strategy=s, tokens=full.num_tokens,
                               full_s=full_s, pruned_s=pruned_s, speedup=full_s / pruned_s,
                               macs_ratio=full.macs / trace.macs, selection=share)
                    row["of_macs"] = row["speedup"] / row["macs_ratio"]
                    rows.append(row)
                    print(_format(row), flush=True)
        if mode == "eager" and args.peers:
            rows += bench_peer(name, args, adapter, strategy("full", args))
    uncompile(adapter.transformer)
    release_graphs(adapter.transformer)
    return rows


def bench_peer(name: str, args, adapter, make_full) -> list[dict]:
    """cache-dit's DBCache against the full model, eager, in the same process and the same way."""
    cache = stepcaches.build({"name": "cachedit_dbcache", "threshold": args.peer_threshold, "start_step": args.start_step})
    reuse = StepReuse(step_cache=cache)
    label = f"dbcache({args.peer_threshold:g})"
    make_cached = lambda: (selectors.build("full"), reuse)  # noqa: E731
    sample(adapter, selectors.build("full"), ["a prompt"], [0],
           SamplerConfig(num_steps=args.start_step + 2, guidance_scale=4.5, progress=False), reuse)  # warm-up
    rows = []
    for steps in args.steps:
        (full_s, full), (cached_s, cached) = timed(adapter, [make_full, make_cached], steps, args.repeats)
        speedup, macs = full_s / cached_s, full.macs / cached.macs
        rows.append(dict(model=name, mode="eager", batch=1, steps=steps, strategy=label, tokens=full.num_tokens,
                         full_s=full_s, pruned_s=cached_s, speedup=speedup, macs_ratio=macs, of_macs=speedup / macs,
                         selection=0.0))
        print(_format(rows[-1]), flush=True)
    return rows


HEADER = ("model   mode              batch steps tokens strategy          full s  strat. s  speed-up  MACs ratio"
          "  speed-up/MACs  selection share")


def _format(r: dict) -> str:
    return (f"{r['model']:<7} {r['mode']:<17} {r['batch']:>5} {r['steps']:>5} {r['tokens']:>6} {r['strategy']:<16} "
            f"{r['full_s']:>7.3f}  {r['pruned_s']:>8.3f}  {r['speedup']:>7.2f}x  {r['macs_ratio']:>9.2f}x  "
            f"{100 * r['of_macs']:>12.0f}%  {100 * r['selection']:>14.1f}%")


def markdown(rows: list[dict]) -> str:
    """The rows as the table of docs/performance.md."""
    names = {"sd3": "SD3-medium", "pixart": "PixArt-Σ"}
    lines = ["| model | mode | batch | steps | strategy | full (s) | strategy (s) | speed-up | MACs ratio | "
             "speed-up / MACs | selection share |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {names.get(r['model'], r['model'])} | {r['mode']} | {r['batch']} | {r['steps']} | "
                     f"{r['strategy']} | {r['full_s']:.3f} | {r['pruned_s']:.3f} | {r['speedup']:.2f}× | "
                     f"{r['macs_ratio']:.2f}× | {100 * r['of_macs']:.0f}% | {100 * r['selection']:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on a CPU")
    parser.add_argument("--models", default="sd3,pixart")
    parser.add_argument("--steps", default="28,50")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"any of {', '.join(STRATEGIES)}")
    parser.add_argument("--batch", default=None,
                        help="prompts per batch, e.g. 1,4 (beyond 1: full against cat only); default 1,4 on CUDA, 1 on a CPU")
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--start-step", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the blocks compiled by compile_pruned")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--graphs", action="store_true", help="also time each forward replayed from CUDA graphs")
    parser.add_argument("--tiny", action="store_true", help="small shapes (1 block, 64 tokens): a smoke test")
    parser.add_argument("--hidden", type=int, default=0, help="width of a scaled model (multiple of 64)")
    parser.add_argument("--tokens", type=int, default=0, help="image tokens of a scaled model (a square)")
    parser.add_argument("--layers", type=int, default=4, help="blocks of a scaled model")
    parser.add_argument("--text-tokens", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--peers", action="store_true",
                        help='also time cache-dit\'s DBCache against the full model (pip install "catlab[peers]")')
    parser.add_argument("--peer-threshold", type=float, default=0.24, help="cache-dit DBCache residual_diff_threshold")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--count-ops", action="store_true",
                        help="instead of timing: operators the host dispatches per generation, eager and graphed")
    args = parser.parse_args(argv)
    diffusers_logging.set_verbosity_error()  # casting random weights to fp16 is intended here
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    args.steps = [int(s) for s in args.steps.split(",")]
    args.batch = [int(b) for b in (args.batch or ("1,4" if args.device.startswith("cuda") else "1")).split(",")]
    args.strategies = [s for s in args.strategies.split(",") if s]
    unknown = sorted(set(args.strategies) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peers:
        from catlab.stepcache.cachedit import INSTALL, available

        if not available():
            print(f"cache-dit row skipped: cache-dit is not installed ({INSTALL})")
            args.peers = False

    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    if args.count_ops:
        print(f"host-dispatched operators (views left out), {args.steps[0]} steps, batch 1 with CFG, "
              f"cat alpha={args.alpha} t0={args.start_step}; full depth, small width")
        print("model   layers strategy  mode     steps  per gen.   per step")
        rows = [r for name in args.models.split(",") for r in count_ops(name, args)]
        if args.json:
            import json

            with open(args.json, "w") as f:
                json.dump(dict(device=gpu, torch=torch.__version__, argv=argv or sys.argv[1:], rows=rows), f, indent=1)
        return rows
    print(f"device {args.device} ({gpu}), torch {torch.__version__}, {args.dtype}, {torch.get_num_threads()} CPU threads, "
          f"classifier-free guidance; alpha={args.alpha}, t0={args.start_step}; modes: {', '.join(modes(args))}")
    for s, m, why in EXCLUDED:
        if s in args.strategies and any(m in mode for mode in modes(args)):
            print(f"not in the {m} modes: {s} ({why})")
    print(HEADER)
    rows = []
    for name in args.models.split(","):
        rows += bench(name, args)
    print()
    print(markdown(rows))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(dict(device=gpu, torch=torch.__version__, argv=argv or sys.argv[1:], rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
