"""Token-pruned execution: the engine, the supported families, the diffusers hook API,
``torch.compile`` of the pruned blocks, captured CUDA graphs of the forward and a guard
against host synchronisation."""
from catlab.pruning.compile import compile_pruned, uncompile
from catlab.pruning.diffusers_api import disable_pruning, enable_pruning, pruning_macs, reset_pruning
from catlab.pruning.buffers import BufferPool
from catlab.pruning.engine import TokenPruner
from catlab.pruning.graphs import ForwardGraphs, graphs_of, release_graphs
from catlab.pruning.families import FAMILIES, FamilySpec, UnsupportedModelError, family_of
from catlab.pruning.sync_check import HostSyncError, no_host_sync

__all__ = ["TokenPruner", "BufferPool", "ForwardGraphs", "graphs_of", "release_graphs", "FamilySpec", "FAMILIES", "UnsupportedModelError", "family_of",
           "enable_pruning", "disable_pruning", "reset_pruning", "pruning_macs",
           "compile_pruned", "uncompile", "no_host_sync", "HostSyncError"]
