"""Wall-clock speed-up of CAT Pruning at SD3-medium and PixArt-Σ scale, against the MACs ratio.

Builds each transformer from its published config with random weights (cost does
not depend on the weights; nothing is downloaded), feeds random prompt embeddings
of the right shapes, and times ``catlab.sampler.sample`` for the full model and
for the pruning policy (CAT at α = 0.3, t0 = 8; ``random`` if ``cat`` is not
registered) at each step count, batch 1 with classifier-free guidance. Each pair
runs in the same process, interleaved, after a warm-up; the time of a generation
is the fastest of ``--repeats`` (device-synchronised at the end of the loop).
``--compile`` adds the same pairs with the blocks compiled by ``compile_pruned``.
``--peers`` adds, per model and step count, cache-dit's DBCache (``cachedit_dbcache``:
F1B0, ``--peer-threshold``, the same warm-up t0) against the full model, eager, timed
the same way (skipped, with the reason printed, when cache-dit is not installed:
``pip install "catlab[peers]"``). With random weights the steps DBCache reuses are
not those of a trained model: read its row as speed-up per MACs saved (its MACs are
counted as they run), not as the MACs a real model would save.

    python experiments/gpu_bench.py                          # SD3-medium and PixArt-Σ shapes, fp16, CUDA
    python experiments/gpu_bench.py --compile                # ... also compiled
    python experiments/gpu_bench.py --device cpu --tiny      # small shapes: a smoke test on any CPU
    python experiments/gpu_bench.py --peers                  # ... and cache-dit's DBCache beside them
    python experiments/gpu_bench.py --device cpu --hidden 384 --tokens 1024 --models sd3 --steps 28

The last line is a compute-bound configuration for a CPU: an SD3-architecture
transformer (``--layers`` blocks, 64-dim heads) with ``--hidden`` width and
``--tokens`` image tokens.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
from diffusers.utils import logging as diffusers_logging
from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel,
                       SD3Transformer2DModel)

from catlab.models.base import Conditioning, ModelAdapter
from catlab.pruning import compile_pruned, uncompile
from catlab.registry import selectors
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


def pruning_policy(args):
    name = "cat" if "cat" in selectors.names() else "random"
    return name, lambda: selectors.build({"name": name, "alpha": args.alpha, "start_step": args.start_step})


def timed(adapter, make_policies, steps: int, repeats: int, reuses: list | None = None) -> list[tuple[float, Trace]]:
    """For each policy: (seconds of one generation, a trace); policies interleaved so drift hits all alike.

    On an accelerator the seconds are the fastest generation (synchronised at the end
    of the loop). On a CPU, which other processes may share, they are the sum over
    steps of each step's fastest time: a burst of contention then spoils one step of
    one repeat, not a whole generation. ``reuses[i]`` (a :class:`StepReuse`, e.g. a step
    cache) goes with policy ``i``.
    """
    cfg = SamplerConfig(num_steps=steps, guidance_scale=4.5, progress=False)
    reuses = reuses or [None] * len(make_policies)
    traces: list[list[Trace]] = [[] for _ in make_policies]
    for _ in range(repeats):
        for i, make in enumerate(make_policies):
            traces[i].append(sample(adapter, make(), ["a prompt"], [0], cfg, reuses[i]).trace)
    if adapter.torch_device.type != "cpu":
        return [min(((t.seconds, t) for t in ts), key=lambda x: x[0]) for ts in traces]
    return [(sum(min(t.steps[j].seconds for t in ts) for j in range(steps)), ts[0]) for ts in traces]


def selection_share(adapter, make_policy, steps: int, trace: Trace) -> float:
    """Share of a generation's time spent selecting; on an accelerator from one extra synchronised run."""
    if adapter.torch_device.type != "cpu":
        trace = sample(adapter, make_policy(), ["a prompt"], [0],
                       SamplerConfig(num_steps=steps, guidance_scale=4.5, progress=False, sync_timing=True)).trace
    return trace.selection_seconds / sum(s.seconds for s in trace.steps)


def bench(name: str, args, policy_name: str, make_policy) -> list[dict]:
    adapter = build(name, args)
    make_full = lambda: selectors.build("full")  # noqa: E731
    rows = []
    for mode in ["eager", "compiled"] if args.compile else ["eager"]:
        if mode == "compiled":
            compile_pruned(adapter.transformer, mode=args.compile_mode)
        warm = SamplerConfig(num_steps=args.start_step + 2, guidance_scale=4.5, progress=False)
        for make in (make_full, make_policy):  # warm-up: allocator, kernels, both compiled graphs, clustering
            sample(adapter, make(), ["a prompt"], [0], warm)
        for steps in args.steps:
            (full_s, full), (pruned_s, pruned) = timed(adapter, [make_full, make_policy], steps, args.repeats)
            share = selection_share(adapter, make_policy, steps, pruned)
            speedup, macs = full_s / pruned_s, full.macs / pruned.macs
            rows.append(dict(model=name, mode=mode, steps=steps, tokens=full.num_tokens, full_s=full_s,
                             pruned_s=pruned_s, speedup=speedup, macs_ratio=macs, of_macs=speedup / macs,
                             selection=share))
            print(_format(rows[-1], policy_name), flush=True)
        if mode == "eager" and args.peers:
            rows += bench_peer(name, args, adapter, make_full)
        uncompile(adapter.transformer)
    return rows


def bench_peer(name: str, args, adapter, make_full) -> list[dict]:
    """cache-dit's DBCache against the full model, eager, in the same process and the same way."""
    cache = stepcaches.build({"name": "cachedit_dbcache", "threshold": args.peer_threshold, "start_step": args.start_step})
    reuse = StepReuse(step_cache=cache)
    label = f"dbcache({args.peer_threshold:g})"
    sample(adapter, make_full(), ["a prompt"], [0], SamplerConfig(num_steps=args.start_step + 2, guidance_scale=4.5,
                                                                 progress=False), reuse)  # warm-up
    rows = []
    for steps in args.steps:
        (full_s, full), (cached_s, cached) = timed(adapter, [make_full, make_full], steps, args.repeats, [None, reuse])
        speedup, macs = full_s / cached_s, full.macs / cached.macs
        rows.append(dict(model=name, mode="cache-dit", steps=steps, tokens=full.num_tokens, full_s=full_s,
                         pruned_s=cached_s, speedup=speedup, macs_ratio=macs, of_macs=speedup / macs, selection=0.0,
                         policy=label))
        print(_format(rows[-1], label), flush=True)
    return rows


HEADER = "model   mode      steps tokens  full s   {:<8} speed-up  MACs ratio  speed-up/MACs  selection share"


def _format(r: dict, policy_name: str) -> str:
    return (f"{r['model']:<7} {r['mode']:<9} {r['steps']:>5} {r['tokens']:>6} {r['full_s']:>7.3f}  {r['pruned_s']:>7.3f}  "
            f"{r['speedup']:>7.2f}x  {r['macs_ratio']:>9.2f}x  {100 * r['of_macs']:>12.0f}%  {100 * r['selection']:>14.1f}%")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on a CPU")
    parser.add_argument("--models", default="sd3,pixart")
    parser.add_argument("--steps", default="28,50")
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--start-step", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the blocks compiled by compile_pruned")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--tiny", action="store_true", help="small shapes (1 block, 64 tokens): a smoke test")
    parser.add_argument("--hidden", type=int, default=0, help="width of a scaled model (multiple of 64)")
    parser.add_argument("--tokens", type=int, default=0, help="image tokens of a scaled model (a square)")
    parser.add_argument("--layers", type=int, default=4, help="blocks of a scaled model")
    parser.add_argument("--text-tokens", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--peers", action="store_true",
                        help='also time cache-dit\'s DBCache against the full model (pip install "catlab[peers]")')
    parser.add_argument("--peer-threshold", type=float, default=0.24, help="cache-dit DBCache residual_diff_threshold")
    args = parser.parse_args(argv)
    diffusers_logging.set_verbosity_error()  # casting random weights to fp16 is intended here
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    args.steps = [int(s) for s in args.steps.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    policy_name, make_policy = pruning_policy(args)
    if args.peers:
        from catlab.stepcache.cachedit import INSTALL, available

        if not available():
            print(f"cache-dit row skipped: cache-dit is not installed ({INSTALL})")
            args.peers = False

    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}), "
          f"{args.dtype}, {torch.get_num_threads()} CPU threads, batch 1 with CFG; pruning policy: {policy_name} (alpha={args.alpha}, t0={args.start_step})"
          + ("" if policy_name == "cat" else "  [cat is not registered: random instead]"))
    print(HEADER.format(policy_name + " s"))
    if args.peers:
        print(f"(mode cache-dit: the {policy_name} s column is cache-dit DBCache F1B0, threshold {args.peer_threshold:g}, "
              f"t0={args.start_step}, against the full model)")
    rows = []
    for name in args.models.split(","):
        rows += bench(name, args, policy_name, make_policy)
    return rows


if __name__ == "__main__":
    main()
