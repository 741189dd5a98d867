"""``SelectionGraphs``: a selector's per-step tensor work replayed from CUDA graphs.

For a selector that splits its step into a host part and a tensor part
(``prepare_step`` / ``select_tensors``, see :class:`~catlab.selection.base.Policy`),
held by the step planner when a run asks for ``cuda_graphs``.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from catlab.pruning.capture import make_backend

log = logging.getLogger("catlab.graphs")


class SelectionGraphs:
    """Captured graphs of a selector's per-step tensor work, for one generation.

    For a policy that splits its selection (``prepare_step`` / ``select_tensors``, see
    :class:`~catlab.selection.base.Policy`): the host part runs every step; the tensor part
    runs eagerly the first time a key is seen, is captured the second time (after an eager
    warm-up that is the step's result) and replayed from then on, with the step's output
    copied into a static buffer. The policy's state tensors are re-made each generation, so
    :meth:`reset` drops the graphs. A ``select_tensors`` that rebinds a tensor attribute of
    the policy or its parts (a replay would keep reading the old tensor) is not captured,
    and a graph whose policy had a tensor rebound between steps (by ``observe`` or
    ``prepare_step``: a reference output set late, say) is dropped before it would replay:
    that key runs eagerly for the rest of the generation, said once. :attr:`reasons` keeps
    why, per key; :attr:`captures` and :attr:`replays` count this generation's.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.emulated = self.device.type != "cuda"
        self._stream = None if self.emulated else torch.cuda.Stream(self.device)
        self.reset()

    def reset(self) -> None:
        self.graphs: dict[tuple, tuple] = {}
        self.seen: set[tuple] = set()
        #: refused keys → why they run eagerly
        self.reasons: dict[tuple, str] = {}
        self.captures = self.replays = 0
        self.stopped = False  # a capture failed: nothing more is captured this generation

    @property
    def refused(self) -> set[tuple]:
        return set(self.reasons)

    def select(self, policy, state) -> torch.Tensor:
        key = policy.prepare_step(state)
        if key is None or state.output is None or state.attention:
            return policy.select_tensors(state)
        key = (key, state.k, state.batch_size, tuple(state.output.shape), state.output.dtype)
        graph = self.graphs.get(key)
        if graph is not None:
            backend, static, indices, slots = graph
            changed = _rebound(slots, _tensor_slots(policy))
            if changed:  # observe or prepare_step rebound state the graph reads: its replay would be stale
                del self.graphs[key]
                self._refuse(key, policy, f"observe or prepare_step rebinds {', '.join(changed[:3])} between steps")
                return policy.select_tensors(state)
            static.copy_(state.output)
            backend.replay()
            self.replays += 1
            return indices.clone()
        if key in self.reasons or key not in self.seen or self.stopped:
            self.seen.add(key)
            return policy.select_tensors(state)
        return self._capture(key, policy, state)

    def _capture(self, key: tuple, policy, state) -> torch.Tensor:
        static = state.output.clone()
        fixed = replace(state, output=static)
        run = lambda: policy.select_tensors(fixed)  # noqa: E731
        backend = make_backend(self.device, None, self._stream)
        before = _tensor_slots(policy)
        result = backend.warm_up(run).clone()
        changed = _rebound(before, _tensor_slots(policy))
        if changed:
            self._refuse(key, policy, f"select_tensors rebinds {', '.join(changed[:3])}")
            return result
        try:
            indices = backend.capture(run)
        except Exception as err:  # noqa: BLE001 - any capture failure leaves this key eager
            self.stopped = True
            self._refuse(
                key,
                policy,
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; "
                "nothing more is captured this generation",
            )
            return result
        self.graphs[key] = (backend, static, indices, _tensor_slots(policy))
        self.captures += 1
        return result

    def _refuse(self, key: tuple, policy, reason: str) -> None:
        self.reasons[key] = f"selector '{getattr(policy, 'name', '?')}' step: {reason}"
        log.warning(
            "catlab: selector '%s' step not captured in a CUDA graph (%s); it runs eagerly",
            getattr(policy, "name", "?"),
            reason,
        )


def _tensor_slots(obj, prefix: str = "", depth: int = 2) -> dict[str, int]:
    """``{attribute path: id}`` of the tensors held by ``obj`` and its parts (objects it holds), two levels deep."""
    slots = {}
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            slots[prefix + name] = id(value)
        elif depth > 0 and hasattr(value, "__dict__") and not isinstance(value, (type, nn.Module, torch.Generator)):
            slots.update(_tensor_slots(value, f"{prefix}{name}.", depth - 1))
    return slots


def _rebound(before: dict[str, int], after: dict[str, int]) -> list[str]:
    return [name for name in after if name in before and before[name] != after[name]] + [
        name for name in after if name not in before
    ]
