"""Graphed execution: the transformer's full and pruned forwards replayed from captured CUDA graphs.

At batch 1 a pruned step of a 1024² model on a current GPU launches thousands
of small kernels; the host, not the GPU, sets the pace. Capturing the whole
forward (gather, blocks, cache writes, scatter) once per *shape key* and
replaying it makes a step one launch::

    graphs = graphs_of(transformer)                      # one store per transformer
    pruner = TokenPruner(transformer, pool=graphs.pool).attach()
    graphs.new_generation()
    out = graphs.call(pruner, transformer.forward, args, kwargs)   # captures once, then replays

A shape key is (rows, k or full, compiled blocks, the call's argument structure,
and every tensor argument's shape/dtype/device). Every tensor the forward keeps
between steps comes from the store's :class:`~catlab.pruning.buffers.BufferPool`
(K/V caches, output cache, index rows) and so do the static copies of the
arguments; all of them are allocated once, before their first capture, and
written in place. A new generation therefore replays the graphs it finds: no
re-capture, only new values in the same buffers. A changed batch, resolution or
k is another key: another capture. :meth:`ForwardGraphs.release` frees graphs
(and their buffers) a generation did not use.

The first call of a key runs eagerly (the warm-up CUDA capture needs, and the
step's real result), then captures; that run and the capture write the same
values to the caches, so the step's result is the eager one. A capture that
fails — a host read inside the forward, a buffer first requested during the
capture — leaves that key eager, with one line saying why (the first error, not
CUDA's "previous error during capture" that follows it), and the store captures
nothing more until the next generation: a failed capture can leave the device in
a state a second one should not build on.

What happened is counted per generation (:class:`GraphCounts`: captures, replays,
refusals with their reasons); the sampler puts the counts on its trace, and a
generation counts as graphed only where its forwards were replayed
(:meth:`GraphCounts.replayed`).

Where a GPU is absent, :func:`~catlab.pruning.capture.emulate_on_cpu` runs the
same bookkeeping with a stand-in for capture and replay that executes the forward
on the static buffers (and rejects host reads during "capture", as a real capture
would): the CPU tests of the graphed path use it. A selector's own step can be
replayed too: :mod:`catlab.pruning.selection_graphs`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from catlab.capabilities import Capability
from catlab.pruning.buffers import BufferKey, BufferPool
from catlab.pruning.capture import emulating, make_backend
from catlab.pruning.state import hook_names, peek_state, state_of

log = logging.getLogger("catlab.graphs")

#: the diffusers hooks of catlab's own pruning (replayed as part of the graph)
PRUNING_HOOKS = {
    "catlab_token_gather",
    "catlab_token_scatter",
    "catlab_token_text",
    "catlab_token_rotary",
    "catlab_token_pruning",
}


@dataclass
class GraphCounts:
    """What graphed execution did in one generation: captures, replays, and why anything ran eagerly."""

    forward_captures: int = 0
    forward_replays: int = 0
    #: forwards of pruned steps (k tokens), and how many of them were replays
    pruned_forwards: int = 0
    pruned_replays: int = 0
    selection_captures: int = 0
    selection_replays: int = 0
    #: why something ran eagerly, each reason once, in the order met
    refusals: list[str] = field(default_factory=list)

    def refuse(self, reason: str) -> None:
        if reason not in self.refusals:
            self.refusals.append(reason)

    def replayed(self) -> bool:
        """Graphed in fact: forwards were replayed, the pruned ones included, and nothing was refused."""
        return (
            not self.refusals and self.forward_replays > 0 and (self.pruned_forwards == 0 or self.pruned_replays > 0)
        )

    def as_dict(self) -> dict:
        return {
            "forward_captures": self.forward_captures,
            "forward_replays": self.forward_replays,
            "pruned_forwards": self.pruned_forwards,
            "pruned_replays": self.pruned_replays,
            "selection_captures": self.selection_captures,
            "selection_replays": self.selection_replays,
            "refusals": list(self.refusals),
        }


def generation_counts(store: ForwardGraphs | None, selection=None, refusal: str | None = None) -> GraphCounts:
    """One generation's counts: the forward store's, the selection graphs', and a refusal of the whole run."""
    counts = GraphCounts()
    if store is not None:
        counts = GraphCounts(**{**store.counts.as_dict(), "refusals": list(store.counts.refusals)})
    if selection is not None:
        counts.selection_captures, counts.selection_replays = selection.captures, selection.replays
        for reason in selection.reasons.values():
            counts.refuse(reason)
    if refusal is not None:
        counts.refuse(refusal)
    return counts


@dataclass
class _Graph:
    """One captured forward: its backend, static argument buffers, static outputs and the buffers it uses."""

    backend: Any
    inputs: list[torch.Tensor | None]
    outputs: Any
    #: every pool buffer the graph reads or writes, as it was at capture
    buffers: dict[BufferKey, torch.Tensor]
    state: dict
    generation: int
    replays: int = 0


@dataclass
class ForwardGraphs:
    """The captured forwards of one transformer, and the buffer pool their state lives in."""

    device: torch.device
    pool: BufferPool = field(default_factory=BufferPool)
    graphs: dict[tuple, _Graph] = field(default_factory=dict)
    #: keys whose capture failed, with the reason: they run eagerly
    refused: dict[tuple, str] = field(default_factory=dict)
    generation: int = 0
    captures: int = 0
    replays: int = 0
    #: this generation's counts (reset by :meth:`new_generation`)
    counts: GraphCounts = field(default_factory=GraphCounts)
    #: why this generation captures nothing more (a capture failed), or ``None``
    stopped: str | None = None
    #: the parameters' identities and addresses when the graphs were captured
    fingerprint: tuple = ()

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.emulated = self.device.type != "cuda"
        self._mempool = None if self.emulated else torch.cuda.graph_pool_handle()
        self._stream = None if self.emulated else torch.cuda.Stream(self.device)

    def new_generation(self, transformer: nn.Module | None = None) -> None:
        """A generation starts: graphs replay on with new values (the pruner's reset forgets the old ones).

        With ``transformer``, its parameters and modules are compared with those the graphs were
        captured over; if any was replaced (new weights loaded, LoRA layers injected, the model
        moved) every graph is dropped, since a replay would still run the old ones."""
        self.generation += 1
        self.counts, self.stopped = GraphCounts(), None
        if transformer is not None:
            fingerprint = _fingerprint(transformer)
            if self.graphs and fingerprint != self.fingerprint:
                log.warning("catlab: the transformer's modules or parameters changed; its CUDA graphs are re-captured")
                self.release()
            self.fingerprint = fingerprint

    # -- the call -----------------------------------------------------------------
    def call(self, pruner, fn: Callable, args: tuple = (), kwargs: dict | None = None, tag: Any = None) -> Any:
        """``fn(*args, **kwargs)`` (the transformer's forward, hooks attached), replayed from its graph.

        ``tag`` names what ``fn`` is (two callers with different code must not share a graph).
        Returns fresh tensors (copies of the static outputs), safe to keep across steps.
        """
        kwargs = kwargs or {}
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = self._key(pruner, leaves, spec, tag)
        pruned = key[1] is not None
        self.counts.pruned_forwards += pruned
        if key in self.refused:
            self.counts.refuse(f"{_describe(key)}: {self.refused[key]}")
            return fn(*args, **kwargs)
        graph = self.graphs.get(key)
        if graph is not None and any(self.pool.peek(k) is not buf for k, buf in graph.buffers.items()):
            log.warning("catlab: a buffer of the CUDA graph for %s was released; capturing it again", _describe(key))
            del self.graphs[key]  # it would replay on memory the pool no longer hands out
            graph = None
        if graph is None:
            if self.stopped is not None:
                self.counts.refuse(f"{_describe(key)}: not captured, {self.stopped}")
                return fn(*args, **kwargs)
            return self._capture(key, pruner, fn, leaves, spec)
        self._write(graph.inputs, leaves)
        pruner.restore(graph.state)
        graph.backend.replay()
        graph.generation, graph.replays = self.generation, graph.replays + 1
        self.replays += 1
        self.counts.forward_replays += 1
        self.counts.pruned_replays += pruned
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, graph.outputs)

    def _key(self, pruner, leaves: list, spec, tag) -> tuple:
        idx = pruner.row_indices
        blocks = getattr(pruner.transformer, pruner.spec.blocks)
        compiled = any(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
        sig = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                sig.append(("tensor", tuple(leaf.shape), leaf.dtype, leaf.device))
            else:
                sig.append(("value", leaf if _hashable(leaf) else repr(leaf)))
        return (tag, None if idx is None else tuple(idx.shape), compiled, str(spec), tuple(sig))

    def _statics(self, leaves: list) -> list[torch.Tensor | None]:
        """The static copies of the tensor arguments, from the pool (shared by every graph of the same shapes)."""
        return [
            self.pool.get(f"argument.{i}", leaf.shape, leaf.dtype, leaf.device)
            if isinstance(leaf, torch.Tensor)
            else None
            for i, leaf in enumerate(leaves)
        ]

    @staticmethod
    def _write(statics: list, leaves: list) -> None:
        for static, leaf in zip(statics, leaves):
            if static is not None:
                static.copy_(leaf)

    def _capture(self, key: tuple, pruner, fn: Callable, leaves: list, spec) -> Any:
        touched: set[BufferKey] = set()
        self.pool.touched = touched
        try:
            statics = self._statics(leaves)
            self._write(statics, leaves)
            call_leaves = [s if s is not None else leaf for s, leaf in zip(statics, leaves)]
            args, kwargs = pytree.tree_unflatten(call_leaves, spec)
            run = lambda: fn(*args, **kwargs)  # noqa: E731
            backend = make_backend(self.device, self._mempool, self._stream)
            result = backend.warm_up(run)  # the step's real result; allocates every buffer the forward needs
            result = pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, result)
            state = pruner.state()
            self.pool.frozen = "while a CUDA graph was being captured"
            try:
                outputs = backend.capture(run)
            except Exception as err:  # noqa: BLE001 - any capture failure leaves this key eager
                reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                self.refused[key] = reason
                self.stopped = f"a capture failed earlier in this generation ({reason})"
                self.counts.refuse(f"{_describe(key)}: {reason}")
                log.warning(
                    "catlab: CUDA graph capture failed for %s (%s); this shape runs eagerly, and nothing more "
                    "is captured until the next generation",
                    _describe(key),
                    reason,
                )
                pruner.restore(state)
                return result
        finally:
            self.pool.frozen, self.pool.touched = None, None
        pruner.restore(state)
        # the buffers set before the forward (index rows) or only read in it (the output cache at a
        # pruned step) are not requested during it: add what the pruner's state holds
        touched |= self.pool.holding([pruner.row_indices, *pytree.tree_leaves(state)])
        buffers = {k: self.pool.peek(k) for k in touched}
        self.graphs[key] = _Graph(backend, statics, outputs, buffers, state, self.generation)
        self.captures += 1
        self.counts.forward_captures += 1
        return result

    # -- memory ---------------------------------------------------------------------
    def release(self, unused_only: bool = False) -> int:
        """Drop every graph (``unused_only``: those the current generation did not replay or capture) and the
        buffers no remaining graph uses; returns the bytes of buffers released. On CUDA the device is
        synchronised first (a replay still running reads those buffers) and ``torch.cuda.empty_cache()``
        then hands the memory back to the driver."""
        if not self.emulated:
            torch.cuda.synchronize(self.device)
        for key in [k for k, g in self.graphs.items() if not unused_only or g.generation < self.generation]:
            del self.graphs[key]
        keep = set().union(*(g.buffers for g in self.graphs.values())) if self.graphs else set()
        freed = self.pool.release(keep)
        if not self.emulated:
            torch.cuda.empty_cache()
        return freed


def _fingerprint(transformer: nn.Module) -> tuple:
    params = tuple((id(p), p.data_ptr()) for p in transformer.parameters())
    return params, sum(1 for _ in transformer.modules())


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _describe(key: tuple) -> str:
    shape = key[1]
    return "a full step" if shape is None else f"a pruned step of k={shape[1]} ({shape[0]} rows)"


def graphs_of(transformer: nn.Module) -> ForwardGraphs:
    """The transformer's graph store, created on first use on the transformer's device."""
    state = state_of(transformer)
    device = next(transformer.parameters()).device
    if state.graphs is None or state.graphs.device != device:
        state.graphs = ForwardGraphs(device)
    return state.graphs


def release_graphs(target, unused_only: bool = False) -> int:
    """Free the captured graphs of ``target`` (a pipeline or a transformer) and their buffers; bytes released."""
    transformer = getattr(target, "transformer", target)
    state = peek_state(transformer)
    if state is None or state.graphs is None:
        return 0
    freed = state.graphs.release(unused_only)
    if not unused_only:
        state.graphs = None
    return freed


def graph_refusal(
    transformer: nn.Module, policy=None, *, inside_hooks: bool = False, step_cache=None, count_macs: bool = False
) -> str | None:
    """Why the forward of ``transformer`` under ``policy`` cannot be captured (``None``: it can).

    Captured graphs replay kernels only: anything that must run Python during the forward
    (a probe layer recording attention, a step cache deciding per call, a reuse rule inside
    the transformer, a MAC counter, another library's hook) rules them out.
    """
    device = next(transformer.parameters()).device
    if device.type != "cuda" and not emulating():
        return f"the transformer is on {device.type}; CUDA graphs need a CUDA device"
    name = getattr(policy, "name", "?")
    caps = policy.capabilities if policy is not None else Capability.NONE
    if Capability.IN_STEP_ENGINE in caps:
        return f"selector '{name}' prunes inside each forward with its own engine"
    if Capability.ATTENTION_PROBES in caps:
        return f"selector '{name}' records attention maps of probe layers inside the forward"
    if step_cache is not None:
        return f"step cache '{getattr(step_cache, 'name', type(step_cache).__name__)}' decides per call, in Python"
    if inside_hooks:
        return "the reuse rule runs inside the transformer (with a step cache or a K/V rule)"
    if count_macs:
        return "sampler.count_macs counts MACs in Python at every module call"
    foreign = _foreign_hooks(transformer)
    if foreign:
        return f"other hooks run Python inside the forward: {', '.join(foreign[:3])}" + (
            " ..." if len(foreign) > 3 else ""
        )
    return None


def _foreign_hooks(transformer: nn.Module) -> list[str]:
    found = []
    for name, module in transformer.named_modules():
        hooks = set(hook_names(module)) - PRUNING_HOOKS
        if hooks:
            found.append(f"{name or 'transformer'}: {', '.join(sorted(hooks))}")
        if module._forward_hooks or module._forward_pre_hooks:
            found.append(f"{name or 'transformer'}: torch module hooks")
        if getattr(module, "_hf_hook", None) is not None:
            found.append(f"{name or 'transformer'}: accelerate hooks (offloading moves weights between calls)")
    return found


def log_refusal(reason: str, transformer: nn.Module | None = None) -> None:
    """The one line a run prints when it asked for CUDA graphs and runs eagerly; once per reason and
    transformer, so a sweep of many generations says it once."""
    if transformer is not None:
        said = state_of(transformer).refusals
        if reason in said:
            return
        said.add(reason)
    log.warning("catlab: cuda_graphs=true but running eagerly: %s", reason)
