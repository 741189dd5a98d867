"""``BufferPool``: the pruning state's tensors, allocated once and written in place.

Every tensor the pruned forward keeps between steps — each attention layer's K/V
cache, the output cache, the index rows of a step — comes from a pool, one
buffer per (name, shape, dtype, device). A new generation or a full step writes
into the buffer it already has instead of allocating a new one, so

* the eager path allocates nothing per step for its state, and
* a captured CUDA graph (:mod:`catlab.pruning.graphs`), which replays fixed
  device addresses, keeps seeing the same tensors across steps and generations.

A pool can be *frozen* while a graph is being captured: asking it for a buffer
it does not hold then raises :class:`BufferAllocationError` (memory allocated
during a capture belongs to the graph and would be reused by the next replay).
"""

from __future__ import annotations

import torch

BufferKey = tuple[str, tuple[int, ...], torch.dtype, torch.device]


class BufferAllocationError(RuntimeError):
    """A buffer was requested for the first time while its pool was frozen (during a capture)."""


class BufferPool:
    """Named tensors that keep their storage; ``get`` returns the same tensor for the same key.

    ``one_shape_per_name`` (a pruner's own pool): asking for a name in a new shape drops the
    buffer of the old one, so a pipeline called at many resolutions or batch sizes holds one
    set of caches. A pool that captured graphs share keeps every shape (each graph replays
    its own) until :meth:`release`.
    """

    def __init__(self, one_shape_per_name: bool = False) -> None:
        self.one_shape_per_name = one_shape_per_name
        self._buffers: dict[BufferKey, torch.Tensor] = {}
        #: why new buffers may not be allocated now (``None``: they may)
        self.frozen: str | None = None
        #: while not ``None``, every key handed out is added here (which buffers a graph uses)
        self.touched: set[BufferKey] | None = None

    def get(self, name: str, shape, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """The buffer ``name`` of this shape, dtype and device; uninitialised the first time."""
        key = (name, tuple(int(s) for s in shape), dtype, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None:
            if self.frozen is not None:
                raise BufferAllocationError(f"buffer '{name}' {tuple(shape)} first requested {self.frozen}")
            if self.one_shape_per_name:
                for old in [k for k in self._buffers if k[0] == name]:
                    del self._buffers[old]
            buf = self._buffers[key] = torch.empty(key[1], dtype=dtype, device=key[3])
        if self.touched is not None:
            self.touched.add(key)
        return buf

    def keys(self) -> set[BufferKey]:
        return set(self._buffers)

    def peek(self, key: BufferKey) -> torch.Tensor | None:
        """The buffer held under ``key``, without allocating or recording it."""
        return self._buffers.get(key)

    def holding(self, tensors) -> set[BufferKey]:
        """The keys of the buffers that are (by identity) among ``tensors``."""
        ids = {id(t) for t in tensors if isinstance(t, torch.Tensor)}
        return {key for key, buf in self._buffers.items() if id(buf) in ids}

    def release(self, keep: set[BufferKey] | None = None) -> int:
        """Drop every buffer not in ``keep``; returns the bytes released."""
        keep = keep or set()
        freed = 0
        for key in [k for k in self._buffers if k not in keep]:
            buf = self._buffers.pop(key)
            freed += buf.numel() * buf.element_size()
        return freed

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def __len__(self) -> int:
        return len(self._buffers)
