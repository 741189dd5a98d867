"""AT-EDM (Wang et al., CVPR 2024) as its paper describes it: token pruning inside each denoising step.

Read from the AT-EDM paper and carried over from SD-XL's U-Net to an SD3-family DiT
(``catlab/pruning/instep.py`` runs it):

* **single-step pruning.** At each pruning layer the attention map of the current
  step (image→image, averaged over heads) ranks the active tokens by Generalized
  Weighted PageRank; after that block's feed-forward the least important are
  dropped, and later blocks run on fewer tokens. With several ``prune_layers`` the
  pruning is progressive: after the j-th of m layers ⌊α^(j/m)·N⌋ tokens remain, ⌊α·N⌋
  after the last (catlab's one k rule).
* **similarity-based recovery.** Dropped tokens get the output of the kept token
  they attend to most (the attention map as the similarity), after the output
  projection: a DiT has no convolution to restore them for, only the unpatchify.
  ``recovery: hold`` is the DiT-natural alternative: a dropped token keeps its own
  hidden state from the block where it was dropped.
* **DSAP** (denoising-steps-aware pruning). In the first ``dsap_steps`` pruned steps
  only the last pruning layer prunes, so the earlier ones run unpruned and those
  steps cost more, as AT-EDM leaves blocks unpruned in early steps.

Where the reading was uncertain (the stand-in's similarity measure, where recovery
happens in a DiT, DSAP's exact form, the layers to prune at) the choice is a field,
and ``docs/selection.md`` says so. Nothing is cached between steps, so the sampler
sees every step as a full one; MACs are counted as the forward runs them. The CAT
paper's adaptation (AT-EDM's ranking with CAT's cache-and-reuse) is ``atedm_reuse``.

AT-EDM has no spatial part in a DiT: G-WPR and the similarity-based recovery read the
attention map, whatever the grid, so on a video grid both run over all the clip's
tokens at once (space and time), and the budget is ⌊α·N⌋ of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from catlab.capabilities import Capability
from catlab.registry import selectors
from catlab.selection.base import Policy, StepState, kept_tokens


@selectors.register("atedm")
@dataclass
class AtEdm(Policy):
    """In-step AT-EDM: prune after ``prune_layers`` by G-WPR, restore by copy, DSAP in early steps.

    ``alpha`` is the share of image tokens left after the last pruning layer; steps
    ``1..start_step`` run unpruned (the CAT paper prunes its AT-EDM baseline from step 9).
    """

    #: prunes inside the forward: the run's assembly installs the in-step engine instead of selecting tokens
    capabilities: ClassVar[Capability] = Capability.IN_STEP_ENGINE

    prune_layers: list = field(default_factory=lambda: [0, 1])
    iterations: int = 20
    dsap_steps: int = 5
    recovery: str = "copy"

    def __post_init__(self) -> None:
        super().__post_init__()
        layers = [int(x) for x in self.prune_layers]
        if not layers or layers != sorted(set(layers)) or layers[0] < 0:
            raise ValueError(
                f"atedm: prune_layers must be increasing block indices >= 0; got {list(self.prune_layers)}"
            )
        if int(self.iterations) < 1 or int(self.dsap_steps) < 0:
            raise ValueError(f"atedm: iterations >= 1 and dsap_steps >= 0; got {self.iterations}, {self.dsap_steps}")
        self.prune_layers = layers
        if self.recovery not in ("copy", "hold"):
            raise ValueError(f"atedm: recovery must be 'copy' (AT-EDM's) or 'hold'; got {self.recovery!r}")

    def num_kept(self, step: int, num_tokens: int) -> int | None:
        return None  # nothing is selected between steps: every step runs the whole (internally pruned) forward

    def plan(self, step: int, num_tokens: int) -> dict[int, int]:
        """Tokens left after each pruning layer at ``step`` (1-based); ``{}`` for an unpruned step."""
        if step <= self.start_step:
            return {}
        layers = self.prune_layers
        if step - self.start_step <= int(self.dsap_steps):
            layers = layers[-1:]
        m = len(layers)
        return {layer: kept_tokens(float(self.alpha) ** ((j + 1) / m), num_tokens) for j, layer in enumerate(layers)}

    def select(self, state: StepState) -> torch.Tensor:
        raise RuntimeError("atedm prunes inside each forward; it selects no tokens between steps")
