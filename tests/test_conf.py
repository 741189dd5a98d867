"""conf/ mirrors the registries: every component has a YAML, and a YAML restates its component's defaults.

The dataclass fields of a component are its single source of truth for defaults.
A YAML named after its component (``conf/selector/cat.yaml``) documents them and
must agree; a YAML with another name is a preset (``conf/reuse/taylor2.yaml``,
``conf/model/sd3_medium.yaml``) and may set any of the component's fields.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

import catlab  # noqa: F401  (registers the built-in components)
from catlab.registry import REGISTRIES, config_fields

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = [kind for kind in REGISTRIES if kind != "metric"]  # metrics are named in evaluate's `metrics` list


def _yamls(group: str) -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text()) or {} for p in sorted((CONF / group).glob("*.yaml"))}


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return dataclasses.MISSING
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("group", GROUPS)
def test_every_component_has_a_config(group):
    named = {cfg.get("name") for cfg in _yamls(group).values()}
    assert set(REGISTRIES[group].builtin_names()) <= named, (
        f"conf/{group}/ lacks a YAML for {set(REGISTRIES[group].builtin_names()) - named}"
    )


@pytest.mark.parametrize("group, stem", [(g, s) for g in GROUPS for s in _yamls(g)])
def test_config_keys_are_fields_and_defaults_agree(group, stem):
    cfg = dict(_yamls(group)[stem])
    name = cfg.pop("name")
    cls = REGISTRIES[group].get(name)
    assert set(cfg) <= set(config_fields(cls)), f"conf/{group}/{stem}.yaml: keys {set(cfg) - set(config_fields(cls))}"
    if stem != name or not dataclasses.is_dataclass(cls):
        return  # a preset
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in cfg.items():
        if isinstance(value, str) and (value == "???" or value.startswith("${")):
            continue  # mandatory, or taken from another config key
        assert value == _default(fields[key]), (
            f"conf/{group}/{stem}.yaml: {key}={value!r}, code default {_default(fields[key])!r}"
        )


def test_the_check_finds_a_drifted_default(monkeypatch):
    """The check above fails when a YAML and its dataclass disagree."""
    drifted = {**_yamls("selector"), "random": {"name": "random", "alpha": 0.5}}
    monkeypatch.setitem(globals(), "_yamls", lambda group: drifted)
    with pytest.raises(AssertionError, match="alpha=0.5, code default 0.3"):
        test_config_keys_are_fields_and_defaults_agree("selector", "random")
