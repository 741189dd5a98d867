"""Token-pruned execution, family-agnostic: the engine, what a family is to it (``FamilySpec``; the
families themselves are modules of :mod:`catlab.families`), ``torch.compile`` of the pruned blocks,
captured CUDA graphs of the forward, catlab's per-transformer state and a guard against host
synchronisation. (Stock diffusers pipelines are pruned through :mod:`catlab.stock_pipelines`.)"""

from catlab.pruning.buffers import BufferPool
from catlab.pruning.capture import emulate_on_cpu, replaying
from catlab.pruning.compile import compile_pruned, uncompile
from catlab.pruning.engine import TokenPruner
from catlab.pruning.families import FamilySpec, UnsupportedModelError, family_of, family_specs
from catlab.pruning.graphs import ForwardGraphs, graphs_of, release_graphs
from catlab.pruning.selection_graphs import SelectionGraphs
from catlab.pruning.state import ModuleState, peek_state, state_of
from catlab.pruning.sync_check import HostSyncError, no_host_sync

__all__ = [
    "TokenPruner",
    "BufferPool",
    "ForwardGraphs",
    "graphs_of",
    "release_graphs",
    "FamilySpec",
    "family_specs",
    "UnsupportedModelError",
    "family_of",
    "SelectionGraphs",
    "ModuleState",
    "state_of",
    "peek_state",
    "emulate_on_cpu",
    "replaying",
    "compile_pruned",
    "uncompile",
    "no_host_sync",
    "HostSyncError",
]
