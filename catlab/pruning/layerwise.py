"""Selection at layer granularity: fresh tokens chosen per block and per module, cached module outputs for the rest.

The engine of a selector that declares ``Capability.LAYER_SELECTION`` (``toca``, ``duca``).
Where :class:`~catlab.pruning.engine.TokenPruner` gathers one token set per step after the
patch embedding, this one leaves the token sequence whole and intervenes on the modules
inside each block that the family names in :attr:`FamilySpec.layer_modules`, one diffusers
hook per module:

* at a **full** step every module runs stock on every token and its output is kept, one
  cache per layer and module (the output before the block's gate and residual, as the
  block receives it);
* at a **partial** step an ``"attn"`` module (an attention over the image tokens) is not
  run: the block receives its cached output. A ``"cross"`` (cross-attention to the text)
  or ``"mlp"`` module asks the selector for this layer's and module's fresh tokens
  ``(rows, k)``, runs stock on those k tokens only (both act token by token, so a fresh
  token's output is exactly the stock one given its input) and scatters them into its
  cache; the block receives the whole cache. A ``"follow"`` module (a projection of the previous
  module's output and other cached inputs, as a single-stream block's output projection) computes the same
  positions as the block's previous module. A sequence with other tokens before the image's (a
  single-stream block's text) computes those always. The block's norms, modulation, gates and
  residuals run on every token, with this step's timestep;
* at a **reuse** step no block runs: each returns the last block's output kept from the
  previous computed step (DuCa's aggressive step), and the final norm and projection run
  with this step's timestep.

The selector decides the step's kind once per forward (:meth:`context`) and each module's
fresh tokens as the forward reaches it; it never sees the model. A fresh count of N at
every module of a partial step recomputes the cross-attention and MLP outputs exactly,
and a run whose every step is full is the stock model. MACs are counted as the modules
run (``catlab.stepcache.macs.MacCounter``).

A selector that scores with the attention each image token receives (ToCa's s1, ``score:
attention``) asks for it with ``needs_attention_maps``: at a full step each ``"attn"`` module
then runs under :class:`_ReceivedAttention`, which sees the module's SDPA call and computes,
beside it, the softmax map's mean over heads and queries for every key (in query chunks, never
the whole N×N map at once; one more QKᵀ, counted in the MACs). The stock call's output is
unchanged.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn
from torch.overrides import TorchFunctionMode

from catlab.pruning.families import UnsupportedModelError, family_of, family_specs

if TYPE_CHECKING:
    from catlab.grid import Grid

_registry = HookRegistry.check_if_exists_or_initialize

MODULE_HOOK = "catlab_layer_module"
BLOCK_HOOK = "catlab_layer_block"
ROLES = ("attn", "cross", "mlp", "follow")
KINDS = ("full", "partial", "reuse")


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class _ModuleCache(ModelHook):
    """One module of one block: its cached output, and how a step of each kind computes it."""

    def __init__(self, engine: LayerCaching, layer: int, role: str, name: str):
        super().__init__()
        self.engine, self.layer, self.role, self.name = engine, layer, role, name
        self.cache = None

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.cache = None
        return module

    def new_forward(self, module: nn.Module, *args, **kwargs):
        run = self.fn_ref.original_forward
        kind = self.engine.kind
        if kind is None:  # outside a step's context: the stock module
            return run(*args, **kwargs)
        if kind == "full":
            if self.role == "attn" and self.engine.wants_received:
                with _ReceivedAttention(self.engine, self.layer):
                    self.cache = run(*args, **kwargs)
            else:
                self.cache = run(*args, **kwargs)
            return self.cache
        if self.cache is None:
            raise RuntimeError(f"{self.name}: a partial step needs a full step before it (no cached output)")
        if self.role == "attn":
            return self.cache
        hidden = _hidden(args, kwargs)
        if self.cache.shape[:2] != hidden.shape[:2]:
            raise RuntimeError(
                f"{self.name}: cached output of shape {tuple(self.cache.shape)} does not match the input "
                f"{tuple(hidden.shape)}; a partial step needs a full step of the same batch"
            )
        idx = self.engine.fresh(self.layer, self.role, hidden)
        if idx is None:  # "follow" after a module that computed nothing: none here either
            return self.cache
            return self.cache
        fresh = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        args, kwargs = _with_hidden(args, kwargs, fresh)
        out = run(*args, **kwargs)
        self.cache = self.cache.scatter(1, idx[..., None].expand(-1, -1, out.shape[-1]), out.to(self.cache.dtype))
        return self.cache


#: the most logits one chunk of :func:`received_attention` holds (64 MiB in fp32)
CHUNK_ELEMENTS = 1 << 24


def received_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """The attention each key receives, ``(rows, S_k)``: SDPA's softmax map (same arguments, ``query (rows,
    heads, S_q, d)``) averaged over heads and queries, computed a chunk of queries at a time."""
    if is_causal:
        raise ValueError("received_attention: a causal attention is not an attention over image tokens")
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    rows, heads, s_q, s_k = query.shape[0], query.shape[-3], query.shape[-2], key.shape[-2]
    chunk = max(1, CHUNK_ELEMENTS // max(1, rows * heads * s_k))
    total = torch.zeros(rows, s_k, dtype=torch.float32, device=query.device)
    for start in range(0, s_q, chunk):
        logits = torch.matmul(query[..., start : start + chunk, :], key.transpose(-1, -2)).float() * scale
        if attn_mask is not None:
            mask = attn_mask[..., start : start + chunk, :] if attn_mask.shape[-2] == s_q else attn_mask
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        total += logits.softmax(-1).sum(dim=(-3, -2))
    return total / (heads * s_q)


class _ReceivedAttention(TorchFunctionMode):
    """Around one ``"attn"`` module's forward at a full step: each SDPA call it makes runs as it would, and
    the attention its keys receive (:func:`received_attention`) goes to the engine for ``layer``."""

    def __init__(self, engine: LayerCaching, layer: int):
        super().__init__()
        self.engine, self.layer = engine, layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.engine.record_received(self.layer, received_attention(*args, **kwargs))
        return func(*args, **kwargs)


class _BlockReuse(ModelHook):
    """A block at a reuse step returns the last block's kept output without running (the blocks after it see
    only that); at a computed step the last block keeps its output."""

    def __init__(self, engine: LayerCaching, last: bool):
        super().__init__()
        self.engine, self.last = engine, last

    def new_forward(self, module: nn.Module, *args, **kwargs):
        e = self.engine
        if e.kind == "reuse":
            if e.last_output is None:
                raise RuntimeError("a reuse step needs a computed step before it (no kept block output)")
            return e.last_output
        out = self.fn_ref.original_forward(*args, **kwargs)
        if self.last and e.kind is not None:
            e.last_output = out
        return out


class _RecordingCrossAttn:
    """A cross-attention to the text that also keeps each image token's probabilities over the text, averaged
    over heads: ``(rows, N, L)``, the rows of this step's fresh tokens rewritten (a full step writes all).

    The output is the stock processor's (the same projections and SDPA call); the map costs one more QKᵀ of
    the computed queries over the L text keys (N×L, never N×N), which the MAC counter sees."""

    def __init__(self, engine: LayerCaching, layer: int, original):
        self.engine, self.layer, self.original = engine, layer, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        e = self.engine
        if e is None or e.kind is None or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        rows, n, _ = hidden_states.shape
        text = encoder_hidden_states
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        h = attn.heads
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(text), attn.to_v(text)
        d = key.shape[-1] // h
        query = query.view(rows, n, h, d).transpose(1, 2)
        key = key.view(rows, -1, h, d).transpose(1, 2)
        value = value.view(rows, -1, h, d).transpose(1, 2)
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], rows)
            mask = mask.view(rows, h, -1, mask.shape[-1])
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        logits = torch.matmul(query, key.transpose(-1, -2)) * attn.scale  # the map: one extra QKᵀ over the text
        probs = (logits if mask is None else logits + mask).softmax(-1)
        out = out.transpose(1, 2).reshape(rows, n, h * d).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        e.record_cross(self.layer, probs.mean(1))
        return out / attn.rescale_output_factor


class LayerCaching:
    """The layer-granularity engine of a ``Capability.LAYER_SELECTION`` selector (see the module docstring).

    The run's assembly (:class:`catlab.assembly.PruningSession`) holds it in its engine slot:
    :meth:`apply` once, :meth:`begin` per generation, :meth:`context` around each forward,
    :meth:`remove` at the end.
    """

    def __init__(self, policy):
        self.policy = policy
        self.kind: str | None = None
        self.last_output = None
        self.num_layers = 0
        self.step = self.num_steps = 0
        self._transformer: nn.Module | None = None
        self._modules: list[tuple[nn.Module, _ModuleCache]] = []
        self._blocks: list[nn.Module] = []
        self._last: dict[int, torch.Tensor | None] = {}  # per layer, the positions its last partial module took
        #: per layer, each image token's cross-attention over the text ``(rows, N, L)`` (kept when the selector
        #: scores with it: ``policy.cross_maps`` names this dict)
        self.cross_maps: dict[int, torch.Tensor] = {}
        #: per layer, the attention each image token received at the last full step ``(rows, N)`` (kept when
        #: the selector scores with it: ``policy.attention_maps`` names this dict)
        self.received: dict[int, torch.Tensor] = {}
        self.wants_received = bool(getattr(policy, "needs_attention_maps", False))
        self.text_first = False
        self._received_now: set[int] = set()
        self._attn_layers: set[int] = set()  # the layers with an "attn" module
        self._recorders: list = []
        self.num_tokens = 0

    @property
    def name(self) -> str:
        return f"{self.policy.name} (layer granularity)"

    # -- lifecycle -------------------------------------------------------------------------------
    def apply(self, transformer: nn.Module) -> LayerCaching:
        """Hook the family's cached modules; a family without them is refused with the ones that have them."""
        try:
            spec = family_of(transformer)
        except UnsupportedModelError:
            spec = None
        if spec is None or not spec.layer_modules:
            allowed = [s for s in family_specs() if s.layer_modules]
            raise UnsupportedModelError(
                f"selector {self.policy.name} selects tokens per layer in "
                f"{', '.join(s.title or s.name for s in allowed)} transformers "
                f"({', '.join(s.transformer_type for s in allowed)}); {type(transformer).__name__} is not one"
            )
        self._transformer, self.text_first = transformer, spec.text_first
        blocks = [
            (kind.attr, i, b) for kind in spec.block_lists() for i, b in enumerate(getattr(transformer, kind.attr))
        ]
        self.num_layers = len(blocks)
        for layer, (attr_list, i, block) in enumerate(blocks):  # layers counted across the block lists
            for attr, role in spec.layer_modules:
                module = getattr(block, attr, None)
                if module is None:
                    continue
                if role not in ROLES:
                    raise ValueError(f"{spec.name}.layer_modules: role {role!r} of {attr}; allowed: {ROLES}")
                if role == "cross" and getattr(self.policy, "needs_cross_maps", False):
                    recorder = _RecordingCrossAttn(self, layer, module.processor)
                    module.processor = recorder
                    self._recorders.append((module, recorder))
                if role == "attn":
                    self._attn_layers.add(layer)
                hook = _ModuleCache(self, layer, role, f"{attr_list}.{i}.{attr}")
                _registry(module).register_hook(hook, MODULE_HOOK)
                self._modules.append((module, hook))
            _registry(block).register_hook(_BlockReuse(self, layer == len(blocks) - 1), BLOCK_HOOK)
            self._blocks.append(block)
        if getattr(self.policy, "needs_cross_maps", False) and not self._recorders:
            self.remove()
            raise UnsupportedModelError(
                f"selector {self.policy.name}: its score reads cross-attention maps, and "
                f"{type(transformer).__name__}'s blocks have no cross-attention: choose another score"
            )
        if self.wants_received and not self._attn_layers:
            self.remove()
            raise UnsupportedModelError(
                f"selector {self.policy.name}: its score reads the self-attention map, and "
                f"{spec.title or spec.name} names no attention module to read it from: choose another score"
            )
        self.policy.cross_maps = self.cross_maps
        self.policy.attention_maps = self.received
        return self

    def remove(self, transformer: nn.Module | None = None) -> None:
        for module, recorder in self._recorders:
            module.processor, recorder.engine = recorder.original, None
        self._recorders.clear()
        for module, hook in self._modules:
            hook.engine = None
            _registry(module).remove_hook(MODULE_HOOK, recurse=False)
        for block in self._blocks:
            registry = _registry(block)
            registry.get_hook(BLOCK_HOOK).engine = None
            registry.remove_hook(BLOCK_HOOK, recurse=False)
        self._modules.clear()
        self._blocks.clear()
        self._attn_layers.clear()
        self._transformer = None
        self.reset()

    def reset(self) -> None:
        """Forget every cache: the next forward must be a full step."""
        self.kind, self.last_output, self._last = None, None, {}
        self.cross_maps.clear()
        self.received.clear()
        for _, hook in self._modules:
            hook.cache = None

    def begin(self, batch: int, grid: Grid, num_steps: int, device) -> None:
        """A generation starts: ``batch`` samples on a ``grid`` of tokens, ``num_steps`` steps."""
        self.reset()
        self.num_steps = num_steps
        self.num_tokens = 1
        for size in grid:
            self.num_tokens *= int(size)
        self.policy.begin_layers(batch, grid, num_steps, self.num_layers, device)

    @contextlib.contextmanager
    def context(self, step: int, num_steps: int, **info):
        """Around one forward of ``step`` (1-based): the selector names the step's kind."""
        kind = self.policy.step_kind(step, num_steps)
        if kind not in KINDS:
            raise ValueError(f"{self.policy.name}.step_kind returned {kind!r}; allowed: {KINDS}")
        if kind != "full" and self.last_output is None:
            raise RuntimeError(f"step {step} is {kind} but no full step ran before it in this generation")
        self.kind, self.step, self.num_steps, self._last, self._received_now = kind, step, num_steps, {}, set()
        try:
            yield
            missing = sorted(self._attn_layers - self._received_now) if kind == "full" and self.wants_received else []
            if missing:
                raise RuntimeError(
                    f"{self.policy.name}: its score reads the attention each token receives, and layer {missing[0]}'s "
                    "attention ran without torch's scaled_dot_product_attention (another attention backend?), so "
                    "no map was kept: run torch's SDPA, or choose another score"
                )
        finally:
            self.kind = None

    def set_bypass(self, on: bool) -> None:
        """Run the next forwards as the stock model, every cache untouched (``on=False`` ends it): a pipeline's
        extra transformer call within a step (skip-layer guidance) whose rows and layers are not the step's."""
        if on:
            self._held, self.kind = self.kind, None
        else:
            self.kind = getattr(self, "_held", self.kind)

    def record_cross(self, layer: int, probs: torch.Tensor) -> None:
        """Keep a cross-attention's head-averaged map: whole at a full step, the fresh rows at a partial one."""
        idx = self._last.get(layer) if self.kind == "partial" else None
        if idx is None or layer not in self.cross_maps:
            self.cross_maps[layer] = probs
            return
        index = idx[..., None].expand(-1, -1, probs.shape[-1])
        self.cross_maps[layer] = self.cross_maps[layer].scatter(1, index, probs.to(self.cross_maps[layer].dtype))

    def record_received(self, layer: int, received: torch.Tensor) -> None:
        """Keep the attention ``layer``'s image tokens received at this full step, from its keys' ``(rows, S)``:
        the image tokens' columns (after the text in a ``text_first`` family's joint sequence, else first)."""
        if layer in self._received_now:  # a second attention in the block: the first one's map
            return
        self._received_now.add(layer)
        n = self.num_tokens or received.shape[1]
        if received.shape[1] < n:
            raise RuntimeError(
                f"layer {layer}: an attention over {received.shape[1]} keys, fewer than {n} image tokens"
            )
        self.received[layer] = received[:, received.shape[1] - n :] if self.text_first else received[:, :n]

    def fresh(self, layer: int, role: str, hidden: torch.Tensor) -> torch.Tensor | None:
        """The ``(rows, k)`` positions ``layer``'s ``role`` module computes at this partial step (``None``: none).

        The selector picks among the N image tokens; a sequence that carries other tokens before them (a
        single-stream block's text) computes those always. A ``"follow"`` module takes the positions the
        block's previous module took (a projection of that module's output, with other cached inputs)."""
        if role == "follow":
            return self._last.get(layer)
        rows, total = hidden.shape[:2]
        n = self.num_tokens or total
        lead = total - n
        if lead < 0:
            raise RuntimeError(f"layer {layer}: {total} tokens in, fewer than the {n} image tokens")
        idx = self.policy.fresh_tokens(self.step, self.num_steps, layer, role, rows, n)
        if idx.dim() != 2 or idx.shape[0] != rows or idx.shape[1] > n:
            raise RuntimeError(
                f"{self.policy.name}.fresh_tokens gave indices of shape {tuple(idx.shape)} "
                f"for {rows} rows of {n} tokens"
            )
        idx = idx.to(hidden.device)
        if lead:
            text = torch.arange(lead, device=hidden.device).expand(rows, -1)
            idx = torch.cat([text, idx + lead], dim=1)
        self._last[layer] = None if idx.shape[1] == 0 else idx
        return self._last[layer]


__all__ = ["LayerCaching", "ROLES", "KINDS"]
