"""Capture and replay of CUDA graphs, and the CPU stand-in that runs the same bookkeeping without a GPU.

A backend has three calls: ``warm_up(fn)`` (run eagerly, as a capture needs first),
``capture(fn)`` (record; returns the static outputs) and ``replay()``. The CUDA one
wraps ``torch.cuda.CUDAGraph``; the stand-in, used on a CPU inside
:func:`emulate_on_cpu`, "captures" by running ``fn`` with host reads rejected (a real
capture fails on them) and "replays" by running it again on the same static buffers
and copying the result into the static outputs. Operator counters skip what the
stand-in re-runs (:func:`replaying`): a real replay dispatches nothing from the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

from catlab.pruning.sync_check import no_host_sync

_EMULATE = False
#: true while the CPU stand-in replays a graph (a real replay dispatches no operator from the host)
_REPLAYING = False


def replaying() -> bool:
    """Whether the CPU stand-in is replaying a graph now (operator counters skip what it re-runs)."""
    return _REPLAYING


@contextlib.contextmanager
def emulate_on_cpu() -> Iterator[None]:
    """Within the block, graphed execution on a CPU uses the stand-in instead of falling back to eager."""
    global _EMULATE
    previous, _EMULATE = _EMULATE, True
    try:
        yield
    finally:
        _EMULATE = previous


def emulating() -> bool:
    """Whether graphed execution on a CPU uses the stand-in now (inside :func:`emulate_on_cpu`)."""
    return _EMULATE


class _CudaBackend:
    """A real ``torch.cuda.CUDAGraph``; every graph of a store shares one memory pool and one warm-up stream."""

    def __init__(self, mempool, stream):
        self.graph = torch.cuda.CUDAGraph()
        # an explicit pool (a fresh one where none is shared), so a failed capture can end its allocation
        self.mempool = mempool if mempool is not None else torch.cuda.graph_pool_handle()
        self.stream = stream

    def warm_up(self, fn: Callable[[], Any]) -> Any:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def capture(self, fn: Callable[[], Any]) -> Any:
        """Record ``fn``; its static outputs. A failure raises the first exception that went wrong.

        torch.cuda.graph() would synchronise the device and empty the allocator's cache first; a
        selection graph is captured once per generation, so capture on the store's stream without
        either (the same capture_begin / capture_end the context manager calls). The sync-debug mode
        is lifted: a capture is set-up, even where a caller guards the step (sampler.check_sync).
        When a call inside ``fn`` is illegal during capture, CUDA invalidates the capture and
        ``capture_end`` then fails with "operation failed due to a previous error during capture",
        before it ends the pool's allocation: the reason raised is ``fn``'s own, and the pool's
        allocation is ended here whatever ``capture_end`` did.
        """
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        self.stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(self.stream):
                out = record(lambda: self.graph.capture_begin(self.mempool), fn, self._end)
            torch.cuda.current_stream().wait_stream(self.stream)
            return out
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    def _end(self) -> None:
        """``capture_end``, with the pool's allocation ended even where it throws."""
        try:
            self.graph.capture_end()
        except BaseException:
            end_pool_allocation(self.stream.device, self.mempool)
            raise

    def replay(self) -> None:
        self.graph.replay()


def record(begin: Callable[[], Any], fn: Callable[[], Any], end: Callable[[], Any]) -> Any:
    """``begin()``, ``fn()``, ``end()``; ``fn``'s result. Where ``fn`` fails, ``end()`` still runs and
    ``fn``'s exception is the one raised: the error ``end()`` then gives ("a previous error during
    capture") says nothing of the reason."""
    begin()
    try:
        out = fn()
    except BaseException:
        with contextlib.suppress(Exception):
            end()
        raise
    end()
    return out


def end_pool_allocation(device, mempool) -> None:
    """Route the allocator's requests away from ``mempool`` again (what a failed ``capture_end`` leaves undone).

    Quiet where the allocation had already ended (``capture_end`` got that far)."""
    end = getattr(torch._C, "_cuda_endAllocateToPool", None) or getattr(
        torch._C, "_cuda_endAllocateCurrentStreamToPool", None
    )
    if end is None:
        return
    try:
        end(
            torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device(),
            mempool,
        )
    except Exception:  # noqa: BLE001 - "not currently recording to mempool_id": nothing left to end
        pass


class _EmulatedBackend:
    """The CPU stand-in: "capture" runs the forward once with host reads rejected and keeps it;
    "replay" runs it again on the same static buffers and copies the result into the static outputs.
    As on CUDA, a call that fails during the capture invalidates it: the end of the capture then
    fails too, with CUDA's words (so the code that reports the reason is checked on a CPU)."""

    def __init__(self, mempool=None, stream=None):
        self.fn: Callable[[], Any] | None = None
        self.outputs: Any = None
        self._invalidated = False

    def warm_up(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def capture(self, fn: Callable[[], Any]) -> Any:
        def run():
            try:
                with no_host_sync("a forward being captured in a CUDA graph", cuda=False):
                    return fn()
            except BaseException:
                self._invalidated = True
                raise

        self.outputs = record(lambda: None, run, self._end)
        self.fn = fn
        return self.outputs

    def _end(self) -> None:
        if self._invalidated:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    def replay(self) -> None:
        global _REPLAYING
        _REPLAYING = True
        try:
            fresh = pytree.tree_leaves(self.fn())
            for static, new in zip(pytree.tree_leaves(self.outputs), fresh):
                if isinstance(static, torch.Tensor):
                    static.copy_(new)
        finally:
            _REPLAYING = False


def make_backend(device: torch.device, mempool=None, stream=None):
    """A fresh capture backend for ``device``: CUDA graphs there, the stand-in elsewhere."""
    return _EmulatedBackend() if device.type != "cuda" else _CudaBackend(mempool, stream)
