from dataclasses import dataclass

import pytest

from catlab.registry import ComponentError, Registry, models, selectors


def test_build_checks_keys_and_names():
    reg = Registry("widget")

    @reg.register("spinner")
    @dataclass
    class Spinner:
        speed: float = 1.0

    assert reg.names() == ["spinner"]
    assert reg.build({"name": "spinner", "speed": 2.0}).speed == 2.0
    assert reg.build("spinner").speed == 1.0
    with pytest.raises(ComponentError, match=r"no config key\(s\) \['sped'\]; allowed: \['speed'\]"):
        reg.build({"name": "spinner", "sped": 2})
    with pytest.raises(ComponentError, match="unknown widget 'wheel'; registered: spinner"):
        reg.build({"name": "wheel"})


def test_builtin_registries_list_their_components():
    assert {"full", "random"} <= set(selectors.names())
    assert {"tiny_sd3", "tiny_pixart", "sd3", "pixart_sigma"} <= set(models.names())
    assert selectors.names("ra*") == ["random", "ras"]


def test_double_registration_is_refused():
    reg = Registry("widget")
    reg.register("a")(type("A", (), {}))
    with pytest.raises(ComponentError, match="registered twice"):
        reg.register("a")(type("B", (), {}))


def test_builtin_names_are_catlabs_own_components(monkeypatch):
    """A component registered outside ``catlab.`` (a plugin, a test) is listed by names() but not as built-in."""
    monkeypatch.setattr(selectors, "_entries", dict(selectors._entries))
    selectors.register("elsewhere")(type("Elsewhere", (), {"__module__": "my_plugin.selector"}))
    assert "elsewhere" in selectors.names() and "elsewhere" not in selectors.builtin_names()
    assert {"cat", "full", "random"} <= set(selectors.builtin_names())
    assert selectors.builtin_names("ra*") == ["random", "ras"]
