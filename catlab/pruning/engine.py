"""Token-pruned execution of a stock diffusers transformer, through diffusers hooks.

The stock forward of the transformer and of every block runs unchanged; three
narrow interventions make it pruned:

1. a hook on the patch embedding gathers the k selected tokens, so every block
   (norms, modulation, attention queries, MLP) sees a ``(rows, k, D)`` tensor;
2. each image attention module gets a processor that writes the k fresh K/V into
   its layer's cache and attends over the whole cache (plus text);
3. a hook on the output projection scatters the k fresh outputs into the previous
   step's token-space output, so the stock unpatchify sees all N tokens.

A family whose transformer takes per-block residuals of the image tokens (a ControlNet's,
``FamilySpec.block_residuals``) has them gathered from the call's arguments before the
forward (:meth:`TokenPruner.call_kwargs`): each residual ``(rows, N, D)`` to the rows' k
selected tokens, so the blocks add to every computed token its own residual. (Not a hook
on the transformer itself: libraries that patch its ``forward`` expect a bound method.)

The caches live in a :class:`~catlab.pruning.buffers.BufferPool` and are written in
place; the patch-embedding hook and one on the text embedding (a joint attention
keeps the text's K/V after the image's) bind them and compute the step's write
positions ahead of the blocks (:meth:`TokenPruner.prepare`). A family with rotary
positions has one more hook, on its rotary embedding: at a pruned step it hands the
blocks the text rows and the selected tokens' rows of the tables.

Everything family-specific (which modules, which processor classes, the MAC
formula) comes from the transformer's :class:`~catlab.pruning.families.FamilySpec`.

With every token selected this is the stock model, by construction. A step reads
no tensor value on the host (indices are fixed-size ``(rows, k)`` tensors), so on
a GPU the host queues the next step while the device computes this one; and the
whole pruned forward traces into one ``torch.compile`` graph (see ``compile.py``).
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from catlab.pruning.buffers import BufferPool
from catlab.pruning.families import FamilySpec, family_of
from catlab.pruning.state import hook_names

_registry = HookRegistry.check_if_exists_or_initialize

GATHER_HOOK = "catlab_token_gather"
SCATTER_HOOK = "catlab_token_scatter"
TEXT_HOOK = "catlab_token_text"
ROTARY_HOOK = "catlab_token_rotary"


class _TextHook(ModelHook):
    """After the text embedding: bind the joint attentions' caches, which hold the text tokens too."""

    def __init__(self, pruner: TokenPruner):
        super().__init__()
        self.pruner = pruner

    def post_forward(self, module: nn.Module, output: torch.Tensor) -> torch.Tensor:
        if not self.pruner.bypass:
            self.pruner.prepare(output.shape[0], output.shape[1], output.device, text=True)
        return output


class _GatherHook(ModelHook):
    """After the patch embedding: keep only the selected tokens."""

    def __init__(self, pruner: TokenPruner):
        super().__init__()
        self.pruner = pruner

    def post_forward(self, module: nn.Module, output: torch.Tensor) -> torch.Tensor:
        if self.pruner.bypass:
            return output
        if output.ndim > 3:  # a convolution's (B, D, *grid), flattened into tokens by the forward after it
            return self._gather_channels_first(output)
        self.pruner.num_tokens = output.shape[1]
        self.pruner.prepare(output.shape[0], 0, output.device, text=False)
        idx = self.pruner.row_indices
        if idx is None:
            return output
        return output.gather(1, idx[..., None].expand(-1, -1, output.shape[-1]))

    def _gather_channels_first(self, output: torch.Tensor) -> torch.Tensor:
        """``(B, D, F, H, W)`` (a 3D patch embedding; tokens frames-major, row-major) → ``(B, D, k, 1, 1)``: the
        selected tokens, which the forward's ``flatten(2).transpose(1, 2)`` turns into ``(B, k, D)``."""
        tokens = output.flatten(2)
        self.pruner.num_tokens = tokens.shape[2]
        self.pruner.prepare(output.shape[0], 0, output.device, text=False)
        idx = self.pruner.row_indices
        if idx is None:
            return output
        picked = tokens.gather(2, idx[:, None, :].expand(-1, tokens.shape[1], -1))
        return picked.view(*picked.shape, *([1] * (output.ndim - 3)))


class _RotaryHook(ModelHook):
    """After the rotary embedding: at a pruned step, the tables the blocks need for the text and each row's
    selected image tokens, as the family lays them out (``FamilySpec.select_rotary``)."""

    def __init__(self, pruner: TokenPruner):
        super().__init__()
        self.pruner = pruner

    def post_forward(self, module: nn.Module, output):
        p = self.pruner
        if p.bypass or p.row_indices is None:
            return output
        return p.spec.select_rotary(output, p.row_indices, p.num_tokens)


class _ScatterHook(ModelHook):
    """After the output projection: fresh outputs for the selected tokens, cached ones for the rest."""

    def __init__(self, pruner: TokenPruner):
        super().__init__()
        self.pruner = pruner

    def post_forward(self, module: nn.Module, output: torch.Tensor) -> torch.Tensor:
        p = self.pruner
        if p.bypass:
            return output
        idx = p.row_indices
        if idx is None:  # a full step: remember every token's output, in the pool's buffer
            p.output_cache = p.pool.get("output", output.shape, output.dtype, output.device)
            p.output_cache.copy_(output)
            return output
        if p.output_cache is None or p.output_cache.shape[0] != output.shape[0]:
            raise RuntimeError("a pruned step needs the output of a previous full step for the same batch")
        index = idx[..., None].expand(-1, -1, output.shape[-1])
        p.output_cache.scatter_(1, index, output.to(p.output_cache.dtype))
        # another hook on the projection (a step cache, a reuse rule) may keep what it is given: a copy,
        # so the next step's in-place write does not change its history
        return p.output_cache.clone() if len(hook_names(module)) > 1 else p.output_cache


class TokenPruner:
    """The pruning state of one transformer: indices of the step, caches, probes, cost.

    Drive it with :meth:`set_indices` before each forward (``None`` = a full step);
    :meth:`reset` at the start of each generation. Its state tensors (K/V caches,
    output cache, index rows) come from ``pool`` and are written in place, so they
    are allocated once per shape; pass a shared :class:`BufferPool` to keep them
    across pruners (what captured CUDA graphs need).
    """

    def __init__(self, transformer: nn.Module, pool: BufferPool | None = None):
        self.transformer = transformer
        self.spec: FamilySpec = family_of(transformer)
        self.pool = pool if pool is not None else BufferPool(one_shape_per_name=True)
        self.row_indices: torch.Tensor | None = None
        self.output_cache: torch.Tensor | None = None
        self.num_tokens: int = 0
        self.probe_layers: set[int] = set()
        self.attention: dict[int, torch.Tensor] = {}
        self.processors: list = []
        self._hooks: list = []
        self._original_processors: dict[nn.Module, object] = {}
        self._macs: dict[tuple[int, int, int, int], int] = {}
        self.attached = False
        #: the stock forward runs and no cache is read or written (see :meth:`set_bypass`)
        self.bypass = False
        #: the step cache forecasts this step from the output projection: the blocks do not run
        self.blocks_skipped = False

    # -- lifecycle -------------------------------------------------------------
    def attach(self) -> TokenPruner:
        if self.attached:
            return self
        t = self.transformer
        if self.spec.text_embed is not None:
            _registry(getattr(t, self.spec.text_embed)).register_hook(self._hook(_TextHook), TEXT_HOOK)
        _registry(getattr(t, self.spec.patch_embed)).register_hook(self._hook(_GatherHook), GATHER_HOOK)
        _registry(getattr(t, self.spec.output_proj)).register_hook(self._hook(_ScatterHook), SCATTER_HOOK)
        if self.spec.rotary is not None:
            _registry(getattr(t, self.spec.rotary)).register_hook(self._hook(_RotaryHook), ROTARY_HOOK)
        layer = 0  # counted across the block lists (dual-stream blocks, then single-stream ones)
        for blocks in self.spec.block_lists():
            for i, block in enumerate(getattr(t, blocks.attr)):
                for attr, cls in blocks.attentions:
                    attn = getattr(block, attr, None)
                    if attn is None:
                        continue
                    proc = cls(self, layer, f"{blocks.attr}.{i}.{attr}", cls.holds_text(attn))
                    proc.attn, proc.original = attn, attn.processor
                    self._original_processors[attn] = attn.processor
                    attn.processor = proc
                    self.processors.append(proc)
                layer += 1
        self.attached = True
        return self

    def _hook(self, kind):
        hook = kind(self)
        self._hooks.append(hook)
        return hook

    def detach(self) -> None:
        if not self.attached:
            return
        for hook in self._hooks:  # a diffusers hook and its function reference point at each other: a cycle
            hook.pruner = None  # that must not keep this pruner's buffers alive until the next GC
        self._hooks.clear()
        self.set_bypass(False)
        t = self.transformer
        if self.spec.text_embed is not None:
            _registry(getattr(t, self.spec.text_embed)).remove_hook(TEXT_HOOK, recurse=False)
        _registry(getattr(t, self.spec.patch_embed)).remove_hook(GATHER_HOOK, recurse=False)
        _registry(getattr(t, self.spec.output_proj)).remove_hook(SCATTER_HOOK, recurse=False)
        if self.spec.rotary is not None:
            _registry(getattr(t, self.spec.rotary)).remove_hook(ROTARY_HOOK, recurse=False)
        for attn, proc in self._original_processors.items():
            attn.processor = proc
        self._original_processors.clear()
        self.processors.clear()
        self.reset()
        self.attached = False

    def reset(self) -> None:
        """Forget every cache: the next forward must be a full step."""
        self.row_indices = None
        self.output_cache = None
        self.attention = {}
        for proc in self.processors:
            proc.reset()

    def set_bypass(self, on: bool) -> None:
        """Run the next forwards as the stock model, leaving every cache as it is (``on=False`` ends it).

        For a pipeline's extra transformer call within a step (skip-layer guidance):
        its rows and skipped layers do not match the step's caches, so it is not pruned.
        """
        if on == self.bypass:
            return
        for proc in self.processors:
            proc.attn.processor = proc.original if on else proc
        self.bypass = on

    @property
    def kept(self) -> int:
        """Image tokens the running forward computes: ``k`` at a pruned step, ``N`` at a full one."""
        return self.num_tokens if self.row_indices is None else self.row_indices.shape[1]

    # -- per step ----------------------------------------------------------------
    def set_indices(self, indices: torch.Tensor | None, rows: int | None = None) -> None:
        """Set the tokens to compute in the next forward.

        ``indices`` is ``(B, k)``, one row per sample; with ``rows = g·B`` (g
        classifier-free-guidance branches stacked as the pipelines do) each sample's
        indices are shared by its branches.
        """
        if indices is None:
            self.row_indices = None
            return
        batch, k = indices.shape
        rows = batch if rows is None else rows
        if rows % batch:
            raise ValueError(f"{rows} batch rows are not a multiple of {batch} samples")
        buf = self.pool.get("indices", (rows, k), torch.long, indices.device)
        buf.view(rows // batch, batch, k).copy_(indices[None].expand(rows // batch, batch, k))
        self.row_indices = buf

    def call_kwargs(self, kwargs: dict) -> dict:
        """A forward's keyword arguments with its per-block residuals (``FamilySpec.block_residuals``) gathered
        to the selected tokens at a pruned step; dropped at a step whose blocks do not run (:attr:`blocks_skipped`:
        they return placeholders of the last computed step's shape). Unchanged otherwise."""
        names = [name for name in self.spec.block_residuals if kwargs.get(name) is not None]
        if not names or self.bypass:
            return kwargs
        if self.blocks_skipped:
            return {**kwargs, **dict.fromkeys(names)}
        if self.row_indices is None:
            return kwargs
        gathered = {name: [self.gather_tokens(r) if torch.is_tensor(r) else r for r in kwargs[name]] for name in names}
        return {**kwargs, **gathered}

    def gather_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(rows, N, D)``, one per image token, reduced to each row's selected tokens ``(rows, k, D)``
        (as the patch-embedding hook reduces the image tokens); a full step keeps all of them."""
        idx = self.row_indices
        if idx is None:
            return tokens
        if tokens.shape[:2] != (idx.shape[0], self.num_tokens):
            raise ValueError(
                f"a per-token residual of shape {tuple(tokens.shape)} does not match the call's "
                f"{idx.shape[0]} rows of {self.num_tokens} image tokens"
            )
        return tokens.gather(1, idx[..., None].expand(-1, -1, tokens.shape[-1]))

    def prepare(self, rows: int, num_text: int, device, text: bool) -> None:
        """Before the blocks, for the attentions with (``text=True``) or without text tokens in their K/V:
        at a full step bind their cache buffers; at a pruned step compute their flat write positions.

        The gather hook and the text-embedding hook call it, in eager code ahead of the blocks:
        compiled blocks neither allocate nor look up buffers, and a captured CUDA graph
        records the index arithmetic with the step.
        """
        procs = [p for p in self.processors if p.text == text]
        idx, n = self.row_indices, self.num_tokens
        if idx is None:
            for proc in procs:
                proc.bind(rows, n, num_text, device)
            return
        if not text and (self.output_cache is None or self.output_cache.shape[0] != rows):
            raise RuntimeError(
                "a pruned step needs the output of a previous full step for the same batch; "
                "run at least one full step first (start_step >= 1)"
            )
        if procs:
            total = n + num_text  # every layer of the forward shares the positions
            offsets = torch.arange(rows, device=idx.device)[:, None] * total
            flat = (idx + offsets).reshape(-1)
            for proc in procs:
                proc.flat = flat

    def state(self) -> dict:
        """The Python side of the state a forward leaves (which buffers hold the caches, the token count).

        A replayed CUDA graph rewrites the buffers but runs no Python: :meth:`restore` puts back what the
        forward's hooks would have set, so eager code after a replay (or a new pruner) finds the caches."""
        return {
            "num_tokens": self.num_tokens,
            "output_cache": self.output_cache,
            "caches": [(p.keys, p.values, p.heads) for p in self.processors],
        }

    def restore(self, state: dict) -> None:
        self.num_tokens, self.output_cache = state["num_tokens"], state["output_cache"]
        for proc, (keys, values, heads) in zip(self.processors, state["caches"]):
            proc.keys, proc.values, proc.heads = keys, values, heads

    def record_attention(self, layer: int, probs: torch.Tensor) -> None:
        """Keep each row of a probe layer's attention map as last computed."""
        idx = self.row_indices
        if idx is None or layer not in self.attention:
            self.attention[layer] = probs
            return
        index = idx[..., None].expand(-1, -1, probs.shape[-1])
        self.attention[layer] = self.attention[layer].scatter(1, index, probs)

    def macs(self, rows: int, num_text_tokens: int, num_tokens: int | None = None, kept: int | None = None) -> int:
        """Analytic MACs of one forward over ``rows`` rows with ``kept`` image tokens recomputed."""
        n_total = num_tokens or self.num_tokens
        n = n_total if kept is None else kept
        key = (rows, n, n_total, num_text_tokens)
        if key not in self._macs:  # walking the modules every step would cost host time per step
            self._macs[key] = self.spec.macs(self.transformer, rows, n, n_total, num_text_tokens)
        return self._macs[key]

    def probe_macs(self, rows: int, num_text_tokens: int, kept: int) -> int:
        """Extra MACs of materialising the probe layers' attention logits (part of the selection's cost)."""
        if not self.probe_layers:
            return 0
        attr, cls = self.spec.attentions[0]
        attn = getattr(getattr(self.transformer, self.spec.blocks)[0], attr)
        keys = self.num_tokens + (num_text_tokens if cls.holds_text(attn) else 0)
        dim = attn.to_q.out_features
        return rows * len(self.probe_layers) * kept * keys * dim
