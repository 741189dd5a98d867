"""Evaluate the embedded model and its attribute probe on the held-out prompts.

    python experiments/embedded_eval.py                      # 200 prompts, 28 steps, CFG 7.0
    python experiments/embedded_eval.py --grid docs/img/embedded_grid.png
    python experiments/embedded_eval.py --model embedded_64  # the 64x64 model (1024 tokens)

Prints two figures:
  probe accuracy   the probe's attribute accuracy on the *rendered* held-out scenes
  model accuracy   the probe's attribute accuracy on images the model *generates* from
                   the held-out captions (diffusers FlowMatchEulerDiscreteScheduler + CFG)
plus a per-attribute breakdown, and both by the number of objects a prompt states. With --grid it also writes a PNG:
rows of generated
images, each above the rendered scenes of the same captions.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from catlab.embedded.bundle import load_bundle, save_grid
from catlab.embedded.denoiser import generate
from catlab.embedded.probe import ATTRIBUTES, attribute_hits, load_probe, probe_path_for
from catlab.embedded.world import heldout_scenes, render

MODELS = {"embedded": None, "embedded_64": "bundle_64"}  # as conf/model/<name>.yaml's `path`


def summarise(hits: list[torch.Tensor]) -> dict:
    """Mean per-prompt accuracy, and each attribute's share over all stated objects."""
    per_prompt = torch.stack([h.float().mean() for h in hits])
    flat = torch.cat(hits).float()
    return {"accuracy": per_prompt.mean().item(), **{a: flat[:, i].mean().item() for i, a in enumerate(ATTRIBUTES)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="embedded",
        help="which shipped bundle: embedded (32x32, 256 tokens) or embedded_64 (64x64, 1024 tokens)",
    )
    ap.add_argument("--bundle", default=None, help="bundle directory (overrides --model)")
    ap.add_argument("--probe", default=None, help="probe directory (default: the bundle's own, else the shipped one)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out set and of the sampling noise")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", default=None, help="write a generated-vs-rendered PNG grid here")
    ap.add_argument("--grid-n", type=int, default=16)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    bundle_path = args.bundle if args.bundle is not None else MODELS[args.model]
    bundle, probe = load_bundle(bundle_path), load_probe(args.probe or probe_path_for(bundle_path))
    scenes, captions = heldout_scenes(args.n, seed=args.seed)
    real = render(scenes, bundle.image_size) * 2 - 1

    start = time.time()
    fake = generate(bundle, captions, steps=args.steps, guidance=args.guidance, seed=args.seed)
    seconds = time.time() - start

    result = {
        "bundle": str(bundle_path or "bundle"),
        "image_size": bundle.image_size,
        "n_prompts": args.n,
        "steps": args.steps,
        "guidance": args.guidance,
        "probe_on_rendered": summarise(attribute_hits(real, scenes, probe)),
        "model": summarise(hits := attribute_hits(fake, scenes, probe)),
        # one-object prompts test drawing; two-object prompts also test binding attributes to objects
        "model_by_objects": {
            n: summarise([h for h in hits if len(h) == n]) | {"prompts": sum(len(h) == n for h in hits)}
            for n in sorted({len(h) for h in hits})
        },
        "sampling_seconds": round(seconds, 1),
    }
    print(json.dumps(result, indent=2))
    print(f"probe accuracy (rendered held-out scenes): {result['probe_on_rendered']['accuracy']:.3f}")
    print(
        f"model attribute accuracy ({args.n} held-out prompts, {args.steps} steps, CFG {args.guidance}): "
        f"{result['model']['accuracy']:.3f}"
    )
    for n, r in result["model_by_objects"].items():
        print(f"  prompts with {n} object(s): {r['prompts']}, accuracy {r['accuracy']:.3f}")

    if args.grid:
        k, half = args.grid_n, args.grid_n // 2
        rows = [fake[:half], real[:half], fake[half:k], real[half:k]]
        save_grid(torch.cat(rows), args.grid, nrow=half)
        for i, c in enumerate(captions[:k]):
            print(f"grid {i // half * 2 + 1}.{i % half + 1}: {c}")


if __name__ == "__main__":
    main()
