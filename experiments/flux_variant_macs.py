"""MACs of one generation of each tiny FLUX.1 pipeline variant, unpruned and under ``cat`` (alpha 0.5 from step 2).

Prints a markdown table (docs/pipelines.md quotes it): 64x64, 4 steps run, 32 text tokens. The ControlNet's
MACs (it runs every token) are in its rows; Kontext is shown with its reference tokens computed at every step
and cached (computed at full steps only).

    python experiments/flux_variant_macs.py
"""

from __future__ import annotations

import torch

import catlab
from catlab.stock_pipelines import controlnet_macs
from catlab.testing.tiny_flux_variants import (
    flux_controlnet_pipeline,
    flux_fill_pipeline,
    flux_img2img_pipeline,
    flux_inpaint_pipeline,
    flux_kontext_pipeline,
    tiny_image,
    tiny_mask,
)

IMAGE, MASK = tiny_image(), tiny_mask()
ROWS = [
    ("img2img, strength 0.8 of 5 steps", flux_img2img_pipeline, dict(image=IMAGE, strength=0.8), 5, {}),
    (
        "inpaint, strength 0.8 of 5 steps",
        flux_inpaint_pipeline,
        dict(image=IMAGE, mask_image=MASK, strength=0.8),
        5,
        {},
    ),
    ("Fill", flux_fill_pipeline, dict(image=IMAGE, mask_image=MASK), 4, {}),
    ("ControlNet", flux_controlnet_pipeline, dict(control_image=IMAGE), 4, {}),
    (
        "Kontext, reference computed",
        flux_kontext_pipeline,
        dict(image=IMAGE, _auto_resize=False, max_area=64**2),
        4,
        {},
    ),
    (
        "Kontext, reference cached",
        flux_kontext_pipeline,
        dict(image=IMAGE, _auto_resize=False, max_area=64**2),
        4,
        dict(reference_tokens="cached"),
    ),
]


def generation_macs(pipe, call: dict, steps: int, alpha: float, settings: dict) -> int:
    catlab.enable_pruning(pipe, catlab.selectors.build({"name": "cat", "alpha": alpha, "start_step": 1}), **settings)
    pipe(
        prompt="a red circle",
        height=64,
        width=64,
        num_inference_steps=steps,
        max_sequence_length=32,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **call,
    )
    macs = sum(catlab.pruning_macs(pipe)) + sum(controlnet_macs(pipe))  # the ControlNet runs beside it, unpruned
    catlab.disable_pruning(pipe)
    return macs


def main() -> None:
    torch.set_num_threads(1)
    print("| pipeline | MACs, alpha = 1 | MACs, cat alpha = 0.5 | full / pruned |")
    print("| --- | ---: | ---: | ---: |")
    for label, build, call, steps, settings in ROWS:
        pipe = build()
        full = generation_macs(pipe, call, steps, 1.0, {})
        pruned = generation_macs(pipe, call, steps, 0.5, settings)
        print(f"| {label} | {full / 1e6:.1f} M | {pruned / 1e6:.1f} M | {full / pruned:.2f} |")


if __name__ == "__main__":
    main()
