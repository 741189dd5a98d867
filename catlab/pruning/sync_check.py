"""``no_host_sync()``: fail loudly when code makes the host wait for the device.

On a GPU the denoising loop only stays fast if the host can queue step t+1 while
the device still computes step t. Any read of a tensor's *value* on the host
(``.item()``, ``bool(x)``, ``.tolist()``, ``.cpu()``, an ``if`` on a tensor, a
data-dependent shape such as ``x[mask]`` or ``nonzero``) stalls that pipeline.

::

    from catlab.selection.base import select_indices
    from catlab.pruning.sync_check import no_host_sync

    with no_host_sync():
        indices = select_indices(policy, state)   # raises HostSyncError on a host read

Two layers of checking, so the guard is useful on any machine:

* everywhere, a :class:`~torch.overrides.TorchFunctionMode` rejects the Python-level
  calls that read values or produce data-dependent shapes; on a CPU-only machine
  this finds the code that *would* synchronise on a GPU;
* on CUDA, ``torch.cuda.set_sync_debug_mode("error")`` additionally rejects every
  real synchronisation, including ones made inside C++ kernels.

A blocking upload (``cpu_tensor.to("cuda")`` without ``non_blocking=True``) also
waits for everything queued on the device, and is rejected too; host work that
reads no device tensor (a seeded CPU generator, Python arithmetic) is allowed.
On a CPU-only machine uploads cannot happen, so only the CUDA mode finds them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

Tensor = torch.Tensor


class HostSyncError(RuntimeError):
    """A tensor value was read on the host inside a :func:`no_host_sync` block."""


#: Python-level calls that read a tensor's values on the host (a sync on any accelerator).
VALUE_READS = {
    Tensor.item: "Tensor.item()",
    Tensor.tolist: "Tensor.tolist()",
    Tensor.__bool__: "bool(tensor) (an `if` or `and`/`or` on a tensor)",
    Tensor.__int__: "int(tensor)",
    Tensor.__float__: "float(tensor)",
    Tensor.__index__: "a tensor used as a Python index or range bound",
    Tensor.cpu: "Tensor.cpu()",
    Tensor.numpy: "Tensor.numpy()",
}
#: Calls whose output shape depends on tensor values (the host must wait to size it).
DATA_DEPENDENT = {
    torch.nonzero: "torch.nonzero",
    Tensor.nonzero: "Tensor.nonzero()",
    torch.argwhere: "torch.argwhere",
    Tensor.argwhere: "Tensor.argwhere()",
    torch.masked_select: "torch.masked_select",
    Tensor.masked_select: "Tensor.masked_select()",
    torch.unique: "torch.unique",
    Tensor.unique: "Tensor.unique()",
    torch.unique_consecutive: "torch.unique_consecutive",
    Tensor.unique_consecutive: "Tensor.unique_consecutive()",
    torch.bincount: "torch.bincount",
    Tensor.bincount: "Tensor.bincount()",
    torch.equal: "torch.equal",
    Tensor.equal: "Tensor.equal()",
    torch.is_nonzero: "torch.is_nonzero",
    Tensor.is_nonzero: "Tensor.is_nonzero()",
}


def _blocking_upload(func, args, kwargs) -> bool:
    """``cpu_tensor.to(device)`` / ``.cuda()`` / ``dev.copy_(cpu)`` without ``non_blocking``: the copy waits for the
    stream.
    """
    if kwargs.get("non_blocking") or not args or not isinstance(args[0], Tensor):
        return False
    if func is Tensor.copy_:
        src = args[1] if len(args) > 1 else kwargs.get("src")
        return (
            isinstance(src, Tensor)
            and src.device.type == "cpu"
            and args[0].device.type != "cpu"
            and not (len(args) > 2 and args[2])
        )
    if args[0].device.type != "cpu":
        return False
    if func is Tensor.cuda:
        return not (len(args) > 2 and args[2])
    targets = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device))]
    blocking = not any(a is True for a in args[1:])  # to(device, dtype, non_blocking) positional form
    return blocking and any(torch.device(t).type != "cpu" for t in targets)


def _bool_index(args) -> bool:
    """``x[mask]`` with a boolean tensor mask (its result size depends on the mask's values)."""
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, Tensor) and p.dtype == torch.bool and p.dim() > 0 for p in parts)


class _HostReadGuard(TorchFunctionMode):
    """Rejects the calls in :data:`VALUE_READS` and :data:`DATA_DEPENDENT`, boolean-mask reads and blocking uploads."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = VALUE_READS.get(func) or DATA_DEPENDENT.get(func)
        if name is None and func is Tensor.__getitem__ and _bool_index(args):
            name = "indexing with a boolean mask"
        if func is torch.repeat_interleave or func is Tensor.repeat_interleave:
            if not (kwargs or {}).get("output_size") and isinstance(args[1] if len(args) > 1 else None, Tensor):
                name = "repeat_interleave with tensor repeats and no output_size"
        if func in (Tensor.to, Tensor.cuda, Tensor.copy_) and _blocking_upload(func, args, kwargs or {}):
            name = "a blocking host-to-device copy (it waits for the device's queue; pass non_blocking=True)"
        if name is not None:
            raise HostSyncError(f"{name} synchronises the host with the device; not allowed in {self.what}")
        return func(*args, **(kwargs or {}))


@contextmanager
def no_host_sync(what: str = "the per-step path", cuda: bool | None = None) -> Iterator[None]:
    """Raise :class:`HostSyncError` on any host read of tensor values inside the block.

    ``what`` names the guarded code in the error message. ``cuda`` (default: when
    CUDA is available) also turns on ``torch.cuda.set_sync_debug_mode("error")``.
    """
    use_cuda = torch.cuda.is_available() if cuda is None else cuda
    previous = torch.cuda.get_sync_debug_mode() if use_cuda else None
    if use_cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with _HostReadGuard(what):
            yield
    finally:
        if use_cuda:
            torch.cuda.set_sync_debug_mode(previous)
