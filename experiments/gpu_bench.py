"""Wall-clock speed-ups of token pruning and step caching at SD3-medium, PixArt-Σ and FLUX.1-dev scale, against
their MACs ratios.

Builds each transformer from its published config with random weights (cost does
not depend on the weights; nothing is downloaded), feeds random prompt embeddings
of the right shapes, and times ``catlab.sampler.sample`` for the full model and,
interleaved with it in the same process, for each strategy:

* ``cat`` — CAT Pruning, α = ``--alpha``, t0 = ``--start-step`` (on CUDA its clustering runs on the device);
* ``cat_sklearn`` (by name only) — the same with ``clusterer=kmeans_sklearn``, the authors' host clustering;
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
FLUX.1-dev (``--family flux``: 19 dual- and 38 single-stream blocks, hidden 3072, 4096 image and
512 text tokens) is guidance-distilled: one branch per step, the scale a model input.
Batch 1 with classifier-free guidance (FLUX: its guidance input), and on CUDA 4 prompts per batch too
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
    python experiments/gpu_bench.py --device cpu --tiny --family flux   # FLUX.1-dev's layout, small shapes
    python experiments/gpu_bench.py --family flux --graphs --peers --dtype bfloat16   # FLUX.1-dev's shape, CUDA
    python experiments/gpu_bench.py --peers                  # ... and cache-dit's DBCache beside them
    python experiments/gpu_bench.py --device cpu --hidden 384 --tokens 1024 --models sd3 --steps 28 --strategies cat
    python experiments/gpu_bench.py --device cpu --count-ops --steps 28   # host operators per generation
    python experiments/gpu_bench.py --macs-only --family flux --steps 28,50   # analytic MACs at FLUX.1-dev's shape

The last line is a compute-bound configuration for a CPU: an SD3-architecture
transformer (``--layers`` blocks, 64-dim heads) with ``--hidden`` width and
``--tokens`` image tokens. ``--json PATH`` also writes the rows at the end;
``--jsonl PATH`` appends each row to PATH as one JSON line the moment it is measured
(a run stopped by a time limit keeps every finished row).

With ``--graphs``, a row is labelled graphed only where both generations it compares
replayed their forwards, the pruned steps' included, and refused nothing
(:meth:`catlab.pruning.graphs.GraphCounts.replayed`); otherwise its mode reads
``graphed (ran eager)``. Every graphed-mode row carries the strategy generation's
``forward_captures``, ``forward_replays``, ``selection_captures``, ``selection_replays``
and ``refusals`` (the reasons, the full model's prefixed ``full:``).

Runs from a plain checkout (the repository root is put on ``sys.path``); nothing to install
but the dependencies (``experiments/gpu_preflight.py`` names any that are missing).

``--macs-only`` times nothing either: it builds each family at its full size on the meta
device (no memory, no weights) and prints catlab's analytic MACs of a full and a pruned
step and the transformer's MACs ratio of ``cat``'s schedule (t0 full steps, then α).

``--count-ops`` times nothing: it counts the operators the host dispatches in one
generation, eager and graphed, for the full model and ``cat``, at each family's full
depth (small width and token count: the same operators), on any device — what a
launch-bound step costs, measurable without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's catlab, installed or not

import torch  # noqa: E402
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,  # noqa: E402
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from catlab.models.base import Conditioning, ModelAdapter  # noqa: E402
from catlab.models.packed import image_ids, pack, unpack  # noqa: E402
from catlab.pruning import compile_pruned, release_graphs, uncompile  # noqa: E402
from catlab.registry import selectors  # noqa: E402
from catlab.reuse import reuses  # noqa: E402
from catlab.sampler import SamplerConfig, StepReuse, Trace, sample  # noqa: E402
from catlab.stepcache import stepcaches  # noqa: E402

#: the graph counters a graphed-mode row carries (GraphCounts, for the strategy's generation)
COUNTERS = ("forward_captures", "forward_replays", "selection_captures", "selection_replays")

#: (transformer class, config, text tokens, text embedding width, pooled width)
FULL_SIZE = {
    "sd3": (
        SD3Transformer2DModel,
        dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            pos_embed_max_size=192,
        ),
        333,
        4096,
        2048,
    ),
    "pixart": (
        PixArtTransformer2DModel,
        dict(
            sample_size=128,
            patch_size=2,
            in_channels=4,
            out_channels=8,
            num_layers=28,
            attention_head_dim=72,
            num_attention_heads=16,
            cross_attention_dim=1152,
            caption_channels=4096,
            norm_type="ada_norm_single",
            num_embeds_ada_norm=1000,
            use_additional_conditions=False,
        ),
        300,
        4096,
        0,
    ),
    # FLUX.1-dev: latent 128x128 (1024 px) packed 2x2 into 4096 tokens of 64 channels; T5 512 tokens, CLIP pooled 768
    "flux": (
        FluxTransformer2DModel,
        dict(
            sample_size=128,
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        512,
        4096,
        768,
    ),
}


def new_transformer(name: str, cls, cfg: dict):
    """The transformer of a config; FLUX's ``sample_size`` is the latent side the bench generates, not its own key."""
    return cls(**{k: v for k, v in cfg.items() if not (name == "flux" and k == "sample_size")})


def scaled_config(name: str, hidden: int, tokens: int, layers: int, text_tokens: int):
    """The family's architecture at another width / token count / depth (64-dim heads)."""
    cls, cfg, _, _, pooled = FULL_SIZE[name]
    side = math.isqrt(tokens)
    if side * side != tokens or hidden % 64:
        raise SystemExit(f"--tokens must be a square number and --hidden a multiple of 64; got {tokens}, {hidden}")
    cfg = dict(cfg, sample_size=2 * side, num_layers=layers, attention_head_dim=64, num_attention_heads=hidden // 64)
    if name == "flux":  # twice as many single-stream blocks as dual-stream ones, as in FLUX.1-dev
        cfg.update(
            num_single_layers=2 * layers,
            joint_attention_dim=hidden,
            pooled_projection_dim=hidden,
            axes_dims_rope=(16, 24, 24),
        )
        return cls, cfg, text_tokens, hidden, hidden
    if name == "sd3":
        cfg.update(
            joint_attention_dim=hidden,
            caption_projection_dim=hidden,
            pooled_projection_dim=hidden,
            pos_embed_max_size=2 * side,
        )
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

    @property
    def guidance_distilled(self) -> bool:  # FLUX: one branch per step, the scale a model input
        return self.family == "flux"

    @property
    def patch_size(self) -> int:
        return 2 if self.family == "flux" else super().patch_size

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // (4 if self.family == "flux" else 1)

    def make_scheduler(self):
        return DPMSolverMultistepScheduler() if self.family == "pixart" else FlowMatchEulerDiscreteScheduler(shift=3.0)

    def encode(self, prompts: list[str], guidance: bool) -> Conditioning:
        rows = len(prompts) * (2 if guidance else 1)
        g = torch.Generator().manual_seed(0)
        embeds = torch.randn(rows, self.text_tokens, self.text_dim, generator=g).to(
            self.torch_device, self.torch_dtype
        )
        kwargs = {"encoder_hidden_states": embeds}
        if self.family in ("sd3", "flux"):
            kwargs["pooled_projections"] = torch.randn(rows, self.pooled_dim, generator=g).to(
                self.torch_device, self.torch_dtype
            )
        if self.family == "flux":
            kwargs["txt_ids"] = torch.zeros(self.text_tokens, 3, device=self.torch_device)
        return Conditioning(kwargs, 2 if guidance else 1, self.text_tokens)

    def embed_guidance(self, cond: Conditioning, scale: float) -> Conditioning:
        if self.family == "flux":
            rows = cond.kwargs["encoder_hidden_states"].shape[0]
            cond.kwargs["guidance"] = torch.full((rows,), scale, device=self.torch_device, dtype=torch.float32)
        return cond

    def predict(self, latents, timestep, cond):
        t = timestep.expand(latents.shape[0])
        if self.family == "flux":
            h, w = latents.shape[-2:]
            out = self.transformer(
                hidden_states=pack(latents),
                timestep=(t / 1000).to(latents.dtype),
                img_ids=image_ids(h, w, latents.device),
                return_dict=False,
                **cond.kwargs,
            )[0]
            return unpack(out, h, w)
        if self.family == "sd3":
            return self.transformer(
                hidden_states=latents, timestep=t.to(latents.dtype), return_dict=False, **cond.kwargs
            )[0]
        out = self.transformer(
            latents,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
            **cond.kwargs,
        )[0]
        return out[:, : latents.shape[1]]  # drop the learned variance

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents[:, :3].float().cpu()


def build(name: str, args) -> RandomPromptAdapter:
    if args.tiny:
        cls, cfg, text, text_dim, pooled = scaled_config(name, 64, 64, 1, 8)
    elif args.hidden or args.tokens:
        cls, cfg, text, text_dim, pooled = scaled_config(
            name, args.hidden or 384, args.tokens or 1024, args.layers, args.text_tokens or 77
        )
    else:
        cls, cfg, text, text_dim, pooled = FULL_SIZE[name]
        text = args.text_tokens or text
    torch.manual_seed(0)
    with torch.device(args.device):  # random init straight on the device: fast, no host copy of 2B weights
        transformer = new_transformer(name, cls, cfg)
    transformer = transformer.to(dtype=getattr(torch, args.dtype)).eval().requires_grad_(False)
    size = cfg["sample_size"]
    adapter = RandomPromptAdapter(
        device=args.device,
        dtype=args.dtype,
        height=size,
        width=size,
        family=name,
        text_tokens=text,
        text_dim=text_dim,
        pooled_dim=pooled,
    )
    adapter.transformer = transformer
    return adapter


#: strategy → (policy spec, what stands in for skipped work); ``args`` fills α and t0
STRATEGIES = {
    "cat": lambda a: ({"name": "cat", "alpha": a.alpha, "start_step": a.start_step}, None),
    "cat_sklearn": lambda a: (
        {"name": "cat", "alpha": a.alpha, "start_step": a.start_step, "clusterer": {"name": "kmeans_sklearn"}},
        None,
    ),
    "sequential": lambda a: ({"name": "sequential", "alpha": a.alpha, "start_step": a.start_step}, None),
    "taylorseer": lambda a: (
        "full",
        {"step_cache": {"name": "taylorseer", "cache_interval": 3, "start_step": a.start_step}},
    ),
    "schedule": lambda a: (
        {"name": "budget_schedule", "pattern": [1, 0, 0], "start_step": a.start_step},
        {"rule": {"name": "taylor"}},
    ),
    "adaptive": lambda a: (
        {"name": "adaptive_schedule", "threshold": 0.4, "max_skip": 6, "start_step": min(4, a.start_step)},
        {"rule": {"name": "taylor"}},
    ),
}
#: the default rows; ``cat_sklearn`` (cat clustering with scikit-learn on the host, the authors' exact path)
#: is asked for by name, to compare its selection share with the default's on-device clustering
DEFAULT_STRATEGIES = ("cat", "sequential", "taylorseer", "schedule")
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
            parts = StepReuse(
                rule=reuses.build(reuse["rule"]) if "rule" in reuse else None,
                step_cache=stepcaches.build(reuse["step_cache"]) if "step_cache" in reuse else None,
            )
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
        transformer = new_transformer(name, cls, cfg)
    adapter = RandomPromptAdapter(
        device=args.device,
        dtype=args.dtype,
        height=cfg["sample_size"],
        width=cfg["sample_size"],
        family=name,
        text_tokens=text,
        text_dim=text_dim,
        pooled_dim=pooled,
    )
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
            rows.append(
                dict(
                    model=name,
                    strategy=strategy_name,
                    mode="graphed" if graphs else "eager",
                    steps=steps,
                    layers=depth,
                    ops=counter.count,
                )
            )
            print(
                f"{name:<7} {depth:>6} {strategy_name:<9} {rows[-1]['mode']:<8} {steps:>5} {counter.count:>10} "
                f"{counter.count / steps:>10.0f}",
                flush=True,
            )
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
    release_graphs(adapter.transformer)
    return rows


def macs_only(name: str, args) -> list[dict]:
    """Analytic MACs at the family's full size, the model built on the meta device (no weights)."""
    from catlab.pruning import TokenPruner

    cls, cfg, text, _, _ = FULL_SIZE[name]
    with torch.device("meta"):
        transformer = new_transformer(name, cls, cfg)
    pruner = TokenPruner(transformer)
    tokens, rows = (cfg["sample_size"] // 2) ** 2, 1 if name == "flux" else 2  # FLUX: one branch, no CFG rows
    k = max(1, int(args.alpha * tokens))
    full, pruned = pruner.macs(rows, text, tokens), pruner.macs(rows, text, tokens, kept=k)
    out = []
    for steps in args.steps:
        t0 = min(args.start_step, steps)
        ratio = steps * full / (t0 * full + (steps - t0) * pruned)
        out.append(
            dict(
                model=name,
                steps=steps,
                tokens=tokens,
                text_tokens=text,
                kept=k,
                rows=rows,
                full_step_macs=full,
                pruned_step_macs=pruned,
                macs_ratio=ratio,
            )
        )
        print(
            f"{name:<7} {steps:>5} {tokens:>6} {text:>5} {k:>5} {rows:>4} {full / 1e12:>14.2f} {pruned / 1e12:>16.2f} "
            f"{ratio:>10.2f}x",
            flush=True,
        )
    return out


MODES = ("eager", "compiled", "graphed", "compiled+graphed")


def modes(args) -> list[str]:
    if args.modes:
        return args.modes
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
            for steps in steps_list:
                (full_s, full), *timings = timed(adapter, makes, steps, args.repeats, batch, graphs)
                for s, make, (pruned_s, trace) in zip(names, makes[1:], timings):
                    share = selection_share(adapter, make, steps, trace, batch, graphs) if s != "taylorseer" else 0.0
                    label = mode if not graphs or (full.graphed and trace.graphed) else mode + " (ran eager)"
                    row = dict(
                        model=name,
                        mode=label,
                        batch=batch,
                        steps=steps,
                        strategy=s,
                        tokens=full.num_tokens,
                        full_s=full_s,
                        pruned_s=pruned_s,
                        speedup=full_s / pruned_s,
                        macs_ratio=full.macs / trace.macs,
                        selection=share,
                    )
                    row["of_macs"] = row["speedup"] / row["macs_ratio"]
                    if graphs:
                        row.update(graph_fields(full, trace))
                    emit(row, args)
                    rows.append(row)
        if mode == "eager" and args.peers:
            rows += bench_peer(name, args, adapter, strategy("full", args))
    uncompile(adapter.transformer)
    release_graphs(adapter.transformer)
    return rows


def graph_fields(full: Trace, trace: Trace) -> dict:
    """The strategy generation's graph counters, and every refusal of both generations (the full model's as ``full:
    ...``).
    """
    counts = trace.graph_counts
    refusals = list(counts.get("refusals", [])) + [f"full: {r}" for r in full.graph_counts.get("refusals", [])]
    return {**{k: counts.get(k, 0) for k in COUNTERS}, "refusals": refusals}


def emit(row: dict, args) -> None:
    """Print the row and, with ``--jsonl``, append it to that file at once (a killed run keeps it)."""
    print(_format(row), flush=True)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")


def bench_peer(name: str, args, adapter, make_full) -> list[dict]:
    """cache-dit's DBCache against the full model, eager, in the same process and the same way."""
    cache = stepcaches.build(
        {"name": "cachedit_dbcache", "threshold": args.peer_threshold, "start_step": args.start_step}
    )
    reuse = StepReuse(step_cache=cache)
    label = f"dbcache({args.peer_threshold:g})"
    make_cached = lambda: (selectors.build("full"), reuse)  # noqa: E731
    sample(
        adapter,
        selectors.build("full"),
        ["a prompt"],
        [0],
        SamplerConfig(num_steps=args.start_step + 2, guidance_scale=4.5, progress=False),
        reuse,
    )  # warm-up
    rows = []
    for steps in args.steps:
        (full_s, full), (cached_s, cached) = timed(adapter, [make_full, make_cached], steps, args.repeats)
        speedup, macs = full_s / cached_s, full.macs / cached.macs
        rows.append(
            dict(
                model=name,
                mode="eager",
                batch=1,
                steps=steps,
                strategy=label,
                tokens=full.num_tokens,
                full_s=full_s,
                pruned_s=cached_s,
                speedup=speedup,
                macs_ratio=macs,
                of_macs=speedup / macs,
                selection=0.0,
            )
        )
        emit(rows[-1], args)
    return rows


HEADER = (
    "model   mode              batch steps tokens strategy          full s  strat. s  speed-up  MACs ratio"
    "  speed-up/MACs  selection share"
)


def _format(r: dict) -> str:
    return (
        f"{r['model']:<7} {r['mode']:<17} {r['batch']:>5} {r['steps']:>5} {r['tokens']:>6} {r['strategy']:<16} "
        f"{r['full_s']:>7.3f}  {r['pruned_s']:>8.3f}  {r['speedup']:>7.2f}x  {r['macs_ratio']:>9.2f}x  "
        f"{100 * r['of_macs']:>12.0f}%  {100 * r['selection']:>14.1f}%"
    )


def markdown(rows: list[dict]) -> str:
    """The rows as the table of docs/performance.md."""
    names = {"sd3": "SD3-medium", "pixart": "PixArt-Σ", "flux": "FLUX.1-dev"}
    counted = any("forward_replays" in r for r in rows)
    lines = [
        "| model | mode | batch | steps | strategy | full (s) | strategy (s) | speed-up | MACs ratio | "
        "speed-up / MACs | selection share |"
        + (" graphs: forward, selection (captures / replays) |" if counted else ""),
        "| --- " * (11 + counted) + "|",
    ]
    for r in rows:
        graphs = ""
        if counted:
            graphs = (
                f" {r['forward_captures']} / {r['forward_replays']}, {r['selection_captures']} / "
                f"{r['selection_replays']}{'; ' + '; '.join(r['refusals']) if r['refusals'] else ''} |"
                if "forward_replays" in r
                else " – |"
            )
        lines.append(
            f"| {names.get(r['model'], r['model'])} | {r['mode']} | {r['batch']} | {r['steps']} | "
            f"{r['strategy']} | {r['full_s']:.3f} | {r['pruned_s']:.3f} | {r['speedup']:.2f}× | "
            f"{r['macs_ratio']:.2f}× | {100 * r['of_macs']:.0f}% | {100 * r['selection']:.1f}% |" + graphs
        )
    return "\n".join(lines)


def summarize(path: str) -> str:
    """The table of the rows a run appended to ``path`` (``--jsonl``), however far it got."""
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return f"no bench rows: {path} was not written"
    return markdown(rows) if rows else f"no bench rows in {path}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on a CPU")
    parser.add_argument(
        "--models",
        "--family",
        dest="models",
        default="sd3,pixart",
        help="families, any of sd3, pixart, flux (comma-separated)",
    )
    parser.add_argument("--steps", default="28,50")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES), help=f"any of {', '.join(STRATEGIES)}")
    parser.add_argument(
        "--batch",
        default=None,
        help="prompts per batch, e.g. 1,4 (beyond 1: full against cat only); default 1,4 on CUDA, 1 on a CPU",
    )
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--start-step", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the blocks compiled by compile_pruned")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--graphs", action="store_true", help="also time each forward replayed from CUDA graphs")
    parser.add_argument(
        "--modes",
        default=None,
        help=f"exactly these modes, any of {', '.join(MODES)} (instead of --compile / --graphs)",
    )
    parser.add_argument("--tiny", action="store_true", help="small shapes (1 block, 64 tokens): a smoke test")
    parser.add_argument("--hidden", type=int, default=0, help="width of a scaled model (multiple of 64)")
    parser.add_argument("--tokens", type=int, default=0, help="image tokens of a scaled model (a square)")
    parser.add_argument("--layers", type=int, default=4, help="blocks of a scaled model")
    parser.add_argument("--text-tokens", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument(
        "--peers",
        action="store_true",
        help='also time cache-dit\'s DBCache against the full model (pip install "catlab[peers]")',
    )
    parser.add_argument("--peer-threshold", type=float, default=0.24, help="cache-dit DBCache residual_diff_threshold")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file, at the end")
    parser.add_argument("--jsonl", default=None, help="append each row to this file as a JSON line, as it is measured")
    parser.add_argument(
        "--summarize",
        default=None,
        metavar="JSONL",
        help="instead of measuring: the table of the rows in this --jsonl file",
    )
    parser.add_argument(
        "--macs-only",
        action="store_true",
        help="instead of timing: analytic MACs at each family's full size (built on the meta device)",
    )
    parser.add_argument(
        "--count-ops",
        action="store_true",
        help="instead of timing: operators the host dispatches per generation, eager and graphed",
    )
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return []
    diffusers_logging.set_verbosity_error()  # casting random weights to fp16 is intended here
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    args.steps = [int(s) for s in args.steps.split(",")]
    args.batch = [int(b) for b in (args.batch or ("1,4" if args.device.startswith("cuda") else "1")).split(",")]
    args.strategies = [s for s in args.strategies.split(",") if s]
    if args.modes:
        args.modes = [m for m in args.modes.split(",") if m]
        if set(args.modes) - set(MODES):
            parser.error(f"unknown modes {sorted(set(args.modes) - set(MODES))}; choose from {', '.join(MODES)}")
    families = sorted(set(args.models.split(",")) - set(FULL_SIZE))
    if families:
        parser.error(f"unknown families {families}; choose from {', '.join(FULL_SIZE)}")
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
    if args.macs_only:
        print(
            f"analytic MACs of the transformer (selection not included), cat alpha={args.alpha} t0={args.start_step}"
        )
        print("model   steps tokens  text  kept rows  full step TMAC  pruned step TMAC  MACs ratio")
        return [r for name in args.models.split(",") for r in macs_only(name, args)]
    if args.count_ops:
        print(
            f"host-dispatched operators (views left out), {args.steps[0]} steps, batch 1 with CFG, "
            f"cat alpha={args.alpha} t0={args.start_step}; full depth, small width"
        )
        print("model   layers strategy  mode     steps  per gen.   per step")
        rows = [r for name in args.models.split(",") for r in count_ops(name, args)]
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=gpu, torch=torch.__version__, argv=argv or sys.argv[1:], rows=rows), f, indent=1)
        return rows
    print(
        f"device {args.device} ({gpu}), torch {torch.__version__}, {args.dtype}, "
        f"{torch.get_num_threads()} CPU threads, classifier-free guidance (FLUX: its guidance input, one branch); "
        f"alpha={args.alpha}, t0={args.start_step}; modes: {', '.join(modes(args))}"
    )
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
        with open(args.json, "w") as f:
            json.dump(dict(device=gpu, torch=torch.__version__, argv=argv or sys.argv[1:], rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
