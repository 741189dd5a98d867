"""Selectors, step caches and reuse rules declare what they need the same way: ``capabilities = Capability...``."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import catlab  # noqa: F401  (registers the built-in components)
from catlab.capabilities import Capability
from catlab.registry import reuses, selectors, stepcaches
from catlab.selection.base import Policy


def test_a_selector_declares_capabilities_as_a_class_attribute():
    @dataclass
    class Replaying(Policy):
        capabilities = Capability.REPLAYS_SELECTION

    policy = Replaying()
    assert policy.capabilities == Capability.REPLAYS_SELECTION
    policy.attention_layers = (1,)  # probe layers imply the probes, as for every selector
    assert policy.capabilities == Capability.REPLAYS_SELECTION | Capability.ATTENTION_PROBES
    assert Policy().capabilities == Capability.NONE  # the subclass's declaration stays its own


def test_the_former_name_declares_still_works_and_warns():
    with pytest.warns(DeprecationWarning, match="declares is deprecated"):

        @dataclass
        class Old(Policy):
            declares = Capability.IN_STEP_ENGINE

    assert Old().capabilities == Capability.IN_STEP_ENGINE


def test_built_in_components_read_capabilities_by_one_name():
    assert Capability.REPLAYS_SELECTION in selectors.build("cat").capabilities
    assert Capability.IN_STEP_ENGINE in selectors.build("atedm").capabilities
    assert Capability.ATTENTION_PROBES in selectors.build("atedm_reuse").capabilities
    assert Capability.COMPOSES_WITH_PRUNING in stepcaches.build("taylorseer").capabilities
    assert Capability.ROW_WISE in reuses.build("taylor").capabilities
