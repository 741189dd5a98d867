"""catlab's state on one transformer, held in one registry object (as diffusers keeps its hooks in one).

Whatever catlab keeps across calls on a transformer lives here, not as loose
attributes on the module: the captured CUDA graphs and their buffer pool, the
assembly a stock pipeline runs under (:func:`catlab.enable_pruning`), and the
graph refusals already said. ``state_of(module)`` finds or creates it;
``peek_state(module)`` only finds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

ATTRIBUTE = "_catlab_state"


@dataclass
class ModuleState:
    """Per-transformer state: ``graphs`` (a :class:`~catlab.pruning.graphs.ForwardGraphs` or ``None``),
    ``session`` (the stock-pipeline assembly, or ``None``), ``watched`` (the pipeline whose
    ``encode_prompt`` that assembly's hook watches), ``refusals`` (graph refusals already logged)."""

    graphs: Any = None
    session: Any = None
    watched: Any = None
    refusals: set[str] = field(default_factory=set)


def state_of(module: nn.Module) -> ModuleState:
    """The module's catlab state, created on first use."""
    state = module.__dict__.get(ATTRIBUTE)
    if state is None:
        state = ModuleState()
        module.__dict__[ATTRIBUTE] = state  # not a submodule or parameter: a plain attribute, set once
    return state


def peek_state(module: nn.Module) -> ModuleState | None:
    """The module's catlab state if it has one (never creates it)."""
    return module.__dict__.get(ATTRIBUTE)


def hook_names(module: nn.Module) -> list[str]:
    """Names of the diffusers hooks on ``module`` (none: an empty list), without creating a hook registry.

    The one place that knows where diffusers keeps a module's ``HookRegistry``."""
    registry = getattr(module, "_diffusers_hook", None)
    return list(getattr(registry, "hooks", None) or {})
