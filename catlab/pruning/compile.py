"""``compile_pruned``: ``torch.compile`` for a transformer that runs token-pruned.

The pruned forward has no graph breaks: the gather/scatter hooks, the attention
processors and their in-place K/V cache writes all trace (the whole forward
compiles with ``fullgraph=True``; the tests check it). What is compiled is each
transformer block, in place, as diffusers' regional compilation does:

* blocks of one kind share one compiled graph, so compile time does not grow
  with depth (SD3-medium's 24 blocks compile like one);
* the hooks outside the blocks (the token gather and scatter, the policy hook of
  :func:`~catlab.pruning.enable_pruning`) stay eager, so a new
  :class:`~catlab.pruning.TokenPruner` per generation does not invalidate the
  compiled code, and the policy never gets traced.

A full step (every token) and a pruned step (k tokens) differ in shape and
branch, so each block kind compiles two graphs, both by the first pruned step of
the first generation; later steps and generations with the same k reuse them.

Compiled blocks and captured CUDA graphs compose: compile (default mode), then
run with ``cuda_graphs`` (:mod:`catlab.pruning.graphs`), and the inductor kernels
are what the graphs replay. ``mode="reduce-overhead"`` (a CUDA graph per compiled
block) is refused: one compiled graph serves every block of a kind, so each
block's replay would overwrite the previous block's output.
"""
from __future__ import annotations

from typing import Any

from torch import nn


def compile_pruned(target, *, fullgraph: bool = True, dynamic: bool = False, **compile_kwargs: Any) -> nn.Module:
    """Compile the blocks of ``target``'s transformer (a pipeline or a transformer) in place; returns the transformer.

    ``dynamic=False`` keeps the token count static: one graph for full steps, one
    for pruned steps. Other keyword arguments (``backend``, ``mode``, ``options``)
    go to :func:`torch.compile`. Undo with :func:`uncompile`.
    """
    if compile_kwargs.get("mode") == "reduce-overhead":
        raise ValueError(
            "compile_pruned(mode='reduce-overhead') would capture each block's own CUDA graph, whose outputs the "
            "next block's replay of the same graph overwrites (one graph serves every block). Compile with the "
            "default mode and capture the whole forward instead: sampler.cuda_graphs=true, or "
            "enable_pruning(..., cuda_graphs=True)")
    transformer = getattr(target, "transformer", target)
    for block in _blocks(transformer):
        block.compile(fullgraph=fullgraph, dynamic=dynamic, **compile_kwargs)
    return transformer


def _blocks(transformer: nn.Module) -> list[nn.Module]:
    """Every block, in each of the transformer's block lists (FLUX: dual-stream, then single-stream)."""
    lists = ("transformer_blocks", "single_transformer_blocks")
    return [b for name in lists for b in (getattr(transformer, name, None) or ())]


def uncompile(target) -> None:
    """Run ``target``'s transformer blocks eagerly again."""
    transformer = getattr(target, "transformer", target)
    for block in _blocks(transformer):
        block._compiled_call_impl = None
