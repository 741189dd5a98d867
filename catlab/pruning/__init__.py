"""Token-pruned execution: the engine, the supported families, and the diffusers hook API."""
from catlab.pruning.diffusers_api import disable_pruning, enable_pruning, pruning_macs, reset_pruning
from catlab.pruning.engine import TokenPruner
from catlab.pruning.families import FAMILIES, FamilySpec, UnsupportedModelError, family_of

__all__ = ["TokenPruner", "FamilySpec", "FAMILIES", "UnsupportedModelError", "family_of",
           "enable_pruning", "disable_pruning", "reset_pruning", "pruning_macs"]
