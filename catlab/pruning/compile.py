"""``compile_pruned``: ``torch.compile`` for a transformer that runs token-pruned.

The pruned forward has no graph breaks: the gather/scatter hooks, the attention
processors and their in-place K/V cache writes all trace (the whole forward
compiles with ``fullgraph=True``; the tests check it). What is compiled is each
transformer block, in place, as diffusers' regional compilation does:

* blocks of one kind share one compiled graph, so compile time does not grow
  with depth (24 blocks of one kind compile like one);
* the hooks outside the blocks (the token gather and scatter, the policy hook of
  :func:`~catlab.pruning.enable_pruning`) stay eager, so a new
  :class:`~catlab.pruning.TokenPruner` per generation does not invalidate the
  compiled code, and the policy never gets traced.

A full step (every token) and a pruned step (k tokens) differ in shape and
branch, so each block kind compiles two graphs, both by the first pruned step of
the first generation; later steps and generations with the same k reuse them.

Compiled blocks and captured CUDA graphs compose: compile (default mode), then
run with ``cuda_graphs`` (:mod:`catlab.pruning.graphs`), and the inductor kernels
are what the graphs replay. Every mode that turns on inductor's own CUDA graphs
(``reduce-overhead``, ``max-autotune``; ``options={"triton.cudagraphs": True}``) is
refused, and with the default mode they are switched off explicitly (whatever the
global inductor config says): one compiled graph serves every block of a kind, so
each block's replay of an inductor CUDA graph would overwrite the previous block's
output. ``max-autotune-no-cudagraphs`` is the autotuned mode that composes.

Each block kind needs one compiled graph per (block variant, full or pruned step,
row count): a last block that drops the text stream (``context_pre_only``) is a
second variant, the first block's input has other strides than the later blocks',
and every batch size is another row count. Past dynamo's recompile limit (8 by default) a block would fall
back to eager without a word, so :func:`compile_pruned` raises the limit to what
the transformer needs for ``row_counts`` batch sizes (it never lowers it).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from catlab.pruning.families import UnsupportedModelError, family_of

log = logging.getLogger("catlab")


def compile_pruned(
    target, *, fullgraph: bool = True, dynamic: bool = False, row_counts: int = 4, **compile_kwargs: Any
) -> nn.Module:
    """Compile the blocks of ``target``'s transformer (a pipeline or a transformer) in place; returns the transformer.

    ``dynamic=False`` keeps the token count static: one graph for full steps, one
    for pruned steps. ``row_counts``: how many batch sizes the run will use (the
    recompile limit is raised for them). Other keyword arguments (``backend``,
    ``mode``, ``options``) go to :func:`torch.compile`; a mode or option that turns on
    inductor's CUDA graphs is refused. Undo with :func:`uncompile`.
    """
    compile_kwargs = _without_inductor_graphs(compile_kwargs)
    transformer = getattr(target, "transformer", target)
    if fullgraph:
        _refuse_step_cache_hooks(transformer)
    _raise_recompile_limit(transformer, row_counts)
    for block in _blocks(transformer):
        block.compile(fullgraph=fullgraph, dynamic=dynamic, **compile_kwargs)
    return transformer


_WHY = (
    "would capture each block's own CUDA graph, whose outputs the next block's replay of the same graph "
    "overwrites (one graph serves every block). Compile without them and capture the whole forward instead: "
    "sampler.cuda_graphs=true, or enable_pruning(..., cuda_graphs=True)"
)


def _without_inductor_graphs(kwargs: dict) -> dict:
    """``kwargs`` for torch.compile with inductor's CUDA graphs refused where asked for, and off otherwise."""
    mode, options = kwargs.get("mode"), kwargs.get("options") or {}
    if options.get("triton.cudagraphs"):
        raise ValueError(f"compile_pruned(options={{'triton.cudagraphs': True}}) {_WHY}")
    if mode not in (None, "default"):
        from torch._inductor import list_mode_options

        if list_mode_options(mode).get("triton.cudagraphs"):
            other = f"{mode}-no-cudagraphs"
            hint = f" (mode='{other}' is the same without them)" if other in _modes() else ""
            raise ValueError(f"compile_pruned(mode={mode!r}) {_WHY}{hint}")
        return kwargs
    if kwargs.get("backend", "inductor") == "inductor":  # the global inductor config could turn them on
        return {**kwargs, "options": {**options, "triton.cudagraphs": False}}
    return kwargs


def _refuse_step_cache_hooks(transformer: nn.Module) -> None:
    """A step cache's hooks inside the blocks decide on the host, per step, whether a block computes (diffusers
    marks that code ``torch.compiler.disable``): a block cannot be one graph then. Refused here in one line
    rather than by dynamo's error at the first call."""
    from catlab.pruning.state import hook_names
    from catlab.registry import stepcaches

    cache_hooks = {h: n for n in stepcaches.names() for h in getattr(stepcaches.get(n), "hook_names", ())}
    for block in _blocks(transformer):
        for module in block.modules():
            found = [cache_hooks[h] for h in hook_names(module) if h in cache_hooks]
            if found:
                raise ValueError(
                    f"compile_pruned: the blocks carry the step cache {found[0]!r}, whose hooks decide on the host "
                    "at each step whether a block computes, so a block cannot compile as one graph; run the step "
                    "cache without compile_pruned, or compile_pruned without the step cache"
                )


def _modes() -> set[str]:
    from torch._inductor import list_mode_options

    modes = set()
    for name in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "lite"):
        try:
            list_mode_options(name)
            modes.add(name)
        except RuntimeError:
            pass
    return modes


def recompiles_needed(transformer: nn.Module, row_counts: int) -> int:
    """Compiled graphs one block kind may need: (its variants + 1 for the first block's strides) × (full,
    pruned) × ``row_counts``. A variant is a distinct set of the blocks' plain attributes (flags, sizes)."""
    variants: dict[type, set] = {}
    for block in _blocks(transformer):
        flags = frozenset(
            (k, v)
            for k, v in vars(block).items()
            if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))
        )
        variants.setdefault(type(block), set()).add(flags)
    return max((len(v) + 1) * 2 * int(row_counts) for v in variants.values())


def _raise_recompile_limit(transformer: nn.Module, row_counts: int) -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    needed = recompiles_needed(transformer, row_counts)
    if getattr(config, name) < needed:
        log.info(
            "compile_pruned: torch._dynamo.config.%s raised from %d to %d (block variants x full/pruned x "
            "%d batch sizes)",
            name,
            getattr(config, name),
            needed,
            row_counts,
        )
        setattr(config, name, needed)


def _blocks(transformer: nn.Module) -> list[nn.Module]:
    """Every block, in each of the transformer's block lists as its family names them (dual-stream, then
    single-stream); ``transformer_blocks`` for a transformer of no known family."""
    try:
        lists = [kind.attr for kind in family_of(transformer).block_lists()]
    except UnsupportedModelError:
        lists = ["transformer_blocks"]
    return [b for name in lists for b in (getattr(transformer, name, None) or ())]


def uncompile(target) -> None:
    """Run ``target``'s transformer blocks eagerly again."""
    transformer = getattr(target, "transformer", target)
    for block in _blocks(transformer):
        block._compiled_call_impl = None
