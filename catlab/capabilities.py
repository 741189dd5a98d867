"""What a run's parts need from the assembly that runs them, declared as a small typed set.

A selector, a reuse rule or a step cache states what it needs or allows through its
``capabilities`` (a :class:`Capability` flag set); :mod:`catlab.assembly` reads them
once, checks the composition and wires the run accordingly. Nothing else looks for
marker attributes on a part.

====================  ==========  ============================================================
flag                  declared by  meaning
====================  ==========  ============================================================
ATTENTION_PROBES      selector     reads probe layers' attention maps (its ``attention_layers``)
IN_STEP_ENGINE        selector     prunes inside each forward with its own engine; selects nothing
REPLAYS_SELECTION     selector     splits ``select`` into ``prepare_step`` + ``select_tensors``, so
                                   its tensor part may be replayed from captured graphs
COMPOSES_WITH_PRUNING step cache   token pruning may run inside the steps it computes
NEEDS_CALIBRATION     step cache   must be calibrated by one full generation first
COMPARISON_ONLY       selector     mirrors another implementation beyond the index contract (tokens
                                   repeated or fewer than k): only catlab.testing.simulate drives it
ROW_WISE              reuse rule   acts on each batch row alone (linear in the output), so it may
                                   run on the stacked guidance rows as well as on their combination
HOST_SETUP            selector     sets itself up once per generation at its first pruned step (e.g.
                                   its clusters) and may read the host there; later steps may not
HOST_LOOPS            selector     reads host values at every pruned step by design (a readable
                                   reference, not a timed method); its indices still keep the contract
LAYER_SELECTION       selector     chooses its fresh tokens per block and per module (self-attention,
                                   cross-attention, MLP) inside each forward, reusing each module's
                                   cached per-layer output for the rest (``catlab.pruning.layerwise``)
====================  ==========  ============================================================
"""

from __future__ import annotations

import enum


class Capability(enum.Flag):
    NONE = 0
    ATTENTION_PROBES = enum.auto()
    IN_STEP_ENGINE = enum.auto()
    REPLAYS_SELECTION = enum.auto()
    COMPOSES_WITH_PRUNING = enum.auto()
    NEEDS_CALIBRATION = enum.auto()
    ROW_WISE = enum.auto()
    COMPARISON_ONLY = enum.auto()
    HOST_SETUP = enum.auto()
    HOST_LOOPS = enum.auto()
    LAYER_SELECTION = enum.auto()


__all__ = ["Capability"]
