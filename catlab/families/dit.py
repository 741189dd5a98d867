"""DiT, one module: a class-conditional diffusion transformer added through the family route.

DiT (``DiTTransformer2DModel``, Peebles & Xie) runs ``BasicTransformerBlock``\\ s with
``ada_norm_zero``: adaLN-Zero modulation from the timestep and the class label, image
self-attention only (no text), and a final adaLN and projection (``proj_out_2``) per
token. It needs nothing beyond catlab's built-in pieces, so this module is only data:
its spec (catlab's generic self-attention processor), its MAC formula and a tiny
adapter; ``conf/model/tiny_dit.yaml`` is its config. It is the worked example of
docs/architecture.md's "Adding a family" checklist, and ``tests/test_family_route.py``
checks that nothing outside these two files names it.

Prompts are class-conditional here: a prompt picks a class by its hash (the empty prompt
is the null class classifier-free guidance drops to), so ``catlab.run`` drives it as it
drives the text-to-image families.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from diffusers import DiTTransformer2DModel, DPMSolverMultistepScheduler

from catlab.models.base import Conditioning, with_unconditional
from catlab.models.tiny import TinyAdapter
from catlab.pruning.families import FamilySpec, UnsupportedModelError, linear_macs
from catlab.pruning.processors import PrunedSelfAttnProcessor
from catlab.registry import families, models


def dit_macs(t, rows: int, n: int, n_total: int, n_text: int) -> int:
    """One DiT forward with ``n`` of ``n_total`` image tokens recomputed (no text tokens)."""
    proj = t.pos_embed.proj
    per_row = n_total * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * proj.out_channels
    for blk in t.transformer_blocks:
        a = blk.attn1
        per_row += linear_macs(blk.norm1)  # the block's timestep/class embedding and its adaLN-Zero projection
        per_row += n * (linear_macs(a.to_q) + linear_macs(a.to_k) + linear_macs(a.to_v) + linear_macs(a.to_out[0]))
        per_row += 2 * n * n_total * a.to_q.out_features
        per_row += n * linear_macs(blk.ff)
    # the output's adaLN: block 0's embedding again, its projection, then the per-token projection
    per_row += (
        linear_macs(t.transformer_blocks[0].norm1.emb) + linear_macs(t.proj_out_1) + n * linear_macs(t.proj_out_2)
    )
    return rows * per_row


def check_dit(t) -> None:
    """Only adaLN-Zero self-attention blocks (DiT's own layout) are pruned."""
    for i, blk in enumerate(t.transformer_blocks):
        if blk.norm_type != "ada_norm_zero" or blk.attn2 is not None:
            raise UnsupportedModelError(
                f"block {i}: DiT pruning needs BasicTransformerBlock(norm_type='ada_norm_zero') "
                "with self-attention only"
            )


DIT = families.register("dit")(
    FamilySpec(
        name="dit",
        title="DiT",
        transformer_type="DiTTransformer2DModel",
        block_type="BasicTransformerBlock",
        attentions=(("attn1", PrunedSelfAttnProcessor),),
        macs=dit_macs,
        output_proj="proj_out_2",
        check=check_dit,
        layer_modules=(("attn1", "attn"), ("ff", "mlp")),
    )
)


def class_of(prompt: str, num_classes: int) -> int:
    """A prompt's class: its hash; the empty prompt is the null class (``num_classes``)."""
    return num_classes if not prompt else zlib.crc32(prompt.encode()) % num_classes


@models.register("tiny_dit")
@dataclass
class TinyDiT(TinyAdapter):
    """A DiT-architecture transformer (learned sigma, adaLN-Zero, class labels) with seeded random weights,
    in pixel space; classifier-free guidance on stacked rows with the null class."""

    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.height != self.width:
            raise ValueError(f"tiny_dit: DiT unpatchifies a square grid; got height={self.height} width={self.width}")
        super().__post_init__()

    def build(self):
        return DiTTransformer2DModel(
            num_attention_heads=self.num_heads,
            attention_head_dim=self.head_dim,
            in_channels=3,
            out_channels=6,
            num_layers=self.num_layers,
            sample_size=self.height // self.patch,
            patch_size=self.patch,
            num_embeds_ada_norm=self.num_classes,
        )

    def make_scheduler(self):
        return DPMSolverMultistepScheduler()

    def encode(self, prompts: list[str], guidance: bool) -> Conditioning:
        labels = [class_of(p, self.num_classes) for p in with_unconditional(prompts, guidance)]
        kw = dict(class_labels=torch.tensor(labels, device=self.torch_device))
        return Conditioning(kw, 2 if guidance else 1, 0)

    def predict(self, latents, timestep, cond):
        t = timestep.expand(latents.shape[0])
        out = self.transformer(latents, timestep=t, return_dict=False, **cond.kwargs)[0]
        return out[:, : latents.shape[1]]  # drop the learned variance
