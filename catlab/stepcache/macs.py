"""MACs a transformer really executed, counted while it runs.

Step-level caches skip whole blocks, attention modules or the whole network at
some steps, decided inside diffusers' hooks; the token pruner shrinks what the
blocks see. Instead of predicting either, :class:`MacCounter` counts what ran:
every ``nn.Linear``, ``nn.Conv2d`` and ``nn.Conv3d`` call (tokens × weights, read from the
tensors they got), every ``scaled_dot_product_attention`` call (queries ×
keys × (head_dim + value_dim) per head) and every explicit ``matmul``/``bmm``
(an attention written out, a probe map, AT-EDM's G-WPR). That is the same quantity as the
family's analytic counter (:attr:`catlab.pruning.families.FamilySpec.macs`), so
the two agree exactly on full and pruned steps, and it is half of what
``torch.utils.flop_counter.FlopCounterMode`` reports.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_MATMULS = (
    torch.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.matmul,
    torch.bmm,
)  # `a @ b` reaches the mode as Tensor.matmul


class _AttentionCounter(TorchFunctionMode):
    """Adds the MACs of each SDPA call, and of each explicit matmul (an attention written out), made while active."""

    def __init__(self, counter: MacCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = (args[i] if len(args) > i else kwargs[name] for i, name in enumerate(("query", "key", "value")))
            lq, lk = q.shape[-2], k.shape[-2]
            self.counter._add(q.shape[:-2].numel() * lq * lk * (q.shape[-1] + v.shape[-1]))
        out = func(*args, **kwargs)
        if func in _MATMULS and isinstance(out, torch.Tensor) and args[0].dim() >= 1:
            self.counter._add(out.numel() * args[0].shape[-1])  # each output element: one dot product
        return out


class MacCounter:
    """Counts executed MACs per transformer forward; ``calls[i]`` is the i-th forward's total.

    Use ``with MacCounter(transformer) as counter: ...`` or :meth:`attach` / :meth:`detach`.
    It uses plain PyTorch module hooks, so it coexists with any diffusers hook.
    """

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer
        self.calls: list[int] = []
        self._handles: list = []
        self._mode: _AttentionCounter | None = None

    def _add(self, macs: int) -> None:
        if self.calls:
            self.calls[-1] += int(macs)

    def _linear(self, module: nn.Linear, args, output) -> None:
        self._add(args[0].numel() // module.in_features * module.in_features * module.out_features)

    def _conv(self, module: nn.Conv2d | nn.Conv3d, args, output) -> None:
        """Output positions (from the input: a hook after the patch embedding may keep only some of them)
        × output channels × the kernel's inputs; ``(kh, kw)``, or a video's ``(kt, kh, kw)``."""
        x, positions = args[0], 1
        for i, size in enumerate(x.shape[-len(module.kernel_size) :]):
            k, s, d = module.kernel_size[i], module.stride[i], module.dilation[i]
            if module.padding == "same":
                positions *= size
                continue
            pad = 0 if module.padding == "valid" else module.padding[i]
            positions *= (size + 2 * pad - d * (k - 1) - 1) // s + 1
        batch = x.shape[0] if x.dim() == len(module.kernel_size) + 2 else 1
        kernel = math.prod(module.kernel_size)
        self._add(batch * positions * module.out_channels * module.in_channels // module.groups * kernel)

    def _enter(self, module, args, kwargs=None) -> None:
        self.calls.append(0)
        self._mode = _AttentionCounter(self)
        self._mode.__enter__()

    def _exit(self, module, args, output) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def attach(self) -> MacCounter:
        if self._handles:
            return self
        for m in self.transformer.modules():
            if isinstance(m, nn.Linear):
                self._handles.append(m.register_forward_hook(self._linear))
            elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
                self._handles.append(m.register_forward_hook(self._conv))
        self._handles.append(self.transformer.register_forward_pre_hook(self._enter))
        self._handles.append(self.transformer.register_forward_hook(self._exit, always_call=True))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        self.calls = []

    @property
    def total(self) -> int:
        return sum(self.calls)

    def __enter__(self) -> MacCounter:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()
