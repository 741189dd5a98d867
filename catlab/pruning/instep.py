"""In-step progressive token pruning (AT-EDM's single-denoising-step pruning), in joint-attention blocks.

Unlike :class:`~catlab.pruning.engine.TokenPruner`, which computes one index set per
step and reuses cached values for the rest, this prunes *inside* one forward and
keeps no cache between steps:

1. the blocks before the first pruning layer run on every image token;
2. at each pruning layer the attention records its image→image probabilities
   (averaged over heads) for the tokens still active; after the layer's block
   (so after its feed-forward) the tokens are ranked by G-WPR on that map and the
   least important are dropped: later blocks run on fewer tokens, attending among
   the active image tokens and the text;
3. every dropped token is restored, so the unpatchify sees all N tokens:
   ``recovery="copy"`` (AT-EDM's similarity-based copy) gives it, after the output
   projection, the output of the token it attended to most when it was dropped;
   ``recovery="hold"`` keeps its own hidden state from the block where it was
   dropped (it skips the remaining blocks) and runs it through the final norm and
   projection with the others.

The text stream runs unpruned. Rows (the stacked guidance branches) are pruned
independently, each by its own attention map. The run's assembly calls :meth:`reset`
per generation and :meth:`context` around each forward; a step that the schedule does
not prune runs the stock forward. MACs are counted as they
run (``catlab.stepcache.macs.MacCounter``), G-WPR's power iteration included.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from catlab.pruning.families import UnsupportedModelError, family_of, family_specs
from catlab.pruning.processors import project_heads, split_heads
from catlab.selection.gwpr import gwpr

if TYPE_CHECKING:
    from catlab.selection.atedm import AtEdm


class _RecordingJointAttn:
    """A joint text+image attention (no rotary table) that, when asked, also keeps the image→image
    probabilities of its active tokens.

    The image queries are computed explicitly (softmax(QKᵀ)·V, so the map costs nothing
    extra and the MAC counter sees the matmuls); the text queries use SDPA. When not
    recording it defers to the processor it replaced.
    """

    def __init__(self, engine: InStepPruning, original):
        self.engine, self.original = engine, original
        self.probs: torch.Tensor | None = None
        self.recording = False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if not self.recording or encoder_hidden_states is None or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        rows, n, _ = hidden_states.shape
        h = attn.heads
        e = encoder_hidden_states
        key = torch.cat(
            [
                project_heads(attn.to_k, attn.norm_k, hidden_states, h),
                project_heads(attn.add_k_proj, attn.norm_added_k, e, h),
            ],
            1,
        ).transpose(1, 2)
        value = torch.cat([split_heads(attn.to_v(hidden_states), h), split_heads(attn.add_v_proj(e), h)], 1).transpose(
            1, 2
        )
        query = project_heads(attn.to_q, attn.norm_q, hidden_states, h).transpose(1, 2)
        text_query = project_heads(attn.add_q_proj, attn.norm_added_q, e, h).transpose(1, 2)
        probs = (torch.matmul(query, key.transpose(-1, -2)) * query.shape[-1] ** -0.5).softmax(-1)
        image_out = torch.matmul(probs.to(value.dtype), value)
        text_out = F.scaled_dot_product_attention(text_query, key, value)
        self.probs = probs[..., :n].float().mean(1)  # (rows, n, n): image→image, averaged over heads
        image_out = image_out.transpose(1, 2).reshape(rows, n, -1).to(hidden_states.dtype)
        text_out = text_out.transpose(1, 2).reshape(rows, e.shape[1], -1).to(hidden_states.dtype)
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return image_out, text_out


class InStepPruning:
    """The in-step engine of ``selector=atedm`` (see the module docstring).

    The run's assembly (:class:`catlab.assembly.PruningSession`) builds it for a selector that
    declares ``Capability.IN_STEP_ENGINE`` and holds it in its own slot: :meth:`apply` once,
    :meth:`reset` per generation, :meth:`context` around each forward, :meth:`remove` at the end.
    """

    def __init__(self, policy: AtEdm):
        self.policy = policy
        self._transformer = None
        self._handles: list = []
        self._procs: dict[int, _RecordingJointAttn] = {}
        self._plan: dict[int, int] = {}  # layer → tokens kept after it, this forward
        self.num_tokens = 0

    @property
    def name(self) -> str:
        return "atedm (in-step)"

    # -- lifecycle -------------------------------------------------------------------------------
    def apply(self, transformer: nn.Module) -> InStepPruning:
        """Install the hooks; a model or setting it cannot run raises its own error, nothing left installed."""
        self._transformer = transformer
        try:
            self._apply(transformer)
        except BaseException:
            self.remove(transformer)
            raise
        return self

    def _apply(self, transformer: nn.Module) -> None:
        blocks = getattr(transformer, "transformer_blocks", None)
        try:  # rotary families' joint blocks look alike but rotate Q/K: their specs do not declare in_step
            in_step = family_of(transformer).in_step
        except UnsupportedModelError:
            in_step = False
        if not in_step or not all(hasattr(b, "attn") and hasattr(b.attn, "add_k_proj") for b in blocks):
            allowed = [s for s in family_specs() if s.in_step]
            raise UnsupportedModelError(
                f"selector atedm prunes inside {', '.join(s.title or s.name for s in allowed)}-family transformers "
                f"({', '.join(s.transformer_type for s in allowed)}); {type(transformer).__name__} is not one: "
                "use selector=atedm_reuse"
            )
        layers = self.policy.prune_layers
        if max(layers) >= len(blocks) - 1:
            raise ValueError(
                f"atedm: prune_layers {list(layers)} must lie before the last of the "
                f"{len(blocks)} blocks (a block after the last pruning layer runs on the kept tokens)"
            )
        self._handles.append(transformer.pos_embed.register_forward_hook(self._start))
        for layer in layers:
            attn = blocks[layer].attn
            proc = _RecordingJointAttn(self, attn.processor)
            attn.processor = proc
            self._procs[layer] = proc
            self._handles.append(blocks[layer].register_forward_hook(self._after_block(layer)))
        self._handles.append(transformer.norm_out.register_forward_pre_hook(self._unhold))
        self._handles.append(transformer.proj_out.register_forward_hook(self._restore))

    def remove(self, transformer: nn.Module | None = None) -> None:
        transformer = transformer if transformer is not None else self._transformer
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if transformer is not None:
            for layer, proc in self._procs.items():
                transformer.transformer_blocks[layer].attn.processor = proc.original
        self._procs.clear()
        self._transformer = None

    def reset(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self._plan = {}
        self._source = None  # copy: (rows, N) position among the active tokens whose output each token takes
        self._held = None  # hold: (rows, N, D) hidden states of dropped tokens, as they were dropped
        self._origin = None  # hold: (rows, active) each active token's index among the N

    @contextlib.contextmanager
    def context(self, step: int, num_steps: int, **info):
        """Around one forward of ``step`` (1-based): the schedule decides what is pruned where."""
        self._step, self._num_steps = step, num_steps
        try:
            yield
        finally:
            self._step = 0  # a forward outside a step's context runs unpruned
            self._clear()
            for proc in self._procs.values():
                proc.recording, proc.probs = False, None

    # -- hooks ----------------------------------------------------------------------------------
    def _start(self, module, args, output):
        """After the patch embedding: the forward begins; decide this step's pruning plan."""
        rows, n = output.shape[:2]
        self.num_tokens = n
        self._clear()
        self._plan = self.policy.plan(getattr(self, "_step", 0), n)
        for layer, proc in self._procs.items():
            proc.recording, proc.probs = layer in self._plan, None
        return output

    def _after_block(self, layer: int):
        def hook(module, args, output):
            keep = self._plan.get(layer)
            if keep is None:
                return output
            context, hidden = output
            probs = self._procs[layer].probs
            rows, n, _ = hidden.shape
            if keep >= n:
                return output
            score = gwpr(probs, self.policy.iterations)
            kept = score.sort(dim=-1, descending=True, stable=True).indices[:, :keep]  # ties: lowest position
            gathered = hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1]))
            if self.policy.recovery == "hold":
                if self._held is None:
                    self._held = hidden.clone()
                    self._origin = torch.arange(n, device=hidden.device).expand(rows, -1)
                else:  # the tokens active until now take their hidden states from this block
                    index = self._origin[..., None].expand(-1, -1, hidden.shape[-1])
                    self._held = self._held.scatter(1, index, hidden)
                self._origin = self._origin.gather(1, kept)
                return context, gathered
            # similarity-based copy: a dropped token's stand-in is the kept token it attends to most;
            # a kept token stands for itself
            attn_to_kept = probs.gather(2, kept[:, None, :].expand(-1, n, -1))  # (rows, n, keep)
            stand_in = attn_to_kept.argmax(-1)  # (rows, n): a position among the kept
            position = torch.arange(keep, device=hidden.device).expand(rows, -1)
            stand_in = stand_in.scatter(1, kept, position)
            self._source = stand_in if self._source is None else stand_in.gather(1, self._source)
            return context, gathered

        return hook

    def _unhold(self, module, args):
        """Before the final norm (``hold``): the active tokens' hidden states back among the held ones."""
        if self._held is None:
            return None
        hidden, *rest = args
        index = self._origin[..., None].expand(-1, -1, hidden.shape[-1])
        return (self._held.scatter(1, index, hidden), *rest)

    def _restore(self, module, args, output):
        """After the output projection: every token's output, the dropped ones copied from their stand-ins."""
        if self._source is None:
            return output
        return output.gather(1, self._source[..., None].expand(-1, -1, output.shape[-1]))
